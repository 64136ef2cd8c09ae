package kleidi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// KeyState says what a KEK is used for.
type KeyState string

// The states of a KEK. Exactly one KEK of a non-empty keyring is active.
const (
	// KeyActive is the KEK new data is encrypted with.
	KeyActive KeyState = "active"
	// KeyRetired is a KEK kept to decrypt data encrypted before a rotation.
	KeyRetired KeyState = "retired"
)

// KeyRecord is one KEK as a keyring stores it: never the key itself, only wrapped copies of it.
type KeyRecord struct {
	// ID is the key ID: "kleidi-<provider>-<fingerprint>".
	ID string `json:"id"`
	// Created is when the KEK was generated.
	Created time.Time `json:"created"`
	// State is [KeyActive] or [KeyRetired].
	State KeyState `json:"state"`
	// Wrapped holds one or more wrapped copies of the KEK, one per root of trust.
	Wrapped []WrappedKey `json:"wrapped"`
}

// WrappedKey is a KEK wrapped by one root of trust.
type WrappedKey struct {
	// Root names the root of trust that wrapped it: the [Provider.Name].
	Root string `json:"root"`
	// Blob is what [Provider.Wrap] returned.
	Blob []byte `json:"blob"`
}

// Keyring stores the list of wrapped KEKs. It holds nothing secret. Implementations are safe for concurrent
// use, and Update excludes every other Update of the same keyring, in this process and in others.
type Keyring interface {
	// Load returns the records; a keyring never written has none. A corrupt keyring gives an error wrapping
	// [ErrInvalidKeyring].
	Load(ctx context.Context) ([]KeyRecord, error)
	// Update loads the records, passes them to change and stores what change returns, atomically. If loading
	// or change fails, nothing is written. It returns the stored records.
	Update(ctx context.Context, change func([]KeyRecord) ([]KeyRecord, error)) ([]KeyRecord, error)
}

// Keyring file format.
const (
	keyringFormat  = "kleidi-keyring"
	keyringVersion = 1
	// maxKeyringSize bounds what is read from a keyring file.
	maxKeyringSize = 16 << 20
	// maxKeyRecords bounds the number of KEKs in a keyring: daily rotation for ten years.
	maxKeyRecords = 4096
	// maxWrappedCopies bounds the wrapped copies of one KEK.
	maxWrappedCopies = 64
)

type keyringFile struct {
	Format  string      `json:"format"`
	Version int         `json:"version"`
	Keys    []KeyRecord `json:"keys"`
}

// encodeKeyring checks records and returns the keyring file that holds them.
func encodeKeyring(records []KeyRecord) ([]byte, error) {
	if err := checkRecords(records); err != nil {
		return nil, err
	}
	b, err := json.MarshalIndent(keyringFile{Format: keyringFormat, Version: keyringVersion, Keys: records}, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// parseKeyring parses a keyring file. Errors wrap [ErrInvalidKeyring].
func parseKeyring(b []byte) ([]KeyRecord, error) {
	if len(b) == 0 {
		return nil, fmt.Errorf("%w: empty file", ErrInvalidKeyring)
	}
	if len(b) > maxKeyringSize {
		return nil, fmt.Errorf("%w: %d bytes is larger than %d", ErrInvalidKeyring, len(b), maxKeyringSize)
	}
	// The version is read first, so a newer format gets a clear message rather than a field error.
	var head struct {
		Format  string `json:"format"`
		Version int    `json:"version"`
	}
	if err := json.Unmarshal(b, &head); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidKeyring, err)
	}
	if head.Format != keyringFormat {
		return nil, fmt.Errorf("%w: format %q, want %q", ErrInvalidKeyring, head.Format, keyringFormat)
	}
	if head.Version != keyringVersion {
		return nil, fmt.Errorf("%w: unsupported version %d, want %d", ErrInvalidKeyring, head.Version, keyringVersion)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var f keyringFile
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidKeyring, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w: data after the keyring", ErrInvalidKeyring)
	}
	if err := checkRecords(f.Keys); err != nil {
		return nil, err
	}
	return f.Keys, nil
}

// checkRecords returns an error wrapping [ErrInvalidKeyring] unless records form a valid keyring.
func checkRecords(records []KeyRecord) error {
	invalid := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalidKeyring}, args...)...)
	}
	if len(records) > maxKeyRecords {
		return invalid("%d keys, at most %d allowed", len(records), maxKeyRecords)
	}
	seen := make(map[string]bool, len(records))
	active := 0
	for i, r := range records {
		if err := checkKeyID(r.ID); err != nil {
			return invalid("key %d: %v", i, err)
		}
		if seen[r.ID] {
			return invalid("key %s appears twice", r.ID)
		}
		seen[r.ID] = true
		switch r.State {
		case KeyActive:
			active++
		case KeyRetired:
		default:
			return invalid("key %s: unknown state %q", r.ID, r.State)
		}
		if len(r.Wrapped) == 0 || len(r.Wrapped) > maxWrappedCopies {
			return invalid("key %s: %d wrapped copies, want 1 to %d", r.ID, len(r.Wrapped), maxWrappedCopies)
		}
		roots := make(map[string]bool, len(r.Wrapped))
		for _, w := range r.Wrapped {
			if err := CheckProviderName(w.Root); err != nil {
				return invalid("key %s: %v", r.ID, err)
			}
			if roots[w.Root] {
				return invalid("key %s: two copies for root %s", r.ID, w.Root)
			}
			roots[w.Root] = true
			if len(w.Blob) == 0 || len(w.Blob) > MaxWrappedKeySize {
				return invalid("key %s: wrapped copy of %d bytes, want 1 to %d", r.ID, len(w.Blob), MaxWrappedKeySize)
			}
		}
	}
	if len(records) > 0 && active != 1 {
		return invalid("%d active keys, want exactly 1", active)
	}
	return nil
}

// FileKeyring is a [Keyring] in one file. The file is written with mode 0600, atomically (temporary file, fsync,
// rename, fsync of the directory), under an advisory lock (flock on the file's path + ".lock"), so a running
// server and a rotate command never corrupt it. A corrupt file is reported and never overwritten.
type FileKeyring struct {
	path string
}

var _ Keyring = (*FileKeyring)(nil)

// NewFileKeyring returns the keyring stored at path. The directory must exist; the file is created by the first
// Update.
func NewFileKeyring(path string) *FileKeyring { return &FileKeyring{path: path} }

// Path returns the path of the keyring file.
func (k *FileKeyring) Path() string { return k.path }

// Load reads the keyring under a shared lock.
func (k *FileKeyring) Load(ctx context.Context) ([]KeyRecord, error) {
	unlock, err := k.lock(ctx, syscall.LOCK_SH)
	if err != nil {
		return nil, err
	}
	defer unlock()
	return k.read()
}

// Update changes the keyring under an exclusive lock.
func (k *FileKeyring) Update(ctx context.Context, change func([]KeyRecord) ([]KeyRecord, error)) ([]KeyRecord, error) {
	unlock, err := k.lock(ctx, syscall.LOCK_EX)
	if err != nil {
		return nil, err
	}
	defer unlock()
	records, err := k.read()
	if err != nil {
		return nil, err
	}
	records, err = change(records)
	if err != nil {
		return nil, err
	}
	b, err := encodeKeyring(records)
	if err != nil {
		return nil, err
	}
	if err := writeFileAtomic(k.path, b); err != nil {
		return nil, fmt.Errorf("kleidi: write keyring %s: %w", k.path, err)
	}
	return records, nil
}

func (k *FileKeyring) read() ([]KeyRecord, error) {
	f, err := os.Open(k.path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("kleidi: read keyring: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxKeyringSize+1))
	if err != nil {
		return nil, fmt.Errorf("kleidi: read keyring %s: %w", k.path, err)
	}
	records, err := parseKeyring(b)
	if err != nil {
		return nil, fmt.Errorf("kleidi: keyring %s: %w", k.path, err)
	}
	return records, nil
}

// lock takes an advisory lock of kind how, waiting until ctx ends.
func (k *FileKeyring) lock(ctx context.Context, how int) (unlock func(), err error) {
	f, err := os.OpenFile(k.path+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("kleidi: lock keyring: %w", err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), how|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("kleidi: lock keyring %s: %w", k.path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("kleidi: lock keyring %s: %w", k.path, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// writeFileAtomic replaces path with data: a temporary file in the same directory, fsync, rename, fsync of the
// directory. Readers see the old file or the new one, never a mix, even after a crash.
func writeFileAtomic(path string, data []byte) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err := tmp.Chmod(0o600); err != nil {
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// MemoryKeyring is a [Keyring] in memory, for tests, examples and programs that keep their keyring elsewhere.
// It stores the same encoding as [FileKeyring] and checks it the same way.
type MemoryKeyring struct {
	mu   sync.Mutex
	data []byte
}

var _ Keyring = (*MemoryKeyring)(nil)

// NewMemoryKeyring returns an empty keyring in memory.
func NewMemoryKeyring() *MemoryKeyring { return &MemoryKeyring{} }

// Load returns the records.
func (k *MemoryKeyring) Load(ctx context.Context) ([]KeyRecord, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.read()
}

func (k *MemoryKeyring) read() ([]KeyRecord, error) {
	if k.data == nil {
		return nil, nil
	}
	return parseKeyring(k.data)
}

// Update changes the records.
func (k *MemoryKeyring) Update(ctx context.Context, change func([]KeyRecord) ([]KeyRecord, error)) ([]KeyRecord, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	records, err := k.read()
	if err != nil {
		return nil, err
	}
	if records, err = change(records); err != nil {
		return nil, err
	}
	b, err := encodeKeyring(records)
	if err != nil {
		return nil, err
	}
	k.data = b
	return records, nil
}

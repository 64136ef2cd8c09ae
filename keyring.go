package kleidi

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sync"
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
	// Proof is what [Authenticator.Prove] of the root returned over the copy (see [Envelope]), or nil for a copy
	// made by a root that is not an Authenticator or by a version of kleidi before proofs (keyring version 1).
	Proof []byte `json:"proof,omitempty"`

	// legacy marks a copy read from a keyring of version 1, written before proofs: the only copies without a proof
	// that an Authenticator root accepts, as local state. A keyring stays version 1 while it holds such a copy.
	legacy bool
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
	keyringVersion = 2 // 2 added WrappedKey.Proof; version 1 files are read
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
	version := keyringVersion
	for _, r := range records {
		for _, w := range r.Wrapped {
			if w.legacy && w.Proof == nil {
				version = 1 // until every copy read from version 1 is proved, or replaced
			}
		}
	}
	b, err := json.MarshalIndent(keyringFile{Format: keyringFormat, Version: version, Keys: records}, "", "  ")
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
	if head.Version != 1 && head.Version != keyringVersion {
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
	if f.Version == 1 {
		for i := range f.Keys {
			for j := range f.Keys[i].Wrapped {
				f.Keys[i].Wrapped[j].legacy = true
			}
		}
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
			if len(w.Proof) > MaxProofSize {
				return invalid("key %s: proof of %d bytes, want at most %d", r.ID, len(w.Proof), MaxProofSize)
			}
		}
	}
	if len(records) > 0 && active != 1 {
		return invalid("%d active keys, want exactly 1", active)
	}
	return nil
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

package kleidi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

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

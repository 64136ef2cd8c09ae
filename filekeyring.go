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

	"github.com/kleidi-kms/kleidi/internal/atomicfile"
	"github.com/kleidi-kms/kleidi/internal/trustedpath"
)

// FileKeyring is a [Keyring] in one file. The file is written with mode 0600, atomically (temporary file, fsync,
// rename, fsync of the directory), under an advisory lock (flock on the file's path + ".lock"), so a running
// server and a rotate command never corrupt it. A corrupt file is reported and never overwritten.
//
// Neither the keyring nor its lock file may be a symbolic link, and the keyring must be owned by root or by the
// user reading it and must not be writable by group or other users; otherwise it is refused with an error that
// wraps [ErrInvalidKeyring]. Root may use a keyring that belongs to another user (the plugin's): a file root
// writes in such a directory gets the existing keyring's owner (or the directory's), so that user can still read
// it. Another user is refused, with an error that names the user to run as, rather than taking the file over.
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
func (k *FileKeyring) Load(ctx context.Context) (Ring, error) {
	unlock, err := k.lock(ctx, syscall.LOCK_SH)
	if err != nil {
		return Ring{}, err
	}
	defer unlock()
	return k.read()
}

// Update changes the keyring under an exclusive lock.
func (k *FileKeyring) Update(ctx context.Context, change func(*Ring) error) (Ring, error) {
	unlock, err := k.lock(ctx, syscall.LOCK_EX)
	if err != nil {
		return Ring{}, err
	}
	defer unlock()
	ring, err := k.read()
	if err != nil {
		return Ring{}, err
	}
	if err := change(&ring); err != nil {
		return Ring{}, err
	}
	b, err := encodeKeyring(ring)
	if err != nil {
		return Ring{}, err
	}
	uid, gid, err := k.owner()
	if err != nil {
		return Ring{}, err
	}
	if err := atomicfile.Write(k.path, b, atomicfile.Options{UID: uid, GID: gid, Chown: uid != -1 || gid != -1}); err != nil {
		return Ring{}, fmt.Errorf("kleidi: write keyring %s: %w", k.path, err)
	}
	return ring, nil
}

// dirOwner returns the owner of the keyring's directory when this process is root, so that root accepts a
// keyring that belongs to the plugin's user; else this process's own user.
func (k *FileKeyring) dirOwner() uint32 {
	if os.Geteuid() == 0 {
		if uid, _, err := trustedpath.Owner(filepath.Dir(k.path)); err == nil {
			return uid
		}
	}
	return uint32(os.Geteuid())
}

// owner returns the owner a new keyring file must get: the existing keyring's (else the directory's) when this
// process is root, so the user a plugin runs as can still read what root wrote; -1, -1 (no change) otherwise.
// A user other than root is refused a keyring that belongs to someone else.
func (k *FileKeyring) owner() (uid, gid int, err error) {
	fuid, fgid, err := trustedpath.Owner(k.path)
	if errors.Is(err, os.ErrNotExist) {
		fuid, fgid, err = trustedpath.Owner(filepath.Dir(k.path))
	}
	if err != nil {
		return -1, -1, fmt.Errorf("kleidi: write keyring %s: %w", k.path, err)
	}
	switch euid := os.Geteuid(); {
	case euid == 0:
		return int(fuid), int(fgid), nil
	case int(fuid) != euid:
		return -1, -1, fmt.Errorf("kleidi: write keyring %s: it belongs to uid %d, not to this user (uid %d); "+
			"run as uid %d, or as root (which keeps its owner): %w", k.path, fuid, euid, fuid, ErrInvalidKeyring)
	}
	return -1, -1, nil
}

// checkLock checks the opened lock file: a regular file. When this process is root, a lock file that root
// created in another user's directory is given to that user, who could not open it otherwise.
func (k *FileKeyring) checkLock(f *os.File) error {
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("kleidi: lock keyring: %w", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.Mode().IsRegular() || !ok {
		return fmt.Errorf("kleidi: lock file %s is not a regular file: %w", f.Name(), ErrInvalidKeyring)
	}
	if st.Nlink != 1 {
		// A hard link to another file: giving it to the directory's owner would give away that file.
		return fmt.Errorf("kleidi: lock file %s has %d links: %w", f.Name(), st.Nlink, ErrInvalidKeyring)
	}
	if os.Geteuid() != 0 || st.Uid != 0 {
		return nil
	}
	uid, gid, err := trustedpath.Owner(filepath.Dir(k.path))
	if err != nil || uid == 0 {
		return nil
	}
	if err := f.Chown(int(uid), int(gid)); err != nil {
		return fmt.Errorf("kleidi: lock keyring: %w", err)
	}
	return nil
}

func (k *FileKeyring) read() (Ring, error) {
	f, err := os.OpenFile(k.path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if errors.Is(err, os.ErrNotExist) {
		return Ring{}, nil
	}
	if errors.Is(err, syscall.ELOOP) {
		return Ring{}, fmt.Errorf("kleidi: keyring %s is a symbolic link; refusing to follow it: %w", k.path, ErrInvalidKeyring)
	}
	if errors.Is(err, os.ErrPermission) {
		if uid, _, oerr := trustedpath.Owner(k.path); oerr == nil && int(uid) != os.Geteuid() {
			return Ring{}, fmt.Errorf("kleidi: read keyring %s: permission denied: it belongs to uid %d; run as uid %d "+
				"(or chown it to uid %d): %w", k.path, uid, uid, os.Geteuid(), err)
		}
	}
	if err != nil {
		return Ring{}, fmt.Errorf("kleidi: read keyring: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return Ring{}, fmt.Errorf("kleidi: read keyring %s: %w", k.path, err)
	}
	if err := trustedpath.File(k.path, fi, k.dirOwner()); err != nil {
		return Ring{}, fmt.Errorf("kleidi: keyring: %w: %w", err, ErrInvalidKeyring)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxKeyringSize+1))
	if err != nil {
		return Ring{}, fmt.Errorf("kleidi: read keyring %s: %w", k.path, err)
	}
	ring, err := parseKeyring(b)
	if err != nil {
		return Ring{}, fmt.Errorf("kleidi: keyring %s: %w", k.path, err)
	}
	return ring, nil
}

// lock takes an advisory lock of kind how, waiting until ctx ends.
func (k *FileKeyring) lock(ctx context.Context, how int) (unlock func(), err error) {
	name := k.path + ".lock"
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0o600)
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("kleidi: lock file %s is a symbolic link; refusing to follow it: %w", name, ErrInvalidKeyring)
	}
	if err != nil {
		return nil, fmt.Errorf("kleidi: lock keyring: %w", err)
	}
	if err := k.checkLock(f); err != nil {
		f.Close()
		return nil, err
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

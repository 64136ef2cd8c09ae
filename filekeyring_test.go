package kleidi_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

// newFileKeyring returns a FileKeyring in a fresh directory, initialised with one KEK by an Envelope.
func newFileKeyring(t *testing.T) (*kleidi.FileKeyring, *kleiditest.Provider) {
	t.Helper()
	ring := kleidi.NewFileKeyring(filepath.Join(t.TempDir(), "keyring.json"))
	p := kleiditest.NewInsecureProvider()
	if _, err := kleidi.NewEnvelope(context.Background(), p, ring, kleidi.WithCreateIfEmpty()); err != nil {
		t.Fatalf("kleidi.NewEnvelope() err = %v, want nil", err)
	}
	return ring, p
}

// TestFileKeyringLockSymlink plants a symbolic link at the lock file's path: it must not be followed (which
// would create or lock the file it points to).
func TestFileKeyringLockSymlink(t *testing.T) {
	dir := t.TempDir()
	ring := kleidi.NewFileKeyring(filepath.Join(dir, "keyring.json"))
	victim := filepath.Join(dir, "victim")
	if err := os.Symlink(victim, ring.Path()+".lock"); err != nil {
		t.Fatal(err)
	}
	_, err := ring.Load(context.Background())
	if !errors.Is(err, kleidi.ErrInvalidKeyring) {
		t.Errorf("Load() with a symlink at the lock file err = %v, want ErrInvalidKeyring", err)
	}
	if _, err := os.Lstat(victim); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the symlink's target was created: os.Lstat err = %v", err)
	}
}

// TestFileKeyringLockHardLink: the plugin's user plants the lock file as a hard link to a root-owned file; root,
// rotating, must not give that file to the plugin's user (as it gives a lock file it created itself).
func TestFileKeyringLockHardLink(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	dir := t.TempDir()
	if err := os.Chown(dir, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(dir, "victim") // root's file, in the same filesystem
	if err := os.WriteFile(victim, []byte("root's"), 0o600); err != nil {
		t.Fatal(err)
	}
	ring := kleidi.NewFileKeyring(filepath.Join(dir, "keyring.json"))
	if err := os.Link(victim, ring.Path()+".lock"); err != nil {
		t.Fatal(err)
	}
	if _, err := ring.Load(context.Background()); !errors.Is(err, kleidi.ErrInvalidKeyring) {
		t.Errorf("Load() with a hard-linked lock file err = %v, want ErrInvalidKeyring", err)
	}
	fi, err := os.Stat(victim)
	if err != nil {
		t.Fatal(err)
	}
	if uid := fi.Sys().(*syscall.Stat_t).Uid; uid != 0 {
		t.Errorf("the hard link's target now belongs to uid %d, want 0", uid)
	}
}

// TestFileKeyringUnsafeFile refuses a keyring that is a symbolic link or that another user may write.
func TestFileKeyringUnsafeFile(t *testing.T) {
	ring, _ := newFileKeyring(t)
	ctx := context.Background()
	if err := os.Chmod(ring.Path(), 0o666); err != nil {
		t.Fatal(err)
	}
	if _, err := ring.Load(ctx); !errors.Is(err, kleidi.ErrInvalidKeyring) {
		t.Errorf("Load() of a world-writable keyring err = %v, want ErrInvalidKeyring", err)
	}
	os.Chmod(ring.Path(), 0o600)
	if _, err := ring.Load(ctx); err != nil {
		t.Fatalf("Load() err = %v, want nil", err)
	}

	link := kleidi.NewFileKeyring(filepath.Join(filepath.Dir(ring.Path()), "link.json"))
	if err := os.Symlink(ring.Path(), link.Path()); err != nil {
		t.Fatal(err)
	}
	if _, err := link.Load(ctx); !errors.Is(err, kleidi.ErrInvalidKeyring) {
		t.Errorf("Load() of a symlinked keyring err = %v, want ErrInvalidKeyring", err)
	}

	if os.Geteuid() == 0 {
		// Root's own directory, another user's keyring: refused.
		os.Chown(ring.Path(), 65534, 65534)
		if _, err := ring.Load(ctx); !errors.Is(err, kleidi.ErrInvalidKeyring) {
			t.Errorf("Load() of a keyring of uid 65534 in root's directory err = %v, want ErrInvalidKeyring", err)
		}
	}
}

// TestFileKeyringRootKeepsOwner rotates, as root, a keyring that belongs to the plugin's user (uid 65534): the
// keyring and its lock file must still belong to that user, who must still be able to read them.
func TestFileKeyringRootKeepsOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	ring, p := newFileKeyring(t)
	dir := filepath.Dir(ring.Path())
	for _, f := range []string{dir, ring.Path(), ring.Path() + ".lock"} {
		if err := os.Chown(f, 65534, 65534); err != nil {
			t.Fatal(err)
		}
	}
	os.Remove(ring.Path() + ".lock") // as if the plugin had never locked it: root creates it
	ctx := context.Background()
	env, err := kleidi.NewEnvelope(ctx, p, ring)
	if err != nil {
		t.Fatalf("kleidi.NewEnvelope() as root err = %v, want nil", err)
	}
	if _, err := env.Rotate(ctx); err != nil {
		t.Fatalf("Rotate() as root err = %v, want nil", err)
	}
	for _, f := range []string{ring.Path(), ring.Path() + ".lock"} {
		fi, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != 65534 || st.Gid != 65534 {
			t.Errorf("%s after a rotation by root: owner %d:%d, want 65534:65534", filepath.Base(f), st.Uid, st.Gid)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s after a rotation by root: mode %v, want 0600", filepath.Base(f), fi.Mode().Perm())
		}
	}
	loaded, err := ring.Load(ctx)
	records := loaded.Keys
	if err != nil || len(records) != 2 {
		t.Errorf("Load() after the rotation = %d records, %v; want 2, nil", len(records), err)
	}
}

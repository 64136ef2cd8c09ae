package kleidi_test

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi"
)

func TestStateDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	d, err := kleidi.OpenStateDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("OpenStateDir made %v, %v; want a directory of mode 0700", fi, err)
	}
	if d.Keyring().Path() != filepath.Join(dir, kleidi.KeyringFileName) {
		t.Errorf("Keyring().Path() = %s", d.Keyring().Path())
	}
	if s, err := d.NodeState(); err != nil || len(s.Trusted) != 0 {
		t.Errorf("NodeState() of a new directory = %+v, %v; want the zero state", s, err)
	}
	want := kleidi.NodeState{Trusted: []string{"tpm-a"}, Removed: []string{"tpm-b"}, Retired: []string{"kleidi-tpm-x"}, KeyringVersion: 3}
	if err := d.SaveNodeState(want); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, kleidi.NodeStateFileName)
	fi, _ := os.Stat(path)
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("%s has mode %v, want 0600", kleidi.NodeStateFileName, fi.Mode().Perm())
	}
	got, err := d.NodeState()
	if err != nil || !slices.Equal(got.Trusted, want.Trusted) || !slices.Equal(got.Removed, want.Removed) ||
		!slices.Equal(got.Retired, want.Retired) || got.KeyringVersion != 3 {
		t.Errorf("NodeState() = %+v, %v; want %+v", got, err, want)
	}
	// Saving the same state again writes nothing.
	old := time.Now().Add(-time.Hour)
	os.Chtimes(path, old, old)
	if err := d.SaveNodeState(want); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); !fi.ModTime().Equal(old) {
		t.Errorf("an unchanged node state was written again")
	}
	// A file that is not a node state is refused, not half read.
	os.WriteFile(path, []byte(`{"trusted":["a"],"extra":1}`), 0o600)
	if _, err := d.NodeState(); err == nil {
		t.Errorf("NodeState() of a file with an unknown field err = nil")
	}
	// A state directory under a directory others may write is refused.
	open := filepath.Join(t.TempDir(), "open")
	os.Mkdir(open, 0o777)
	os.Chmod(open, 0o777)
	if _, err := kleidi.OpenStateDir(filepath.Join(open, "state")); err == nil {
		t.Errorf("OpenStateDir under a world-writable directory err = nil")
	}
}

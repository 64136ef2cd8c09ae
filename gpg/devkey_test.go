package gpg_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/kleidi-kms/kleidi/gpg"
)

func TestGenerateDevelopmentKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state", "dev")
	c, err := gpg.GenerateDevelopmentKey(dir)
	if err != nil {
		t.Fatalf("gpg.GenerateDevelopmentKey(%q) err = %v, want nil", dir, err)
	}
	if want := filepath.Join(dir, gpg.DevelopmentPrivateKeyFile); c.PrivateKeyFile != want {
		t.Errorf("gpg.GenerateDevelopmentKey(%q).PrivateKeyFile = %q, want %q", dir, c.PrivateKeyFile, want)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("os.Stat(%q) = %v, %v; want mode 0700", dir, fi.Mode(), err)
	}
	for _, name := range []string{gpg.DevelopmentPrivateKeyFile, gpg.DevelopmentPublicKeyFile} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("os.Stat(%q) = %v, %v; want mode 0600", name, fi.Mode(), err)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 2 {
		t.Errorf("os.ReadDir(%q) has %d entries, want 2 (no temporary file left)", dir, len(entries))
	}
	before, err := os.ReadFile(c.PrivateKeyFile)
	if err != nil {
		t.Fatal(err)
	}

	p := newProvider(t, c)
	roundTrip(t, p, p)
	wrapOnly := newProvider(t, gpg.Config{PublicKeyFiles: []string{filepath.Join(dir, gpg.DevelopmentPublicKeyFile)}})
	roundTrip(t, wrapOnly, p)

	// A second call keeps the key.
	c2, err := gpg.GenerateDevelopmentKey(dir)
	if err != nil || c2.PrivateKeyFile != c.PrivateKeyFile {
		t.Fatalf("second gpg.GenerateDevelopmentKey(%q) = %+v, %v; want %+v, nil", dir, c2, err, c)
	}
	after, err := os.ReadFile(c.PrivateKeyFile)
	if err != nil || !bytes.Equal(before, after) {
		t.Errorf("second gpg.GenerateDevelopmentKey(%q) changed the key file (err = %v)", dir, err)
	}
	roundTrip(t, p, newProvider(t, c2))
}

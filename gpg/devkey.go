package gpg

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Files [GenerateDevelopmentKey] writes.
const (
	DevelopmentPrivateKeyFile = "kleidi-development-key.asc"
	DevelopmentPublicKeyFile  = "kleidi-development-key.pub.asc"
)

// DevelopmentKeyName and DevelopmentKeyComment make the user ID of the key [GenerateDevelopmentKey] makes,
// so that anyone who lists it with gpg sees what it is.
const (
	DevelopmentKeyName    = "kleidi development key"
	DevelopmentKeyComment = "INSECURE: no passphrase, for development only"
)

// GenerateDevelopmentKey makes an OpenPGP key pair for development and CI, and returns the [Config] that
// loads it. It is for development only: the private key has no passphrase and sits in a plain file next to
// whatever it protects, so it protects nothing from anyone who can read dir. A program that uses it says so
// loudly in its log.
//
// The key is a version 4 Ed25519 key with a Curve25519 encryption subkey, which every GnuPG since 2.1 imports.
// The files are dir/[DevelopmentPrivateKeyFile] and dir/[DevelopmentPublicKeyFile], ASCII-armored, mode 0600;
// dir is created with mode 0700 if it does not exist. If the private key file exists already, it is kept and
// its Config returned: calling GenerateDevelopmentKey at every start keeps one key.
func GenerateDevelopmentKey(dir string) (Config, error) {
	c := Config{PrivateKeyFile: filepath.Join(dir, DevelopmentPrivateKeyFile)}
	if _, err := os.Lstat(c.PrivateKeyFile); err == nil {
		return c, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return Config{}, fmt.Errorf("gpg: development key: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return Config{}, fmt.Errorf("gpg: development key: %w", err)
	}
	priv, pub, err := newKeyPair(DevelopmentKeyName, DevelopmentKeyComment, nil)
	if err != nil {
		return Config{}, fmt.Errorf("gpg: development key: %w", err)
	}
	defer clear(priv)
	// The public key first: the private key file, written last, marks a complete pair.
	if err := writeNew(filepath.Join(dir, DevelopmentPublicKeyFile), pub); err != nil {
		return Config{}, fmt.Errorf("gpg: development key: %w", err)
	}
	if err := writeNew(c.PrivateKeyFile, priv); err != nil {
		return Config{}, fmt.Errorf("gpg: development key: %w", err)
	}
	return c, nil
}

// writeNew writes data to a new file at path with mode 0600, durably and atomically. If path exists (another
// process won the race), it is left as it is and writeNew returns nil.
func writeNew(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".kleidi-key-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Link(tmp, path); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

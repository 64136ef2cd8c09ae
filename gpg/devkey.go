package gpg

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/kleidi-kms/kleidi/internal/atomicfile"
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
	if err := atomicfile.Write(filepath.Join(dir, DevelopmentPublicKeyFile), pub, atomicfile.Options{NoReplace: true}); err != nil {
		return Config{}, fmt.Errorf("gpg: development key: %w", err)
	}
	if err := atomicfile.Write(c.PrivateKeyFile, priv, atomicfile.Options{NoReplace: true}); err != nil {
		return Config{}, fmt.Errorf("gpg: development key: %w", err)
	}
	return c, nil
}

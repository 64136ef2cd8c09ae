package gpg_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/kleidi-kms/kleidi/gpg"
)

// TestGnuPGInterop checks both directions against the gpg binary, for an RSA 3072 key and a Curve25519 key
// made by gpg: what kleidi wraps, gpg --decrypt decrypts; what gpg --encrypt encrypts, kleidi unwraps.
func TestGnuPGInterop(t *testing.T) {
	g := gnupg(t)
	for _, k := range []struct {
		name string
		gnupgKey
	}{{"RSA3072", g.rsa}, {"Curve25519", g.cv}} {
		t.Run(k.name, func(t *testing.T) {
			t.Run("KleidiWrapsGnuPGDecrypts", func(t *testing.T) {
				p := newProvider(t, gpg.Config{PublicKeyFiles: []string{k.pubArmored}}) // wrap-only
				key := randomKey(t)
				wrapped, err := p.Wrap(ctx, key)
				if err != nil {
					t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
				}
				file := filepath.Join(t.TempDir(), "wrapped.gpg")
				writeFile(t, file, wrapped)
				got, err := g.run(nil, "--passphrase-file", g.passphrase, "--decrypt", file)
				if err != nil {
					t.Fatalf("gpg --decrypt of p.Wrap(ctx, key): %v", err)
				}
				if !bytes.Equal(got, key) {
					t.Fatalf("gpg --decrypt of p.Wrap(ctx, key) differs from key")
				}
			})
			t.Run("GnuPGEncryptsKleidiUnwraps", func(t *testing.T) {
				p := newProvider(t, gpg.Config{PrivateKeyFile: k.privBinary})
				key := randomKey(t)
				for _, armor := range []bool{false, true} {
					args := []string{"--encrypt", "--recipient", k.fpr}
					if armor {
						// An armored message is not a wrapped key: Unwrap takes binary OpenPGP only.
						args = append([]string{"--armor"}, args...)
					}
					wrapped, err := g.run(key, args...)
					if err != nil {
						t.Fatal(err)
					}
					got, err := p.Unwrap(ctx, wrapped)
					if armor {
						if err == nil {
							t.Errorf("p.Unwrap(ctx, gpg --armor --encrypt output) err = nil, want an error")
						}
						continue
					}
					if err != nil {
						t.Fatalf("p.Unwrap(ctx, gpg --encrypt output) err = %v, want nil", err)
					}
					if !bytes.Equal(got, key) {
						t.Fatalf("p.Unwrap(ctx, gpg --encrypt output) differs from key")
					}
				}
			})
		})
	}

	t.Run("ProtectedKey", func(t *testing.T) {
		p := newProvider(t, gpg.Config{PrivateKeyFile: g.cv.privProtectd, PassphraseFile: g.passphrase})
		key := randomKey(t)
		wrapped, err := g.run(key, "--encrypt", "--recipient", g.cv.fpr)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := p.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
			t.Fatalf("p.Unwrap(ctx, gpg --encrypt output) err = %v, equal = %v; want nil, true", err, bytes.Equal(got, key))
		}
	})

	t.Run("DevelopmentKeyImports", func(t *testing.T) {
		// gpg imports the development key and decrypts what it wraps.
		c, err := gpg.GenerateDevelopmentKey(filepath.Join(t.TempDir(), "dev"))
		if err != nil {
			t.Fatalf("gpg.GenerateDevelopmentKey() err = %v, want nil", err)
		}
		if _, err := g.run(nil, "--import", c.PrivateKeyFile); err != nil {
			t.Fatal(err)
		}
		p := newProvider(t, c)
		key := randomKey(t)
		wrapped, err := p.Wrap(ctx, key)
		if err != nil {
			t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
		}
		file := filepath.Join(t.TempDir(), "wrapped.gpg")
		if err := os.WriteFile(file, wrapped, 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := g.run(nil, "--decrypt", file)
		if err != nil || !bytes.Equal(got, key) {
			t.Fatalf("gpg --decrypt of a development-key wrap: err = %v, equal = %v; want nil, true", err, bytes.Equal(got, key))
		}
	})
}

package gpg_test

import (
	"crypto/rand"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi/gpg"
)

// TestNewBadKeys checks that every bad key fails at construction with an error that names the file and the
// problem, and never shows a passphrase.
func TestNewBadKeys(t *testing.T) {
	g := gnupg(t)
	dir := t.TempDir()
	file := func(name string, data []byte) string {
		path := filepath.Join(dir, name)
		writeFile(t, path, data)
		return path
	}
	garbage := make([]byte, 4096)
	rand.Read(garbage)
	garbage[0] |= 0x80 // looks like a binary packet
	pubBinary, err := os.ReadFile(g.rsa.pubBinary)
	if err != nil {
		t.Fatal(err)
	}
	wrong := file("wrong-passphrase", []byte("not the passphrase\n"))
	wrongCallback := func() ([]byte, error) { return []byte("not the passphrase either"), nil }
	read := func(path string) []byte { return readTestFile(t, path) }

	expired := newTestKey(t, keyOptions{created: time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC), lifetime: 24 * time.Hour})
	revoked := newTestKey(t, keyOptions{revoked: true, armored: true})
	signOnly := newTestKey(t, keyOptions{noEncryption: true})
	stranger := newTestKey(t, keyOptions{})

	for _, tc := range []struct {
		name    string
		config  gpg.Config
		want    error
		file    string // the file the error must name
		message string // text the error must contain
	}{
		{"expired recipient", gpg.Config{PublicKeyFiles: []string{expired.pub}}, gpg.ErrKeyExpired, expired.pub, "expired on 2020-01-02"},
		{"expired private key", gpg.Config{PrivateKeyFile: expired.priv}, gpg.ErrKeyExpired, expired.priv, "expired on 2020-01-02"},
		{"revoked recipient", gpg.Config{PublicKeyFiles: []string{stranger.pub, revoked.pub}}, gpg.ErrKeyRevoked, revoked.pub, "revoked"},
		{"revoked private key", gpg.Config{PrivateKeyFile: revoked.priv}, gpg.ErrKeyRevoked, revoked.priv, "revoked"},
		{"no encryption subkey", gpg.Config{PublicKeyFiles: []string{signOnly.pub}}, gpg.ErrNoEncryptionKey, signOnly.pub, "may encrypt"},
		{"no passphrase", gpg.Config{PrivateKeyFile: g.cv.privProtectd}, gpg.ErrPassphraseRequired, g.cv.privProtectd, "passphrase"},
		{"wrong passphrase file", gpg.Config{PrivateKeyFile: g.cv.privProtectd, PassphraseFile: wrong}, gpg.ErrWrongPassphrase, g.cv.privProtectd, "wrong passphrase"},
		{"wrong passphrase callback", gpg.Config{PrivateKeyFile: g.cv.privProtectd, Passphrase: wrongCallback}, gpg.ErrWrongPassphrase, g.cv.privProtectd, "wrong passphrase"},
		{"public key as private key", gpg.Config{PrivateKeyFile: g.rsa.pubArmored}, gpg.ErrNotPrivateKey, g.rsa.pubArmored, "public key"},
		{"garbage", gpg.Config{PublicKeyFiles: []string{file("garbage", garbage)}}, gpg.ErrInvalidKey, filepath.Join(dir, "garbage"), "no OpenPGP key"},
		{"text", gpg.Config{PrivateKeyFile: file("text", []byte("hello, world\n"))}, gpg.ErrInvalidKey, filepath.Join(dir, "text"), "neither"},
		{"empty", gpg.Config{PrivateKeyFile: file("empty", nil)}, gpg.ErrInvalidKey, filepath.Join(dir, "empty"), "empty"},
		{"truncated", gpg.Config{PublicKeyFiles: []string{file("truncated", pubBinary[:len(pubBinary)/2])}}, gpg.ErrInvalidKey, filepath.Join(dir, "truncated"), ""},
		{"armored message", gpg.Config{PublicKeyFiles: []string{file("message.asc", []byte("-----BEGIN PGP MESSAGE-----\n\nwy4ECQMI\n=AAAA\n-----END PGP MESSAGE-----\n"))}}, gpg.ErrInvalidKey, filepath.Join(dir, "message.asc"), "PGP MESSAGE"},
		{"missing file", gpg.Config{PrivateKeyFile: filepath.Join(dir, "missing")}, fs.ErrNotExist, filepath.Join(dir, "missing"), ""},
		{"private key not a recipient", gpg.Config{PublicKeyFiles: []string{stranger.pub}, PrivateKeyFile: g.cv.privBinary}, gpg.ErrInvalidKey, g.cv.privBinary, "not among the recipients"},

		// Keys from memory: errors name the Config field instead of a file.
		{"expired recipient in memory", gpg.Config{PublicKeys: [][]byte{read(stranger.pub), read(expired.pub)}}, gpg.ErrKeyExpired, "Config.PublicKeys[1]", "expired on 2020-01-02"},
		{"revoked private key in memory", gpg.Config{PrivateKey: read(revoked.priv)}, gpg.ErrKeyRevoked, "Config.PrivateKey", "revoked"},
		{"no passphrase in memory", gpg.Config{PrivateKey: read(g.cv.privProtectd)}, gpg.ErrPassphraseRequired, "Config.PrivateKey", "Config.Passphrase"},
		{"wrong passphrase in memory", gpg.Config{PrivateKey: read(g.cv.privProtectd), Passphrase: wrongCallback}, gpg.ErrWrongPassphrase, "Config.PrivateKey", "wrong passphrase"},
		{"public key as PrivateKey", gpg.Config{PrivateKey: read(g.rsa.pubArmored)}, gpg.ErrNotPrivateKey, "Config.PrivateKey", "public key"},
		{"garbage in memory", gpg.Config{PublicKeys: [][]byte{garbage}}, gpg.ErrInvalidKey, "Config.PublicKeys[0]", "no OpenPGP key"},
		{"empty in memory", gpg.Config{PrivateKey: []byte{}}, gpg.ErrInvalidKey, "Config.PrivateKey", "empty"},
		{"too large in memory", gpg.Config{PublicKeys: [][]byte{make([]byte, 8<<20+1)}}, gpg.ErrInvalidKey, "Config.PublicKeys[0]", "larger than"},
		{"private key in memory not a recipient", gpg.Config{PublicKeys: [][]byte{read(stranger.pub)}, PrivateKey: read(g.cv.privBinary)}, gpg.ErrInvalidKey, "Config.PrivateKey", "not among the recipients"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := gpg.New(tc.config)
			if !errors.Is(err, tc.want) || p != nil {
				t.Fatalf("gpg.New(%+v) = %v, %v; want nil, an error wrapping %v", tc.config, p, err, tc.want)
			}
			msg := err.Error()
			if !strings.Contains(msg, tc.file) || !strings.Contains(msg, tc.message) {
				t.Errorf("gpg.New(%+v) err = %q, want it to name %s and say %q", tc.config, msg, tc.file, tc.message)
			}
			for _, secret := range []string{gnupgPassphrase, "not the passphrase", "not the passphrase either"} {
				if strings.Contains(msg, secret) {
					t.Errorf("gpg.New(%+v) err = %q holds a passphrase", tc.config, msg)
				}
			}
		})
	}
}

// TestNewBadConfig checks that a Config that names no key, two sources of one thing, or an unusable
// passphrase fails with the sentinel that says so, and never shows the passphrase.
func TestNewBadConfig(t *testing.T) {
	k := newTestKey(t, keyOptions{passphrase: gnupgPassphrase})
	emptyFile := filepath.Join(t.TempDir(), "empty")
	writeFile(t, emptyFile, nil)
	passphraseFile := filepath.Join(t.TempDir(), "passphrase")
	writeFile(t, passphraseFile, []byte(gnupgPassphrase))
	priv, pub := readTestFile(t, k.priv), readTestFile(t, k.pub)
	passphrase := func() ([]byte, error) { return []byte(gnupgPassphrase), nil }
	errVault := errors.New("vault unreachable")
	for _, tc := range []struct {
		name   string
		config gpg.Config
		want   error
	}{
		{"no key", gpg.Config{}, gpg.ErrInvalidKey},
		{"no key, empty lists", gpg.Config{PublicKeyFiles: []string{}, PublicKeys: [][]byte{}}, gpg.ErrInvalidKey},
		{"two public key sources", gpg.Config{PublicKeyFiles: []string{k.pub}, PublicKeys: [][]byte{pub}}, gpg.ErrInvalidKey},
		{"two private key sources", gpg.Config{PrivateKeyFile: k.priv, PrivateKey: priv, Passphrase: passphrase}, gpg.ErrInvalidKey},
		{"two passphrase sources", gpg.Config{PrivateKey: priv, PassphraseFile: passphraseFile, Passphrase: passphrase}, gpg.ErrInvalidKey},
		{"passphrase file without a private key", gpg.Config{PublicKeyFiles: []string{k.pub}, PassphraseFile: passphraseFile}, gpg.ErrInvalidKey},
		{"passphrase callback without a private key", gpg.Config{PublicKeys: [][]byte{pub}, Passphrase: passphrase}, gpg.ErrInvalidKey},
		{"empty passphrase file", gpg.Config{PrivateKeyFile: k.priv, PassphraseFile: emptyFile}, gpg.ErrPassphraseRequired},
		{"missing passphrase file", gpg.Config{PrivateKeyFile: k.priv, PassphraseFile: filepath.Join(t.TempDir(), "missing")}, fs.ErrNotExist},
		{"empty passphrase callback", gpg.Config{PrivateKey: priv, Passphrase: func() ([]byte, error) { return nil, nil }}, gpg.ErrPassphraseRequired},
		{"failing passphrase callback", gpg.Config{PrivateKey: priv, Passphrase: func() ([]byte, error) { return nil, errVault }}, errVault},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := gpg.New(tc.config)
			if !errors.Is(err, tc.want) || p != nil {
				t.Fatalf("gpg.New(%+v) = %v, %v; want nil, an error wrapping %v", tc.config, p, err, tc.want)
			}
			if strings.Contains(err.Error(), gnupgPassphrase) {
				t.Errorf("gpg.New(%+v) err = %q holds the passphrase", tc.config, err)
			}
		})
	}
}

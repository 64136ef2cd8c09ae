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
	t.Setenv("KLEIDI_TEST_WRONG", "not the passphrase either")

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
		{"wrong passphrase env", gpg.Config{PrivateKeyFile: g.cv.privProtectd, PassphraseEnv: "KLEIDI_TEST_WRONG"}, gpg.ErrWrongPassphrase, g.cv.privProtectd, "wrong passphrase"},
		{"public key as private key", gpg.Config{PrivateKeyFile: g.rsa.pubArmored}, gpg.ErrNotPrivateKey, g.rsa.pubArmored, "public key"},
		{"garbage", gpg.Config{PublicKeyFiles: []string{file("garbage", garbage)}}, gpg.ErrInvalidKey, filepath.Join(dir, "garbage"), "no OpenPGP key"},
		{"text", gpg.Config{PrivateKeyFile: file("text", []byte("hello, world\n"))}, gpg.ErrInvalidKey, filepath.Join(dir, "text"), "neither"},
		{"empty", gpg.Config{PrivateKeyFile: file("empty", nil)}, gpg.ErrInvalidKey, filepath.Join(dir, "empty"), "empty"},
		{"truncated", gpg.Config{PublicKeyFiles: []string{file("truncated", pubBinary[:len(pubBinary)/2])}}, gpg.ErrInvalidKey, filepath.Join(dir, "truncated"), ""},
		{"armored message", gpg.Config{PublicKeyFiles: []string{file("message.asc", []byte("-----BEGIN PGP MESSAGE-----\n\nwy4ECQMI\n=AAAA\n-----END PGP MESSAGE-----\n"))}}, gpg.ErrInvalidKey, filepath.Join(dir, "message.asc"), "PGP MESSAGE"},
		{"missing file", gpg.Config{PrivateKeyFile: filepath.Join(dir, "missing")}, fs.ErrNotExist, filepath.Join(dir, "missing"), ""},
		{"private key not a recipient", gpg.Config{PublicKeyFiles: []string{stranger.pub}, PrivateKeyFile: g.cv.privBinary}, gpg.ErrInvalidKey, g.cv.privBinary, "not among the recipients"},
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
			for _, secret := range []string{gnupgPassphrase, "not the passphrase"} {
				if strings.Contains(msg, secret) {
					t.Errorf("gpg.New(%+v) err = %q holds a passphrase", tc.config, msg)
				}
			}
		})
	}
}

func TestNewBadConfig(t *testing.T) {
	k := newTestKey(t, keyOptions{passphrase: gnupgPassphrase})
	emptyFile := filepath.Join(t.TempDir(), "empty")
	writeFile(t, emptyFile, nil)
	for _, c := range []gpg.Config{
		{},
		{PrivateKeyFile: k.priv, PassphraseFile: emptyFile, PassphraseEnv: "KLEIDI_TEST_PASSPHRASE"},
		{PrivateKeyFile: k.priv, PassphraseFile: emptyFile},
		{PrivateKeyFile: k.priv, PassphraseFile: filepath.Join(t.TempDir(), "missing")},
		{PrivateKeyFile: k.priv, PassphraseEnv: "KLEIDI_TEST_UNSET_VARIABLE"},
		{PublicKeyFiles: []string{k.pub}, PassphraseEnv: "KLEIDI_TEST_PASSPHRASE"},
	} {
		if p, err := gpg.New(c); err == nil || p != nil {
			t.Errorf("gpg.New(%+v) = %v, %v; want nil, an error", c, p, err)
		}
	}
}

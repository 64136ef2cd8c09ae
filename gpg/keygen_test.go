package gpg_test

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kleidi-kms/kleidi/gpg"
)

// TestGenerateKey checks that GenerateKey makes a key pair that New loads from memory with its passphrase
// only, that the public half wraps to the private half, and that the private half holds no passphrase.
func TestGenerateKey(t *testing.T) {
	passphrase := []byte(gnupgPassphrase)
	priv, pub, err := gpg.GenerateKey("kleidi node-a", passphrase)
	if err != nil {
		t.Fatalf("gpg.GenerateKey(name, passphrase) err = %v, want nil", err)
	}
	if !bytes.Equal(passphrase, []byte(gnupgPassphrase)) {
		t.Errorf("gpg.GenerateKey changed the passphrase it was given")
	}
	if !bytes.HasPrefix(priv, []byte("-----BEGIN PGP PRIVATE KEY BLOCK-----")) || !bytes.HasPrefix(pub, []byte("-----BEGIN PGP PUBLIC KEY BLOCK-----")) {
		t.Errorf("gpg.GenerateKey(name, passphrase) = %.40q, %.40q; want ASCII-armored private and public keys", priv, pub)
	}
	if bytes.Contains(priv, passphrase) || bytes.Contains(pub, passphrase) {
		t.Errorf("gpg.GenerateKey(name, passphrase) holds the passphrase")
	}

	p := newProvider(t, gpg.Config{PrivateKey: priv, Passphrase: func() ([]byte, error) { return []byte(gnupgPassphrase), nil }})
	wrapOnly := newProvider(t, gpg.Config{PublicKeys: [][]byte{pub}})
	roundTrip(t, wrapOnly, p)
	if got, want := p.Recipients(), wrapOnly.Recipients(); len(got) != 1 || len(want) != 1 || got[0] != want[0] {
		t.Errorf("Recipients() of the private half = %v, of the public half = %v; want one and the same", got, want)
	}
	if _, err := gpg.RecipientIdentity(pub); err != nil {
		t.Errorf("gpg.RecipientIdentity(public half) err = %v, want nil", err)
	}

	// The private half is protected: without the passphrase, or with another, New refuses it.
	if _, err := gpg.New(gpg.Config{PrivateKey: priv}); !errors.Is(err, gpg.ErrPassphraseRequired) {
		t.Errorf("gpg.New(private half without a passphrase) err = %v, want an error wrapping gpg.ErrPassphraseRequired", err)
	}
	wrong := func() ([]byte, error) { return []byte("not the passphrase"), nil }
	if _, err := gpg.New(gpg.Config{PrivateKey: priv, Passphrase: wrong}); !errors.Is(err, gpg.ErrWrongPassphrase) {
		t.Errorf("gpg.New(private half, wrong passphrase) err = %v, want an error wrapping gpg.ErrWrongPassphrase", err)
	}

	// Every call makes a new key.
	_, pub2, err := gpg.GenerateKey("kleidi node-a", passphrase)
	if err != nil {
		t.Fatal(err)
	}
	if got := newProvider(t, gpg.Config{PublicKeys: [][]byte{pub2}}).Recipients(); got[0] == wrapOnly.Recipients()[0] {
		t.Errorf("two calls of gpg.GenerateKey made the same key %s", got[0])
	}
}

func TestGenerateKeyRefuses(t *testing.T) {
	for _, tc := range []struct {
		name       string
		passphrase []byte
		want       error
	}{
		{"kleidi", nil, gpg.ErrPassphraseRequired},
		{"kleidi", []byte{}, gpg.ErrPassphraseRequired},
		{"", []byte("passphrase"), gpg.ErrInvalidKey},
		{"  ", []byte("passphrase"), gpg.ErrInvalidKey},
		{"kleidi <node@example.com>", []byte("passphrase"), gpg.ErrInvalidKey},
	} {
		priv, pub, err := gpg.GenerateKey(tc.name, tc.passphrase)
		if !errors.Is(err, tc.want) || priv != nil || pub != nil {
			t.Errorf("gpg.GenerateKey(%q, %d bytes) = %d, %d bytes, %v; want nil, nil, an error wrapping %v",
				tc.name, len(tc.passphrase), len(priv), len(pub), err, tc.want)
		}
		if err != nil && len(tc.passphrase) > 0 && strings.Contains(err.Error(), string(tc.passphrase)) {
			t.Errorf("gpg.GenerateKey(%q, passphrase) err = %q holds the passphrase", tc.name, err)
		}
	}
}

// TestGenerateKeyGnuPG checks that GnuPG imports the private half with its passphrase and decrypts what a
// provider made from the public half wraps.
func TestGenerateKeyGnuPG(t *testing.T) {
	gnupg(t) // the gpg binary is there
	priv, pub, err := gpg.GenerateKey("kleidi gnupg", []byte(gnupgPassphrase))
	if err != nil {
		t.Fatal(err)
	}
	home, err := os.MkdirTemp("", "kleidi-gnupg-") // short: gpg-agent's socket lives there
	if err != nil {
		t.Fatal(err)
	}
	g := &gnupgKeys{home: home, passphrase: filepath.Join(home, "passphrase")}
	t.Cleanup(func() {
		cmd := exec.Command("gpgconf", "--kill", "all")
		cmd.Env = append(os.Environ(), "GNUPGHOME="+home)
		cmd.Run()
		os.RemoveAll(home)
	})
	writeFile(t, g.passphrase, []byte(gnupgPassphrase+"\n"))
	if _, err := g.run(priv, "--passphrase-file", g.passphrase, "--import"); err != nil {
		t.Fatalf("gpg --import of the private half: %v", err)
	}
	key := randomKey(t)
	wrapped, err := newProvider(t, gpg.Config{PublicKeys: [][]byte{pub}}).Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "wrapped.gpg")
	writeFile(t, file, wrapped)
	got, err := g.run(nil, "--passphrase-file", g.passphrase, "--decrypt", file)
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("gpg --decrypt of a key wrapped to the public half: err = %v, equal = %v; want nil, true", err, bytes.Equal(got, key))
	}
}

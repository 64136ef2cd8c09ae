package gpg_test

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/gpg"
)

// FuzzUnwrap feeds arbitrary blobs to Unwrap: it never panics, refuses with an error wrapping kleidi.ErrUnwrap,
// and what it accepts is a key of 1 to gpg.MaxKeySize bytes.
func FuzzUnwrap(f *testing.F) {
	k1, k2 := newTestKey(f, keyOptions{}), newTestKey(f, keyOptions{v6: true})
	p := newProvider(f, gpg.Config{PublicKeyFiles: []string{k1.pub, k2.pub}, PrivateKeyFile: k1.priv})
	v6 := newProvider(f, gpg.Config{PrivateKeyFile: k2.priv})
	key := bytes.Repeat([]byte{0x5a}, kleidi.KeySize)
	for _, w := range []kleidi.Provider{p, v6} {
		wrapped, err := w.Wrap(ctx, key)
		if err != nil {
			f.Fatalf("Wrap(ctx, key) err = %v, want nil", err)
		}
		f.Add(wrapped)
		f.Add(wrapped[:len(wrapped)-1])
		f.Add(append(bytes.Clone(wrapped), 0))
	}
	f.Add([]byte{})
	f.Add([]byte{0xc1, 10, 3, 1, 2, 3, 4, 5, 6, 7, 8, 1, 0xd2, 1, 1})
	f.Fuzz(func(t *testing.T, blob []byte) {
		got, err := p.Unwrap(ctx, blob)
		if err != nil {
			if !errors.Is(err, kleidi.ErrUnwrap) || got != nil {
				t.Fatalf("p.Unwrap(ctx, blob) = %d bytes, %v; want nil and an error wrapping kleidi.ErrUnwrap", len(got), err)
			}
			return
		}
		if len(got) == 0 || len(got) > gpg.MaxKeySize {
			t.Fatalf("p.Unwrap(ctx, blob) = %d bytes, want 1 to %d", len(got), gpg.MaxKeySize)
		}
	})
}

// FuzzVerify feeds arbitrary messages and proofs to Verify: it never panics (nor hides a panic of the parser),
// refuses with an error wrapping kleidi.ErrUnauthenticated, and accepts only a message that a trusted key
// signed.
func FuzzVerify(f *testing.F) {
	k1, k2, k3 := newTestKey(f, keyOptions{}), newTestKey(f, keyOptions{v6: true}), newTestKey(f, keyOptions{signing: true})
	p := newProvider(f, gpg.Config{PublicKeyFiles: []string{k1.pub, k2.pub, k3.pub}, PrivateKeyFile: k1.priv})
	signed := map[string]bool{}
	for i, k := range []testKey{k1, k2, k3} {
		signer := newProvider(f, gpg.Config{PrivateKeyFile: k.priv})
		message := []byte(fmt.Sprintf("kleidi fuzz proof %d", i))
		proof, err := signer.Prove(ctx, message)
		if err != nil {
			f.Fatalf("Prove(ctx, message) err = %v, want nil", err)
		}
		signed[string(message)] = true
		f.Add(message, proof)
		f.Add(message, proof[:len(proof)-1])
		f.Add(message, append(bytes.Clone(proof), proof...))
	}
	f.Add([]byte{}, []byte{})
	f.Add([]byte("m"), []byte{0xc2, 0x01, 0x04})
	f.Add([]byte("m"), []byte{0x88, 0x05, 0x04, 0x00, 0x16, 0x08, 0x00})
	f.Fuzz(func(t *testing.T, message, proof []byte) {
		err := p.Verify(ctx, message, proof)
		if err != nil {
			if !errors.Is(err, kleidi.ErrUnauthenticated) || strings.Contains(err.Error(), "panicked") {
				t.Fatalf("p.Verify(ctx, message, proof) err = %v, want an error wrapping kleidi.ErrUnauthenticated and no panic", err)
			}
			return
		}
		if !signed[string(message)] {
			t.Fatalf("p.Verify(ctx, %q, proof) = nil for a message no trusted key signed", message)
		}
	})
}

// FuzzCheckRecipients feeds arbitrary blobs to CheckRecipients: it never panics, and refuses with an error
// wrapping kleidi.ErrUnwrap or gpg.ErrRecipientRemoved.
func FuzzCheckRecipients(f *testing.F) {
	k1, k2 := newTestKey(f, keyOptions{}), newTestKey(f, keyOptions{v6: true})
	p := newProvider(f, gpg.Config{PublicKeyFiles: []string{k1.pub}})
	for _, c := range []gpg.Config{{PublicKeyFiles: []string{k1.pub}}, {PublicKeyFiles: []string{k1.pub, k2.pub}}, {PrivateKeyFile: k2.priv}} {
		blob, err := newProvider(f, c).Wrap(ctx, bytes.Repeat([]byte{0x5a}, kleidi.KeySize))
		if err != nil {
			f.Fatalf("Wrap(ctx, key) err = %v, want nil", err)
		}
		f.Add(blob)
		f.Add(blob[:len(blob)-1])
	}
	f.Add([]byte{})
	f.Add([]byte{0xc1, 10, 3, 1, 2, 3, 4, 5, 6, 7, 8, 1, 0xd2, 1, 1})
	f.Fuzz(func(t *testing.T, blob []byte) {
		if err := p.CheckRecipients(blob); err != nil && !errors.Is(err, kleidi.ErrUnwrap) && !errors.Is(err, gpg.ErrRecipientRemoved) {
			t.Fatalf("p.CheckRecipients(blob) err = %v, want nil or an error wrapping kleidi.ErrUnwrap or gpg.ErrRecipientRemoved", err)
		}
	})
}

// FuzzNewKeys feeds arbitrary bytes to New as a public key and as a private key: it never panics, and a key it
// refuses is refused with one of the sentinels of package gpg, naming the Config field.
func FuzzNewKeys(f *testing.F) {
	k1, k2 := newTestKey(f, keyOptions{armored: true}), newTestKey(f, keyOptions{v6: true, passphrase: gnupgPassphrase})
	for _, path := range []string{k1.pub, k1.priv, k2.pub, k2.priv} {
		b := readTestFile(f, path)
		f.Add(b)
		f.Add(b[:len(b)/2])
	}
	f.Add([]byte("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nxjMEZ\n-----END PGP PUBLIC KEY BLOCK-----\n"))
	f.Add([]byte{0x99, 0, 1, 4})
	sentinels := []error{gpg.ErrInvalidKey, gpg.ErrKeyExpired, gpg.ErrKeyRevoked, gpg.ErrNoEncryptionKey,
		gpg.ErrNotPrivateKey, gpg.ErrPassphraseRequired, gpg.ErrWrongPassphrase}
	passphrase := func() ([]byte, error) { return []byte(gnupgPassphrase), nil }
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, c := range []gpg.Config{{PublicKeys: [][]byte{data}}, {PrivateKey: data, Passphrase: passphrase}} {
			p, err := gpg.New(c)
			if err == nil {
				p.Close()
				continue
			}
			known := false
			for _, s := range sentinels {
				known = known || errors.Is(err, s)
			}
			if !known || p != nil || !strings.Contains(err.Error(), "Config.") {
				t.Fatalf("gpg.New(%d bytes) = %v, %v; want nil and an error of this package naming the Config field", len(data), p, err)
			}
		}
	})
}

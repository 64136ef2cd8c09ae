package gpg_test

import (
	"bytes"
	"errors"
	"path/filepath"
	"testing"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/gpg"
)

// TestAddRecipient adds a second OpenPGP key to a keyring whose KEKs are wrapped to one key: after
// kleidi.Rewrap, a node that holds only the second private key (and lists both public keys, so that it trusts
// the proofs of the first) decrypts the data encrypted before, under the same key IDs.
func TestAddRecipient(t *testing.T) {
	k1, k2 := newTestKey(t, keyOptions{}), newTestKey(t, keyOptions{v6: true})
	ring := kleidi.NewFileKeyring(filepath.Join(t.TempDir(), "keyring.json"))
	ad := []byte("secrets/default/db")

	// Node 1, recipient key 1: encrypt, rotate, encrypt again, so the keyring has a retired and an active KEK.
	p1 := newProvider(t, gpg.Config{PrivateKeyFile: k1.priv})
	env1, err := kleidi.NewEnvelope(ctx, p1, ring, kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatalf("kleidi.NewEnvelope(ctx, p1, ring) err = %v, want nil", err)
	}
	var stored [][]byte
	var ids []string
	for i := range 2 {
		c, err := env1.Encrypt(ctx, []byte("plaintext"), ad)
		if err != nil {
			t.Fatalf("env1.Encrypt() err = %v, want nil", err)
		}
		stored, ids = append(stored, c.Bytes()), append(ids, c.KeyID()) // Bytes leaves out the wrapped KEK
		if i == 0 {
			if _, err := env1.Rotate(ctx); err != nil {
				t.Fatalf("env1.Rotate(ctx) err = %v, want nil", err)
			}
		}
	}

	// Before the rewrap, key 2 unwraps nothing.
	p2 := newProvider(t, gpg.Config{PublicKeyFiles: []string{k1.pub, k2.pub}, PrivateKeyFile: k2.priv})
	if _, err := kleidi.NewEnvelope(ctx, p2, ring); !errors.Is(err, kleidi.ErrUnwrap) {
		t.Fatalf("kleidi.NewEnvelope(ctx, p2, ring) before the rewrap err = %v, want an error wrapping kleidi.ErrUnwrap", err)
	}
	// A node that lists only its own key does not trust what key 1 proved.
	alone := newProvider(t, gpg.Config{PrivateKeyFile: k2.priv})
	if _, err := kleidi.NewEnvelope(ctx, alone, ring); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Fatalf("kleidi.NewEnvelope(ctx, key 2 alone, ring) err = %v, want an error wrapping kleidi.ErrUnauthenticated", err)
	}

	// Node 1 adds key 2 as a recipient and re-wraps every KEK.
	p12 := newProvider(t, gpg.Config{PublicKeyFiles: []string{k1.pub, k2.pub}, PrivateKeyFile: k1.priv})
	env12, err := kleidi.NewEnvelope(ctx, p12, ring)
	if err != nil {
		t.Fatalf("kleidi.NewEnvelope(ctx, p12, ring) err = %v, want nil", err)
	}
	if err := kleidi.Rewrap(ctx, ring, p12, p12); err != nil {
		t.Fatalf("kleidi.Rewrap(ctx, ring, p12, p12) err = %v, want nil", err)
	}
	if err := env12.Reload(ctx); err != nil {
		t.Fatalf("env12.Reload(ctx) err = %v, want nil", err)
	}
	if got := env12.KeyID(); got != ids[1] {
		t.Errorf("env12.KeyID() after Rewrap = %q, want %q", got, ids[1])
	}

	// Node 2 holds only private key 2 and decrypts both old ciphertexts under their key IDs.
	env2, err := kleidi.NewEnvelope(ctx, p2, ring)
	if err != nil {
		t.Fatalf("kleidi.NewEnvelope(ctx, p2, ring) after the rewrap err = %v, want nil", err)
	}
	if got := env2.KeyID(); got != ids[1] {
		t.Errorf("env2.KeyID() = %q, want %q", got, ids[1])
	}
	for i, b := range stored {
		c, err := kleidi.ParseCiphertext(b)
		if err != nil {
			t.Fatalf("kleidi.ParseCiphertext(stored[%d]) err = %v, want nil", i, err)
		}
		if c.KeyID() != ids[i] {
			t.Errorf("stored[%d].KeyID() = %q, want %q", i, c.KeyID(), ids[i])
		}
		got, err := env2.Decrypt(ctx, c, ad)
		if err != nil || !bytes.Equal(got, []byte("plaintext")) {
			t.Errorf("env2.Decrypt(ctx, stored[%d], ad) = %q, %v; want %q, nil", i, got, err, "plaintext")
		}
	}
	// Node 1 still decrypts too.
	c, _ := kleidi.ParseCiphertext(stored[0])
	if _, err := env1.Decrypt(ctx, c, ad); err != nil {
		t.Errorf("env1.Decrypt(ctx, stored[0], ad) err = %v, want nil", err)
	}
}

//go:build cgo

package tpm

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

// A keyring of version 1 written by someone who knows only the node's identity (a duplicate to its EK, no proof)
// replaces a keyring of version 2: the node must not take its KEK.
func TestSimulatorVersion1KeyringAfterALaterOneIsRefused(t *testing.T) {
	ctx := context.Background()
	p := newSimProvider(t, Config{PCRs: []int{7}})
	ring := kleidi.NewFileKeyring(filepath.Join(t.TempDir(), "keyring.json"))
	env, err := kleidi.NewEnvelope(ctx, p, ring, kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatal(err)
	}
	defer env.Close()
	id := identity(t, p) // public
	kek := make([]byte, 32)
	rand.Read(kek)
	kid, _ := kleiditest.ForgeCiphertext("tpm", kek, nil)
	blob := wrapFor(t, id, kek)
	b, _ := json.Marshal(map[string]any{"format": "kleidi-keyring", "version": 1, "keys": []any{map[string]any{
		"id": kid, "created": time.Now().UTC().Truncate(time.Second), "state": "active",
		"wrapped": []any{map[string]any{"root": "tpm", "blob": blob}}}}})
	if err := os.WriteFile(ring.Path(), b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := env.Reload(ctx); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("Reload(forged version 1 keyring) err = %v, want kleidi.ErrUnauthenticated", err)
	}
	if env.KeyID() == kid {
		t.Errorf("the TPM node encrypts under the forger's KEK %s after a forged version 1 keyring", kid)
	}
}

func TestCraftedEKModulusIsRefusedWithoutPanic(t *testing.T) {
	for _, n := range [][]byte{make([]byte, 256), append(make([]byte, 255), 1), append(make([]byte, 255), 3)} {
		pub := tpm2.RSAEKTemplate
		pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: n})
		k := nodeKey{ek: tpm2.Marshal(pub), policy: make([]byte, 32)}
		id := &kleidi.Identity{Provider: "tpm", PublicKey: k.marshal()}
		func() {
			defer func() {
				if r := recover(); r != nil {
					t.Errorf("PANIC on crafted EK modulus %x: %v", n[250:], r)
				}
			}()
			r, err := OpenRecipient(id)
			if err != nil {
				return
			}
			if _, err := r.Wrap(context.Background(), make([]byte, 32)); err == nil {
				t.Errorf("Wrap to an EK with modulus ...%x err = nil", n[250:])
			}
		}()
	}
}

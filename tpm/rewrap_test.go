//go:build cgo

package tpm

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kleidi-kms/kleidi"
)

// newSimHolder returns a provider on a fresh simulator whose SRK is provisioned at the TCG persistent handle, so
// that the providers sharing its connection load no SRK of their own (the simulator holds three objects).
func newSimHolder(t *testing.T) *Provider {
	t.Helper()
	h := newSimProvider(t, Config{})
	withTPM(t, h, func(tp transport.TPM) {
		_, err := tpm2.EvictControl{
			Auth:             tpm2.TPMRHOwner,
			ObjectHandle:     &tpm2.NamedHandle{Handle: h.srk.handle, Name: h.srk.name},
			PersistentHandle: srkHandle,
		}.Execute(tp)
		if err != nil {
			t.Fatalf("EvictControl err = %v, want nil", err)
		}
		flushContext(tp, h.srk.handle)
		h.srk = nil
	})
	return h
}

func copyKeyring(t *testing.T, ring kleidi.Keyring) *kleidi.MemoryKeyring {
	t.Helper()
	ctx := context.Background()
	loaded, err := ring.Load(ctx)
	records := loaded.Keys
	if err != nil {
		t.Fatal(err)
	}
	c := kleidi.NewMemoryKeyring()
	if _, err := c.Update(ctx, func(r *kleidi.Ring) error { r.Keys, r.Members = records, loaded.Members; return nil }); err != nil {
		t.Fatal(err)
	}
	return c
}

func keyIDs(t *testing.T, ring kleidi.Keyring) []string {
	t.Helper()
	loaded, err := ring.Load(context.Background())
	records := loaded.Keys
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, r := range records {
		ids = append(ids, r.ID)
	}
	return ids
}

func decryptAll(t *testing.T, env *kleidi.Envelope, cs []*kleidi.Ciphertext, plaintexts [][]byte) {
	t.Helper()
	for i, c := range cs {
		got, err := env.Decrypt(context.Background(), c, []byte("ad"))
		if err != nil || !bytes.Equal(got, plaintexts[i]) {
			t.Fatalf("env.Decrypt(ctx, ciphertext %d, ad) err = %v, want nil and its plaintext", i, err)
		}
	}
}

// TestPCRChangeProcedure is the procedure of docs/install.md for a firmware update that changes PCR 7: without it
// nothing unwraps after the update; with it (kleidi.Rewrap from PCR 7 to no PCRs before, from no PCRs to PCR 7
// after) every key ID is kept, every ciphertext decrypts, new ones carry attached keys a node without keyring
// accepts, and attached keys made before the update are refused rather than unwrapped.
func TestPCRChangeProcedure(t *testing.T) {
	ctx := context.Background()
	h := newSimHolder(t)
	authFile := writeAuthFile(t, "pw")
	bound := Config{PCRs: []int{7}, AuthFile: authFile}
	unboundCfg := Config{AuthFile: authFile}

	// Before: a plugin with PCR 7, two KEKs, data under each.
	before := newSimProviderShared(t, h, bound)
	ring := kleidi.NewMemoryKeyring()
	env, err := kleidi.NewEnvelope(ctx, before, ring, kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatalf("NewEnvelope(ctx, PCR 7 provider, ring) err = %v, want nil", err)
	}
	plaintexts := [][]byte{[]byte("under the first KEK"), []byte("under the second KEK")}
	var cs []*kleidi.Ciphertext
	for i, pt := range plaintexts {
		if i == 1 {
			if _, err := env.Rotate(ctx); err != nil {
				t.Fatalf("env.Rotate(ctx) err = %v, want nil", err)
			}
		}
		c, err := env.Encrypt(ctx, pt, []byte("ad"))
		if err != nil {
			t.Fatalf("env.Encrypt(ctx, pt, ad) err = %v, want nil", err)
		}
		cs = append(cs, c)
	}
	activeID, ids := env.KeyID(), keyIDs(t, ring)
	env.Close()
	untouched := copyKeyring(t, ring) // what a node that skipped the procedure keeps

	// 1. Before the update: reseal to no PCRs.
	unbound := newSimProviderShared(t, h, unboundCfg)
	if err := kleidi.Rewrap(ctx, ring, before, unbound); err != nil {
		t.Fatalf("kleidi.Rewrap(ctx, ring, PCR 7, no PCRs) err = %v, want nil", err)
	}
	before.Close()

	// 2. The update changes PCR 7.
	extendPCR(t, h, 7)

	// Without the procedure, a plugin with PCR 7 cannot start, nor rotate, nor rewrap.
	skipped := newSimProviderShared(t, h, bound)
	if _, err := kleidi.NewEnvelope(ctx, skipped, untouched); err == nil {
		t.Fatalf("NewEnvelope(ctx, PCR 7 provider, keyring sealed before the update) err = nil, want an error")
	}
	if err := kleidi.Rewrap(ctx, untouched, skipped, unbound); err == nil {
		t.Fatalf("kleidi.Rewrap(ctx, keyring sealed before the update, PCR 7, no PCRs) err = nil, want an error")
	}
	skipped.Close()

	// Meanwhile the plugin runs without PCRs.
	env, err = kleidi.NewEnvelope(ctx, unbound, ring)
	if err != nil {
		t.Fatalf("NewEnvelope(ctx, provider without PCRs, rewrapped ring) err = %v, want nil", err)
	}
	decryptAll(t, env, cs, plaintexts)
	env.Close()

	// 3. After the update: reseal to the new value of PCR 7.
	after := newSimProviderShared(t, h, bound)
	if err := kleidi.Rewrap(ctx, ring, unbound, after); err != nil {
		t.Fatalf("kleidi.Rewrap(ctx, ring, no PCRs, PCR 7) err = %v, want nil", err)
	}
	unbound.Close()
	env, err = kleidi.NewEnvelope(ctx, after, ring)
	if err != nil {
		t.Fatalf("NewEnvelope(ctx, PCR 7 provider after the update, ring) err = %v, want nil", err)
	}
	if got := env.KeyID(); got != activeID {
		t.Errorf("active key after the procedure = %s, want %s", got, activeID)
	}
	if got := keyIDs(t, ring); !slices.Equal(got, ids) {
		t.Errorf("key IDs after the procedure = %v, want %v", got, ids)
	}
	decryptAll(t, env, cs, plaintexts)
	fresh, err := env.Encrypt(ctx, []byte("after the update"), []byte("ad"))
	if err != nil {
		t.Fatalf("env.Encrypt(ctx, pt, ad) after the procedure err = %v, want nil", err)
	}
	env.Close()

	// A node that lost its keyring decrypts the new ciphertext from its attached key (step 4 of the procedure
	// rewrites the old ones); an attached key sealed before the update is refused, never unwrapped.
	restarted := newSimProviderShared(t, h, bound)
	lost, err := kleidi.NewEnvelope(ctx, restarted, kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatalf("NewEnvelope(ctx, PCR 7 provider, empty keyring) err = %v, want nil", err)
	}
	defer lost.Close()
	decryptAll(t, lost, []*kleidi.Ciphertext{fresh}, [][]byte{[]byte("after the update")})
	got, err := lost.Decrypt(ctx, cs[0], []byte("ad"))
	if err == nil || got != nil {
		t.Fatalf("lost.Decrypt(ctx, ciphertext with a key attached before the update) = %q, %v; want an error", got, err)
	}
	if !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("lost.Decrypt(ctx, ciphertext with a key attached before the update) err = %v, want an error wrapping kleidi.ErrUnauthenticated", err)
	}
}

//go:build cgo

package tpm

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/kleidi-kms/kleidi"
)

// TestSimulatorNodeRoundTrip: a key wrapped for this TPM's identity, with no TPM, unwraps on it, and only under
// the configuration the identity was made with; the identity and the signing key are stable, and nothing stays
// loaded.
func TestSimulatorNodeRoundTrip(t *testing.T) {
	ctx := context.Background()
	for name, cfg := range map[string]func(t *testing.T) Config{
		"plain":    func(*testing.T) Config { return Config{} },
		"pcr+auth": func(t *testing.T) Config { return Config{PCRs: []int{7, 16}, AuthFile: writeAuthFile(t, "s3cret")} },
	} {
		t.Run(name, func(t *testing.T) {
			p := newSimProvider(t, cfg(t))
			id := identity(t, p)
			if id.Provider != "tpm" || len(id.VerifyKey) == 0 || len(id.Certificate) != 0 {
				t.Fatalf("identity = provider %q, verify key %d bytes, certificate %d bytes; want tpm, a key, none (the simulator has no EK certificate)",
					id.Provider, len(id.VerifyKey), len(id.Certificate))
			}
			if again := identity(t, p); again.ID() != id.ID() {
				t.Fatalf("second p.Identity(ctx) is %s, want %s", again.ID(), id.ID())
			}
			key := randomKey(t)
			wrapped := wrapFor(t, id, key)
			got, err := p.Unwrap(ctx, wrapped)
			if err != nil {
				t.Fatalf("p.Unwrap(ctx, duplicate for p) err = %v, want nil", err)
			}
			if !bytes.Equal(got, key) {
				t.Fatalf("p.Unwrap(ctx, duplicate for p) differs from the key")
			}
			msg := []byte("a keyring member's statement")
			if err := id.Verify(msg, sign(t, p, msg)); err != nil {
				t.Fatalf("id.Verify(msg, p.Sign(msg)) = %v, want nil", err)
			}
			if err := id.Verify([]byte("another statement"), sign(t, p, msg)); !errors.Is(err, kleidi.ErrUnauthenticated) {
				t.Fatalf("id.Verify(other message, p.Sign(msg)) = %v, want an error wrapping kleidi.ErrUnauthenticated", err)
			}
			// Sealed keys still unwrap beside duplicates.
			wrapUnwrap(t, p)
			assertNoHandles(t, p)
		})
	}
}

// TestSimulatorDuplicateRefusedUnderOtherConfig: a duplicate made for one configuration of a TPM does not unwrap
// under another (other PCRs, no or another auth value, no PCRs), nor after the bound PCR changed; the identity
// and the signatures of those configurations differ too.
func TestSimulatorDuplicateRefusedUnderOtherConfig(t *testing.T) {
	ctx := context.Background()
	authFile := writeAuthFile(t, "s3cret")
	cfg := Config{PCRs: []int{16}, AuthFile: authFile}
	p := newSimProvider(t, cfg)
	id := identity(t, p)
	key := randomKey(t)
	wrapped := wrapFor(t, id, key)
	msg := []byte("statement")
	for name, other := range map[string]Config{
		"no PCRs, no auth": {},
		"no PCRs":          {AuthFile: authFile},
		"PCR 8":            {PCRs: []int{8}, AuthFile: authFile},
		"no auth":          {PCRs: []int{16}},
		"wrong auth":       {PCRs: []int{16}, AuthFile: writeAuthFile(t, "s3cres")},
	} {
		q := newSimProviderShared(t, p, other)
		got, err := q.Unwrap(ctx, wrapped)
		if !errors.Is(err, kleidi.ErrUnwrap) || !errors.Is(err, ErrPolicy) || got != nil {
			t.Errorf("%s: Unwrap(ctx, duplicate for PCR 16 + auth) = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnwrap and ErrPolicy", name, len(got), err)
		}
		if err != nil && (strings.Contains(err.Error(), "s3cre") || bytes.Contains([]byte(err.Error()), key)) {
			t.Errorf("%s: Unwrap's error holds the auth value or the key", name)
		}
		qid := identity(t, q)
		if qid.ID() == id.ID() || bytes.Equal(qid.VerifyKey, id.VerifyKey) {
			t.Errorf("%s: identity equals the one of PCR 16 + auth", name)
		}
		if err := id.Verify(msg, sign(t, q, msg)); !errors.Is(err, kleidi.ErrUnauthenticated) {
			t.Errorf("%s: id.Verify(msg, signature by %s) = %v, want an error wrapping kleidi.ErrUnauthenticated", name, name, err)
		}
		q.Close()
	}

	// A lying header (the configured PCRs and auth flag over another node's policy) is refused too.
	noAuth := newSimProviderShared(t, p, Config{PCRs: []int{16}})
	d, err := parseDuplicate(wrapFor(t, identity(t, noAuth), key))
	noAuth.Close() // the simulator has room for three objects
	if err != nil {
		t.Fatal(err)
	}
	d.auth = true
	if got, err := p.Unwrap(ctx, d.marshal()); !errors.Is(err, ErrPolicy) || got != nil {
		t.Errorf("p.Unwrap(ctx, duplicate with a lying header) = %d bytes, %v; want nil, an error wrapping ErrPolicy", len(got), err)
	}

	if got, err := p.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("p.Unwrap(ctx, duplicate) = %v; want the key", err)
	}
	// Another boot state: refused.
	extendPCR(t, p, 16)
	if got, err := p.Unwrap(ctx, wrapped); !errors.Is(err, kleidi.ErrUnwrap) || !errors.Is(err, ErrPolicy) || got != nil {
		t.Fatalf("p.Unwrap(ctx, duplicate) after PCR 16 changed = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnwrap and ErrPolicy", len(got), err)
	}
	if changed := identity(t, p); changed.ID() == id.ID() {
		t.Fatalf("p.Identity(ctx) after PCR 16 changed is the same as before")
	}
	if err := id.Verify(msg, sign(t, p, msg)); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Fatalf("id.Verify(msg, signature made after PCR 16 changed) = %v, want an error wrapping kleidi.ErrUnauthenticated", err)
	}
	assertNoHandles(t, p)
}

// TestSimulatorIdentityAcrossReboot: a TPM reset (a reboot) keeps the identity, and duplicates made before
// unwrap after.
func TestSimulatorIdentityAcrossReboot(t *testing.T) {
	ctx := context.Background()
	cfg := Config{PCRs: []int{7}, AuthFile: writeAuthFile(t, "pw")}
	p := newSimProvider(t, cfg)
	id := identity(t, p)
	key := randomKey(t)
	wrapped := wrapFor(t, id, key)
	if err := sim(t, p).Reset(); err != nil {
		t.Fatalf("simulator Reset() = %v", err)
	}
	if err := p.Health(ctx); err != nil {
		t.Fatalf("p.Health(ctx) after a reboot = %v, want nil", err)
	}
	if again := identity(t, p); again.ID() != id.ID() {
		t.Fatalf("p.Identity(ctx) after a reboot is %s, want %s", again.ID(), id.ID())
	}
	if got, err := p.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("p.Unwrap(ctx, duplicate made before the reboot) err = %v; want the key", err)
	}
}

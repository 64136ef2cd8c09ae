package kleidi_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

// attackerKEK plays the threat model's etcd writer: it chooses a KEK, computes its public key ID, encrypts a DEK
// seed of its choice under it and wraps the KEK to the root, as anyone who knows the root's public key can (here:
// p.Wrap). It cannot make a proof.
func attackerKEK(t *testing.T, p *kleiditest.Provider) (id string, kek, blob []byte, c *kleidi.Ciphertext) {
	t.Helper()
	kek = make([]byte, kleidi.KeySize)
	rand.Read(kek)
	id = kleidi.KeyIDForTest(p.Name(), kek)
	blob, err := p.Wrap(ctx, kek)
	if err != nil {
		t.Fatal(err)
	}
	return id, kek, blob, kleidi.SealForTest(id, kek, []byte("the attacker's own 32-byte seed!"))
}

// attachedProof returns the proof inside a genuine attached key.
func attachedProof(attached []byte) []byte {
	n := binary.BigEndian.Uint16(attached[2:])
	return attached[4 : 4+n]
}

func TestForgedKEKIsNeverAccepted(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	e := newEnvelope(t, p, kleidi.NewMemoryKeyring())
	genuine := encrypt(t, e, "a genuine seed", "").AttachedKey
	id, _, blob, _ := attackerKEK(t, p)
	mallory := kleiditest.NewInsecureProvider()
	malloryProof, err := mallory.Prove(ctx, kleidi.ProofMessageForTest(id, p.Name(), blob))
	if err != nil {
		t.Fatal(err)
	}
	random := make([]byte, 32)
	rand.Read(random)
	attached := map[string][]byte{
		"a bare wrapped key (attached key version 1)": blob,
		"a proof by another root":                     kleidi.EncodeAttachedKeyForTest(blob, malloryProof),
		"a random proof":                              kleidi.EncodeAttachedKeyForTest(blob, random),
		"the genuine proof of another key":            kleidi.EncodeAttachedKeyForTest(blob, attachedProof(genuine)),
		"the plugin's own genuine attached key":       genuine,
	}
	before := p.Calls(kleiditest.OpUnwrap)
	for name, a := range attached {
		_, _, _, c := attackerKEK(t, p)
		c.AttachedKey = a
		got, err := e.Decrypt(ctx, c, nil)
		if !errors.Is(err, kleidi.ErrUnauthenticated) || got != nil {
			t.Errorf("e.Decrypt(a forged KEK with %s) = %q, %v; want nil, an error wrapping kleidi.ErrUnauthenticated", name, got, err)
		}
	}
	// The forged KEK with its own ID and blob, the case reproduced against the first release.
	c := kleidi.SealForTest(id, make([]byte, kleidi.KeySize), nil) // any KEK: the proof fails before it matters
	c.AttachedKey = kleidi.EncodeAttachedKeyForTest(blob, malloryProof)
	if _, err := e.Decrypt(ctx, c, nil); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("e.Decrypt(forged) err = %v, want kleidi.ErrUnauthenticated", err)
	}
	if n := p.Calls(kleiditest.OpUnwrap) - before; n != 0 {
		t.Errorf("forged attached keys made %d calls to the root of trust, want 0", n)
	}
}

func TestAttachedKeyRecoversWithTheRootAlone(t *testing.T) {
	// A node whose keyring is lost, or a second node with the same root (the same OpenPGP private key), decrypts
	// what the first wrote: the attached key's proof verifies with the root alone.
	root := make([]byte, 32)
	rand.Read(root)
	writer := newEnvelope(t, kleiditest.NewInsecureProviderWithRoot(root), kleidi.NewMemoryKeyring())
	c := reparse(t, encrypt(t, writer, "survives the keyring", ""))
	c.AttachedKey = encrypt(t, writer, "", "").AttachedKey
	reader := newEnvelope(t, kleiditest.NewInsecureProviderWithRoot(root), kleidi.NewMemoryKeyring())
	if got := decrypt(t, reader, c, ""); got != "survives the keyring" {
		t.Errorf("reader.Decrypt(c) = %q, want %q", got, "survives the keyring")
	}
}

// opaque hides every method but those of kleidi.Provider: a third party's provider that is no Authenticator.
type opaque struct{ kleidi.Provider }

func TestProviderWithoutAuthenticatorNeverUnwrapsAttachedKeys(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	e := newEnvelope(t, opaque{p}, kleidi.NewMemoryKeyring())
	if c := encrypt(t, e, "x", ""); c.AttachedKey != nil {
		t.Errorf("Encrypt with a provider that cannot prove: WrappedKey of %d bytes, want none", len(c.AttachedKey))
	}
	other := newEnvelope(t, opaque{p}, kleidi.NewMemoryKeyring())
	c := reparse(t, encrypt(t, other, "x", ""))
	c.AttachedKey = encrypt(t, newEnvelope(t, p, kleidi.NewMemoryKeyring()), "", "").AttachedKey
	before := p.Calls(kleiditest.OpUnwrap)
	if _, err := e.Decrypt(ctx, c, nil); !errors.Is(err, kleidi.ErrUnknownKey) {
		t.Errorf("e.Decrypt(c from another keyring) err = %v, want kleidi.ErrUnknownKey", err)
	}
	if n := p.Calls(kleiditest.OpUnwrap) - before; n != 0 {
		t.Errorf("Decrypt made %d unwraps, want 0", n)
	}
}

func TestFloodOfForgedRequestsCostsNoRootCalls(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	e := newEnvelope(t, p, kleidi.NewMemoryKeyring())
	genuine := encrypt(t, e, "x", "").AttachedKey
	_, _, blob, _ := attackerKEK(t, p)
	var m0, m1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m0)
	before := p.Calls(kleiditest.OpUnwrap)
	const n = 10000
	for i := range n {
		_, _, _, c := attackerKEK(t, p) // a new key ID every time
		switch i % 3 {
		case 0:
			c.AttachedKey = genuine // the plugin's own attached key, under another key ID
		case 1:
			c.AttachedKey = blob // a bare blob
		default:
			proof := make([]byte, 1+i%64)
			rand.Read(proof)
			c.AttachedKey = kleidi.EncodeAttachedKeyForTest(blob, proof)
		}
		if _, err := e.Decrypt(ctx, c, nil); err == nil {
			t.Fatalf("Decrypt of forged request %d err = nil", i)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&m1)
	if calls := p.Calls(kleiditest.OpUnwrap) - before; calls != 0 {
		t.Errorf("%d forged Decrypts made %d calls to the root of trust, want 0", n, calls)
	}
	if k := kleidi.CachedKeysForTest(e); k != 1 {
		t.Errorf("after the flood the Envelope holds %d KEKs, want 1", k)
	}
	if grew := int64(m1.HeapAlloc) - int64(m0.HeapAlloc); grew > 1<<20 {
		t.Errorf("the heap grew by %d bytes over the flood, want under 1 MiB", grew)
	}
	if got := decrypt(t, e, reparse(t, encrypt(t, e, "still serving", "")), ""); got != "still serving" {
		t.Errorf("Decrypt after the flood = %q", got)
	}
}

func TestAttachedKeyCacheIsBounded(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	e := newEnvelope(t, p, kleidi.NewMemoryKeyring())
	const bound = 4096 // a keyring's bound
	var cs []*kleidi.Ciphertext
	for range bound + 4 {
		cs = append(cs, encrypt(t, newEnvelope(t, p, kleidi.NewMemoryKeyring()), "x", ""))
	}
	before := p.Calls(kleiditest.OpUnwrap)
	for range 2 { // the second pass finds every KEK but the 4 oldest in memory
		for _, c := range cs[4:] {
			if got := decrypt(t, e, c, ""); got != "x" {
				t.Fatalf("Decrypt = %q", got)
			}
		}
	}
	if n := p.Calls(kleiditest.OpUnwrap) - before; n != bound {
		t.Errorf("two passes over %d attached KEKs made %d unwraps, want %d: each once", bound, n, bound)
	}
	for _, c := range cs[:4] {
		decrypt(t, e, c, "")
	}
	if k := kleidi.CachedKeysForTest(e); k > 1+bound {
		t.Errorf("after %d attached KEKs the Envelope holds %d KEKs, want at most %d", bound+4, k, 1+bound)
	}
	// The oldest was dropped, and is unwrapped again when it comes back.
	before = p.Calls(kleiditest.OpUnwrap)
	if got := decrypt(t, e, cs[4], ""); got != "x" {
		t.Fatalf("Decrypt of the oldest = %q", got)
	}
	if n := p.Calls(kleiditest.OpUnwrap) - before; n != 1 {
		t.Errorf("Decrypt of a dropped attached KEK made %d unwraps, want 1", n)
	}
}

// panickingProvider panics in Unwrap while panics is set: a parser bug reached by attacker bytes.
type panickingProvider struct {
	*kleiditest.Provider
	panics atomic.Bool
}

func (p *panickingProvider) Unwrap(ctx context.Context, b []byte) ([]byte, error) {
	if p.panics.Load() {
		panic("a provider's parser met bytes it did not expect")
	}
	return p.Provider.Unwrap(ctx, b)
}

func TestProviderPanicFailsOnlyThatCall(t *testing.T) {
	p := &panickingProvider{Provider: kleiditest.NewInsecureProvider()}
	ring := kleidi.NewMemoryKeyring()
	old := newEnvelope(t, p, ring)
	c1 := reparse(t, encrypt(t, old, "one", ""))
	if _, err := old.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	c2 := reparse(t, encrypt(t, old, "two", ""))
	if _, err := old.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	e := newEnvelope(t, p, ring) // holds only the active KEK
	p.panics.Store(true)
	got, err := e.Decrypt(ctx, c1, nil)
	if err == nil || got != nil || kleidi.ErrorKind(err) != "error" || !strings.Contains(err.Error(), "panicked") {
		t.Errorf("e.Decrypt(c1) with a panicking provider = %q, %v; want nil and an error of kind \"error\" saying it panicked", got, err)
	}
	p.panics.Store(false)
	if got := decrypt(t, e, c2, ""); got != "two" {
		t.Errorf("e.Decrypt(c2) after the panic = %q, want %q", got, "two")
	}
	time.Sleep(1100 * time.Millisecond) // a panic is remembered as an outage is, for a second
	if got := decrypt(t, e, c1, ""); got != "one" {
		t.Errorf("e.Decrypt(c1) a second after the panic = %q, want %q", got, "one")
	}
}

func TestKeyUsageLimit(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	e, err := kleidi.NewEnvelope(ctx, p, kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty(), kleidi.WithKeyUsageLimit(3))
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		encrypt(t, e, "x", "")
	}
	if s := e.Stats(); s.ActiveKeyEncryptions != 3 || s.KeyUsageLimit != 3 {
		t.Errorf("e.Stats() = %+v, want 3 encryptions of a limit of 3", s)
	}
	if _, err := e.Encrypt(ctx, []byte("x"), nil); !errors.Is(err, kleidi.ErrKeyExhausted) {
		t.Errorf("4th e.Encrypt under a limit of 3 err = %v, want kleidi.ErrKeyExhausted", err)
	}
	if _, err := e.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	if c := encrypt(t, e, "after rotation", ""); decrypt(t, e, c, "") != "after rotation" {
		t.Error("round trip after rotation failed")
	}
	for _, n := range []uint64{0, kleidi.MaxEncryptionsPerKey + 1} {
		if _, err := kleidi.NewEnvelope(ctx, p, kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty(), kleidi.WithKeyUsageLimit(n)); err == nil {
			t.Errorf("kleidi.WithKeyUsageLimit(%d) err = nil, want an error", n)
		}
	}
}

func TestCloseForgetsKeys(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	e := newEnvelope(t, p, kleidi.NewMemoryKeyring())
	c := encrypt(t, e, "x", "")
	if err := e.Close(); err != nil {
		t.Fatalf("e.Close() = %v", err)
	}
	if k := kleidi.CachedKeysForTest(e); k != 0 {
		t.Errorf("after Close the Envelope holds %d KEKs, want 0", k)
	}
	if _, err := e.Encrypt(ctx, []byte("x"), nil); !errors.Is(err, kleidi.ErrClosed) {
		t.Errorf("e.Encrypt after Close err = %v, want kleidi.ErrClosed", err)
	}
	if _, err := e.Decrypt(ctx, c, nil); !errors.Is(err, kleidi.ErrClosed) {
		t.Errorf("e.Decrypt after Close err = %v, want kleidi.ErrClosed", err)
	}
	if _, err := e.Rotate(ctx); !errors.Is(err, kleidi.ErrClosed) {
		t.Errorf("e.Rotate after Close err = %v, want kleidi.ErrClosed", err)
	}
	if err := e.Reload(ctx); !errors.Is(err, kleidi.ErrClosed) {
		t.Errorf("e.Reload after Close err = %v, want kleidi.ErrClosed", err)
	}
	if err := e.Close(); err != nil {
		t.Errorf("second e.Close() = %v, want nil", err)
	}
}

func TestKeyringCopyWithABadProofIsRefused(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	ring := fileRing(t)
	newEnvelope(t, p, ring)
	b, err := os.ReadFile(ring.Path())
	if err != nil {
		t.Fatal(err)
	}
	// Replace the first character of the active copy's proof with another base64 character.
	i := bytes.Index(b, []byte(`"proof": "`)) + len(`"proof": "`)
	tampered := bytes.Clone(b)
	tampered[i] = 'A'
	if b[i] == 'A' {
		tampered[i] = 'B'
	}
	if err := os.WriteFile(ring.Path(), tampered, 0o600); err != nil {
		t.Fatal(err)
	}
	before := p.Calls(kleiditest.OpUnwrap)
	if _, err := kleidi.NewEnvelope(ctx, p, kleidi.NewFileKeyring(ring.Path())); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("kleidi.NewEnvelope(keyring with a bad proof) err = %v, want kleidi.ErrUnauthenticated", err)
	}
	if n := p.Calls(kleiditest.OpUnwrap) - before; n != 0 {
		t.Errorf("a keyring copy with a bad proof made %d unwraps, want 0", n)
	}
}

func TestKeyringWithoutProofsStillWorks(t *testing.T) {
	// A keyring of format version 1 has no proofs: its copies are trusted as local state, and the Envelope proves
	// the active copy itself, so its ciphertexts carry attached keys that another node with the root accepts.
	root := make([]byte, 32)
	rand.Read(root)
	p := kleiditest.NewInsecureProviderWithRoot(root)
	ring := fileRing(t)
	newEnvelope(t, p, ring)
	b, err := os.ReadFile(ring.Path())
	if err != nil {
		t.Fatal(err)
	}
	var v1 bytes.Buffer
	for _, line := range strings.SplitAfter(string(b), "\n") {
		switch {
		case strings.Contains(line, `"proof"`):
		case strings.Contains(line, `"version": 2`):
			v1.WriteString(strings.Replace(line, "2", "1", 1))
		case strings.Contains(line, `"blob"`):
			v1.WriteString(strings.TrimSuffix(strings.TrimSuffix(line, "\n"), ",") + "\n")
		default:
			v1.WriteString(line)
		}
	}
	if err := os.WriteFile(ring.Path(), v1.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	e, err := kleidi.NewEnvelope(ctx, p, kleidi.NewFileKeyring(ring.Path()))
	if err != nil {
		t.Fatalf("kleidi.NewEnvelope(version 1 keyring) err = %v, want nil\n%s", err, v1.Bytes())
	}
	c := encrypt(t, e, "x", "")
	other := newEnvelope(t, kleiditest.NewInsecureProviderWithRoot(root), kleidi.NewMemoryKeyring())
	if got := decrypt(t, other, c, ""); got != "x" {
		t.Errorf("another node's Decrypt(c) = %q, want %q", got, "x")
	}
	// The first write (a rotation) proves the old copies: the keyring is then of version 2, every copy proved.
	if _, err := e.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	b, err = os.ReadFile(ring.Path())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b, []byte(`"version": 2`)) || bytes.Count(b, []byte(`"proof"`)) != 2 {
		t.Errorf("keyring after a rotation:\n%s\nwant version 2 and a proof on both copies", b)
	}
	if _, err := kleidi.NewEnvelope(ctx, p, kleidi.NewFileKeyring(ring.Path())); err != nil {
		t.Errorf("kleidi.NewEnvelope(upgraded keyring) err = %v, want nil", err)
	}
}

func TestRewrapMovesKeysToAnotherConfiguration(t *testing.T) {
	// from and to are two configurations of a root with one name (a TPM before and after a PCR change).
	from, to := kleiditest.NewInsecureProvider(), kleiditest.NewInsecureProvider()
	ring := fileRing(t)
	e := newEnvelope(t, from, ring)
	c1 := reparse(t, encrypt(t, e, "one", ""))
	if _, err := e.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	c2 := reparse(t, encrypt(t, e, "two", ""))
	if _, err := kleidi.NewEnvelope(ctx, to, kleidi.NewFileKeyring(ring.Path())); err == nil {
		t.Fatal("kleidi.NewEnvelope(to) before Rewrap err = nil, want an error")
	}
	if err := kleidi.Rewrap(ctx, ring, from, to); err != nil {
		t.Fatalf("kleidi.Rewrap(ring, from, to) err = %v, want nil", err)
	}
	after, err := kleidi.NewEnvelope(ctx, to, kleidi.NewFileKeyring(ring.Path()))
	if err != nil {
		t.Fatalf("kleidi.NewEnvelope(to) after Rewrap err = %v, want nil", err)
	}
	if after.KeyID() != e.KeyID() {
		t.Errorf("active key ID after Rewrap = %s, want %s", after.KeyID(), e.KeyID())
	}
	for want, c := range map[string]*kleidi.Ciphertext{"one": c1, "two": c2} {
		if got := decrypt(t, after, c, ""); got != want {
			t.Errorf("after.Decrypt = %q, want %q", got, want)
		}
	}
	// from's copies were replaced (same root name): from no longer opens the keyring.
	if _, err := kleidi.NewEnvelope(ctx, from, kleidi.NewFileKeyring(ring.Path())); err == nil {
		t.Error("kleidi.NewEnvelope(from) after Rewrap err = nil, want an error: its copies were replaced")
	}
}

// TestForgeHelpersFollowTheFormats pins kleiditest's attacker helpers to the package's own encoders, so the attack
// tests of other packages build what a real attacker would.
func TestForgeHelpersFollowTheFormats(t *testing.T) {
	kek := bytes.Repeat([]byte{9}, kleidi.KeySize)
	id, raw := kleiditest.ForgeCiphertext("gpg", kek, []byte("x"))
	if want := kleidi.KeyIDForTest("gpg", kek); id != want {
		t.Errorf("kleiditest.ForgeCiphertext key ID = %s, want %s", id, want)
	}
	c, err := kleidi.ParseCiphertext(raw)
	if err != nil || c.KeyID() != id {
		t.Fatalf("kleidi.ParseCiphertext(forged) = %v, %v", c, err)
	}
	if got, want := kleiditest.ForgeAttachedKey([]byte("blob"), []byte("proof")), kleidi.EncodeAttachedKeyForTest([]byte("blob"), []byte("proof")); !bytes.Equal(got, want) {
		t.Errorf("kleiditest.ForgeAttachedKey = %x, want %x", got, want)
	}
	if got, want := kleiditest.ProofMessage(id, "gpg", []byte("blob")), kleidi.ProofMessageForTest(id, "gpg", []byte("blob")); !bytes.Equal(got, want) {
		t.Errorf("kleiditest.ProofMessage = %q, want %q", got, want)
	}
}

func TestKeyringCopyWithoutAProofIsRefused(t *testing.T) {
	// The attack of a keyring copied between nodes, or restored from a backup, that someone edited on the way:
	// a KEK of their choosing, wrapped to the root (public parts suffice), added as the active key with no proof.
	p := kleiditest.NewInsecureProvider()
	ring := fileRing(t)
	newEnvelope(t, p, ring)
	kek := bytes.Repeat([]byte{7}, kleidi.KeySize)
	id := kleidi.KeyIDForTest(p.Name(), kek)
	blob, err := p.Wrap(ctx, kek)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ring.Update(ctx, func(ring *kleidi.Ring) error {
		for i := range ring.Keys {
			ring.Keys[i].State = kleidi.KeyRetired
		}
		ring.Keys = append(ring.Keys, kleidi.KeyRecord{ID: id, Created: time.Now().UTC().Truncate(time.Second), State: kleidi.KeyActive,
			Wrapped: []kleidi.WrappedKey{{Root: p.Name(), Blob: blob}}})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	before := p.Calls(kleiditest.OpUnwrap)
	if _, err := kleidi.NewEnvelope(ctx, p, kleidi.NewFileKeyring(ring.Path())); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("kleidi.NewEnvelope(keyring whose active copy has no proof) err = %v, want kleidi.ErrUnauthenticated", err)
	}
	if n := p.Calls(kleiditest.OpUnwrap) - before; n != 0 {
		t.Errorf("a keyring copy without a proof made %d unwraps, want 0", n)
	}
}

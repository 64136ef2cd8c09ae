package kleidi_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

var ctx = context.Background()

func newEnvelope(t *testing.T, p kleidi.Provider, ring kleidi.Keyring) *kleidi.Envelope {
	t.Helper()
	e, err := kleidi.NewEnvelope(ctx, p, ring, kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatalf("kleidi.NewEnvelope() err = %v, want nil", err)
	}
	return e
}

func fileRing(t *testing.T) *kleidi.FileKeyring {
	return kleidi.NewFileKeyring(filepath.Join(t.TempDir(), "keyring.json"))
}

func encrypt(t *testing.T, e *kleidi.Envelope, plaintext, ad string) *kleidi.Ciphertext {
	t.Helper()
	c, err := e.Encrypt(ctx, []byte(plaintext), []byte(ad))
	if err != nil {
		t.Fatalf("e.Encrypt(%q, %q) err = %v, want nil", plaintext, ad, err)
	}
	return c
}

func decrypt(t *testing.T, e *kleidi.Envelope, c *kleidi.Ciphertext, ad string) string {
	t.Helper()
	got, err := e.Decrypt(ctx, c, []byte(ad))
	if err != nil {
		t.Fatalf("e.Decrypt(%v, %q) err = %v, want nil", c, ad, err)
	}
	return string(got)
}

// reparse returns c as a reader of its bytes sees it: without the wrapped key.
func reparse(t *testing.T, c *kleidi.Ciphertext) *kleidi.Ciphertext {
	t.Helper()
	p, err := kleidi.ParseCiphertext(c.Bytes())
	if err != nil {
		t.Fatalf("kleidi.ParseCiphertext(c.Bytes()) err = %v, want nil", err)
	}
	return p
}

func TestRoundTrip(t *testing.T) {
	e := newEnvelope(t, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring())
	for _, tc := range []struct{ plaintext, ad string }{
		{"", ""},
		{"secret", ""},
		{"secret", "default/my-secret"},
		{strings.Repeat("x", 4096), "ad"},
	} {
		c := encrypt(t, e, tc.plaintext, tc.ad)
		if got := decrypt(t, e, reparse(t, c), tc.ad); got != tc.plaintext {
			t.Errorf("e.Decrypt(e.Encrypt(%.10q)) = %.10q", tc.plaintext, got)
		}
		if c.KeyID() != e.KeyID() {
			t.Errorf("c.KeyID() = %q, want e.KeyID() = %q", c.KeyID(), e.KeyID())
		}
	}
}

func TestKeyIDShape(t *testing.T) {
	e := newEnvelope(t, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring())
	id := e.KeyID()
	if !strings.HasPrefix(id, "kleidi-insecure-") || len(id) > kleidi.MaxKeyIDSize {
		t.Errorf("e.KeyID() = %q, want prefix kleidi-insecure- and at most %d bytes", id, kleidi.MaxKeyIDSize)
	}
}

func TestCiphertextSize(t *testing.T) {
	e := newEnvelope(t, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring())
	c := encrypt(t, e, string(make([]byte, 32)), "")
	if n := len(c.Bytes()); n > 128 {
		t.Errorf("len(Encrypt(32 bytes).Bytes()) = %d, want at most 128", n)
	}
}

func TestEncryptIsRandomized(t *testing.T) {
	e := newEnvelope(t, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring())
	a, b := encrypt(t, e, "same", ""), encrypt(t, e, "same", "")
	if bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Errorf("two encryptions of the same plaintext are equal")
	}
}

func TestEncryptTooLarge(t *testing.T) {
	e := newEnvelope(t, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring())
	if _, err := e.Encrypt(ctx, make([]byte, kleidi.MaxPlaintextSize+1), nil); !errors.Is(err, kleidi.ErrTooLarge) {
		t.Errorf("e.Encrypt(MaxPlaintextSize+1 bytes) err = %v, want kleidi.ErrTooLarge", err)
	}
}

func TestDecryptRefusesAlteredData(t *testing.T) {
	e := newEnvelope(t, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring())
	c := encrypt(t, e, "secret", "ad")
	if _, err := e.Decrypt(ctx, c, []byte("other ad")); !errors.Is(err, kleidi.ErrDecrypt) {
		t.Errorf("e.Decrypt(c, other ad) err = %v, want kleidi.ErrDecrypt", err)
	}
	if _, err := e.Decrypt(ctx, c, nil); !errors.Is(err, kleidi.ErrDecrypt) {
		t.Errorf("e.Decrypt(c, nil) err = %v, want kleidi.ErrDecrypt", err)
	}
	raw := c.Bytes()
	for i := range raw {
		for _, bit := range []byte{0x01, 0x80} {
			b := bytes.Clone(raw)
			b[i] ^= bit
			p, err := kleidi.ParseCiphertext(b)
			if err == nil {
				_, err = e.Decrypt(ctx, p, []byte("ad"))
			}
			if !errors.Is(err, kleidi.ErrDecrypt) && !errors.Is(err, kleidi.ErrInvalidCiphertext) && !errors.Is(err, kleidi.ErrUnknownKey) {
				t.Errorf("decrypt with byte %d ^ %#x err = %v, want ErrDecrypt, ErrInvalidCiphertext or ErrUnknownKey", i, bit, err)
			}
		}
	}
	if _, err := e.Decrypt(ctx, nil, nil); !errors.Is(err, kleidi.ErrInvalidCiphertext) {
		t.Errorf("e.Decrypt(nil) err = %v, want kleidi.ErrInvalidCiphertext", err)
	}
}

func TestRotationKeepsOldCiphertexts(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	ring := fileRing(t)
	e := newEnvelope(t, p, ring)
	var cs []*kleidi.Ciphertext
	ids := map[string]bool{}
	for i := range 4 {
		ids[e.KeyID()] = true
		cs = append(cs, encrypt(t, e, fmt.Sprint("secret ", i), ""))
		id, err := e.Rotate(ctx)
		if err != nil {
			t.Fatalf("e.Rotate() err = %v, want nil", err)
		}
		if id != e.KeyID() || ids[id] {
			t.Fatalf("e.Rotate() = %q, e.KeyID() = %q; want a new ID, the same in both", id, e.KeyID())
		}
	}
	fresh := newEnvelope(t, p, kleidi.NewFileKeyring(ring.Path()))
	if fresh.KeyID() != e.KeyID() {
		t.Errorf("fresh.KeyID() = %q, want %q", fresh.KeyID(), e.KeyID())
	}
	for i, c := range cs {
		want := fmt.Sprint("secret ", i)
		for _, env := range []*kleidi.Envelope{e, fresh} {
			if got := decrypt(t, env, reparse(t, c), ""); got != want {
				t.Errorf("Decrypt(ciphertext %d) = %q, want %q", i, got, want)
			}
		}
	}
	loaded, err := ring.Load(ctx)
	records := loaded.Keys
	if err != nil {
		t.Fatal(err)
	}
	active := 0
	for _, r := range records {
		if r.State == kleidi.KeyActive {
			active++
			if r.ID != e.KeyID() {
				t.Errorf("active record %q, want %q", r.ID, e.KeyID())
			}
		}
	}
	if len(records) != 5 || active != 1 {
		t.Errorf("keyring has %d records, %d active; want 5, 1", len(records), active)
	}
}

func TestHotPathMakesNoProviderCalls(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	e := newEnvelope(t, p, kleidi.NewMemoryKeyring())
	c := encrypt(t, e, "warm", "")
	decrypt(t, e, c, "")
	wraps, unwraps, healths := p.Calls(kleiditest.OpWrap), p.Calls(kleiditest.OpUnwrap), p.Calls(kleiditest.OpHealth)
	for i := range 10000 {
		c := encrypt(t, e, strconv.Itoa(i), "")
		decrypt(t, e, reparse(t, c), "")
	}
	if p.Calls(kleiditest.OpWrap) != wraps || p.Calls(kleiditest.OpUnwrap) != unwraps || p.Calls(kleiditest.OpHealth) != healths {
		t.Errorf("10000 encrypt+decrypt made %d wrap, %d unwrap, %d health calls; want 0",
			p.Calls(kleiditest.OpWrap)-wraps, p.Calls(kleiditest.OpUnwrap)-unwraps, p.Calls(kleiditest.OpHealth)-healths)
	}
}

func TestConcurrentFirstDecryptsShareOneUnwrap(t *testing.T) {
	p, e, c := retiredKeyCiphertext(t, "retired")
	before := p.Calls(kleiditest.OpUnwrap)
	p.SetLatency(50 * time.Millisecond)
	const n = 32
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := e.Decrypt(ctx, c, nil)
			if err == nil && string(got) != "retired" {
				err = fmt.Errorf("got %q", got)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("concurrent e.Decrypt(c) err = %v, want nil", err)
		}
	}
	if got := p.Calls(kleiditest.OpUnwrap) - before; got != 1 {
		t.Errorf("%d concurrent first decrypts made %d Unwrap calls, want 1", n, got)
	}
}

// retiredKeyCiphertext returns a provider, a fresh Envelope over a rotated keyring (only its active KEK unwrapped)
// and a ciphertext of plaintext under the retired KEK: its first Decrypt needs one Unwrap.
func retiredKeyCiphertext(t *testing.T, plaintext string) (*kleiditest.Provider, *kleidi.Envelope, *kleidi.Ciphertext) {
	t.Helper()
	p := kleiditest.NewInsecureProvider()
	ring := kleidi.NewMemoryKeyring()
	old := newEnvelope(t, p, ring)
	c := reparse(t, encrypt(t, old, plaintext, ""))
	if _, err := old.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	return p, newEnvelope(t, p, ring), c
}

func TestProviderFailuresAreRememberedBriefly(t *testing.T) {
	p, e, c := retiredKeyCiphertext(t, "x")
	p.SetError(kleiditest.OpUnwrap, kleidi.ErrUnavailable)
	if _, err := e.Decrypt(ctx, c, nil); !errors.Is(err, kleidi.ErrUnavailable) {
		t.Errorf("e.Decrypt(c) with the root down err = %v, want kleidi.ErrUnavailable", err)
	}
	p.SetError(kleiditest.OpUnwrap, nil)
	before := p.Calls(kleiditest.OpUnwrap)
	for range 100 {
		if _, err := e.Decrypt(ctx, c, nil); !errors.Is(err, kleidi.ErrUnavailable) {
			t.Fatalf("e.Decrypt(c) just after the outage err = %v, want the remembered kleidi.ErrUnavailable", err)
		}
	}
	if n := p.Calls(kleiditest.OpUnwrap) - before; n != 0 {
		t.Errorf("100 repeated Decrypts of a key that just failed made %d unwraps, want 0", n)
	}
	time.Sleep(1100 * time.Millisecond) // an outage is remembered for a second
	if got := decrypt(t, e, c, ""); got != "x" {
		t.Errorf("e.Decrypt(c) a second after the root came back = %q, want %q", got, "x")
	}
}

func TestDecryptCancelled(t *testing.T) {
	p, e, c := retiredKeyCiphertext(t, "x")
	p.SetLatency(time.Minute)
	cctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := e.Decrypt(cctx, c, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("e.Decrypt(c) past its deadline err = %v, want context.DeadlineExceeded", err)
	}
}

func TestAttachedWrappedKey(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	origin := newEnvelope(t, p, kleidi.NewMemoryKeyring())
	c := encrypt(t, origin, "travels", "")

	// A node with a fresh keyring and the same root decrypts with the attached key, once.
	e := newEnvelope(t, p, kleidi.NewMemoryKeyring())
	bare := reparse(t, c)
	if _, err := e.Decrypt(ctx, bare, nil); !errors.Is(err, kleidi.ErrUnknownKey) {
		t.Errorf("e.Decrypt(c without wrapped key) err = %v, want kleidi.ErrUnknownKey", err)
	}
	bare.AttachedKey = c.AttachedKey
	before := p.Calls(kleiditest.OpUnwrap)
	for range 3 {
		if got := decrypt(t, e, bare, ""); got != "travels" {
			t.Errorf("e.Decrypt(c with wrapped key) = %q, want %q", got, "travels")
		}
	}
	if got := p.Calls(kleiditest.OpUnwrap) - before; got != 1 {
		t.Errorf("3 decrypts with an attached key made %d Unwrap calls, want 1", got)
	}
	if s := e.Stats(); s.CacheHits != 2 || s.CacheMisses != 2 {
		t.Errorf("e.Stats() = %+v, want 2 hits, 2 misses (one unknown key, one unwrap)", s)
	}

	// A genuine attached key of another KEK does not pass for this one: its proof names its own key ID, so the
	// root is not even asked.
	before = p.Calls(kleiditest.OpUnwrap)
	other := newEnvelope(t, p, kleidi.NewMemoryKeyring())
	forged := reparse(t, encrypt(t, newEnvelope(t, p, kleidi.NewMemoryKeyring()), "x", ""))
	forged.AttachedKey = encrypt(t, other, "y", "").AttachedKey
	if _, err := e.Decrypt(ctx, forged, nil); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("e.Decrypt(c with another key's attached key) err = %v, want kleidi.ErrUnauthenticated", err)
	}

	// An attached key of another root of trust carries a proof this root does not accept.
	foreign := reparse(t, encrypt(t, newEnvelope(t, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring()), "x", ""))
	foreign.AttachedKey = encrypt(t, newEnvelope(t, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring()), "x", "").AttachedKey
	if _, err := e.Decrypt(ctx, foreign, nil); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("e.Decrypt(c with a foreign attached key) err = %v, want kleidi.ErrUnauthenticated", err)
	}
	if got := p.Calls(kleiditest.OpUnwrap) - before; got != 0 {
		t.Errorf("decrypts with unauthenticated attached keys made %d Unwrap calls, want 0", got)
	}
}

func TestKeyEvents(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	ring := kleidi.NewMemoryKeyring()
	var mu sync.Mutex
	var events []kleidi.KeyEvent
	record := kleidi.WithKeyEvents(func(ev kleidi.KeyEvent) {
		mu.Lock()
		defer mu.Unlock()
		events = append(events, ev)
	})
	e, err := kleidi.NewEnvelope(ctx, p, ring, record, kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatal(err)
	}
	first := e.KeyID()
	c := reparse(t, encrypt(t, e, "x", ""))
	second, err := e.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	fresh, err := kleidi.NewEnvelope(ctx, p, ring, record) // unwraps the active key
	if err != nil {
		t.Fatal(err)
	}
	p.SetError(kleiditest.OpUnwrap, kleidi.ErrUnavailable)
	fresh.Decrypt(ctx, c, nil) // a failed unwrap of the first key
	mu.Lock()
	defer mu.Unlock()
	want := []string{"rotate " + first + " <nil>", "rotate " + second + " <nil>", "reload " + second + " <nil>",
		"unwrap " + second + " <nil>", "unwrap " + first + " unavailable"}
	var got []string
	for _, ev := range events {
		s := ev.Op + " " + ev.KeyID + " <nil>"
		if ev.Err != nil {
			s = ev.Op + " " + ev.KeyID + " " + kleidi.ErrorKind(ev.Err)
		}
		got = append(got, s)
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("key events:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestErrorKind(t *testing.T) {
	for err, want := range map[error]string{
		nil: "ok",
		fmt.Errorf("x: %w", kleidi.ErrUnknownKey):     "unknown_key",
		fmt.Errorf("x: %w", kleidi.ErrUnavailable):    "unavailable",
		fmt.Errorf("x: %w", context.DeadlineExceeded): "deadline_exceeded",
		errors.New("something else"):                  "error",
	} {
		if got := kleidi.ErrorKind(err); got != want {
			t.Errorf("kleidi.ErrorKind(%v) = %q, want %q", err, got, want)
		}
	}
}

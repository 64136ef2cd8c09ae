package kleiditest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/kleidi-kms/kleidi"
)

// TestProvider is the conformance suite of [kleidi.Provider]. Every provider, ours and third parties', runs it:
//
//	func TestConformance(t *testing.T) {
//		kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider { return newTestProvider(t) })
//	}
//
// newProvider is called once per subtest and returns a ready provider; the suite closes it at the end of the
// subtest. Providers returned by successive calls may share a root of trust. The suite checks a round trip of a
// [kleidi.KeySize] key, that tampered, truncated, foreign, empty and oversized blobs are refused with an error
// wrapping [kleidi.ErrUnwrap] and without panic, that no error carries the key, concurrent use, that a cancelled
// context is honoured, Health, and that Close makes later calls fail with [kleidi.ErrClosed]. For a provider that
// is a [kleidi.Authenticator], it checks that its proofs verify, fit [kleidi.MaxProofSize], and that a proof of
// another message, an altered, truncated, empty, oversized or random proof, or an unkeyed SHA-256 of the message,
// is refused with an error wrapping
// [kleidi.ErrUnauthenticated].
//
// With [WithOutage], it also checks that while the root of trust is away, Unwrap and Health fail with errors
// wrapping [kleidi.ErrUnavailable] (so the Envelope retries soon and the server answers Unavailable, not
// Internal), and that the same provider works again once the root is back.
func TestProvider(t *testing.T, newProvider func(t *testing.T) kleidi.Provider, opts ...Option) {
	t.Helper()
	var cfg config
	for _, o := range opts {
		o(&cfg)
	}
	run := func(name string, f func(t *testing.T, p kleidi.Provider)) {
		t.Run(name, func(t *testing.T) {
			p := newProvider(t)
			defer p.Close()
			f(t, p)
		})
	}
	ctx := context.Background()

	run("Name", func(t *testing.T, p kleidi.Provider) {
		if err := kleidi.CheckProviderName(p.Name()); err != nil {
			t.Errorf("CheckProviderName(p.Name()) = %v, want nil", err)
		}
	})

	run("RoundTrip", func(t *testing.T, p kleidi.Provider) {
		key := randomKey(t)
		wrapped, err := p.Wrap(ctx, key)
		if err != nil {
			t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
		}
		if len(wrapped) == 0 || len(wrapped) > kleidi.MaxWrappedKeySize {
			t.Fatalf("len(p.Wrap(ctx, key)) = %d, want 1 to %d", len(wrapped), kleidi.MaxWrappedKeySize)
		}
		if bytes.Contains(wrapped, key) {
			t.Fatalf("p.Wrap(ctx, key) contains the key in clear")
		}
		got, err := p.Unwrap(ctx, wrapped)
		if err != nil {
			t.Fatalf("p.Unwrap(ctx, wrapped) err = %v, want nil", err)
		}
		if !bytes.Equal(got, key) {
			t.Fatalf("p.Unwrap(ctx, p.Wrap(ctx, key)) differs from key")
		}
		// The blob stays valid: unwrapping twice gives the key twice.
		if got, err := p.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
			t.Fatalf("second p.Unwrap(ctx, wrapped) err = %v, equal = %v; want nil, true", err, bytes.Equal(got, key))
		}
	})

	run("EmptyKey", func(t *testing.T, p kleidi.Provider) {
		if _, err := p.Wrap(ctx, nil); err == nil {
			t.Errorf("p.Wrap(ctx, nil) err = nil, want an error")
		}
	})

	run("LargeKey", func(t *testing.T, p kleidi.Provider) {
		// A provider may refuse a key this large, but must not panic, and what it wraps it must unwrap.
		key := make([]byte, 1<<20)
		rand.Read(key)
		wrapped, err := p.Wrap(ctx, key)
		if err != nil {
			return
		}
		got, err := p.Unwrap(ctx, wrapped)
		if err != nil || !bytes.Equal(got, key) {
			t.Errorf("p.Unwrap(ctx, p.Wrap(ctx, 1 MiB key)) err = %v, equal = %v; want nil, true", err, bytes.Equal(got, key))
		}
	})

	run("BadBlobs", func(t *testing.T, p kleidi.Provider) {
		key := randomKey(t)
		wrapped, err := p.Wrap(ctx, key)
		if err != nil {
			t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
		}
		garbage := make([]byte, 1<<20)
		rand.Read(garbage)
		cases := map[string][]byte{
			"empty":           {},
			"nil":             nil,
			"one byte":        {0x01},
			"truncated":       wrapped[:len(wrapped)/2],
			"last byte gone":  wrapped[:len(wrapped)-1],
			"trailing byte":   append(bytes.Clone(wrapped), 0),
			"first flipped":   flip(wrapped, 0),
			"middle flipped":  flip(wrapped, len(wrapped)/2),
			"last flipped":    flip(wrapped, len(wrapped)-1),
			"random 64 bytes": garbage[:64],
			"random 1 MiB":    garbage,
		}
		for name, blob := range cases {
			got, err := p.Unwrap(ctx, blob)
			if !errors.Is(err, kleidi.ErrUnwrap) {
				t.Errorf("p.Unwrap(ctx, %s) err = %v, want an error wrapping kleidi.ErrUnwrap", name, err)
				continue
			}
			if got != nil {
				t.Errorf("p.Unwrap(ctx, %s) returned %d bytes with its error, want nil", name, len(got))
			}
			assertNoSecret(t, err.Error(), key)
		}
		// The provider still works after refusing all of that.
		if got, err := p.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
			t.Errorf("p.Unwrap(ctx, wrapped) after bad blobs err = %v, equal = %v; want nil, true", err, bytes.Equal(got, key))
		}
	})

	run("Concurrent", func(t *testing.T, p kleidi.Provider) {
		const goroutines, rounds = 8, 3
		var wg sync.WaitGroup
		errs := make(chan error, goroutines)
		for range goroutines {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range rounds {
					key := make([]byte, kleidi.KeySize)
					rand.Read(key)
					wrapped, err := p.Wrap(ctx, key)
					if err != nil {
						errs <- err
						return
					}
					got, err := p.Unwrap(ctx, wrapped)
					if err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(got, key) {
						errs <- errors.New("unwrapped key differs")
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Errorf("concurrent wrap/unwrap: %v", err)
		}
	})

	run("CancelledContext", func(t *testing.T, p kleidi.Provider) {
		key := randomKey(t)
		wrapped, err := p.Wrap(ctx, key)
		if err != nil {
			t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
		}
		cancelled, cancel := context.WithCancel(ctx)
		cancel()
		if _, err := p.Wrap(cancelled, key); !errors.Is(err, context.Canceled) {
			t.Errorf("p.Wrap(cancelled, key) err = %v, want an error wrapping context.Canceled", err)
		}
		if got, err := p.Unwrap(cancelled, wrapped); !errors.Is(err, context.Canceled) || got != nil {
			t.Errorf("p.Unwrap(cancelled, wrapped) = %d bytes, %v; want nil, an error wrapping context.Canceled", len(got), err)
		}
		if got, err := p.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
			t.Errorf("p.Unwrap(ctx, wrapped) after cancelled calls err = %v, want nil", err)
		}
	})

	run("Health", func(t *testing.T, p kleidi.Provider) {
		if err := p.Health(ctx); err != nil {
			t.Errorf("p.Health(ctx) = %v, want nil", err)
		}
	})

	run("Authenticator", func(t *testing.T, p kleidi.Provider) {
		auth, ok := p.(kleidi.Authenticator)
		if !ok {
			t.Skipf("%T is not a kleidi.Authenticator: attached keys are never unwrapped with it", p)
		}
		message := []byte("kleidi conformance: a wrapped key and its key ID")
		proof, err := auth.Prove(ctx, message)
		if err != nil {
			t.Fatalf("p.Prove(ctx, message) err = %v, want nil", err)
		}
		if len(proof) == 0 || len(proof) > kleidi.MaxProofSize {
			t.Fatalf("len(p.Prove(ctx, message)) = %d, want 1 to %d", len(proof), kleidi.MaxProofSize)
		}
		if err := auth.Verify(ctx, message, proof); err != nil {
			t.Fatalf("p.Verify(ctx, message, p.Prove(message)) = %v, want nil", err)
		}
		random := make([]byte, len(proof))
		rand.Read(random)
		digest := sha256.Sum256(message) // what anyone can compute: a proof must need the root's secret
		for name, c := range map[string]struct{ message, proof []byte }{
			"another message": {append(bytes.Clone(message), '!'), proof},
			"altered message": {flip(message, 0), proof},
			"altered proof":   {message, flip(proof, len(proof)-1)},
			"truncated proof": {message, proof[:len(proof)-1]},
			"empty proof":     {message, nil},
			"oversized proof": {message, make([]byte, kleidi.MaxProofSize+1)},
			"random proof":    {message, random},
			"unkeyed digest":  {message, digest[:]},
		} {
			if err := auth.Verify(ctx, c.message, c.proof); !errors.Is(err, kleidi.ErrUnauthenticated) {
				t.Errorf("p.Verify(ctx, %s) = %v, want an error wrapping kleidi.ErrUnauthenticated", name, err)
			}
		}
	})

	run("Outage", func(t *testing.T, p kleidi.Provider) {
		if cfg.outage == nil {
			t.Skip("no outage hook: pass kleiditest.WithOutage to prove the provider reports kleidi.ErrUnavailable")
		}
		key := randomKey(t)
		wrapped, err := p.Wrap(ctx, key)
		if err != nil {
			t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
		}
		restore := cfg.outage(t, p)
		if got, err := p.Unwrap(ctx, wrapped); !errors.Is(err, kleidi.ErrUnavailable) || errors.Is(err, kleidi.ErrUnwrap) || got != nil {
			t.Errorf("p.Unwrap(ctx, wrapped) with the root away = %d bytes, %v; want an error wrapping kleidi.ErrUnavailable, not kleidi.ErrUnwrap", len(got), err)
		}
		if err := p.Health(ctx); !errors.Is(err, kleidi.ErrUnavailable) {
			t.Errorf("p.Health(ctx) with the root away = %v, want an error wrapping kleidi.ErrUnavailable", err)
		}
		restore()
		if got, err := p.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
			t.Errorf("p.Unwrap(ctx, wrapped) once the root is back err = %v, want nil (without a new provider)", err)
		}
		if err := p.Health(ctx); err != nil {
			t.Errorf("p.Health(ctx) once the root is back = %v, want nil", err)
		}
	})

	run("Close", func(t *testing.T, p kleidi.Provider) {
		key := randomKey(t)
		wrapped, err := p.Wrap(ctx, key)
		if err != nil {
			t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
		}
		if err := p.Close(); err != nil {
			t.Fatalf("p.Close() = %v, want nil", err)
		}
		if got, err := p.Unwrap(ctx, wrapped); !errors.Is(err, kleidi.ErrClosed) || got != nil {
			t.Errorf("p.Unwrap(ctx, wrapped) after Close = %d bytes, %v; want nil, an error wrapping kleidi.ErrClosed", len(got), err)
		}
		if _, err := p.Wrap(ctx, key); !errors.Is(err, kleidi.ErrClosed) {
			t.Errorf("p.Wrap(ctx, key) after Close err = %v, want an error wrapping kleidi.ErrClosed", err)
		}
		if err := p.Health(ctx); err == nil {
			t.Errorf("p.Health(ctx) after Close = nil, want an error")
		}
		if err := p.Close(); err != nil {
			t.Errorf("second p.Close() = %v, want nil", err)
		}
	})
}

func randomKey(t *testing.T) []byte {
	t.Helper()
	key := make([]byte, kleidi.KeySize)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	return key
}

func flip(b []byte, i int) []byte {
	c := bytes.Clone(b)
	c[i] ^= 0x01
	return c
}

// assertNoSecret fails t if text holds secret raw, in hex or in base64.
func assertNoSecret(t *testing.T, text string, secret []byte) {
	t.Helper()
	for _, form := range []string{
		string(secret),
		hex.EncodeToString(secret),
		strings.ToUpper(hex.EncodeToString(secret)),
		base64.StdEncoding.EncodeToString(secret),
		base64.RawURLEncoding.EncodeToString(secret),
	} {
		if strings.Contains(text, form) {
			t.Errorf("text %q holds a secret", text)
			return
		}
	}
}

// Option configures [TestProvider].
type Option func(*config)

type config struct {
	outage func(t *testing.T, p kleidi.Provider) (restore func())
}

// WithOutage gives [TestProvider] a way to take the provider's root of trust away (stop the TPM emulator, the
// KMS endpoint, remove the token): cut does it and returns restore, which brings the root back.
func WithOutage(cut func(t *testing.T, p kleidi.Provider) (restore func())) Option {
	return func(c *config) { c.outage = cut }
}

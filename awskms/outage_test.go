package awskms

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi"
)

// TestOutageAndRecovery stops AWS KMS while a provider uses it: every call fails with kleidi.ErrUnavailable
// within the provider's timeout, proofs keep verifying, and once AWS KMS is back the same provider works again.
func TestOutageAndRecovery(t *testing.T) {
	ctx := context.Background()
	s, err := startLocalKMS(t.TempDir(), "0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.stop() }()
	const timeout = 3 * time.Second
	p := newTestProvider(t, s.endpoint(), mustCreateKeys(t, s.endpoint()), func(c *Config) { c.Timeout = timeout; c.MaxAttempts = 3 })
	key := randomKey(t)
	wrapped, err := p.Wrap(ctx, key)
	if err != nil {
		t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
	}
	message := []byte("a wrapped key and its key ID")
	proof, err := p.Prove(ctx, message)
	if err != nil {
		t.Fatalf("p.Prove(ctx, message) err = %v, want nil", err)
	}
	if err := p.Health(ctx); err != nil {
		t.Fatalf("p.Health(ctx) = %v, want nil", err)
	}

	s.stop()
	for name, call := range map[string]func() error{
		"Unwrap": func() error { _, err := p.Unwrap(ctx, wrapped); return err },
		"Wrap":   func() error { _, err := p.Wrap(ctx, key); return err },
		"Health": func() error { return p.Health(ctx) },
		"Prove":  func() error { _, err := p.Prove(ctx, message); return err },
	} {
		start := time.Now()
		err := call()
		if !errors.Is(err, kleidi.ErrUnavailable) {
			t.Errorf("%s with AWS KMS stopped err = %v, want an error wrapping kleidi.ErrUnavailable", name, err)
		}
		if d := time.Since(start); d > timeout+time.Second {
			t.Errorf("%s with AWS KMS stopped took %v, want at most the timeout %v", name, d, timeout)
		}
	}
	// The caller's deadline bounds the retries, however many are allowed.
	patient := newTestProvider(t, s.endpoint(), sharedKeys, func(c *Config) { c.Timeout = time.Minute; c.MaxAttempts = 1000 })
	short, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	start := time.Now()
	_, err = patient.Unwrap(short, wrapped)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 1500*time.Millisecond {
		t.Errorf("patient.Unwrap(a 500 ms context) with AWS KMS stopped = %v after %v, want context.DeadlineExceeded within 1.5 s", err, time.Since(start))
	}
	if err := p.Verify(ctx, message, proof); err != nil {
		t.Errorf("p.Verify(ctx, message, proof) with AWS KMS stopped = %v, want nil", err)
	}

	if err := s.restart(); err != nil {
		t.Fatal(err)
	}
	if got, err := p.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("p.Unwrap(ctx, wrapped) after the restart err = %v, want nil", err)
	}
	if err := p.Health(ctx); err != nil {
		t.Errorf("p.Health(ctx) after the restart = %v, want nil", err)
	}
	if _, err := p.Prove(ctx, message); err != nil {
		t.Errorf("p.Prove(ctx, message) after the restart err = %v, want nil", err)
	}
}

// TestFirstVerifyDuringAnOutage: a provider that never fetched the public key reports kleidi.ErrUnavailable (not
// a forgery) while AWS KMS is down, asks AWS KMS at most once a second meanwhile, and verifies once it is back.
func TestFirstVerifyDuringAnOutage(t *testing.T) {
	ctx := context.Background()
	s, err := startLocalKMS(t.TempDir(), "0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.stop() }()
	keys := mustCreateKeys(t, s.endpoint())
	message := []byte("m")
	proof, err := newTestProvider(t, s.endpoint(), keys).Prove(ctx, message)
	if err != nil {
		t.Fatalf("Prove err = %v, want nil", err)
	}
	p := newTestProvider(t, s.endpoint(), keys, func(c *Config) { c.Timeout = 2 * time.Second; c.MaxAttempts = 2 })
	s.stop()
	start := time.Now()
	for range 1000 {
		if err := p.Verify(ctx, message, proof); !errors.Is(err, kleidi.ErrUnavailable) || errors.Is(err, kleidi.ErrUnauthenticated) {
			t.Fatalf("p.Verify with AWS KMS stopped = %v, want an error wrapping kleidi.ErrUnavailable only", err)
		}
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("1000 Verify calls with AWS KMS stopped took %v: failures must be remembered", d)
	}
	if err := s.restart(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(proofRetryInterval)
	if err := p.Verify(ctx, message, proof); err != nil {
		t.Errorf("p.Verify after the restart = %v, want nil", err)
	}
}

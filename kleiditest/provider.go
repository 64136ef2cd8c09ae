// Package kleiditest holds test helpers for kleidi: an insecure in-memory [Provider] that counts its calls and
// injects errors and latency, and [TestProvider], the conformance suite every [kleidi.Provider] passes.
//
// Nothing in this package protects anything. Never use it outside tests and examples.
package kleiditest

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kleidi-kms/kleidi"
)

// Op names a [Provider] operation, for counting calls and injecting errors.
type Op int

// The operations of a [Provider].
const (
	OpWrap Op = iota
	OpUnwrap
	OpHealth
	OpProve
	OpVerify
	numOps
)

func (o Op) String() string {
	switch o {
	case OpWrap:
		return "wrap"
	case OpUnwrap:
		return "unwrap"
	case OpHealth:
		return "health"
	case OpProve:
		return "prove"
	case OpVerify:
		return "verify"
	}
	return fmt.Sprintf("Op(%d)", int(o))
}

// Provider is an insecure in-memory root of trust: it wraps keys with AES-256-GCM under a random root key
// that lives only in this process, and proves messages with HMAC-SHA256 under a key derived from it (it is a
// [kleidi.Authenticator]). Two Providers cannot unwrap or verify each other's keys. It counts its calls and
// can be told to fail or to be slow.
type Provider struct {
	name     string
	aead     cipher.AEAD
	proofKey []byte
	calls    [numOps]atomic.Int64

	mu      sync.Mutex
	errs    [numOps]error
	latency time.Duration
	closed  bool
}

var (
	_ kleidi.Provider      = (*Provider)(nil)
	_ kleidi.Authenticator = (*Provider)(nil)
)

// NewInsecureProvider returns a Provider named "insecure" with a fresh random root key.
func NewInsecureProvider() *Provider {
	root := make([]byte, 32)
	if _, err := rand.Read(root); err != nil {
		panic(err)
	}
	return NewInsecureProviderWithRoot(root)
}

// NewInsecureProviderWithRoot returns a Provider named "insecure" whose root key is root (32 bytes), so that
// several processes of a test share one root of trust.
func NewInsecureProviderWithRoot(root []byte) *Provider {
	block, err := aes.NewCipher(root)
	if err != nil {
		panic(err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	mac := hmac.New(sha256.New, root)
	mac.Write([]byte("kleiditest proof key"))
	return &Provider{name: "insecure", aead: aead, proofKey: mac.Sum(nil)}
}

// Calls returns how many times op was called, failed calls included.
func (p *Provider) Calls(op Op) int { return int(p.calls[op].Load()) }

// SetError makes every later call of op return err (nil restores normal behaviour).
func (p *Provider) SetError(op Op, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.errs[op] = err
}

// SetLatency makes every later call wait d first (or until its context ends).
func (p *Provider) SetLatency(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.latency = d
}

// Name returns "insecure".
func (p *Provider) Name() string { return p.name }

func (p *Provider) enter(ctx context.Context, op Op) error {
	p.calls[op].Add(1)
	p.mu.Lock()
	err, latency, closed := p.errs[op], p.latency, p.closed
	p.mu.Unlock()
	if closed {
		return fmt.Errorf("kleiditest: %v: %w", op, kleidi.ErrClosed)
	}
	if latency > 0 {
		t := time.NewTimer(latency)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
		}
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("kleiditest: %v: %w", op, err)
	}
	if err != nil {
		return fmt.Errorf("kleiditest: %v: %w", op, err)
	}
	return nil
}

// Wrap seals key under the provider's root key.
func (p *Provider) Wrap(ctx context.Context, key []byte) ([]byte, error) {
	if err := p.enter(ctx, OpWrap); err != nil {
		return nil, err
	}
	if len(key) == 0 || len(key) > 1024 {
		return nil, fmt.Errorf("kleiditest: wrap: key of %d bytes, want 1 to 1024", len(key))
	}
	nonce := make([]byte, p.aead.NonceSize(), p.aead.NonceSize()+len(key)+p.aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("kleiditest: wrap: %w", err)
	}
	return p.aead.Seal(nonce, nonce, key, []byte("kleiditest")), nil
}

// Unwrap opens a blob sealed by Wrap of this Provider.
func (p *Provider) Unwrap(ctx context.Context, wrapped []byte) ([]byte, error) {
	if err := p.enter(ctx, OpUnwrap); err != nil {
		return nil, err
	}
	n := p.aead.NonceSize()
	if len(wrapped) < n+p.aead.Overhead() {
		return nil, fmt.Errorf("kleiditest: unwrap: blob of %d bytes is too short: %w", len(wrapped), kleidi.ErrUnwrap)
	}
	key, err := p.aead.Open(nil, wrapped[:n], wrapped[n:], []byte("kleiditest"))
	if err != nil {
		return nil, fmt.Errorf("kleiditest: unwrap: authentication failed: %w", kleidi.ErrUnwrap)
	}
	return key, nil
}

// Health returns nil unless an error is injected for [OpHealth] or the provider is closed.
func (p *Provider) Health(ctx context.Context) error { return p.enter(ctx, OpHealth) }

// Close makes every later call fail with [kleidi.ErrClosed].
func (p *Provider) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	return nil
}

// Prove returns HMAC-SHA256 of message under the provider's proof key.
func (p *Provider) Prove(ctx context.Context, message []byte) ([]byte, error) {
	if err := p.enter(ctx, OpProve); err != nil {
		return nil, err
	}
	return p.mac(message), nil
}

// Verify checks a proof made by Prove of this Provider. It never waits for an injected latency or fails with
// an injected error: verifying is local.
func (p *Provider) Verify(ctx context.Context, message, proof []byte) error {
	p.calls[OpVerify].Add(1)
	if !hmac.Equal(p.mac(message), proof) {
		return fmt.Errorf("kleiditest: verify: %w", kleidi.ErrUnauthenticated)
	}
	return nil
}

func (p *Provider) mac(message []byte) []byte {
	m := hmac.New(sha256.New, p.proofKey)
	m.Write(message)
	return m.Sum(nil)
}

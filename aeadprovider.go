package kleidi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"syscall"
)

// AEADRoot is a root of trust that encrypts and decrypts bytes with associated data: a cloud KMS key, an HSM's
// AES key, a key in a file. Its errors may be raw (network, driver): [NewAEADProvider] classifies them. If it is
// an [io.Closer], the provider closes it.
type AEADRoot interface {
	Encrypt(ctx context.Context, plaintext, associatedData []byte) ([]byte, error)
	Decrypt(ctx context.Context, ciphertext, associatedData []byte) ([]byte, error)
}

// AEADOption configures [NewAEADProvider].
type AEADOption func(*aeadProvider)

// WithUnavailable sets how the provider tells an unreachable root from a refusal: errors for which unavailable
// returns true are reported as [ErrUnavailable]. The default treats network errors (net.Error, connection
// refused or reset, a closed pipe) and deadlines as unavailable, and any other error of Decrypt as a refusal,
// [ErrUnwrap].
func WithUnavailable(unavailable func(error) bool) AEADOption {
	return func(p *aeadProvider) { p.unavailable = unavailable }
}

// WithHealth sets the provider's health check. The default encrypts and decrypts a probe with the root.
func WithHealth(health func(ctx context.Context) error) AEADOption {
	return func(p *aeadProvider) { p.health = health }
}

// NewAEADProvider returns the [Provider] named name whose root of trust is root, with the whole [Provider]
// contract taken care of: the closed state, contexts, sizes (keys of 1 to [KeySize]*32 bytes, blobs of at most
// [MaxWrappedKeySize]), and errors classified as [ErrUnwrap] or [ErrUnavailable] without any key in them. Every
// wrapped key is bound to name as associated data, so the blob of another provider on the same root does not
// unwrap. The result is not an [Authenticator]: a provider that can prove its copies implements Prove and
// Verify itself.
func NewAEADProvider(name string, root AEADRoot, opts ...AEADOption) (Provider, error) {
	if err := CheckProviderName(name); err != nil {
		return nil, err
	}
	if root == nil {
		return nil, errors.New("kleidi: NewAEADProvider needs a root")
	}
	p := &aeadProvider{name: name, root: root, ad: []byte("kleidi wrapped key\x00" + name), unavailable: isUnavailable}
	for _, o := range opts {
		o(p)
	}
	return p, nil
}

type aeadProvider struct {
	name        string
	root        AEADRoot
	ad          []byte
	unavailable func(error) bool
	health      func(ctx context.Context) error
	closed      atomic.Bool
}

// maxAEADKey bounds the keys an AEAD provider wraps: far above a KEK, far below what could hurt.
const maxAEADKey = KeySize * 32

func (p *aeadProvider) Name() string { return p.name }

func (p *aeadProvider) enter(ctx context.Context, op string) error {
	if p.closed.Load() {
		return fmt.Errorf("%s: %s: %w", p.name, op, ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %s: %w", p.name, op, err)
	}
	return nil
}

// classify wraps err of op: context errors as they are, unavailable roots as ErrUnavailable, else refusal.
func (p *aeadProvider) classify(op string, err error, refusal error) error {
	switch {
	case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%s: %s: %w: %w", p.name, op, ErrUnavailable, err)
	case errors.Is(err, ErrUnavailable) || p.unavailable(err):
		return fmt.Errorf("%s: %s: %w: %v", p.name, op, ErrUnavailable, err)
	case refusal != nil:
		return fmt.Errorf("%s: %s: %w: %v", p.name, op, refusal, err)
	}
	return fmt.Errorf("%s: %s: %w", p.name, op, err)
}

func (p *aeadProvider) Wrap(ctx context.Context, key []byte) ([]byte, error) {
	if err := p.enter(ctx, "wrap"); err != nil {
		return nil, err
	}
	if len(key) == 0 || len(key) > maxAEADKey {
		return nil, fmt.Errorf("%s: wrap: key of %d bytes, want 1 to %d: %w", p.name, len(key), maxAEADKey, ErrTooLarge)
	}
	blob, err := p.root.Encrypt(ctx, key, p.ad)
	if err != nil {
		return nil, p.classify("wrap", err, nil)
	}
	if len(blob) == 0 || len(blob) > MaxWrappedKeySize {
		return nil, fmt.Errorf("%s: wrap: the root returned %d bytes, want 1 to %d", p.name, len(blob), MaxWrappedKeySize)
	}
	return blob, nil
}

func (p *aeadProvider) Unwrap(ctx context.Context, wrapped []byte) ([]byte, error) {
	if err := p.enter(ctx, "unwrap"); err != nil {
		return nil, err
	}
	if len(wrapped) == 0 || len(wrapped) > MaxWrappedKeySize {
		return nil, fmt.Errorf("%s: unwrap: blob of %d bytes: %w", p.name, len(wrapped), ErrUnwrap)
	}
	key, err := p.root.Decrypt(ctx, wrapped, p.ad)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s: unwrap: %w", p.name, ctx.Err())
		}
		return nil, p.classify("unwrap", err, ErrUnwrap)
	}
	if len(key) == 0 || len(key) > maxAEADKey {
		clear(key)
		return nil, fmt.Errorf("%s: unwrap: the root returned a key of %d bytes: %w", p.name, len(key), ErrUnwrap)
	}
	return key, nil
}

func (p *aeadProvider) Health(ctx context.Context) error {
	if err := p.enter(ctx, "health"); err != nil {
		return err
	}
	if p.health != nil {
		if err := p.health(ctx); err != nil {
			return p.classify("health", err, nil)
		}
		return nil
	}
	probe := []byte("kleidi health probe")
	blob, err := p.root.Encrypt(ctx, probe, p.ad)
	if err != nil {
		return p.classify("health", err, nil)
	}
	if _, err := p.root.Decrypt(ctx, blob, p.ad); err != nil {
		return p.classify("health", err, nil)
	}
	return nil
}

func (p *aeadProvider) Close() error {
	if p.closed.Swap(true) {
		return nil
	}
	if c, ok := p.root.(io.Closer); ok {
		return c.Close()
	}
	return nil
}

// isUnavailable reports whether err says the root could not be reached.
func isUnavailable(err error) bool {
	var netErr net.Error
	return errors.As(err, &netErr) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, io.ErrClosedPipe) || errors.Is(err, net.ErrClosed)
}

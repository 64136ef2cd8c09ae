package kleidi

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"time"
)

// ProofKeySize is the size of a [ProofKey]'s key and of the proofs it makes: HMAC-SHA256.
const ProofKeySize = sha256.Size

// proofKeyRetry is how long a [ProofKey] returns a failed derivation again before it asks the root once more.
const proofKeyRetry = time.Second

// ProofKey makes and checks the proofs of an [Authenticator] whose root of trust can derive a secret that only its
// legitimate holders can derive, the same every time (a TPM's HMAC under its policy, a token's non-extractable
// key): a proof is HMAC-SHA256 of the message under that secret. It derives the secret at its first use;
// concurrent first uses share one derivation; a failed derivation is returned again for a second without asking
// the root (unless its context ended), so a flood of Verify calls while the root is away costs at most one call
// per second; once derived, the secret stays in memory and Prove and Verify never call the root. Close zeroes it.
// A ProofKey is safe for concurrent use.
type ProofKey struct {
	derive func(context.Context) ([]byte, error)

	mu     sync.Mutex
	key    []byte // nil until derived
	err    error  // the last derivation failure, returned again until retry
	retry  time.Time
	closed bool
}

// NewProofKey returns a ProofKey whose secret derive computes with the root of trust: [ProofKeySize] bytes,
// which the ProofKey zeroes at Close.
func NewProofKey(derive func(ctx context.Context) ([]byte, error)) *ProofKey {
	return &ProofKey{derive: derive}
}

// Prove returns the proof of message: HMAC-SHA256 under the secret, [ProofKeySize] bytes.
func (k *ProofKey) Prove(ctx context.Context, message []byte) ([]byte, error) {
	return k.mac(ctx, message)
}

// Verify returns nil if proof is what Prove gives for message, and otherwise an error wrapping
// [ErrUnauthenticated]. A proof of another size is refused without deriving the secret. When the secret cannot be
// derived, it returns the derivation's error (which should wrap [ErrUnavailable] for a root that cannot be
// reached).
func (k *ProofKey) Verify(ctx context.Context, message, proof []byte) error {
	if len(proof) != ProofKeySize {
		return fmt.Errorf("%w: a proof of %d bytes, want %d", ErrUnauthenticated, len(proof), ProofKeySize)
	}
	mac, err := k.mac(ctx, message)
	if err != nil {
		return err
	}
	if !hmac.Equal(mac, proof) {
		return fmt.Errorf("%w: the proof was not made with this root's proof key", ErrUnauthenticated)
	}
	return nil
}

// Close zeroes the secret; later calls fail with an error wrapping [ErrClosed]. It is idempotent.
func (k *ProofKey) Close() {
	k.mu.Lock()
	defer k.mu.Unlock()
	clear(k.key)
	k.key, k.closed = nil, true
}

// mac returns HMAC-SHA256(secret, message), deriving the secret first if need be. The HMAC is computed under the
// lock, so Close never zeroes the secret while it is in use.
func (k *ProofKey) mac(ctx context.Context, message []byte) ([]byte, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	switch {
	case k.closed:
		return nil, ErrClosed
	case k.key == nil && k.err != nil && time.Now().Before(k.retry):
		return nil, k.err
	case k.key == nil:
		key, err := k.derive(ctx)
		if err == nil && len(key) != ProofKeySize {
			clear(key)
			err = fmt.Errorf("%w: the root derived a proof key of %d bytes, want %d", ErrUnavailable, len(key), ProofKeySize)
		}
		if err != nil {
			if !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
				k.err, k.retry = err, time.Now().Add(proofKeyRetry)
			}
			return nil, err
		}
		k.key, k.err = key, nil
	}
	m := hmac.New(sha256.New, k.key)
	m.Write(message)
	return m.Sum(nil), nil
}

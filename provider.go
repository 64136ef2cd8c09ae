package kleidi

import (
	"context"
	"fmt"
)

// Provider is a root of trust that protects key-encryption keys (KEKs). It wraps a KEK so that only this root can
// unwrap it, and it never sees the data the KEK protects. The [Envelope] calls Unwrap at most once per KEK and
// process, so a provider may be slow.
//
// The contract, which the conformance suite kleiditest.TestProvider checks:
//   - Name matches [a-z0-9]{1,16} and never changes.
//   - Wrap refuses an empty key with an error; it may refuse a key larger than it supports, but what it wraps,
//     Unwrap returns byte for byte, as often as asked. A wrapped key holds no byte of the key in clear and is at
//     most [MaxWrappedKeySize] bytes.
//   - Unwrap of a blob it did not make, or that was altered, truncated, empty or oversized, fails with an error
//     wrapping [ErrUnwrap], never a panic, and never returns a key.
//   - When the root of trust cannot be reached (a device gone, a network partition, a token removed), Unwrap and
//     Health fail with errors wrapping [ErrUnavailable], not [ErrUnwrap]: the Envelope then retries within a
//     second and the KMS server answers Unavailable rather than Internal. A raw network or driver error must be
//     wrapped so. The same provider works again once the root is back, without being recreated.
//   - A cancelled or expired context makes a call return promptly with an error wrapping ctx.Err().
//   - No error, and no String or GoString output, holds a key, a passphrase or a PIN.
//   - Every method is safe for concurrent use. After Close, Wrap and Unwrap fail with errors wrapping
//     [ErrClosed] and Health with an error; Close is idempotent and returns nil the second time.
//
// Implementations prove the interface at compile time:
//
//	var _ kleidi.Provider = (*Provider)(nil)
//
// A provider around a root that encrypts and decrypts bytes (a KMS, an HSM key) gets all of the above from
// [NewAEADProvider]. Optional capabilities: [Authenticator] (ciphertexts that carry their KEK) and [Node] (a
// keyring shared by several nodes).
type Provider interface {
	// Name is a short lower-case name ("tpm", "gpg") used in key IDs, metrics and audit records.
	Name() string
	// Wrap protects key so that only this root of trust can recover it.
	Wrap(ctx context.Context, key []byte) ([]byte, error)
	// Unwrap recovers a key wrapped by Wrap. A blob this root cannot or will not unwrap gives an error that wraps
	// [ErrUnwrap]; a root that cannot be reached gives an error that wraps [ErrUnavailable].
	Unwrap(ctx context.Context, wrapped []byte) ([]byte, error)
	// Health returns nil when Unwrap would work now. It is cheap enough to call every few seconds.
	Health(ctx context.Context) error
	// Close releases the root of trust and forgets any secret the provider holds. Later calls return an error
	// that wraps [ErrClosed]. Close is idempotent.
	Close() error
}

// CheckProviderName returns an error unless name is a valid [Provider.Name].
func CheckProviderName(name string) error {
	if name == "" || len(name) > MaxProviderNameSize {
		return fmt.Errorf("kleidi: provider name %q: must be 1 to %d characters", name, MaxProviderNameSize)
	}
	for _, c := range []byte(name) {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			return fmt.Errorf("kleidi: provider name %q: only a-z and 0-9 are allowed", name)
		}
	}
	return nil
}

// Authenticator is the capability of a [Provider] to prove that a wrapped KEK was made by a legitimate holder of
// its root of trust, and to check such a proof. The [Envelope] proves every wrapped copy it makes and, before it
// asks the root to unwrap a copy that arrived from outside (a ciphertext's attached key, a keyring entry), checks
// its proof, so that a party that knows every public key of the root, and can write etcd, still cannot make the
// Envelope accept a KEK it chose: it cannot make a proof.
//
// A provider that is not an Authenticator works with keyring entries only: [Envelope.Decrypt] then never unwraps
// an attached key.
type Authenticator interface {
	// Prove returns a proof over message that only a legitimate holder of the root of trust can make: a holder of
	// the private key, of the TPM under its configured policy. It may call the root of trust.
	Prove(ctx context.Context, message []byte) ([]byte, error)
	// Verify returns nil if proof is a proof over message made by a legitimate holder of this root of trust, and
	// otherwise an error wrapping [ErrUnauthenticated] (or [ErrUnavailable] when the root cannot be reached to
	// learn what it needs). It must be cheap: after its first call it never calls the root of trust, since it runs
	// on bytes an attacker sends, before any unwrap.
	Verify(ctx context.Context, message, proof []byte) error
}

// MaxProofSize is the largest proof an [Authenticator] may return.
const MaxProofSize = 2048

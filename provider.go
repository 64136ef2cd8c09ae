package kleidi

import (
	"context"
	"fmt"
)

// Provider is a root of trust that protects key-encryption keys (KEKs). It wraps a KEK so that only this root can
// unwrap it, and it never sees the data the KEK protects. The [Envelope] calls Unwrap at most once per KEK and
// process, so a provider may be slow.
//
// Implementations are safe for concurrent use and prove it at compile time:
//
//	var _ kleidi.Provider = (*Provider)(nil)
//
// and pass the conformance suite kleiditest.TestProvider.
type Provider interface {
	// Name is a short lower-case name ("tpm", "gpg") used in key IDs, metrics and audit records.
	// It matches [a-z0-9]{1,16} and never changes.
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

package kleidi

import (
	"context"
	"errors"
)

// Version is the version of this module, reported by the KMS plugin and in build information.
const Version = "0.1.0"

// Limits of the formats of this package.
const (
	// KeySize is the size in bytes of a key-encryption key (AES-256).
	KeySize = 32
	// MaxKeyIDSize is the longest key ID, in bytes.
	MaxKeyIDSize = 128
	// MaxPlaintextSize is the largest plaintext [Envelope.Encrypt] accepts: 1 MiB, the size of the largest
	// Kubernetes object.
	MaxPlaintextSize = 1 << 20
	// MaxWrappedKeySize is the largest wrapped KEK a provider may produce or a keyring may hold.
	MaxWrappedKeySize = 16 << 10
	// MaxProviderNameSize is the longest provider name.
	MaxProviderNameSize = 16
)

// Sentinel errors. Errors returned by this module wrap one of them with the operation for context, and carry the
// "kleidi: " prefix once, where they are made; compare with [errors.Is].
var (
	// ErrInvalidCiphertext means the bytes are not a ciphertext of a format this package knows.
	ErrInvalidCiphertext = errors.New("invalid ciphertext")
	// ErrDecrypt means authentication failed: the ciphertext, its key or its associated data was altered.
	ErrDecrypt = errors.New("decryption failed")
	// ErrUnknownKey means the ciphertext names a key that is neither in the keyring nor attached to it.
	ErrUnknownKey = errors.New("unknown key")
	// ErrKeyMismatch means a wrapped key unwrapped to a key whose identity is not the key ID it claimed.
	ErrKeyMismatch = errors.New("key does not match its key ID")
	// ErrUnauthenticated means a wrapped key carries no valid proof that a legitimate holder of the root of trust
	// made it (see [Authenticator]): it was forged, or made by another root.
	ErrUnauthenticated = errors.New("wrapped key not authenticated")
	// ErrUnwrap means the provider refused to unwrap a key: it was wrapped by another root of trust,
	// tampered with, or the root's policy (a PCR, a passphrase) no longer allows it.
	ErrUnwrap = errors.New("unwrap refused")
	// ErrUnavailable means the root of trust cannot be reached now (a TPM that went away); retrying later may work.
	ErrUnavailable = errors.New("root of trust unavailable")
	// ErrInvalidKeyring means a keyring is truncated, corrupt or of a version this package does not know.
	ErrInvalidKeyring = errors.New("invalid keyring")
	// ErrKeyExhausted means a KEK encrypted as many messages as it safely can (see [MaxEncryptionsPerKey]).
	ErrKeyExhausted = errors.New("key usage limit reached")
	// ErrTooLarge means an input exceeds a limit of this package.
	ErrTooLarge = errors.New("input too large")
	// ErrClosed means the provider or the Envelope was closed.
	ErrClosed = errors.New("closed")
)

// ErrorKind names the class of err for audit records and metric labels, from a small fixed set: "ok" (nil),
// "invalid_ciphertext", "decrypt_failed", "unknown_key", "key_mismatch", "unauthenticated", "unwrap_refused", "unavailable",
// "invalid_keyring", "key_exhausted", "too_large", "closed", "canceled", "deadline_exceeded" or "error". It never returns the
// error's message.
func ErrorKind(err error) string {
	for _, k := range errorKinds {
		if errors.Is(err, k.err) {
			return k.kind
		}
	}
	if err == nil {
		return "ok"
	}
	return "error"
}

var errorKinds = []struct {
	err  error
	kind string
}{
	// First the kinds that say "try again later": an error joined from an outage and a refusal (one copy's root
	// away, another refused) is an outage, so the caller retries rather than giving up.
	{ErrUnavailable, "unavailable"},
	{ErrClosed, "closed"},
	{ErrInvalidCiphertext, "invalid_ciphertext"},
	{ErrDecrypt, "decrypt_failed"},
	{ErrUnknownKey, "unknown_key"},
	{ErrKeyMismatch, "key_mismatch"},
	{ErrUnauthenticated, "unauthenticated"},
	{ErrUnwrap, "unwrap_refused"},
	{ErrInvalidKeyring, "invalid_keyring"},
	{ErrKeyExhausted, "key_exhausted"},
	{ErrTooLarge, "too_large"},
	{context.Canceled, "canceled"},
	{context.DeadlineExceeded, "deadline_exceeded"},
}

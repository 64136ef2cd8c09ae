package gpg

import (
	"errors"
	"fmt"
)

// Errors returned by [New], [GenerateKey] and [GenerateDevelopmentKey] wrap one of these, with the source of
// the key (a file or a field of [Config]), the key and the problem for context; compare with [errors.Is].
// Errors of Wrap, Unwrap, Health, Prove and Verify wrap the sentinel errors of package kleidi instead (kleidi.ErrUnwrap, kleidi.ErrUnauthenticated, kleidi.ErrClosed), and
// ErrNoPrivateKey, ErrNoSigningKey or ErrRecipientRemoved where it applies.
var (
	// ErrInvalidKey means a file or a byte slice holds no OpenPGP key this package can read (garbage, a
	// truncated file, an unsupported or weak algorithm, a key without a valid self-signature), or Config is
	// inconsistent (no key, or two sources of the same thing).
	ErrInvalidKey = errors.New("invalid key")
	// ErrKeyExpired means a key, or every encryption subkey it has, is past its expiration date.
	ErrKeyExpired = errors.New("key expired")
	// ErrKeyRevoked means a key, or every encryption subkey it has, is revoked.
	ErrKeyRevoked = errors.New("key revoked")
	// ErrNoEncryptionKey means a key has no valid key or subkey that may encrypt (a signing-only key).
	ErrNoEncryptionKey = errors.New("no encryption key")
	// ErrNotPrivateKey means a file that must hold a private key holds only a public key, or only stubs of
	// private keys (as gpg --export-secret-subkeys writes for the primary key).
	ErrNotPrivateKey = errors.New("not a private key")
	// ErrNotPublicKey means a key that must be only public, such as a recovery key given to
	// [RecipientIdentity], holds a private key: its private half must stay offline.
	ErrNotPublicKey = errors.New("not a public key")
	// ErrPassphraseRequired means a private key is protected by a passphrase and Config names none, or
	// [GenerateKey] was given an empty passphrase.
	ErrPassphraseRequired = errors.New("passphrase required")
	// ErrWrongPassphrase means the passphrase does not decrypt the private key.
	ErrWrongPassphrase = errors.New("wrong passphrase")
	// ErrNoPrivateKey means the provider was made without a private key: it wraps but cannot unwrap,
	// and cannot prove (see [Provider.Prove]).
	ErrNoPrivateKey = errors.New("no private key configured")
	// ErrNoSigningKey means the private key has no valid key or subkey that may sign whose private part is
	// here (a certify-only primary key without a signing subkey, or a signing key exported as a stub), so
	// [Provider.Prove] cannot make a proof. Add a signing subkey (gpg --quick-add-key FPR ed25519 sign) and
	// export the private key again.
	ErrNoSigningKey = errors.New("no signing key")
	// ErrRecipientRemoved means a wrapped key is encrypted to a key that the provider's configuration no longer
	// names (see [Provider.CheckRecipients]): its holder can still unwrap that copy, and every ciphertext that
	// carries it.
	ErrRecipientRemoved = errors.New("recipient removed")
)

// keyError is an error about one key. Its message names where the key came from, the key and the problem, and
// leaves out the text of the sentinel it wraps, which would only repeat the problem.
type keyError struct {
	source string // "key file PATH", "Config.PrivateKey", "Config.PublicKeys[i]", or "" for a key given to a function
	op     string // for a key given to a function, the operation that failed and ": ", or ""
	key    string // "0x" and the long key ID of the primary key, or "" when no key could be read
	reason string // what is wrong, without key material
	err    error  // the sentinel
}

func (e *keyError) Error() string {
	if e.source == "" {
		// A key given to a function: the caller knows where it came from.
		if e.key == "" {
			return fmt.Sprintf("gpg: %spublic key %s", e.op, e.reason)
		}
		return fmt.Sprintf("gpg: %spublic key %s %s", e.op, e.key, e.reason)
	}
	if e.key == "" {
		return fmt.Sprintf("gpg: %s: %s", e.source, e.reason)
	}
	return fmt.Sprintf("gpg: %s: key %s %s", e.source, e.key, e.reason)
}

func (e *keyError) Unwrap() error { return e.err }

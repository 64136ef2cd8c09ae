// Package kleidi is envelope encryption with a hardware or OpenPGP root of trust, and the library behind
// the kleidi Kubernetes KMS v2 plugin.
//
// The key hierarchy has three levels:
//
//	root of trust   TPM 2.0 storage key | OpenPGP key | any other [Provider]
//	   | wraps (Provider.Wrap / Provider.Unwrap: rare, slow is fine)
//	KEK ring        256-bit AES keys, random; one active, older ones kept for decryption
//	   | AES-256-GCM (Envelope.Encrypt / Envelope.Decrypt: the hot path, never touches the root)
//	data            for KMS v2: the kube-apiserver's 32-byte DEK seed; for library users: any bytes
//
// A [Provider] is a root of trust: it wraps and unwraps key-encryption keys (KEKs) and never sees the data.
// A [Keyring] persists the wrapped KEKs and which one is active; it holds nothing secret, so it may be copied
// between nodes and backed up like any configuration file. [FileKeyring] is the keyring on disk.
// The [Envelope] is the engine: it unwraps each KEK through the provider once, keeps it in memory, encrypts
// with the active KEK, decrypts with whichever KEK a [Ciphertext] names, and rotates.
//
// Every [Ciphertext] can carry the wrapped form of its KEK ([Ciphertext.WrappedKey]), so the data is
// self-contained: a process that lost its keyring still decrypts, as long as its root of trust unwraps the KEK
// and the KEK's identity matches the key ID the ciphertext names.
//
// Key IDs are public and opaque: "kleidi-<provider>-<fingerprint>", where the fingerprint is an HMAC of the
// KEK. The same KEK has the same ID on every node; a new KEK never repeats an old ID.
//
// Errors wrap the sentinel errors of this package ([ErrUnknownKey], [ErrUnwrap], [ErrDecrypt], ...), so callers
// test them with [errors.Is]. No error, log line or String method of this package contains key material or
// plaintext.
//
// Providers live in subpackages (gpg, tpm); kleiditest holds an insecure in-memory provider and the
// conformance suite every provider passes. The server package turns an Envelope into a KMS v2 plugin.
package kleidi

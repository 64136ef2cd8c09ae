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
// Every [Ciphertext] can carry the wrapped form of its KEK ([Ciphertext.AttachedKey]), so the data is
// self-contained: a process that lost its keyring still decrypts, as long as its root of trust unwraps the KEK
// and the KEK's identity matches the key ID the ciphertext names.
//
// For data stored by a program of its own, [Envelope.Seal] and [Envelope.Open] keep a ciphertext and its attached
// key in one versioned value, and [Envelope.EncryptStream] and [Envelope.DecryptStream] encrypt data of any size in
// authenticated 64 KiB segments under a fresh stream key sealed by the KEK.
//
// Several roots of trust share one keyring when their provider is a [Node]: every KEK is wrapped for every
// [Member] (through a [Recipient]), and a node trusts only members endorsed by the members it trusts
// ([NodeState]). [Envelope.Stage], [Envelope.Activate], [Envelope.Enroll], [Envelope.Unenroll] and [Recover] are
// the steps of rotations and membership across nodes.
//
// Key IDs are public and opaque: "kleidi-<provider>-<fingerprint>", where the fingerprint is an HMAC of the
// KEK. The same KEK has the same ID on every node; a new KEK never repeats an old ID.
//
// Errors wrap the sentinel errors of this package ([ErrUnknownKey], [ErrUnwrap], [ErrDecrypt], ...), so callers
// test them with [errors.Is]. No error, log line or String method of this package contains key material or
// plaintext.
//
// Providers live in subpackages (gpg, tpm, pkcs11) and modules (awskms); [NewAEADProvider] makes one of any root
// that encrypts bytes. kleiditest holds insecure in-memory providers and the conformance suites every provider
// (TestProvider, TestNode) and every KMS v2 plugin (TestPlugin) passes. The server package turns a provider and a
// keyring into a KMS v2 plugin, with metrics and audit wired; package client dials one.
package kleidi

// Package gpg is a [kleidi.Provider] whose root of trust is an OpenPGP key: for development, for CI, and for
// teams whose key management is already OpenPGP.
//
// Wrap encrypts a key-encryption key to one or more OpenPGP public keys and returns a binary OpenPGP message;
// Unwrap decrypts it with a private key. The message is standard: gpg --decrypt decrypts what Wrap made, and
// Unwrap decrypts what gpg --encrypt made for one of the provider's keys.
//
//	p, err := gpg.New(gpg.Config{
//		PublicKeyFiles: []string{"/etc/kleidi/node-a.pub.asc", "/etc/kleidi/node-b.pub.asc"},
//		PrivateKeyFile: "/etc/kleidi/node-a.key",
//		PassphraseFile: "/run/secrets/kleidi-passphrase",
//	})
//
// # Keys
//
// Key files are what GnuPG exports, binary or ASCII-armored: gpg --export (public keys) and
// gpg --export-secret-keys (private keys), with or without --armor. Version 4 keys (RSA of 2048 bits or more,
// Ed25519 with a Curve25519 subkey, NIST and Brainpool curves) and version 6 keys of RFC 9580 (Ed25519 and
// X25519, Ed448 and X448) work. [New] checks every key at once and names the file, the key and the problem:
// expired, revoked, no encryption subkey, a public key where a private key is needed, a protected private key
// without its passphrase or with a wrong one, or a file that holds no key at all. See [ErrKeyExpired] and the
// other errors of this package. A key that is valid at start keeps unwrapping when it expires later, but Wrap
// then refuses it: extend it (gpg --quick-set-expire) and export it again.
//
// # Keys in memory
//
// A program that keeps its keys elsewhere (a secret store, a smartcard export, a key it made) gives them as
// bytes instead: [Config.PublicKeys] and [Config.PrivateKey] take what the files would hold, and errors name
// the field instead of a file. [GenerateKey] makes a key pair protected by a passphrase, in that form:
//
//	private, public, err := gpg.GenerateKey("kleidi node-a", passphrase)
//	p, err := gpg.New(gpg.Config{
//		PrivateKey: private,
//		Passphrase: func() ([]byte, error) { return vault.Read("kleidi/node-a") },
//	})
//
// # Passphrases
//
// A protected private key is unlocked once, by New, with the passphrase from a file ([Config.PassphraseFile],
// for example a mounted Kubernetes Secret) or from a function ([Config.Passphrase]), whose result New zeroes
// after use. The package reads no environment variable and takes no passphrase on a command line: a program
// that keeps the passphrase in its environment reads it in its Passphrase function. Close zeroes the unlocked
// key material that go-crypto exposes.
//
// # Several recipients
//
// With several public key files, Wrap encrypts each key to all of them, and any one of the private keys
// unwraps: a highly available control plane gives each node its own key pair, every node lists all public
// keys, and each node holds only its own private key. To add a recipient, add its public key file to every node
// and re-wrap the existing keys (kleidi.Rewrap) with a provider that holds a private key that already
// unwraps them; key IDs do not change, so existing ciphertexts stay readable.
//
// # Proofs
//
// A Provider is a kleidi.Authenticator. The Envelope asks it to prove every wrapped key it makes, and checks
// the proof of every wrapped key that arrives from outside before it unwraps it, because wrapping needs only a
// public key: anyone who knows one could wrap a key of their choosing. [Provider.Prove] makes a binary OpenPGP
// detached signature with the signing key of the private key (gpg --verify checks it); [Provider.Verify]
// accepts a signature by a valid signing key of the private key or of any recipient, since every recipient
// can unwrap every key anyway. A private key therefore needs a key that may sign: the primary key, as
// gpg --quick-gen-key makes by default, or a signing subkey. Verify accepts exactly one signature packet of
// a binary document, hashed with SHA-256 or stronger, by a key not revoked when New read it and not expired
// now, made after that key and at most [MaxClockSkew] ahead of this clock, and refuses everything else with an
// error wrapping kleidi.ErrUnauthenticated. It takes no lock and no private key: a wrap-only provider
// verifies too.
//
// A node trusts the proofs of the keys its configuration lists, and only those: every node lists every
// public key, so that it accepts the keys any other node rotated in.
//
// # Recovery key
//
// A recovery key is an OpenPGP key pair whose private half is kept offline (on paper, a smartcard, a vault)
// and whose public key receives every key-encryption key, so that the data survives the loss of every other
// root of trust: every TPM cleared, every node key lost. [RecipientIdentity] turns its public key
// (gpg --export, with or without --armor) into a kleidi.Identity, and [OpenRecipient], a
// kleidi.RecipientOpener, into a kleidi.Recipient that wraps to that key alone:
//
//	id, err := gpg.RecipientIdentity(publicKey) // refuses a private key: its private half stays offline
//	r, err := gpg.OpenRecipient(id)
//	wrapped, err := r.Wrap(ctx, kek)
//
// What it wraps is what [Provider.Wrap] makes for that key: in recovery, a Provider made with the private
// key (Config.PrivateKeyFile and its passphrase) unwraps it, and so does gpg --decrypt. The identity holds the
// key's canonical form (the key, its latest self-signatures and its encryption subkeys; no certification by
// others), so that the same key gives the same ID however it was exported. It has no verify key: a recovery
// key receives keys and never sends them. A recovery key that expires later still opens, but Wrap then
// refuses it with [ErrKeyExpired]: extend it (gpg --quick-set-expire) and make its identity again.
//
// # Removing a recipient
//
// Re-wrapping every key without a recipient revokes nothing: every ciphertext still carries a copy that the
// removed private key unwraps. [Provider.CheckRecipients] finds such a copy, so that a program can refuse the
// re-wrap. Removing a recipient takes a rotation to a new key, wrapped only to the remaining recipients, and
// the re-encryption of every ciphertext under it; until then the removed key still decrypts old data.
//
// # Development key
//
// [GenerateDevelopmentKey] writes an unprotected key pair to a directory and returns the Config that loads it.
// It is for development and tests only, and a program that uses it says so in its log.
package gpg

// Package pkcs11 is a [kleidi.Provider] whose root of trust is a key on a PKCS#11 token: a hardware security
// module (Thales Luna, Entrust nShield, YubiHSM, AWS CloudHSM) or SoftHSM 2. The key never leaves the token, so a
// copy of the disk, the keyring or an etcd backup is useless without the token and its PIN.
//
// # Keys
//
// A provider uses two secret keys on the token, selected by the same label ([Config.KeyLabel]) or ID
// ([Config.KeyID]): an AES-256 key (CKK_AES) that wraps KEKs, usable to encrypt and decrypt, and a generic secret
// key (CKK_GENERIC_SECRET, 32 bytes) that makes proofs, usable to sign. Both must be sensitive and
// non-extractable (CKA_SENSITIVE true, CKA_EXTRACTABLE false): a provider refuses any other key with an error
// wrapping [ErrKey]. With [Config.CreateKeys] (kleidi-server init --provider pkcs11), the keys the token lacks are
// generated on it: token objects, private, sensitive, non-extractable, the AES key usable only to encrypt and
// decrypt, the proof key only to sign, with the configured label, and the configured ID or a random one.
//
// # Wrapping
//
// Wrap has the token encrypt the KEK with the AES key in CKM_AES_GCM through C_Encrypt: a random 12-byte IV (or
// the IV the token reports, for tokens that choose their own), a 128-bit tag, and associated data that binds the
// blob to its purpose and format version. The wrapped form is "KP11", a version byte, the IV and the ciphertext;
// Unwrap refuses anything else before it calls the token, and the token refuses a blob made with another key or
// altered, with an error wrapping [kleidi.ErrUnwrap]. (CKM_AES_KEY_WRAP is for key objects: SoftHSM 2 refuses it
// in C_Encrypt.)
//
// # Proofs
//
// [Provider] is a [kleidi.Authenticator]. A proof is HMAC-SHA256 under a proof key that only a holder of the token
// (and its PIN) can compute: the token's CKM_SHA256_HMAC, with the non-extractable generic secret key, of a fixed
// label. It is the same at every start and in every process that uses the token, so a node that lost its keyring
// still verifies the proofs attached to its ciphertexts, and a party that writes etcd, without the token, cannot
// make one. The proof key is derived at the first Prove or Verify, kept in memory (Verify never calls the token
// again) and zeroed by [Provider.Close]. The proof key is separate from the wrapping key, and no IV is ever used
// twice under the wrapping key.
//
// # Sessions, outages and errors
//
// The library is loaded and initialised once per process and path, and shared by every provider of the process;
// it is finalised when the last one closes. A provider finds its token by label (slot IDs change: SoftHSM numbers
// them at random), logs in once, and keeps a pool of up to four sessions, so at most four calls are in flight per
// provider. A PKCS#11 call cannot be interrupted: the context is checked before it.
//
// When a call shows the token, the session or the library gone (CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT,
// CKR_SESSION_HANDLE_INVALID, CKR_OBJECT_HANDLE_INVALID, CKR_GENERAL_ERROR and the like), it fails with an error
// wrapping [kleidi.ErrUnavailable], the provider drops its sessions and the library is finalised; the next call
// (or [Provider.Health], which the plugin calls every few seconds) initialises it again, finds the token and logs
// in, so a token or a daemon that comes back is used again without a restart. A ciphertext the token refuses
// gives an error wrapping [kleidi.ErrUnwrap] only if the token then still answers (SoftHSM answers a wrong GCM tag
// with CKR_GENERAL_ERROR): otherwise it is an outage. Errors name the token and the key, never the PIN.
//
// A PIN the token refuses gives an error wrapping [ErrPIN] and is never tried again by the same provider, so that
// retries do not lock the token. PKCS#11 logs in a whole process: once one provider of a process is logged in to a
// token, the PIN of another provider of that process on the same token is not checked again.
//
// # Builds
//
// The PKCS#11 library is called through cgo (github.com/miekg/pkcs11 behind this package's own error-returning
// layer). A binary built with CGO_ENABLED=0 still builds; [New] then returns an error saying that the PKCS#11
// provider needs a cgo build.
package pkcs11

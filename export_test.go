package kleidi

// Hooks for the external tests of this package: they play an attacker who builds ciphertexts and attached keys
// by hand, and look at the size of the KEK cache.

// KeyIDForTest is keyIDFor: anyone can compute the ID of a KEK they chose.
var KeyIDForTest = keyIDFor

// EncodeAttachedKeyForTest is encodeAttachedKey.
var EncodeAttachedKeyForTest = encodeAttachedKey

// ProofMessageForTest is proofMessage.
var ProofMessageForTest = proofMessage

// SealForTest encrypts plaintext under key, KEK id, as Encrypt would.
func SealForTest(id string, key, plaintext []byte) *Ciphertext {
	k, err := newKEK(id, key)
	if err != nil {
		panic(err)
	}
	return &Ciphertext{raw: k.seal(plaintext, nil), keyIDLen: len(id)}
}

// CachedKeysForTest returns how many unwrapped KEKs e holds.
func CachedKeysForTest(e *Envelope) int { return len(*e.keys.Load()) }

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

// CachedKeysForTest returns how many unwrapped KEKs e holds: those of its cache, and the active key's if it is not
// among them.
func CachedKeysForTest(e *Envelope) int {
	keys := *e.keys.Load()
	n := len(keys)
	if act := e.active.Load().kek; act.aead != nil && keys[act.id] != act {
		n++
	}
	return n
}

// SharedCopyMessageForTest is what a sender signs for a copy it wrapped for another member.
func SharedCopyMessageForTest(id, sender, recipient string, blob []byte) []byte {
	return sharedCopyMessage(id, sender, recipient, blob)
}

// EndorsementMessageForTest is what an endorser signs to make member a member.
func EndorsementMessageForTest(endorser, member string) []byte {
	return endorsementMessage(endorser, member)
}

// EncodeKeyringForTest is encodeKeyring: the bytes a keyring file holds, as a node publishes them.
var EncodeKeyringForTest = encodeKeyring

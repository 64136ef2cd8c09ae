package kleiditest

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"encoding/binary"
)

// The threat model's etcd writer chooses every byte of a stored object and knows every public key of the root of
// trust, so it can wrap a KEK of its own to it. These helpers build what it would, from the documented formats
// (README, "Formats"), for tests that play it: whatever they build must be refused.

// ForgeCiphertext returns the key ID of kek, a KEK the attacker chose, for a root named provider, and plaintext
// encrypted under it in the ciphertext format, version 1.
func ForgeCiphertext(provider string, kek, plaintext []byte) (keyID string, ciphertext []byte) {
	mac := hmac.New(sha256.New, kek)
	mac.Write([]byte("kleidi key id v1\x00" + provider))
	enc := base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)
	keyID = "kleidi-" + provider + "-" + enc.EncodeToString(mac.Sum(nil)[:20])
	block, err := aes.NewCipher(kek)
	if err != nil {
		panic(err)
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	header := append([]byte{'k', 1, byte(len(keyID))}, keyID...)
	nonce := make([]byte, gcm.NonceSize())
	rand.Read(nonce)
	return keyID, gcm.Seal(append(append([]byte{}, header...), nonce...), nonce, plaintext, header)
}

// ForgeAttachedKey returns an attached key (format version 2) of blob with proof.
func ForgeAttachedKey(blob, proof []byte) []byte {
	out := binary.BigEndian.AppendUint16([]byte{'w', 2}, uint16(len(proof)))
	return append(append(out, proof...), blob...)
}

// ProofMessage is the message whose proof authenticates a copy of KEK keyID wrapped by root.
func ProofMessage(keyID, root string, blob []byte) []byte {
	return append([]byte("kleidi wrapped key v2\x00"+keyID+"\x00"+root+"\x00"), blob...)
}

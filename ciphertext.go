package kleidi

import (
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"fmt"
	"sync/atomic"
)

// Ciphertext format, version 1:
//
//	offset  size        field
//	0       1           magic 'k' (0x6b)
//	1       1           version (0x01)
//	2       1           n, length of the key ID (1 to MaxKeyIDSize)
//	3       n           key ID, ASCII
//	3+n     12          AES-GCM nonce, random
//	15+n    len(p)+16   AES-256-GCM ciphertext and tag of the plaintext p
//
// The header (bytes 0 to 3+n) followed by the caller's associated data is the AES-GCM additional data, so
// the version and key ID are authenticated. The golden vectors in testdata/ pin the format.
const (
	ciphertextMagic   = 'k'
	ciphertextVersion = 1
	nonceSize         = 12
	tagSize           = 16
	// MaxCiphertextSize is the size of the ciphertext of a [MaxPlaintextSize] plaintext under the longest key ID.
	MaxCiphertextSize = 3 + MaxKeyIDSize + nonceSize + MaxPlaintextSize + tagSize
)

// Ciphertext is the output of [Envelope.Encrypt]: the encrypted bytes, the ID of the key that encrypted them,
// and, for transport, the wrapped form of that key.
type Ciphertext struct {
	raw      []byte
	keyIDLen int

	// AttachedKey is the attached key: the KEK that encrypted the data, wrapped by the root of trust, with the
	// root's proof that a legitimate holder made it; nil when the provider is not an [Authenticator]. It is not
	// part of [Ciphertext.Bytes]: callers that want self-contained data store it beside them (the KMS v2 server
	// puts it in an annotation). [Envelope.Decrypt] unwraps it only when the key is not in its keyring, and only
	// after its proof verifies and before accepting that it unwraps to the key the ciphertext names. It is
	// public, and shared: do not modify it. For self-contained data in one value, use [Envelope.Seal].
	AttachedKey []byte
}

// ParseCiphertext parses the output of [Ciphertext.Bytes]. It checks the format and every length, not
// authenticity: that is [Envelope.Decrypt]'s job. Errors wrap [ErrInvalidCiphertext]. The Ciphertext keeps
// its own copy of b.
func ParseCiphertext(b []byte) (*Ciphertext, error) {
	n, err := parseHeader(b)
	if err != nil {
		return nil, err
	}
	raw := make([]byte, len(b))
	copy(raw, b)
	return &Ciphertext{raw: raw, keyIDLen: n}, nil
}

// parseHeader checks b and returns the length of its key ID.
func parseHeader(b []byte) (int, error) {
	invalid := func(format string, args ...any) (int, error) {
		return 0, fmt.Errorf("%w: "+format, append([]any{ErrInvalidCiphertext}, args...)...)
	}
	if len(b) < 3 {
		return invalid("%d bytes is too short", len(b))
	}
	if len(b) > MaxCiphertextSize {
		return invalid("%d bytes is longer than %d", len(b), MaxCiphertextSize)
	}
	if b[0] != ciphertextMagic {
		return invalid("not a kleidi ciphertext")
	}
	if b[1] != ciphertextVersion {
		return invalid("unsupported version %d", b[1])
	}
	n := int(b[2])
	if n == 0 || n > MaxKeyIDSize {
		return invalid("key ID length %d out of range", n)
	}
	if len(b) < 3+n+nonceSize+tagSize {
		return invalid("%d bytes is too short for its key ID", len(b))
	}
	if err := checkKeyID(b[3 : 3+n]); err != nil {
		return invalid("%v", err)
	}
	return n, nil
}

// KeyID returns the ID of the key that encrypted c.
func (c *Ciphertext) KeyID() string { return string(c.keyIDBytes()) }

func (c *Ciphertext) keyIDBytes() []byte { return c.raw[3 : 3+c.keyIDLen] }

// Bytes returns the encoded ciphertext. It is shared: do not modify it.
func (c *Ciphertext) Bytes() []byte { return c.raw }

// String describes c without its bytes.
func (c *Ciphertext) String() string {
	return fmt.Sprintf("kleidi.Ciphertext{key: %s, %d bytes}", c.KeyID(), len(c.raw))
}

// GoString is String, so %#v prints no more than %v.
func (c *Ciphertext) GoString() string { return c.String() }

// kek is an unwrapped key-encryption key ready for use; only its AES-GCM state is kept.
type kek struct {
	id     string
	header []byte // the ciphertext header naming this key, also the additional data
	aead   cipher.AEAD
	uses   atomic.Uint64 // messages encrypted in this process
}

// newKEK prepares key, which must have the identity id. The caller zeroes key afterwards.
func newKEK(id string, key []byte) (*kek, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("key of %d bytes, want %d", len(key), KeySize)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCMWithRandomNonce(block)
	if err != nil {
		return nil, err
	}
	header := append([]byte{ciphertextMagic, ciphertextVersion, byte(len(id))}, id...)
	return &kek{id: id, header: header, aead: aead}, nil
}

// additionalData is the AES-GCM additional data for this key and the caller's associated data.
func (k *kek) additionalData(associatedData []byte) []byte {
	if len(associatedData) == 0 {
		return k.header
	}
	ad := make([]byte, 0, len(k.header)+len(associatedData))
	return append(append(ad, k.header...), associatedData...)
}

func (k *kek) seal(plaintext, associatedData []byte) []byte {
	out := make([]byte, len(k.header), len(k.header)+nonceSize+len(plaintext)+tagSize)
	copy(out, k.header)
	return k.aead.Seal(out, nil, plaintext, k.additionalData(associatedData))
}

func (k *kek) open(raw, associatedData []byte) ([]byte, error) {
	plaintext, err := k.aead.Open(nil, nil, raw[len(k.header):], k.additionalData(associatedData))
	if err != nil {
		return nil, errors.New("message authentication failed")
	}
	return plaintext, nil
}

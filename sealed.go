package kleidi

import (
	"context"
	"encoding/binary"
	"fmt"
)

// Sealed format, version 1: what [Envelope.Seal] returns, a ciphertext and its attached key in one value. All
// integers are big-endian.
//
//	offset  size  field
//	0       1     magic 's' (0x73)
//	1       1     version (0x01)
//	2       2     a, length of the attached key (0 to MaxAttachedKeySize)
//	4       a     attached key: [Ciphertext.AttachedKey], the wrapped KEK and its proof (empty when the root is
//	              not an [Authenticator])
//	4+a     rest  ciphertext: [Ciphertext.Bytes], of format version 1 (at most MaxCiphertextSize bytes)
//
// Nothing in the header is secret or authenticated by itself: the ciphertext authenticates its own header and
// the associated data, and the attached key carries the proof [Envelope.Decrypt] checks before it unwraps
// anything. The attached key is not covered by the ciphertext's tag: where the KEK is already known it is not
// read, so altering it changes nothing there, and elsewhere an altered one fails its proof. The golden vectors in
// testdata/sealed-v1.json pin the format.
const (
	sealedMagic   = 's'
	sealedVersion = 1
	sealedHeader  = 4
	// MaxSealedSize is the size of the largest sealed value: the largest attached key and ciphertext.
	MaxSealedSize = sealedHeader + MaxAttachedKeySize + MaxCiphertextSize
)

// Seal encrypts plaintext as [Envelope.Encrypt] does and returns it in one self-contained value, the sealed
// format: the ciphertext with its attached key. [Envelope.Open] on any Envelope of the same root of trust
// decrypts it, even one whose keyring never held the KEK (a new node, a lost or restored keyring), as long as the
// root verifies the attached key's proof and unwraps it. With a root that is not an [Authenticator] there is no
// attached key, and the value decrypts only where the keyring holds its KEK. Seal never calls the provider;
// plaintext is at most [MaxPlaintextSize] bytes (for more, see [Envelope.EncryptStream]).
func (e *Envelope) Seal(ctx context.Context, plaintext, associatedData []byte) ([]byte, error) {
	c, err := e.Encrypt(ctx, plaintext, associatedData)
	if err != nil {
		return nil, err
	}
	raw := c.Bytes()
	out := make([]byte, 0, sealedHeader+len(c.AttachedKey)+len(raw))
	out = append(out, sealedMagic, sealedVersion)
	out = binary.BigEndian.AppendUint16(out, uint16(len(c.AttachedKey)))
	return append(append(out, c.AttachedKey...), raw...), nil
}

// Open decrypts the output of [Envelope.Seal] with the same associated data, as [Envelope.Decrypt] does with the
// attached key it carries: a KEK not in memory is unwrapped from the keyring or else from the attached key, whose
// proof must verify first. Malformed input gives an error wrapping [ErrInvalidCiphertext]; the errors of
// Decrypt ([ErrDecrypt], [ErrUnknownKey], [ErrUnauthenticated], ...) are returned as they are.
func (e *Envelope) Open(ctx context.Context, sealed, associatedData []byte) ([]byte, error) {
	attached, raw, err := parseSealed(sealed)
	if err != nil {
		return nil, err
	}
	c, err := ParseCiphertext(raw)
	if err != nil {
		return nil, err
	}
	c.AttachedKey = attached
	return e.Decrypt(ctx, c, associatedData)
}

// parseSealed splits a sealed value into its attached key and ciphertext, which alias b. It checks the format
// and the lengths; the parts are checked by their own parsers. Errors wrap [ErrInvalidCiphertext].
func parseSealed(b []byte) (attached, raw []byte, err error) {
	invalid := func(format string, args ...any) ([]byte, []byte, error) {
		return nil, nil, fmt.Errorf("%w: sealed: "+format, append([]any{ErrInvalidCiphertext}, args...)...)
	}
	switch {
	case len(b) < sealedHeader:
		return invalid("%d bytes is too short", len(b))
	case len(b) > MaxSealedSize:
		return invalid("%d bytes is longer than %d", len(b), MaxSealedSize)
	case b[0] != sealedMagic:
		return invalid("not a sealed kleidi value")
	case b[1] != sealedVersion:
		return invalid("unsupported version %d", b[1])
	}
	a := int(binary.BigEndian.Uint16(b[2:]))
	if a > MaxAttachedKeySize || len(b) < sealedHeader+a {
		return invalid("attached key of %d bytes in %d bytes", a, len(b))
	}
	return b[sealedHeader : sealedHeader+a], b[sealedHeader+a:], nil
}

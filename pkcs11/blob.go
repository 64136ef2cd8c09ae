package pkcs11

import (
	"bytes"
	"fmt"

	"github.com/kleidi-kms/kleidi"
)

// The wrapped form of a KEK, format version 1:
//
//	magic "KP11" | version 0x01 | IV (12 bytes) | AES-256-GCM ciphertext of the KEK with its 16-byte tag
//
// The token encrypts with CKM_AES_GCM under the wrapping key, with the IV of the blob and the associated data
// blobAAD followed by the blob's first five bytes, so a blob is bound to its purpose (a kleidi KEK wrapped by this
// provider) and to its format version: the token refuses a blob whose header, IV or ciphertext was changed.
const (
	blobMagic   = "KP11"
	blobVersion = 1
	headerSize  = len(blobMagic) + 1
	ivSize      = 12
	tagSize     = 16
	// MaxKeySize is the largest key [Provider.Wrap] wraps. A KEK is [kleidi.KeySize] bytes.
	MaxKeySize = 1024
	// minBlobSize and maxBlobSize bound a blob: a header, an IV, a tag and a key of 1 to MaxKeySize bytes.
	minBlobSize = headerSize + ivSize + tagSize + 1
	maxBlobSize = headerSize + ivSize + MaxKeySize + tagSize
)

// blobAAD is the start of the associated data of every blob: the purpose the token key encrypts for.
const blobAAD = "kleidi pkcs11 wrapped key\x00"

// blobHeader returns the header of a blob of the current version.
func blobHeader() []byte { return append([]byte(blobMagic), blobVersion) }

// associatedData returns the associated data of a blob with header.
func associatedData(header []byte) []byte { return append([]byte(blobAAD), header...) }

// encodeBlob returns the blob of iv and ciphertext.
func encodeBlob(iv, ciphertext []byte) []byte {
	out := make([]byte, 0, headerSize+len(iv)+len(ciphertext))
	return append(append(append(out, blobHeader()...), iv...), ciphertext...)
}

// parseBlob splits a blob into its header, IV and ciphertext. It reads untrusted bytes: anything that is not a
// blob of a known version, of a size a key of 1 to [MaxKeySize] bytes gives, is refused with an error wrapping
// [kleidi.ErrUnwrap]. The slices alias blob.
func parseBlob(blob []byte) (header, iv, ciphertext []byte, err error) {
	switch {
	case len(blob) < minBlobSize || len(blob) > maxBlobSize:
		return nil, nil, nil, fmt.Errorf("%w: a wrapped key of %d bytes, want %d to %d", kleidi.ErrUnwrap, len(blob), minBlobSize, maxBlobSize)
	case !bytes.HasPrefix(blob, []byte(blobMagic)):
		return nil, nil, nil, fmt.Errorf("%w: not a key wrapped by a PKCS#11 token", kleidi.ErrUnwrap)
	case blob[len(blobMagic)] != blobVersion:
		return nil, nil, nil, fmt.Errorf("%w: wrapped key format version %d, want %d", kleidi.ErrUnwrap, blob[len(blobMagic)], blobVersion)
	}
	return blob[:headerSize], blob[headerSize : headerSize+ivSize], blob[headerSize+ivSize:], nil
}

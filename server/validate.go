package server

import (
	"fmt"

	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kleidi-kms/kleidi"
)

// Limits of the KMS v2 API, as kube-apiserver enforces them on what a plugin returns. The server holds requests
// and its own responses to the same limits.
const (
	// MaxKMSCiphertextSize is the longest ciphertext, in bytes.
	MaxKMSCiphertextSize = 1024
	// MaxKMSKeyIDSize is the longest key_id, in bytes.
	MaxKMSKeyIDSize = 1024
	// MaxAnnotationsSize bounds the annotations of one ciphertext: the keys and values together, in bytes.
	MaxAnnotationsSize = 32 << 10
	// MaxPlaintextSize is the largest plaintext Encrypt accepts: the largest whose ciphertext fits in
	// MaxKMSCiphertextSize under the longest kleidi key ID (865 bytes). kube-apiserver sends 32.
	MaxPlaintextSize = MaxKMSCiphertextSize - (kleidi.MaxCiphertextSize - kleidi.MaxPlaintextSize)
	// AttachedKeyAnnotation is the annotation that carries the attached key of a ciphertext (its KEK wrapped by
	// the root of trust, with the root's proof that a legitimate holder made it: [kleidi.Ciphertext.AttachedKey]),
	// so that every Encrypt response is self-contained. Decrypt unwraps it only when the ciphertext's KEK is not
	// in the keyring, and only once its proof verifies. A value written by kleidi 0.1 (a bare wrapped key, with no
	// proof) is never unwrapped: such ciphertexts decrypt while their KEK is in the keyring.
	AttachedKeyAnnotation = "kek.kleidi.dev"
	// APIVersion is the version Status reports.
	APIVersion = "v2"
)

// maxRecvMsgSize bounds a request on the wire: the largest valid one (annotations, ciphertext, key_id, uid and
// framing) is well under it. Larger requests get ResourceExhausted from gRPC before they are decoded.
const maxRecvMsgSize = 64 << 10

// invalid is a client error: the request breaks a limit or a format. Its message names the field and the
// limit, never the content.
type invalid string

func (e invalid) Error() string { return string(e) }

func invalidf(format string, args ...any) error { return invalid(fmt.Sprintf(format, args...)) }

// checkEncryptRequest checks an EncryptRequest against the limits.
func checkEncryptRequest(r *kmsapi.EncryptRequest) error {
	if n := len(r.Plaintext); n == 0 || n > MaxPlaintextSize {
		return invalidf("plaintext of %d bytes, want 1 to %d", n, MaxPlaintextSize)
	}
	return nil
}

// checkDecryptRequest checks a DecryptRequest against the limits, and returns the wrapped key its annotations
// carry (nil if none).
func checkDecryptRequest(r *kmsapi.DecryptRequest) (wrappedKey []byte, err error) {
	if n := len(r.Ciphertext); n == 0 || n > MaxKMSCiphertextSize {
		return nil, invalidf("ciphertext of %d bytes, want 1 to %d", n, MaxKMSCiphertextSize)
	}
	if err := checkKeyID(r.KeyId); err != nil {
		return nil, err
	}
	if err := checkAnnotations(r.Annotations); err != nil {
		return nil, err
	}
	wrapped, ok := r.Annotations[AttachedKeyAnnotation]
	if ok && (len(wrapped) == 0 || len(wrapped) > kleidi.MaxAttachedKeySize) {
		return nil, invalidf("annotation %s of %d bytes, want 1 to %d", AttachedKeyAnnotation, len(wrapped), kleidi.MaxAttachedKeySize)
	}
	return wrapped, nil
}

// checkEncryptResponse checks what the server is about to return, so that kube-apiserver never receives a
// response it would refuse.
func checkEncryptResponse(r *kmsapi.EncryptResponse) error {
	if n := len(r.Ciphertext); n == 0 || n > MaxKMSCiphertextSize {
		return invalidf("ciphertext of %d bytes, want 1 to %d", n, MaxKMSCiphertextSize)
	}
	if err := checkKeyID(r.KeyId); err != nil {
		return err
	}
	return checkAnnotations(r.Annotations)
}

func checkKeyID(id string) error {
	if n := len(id); n == 0 || n > MaxKMSKeyIDSize {
		return invalidf("key_id of %d bytes, want 1 to %d", n, MaxKMSKeyIDSize)
	}
	return nil
}

// checkAnnotations applies kube-apiserver's rules: every key a fully qualified domain name, keys and values
// at most MaxAnnotationsSize bytes in all.
func checkAnnotations(annotations map[string][]byte) error {
	total := 0
	for k, v := range annotations {
		if !isFQDN(k) {
			return invalidf("annotation key of %d bytes is not a fully qualified domain name", len(k))
		}
		total += len(k) + len(v)
	}
	if total > MaxAnnotationsSize {
		return invalidf("annotations of %d bytes, want at most %d", total, MaxAnnotationsSize)
	}
	return nil
}

// isFQDN reports whether name is a fully qualified domain name as k8s.io/apimachinery's
// IsFullyQualifiedDomainName has it: an optional trailing dot, then at most 253 characters of at least two
// labels, each 1 to 63 characters of [a-z0-9-] that neither starts nor ends with '-'.
func isFQDN(name string) bool {
	if len(name) > 0 && name[len(name)-1] == '.' {
		name = name[:len(name)-1]
	}
	if len(name) == 0 || len(name) > 253 {
		return false
	}
	labels, start := 0, 0
	for i := 0; i <= len(name); i++ {
		if i < len(name) && name[i] != '.' {
			c := name[i]
			if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
				return false
			}
			continue
		}
		label := name[start:i]
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		labels++
		start = i + 1
	}
	return labels >= 2
}

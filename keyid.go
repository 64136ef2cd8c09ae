package kleidi

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base32"
	"fmt"
)

// keyIDPrefix starts every key ID, so a human reading etcd or metrics knows what it is.
const keyIDPrefix = "kleidi-"

// fingerprintSize is how many bytes of the HMAC a key ID keeps: 160 bits, 32 base32 characters.
const fingerprintSize = 20

var fingerprintEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// keyIDFor derives the key ID of kek: "kleidi-<provider>-<fingerprint>", where the fingerprint is
// HMAC-SHA256(kek, "kleidi key id v1" || 0 || provider) cut to 160 bits. The ID is public: the HMAC reveals
// nothing of the key, yet only the key produces it, so a wrapped key that travels with a ciphertext can be
// checked against the ID it claims. Random KEKs never repeat, so neither do their IDs.
func keyIDFor(provider string, kek []byte) string {
	mac := hmac.New(sha256.New, kek)
	mac.Write([]byte("kleidi key id v1\x00"))
	mac.Write([]byte(provider))
	return keyIDPrefix + provider + "-" + fingerprintEncoding.EncodeToString(mac.Sum(nil)[:fingerprintSize])
}

// keyIDProvider returns the provider part of a well-formed key ID.
func keyIDProvider(id string) (string, error) {
	if err := checkKeyID(id); err != nil {
		return "", err
	}
	return id[len(keyIDPrefix) : len(id)-fingerprintEncoding.EncodedLen(fingerprintSize)-1], nil
}

// checkKeyID returns an error unless id has the form keyIDFor produces. It does not allocate for a valid id:
// it runs on every ciphertext parsed.
func checkKeyID[T string | []byte](id T) error {
	if len(id) > MaxKeyIDSize {
		return fmt.Errorf("key ID of %d bytes is longer than %d", len(id), MaxKeyIDSize)
	}
	fpLen := fingerprintEncoding.EncodedLen(fingerprintSize)
	nameLen := len(id) - len(keyIDPrefix) - 1 - fpLen
	if nameLen < 1 || string(id[:len(keyIDPrefix)]) != keyIDPrefix || id[len(id)-fpLen-1] != '-' {
		return fmt.Errorf("key ID %q is not of the form %s<provider>-<fingerprint>", id, keyIDPrefix)
	}
	for i := len(keyIDPrefix); i < len(id); i++ {
		c := id[i]
		switch {
		case i < len(id)-fpLen-1 && (c >= 'a' && c <= 'z' || c >= '0' && c <= '9') && nameLen <= MaxProviderNameSize:
		case i == len(id)-fpLen-1:
		case i > len(id)-fpLen-1 && (c >= 'a' && c <= 'z' || c >= '2' && c <= '7'):
		default:
			return fmt.Errorf("key ID %q is not of the form %s<provider>-<fingerprint>", id, keyIDPrefix)
		}
	}
	return nil
}

// matchesKeyID reports whether kek is the key that id names.
func matchesKeyID(id string, kek []byte) bool {
	provider, err := keyIDProvider(id)
	if err != nil {
		return false
	}
	return hmac.Equal([]byte(keyIDFor(provider, kek)), []byte(id))
}

package gpg

import (
	"bytes"
	"crypto"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp/armor"
	"github.com/ProtonMail/go-crypto/openpgp/packet"
	"github.com/ProtonMail/go-crypto/openpgp/s2k"
	v2 "github.com/ProtonMail/go-crypto/openpgp/v2"
)

// GenerateKey makes an OpenPGP key pair whose private key is protected by passphrase, and returns both halves
// ASCII-armored: private for [Config.PrivateKey] (or a file for [Config.PrivateKeyFile]) with the passphrase
// in [Config.Passphrase], and public for the [Config.PublicKeys] of every node that wraps to it, or for
// [RecipientIdentity]. name is the key's user ID, as gpg --list-keys shows it; it must not be empty or hold
// any of "()<>".
//
// The key is a version 4 Ed25519 key that signs, with a Curve25519 encryption subkey, which every GnuPG since
// 2.1 imports (gpg --import asks for the passphrase). The private key is encrypted with AES-256 under a key
// derived from the passphrase by iterated and salted SHA-256. GenerateKey neither keeps nor changes passphrase;
// the caller may zero it, and private, when done. An empty passphrase is refused with [ErrPassphraseRequired]:
// an unprotected key is for development only ([GenerateDevelopmentKey]).
func GenerateKey(name string, passphrase []byte) (private, public []byte, err error) {
	switch {
	case len(passphrase) == 0:
		return nil, nil, fmt.Errorf("gpg: generate key: empty passphrase: %w", ErrPassphraseRequired)
	case strings.TrimSpace(name) == "":
		return nil, nil, fmt.Errorf("gpg: generate key: empty name: %w", ErrInvalidKey)
	}
	return newKeyPair(name, "", passphrase)
}

// newKeyPair makes a version 4 Ed25519 key with a Curve25519 encryption subkey and returns its private and
// public halves, ASCII-armored. The private key is encrypted under passphrase unless passphrase is nil.
func newKeyPair(name, comment string, passphrase []byte) (private, public []byte, err error) {
	config := &packet.Config{
		Algorithm:     packet.PubKeyAlgoEdDSA,
		Curve:         packet.Curve25519,
		Time:          time.Now,
		DefaultCipher: packet.CipherAES256,
		S2KConfig:     &s2k.Config{S2KMode: s2k.IteratedSaltedS2K, Hash: crypto.SHA256},
	}
	e, err := v2.NewEntity(name, comment, "", config)
	if err != nil {
		if strings.ContainsAny(name, "()<>\x00") {
			return nil, nil, fmt.Errorf("gpg: generate key: name %.64q holds one of \"()<>\": %w", name, ErrInvalidKey)
		}
		return nil, nil, fmt.Errorf("gpg: generate key: %w", err)
	}
	defer dropPrivateKeys(e)
	var pub, priv bytes.Buffer
	if err := armored(&pub, v2.PublicKeyType, e.Serialize); err != nil {
		return nil, nil, fmt.Errorf("gpg: generate key: %w", err)
	}
	if passphrase != nil {
		if err := e.EncryptPrivateKeys(passphrase, config); err != nil {
			return nil, nil, fmt.Errorf("gpg: generate key: %w", err)
		}
	}
	// The buffer grows from an estimate, so that no smaller copy of an unprotected key is left behind.
	priv.Grow(4 << 10)
	if err := armored(&priv, v2.PrivateKeyType, func(w io.Writer) error { return e.SerializePrivateWithoutSigning(w, config) }); err != nil {
		clear(priv.Bytes())
		return nil, nil, fmt.Errorf("gpg: generate key: %w", err)
	}
	return priv.Bytes(), pub.Bytes(), nil
}

// armored writes what serialize writes to buf as an ASCII-armored block of blockType.
func armored(buf *bytes.Buffer, blockType string, serialize func(io.Writer) error) error {
	w, err := armor.Encode(buf, blockType, nil)
	if err != nil {
		return err
	}
	if err := serialize(w); err != nil {
		return err
	}
	return w.Close()
}

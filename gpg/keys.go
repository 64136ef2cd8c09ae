package gpg

import (
	"bytes"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"os"
	"strings"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp/armor"
	"github.com/ProtonMail/go-crypto/openpgp/ecdh"
	"github.com/ProtonMail/go-crypto/openpgp/ecdsa"
	"github.com/ProtonMail/go-crypto/openpgp/ed25519"
	"github.com/ProtonMail/go-crypto/openpgp/ed448"
	"github.com/ProtonMail/go-crypto/openpgp/eddsa"
	"github.com/ProtonMail/go-crypto/openpgp/elgamal"
	pgperrors "github.com/ProtonMail/go-crypto/openpgp/errors"
	"github.com/ProtonMail/go-crypto/openpgp/packet"
	v2 "github.com/ProtonMail/go-crypto/openpgp/v2"
	"github.com/ProtonMail/go-crypto/openpgp/x25519"
	"github.com/ProtonMail/go-crypto/openpgp/x448"
)

const (
	// maxKeyFileSize bounds a key file: a public key with many third-party signatures is large, but not this.
	maxKeyFileSize = 8 << 20
	// maxPassphraseFileSize bounds a passphrase file.
	maxPassphraseFileSize = 4 << 10
)

// readFile reads at most limit bytes of the file at path and fails if there are more.
func readFile(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		clear(data)
		return nil, err
	}
	if int64(len(data)) > limit {
		clear(data)
		return nil, fmt.Errorf("larger than %d bytes", limit)
	}
	return data, nil
}

// keySource is where [New] reads keys from: a file, or bytes of a [Config] field.
type keySource struct {
	name string // for errors: "key file PATH" or the Config field
	path string // the file, or "" for data
	data []byte
}

// readKeys reads the keys of s, binary (gpg --export) or ASCII-armored (gpg --armor --export).
func readKeys(s keySource) (v2.EntityList, error) {
	if s.path == "" {
		if len(s.data) > maxKeyFileSize {
			return nil, &keyError{source: s.name, reason: fmt.Sprintf("is larger than %d bytes", maxKeyFileSize), err: ErrInvalidKey}
		}
		return parseKeys(s.data, s.name)
	}
	data, err := readFile(s.path, maxKeyFileSize)
	if pe := (*fs.PathError)(nil); errors.As(err, &pe) {
		return nil, fmt.Errorf("gpg: %s: %w", s.name, pe.Err)
	}
	if err != nil {
		return nil, &keyError{source: s.name, reason: err.Error(), err: ErrInvalidKey}
	}
	defer clear(data) // the entities hold their own copies of every packet
	return parseKeys(data, s.name)
}

// parseKeys reads the keys in data, binary or ASCII-armored. Its errors name source, or "public key" when
// source is empty.
func parseKeys(data []byte, source string) (v2.EntityList, error) {
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	if len(trimmed) == 0 {
		return nil, &keyError{source: source, reason: "is empty", err: ErrInvalidKey}
	}
	var r io.Reader = bytes.NewReader(trimmed)
	if trimmed[0]&0x80 == 0 {
		// Every binary OpenPGP packet starts with a byte whose top bit is set: this must be ASCII armor.
		block, err := armor.Decode(r)
		if err != nil {
			return nil, &keyError{source: source, reason: "holds neither a binary OpenPGP key nor an ASCII-armored one", err: ErrInvalidKey}
		}
		if block.Type != v2.PublicKeyType && block.Type != v2.PrivateKeyType {
			return nil, &keyError{source: source, reason: fmt.Sprintf("holds an armored %.40q block, want %q or %q", block.Type, v2.PublicKeyType, v2.PrivateKeyType), err: ErrInvalidKey}
		}
		r = block.Body
	}
	keys, err := v2.ReadKeyRing(r)
	if err == nil && len(keys) == 0 {
		err = errors.New("no key found")
	}
	if err != nil {
		return nil, &keyError{source: source, reason: "holds no OpenPGP key this package can read: " + err.Error(), err: ErrInvalidKey}
	}
	return keys, nil
}

// keyID names a key in errors and logs: "0x" and the long key ID of its primary key, as gpg --keyid-format long.
func keyID(e *v2.Entity) string { return fmt.Sprintf("0x%016X", e.PrimaryKey.KeyId) }

// fingerprint is the fingerprint of the primary key of e in upper-case hex, as gpg prints it.
func fingerprint(e *v2.Entity) string { return fmt.Sprintf("%X", e.PrimaryKey.Fingerprint) }

// checkEncryptionKey returns nil if a message can be encrypted to e at now, or an error that names the problem
// and wraps ErrKeyRevoked, ErrKeyExpired, ErrNoEncryptionKey or ErrInvalidKey.
func checkEncryptionKey(source string, e *v2.Entity, now time.Time, config *packet.Config) error {
	fail := func(err error, format string, args ...any) error {
		return &keyError{source: source, key: keyID(e), reason: fmt.Sprintf(format, args...), err: err}
	}
	if e.Revoked(now) {
		return fail(ErrKeyRevoked, "is revoked")
	}
	// Find the self-signature without time checks first, so an expired key reports its expiration date.
	self, err := e.PrimarySelfSignature(time.Time{}, config)
	if err != nil {
		return fail(ErrInvalidKey, "has no valid self-signature: %v", err)
	}
	if expiry, ok := expiration(e.PrimaryKey, self); ok && !now.Before(expiry) {
		return fail(ErrKeyExpired, "expired on %s", expiry.UTC().Format(time.DateOnly))
	}
	if _, err := e.VerifyPrimaryKey(now, config); err != nil {
		switch {
		case errors.Is(err, pgperrors.ErrKeyRevoked):
			return fail(ErrKeyRevoked, "is revoked")
		case errors.Is(err, pgperrors.ErrKeyExpired):
			return fail(ErrKeyExpired, "is expired")
		}
		return fail(ErrInvalidKey, "is not valid now: %v", err)
	}
	_, err = e.EncryptionKeyWithError(now, config)
	if err == nil {
		return nil
	}
	// Say why no key can encrypt: every encryption subkey revoked, or expired, or none at all.
	var revoked int
	var expired time.Time
	for i := range e.Subkeys {
		s := &e.Subkeys[i]
		sig, err := s.LatestValidBindingSignature(time.Time{}, config)
		if err != nil || !s.PublicKey.PubKeyAlgo.CanEncrypt() || !sig.FlagsValid ||
			!(sig.FlagEncryptCommunications || sig.FlagEncryptStorage) {
			continue
		}
		if s.Revoked(sig, now) {
			revoked++
		} else if expiry, ok := expiration(s.PublicKey, sig); ok && !now.Before(expiry) && expiry.After(expired) {
			expired = expiry
		}
	}
	switch {
	case !expired.IsZero():
		return fail(ErrKeyExpired, "has no valid encryption subkey: the last one expired on %s", expired.UTC().Format(time.DateOnly))
	case revoked > 0:
		return fail(ErrKeyRevoked, "has no valid encryption subkey: %d revoked", revoked)
	}
	var sel *pgperrors.ErrEncryptionKeySelection
	if errors.As(err, &sel) {
		var weak pgperrors.WeakAlgorithmError
		if errors.As(sel.EncSelectionErr, &weak) {
			return fail(ErrNoEncryptionKey, "has no encryption key of an algorithm strong enough (%v)", weak)
		}
	}
	return fail(ErrNoEncryptionKey, "has no key or subkey that may encrypt: a signing-only key?")
}

// expiration returns when the key pk expires, or the self-signature sig about it does, whichever comes first.
func expiration(pk *packet.PublicKey, sig *packet.Signature) (time.Time, bool) {
	var t time.Time
	if sig.KeyLifetimeSecs != nil && *sig.KeyLifetimeSecs != 0 {
		t = pk.CreationTime.Add(time.Duration(*sig.KeyLifetimeSecs) * time.Second)
	}
	if sig.SigLifetimeSecs != nil && *sig.SigLifetimeSecs != 0 {
		s := sig.CreationTime.Add(time.Duration(*sig.SigLifetimeSecs) * time.Second)
		if t.IsZero() || s.Before(t) {
			t = s
		}
	}
	return t, !t.IsZero()
}

// unlockPrivateKey checks that e holds the private part of at least one encryption key and decrypts it with
// passphrase if it is protected. It returns an error wrapping ErrNotPrivateKey, ErrPassphraseRequired or
// ErrWrongPassphrase.
func unlockPrivateKey(source string, e *v2.Entity, passphrase []byte, config *packet.Config) error {
	fail := func(err error, reason string) error {
		return &keyError{source: source, key: keyID(e), reason: reason, err: err}
	}
	var usable, encrypted int
	for _, k := range e.DecryptionKeys(0, time.Time{}, config) {
		if k.PrivateKey == nil || k.PrivateKey.Dummy() {
			continue
		}
		usable++
		if k.PrivateKey.Encrypted {
			encrypted++
		}
	}
	switch {
	case usable == 0 && e.PrivateKey == nil:
		return fail(ErrNotPrivateKey, "is a public key; a private key is needed (gpg --export-secret-keys)")
	case usable == 0:
		return fail(ErrNotPrivateKey, "holds no private encryption key, only stubs or signing keys")
	case encrypted == 0:
		return nil
	case passphrase == nil:
		return fail(ErrPassphraseRequired, "is protected by a passphrase; set Config.PassphraseFile or Config.Passphrase")
	}
	if err := e.DecryptPrivateKeys(passphrase); err != nil {
		return fail(ErrWrongPassphrase, "cannot be decrypted with the passphrase given: wrong passphrase")
	}
	return nil
}

// dropPrivateKeys zeroes and forgets every private key of e, leaving its public keys.
func dropPrivateKeys(e *v2.Entity) {
	if e.PrivateKey != nil {
		zeroPrivateKey(e.PrivateKey)
		e.PrivateKey = nil
	}
	for i := range e.Subkeys {
		if s := &e.Subkeys[i]; s.PrivateKey != nil {
			zeroPrivateKey(s.PrivateKey)
			s.PrivateKey = nil
		}
	}
}

// zeroPrivateKey overwrites the secret of pk where go-crypto exposes it. Copies the library keeps out of reach
// (the precomputed form inside crypto/rsa, buffers of the parser) stay until the garbage collector reuses them.
func zeroPrivateKey(pk *packet.PrivateKey) {
	switch k := pk.PrivateKey.(type) {
	case *rsa.PrivateKey:
		zeroInt(k.D)
		for _, p := range k.Primes {
			zeroInt(p)
		}
		zeroInt(k.Precomputed.Dp)
		zeroInt(k.Precomputed.Dq)
		zeroInt(k.Precomputed.Qinv)
	case *ecdh.PrivateKey:
		clear(k.D)
	case *ecdsa.PrivateKey:
		zeroInt(k.D)
	case *eddsa.PrivateKey:
		clear(k.D)
	case *ed25519.PrivateKey:
		clear(k.Key)
	case *ed448.PrivateKey:
		clear(k.Key)
	case *x25519.PrivateKey:
		clear(k.Secret)
	case *x448.PrivateKey:
		clear(k.Secret)
	case *elgamal.PrivateKey:
		zeroInt(k.X)
	}
	pk.PrivateKey = nil
}

func zeroInt(n *big.Int) {
	if n != nil {
		clear(n.Bits())
		n.SetInt64(0)
	}
}

// readPassphrase returns the passphrase Config names, or nil if it names none. A passphrase file may end with
// one newline, which is not part of the passphrase. The caller zeroes the result.
func readPassphrase(c Config) ([]byte, error) {
	switch {
	case c.PassphraseFile != "":
		data, err := readFile(c.PassphraseFile, maxPassphraseFileSize)
		if err != nil {
			return nil, fmt.Errorf("gpg: passphrase file %s: %w", c.PassphraseFile, err)
		}
		n := len(data)
		if n > 0 && data[n-1] == '\n' {
			n--
			if n > 0 && data[n-1] == '\r' {
				n--
			}
		}
		clear(data[n:])
		if n == 0 {
			return nil, fmt.Errorf("gpg: passphrase file %s is empty: %w", c.PassphraseFile, ErrPassphraseRequired)
		}
		return data[:n], nil
	case c.Passphrase != nil:
		data, err := c.Passphrase()
		if err != nil {
			clear(data)
			return nil, fmt.Errorf("gpg: Config.Passphrase: %w", err)
		}
		if len(data) == 0 {
			return nil, fmt.Errorf("gpg: Config.Passphrase returned an empty passphrase: %w", ErrPassphraseRequired)
		}
		return data, nil
	}
	return nil, nil
}

// describe lists the primary key IDs of keys, for messages.
func describe(keys []*v2.Entity) string {
	ids := make([]string, len(keys))
	for i, e := range keys {
		ids[i] = keyID(e)
	}
	return strings.Join(ids, ", ")
}

package gpg

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp/packet"
	v2 "github.com/ProtonMail/go-crypto/openpgp/v2"

	"github.com/kleidi-kms/kleidi"
)

// providerName is the [kleidi.Identity.Provider] of an OpenPGP identity, and [Provider.Name].
const providerName = "gpg"

var _ kleidi.RecipientOpener = OpenRecipient

// RecipientIdentity returns the [kleidi.Identity] of an OpenPGP public key (gpg --export, with or without
// --armor): a recipient that only receives key-encryption keys, such as an offline recovery key. Its
// PublicKey is the key's canonical binary form: the primary key, its latest self-signature, one user ID with
// its latest self-signature, and each encryption subkey with its latest binding signature, in the order of
// their fingerprints. Other people's certifications, signing subkeys and revoked subkeys are left out, so the
// same key gives the same identity and ID however it was exported. The identity has no certificate and no
// verify key: such a recipient never signs.
//
// RecipientIdentity refuses a key that cannot encrypt now: expired ([ErrKeyExpired]), revoked
// ([ErrKeyRevoked]), without a key that may encrypt ([ErrNoEncryptionKey]), unreadable or more than one key
// ([ErrInvalidKey]). It refuses a private key with [ErrNotPublicKey]: the private half of a recovery key
// stays offline, and only its public key is given to a node.
func RecipientIdentity(armoredPublicKey []byte) (*kleidi.Identity, error) {
	if len(armoredPublicKey) > maxKeyFileSize {
		return nil, &keyError{reason: fmt.Sprintf("of %d bytes is larger than %d", len(armoredPublicKey), maxKeyFileSize), err: ErrInvalidKey}
	}
	keys, err := parseKeys(armoredPublicKey, "")
	if err != nil {
		return nil, err
	}
	for _, e := range keys {
		if hasPrivateKey(e) {
			dropPrivateKeys(e)
			return nil, &keyError{key: keyID(e), err: ErrNotPublicKey,
				reason: "holds a private key: the private half of a recovery key must stay offline; give its public key only (gpg --export)"}
		}
	}
	if len(keys) != 1 {
		return nil, &keyError{reason: fmt.Sprintf("holds %d keys (%s), want one", len(keys), describe(keys)), err: ErrInvalidKey}
	}
	e := keys[0]
	if err := checkEncryptionKey("", e, time.Now(), pgpConfig); err != nil {
		return nil, err
	}
	pub, err := canonicalKey(e)
	if err != nil {
		return nil, err
	}
	// Check the canonical form as OpenRecipient will read it: the self-signatures it keeps must be the ones
	// that make the key valid now.
	c, err := parseRecipientKey(pub)
	if err != nil {
		return nil, err
	}
	if err := checkEncryptionKey("", c, time.Now(), pgpConfig); err != nil {
		return nil, err
	}
	id := &kleidi.Identity{Provider: providerName, PublicKey: pub}
	if err := id.Check(); err != nil {
		return nil, &keyError{key: keyID(e), reason: err.Error(), err: ErrInvalidKey}
	}
	return id, nil
}

// OpenRecipient returns the [kleidi.Recipient] of an OpenPGP identity made by [RecipientIdentity]. It is a
// [kleidi.RecipientOpener]. Its Wrap encrypts a key to that public key alone, in the format of [Provider.Wrap],
// so that a [Provider] made with the private key (Config.PrivateKeyFile, and its passphrase) unwraps it with
// [Provider.Unwrap], and no other key does.
//
// The identity comes from elsewhere, so OpenRecipient trusts none of it: the public key must be exactly one
// OpenPGP public key, in canonical form, with a key that may encrypt, and no private key; the identity must
// name the provider "gpg" and carry no certificate. Refusals wrap [ErrInvalidKey], [ErrNotPublicKey],
// [ErrKeyRevoked] or [ErrNoEncryptionKey]. A key that has expired since opens, but Wrap refuses it with
// [ErrKeyExpired]: extend it (gpg --quick-set-expire), export it again, and replace the identity.
func OpenRecipient(id *kleidi.Identity) (kleidi.Recipient, error) {
	if id == nil {
		return nil, fmt.Errorf("gpg: open recipient: no identity: %w", ErrInvalidKey)
	}
	if id.Provider != providerName {
		return nil, fmt.Errorf("gpg: open recipient: identity of provider %.40q, want %q: %w", id.Provider, providerName, ErrInvalidKey)
	}
	if err := id.Check(); err != nil {
		return nil, fmt.Errorf("gpg: open recipient: %v: %w", err, ErrInvalidKey)
	}
	if len(id.Certificate) > 0 {
		return nil, fmt.Errorf("gpg: open recipient: an OpenPGP identity has no certificate, this one has %d bytes: %w", len(id.Certificate), ErrInvalidKey)
	}
	e, err := parseRecipientKey(id.PublicKey)
	if err != nil {
		return nil, err
	}
	if err := checkEncryptionKey("", e, time.Now(), pgpConfig); err != nil && !errors.Is(err, ErrKeyExpired) {
		var ke *keyError
		if errors.As(err, &ke) {
			ke.op = "open recipient: "
		}
		return nil, err
	}
	return &recipient{id: cloneIdentity(id), keys: []*v2.Entity{e}}, nil
}

// parseRecipientKey parses the PublicKey of an identity: exactly one OpenPGP public key, without private
// parts, and in the canonical form [RecipientIdentity] writes, byte for byte.
func parseRecipientKey(b []byte) (e *v2.Entity, err error) {
	fail := func(reason string) error {
		return &keyError{op: "open recipient: ", reason: reason, err: ErrInvalidKey}
	}
	if len(b) == 0 || b[0]&0x80 == 0 {
		return nil, fail("is not a binary OpenPGP key")
	}
	defer func() {
		if recover() != nil {
			e, err = nil, fail("is not an OpenPGP key: the parser panicked")
		}
	}()
	keys, err := v2.ReadKeyRing(bytes.NewReader(b))
	if err == nil && len(keys) == 0 {
		err = errors.New("no key found")
	}
	if err != nil {
		return nil, fail("holds no OpenPGP key this package can read: " + err.Error())
	}
	for _, e := range keys {
		if hasPrivateKey(e) {
			dropPrivateKeys(e)
			return nil, &keyError{op: "open recipient: ", key: keyID(e), err: ErrNotPublicKey,
				reason: "holds a private key: an identity carries only a public key"}
		}
	}
	if len(keys) != 1 {
		return nil, fail(fmt.Sprintf("holds %d keys, want one", len(keys)))
	}
	canonical, err := canonicalKey(keys[0])
	if err != nil {
		var ke *keyError
		if errors.As(err, &ke) {
			ke.op = "open recipient: "
		}
		return nil, err
	}
	if !bytes.Equal(canonical, b) {
		return nil, &keyError{op: "open recipient: ", key: keyID(keys[0]), err: ErrInvalidKey,
			reason: "is not in the canonical form of an identity (extra packets, signatures or bytes): make the identity with gpg.RecipientIdentity"}
	}
	// Parse the canonical bytes again, so that the signature checks the canonical form cached are made again
	// by the checks that follow, with the same configuration.
	keys, err = v2.ReadKeyRing(bytes.NewReader(canonical))
	if err != nil || len(keys) != 1 {
		return nil, fail("cannot be read again")
	}
	return keys[0], nil
}

// hasPrivateKey reports whether e holds a private key packet, even a stub.
func hasPrivateKey(e *v2.Entity) bool {
	if e.PrivateKey != nil {
		return true
	}
	for i := range e.Subkeys {
		if e.Subkeys[i].PrivateKey != nil {
			return true
		}
	}
	return false
}

// canonicalKey returns the canonical binary form of the public key e: the primary key; its latest valid
// direct-key self-signature, if any; the user ID a recipient's preferences come from (valid, preferring one
// marked primary, then the newest, then the first by name) with its latest valid self-signature; and each
// encryption subkey that is bound and not revoked, with its latest valid binding signature, ordered by
// fingerprint. No choice depends on the time now, so the same key gives the same bytes at any time.
func canonicalKey(e *v2.Entity) ([]byte, error) {
	fail := func(reason string) error {
		return &keyError{key: keyID(e), reason: reason, err: ErrInvalidKey}
	}
	var zero time.Time // no time checks: validity now is checked apart
	var buf bytes.Buffer
	if err := e.PrimaryKey.Serialize(&buf); err != nil {
		return nil, fail("cannot be serialized: " + err.Error())
	}
	if sig, err := e.LatestValidDirectSignature(zero, pgpConfig); err == nil {
		if err := sig.Serialize(&buf); err != nil {
			return nil, fail("cannot be serialized: " + err.Error())
		}
	} else if e.PrimaryKey.Version == 6 {
		return nil, fail("has no valid direct-key self-signature")
	}

	var uid *v2.Identity
	var uidSig *packet.Signature
	for _, ident := range e.Identities {
		sig, err := ident.Verify(zero, pgpConfig)
		if err != nil {
			continue
		}
		if uid == nil || preferIdentity(uidSig, uid.Name, sig, ident.Name) {
			uid, uidSig = ident, sig
		}
	}
	switch {
	case uid != nil:
		if err := uid.UserId.Serialize(&buf); err != nil {
			return nil, fail("cannot be serialized: " + err.Error())
		}
		if err := uidSig.Serialize(&buf); err != nil {
			return nil, fail("cannot be serialized: " + err.Error())
		}
	case e.PrimaryKey.Version < 6:
		return nil, fail("has no user ID with a valid self-signature")
	}

	type bound struct {
		pub *packet.PublicKey
		sig *packet.Signature
	}
	var subkeys []bound
	for i := range e.Subkeys {
		s := &e.Subkeys[i]
		sig, err := s.LatestValidBindingSignature(zero, pgpConfig)
		if err != nil || !s.PublicKey.PubKeyAlgo.CanEncrypt() || !sig.FlagsValid ||
			!(sig.FlagEncryptCommunications || sig.FlagEncryptStorage) || s.Revoked(sig, zero) {
			continue
		}
		subkeys = append(subkeys, bound{s.PublicKey, sig})
	}
	slices.SortFunc(subkeys, func(a, b bound) int { return bytes.Compare(a.pub.Fingerprint, b.pub.Fingerprint) })
	subkeys = slices.CompactFunc(subkeys, func(a, b bound) bool { return bytes.Equal(a.pub.Fingerprint, b.pub.Fingerprint) })
	for _, s := range subkeys {
		if err := s.pub.Serialize(&buf); err != nil {
			return nil, fail("cannot be serialized: " + err.Error())
		}
		if err := s.sig.Serialize(&buf); err != nil {
			return nil, fail("cannot be serialized: " + err.Error())
		}
	}
	return buf.Bytes(), nil
}

// preferIdentity reports whether the user ID name with self-signature sig is preferred over the user ID
// best with bestSig: one marked primary, then the newer, then the first by name.
func preferIdentity(bestSig *packet.Signature, best string, sig *packet.Signature, name string) bool {
	primary := func(s *packet.Signature) bool { return s.IsPrimaryId != nil && *s.IsPrimaryId }
	if primary(sig) != primary(bestSig) {
		return primary(sig)
	}
	if !sig.CreationTime.Equal(bestSig.CreationTime) {
		return sig.CreationTime.After(bestSig.CreationTime)
	}
	return name < best
}

// recipient is the [kleidi.Recipient] of an OpenPGP public key.
type recipient struct {
	id   *kleidi.Identity
	mu   sync.Mutex // serialises go-crypto calls, which cache signature checks in the key
	keys []*v2.Entity
}

// Identity returns a copy of the identity the recipient was opened from.
func (r *recipient) Identity() *kleidi.Identity { return cloneIdentity(r.id) }

// Wrap encrypts key (1 to [MaxKeySize] bytes) to the recipient's public key alone, as [Provider.Wrap] does.
// It fails with an error wrapping [ErrKeyExpired] once the key has expired.
func (r *recipient) Wrap(ctx context.Context, key []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("gpg: wrap: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := checkEncryptionKey("", r.keys[0], time.Now(), pgpConfig); err != nil {
		var ke *keyError
		if errors.As(err, &ke) {
			ke.op = "wrap: "
		}
		return nil, err
	}
	return wrapKey(r.keys, key)
}

func cloneIdentity(id *kleidi.Identity) *kleidi.Identity {
	return &kleidi.Identity{
		Provider:    id.Provider,
		PublicKey:   bytes.Clone(id.PublicKey),
		Certificate: bytes.Clone(id.Certificate),
		VerifyKey:   bytes.Clone(id.VerifyKey),
	}
}

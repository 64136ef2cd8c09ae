package tpm

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kleidi-kms/kleidi"
)

// The PublicKey of a TPM node's identity, version 1. All integers are big-endian.
//
//	magic      4 bytes  "KTPN"
//	version    1 byte   1
//	flags      1 byte   bit 0: the node is configured with an auth value; other bits are zero
//	pcrs       4 bytes  bit i set: the node is bound to SHA-256 PCR i (i < 24)
//	ek         2-byte length + TPMT_PUBLIC of the endorsement key (the TCG RSA 2048 EK template)
//	policy     2-byte length + the 32-byte SHA-256 authPolicy a duplicate for this node carries
//
// Nothing follows. flags and pcrs say how the node is configured, for people and for the duplicate's header;
// policy is what binds a duplicate to the node's TPM, PCR values and auth value (see duplicatePolicy).
const (
	nodeKeyMagic   = "KTPN"
	nodeKeyVersion = 1
)

// nodeKey is a parsed identity PublicKey.
type nodeKey struct {
	auth   bool
	pcrs   uint32
	ek     []byte // TPMT_PUBLIC
	policy []byte // 32 bytes

	ekPublic *tpm2.TPMTPublic // parsed from ek (not marshalled)
}

var errNodeKey = errors.New("not a TPM node public key of this format")

func (k *nodeKey) marshal() []byte {
	out := make([]byte, 0, 4+1+1+4+2+len(k.ek)+2+len(k.policy))
	out = append(out, nodeKeyMagic...)
	out = append(out, nodeKeyVersion)
	var flags byte
	if k.auth {
		flags |= flagAuth
	}
	out = append(out, flags)
	out = binary.BigEndian.AppendUint32(out, k.pcrs)
	for _, f := range [][]byte{k.ek, k.policy} {
		out = binary.BigEndian.AppendUint16(out, uint16(len(f)))
		out = append(out, f...)
	}
	return out
}

// parseNodeKey parses an identity PublicKey strictly: known magic and version, no unknown flag or PCR bit, every
// length within the input, an endorsement key of the TCG RSA 2048 EK template, a SHA-256 policy, no trailing
// byte. Errors wrap errNodeKey.
func parseNodeKey(in []byte) (*nodeKey, error) {
	if len(in) > kleidi.MaxIdentitySize {
		return nil, fmt.Errorf("%w: %d bytes", errNodeKey, len(in))
	}
	if len(in) < 10 || string(in[:4]) != nodeKeyMagic {
		return nil, fmt.Errorf("%w: bad magic", errNodeKey)
	}
	if in[4] != nodeKeyVersion {
		return nil, fmt.Errorf("%w: unknown version %d", errNodeKey, in[4])
	}
	if in[5]&^flagAuth != 0 {
		return nil, fmt.Errorf("%w: unknown flags %#x", errNodeKey, in[5])
	}
	k := &nodeKey{auth: in[5]&flagAuth != 0, pcrs: binary.BigEndian.Uint32(in[6:10])}
	if k.pcrs>>numPCRs != 0 {
		return nil, fmt.Errorf("%w: PCR selection %#x names a PCR above %d", errNodeKey, k.pcrs, numPCRs-1)
	}
	rest, err := splitFields(in[10:], &k.ek, &k.policy)
	if err != nil || len(rest) != 0 {
		return nil, fmt.Errorf("%w: bad field lengths", errNodeKey)
	}
	if len(k.policy) != sha256.Size {
		return nil, fmt.Errorf("%w: policy is not a SHA-256 digest", errNodeKey)
	}
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](k.ek)
	if err != nil || !bytes.Equal(tpm2.Marshal(pub), k.ek) || !isEKTemplate(pub) {
		return nil, fmt.Errorf("%w: the endorsement key is not of the TCG RSA 2048 template", errNodeKey)
	}
	k.ekPublic = pub
	return k, nil
}

// splitFields cuts a 2-byte length and that many bytes (at least one) from in for each field, and returns the
// rest.
func splitFields(in []byte, fields ...*[]byte) ([]byte, error) {
	for _, f := range fields {
		if len(in) < 2 {
			return nil, errors.New("truncated")
		}
		n := int(binary.BigEndian.Uint16(in))
		in = in[2:]
		if n == 0 || n > len(in) {
			return nil, fmt.Errorf("field length %d out of range", n)
		}
		*f = in[:n:n]
		in = in[n:]
	}
	return in, nil
}

// OpenRecipient implements [kleidi.RecipientOpener] for TPM identities (made by [Provider.Identity]): it parses
// the identity's public key and, when the identity carries an endorsement key certificate, checks that the
// certificate certifies that endorsement key; an identity whose certificate certifies another key is refused
// with an error wrapping [kleidi.ErrUnauthenticated]. It checks neither who issued the certificate nor that the
// identity belongs to the node it claims: compare its ID with the one the node printed.
//
// The recipient's Wrap needs no TPM: it duplicates the key in software to the node's endorsement key.
func OpenRecipient(id *kleidi.Identity) (kleidi.Recipient, error) {
	if err := id.Check(); err != nil {
		return nil, fmt.Errorf("tpm: recipient: %w", err)
	}
	if id.Provider != "tpm" {
		return nil, fmt.Errorf("tpm: recipient: identity of provider %q, not tpm", id.Provider)
	}
	k, err := parseNodeKey(id.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("tpm: recipient %s: %w", id.ID(), err)
	}
	encap, err := tpm2.ImportEncapsulationKey(k.ekPublic)
	if err != nil {
		return nil, fmt.Errorf("tpm: recipient %s: %w: endorsement key: %v", id.ID(), errNodeKey, err)
	}
	if len(id.Certificate) > 0 {
		if err := checkEKCert(id.Certificate, k.ekPublic); err != nil {
			return nil, fmt.Errorf("tpm: recipient %s: %w: %v", id.ID(), kleidi.ErrUnauthenticated, err)
		}
	}
	ek, err := tpm2.ObjectName(k.ekPublic)
	if err != nil {
		return nil, fmt.Errorf("tpm: recipient %s: %w", id.ID(), err)
	}
	c := *id
	return &recipient{id: &c, key: k, ekName: ek.Buffer, encap: encap}, nil
}

var (
	oidRSAEncryption = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 1}
	oidRSAESOAEP     = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 7}
)

// checkEKCert returns nil if cert is an X.509 certificate (DER, nothing after it) whose subject public key is the
// RSA key of ek. It reads only the structure down to the subject public key, so that the certificates of
// TPMs that the standard parser refuses (an RSAES-OAEP key, a negative serial number) are checked too.
func checkEKCert(cert []byte, ek *tpm2.TPMTPublic) error {
	var c struct {
		TBS struct {
			Version   asn1.RawValue `asn1:"optional,explicit,tag:0"`
			Serial    asn1.RawValue
			Signature asn1.RawValue
			Issuer    asn1.RawValue
			Validity  asn1.RawValue
			Subject   asn1.RawValue
			SPKI      struct {
				Algorithm struct {
					OID    asn1.ObjectIdentifier
					Params asn1.RawValue `asn1:"optional"`
				}
				Key asn1.BitString
			}
			Rest []asn1.RawValue `asn1:"optional"`
		}
		SigAlg asn1.RawValue
		Sig    asn1.BitString
	}
	rest, err := asn1.Unmarshal(cert, &c)
	if err != nil {
		return fmt.Errorf("endorsement key certificate: %v", err)
	}
	if len(rest) != 0 {
		return errors.New("endorsement key certificate: data after it")
	}
	alg := c.TBS.SPKI.Algorithm.OID
	if !alg.Equal(oidRSAEncryption) && !alg.Equal(oidRSAESOAEP) {
		return fmt.Errorf("endorsement key certificate: key algorithm %v is not RSA", alg)
	}
	certKey, err := x509.ParsePKCS1PublicKey(c.TBS.SPKI.Key.RightAlign())
	if err != nil {
		return fmt.Errorf("endorsement key certificate: %v", err)
	}
	params, err := ek.Parameters.RSADetail()
	if err != nil {
		return err
	}
	n, err := ek.Unique.RSA()
	if err != nil {
		return err
	}
	ekKey, err := tpm2.RSAPub(params, n)
	if err != nil {
		return err
	}
	if !certKey.Equal(&rsa.PublicKey{N: ekKey.N, E: ekKey.E}) {
		return errors.New("the endorsement key certificate certifies another key")
	}
	return nil
}

// recipient wraps keys for another TPM node: see [OpenRecipient].
type recipient struct {
	id     *kleidi.Identity
	key    *nodeKey
	ekName []byte
	encap  tpm2.LabeledEncapsulationKey
}

// Identity implements [kleidi.Recipient].
func (r *recipient) Identity() *kleidi.Identity {
	c := *r.id
	return &c
}

// Wrap implements [kleidi.Recipient]: it makes a sealed data object holding key (1 to [MaxKeySize] bytes) whose
// authPolicy is the node's duplicate policy, and duplicates it in software to the node's endorsement key (an
// outer wrapper only, as TPM2_Import expects for an object without encryptedDuplication). It needs no TPM. Only
// that node's TPM can import the result, and only its [Provider.Unwrap], in the boot state and with the auth
// value its identity was made in, unseals it.
func (r *recipient) Wrap(ctx context.Context, key []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("tpm: wrap for %s: %w", r.id.ID(), err)
	}
	if len(key) == 0 {
		return nil, errors.New("tpm: wrap: empty key")
	}
	if len(key) > MaxKeySize {
		return nil, fmt.Errorf("tpm: wrap: %w: key of %d bytes, the TPM seals at most %d", kleidi.ErrTooLarge, len(key), MaxKeySize)
	}
	seed := make([]byte, sha256.Size)
	if _, err := rand.Read(seed); err != nil {
		return nil, fmt.Errorf("tpm: wrap: %w", err)
	}
	h := sha256.New()
	h.Write(seed)
	h.Write(key)
	pub := duplicateTemplate(r.key.policy)
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: h.Sum(nil)})
	name, err := tpm2.ObjectName(&pub)
	if err != nil {
		return nil, fmt.Errorf("tpm: wrap: %w", err)
	}
	sensitive := tpm2.Marshal(tpm2.TPMTSensitive{
		SensitiveType: tpm2.TPMAlgKeyedHash,
		SeedValue:     tpm2.TPM2BDigest{Buffer: seed},
		Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BSensitiveData{Buffer: key}),
	})
	private, seedCipher, err := tpm2.CreateDuplicate(rand.Reader, r.encap, name.Buffer, sensitive)
	clear(sensitive)
	clear(seed)
	if err != nil {
		return nil, fmt.Errorf("tpm: wrap for %s: duplicating: %w", r.id.ID(), err)
	}
	d := dupBlob{auth: r.key.auth, pcrs: r.key.pcrs, parent: r.ekName, public: tpm2.Marshal(pub), private: private, seed: seedCipher}
	return d.marshal(), nil
}

// The wrapped form of a key duplicated to another node's TPM, version 1. All integers are big-endian.
//
//	magic      4 bytes  "KTPD"
//	version    1 byte   1
//	flags      1 byte   bit 0: the receiving node is configured with an auth value; other bits are zero
//	pcrs       4 bytes  bit i set: the receiving node is bound to SHA-256 PCR i (i < 24)
//	parent     2-byte length + TPM2B_NAME contents: the name of the endorsement key it was duplicated to
//	public     2-byte length + TPMT_PUBLIC of the duplicated sealed object
//	private    2-byte length + TPM2B_PRIVATE contents: the duplicate (outer HMAC and encrypted sensitive area)
//	seed       2-byte length + TPM2B_ENCRYPTED_SECRET contents: the outer wrapper's seed, encrypted to the EK
//
// Nothing follows. Its magic tells it from a key sealed by [Provider.Wrap] ("KTPM").
const (
	dupMagic   = "KTPD"
	dupVersion = 1
)

// dupBlob is a parsed duplicate.
type dupBlob struct {
	auth    bool
	pcrs    uint32
	parent  []byte
	public  []byte
	private []byte
	seed    []byte

	policy []byte // the duplicated object's authPolicy, from public (not marshalled)
}

func (d *dupBlob) marshal() []byte {
	out := make([]byte, 0, 10+8+len(d.parent)+len(d.public)+len(d.private)+len(d.seed))
	out = append(out, dupMagic...)
	out = append(out, dupVersion)
	var flags byte
	if d.auth {
		flags |= flagAuth
	}
	out = append(out, flags)
	out = binary.BigEndian.AppendUint32(out, d.pcrs)
	for _, f := range [][]byte{d.parent, d.public, d.private, d.seed} {
		out = binary.BigEndian.AppendUint16(out, uint16(len(f)))
		out = append(out, f...)
	}
	return out
}

// isDuplicate reports whether wrapped claims to be a duplicate (rather than a sealed key).
func isDuplicate(wrapped []byte) bool { return bytes.HasPrefix(wrapped, []byte(dupMagic)) }

// parseDuplicate parses a duplicate strictly: known magic and version, no unknown flag or PCR bit, every length
// within the input, a SHA-256 parent name, a public area of the shape duplicateTemplate gives, and no trailing
// byte. Errors wrap errBlob and never hold the input.
func parseDuplicate(in []byte) (*dupBlob, error) {
	if len(in) > kleidi.MaxWrappedKeySize {
		return nil, fmt.Errorf("%w: %d bytes, more than %d", errBlob, len(in), kleidi.MaxWrappedKeySize)
	}
	if len(in) < 10 || string(in[:4]) != dupMagic {
		return nil, fmt.Errorf("%w: bad magic", errBlob)
	}
	if in[4] != dupVersion {
		return nil, fmt.Errorf("%w: unknown duplicate version %d", errBlob, in[4])
	}
	if in[5]&^flagAuth != 0 {
		return nil, fmt.Errorf("%w: unknown flags %#x", errBlob, in[5])
	}
	d := &dupBlob{auth: in[5]&flagAuth != 0, pcrs: binary.BigEndian.Uint32(in[6:10])}
	if d.pcrs>>numPCRs != 0 {
		return nil, fmt.Errorf("%w: PCR selection %#x names a PCR above %d", errBlob, d.pcrs, numPCRs-1)
	}
	rest, err := splitFields(in[10:], &d.parent, &d.public, &d.private, &d.seed)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errBlob, err)
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: %d trailing bytes", errBlob, len(rest))
	}
	if len(d.parent) != 2+sha256.Size || binary.BigEndian.Uint16(d.parent) != uint16(tpm2.TPMAlgSHA256) {
		return nil, fmt.Errorf("%w: parent name is not a SHA-256 name", errBlob)
	}
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](d.public)
	if err != nil {
		return nil, fmt.Errorf("%w: public area: %v", errBlob, err)
	}
	if !bytes.Equal(tpm2.Marshal(pub), d.public) {
		return nil, fmt.Errorf("%w: public area is not canonical", errBlob)
	}
	if err := checkDuplicatePublic(pub); err != nil {
		return nil, err
	}
	d.policy = pub.AuthPolicy.Buffer
	return d, nil
}

// duplicateTemplate is the public area of a duplicated KEK, but for its unique field: a sealed data object usable
// only through its policy. It cannot be fixedTPM or fixedParent (TPM2_Import refuses such objects); once
// imported, it is usable only on the TPM it was imported to.
func duplicateTemplate(policy []byte) tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgKeyedHash,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			AdminWithPolicy: true,
			NoDA:            true,
		},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: policy},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash,
			&tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull}}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{}),
	}
}

// checkDuplicatePublic checks that pub has the shape of duplicateTemplate, so Unwrap never unseals an object that
// skips the policy.
func checkDuplicatePublic(pub *tpm2.TPMTPublic) error {
	want := duplicateTemplate(nil)
	if pub.Type != want.Type || pub.NameAlg != want.NameAlg || pub.ObjectAttributes != want.ObjectAttributes {
		return fmt.Errorf("%w: not a duplicated object of the expected type and attributes", errBlob)
	}
	if len(pub.AuthPolicy.Buffer) != sha256.Size {
		return fmt.Errorf("%w: policy digest is not SHA-256", errBlob)
	}
	params, err := pub.Parameters.KeyedHashDetail()
	if err != nil || params.Scheme.Scheme != tpm2.TPMAlgNull {
		return fmt.Errorf("%w: not a sealed data object", errBlob)
	}
	unique, err := pub.Unique.KeyedHash()
	if err != nil || len(unique.Buffer) != sha256.Size {
		return fmt.Errorf("%w: unique field is not a SHA-256 digest", errBlob)
	}
	return nil
}

// unwrapDuplicate imports a duplicate made by a [kleidi.Recipient] of this node's identity under the endorsement
// key, loads it, and unseals it through its policy: PolicySecret with the signing key, used through a session
// that satisfies the configured policy with the auth value. It first checks that the duplicate was made for this
// TPM's endorsement key and for the policy this provider's configuration gives now. At most three objects are
// loaded at a time (the SRK, the EK or the signing key, the imported object), as TPMs without a resource manager
// allow; everything is flushed before it returns.
func (p *Provider) unwrapDuplicate(ctx context.Context, wrapped []byte) ([]byte, error) {
	d, err := parseDuplicate(wrapped)
	if err != nil {
		return nil, fmt.Errorf("tpm: unwrap: %w: %w", kleidi.ErrUnwrap, err)
	}
	var key []byte
	err = p.do(ctx, "unwrap", true, func(t transport.TPM, srk *storageKey) error {
		if d.auth != (p.auth != nil) {
			return fmt.Errorf("%w: %w: the key was made for a node configured with an auth value %v, this provider %v",
				ErrPolicy, kleidi.ErrUnwrap, d.auth, p.auth != nil)
		}
		if err := p.checkPin(srk); err != nil {
			return fmt.Errorf("%w: %w", kleidi.ErrUnwrap, err)
		}
		if d.pcrs != p.pcrs {
			return fmt.Errorf("%w: %w: the key is bound to PCRs %v, this provider to %v", ErrPolicy, kleidi.ErrUnwrap,
				pcrList(d.pcrs), pcrList(p.pcrs))
		}
		sk, err := p.loadSigningKey(t, srk)
		if err != nil {
			return err
		}
		flushContext(t, sk.handle)
		if !bytes.Equal(d.policy, duplicatePolicy(sk.name)) {
			return fmt.Errorf("%w: %w: the key's policy is not the one this TPM gives now with PCRs %v and its auth value (made for another TPM, or the PCRs changed)",
				ErrPolicy, kleidi.ErrUnwrap, pcrList(p.pcrs))
		}
		ek, err := loadEK(t)
		if err != nil {
			return err
		}
		loaded, err := importUnderEK(t, ek, d)
		ek.flush(t)
		if err != nil {
			return err
		}
		defer flushContext(t, loaded.ObjectHandle)
		sk, err = p.loadSigningKey(t, srk)
		if err != nil {
			return err
		}
		defer flushContext(t, sk.handle)
		inner := p.signKeySession(srk)
		defer flushSession(t, inner)
		outer := tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(t transport.TPM, h tpm2.TPMISHPolicy, _ tpm2.TPM2BNonce) error {
			_, err := tpm2.PolicySecret{
				AuthHandle:    tpm2.AuthHandle{Handle: sk.handle, Name: sk.name, Auth: inner},
				PolicySession: h,
				PolicyRef:     tpm2.TPM2BNonce{Buffer: []byte(duplicateLabel)},
			}.Execute(t)
			return err
		}, tpm2.Salted(srk.handle, srk.public), tpm2.AESEncryption(128, tpm2.EncryptOut))
		defer flushSession(t, outer)
		key, err = unseal(t, loaded.ObjectHandle, loaded.Name, outer, "duplicated object")
		return err
	})
	if err != nil {
		return nil, err
	}
	return key, nil
}

// importUnderEK checks that d was made for ek, imports it and loads it under ek. The caller flushes the loaded
// object.
func importUnderEK(t transport.TPM, ek *endorsementKey, d *dupBlob) (*tpm2.LoadResponse, error) {
	if !bytes.Equal(d.parent, ek.name.Buffer) {
		return nil, fmt.Errorf("%w: the key was duplicated to another TPM's endorsement key", kleidi.ErrUnwrap)
	}
	public := tpm2.BytesAs2B[tpm2.TPMTPublic](d.public)
	imp := ekSession()
	defer flushSession(t, imp)
	ir, err := tpm2.Import{
		ParentHandle: tpm2.AuthHandle{Handle: ek.handle, Name: ek.name, Auth: imp},
		ObjectPublic: public,
		Duplicate:    tpm2.TPM2BPrivate{Buffer: d.private},
		InSymSeed:    tpm2.TPM2BEncryptedSecret{Buffer: d.seed},
		Symmetric:    tpm2.TPMTSymDef{Algorithm: tpm2.TPMAlgNull},
	}.Execute(t)
	if err != nil {
		if isTransient(err) {
			return nil, err
		}
		var te *transportError
		if errors.As(err, &te) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: the TPM refused the duplicate (damaged, or not made for this TPM): %w", kleidi.ErrUnwrap, err)
	}
	ld := ekSession()
	defer flushSession(t, ld)
	loaded, err := tpm2.Load{
		ParentHandle: tpm2.AuthHandle{Handle: ek.handle, Name: ek.name, Auth: ld},
		InPrivate:    ir.OutPrivate,
		InPublic:     public,
	}.Execute(t)
	if err != nil {
		if isTransient(err) {
			return nil, err
		}
		var te *transportError
		if errors.As(err, &te) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: the TPM refused the imported duplicate: %w", kleidi.ErrUnwrap, err)
	}
	return loaded, nil
}

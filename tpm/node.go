package tpm

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kleidi-kms/kleidi"
)

var (
	_ kleidi.Node            = (*Provider)(nil)
	_ kleidi.RecipientOpener = OpenRecipient
)

// The TPM's endorsement key and its certificate, as the TCG EK Credential Profile places them.
const (
	// ekHandle is the persistent handle the TCG reserves for the RSA 2048 endorsement key.
	ekHandle tpm2.TPMHandle = 0x81010001
	// ekCertIndex is the NV index of the RSA 2048 endorsement key's certificate.
	ekCertIndex tpm2.TPMHandle = 0x01c00002
	// maxEKCertSize bounds the endorsement key certificate read from NV.
	maxEKCertSize = 8 << 10
	// nvChunk is how many bytes one TPM2_NV_Read asks for: every TPM reads at least this many at once.
	nvChunk = 512
)

// signLabel names the signing key of [Provider.Sign]: the unique field of its template is
// HMAC-SHA256(auth value, signLabel).
const signLabel = "kleidi signing key v1"

// duplicateLabel is the policyRef of the PolicySecret that a duplicate's policy holds (see duplicatePolicy).
const duplicateLabel = "kleidi duplicate v1"

// Identity implements [kleidi.Node]. It returns this TPM's identity under the provider's configuration:
//   - PublicKey: the endorsement key's public area (the TCG RSA 2048 EK template, the key the EK certificate
//     certifies), the configured PCR selection and auth flag, and the policy a key wrapped for this node must
//     carry (see "Several nodes" in the package documentation);
//   - Certificate: the endorsement key certificate from NV index 0x01c00002, when the TPM has one;
//   - VerifyKey: the public key of [Provider.Sign], a key only this TPM can use, and only under the configured
//     PCR policy and auth value.
//
// All of it derives from the TPM's seeds and the configuration, so the identity is the same at every call, after
// a restart and after the keyring is lost; another boot state of the configured PCRs or another auth value gives
// another identity. Errors wrap [ErrStorageKeyChanged] when the TPM presents another storage root key and
// [kleidi.ErrUnavailable] when it cannot be reached.
func (p *Provider) Identity(ctx context.Context) (*kleidi.Identity, error) {
	var id *kleidi.Identity
	err := p.do(ctx, "identity", true, func(t transport.TPM, srk *storageKey) error {
		if err := p.checkPin(srk); err != nil {
			return err
		}
		sk, err := p.loadSigningKey(t, srk)
		if err != nil {
			return err
		}
		flushContext(t, sk.handle)
		verifyKey, err := x509.MarshalPKIXPublicKey(sk.pub)
		if err != nil {
			return err
		}
		ek, err := loadEK(t)
		if err != nil {
			return err
		}
		ek.flush(t)
		cert, err := readEKCert(t)
		if err != nil {
			return err
		}
		nk := nodeKey{auth: p.auth != nil, pcrs: p.pcrs, ek: tpm2.Marshal(ek.public), policy: duplicatePolicy(sk.name)}
		id = &kleidi.Identity{Provider: p.Name(), PublicKey: nk.marshal(), Certificate: cert, VerifyKey: verifyKey}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return id, nil
}

// Sign implements [kleidi.Node]: it signs message with the signing key of the identity's VerifyKey, ECDSA P-256
// over SHA-256, ASN.1 DER. The signing key is a primary key of the owner hierarchy derived, like the proof key
// of [Provider.Prove], from a template that holds the configured policy (PolicyPCR over the configured PCRs'
// current values, then PolicyAuthValue) as its authPolicy and HMAC-SHA256(auth value, label) as its unique field:
// only this TPM can use it, only through a session that satisfies that policy, and only with the auth value.
func (p *Provider) Sign(ctx context.Context, message []byte) ([]byte, error) {
	var sig []byte
	err := p.do(ctx, "sign", true, func(t transport.TPM, srk *storageKey) error {
		if err := p.checkPin(srk); err != nil {
			return err
		}
		sk, err := p.loadSigningKey(t, srk)
		if err != nil {
			return err
		}
		defer flushContext(t, sk.handle)
		digest := sha256.Sum256(message)
		sess := p.signKeySession(srk)
		defer flushSession(t, sess)
		rsp, err := tpm2.Sign{
			KeyHandle: tpm2.AuthHandle{Handle: sk.handle, Name: sk.name, Auth: sess},
			Digest:    tpm2.TPM2BDigest{Buffer: digest[:]},
			InScheme: tpm2.TPMTSigScheme{
				Scheme:  tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSchemeHash{HashAlg: tpm2.TPMAlgSHA256}),
			},
			Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
		}.Execute(t)
		if err != nil {
			return err
		}
		ec, err := rsp.Signature.Signature.ECDSA()
		if err != nil {
			return fmt.Errorf("the TPM's signature is not ECDSA: %w", err)
		}
		sig, err = asn1.Marshal(struct{ R, S *big.Int }{
			new(big.Int).SetBytes(ec.SignatureR.Buffer), new(big.Int).SetBytes(ec.SignatureS.Buffer),
		})
		return err
	})
	if err != nil {
		return nil, err
	}
	return sig, nil
}

// signingKey is the signing key of [Provider.Sign] as loaded on the current connection.
type signingKey struct {
	handle tpm2.TPMHandle
	name   tpm2.TPM2BName
	pub    *ecdsa.PublicKey
}

// loadSigningKey creates the signing primary key (see [Provider.Sign]). The auth value travels encrypted by a
// session salted with the pinned SRK. The caller flushes the key.
func (p *Provider) loadSigningKey(t transport.TPM, srk *storageKey) (*signingKey, error) {
	policy, err := p.policyDigest(t)
	if err != nil {
		return nil, err
	}
	enc := tpm2.HMAC(tpm2.TPMAlgSHA256, 16, tpm2.Salted(srk.handle, srk.public), tpm2.AESEncryption(128, tpm2.EncryptIn))
	defer flushSession(t, enc)
	cp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
			UserAuth: tpm2.TPM2BAuth{Buffer: p.auth},
		}},
		InPublic: tpm2.New2B(signTemplate(policy, p.auth)),
	}.Execute(t, enc)
	if err != nil {
		return nil, err
	}
	sk, err := signingKeyOf(cp)
	if err != nil {
		flushContext(t, cp.ObjectHandle)
		return nil, err
	}
	return sk, nil
}

func signingKeyOf(cp *tpm2.CreatePrimaryResponse) (*signingKey, error) {
	pub, err := cp.OutPublic.Contents()
	if err != nil {
		return nil, err
	}
	name, err := tpm2.ObjectName(pub)
	if err != nil {
		return nil, err
	}
	point, err := pub.Unique.ECC()
	if err != nil {
		return nil, err
	}
	if len(point.X.Buffer) != 32 || len(point.Y.Buffer) != 32 {
		return nil, errors.New("the signing key is not a P-256 point")
	}
	uncompressed := append(append([]byte{4}, point.X.Buffer...), point.Y.Buffer...)
	pk, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), uncompressed)
	if err != nil {
		return nil, fmt.Errorf("the signing key is not a P-256 point: %v", err)
	}
	return &signingKey{handle: cp.ObjectHandle, name: *name, pub: pk}, nil
}

// signTemplate is the public area of the signing primary key: an ECDSA P-256 (SHA-256) key of this TPM, usable
// only through policy (the configured policy digest), whose unique field holds HMAC-SHA256(auth value,
// signLabel), so that the key depends on the PCR policy and on the auth value.
func signTemplate(policy, auth []byte) tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            true,
			FixedParent:         true,
			SensitiveDataOrigin: true,
			AdminWithPolicy:     true,
			NoDA:                auth == nil,
			SignEncrypt:         true,
		},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: policy},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTECCScheme{
				Scheme:  tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
			},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: hmacSHA256(auth, []byte(signLabel))},
			Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
		}),
	}
}

// signKeySession returns a policy session that satisfies the signing key's policy (the configured policy, with
// the configured auth value), salted with srk so that no one on the bus can test guesses of the auth value
// against it. It encrypts nothing: it also authorises commands whose parameters cannot be encrypted.
func (p *Provider) signKeySession(srk *storageKey) tpm2.Session {
	return tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(t transport.TPM, h tpm2.TPMISHPolicy, _ tpm2.TPM2BNonce) error {
		if p.pcrs != 0 {
			if _, err := (tpm2.PolicyPCR{PolicySession: h, Pcrs: pcrSelection(p.pcrs)}).Execute(t); err != nil {
				return err
			}
		}
		_, err := tpm2.PolicyAuthValue{PolicySession: h}.Execute(t)
		return err
	}, tpm2.Auth(p.auth), tpm2.Salted(srk.handle, srk.public))
}

// duplicatePolicy is the authPolicy of a duplicate made for this node: PolicySecret with the signing key whose
// name is signName, and duplicateLabel as policyRef. Only a session that uses the signing key (this TPM, the
// configured PCRs in the same state, the auth value) satisfies it.
func duplicatePolicy(signName tpm2.TPM2BName) []byte {
	calc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		panic(err) // SHA-256 is always there
	}
	err = tpm2.PolicySecret{
		AuthHandle: tpm2.NamedHandle{Handle: tpm2.TPMRHNull, Name: signName},
		PolicyRef:  tpm2.TPM2BNonce{Buffer: []byte(duplicateLabel)},
	}.Update(calc)
	if err != nil {
		panic(err)
	}
	return calc.Hash().Digest
}

// endorsementKey is the TPM's RSA 2048 endorsement key as loaded on the current connection.
type endorsementKey struct {
	handle     tpm2.TPMHandle
	name       tpm2.TPM2BName
	public     tpm2.TPMTPublic
	persistent bool
}

// flush flushes the endorsement key unless it is persistent.
func (k *endorsementKey) flush(t transport.TPM) {
	if !k.persistent {
		flushContext(t, k.handle)
	}
}

// loadEK takes the endorsement key from the TCG's persistent handle if it has the TCG RSA 2048 EK template, or
// else creates it from that template under the endorsement hierarchy: both give the same key, the one the EK
// certificate certifies. The endorsement hierarchy must have an empty auth value, as the TCG recommends.
func loadEK(t transport.TPM) (*endorsementKey, error) {
	rp, err := tpm2.ReadPublic{ObjectHandle: ekHandle}.Execute(t)
	if err == nil {
		if pub, perr := rp.OutPublic.Contents(); perr == nil && isEKTemplate(pub) {
			if name, nerr := tpm2.ObjectName(pub); nerr == nil {
				return &endorsementKey{handle: ekHandle, name: *name, public: *pub, persistent: true}, nil
			}
		}
	}
	var te *transportError
	if errors.As(err, &te) {
		return nil, err
	}
	cp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tpm2.RSAEKTemplate),
	}.Execute(t)
	if err != nil {
		if errors.As(err, &te) || isTransient(err) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: creating the endorsement key (is an endorsement password set?): %w", kleidi.ErrUnavailable, err)
	}
	pub, err := cp.OutPublic.Contents()
	if err == nil && !isEKTemplate(pub) {
		err = errors.New("the TPM created an endorsement key of another template")
	}
	var name *tpm2.TPM2BName
	if err == nil {
		name, err = tpm2.ObjectName(pub)
	}
	if err != nil {
		flushContext(t, cp.ObjectHandle)
		return nil, err
	}
	return &endorsementKey{handle: cp.ObjectHandle, name: *name, public: *pub}, nil
}

// isEKTemplate reports whether pub is the TCG RSA 2048 EK template with a 2048-bit modulus, ignoring the
// modulus.
func isEKTemplate(pub *tpm2.TPMTPublic) bool {
	if pub.Type != tpm2.TPMAlgRSA {
		return false
	}
	n, err := pub.Unique.RSA()
	if err != nil || len(n.Buffer) != 256 {
		return false
	}
	c := *pub
	c.Unique = tpm2.RSAEKTemplate.Unique
	return bytes.Equal(tpm2.Marshal(c), tpm2.Marshal(tpm2.RSAEKTemplate))
}

// ekSession returns a policy session that satisfies the endorsement key's policy: PolicySecret with the
// endorsement hierarchy (empty auth value).
func ekSession() tpm2.Session {
	return tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(t transport.TPM, h tpm2.TPMISHPolicy, _ tpm2.TPM2BNonce) error {
		_, err := tpm2.PolicySecret{
			AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
			PolicySession: h,
		}.Execute(t)
		return err
	})
}

// readEKCert returns the endorsement key certificate from NV index 0x01c00002, without the padding some TPMs
// leave after it, or nil when the TPM has none.
func readEKCert(t transport.TPM) ([]byte, error) {
	rp, err := tpm2.NVReadPublic{NVIndex: ekCertIndex}.Execute(t)
	if err != nil {
		var te *transportError
		if errors.As(err, &te) || isTransient(err) {
			return nil, err
		}
		return nil, nil // no certificate
	}
	nv, err := rp.NVPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("endorsement key certificate: %w", err)
	}
	size := int(nv.DataSize)
	if size == 0 || size > maxEKCertSize {
		return nil, fmt.Errorf("endorsement key certificate of %d bytes", size)
	}
	cert := make([]byte, 0, size)
	for len(cert) < size {
		n := min(nvChunk, size-len(cert))
		r, err := tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: ekCertIndex, Name: rp.NVName, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: ekCertIndex, Name: rp.NVName},
			Size:       uint16(n),
			Offset:     uint16(len(cert)),
		}.Execute(t)
		if err != nil {
			return nil, fmt.Errorf("reading the endorsement key certificate: %w", err)
		}
		if len(r.Data.Buffer) == 0 {
			return nil, errors.New("reading the endorsement key certificate: empty answer")
		}
		cert = append(cert, r.Data.Buffer...)
	}
	var raw asn1.RawValue
	rest, err := asn1.Unmarshal(cert, &raw)
	if err != nil {
		return nil, fmt.Errorf("endorsement key certificate: not DER: %v", err)
	}
	for _, b := range rest {
		if b != 0 && b != 0xff {
			return nil, errors.New("endorsement key certificate: data after the certificate")
		}
	}
	return cert[:len(cert)-len(rest)], nil
}

package tpm

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kleidi-kms/kleidi"
)

// ProofSize is the size of a proof made by [Provider.Prove]: an HMAC-SHA256.
const ProofSize = kleidi.ProofKeySize

// proofLabel names the proof key: it is the public seed of the proof key's template (keyed with the auth value)
// and the data the TPM's HMAC turns into the proof key.
const proofLabel = "kleidi proof key v1"

// Prove implements [kleidi.Authenticator]: it returns HMAC-SHA256(proof key, message), [ProofSize] bytes.
//
// The proof key is a secret only this TPM can compute, and only under this provider's configuration: the TPM's
// HMAC, over a fixed label, with a keyed-hash primary key of the owner hierarchy whose template holds the
// configured policy (PolicyPCR over the configured PCRs' current values, then PolicyAuthValue) as its
// authPolicy and a value derived from the auth value as its unique field. A primary key is derived from the owner
// seed and its template, so the proof key is the same on every start of this TPM, in the same boot state, with
// the same auth value: a node that lost its keyring still verifies the proofs of the wrapped keys in its
// ciphertexts. Another TPM, the same TPM after a clear, a boot whose PCRs differ, another PCR selection or another
// auth value gives another key (or none), so a party that can write etcd and knows the SRK's public area still
// cannot make a proof this provider accepts.
//
// The proof key is derived at the first Prove or Verify, through a session salted with the pinned SRK that
// encrypts the TPM's answer, and kept in memory; [Provider.Close] zeroes it. Errors wrap
// [ErrStorageKeyChanged] when the TPM presents another SRK, [kleidi.ErrUnavailable] when the TPM cannot be
// reached.
func (p *Provider) Prove(ctx context.Context, message []byte) ([]byte, error) {
	mac, err := p.proof.Prove(ctx, message)
	if err != nil {
		return nil, fmt.Errorf("tpm: prove: %w", err)
	}
	return mac, nil
}

// Verify implements [kleidi.Authenticator]: it returns nil if proof is the proof [Provider.Prove] gives for
// message, and otherwise an error wrapping [kleidi.ErrUnauthenticated]. A proof of the wrong size is refused
// without any TPM call; after the proof key is derived (at the first Prove or Verify) Verify never calls the
// TPM. When the proof key cannot be derived, errors wrap [kleidi.ErrUnavailable] (the TPM cannot be reached; the
// failure is returned again for a second before the TPM is asked again) or [kleidi.ErrUnauthenticated].
func (p *Provider) Verify(ctx context.Context, message, proof []byte) error {
	err := p.proof.Verify(ctx, message, proof)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, kleidi.ErrUnauthenticated):
		return fmt.Errorf("tpm: verify: %w (forged, made by another TPM or configuration, or the bound PCRs changed since)", err)
	case errors.Is(err, kleidi.ErrUnavailable), errors.Is(err, kleidi.ErrClosed),
		errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("tpm: verify: %w", err)
	}
	return fmt.Errorf("tpm: verify: %w: cannot derive the proof key: %w", kleidi.ErrUnauthenticated, err)
}

// hmacSHA256 returns HMAC-SHA256(key, message).
func hmacSHA256(key, message []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(message)
	return m.Sum(nil)
}

// deriveProofKey creates the proof primary key (see [Provider.Prove]), has the TPM compute its HMAC of
// proofLabel through a policy session salted with the pinned SRK that encrypts the answer, and flushes the key.
func (p *Provider) deriveProofKey(ctx context.Context) ([]byte, error) {
	var key []byte
	err := p.do(ctx, "proof key", true, func(t transport.TPM, srk *storageKey) error {
		if err := p.checkPin(srk); err != nil {
			return err
		}
		policy, err := p.policyDigest(t)
		if err != nil {
			return err
		}
		// The auth value travels in the first parameter, encrypted by a session salted with the pinned SRK, so that
		// no one on the bus reads it (as Wrap protects the sealed key's).
		enc := tpm2.HMAC(tpm2.TPMAlgSHA256, 16, tpm2.Salted(srk.handle, srk.public), tpm2.AESEncryption(128, tpm2.EncryptIn))
		defer flushSession(t, enc)
		cp, err := tpm2.CreatePrimary{
			PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
				UserAuth: tpm2.TPM2BAuth{Buffer: p.auth},
			}},
			InPublic: tpm2.New2B(proofTemplate(policy, p.auth)),
		}.Execute(t, enc)
		if err != nil {
			return err
		}
		defer flushContext(t, cp.ObjectHandle)
		pub, err := cp.OutPublic.Contents()
		if err != nil {
			return err
		}
		name, err := tpm2.ObjectName(pub)
		if err != nil {
			return err
		}
		sess := p.policySession(srk)
		defer flushSession(t, sess)
		rsp, err := tpm2.Hmac{
			Handle:  tpm2.AuthHandle{Handle: cp.ObjectHandle, Name: *name, Auth: sess},
			Buffer:  tpm2.TPM2BMaxBuffer{Buffer: []byte(proofLabel)},
			HashAlg: tpm2.TPMAlgSHA256,
		}.Execute(t)
		if err != nil {
			return err
		}
		if len(rsp.OutHMAC.Buffer) != sha256.Size {
			clear(rsp.OutHMAC.Buffer)
			return fmt.Errorf("the TPM's HMAC has %d bytes, want %d", len(rsp.OutHMAC.Buffer), sha256.Size)
		}
		key = rsp.OutHMAC.Buffer
		return nil
	})
	if err != nil {
		return nil, err
	}
	return key, nil
}

// proofTemplate is the public area of the proof primary key: an HMAC-SHA256 key of this TPM, usable only through
// policy (the configured policy digest), whose unique field is HMAC-SHA256(auth value, proofLabel), so that the
// key depends on the PCR policy and on the auth value. The auth value of a primary key is whatever its creator
// sets, so it is the unique field that binds the auth value; guesses at it are not counted by the TPM's
// dictionary-attack lockout, which is why the auth file should hold a random value.
func proofTemplate(policy, auth []byte) tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgKeyedHash,
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
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
			Scheme: tpm2.TPMTKeyedHashScheme{
				Scheme:  tpm2.TPMAlgHMAC,
				Details: tpm2.NewTPMUSchemeKeyedHash(tpm2.TPMAlgHMAC, &tpm2.TPMSSchemeHMAC{HashAlg: tpm2.TPMAlgSHA256}),
			},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: hmacSHA256(auth, []byte(proofLabel))}),
	}
}

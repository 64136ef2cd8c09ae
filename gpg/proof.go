package gpg

import (
	"bytes"
	"context"
	"crypto"
	"errors"
	"fmt"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp/packet"
	v2 "github.com/ProtonMail/go-crypto/openpgp/v2"

	"github.com/kleidi-kms/kleidi"
)

// tagSignature is the OpenPGP packet tag of a signature (RFC 9580, section 5.2).
const tagSignature = 2

// MaxClockSkew is how far in the future of this node's clock a proof's creation time may lie: the clocks of
// the nodes that share a key differ a little, but a signature made hours ahead is no signature of theirs.
const MaxClockSkew = 10 * time.Minute

// proofHashes are the hash algorithms a proof may use: SHA-256 or stronger.
var proofHashes = map[crypto.Hash]bool{
	crypto.SHA256:   true,
	crypto.SHA384:   true,
	crypto.SHA512:   true,
	crypto.SHA3_256: true,
	crypto.SHA3_512: true,
}

// verifier is a public key that may sign a proof, as New found it: valid for signing, not revoked.
type verifier struct {
	key     *packet.PublicKey
	owner   string    // the key ID of the primary key it belongs to, for messages
	expires time.Time // when the key, or a self-signature it depends on, expires; zero for never
}

// signingKeys returns every key of entities that may sign at now, with the time it stops being valid.
// Revocations are read once here: the keys of a Provider never change after New.
func signingKeys(entities []*v2.Entity, now time.Time) []verifier {
	var vs []verifier
	seen := make(map[string]bool)
	for _, e := range entities {
		candidates := []*packet.PublicKey{e.PrimaryKey}
		for i := range e.Subkeys {
			candidates = append(candidates, e.Subkeys[i].PublicKey)
		}
		for _, pk := range candidates {
			k, ok := e.SigningKeyById(now, pk.KeyId, pgpConfig)
			if !ok || k.PublicKey != pk || seen[string(pk.Fingerprint)] {
				continue
			}
			seen[string(pk.Fingerprint)] = true
			var expires time.Time
			earliest := func(t time.Time, ok bool) {
				if ok && (expires.IsZero() || t.Before(expires)) {
					expires = t
				}
			}
			earliest(expiration(e.PrimaryKey, k.PrimarySelfSignature))
			if pk != e.PrimaryKey {
				earliest(expiration(pk, k.SelfSignature))
				if back := k.SelfSignature.EmbeddedSignature; back != nil && back.SigLifetimeSecs != nil && *back.SigLifetimeSecs != 0 {
					earliest(back.CreationTime.Add(time.Duration(*back.SigLifetimeSecs)*time.Second), true)
				}
			}
			vs = append(vs, verifier{key: pk, owner: keyID(e), expires: expires})
		}
	}
	return vs
}

// Prove returns a proof over message: a binary OpenPGP detached signature (as gpg --detach-sign makes), by
// the signing key of the private key, with SHA-256 or a stronger hash the key prefers. It fails with an error
// wrapping [ErrNoPrivateKey] for a provider that only wraps, [ErrNoSigningKey] when the private key has no
// valid signing key, and [kleidi.ErrClosed] after Close. The signature never expires: a proof stays valid as
// long as the key that made it.
func (p *Provider) Prove(ctx context.Context, message []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("gpg: prove: %w", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.closed.Load():
		return nil, fmt.Errorf("gpg: prove: %w", kleidi.ErrClosed)
	case p.private == nil:
		return nil, fmt.Errorf("gpg: prove: %w: this provider only wraps", ErrNoPrivateKey)
	}
	now := time.Now()
	for _, e := range p.private {
		k, ok := e.SigningKey(now, pgpConfig)
		if !ok || k.PrivateKey == nil || k.PrivateKey.Dummy() || k.PrivateKey.Encrypted {
			continue
		}
		config := *pgpConfig
		config.Time = func() time.Time { return now }
		config.SigningKeyId = k.PublicKey.KeyId
		var buf bytes.Buffer
		if err := v2.DetachSign(&buf, []*v2.Entity{e}, bytes.NewReader(message), &config); err != nil {
			return nil, fmt.Errorf("gpg: prove: key %s: %w", keyID(e), err)
		}
		if buf.Len() > kleidi.MaxProofSize {
			return nil, fmt.Errorf("gpg: prove: key %s: signature of %d bytes, more than %d: %w",
				keyID(e), buf.Len(), kleidi.MaxProofSize, kleidi.ErrTooLarge)
		}
		return buf.Bytes(), nil
	}
	return nil, fmt.Errorf("gpg: prove: key %s has no valid key that may sign with its private part here: %w",
		describe(p.private), ErrNoSigningKey)
}

// Verify returns nil if proof is one binary OpenPGP signature over message made by a valid signing key of the
// private key or of a recipient: every recipient holds the root of trust, since it decrypts every KEK. Anything
// else gives an error wrapping [kleidi.ErrUnauthenticated]: a proof larger than [kleidi.MaxProofSize], not
// exactly one signature packet, a signature of a text document, a hash weaker than SHA-256, an unknown
// critical notation, an expired signature, one made more than [MaxClockSkew] in the future or before its key,
// a key that is not one of the provider's, or one revoked when New read it or expired now. After Close it
// returns an error wrapping [kleidi.ErrClosed].
//
// Verify reads attacker bytes: it takes no lock, calls no root of trust, checks one signature and never panics.
func (p *Provider) Verify(ctx context.Context, message, proof []byte) (err error) {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("gpg: verify: %w", err)
	}
	if p.closed.Load() {
		return fmt.Errorf("gpg: verify: %w", kleidi.ErrClosed)
	}
	defer func() {
		if recover() != nil {
			err = fmt.Errorf("gpg: verify: the OpenPGP parser panicked on the proof: %w", kleidi.ErrUnauthenticated)
		}
	}()
	if err := p.verify(message, proof, time.Now()); err != nil {
		return fmt.Errorf("gpg: verify: %w: %w", err, kleidi.ErrUnauthenticated)
	}
	return nil
}

func (p *Provider) verify(message, proof []byte, now time.Time) error {
	sig, err := parseProof(proof)
	if err != nil {
		return err
	}
	v := p.signer(sig)
	if v == nil {
		return fmt.Errorf("proof signed by %s, which is neither the private key nor a recipient", issuer(sig))
	}
	switch {
	case sig.CreationTime.After(now.Add(MaxClockSkew)):
		return fmt.Errorf("proof made at %s, in the future", sig.CreationTime.UTC().Format(time.RFC3339))
	case sig.CreationTime.Before(v.key.CreationTime):
		return fmt.Errorf("proof made at %s, before its key %s", sig.CreationTime.UTC().Format(time.RFC3339), v.owner)
	case sig.SigLifetimeSecs != nil && *sig.SigLifetimeSecs != 0 &&
		!now.Before(sig.CreationTime.Add(time.Duration(*sig.SigLifetimeSecs)*time.Second)):
		// Not sig.SigExpired, which also counts a signature made a second ahead of this clock as expired.
		return errors.New("proof signature expired")
	case !v.expires.IsZero() && !now.Before(v.expires):
		return fmt.Errorf("proof signed by key %s, which expired on %s", v.owner, v.expires.UTC().Format(time.DateOnly))
	}
	h, err := sig.PrepareVerify()
	if err != nil {
		return fmt.Errorf("proof signature: %v", err)
	}
	h.Write(message)
	if err := v.key.VerifySignature(h, sig); err != nil {
		return fmt.Errorf("proof signature of key %s does not verify", v.owner)
	}
	return nil
}

// parseProof parses a proof that must be exactly one OpenPGP signature packet of a binary document, version 4
// or 6, with a hash of SHA-256 or stronger and no critical notation.
func parseProof(proof []byte) (*packet.Signature, error) {
	if len(proof) == 0 || len(proof) > kleidi.MaxProofSize {
		return nil, fmt.Errorf("proof of %d bytes, want 1 to %d", len(proof), kleidi.MaxProofSize)
	}
	tag, body, n, err := readPacket(proof)
	switch {
	case err != nil:
		return nil, fmt.Errorf("proof: %v", err)
	case tag != tagSignature:
		return nil, fmt.Errorf("proof is an OpenPGP packet of tag %d, want a signature", tag)
	case body == nil:
		return nil, errors.New("proof signature with a partial length")
	case n != len(proof):
		return nil, errors.New("bytes after the proof's signature packet")
	}
	pkt, err := packet.Read(bytes.NewReader(proof))
	if err != nil {
		return nil, fmt.Errorf("proof signature: %v", err)
	}
	sig, ok := pkt.(*packet.Signature)
	switch {
	case !ok:
		return nil, errors.New("proof is not a signature this package reads")
	case sig.Version != 4 && sig.Version != 6:
		return nil, fmt.Errorf("proof signature of version %d, want 4 or 6", sig.Version)
	case sig.SigType != packet.SigTypeBinary:
		return nil, fmt.Errorf("proof signature of type 0x%02x, want a signature of a binary document (0x00)", uint8(sig.SigType))
	case !proofHashes[sig.Hash]:
		return nil, fmt.Errorf("proof signature hashed with %v, want SHA-256 or stronger", sig.Hash)
	}
	for _, n := range sig.Notations {
		if n.IsCritical {
			return nil, fmt.Errorf("proof signature with a critical notation %.64q", n.Name)
		}
	}
	return sig, nil
}

// signer returns the verifier sig names as its issuer, by fingerprint if it gives one, else by key ID.
func (p *Provider) signer(sig *packet.Signature) *verifier {
	for i := range p.verifiers {
		v := &p.verifiers[i]
		if sig.IssuerFingerprint != nil {
			if bytes.Equal(sig.IssuerFingerprint, v.key.Fingerprint) {
				return v
			}
		} else if sig.IssuerKeyId != nil && *sig.IssuerKeyId == v.key.KeyId {
			return v
		}
	}
	return nil
}

// issuer names the key sig says made it.
func issuer(sig *packet.Signature) string {
	switch {
	case sig.IssuerFingerprint != nil:
		return fmt.Sprintf("key 0x%.32X", sig.IssuerFingerprint)
	case sig.IssuerKeyId != nil:
		return fmt.Sprintf("key 0x%016X", *sig.IssuerKeyId)
	}
	return "an unnamed key"
}

package awskms

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"errors"
	"fmt"
	"hash"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"

	"github.com/kleidi-kms/kleidi"
)

const (
	// proofDomain starts every signed message, so that a signature the signing key makes for any other purpose
	// is never a kleidi proof.
	proofDomain = "kleidi awskms proof v1\x00"
	// proofRetryInterval is how long a failure to fetch the signing key's public key is returned again without
	// asking AWS KMS, so that a flood of Verify calls while AWS KMS is unreachable costs at most one call per
	// interval.
	proofRetryInterval = time.Second
	// maxSignatureSize is the longest DER ECDSA signature of the curves this package uses (P-384: 104 bytes).
	maxSignatureSize = 128
)

// signer is the public half of the signing key and how it signs.
type signer struct {
	pub       *ecdsa.PublicKey
	algorithm types.SigningAlgorithmSpec
	hash      func() hash.Hash
}

// digest returns the hash of proofDomain ‖ message, what AWS KMS signs.
func (s *signer) digest(message []byte) []byte {
	h := s.hash()
	h.Write([]byte(proofDomain))
	h.Write(message)
	return h.Sum(nil)
}

// proofState is the signing key's public half, fetched from AWS KMS once and then kept until Close.
type proofState struct {
	mu     sync.Mutex
	signer *signer // nil until fetched
	err    error   // the last failure, returned again until retry
	retry  time.Time
	closed bool
}

func (s *proofState) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.signer, s.closed = nil, true
}

// Prove implements [kleidi.Authenticator]: AWS KMS signs the SHA-256 (P-256) or SHA-384 (P-384) digest of a
// fixed label and message with [Config.SigningKeyID] (kms:Sign, ECDSA), and Prove checks the signature with the
// public key before it returns it. A proof is a DER ECDSA signature, at most 104 bytes.
//
// The signing key never leaves AWS KMS, so only a principal that may call kms:Sign on it can make a proof. That
// is narrower than kms:Encrypt on the encryption key, which needs no secret and makes blobs that Unwrap accepts:
// key policies often grant Encrypt widely. Errors wrap [kleidi.ErrUnavailable] when AWS KMS throttles or cannot
// be reached, or this package's sentinel for a refusal.
func (p *Provider) Prove(ctx context.Context, message []byte) ([]byte, error) {
	if p.closed.Load() {
		return nil, fmt.Errorf("awskms: prove: %w", kleidi.ErrClosed)
	}
	s, err := p.signerOf(ctx)
	if err != nil {
		return nil, fmt.Errorf("awskms: prove: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("awskms: prove: %w", err)
	}
	digest := s.digest(message)
	callCtx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	out, err := p.client.Sign(callCtx, &kms.SignInput{
		KeyId:            aws.String(p.signingKey),
		Message:          digest,
		MessageType:      types.MessageTypeDigest,
		SigningAlgorithm: s.algorithm,
	})
	if err != nil {
		return nil, p.callError(ctx, "prove", p.signingKey, "kms:Sign", nil, err)
	}
	if len(out.Signature) == 0 || len(out.Signature) > maxSignatureSize || !ecdsa.VerifyASN1(s.pub, digest, out.Signature) {
		return nil, fmt.Errorf("awskms: prove: %w: the signature of key %s does not verify with its public key", ErrKeyUsage, p.signingKey)
	}
	return out.Signature, nil
}

// Verify implements [kleidi.Authenticator]: it returns nil if proof is a signature that [Provider.Prove] made
// over message, and otherwise an error wrapping [kleidi.ErrUnauthenticated]. It fetches the signing key's public
// key at its first call (kms:GetPublicKey) and never calls AWS KMS again: checking a proof costs one ECDSA
// verification (about 0.1 ms for P-256). A proof too long to be a signature is refused before anything else.
// When the public key cannot be fetched, errors wrap [kleidi.ErrUnavailable] (AWS KMS unreachable; the failure is
// returned again for a second before AWS KMS is asked again) or [kleidi.ErrUnauthenticated] and this package's
// sentinel for the refusal.
func (p *Provider) Verify(ctx context.Context, message, proof []byte) error {
	if len(proof) == 0 || len(proof) > maxSignatureSize {
		return fmt.Errorf("awskms: verify: %w: a proof of %d bytes, want 1 to %d", kleidi.ErrUnauthenticated, len(proof), maxSignatureSize)
	}
	s, err := p.signerOf(ctx)
	if err != nil {
		if errors.Is(err, kleidi.ErrUnavailable) || errors.Is(err, kleidi.ErrClosed) ||
			errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("awskms: verify: %w", err)
		}
		return fmt.Errorf("awskms: verify: %w: %w", kleidi.ErrUnauthenticated, err)
	}
	if !ecdsa.VerifyASN1(s.pub, s.digest(message), proof) {
		return fmt.Errorf("awskms: verify: %w: the proof is not a signature by key %s (forged, altered, or made by another key)",
			kleidi.ErrUnauthenticated, p.signingKey)
	}
	return nil
}

// signerOf returns the signing key's public half, fetching it from AWS KMS at the first call. Concurrent first
// calls share one fetch. A failure is returned again without a call until proofRetryInterval has passed; a
// cancelled context is not remembered.
func (p *Provider) signerOf(ctx context.Context) (*signer, error) {
	st := &p.proof
	st.mu.Lock()
	defer st.mu.Unlock()
	switch {
	case st.closed:
		return nil, kleidi.ErrClosed
	case st.signer != nil:
		return st.signer, nil
	case st.err != nil && time.Now().Before(st.retry):
		return nil, st.err
	}
	s, err := p.fetchSigner(ctx)
	if err != nil {
		if !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
			st.err, st.retry = err, time.Now().Add(proofRetryInterval)
		}
		return nil, err
	}
	st.signer, st.err = s, nil
	return s, nil
}

// fetchSigner calls kms:GetPublicKey for the signing key and checks that it is an ECDSA signing key of a curve
// this package uses.
func (p *Provider) fetchSigner(ctx context.Context) (*signer, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	callCtx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	out, err := p.client.GetPublicKey(callCtx, &kms.GetPublicKeyInput{KeyId: aws.String(p.signingKey)})
	if err != nil {
		err = p.callError(ctx, "fetch the public key", p.signingKey, "kms:GetPublicKey", nil, err)
		if errors.Is(err, context.Canceled) {
			return nil, context.Canceled
		}
		return nil, err
	}
	if out.KeyUsage != types.KeyUsageTypeSignVerify {
		return nil, fmt.Errorf("%w: key %s has key usage %s, want SIGN_VERIFY", ErrKeyUsage, p.signingKey, out.KeyUsage)
	}
	s, err := newSigner(out.KeySpec, out.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("%w: key %s: %w", ErrKeyUsage, p.signingKey, err)
	}
	offered := false
	for _, a := range out.SigningAlgorithms {
		offered = offered || a == s.algorithm
	}
	if !offered {
		return nil, fmt.Errorf("%w: key %s does not offer %s", ErrKeyUsage, p.signingKey, s.algorithm)
	}
	return s, nil
}

// newSigner parses the DER SubjectPublicKeyInfo of a signing key of spec.
func newSigner(spec types.KeySpec, der []byte) (*signer, error) {
	var (
		curve elliptic.Curve
		s     signer
	)
	switch spec {
	case types.KeySpecEccNistP256:
		curve, s.algorithm, s.hash = elliptic.P256(), types.SigningAlgorithmSpecEcdsaSha256, sha256.New
	case types.KeySpecEccNistP384:
		curve, s.algorithm, s.hash = elliptic.P384(), types.SigningAlgorithmSpecEcdsaSha384, sha512.New384
	default:
		return nil, fmt.Errorf("key spec %s, want ECC_NIST_P256 or ECC_NIST_P384", spec)
	}
	pub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return nil, fmt.Errorf("its public key does not parse: %v", err)
	}
	ec, ok := pub.(*ecdsa.PublicKey)
	if !ok || ec.Curve != curve {
		return nil, fmt.Errorf("its public key is not on the curve of key spec %s", spec)
	}
	s.pub = ec
	return &s, nil
}

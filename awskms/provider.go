package awskms

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/smithy-go"

	"github.com/kleidi-kms/kleidi"
)

// Limits of the formats of this package.
const (
	// MaxKeySize is the largest key Wrap accepts, in bytes: the largest plaintext AWS KMS encrypts. A KEK is
	// [kleidi.KeySize] bytes.
	MaxKeySize = 4096
	// maxCiphertextBlobSize is the largest ciphertext AWS KMS decrypts.
	maxCiphertextBlobSize = 6144
	// DefaultTimeout is the default of [Config.Timeout].
	DefaultTimeout = 10 * time.Second
	// DefaultMaxAttempts is the default of [Config.MaxAttempts].
	DefaultMaxAttempts = 5
)

// contextKey is the encryption context key that names what a blob is. Its values are fixed by this package.
const contextKey = "kleidi"

// Purposes of a blob, the value of the encryption context's "kleidi" pair: a wrapped KEK, or the probe Health
// decrypts. AWS KMS refuses to decrypt a blob under any other context than the one it was made with, so a probe
// can never be unwrapped as a KEK, and a blob made by another program under the same key never unwraps here.
const (
	purposeKEK    = "kek-v1"
	purposeHealth = "health-v1"
)

// blobHeader starts every wrapped key: 'a' for AWS KMS and format version 1, then the KMS ciphertext blob.
var blobHeader = [2]byte{'a', 1}

// Config selects the AWS KMS keys of a [Provider] and how to reach them. Credentials always come from the AWS
// SDK's default chain: environment variables, the shared configuration and credentials files (AWS_PROFILE),
// web identity (IRSA), EKS Pod Identity, ECS task roles and EC2 instance roles, in that order.
type Config struct {
	// KeyID is the symmetric encryption key (key spec SYMMETRIC_DEFAULT, usage ENCRYPT_DECRYPT) that wraps and
	// unwraps KEKs: a key ID, a key ARN, an alias name ("alias/kleidi") or an alias ARN. Required.
	KeyID string
	// SigningKeyID is the asymmetric signing key (key spec ECC_NIST_P256 or ECC_NIST_P384, usage SIGN_VERIFY)
	// that proves wrapped KEKs (see [Provider.Prove]), named as KeyID is. Required.
	SigningKeyID string
	// Region is the AWS region ("eu-west-1"). Empty: the SDK's default (AWS_REGION, the shared configuration).
	Region string
	// Endpoint is the base URL of the KMS service ("https://kms-fips.us-east-1.amazonaws.com", a VPC endpoint, or
	// a compatible server such as local-kms). Empty: the region's default endpoint.
	Endpoint string
	// EncryptionContext holds extra pairs bound to every wrapped KEK, such as {"cluster": "prod-eu"}: a blob
	// unwraps only under the same pairs, so two clusters that share a KMS key cannot use each other's KEKs. The
	// key "kleidi" is reserved. The pairs are not secret (AWS CloudTrail records them).
	EncryptionContext map[string]string
	// Timeout bounds each call to AWS KMS, retries included, within the caller's context. Zero: [DefaultTimeout].
	Timeout time.Duration
	// MaxAttempts is how many times a call is tried when AWS KMS throttles it or cannot be reached, with
	// exponential backoff and jitter between tries, within Timeout. Zero: [DefaultMaxAttempts].
	MaxAttempts int
}

// Provider is a [kleidi.Provider] whose root of trust is an AWS KMS key: Wrap encrypts a KEK under
// [Config.KeyID] with an encryption context that binds it to kleidi, Unwrap decrypts it. It is also a
// [kleidi.Authenticator]: Prove signs with [Config.SigningKeyID] inside AWS KMS, and Verify checks signatures
// locally with that key's public key, fetched once. It is safe for concurrent use.
type Provider struct {
	client      *kms.Client
	keyID       string
	signingKey  string
	endpoint    string // for messages: the configured endpoint, or "AWS KMS"
	encContext  map[string]string
	healthCtx   map[string]string
	timeout     time.Duration
	closed      atomic.Bool
	proof       proofState
	resolved    sync.Mutex // held while the key is resolved
	keyARN      string     // the encryption key's ARN, "" until resolved
	healthProbe []byte     // a blob of purposeHealth that Health decrypts, made when the key is resolved
}

var (
	_ kleidi.Provider      = (*Provider)(nil)
	_ kleidi.Authenticator = (*Provider)(nil)
)

// New returns a provider for the keys c names. It loads the AWS SDK's configuration (region, credentials chain)
// but makes no call to AWS KMS: a key that does not exist or may not be used shows at the first Wrap, Unwrap,
// Health, Prove or Verify, so call Health after New to check the configuration. Errors wrap [ErrInvalidConfig].
func New(ctx context.Context, c Config) (*Provider, error) {
	if c.KeyID == "" {
		return nil, fmt.Errorf("awskms: %w: no encryption key (Config.KeyID)", ErrInvalidConfig)
	}
	if c.SigningKeyID == "" {
		return nil, fmt.Errorf("awskms: %w: no signing key (Config.SigningKeyID): proofs need one", ErrInvalidConfig)
	}
	if c.Timeout < 0 || c.MaxAttempts < 0 {
		return nil, fmt.Errorf("awskms: %w: negative Timeout or MaxAttempts", ErrInvalidConfig)
	}
	if _, ok := c.EncryptionContext[contextKey]; ok {
		return nil, fmt.Errorf("awskms: %w: the encryption context key %q is reserved", ErrInvalidConfig, contextKey)
	}
	for k := range c.EncryptionContext {
		if k == "" {
			return nil, fmt.Errorf("awskms: %w: an empty encryption context key", ErrInvalidConfig)
		}
	}
	timeout, attempts := c.Timeout, c.MaxAttempts
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	if attempts == 0 {
		attempts = DefaultMaxAttempts
	}
	opts := []func(*config.LoadOptions) error{
		config.WithRetryer(func() aws.Retryer {
			return retry.NewStandard(func(o *retry.StandardOptions) {
				o.MaxAttempts = attempts
				o.MaxBackoff = 2 * time.Second
				// The context bounds the retries; a client-side retry quota would turn an outage that has
				// ended into errors for a while longer.
				o.RateLimiter = ratelimit.None
			})
		}),
	}
	if c.Region != "" {
		opts = append(opts, config.WithRegion(c.Region))
	}
	awsConfig, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("awskms: %w: loading the AWS SDK configuration: %v", ErrInvalidConfig, err)
	}
	if awsConfig.Region == "" {
		return nil, fmt.Errorf("awskms: %w: no region (Config.Region, AWS_REGION or the shared configuration)", ErrInvalidConfig)
	}
	client := kms.NewFromConfig(awsConfig, func(o *kms.Options) {
		if c.Endpoint != "" {
			o.BaseEndpoint = aws.String(c.Endpoint)
		}
	})
	encContext := maps.Clone(c.EncryptionContext)
	if encContext == nil {
		encContext = map[string]string{}
	}
	healthCtx := maps.Clone(encContext)
	encContext[contextKey] = purposeKEK
	healthCtx[contextKey] = purposeHealth
	endpoint := c.Endpoint
	if endpoint == "" {
		endpoint = "AWS KMS in " + awsConfig.Region
	}
	return &Provider{
		client:     client,
		keyID:      c.KeyID,
		signingKey: c.SigningKeyID,
		endpoint:   endpoint,
		encContext: encContext,
		healthCtx:  healthCtx,
		timeout:    timeout,
	}, nil
}

// Name implements [kleidi.Provider]: "awskms".
func (p *Provider) Name() string { return "awskms" }

// Wrap implements [kleidi.Provider]: it encrypts key under [Config.KeyID] with the provider's encryption context
// (kms:Encrypt). The result is 2 header bytes and the KMS ciphertext blob, about 190 bytes for a KEK. Errors wrap
// [kleidi.ErrUnavailable] when AWS KMS throttles or cannot be reached past the retries, [kleidi.ErrTooLarge] for a
// key over [MaxKeySize], and one of this package's sentinels when AWS KMS refuses ([ErrAccessDenied],
// [ErrKeyDisabled], [ErrKeyState], [ErrKeyNotFound], [ErrKeyUsage]).
func (p *Provider) Wrap(ctx context.Context, key []byte) ([]byte, error) {
	if p.closed.Load() {
		return nil, fmt.Errorf("awskms: wrap: %w", kleidi.ErrClosed)
	}
	if len(key) == 0 {
		return nil, errors.New("awskms: wrap: empty key")
	}
	if len(key) > MaxKeySize {
		return nil, fmt.Errorf("awskms: wrap: %w: a key of %d bytes, at most %d", kleidi.ErrTooLarge, len(key), MaxKeySize)
	}
	blob, err := p.encrypt(ctx, key, p.encContext)
	if err != nil {
		return nil, p.callError(ctx, "wrap", p.keyID, "kms:Encrypt", nil, err)
	}
	return append(blobHeader[:], blob...), nil
}

// Unwrap implements [kleidi.Provider]: it decrypts a blob made by Wrap with [Config.KeyID] and the provider's
// encryption context (kms:Decrypt). A blob of another format or size is refused without a call. Errors wrap
// [kleidi.ErrUnwrap] when AWS KMS refuses, with this package's sentinel that says why ([ErrInvalidCiphertext]:
// altered, of another key or another encryption context; [ErrAccessDenied], [ErrKeyDisabled], [ErrKeyState]
// (pending deletion), [ErrKeyNotFound], [ErrKeyUsage]), and [kleidi.ErrUnavailable] when AWS KMS throttles or
// cannot be reached past the retries.
func (p *Provider) Unwrap(ctx context.Context, wrapped []byte) ([]byte, error) {
	if p.closed.Load() {
		return nil, fmt.Errorf("awskms: unwrap: %w", kleidi.ErrClosed)
	}
	blob, err := parseBlob(wrapped)
	if err != nil {
		return nil, fmt.Errorf("awskms: unwrap: %w: %w", kleidi.ErrUnwrap, err)
	}
	arn, _, err := p.resolve(ctx)
	if err != nil {
		return nil, p.callError(ctx, "unwrap", p.keyID, "kms:Encrypt", kleidi.ErrUnwrap, err)
	}
	key, err := p.decrypt(ctx, arn, blob, p.encContext)
	if err != nil {
		return nil, p.callError(ctx, "unwrap", p.keyID, "kms:Decrypt", kleidi.ErrUnwrap, err)
	}
	if len(key) == 0 {
		return nil, fmt.Errorf("awskms: unwrap: %w: AWS KMS returned an empty key", kleidi.ErrUnwrap)
	}
	if p.closed.Load() {
		clear(key)
		return nil, fmt.Errorf("awskms: unwrap: %w", kleidi.ErrClosed)
	}
	return key, nil
}

// parseBlob returns the KMS ciphertext blob of a wrapped key, or an error wrapping [ErrInvalidCiphertext].
func parseBlob(wrapped []byte) ([]byte, error) {
	switch {
	case len(wrapped) < len(blobHeader)+1:
		return nil, fmt.Errorf("%w: a wrapped key of %d bytes is too short", ErrInvalidCiphertext, len(wrapped))
	case len(wrapped) > len(blobHeader)+maxCiphertextBlobSize:
		return nil, fmt.Errorf("%w: a wrapped key of %d bytes is longer than any AWS KMS ciphertext", ErrInvalidCiphertext, len(wrapped))
	case wrapped[0] != blobHeader[0] || wrapped[1] != blobHeader[1]:
		return nil, fmt.Errorf("%w: not a wrapped key of this provider (header %#x %#x)", ErrInvalidCiphertext, wrapped[0], wrapped[1])
	}
	return wrapped[len(blobHeader):], nil
}

// Health implements [kleidi.Provider]: it returns nil when Unwrap works now. Every call decrypts a random probe
// made when the key was resolved (see [Provider.Unwrap]) under an encryption context of its own, so it can never
// pass for a KEK: one kms:Decrypt per call, which checks the key's state, the credentials and the network.
// Errors wrap what Unwrap's would.
func (p *Provider) Health(ctx context.Context) error {
	if p.closed.Load() {
		return fmt.Errorf("awskms: health: %w", kleidi.ErrClosed)
	}
	arn, probe, err := p.resolve(ctx)
	if err != nil {
		return p.callError(ctx, "health", p.keyID, "kms:Encrypt", kleidi.ErrUnwrap, err)
	}
	got, err := p.decrypt(ctx, arn, probe, p.healthCtx)
	clear(got)
	if err != nil {
		return p.callError(ctx, "health", p.keyID, "kms:Decrypt", kleidi.ErrUnwrap, err)
	}
	return nil
}

// resolve returns the encryption key's ARN and the health probe, learning both at the first call with one
// kms:Encrypt of a random probe: AWS KMS answers it with the ARN of the key that Config.KeyID names (an alias
// included), so no kms:DescribeKey permission is needed. A failure is not remembered.
func (p *Provider) resolve(ctx context.Context) (arn string, probe []byte, err error) {
	p.resolved.Lock()
	defer p.resolved.Unlock()
	if p.keyARN != "" {
		return p.keyARN, p.healthProbe, nil
	}
	if err := ctx.Err(); err != nil {
		return "", nil, err
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	defer clear(secret)
	callCtx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	out, err := p.client.Encrypt(callCtx, &kms.EncryptInput{
		KeyId:             aws.String(p.keyID),
		Plaintext:         secret,
		EncryptionContext: p.healthCtx,
	})
	if err != nil {
		return "", nil, err
	}
	if out.KeyId == nil || *out.KeyId == "" || len(out.CiphertextBlob) == 0 {
		return "", nil, fmt.Errorf("%w: AWS KMS answered Encrypt without a key ARN or a ciphertext", kleidi.ErrUnavailable)
	}
	p.keyARN, p.healthProbe = *out.KeyId, out.CiphertextBlob
	return p.keyARN, p.healthProbe, nil
}

// Close implements [kleidi.Provider]: later calls fail with an error wrapping [kleidi.ErrClosed]. It holds no
// secret: the KMS keys never leave AWS KMS. Close is idempotent.
func (p *Provider) Close() error {
	p.closed.Store(true)
	p.proof.close()
	return nil
}

// encrypt calls kms:Encrypt within the provider's timeout.
func (p *Provider) encrypt(ctx context.Context, plaintext []byte, encContext map[string]string) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	out, err := p.client.Encrypt(ctx, &kms.EncryptInput{
		KeyId:             aws.String(p.keyID),
		Plaintext:         plaintext,
		EncryptionContext: encContext,
	})
	if err != nil {
		return nil, err
	}
	if len(out.CiphertextBlob) == 0 || len(out.CiphertextBlob) > maxCiphertextBlobSize {
		return nil, fmt.Errorf("%w: AWS KMS returned a ciphertext of %d bytes", kleidi.ErrUnavailable, len(out.CiphertextBlob))
	}
	return out.CiphertextBlob, nil
}

// decrypt calls kms:Decrypt within the provider's timeout and returns the plaintext only if AWS KMS decrypted
// with the key of ARN arn, the provider's key. It does not name the key in the request, so that AWS KMS reads the
// key from the blob and authenticates every byte of it (a server that trusts a named key may ignore the key
// field of the blob); the check of the answer's key then refuses a blob of any other key, as naming it would.
// When AWS KMS denies access, a second Decrypt that names the key learns whether the key is disabled or pending
// deletion.
func (p *Provider) decrypt(ctx context.Context, arn string, blob []byte, encContext map[string]string) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	out, err := p.client.Decrypt(ctx, &kms.DecryptInput{
		CiphertextBlob:    blob,
		EncryptionContext: encContext,
	})
	var api smithy.APIError
	if errors.As(err, &api) && api.ErrorCode() == "AccessDeniedException" {
		// AWS KMS says no more than "access denied" about a key it read from a blob. Named, the key says why
		// (disabled, pending deletion), or the access is denied the same.
		again, named := p.client.Decrypt(ctx, &kms.DecryptInput{
			KeyId:             aws.String(arn),
			CiphertextBlob:    blob,
			EncryptionContext: encContext,
		})
		if again != nil {
			clear(again.Plaintext)
		}
		if errors.As(named, &api) && (api.ErrorCode() == "DisabledException" || api.ErrorCode() == "KMSInvalidStateException") {
			err = named
		}
	}
	if err != nil {
		return nil, err
	}
	if out.KeyId == nil || *out.KeyId != arn {
		clear(out.Plaintext)
		return nil, &smithy.GenericAPIError{Code: "IncorrectKeyException", Message: "decrypted with another key"}
	}
	return out.Plaintext, nil
}

package awskms

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/smithy-go"

	"github.com/kleidi-kms/kleidi"
)

// Errors of this package say why AWS KMS refused a call; compare with [errors.Is]. Errors of Unwrap and Health
// wrap one of them together with [kleidi.ErrUnwrap], errors of Verify together with [kleidi.ErrUnauthenticated];
// a throttled or unreachable AWS KMS gives [kleidi.ErrUnavailable] instead, and a closed provider
// [kleidi.ErrClosed].
var (
	// ErrInvalidConfig means a [Config] is incomplete or inconsistent, or the AWS SDK's configuration cannot be
	// loaded.
	ErrInvalidConfig = errors.New("awskms: invalid configuration")
	// ErrInvalidCiphertext means a wrapped key is not one this provider made: of another format, altered, made
	// under another KMS key, or made under another encryption context (another purpose, or another
	// [Config.EncryptionContext]).
	ErrInvalidCiphertext = errors.New("awskms: invalid ciphertext")
	// ErrAccessDenied means the credentials may not use the key for the operation (the key policy, an IAM
	// policy, a grant or a service control policy refuses it), or AWS rejected the credentials themselves.
	ErrAccessDenied = errors.New("awskms: access denied")
	// ErrKeyDisabled means the KMS key is disabled: enable it (kms:EnableKey) and the provider works again.
	ErrKeyDisabled = errors.New("awskms: key disabled")
	// ErrKeyState means the KMS key is in a state that forbids the operation: pending deletion (cancel the
	// deletion, then enable the key), pending import, or unavailable in its custom key store.
	ErrKeyState = errors.New("awskms: key state forbids the operation")
	// ErrKeyNotFound means no KMS key has that ID, ARN or alias in the region, or it was deleted.
	ErrKeyNotFound = errors.New("awskms: key not found")
	// ErrKeyUsage means the KMS key cannot do the operation: an encryption key that is not symmetric, or a
	// signing key whose key spec this package does not use.
	ErrKeyUsage = errors.New("awskms: wrong key type or usage")
)

// refusals maps the error codes of AWS KMS that refuse a request to what they mean.
var refusals = map[string]struct {
	err    error
	reason string // %[1]s is the key, %[2]s the permission
}{
	"InvalidCiphertextException":    {ErrInvalidCiphertext, "AWS KMS refused the ciphertext: altered, or not made under key %[1]s with this provider's encryption context"},
	"IncorrectKeyException":         {ErrInvalidCiphertext, "the ciphertext was made under another KMS key than %[1]s"},
	"AccessDeniedException":         {ErrAccessDenied, "these credentials may not use key %[1]s (%[2]s): check the key policy, IAM policies and grants"},
	"UnrecognizedClientException":   {ErrAccessDenied, "AWS does not recognise these credentials (using key %[1]s)"},
	"InvalidSignatureException":     {ErrAccessDenied, "AWS rejected the request's signature: wrong secret key or clock skew (using key %[1]s)"},
	"IncompleteSignatureException":  {ErrAccessDenied, "AWS rejected the request's signature (using key %[1]s)"},
	"DisabledException":             {ErrKeyDisabled, "key %[1]s is disabled"},
	"KMSInvalidStateException":      {ErrKeyState, "key %[1]s is pending deletion, pending import or otherwise unusable"},
	"NotFoundException":             {ErrKeyNotFound, "key %[1]s does not exist in this region"},
	"InvalidKeyUsageException":      {ErrKeyUsage, "key %[1]s may not be used for %[2]s (its key usage or key spec)"},
	"InvalidGrantTokenException":    {ErrAccessDenied, "a grant token was refused (using key %[1]s)"},
	"KMSInvalidSignatureException":  {ErrKeyUsage, "key %[1]s refused the signature"},
	"UnsupportedOperationException": {ErrKeyUsage, "key %[1]s does not support %[2]s"},
}

// transient holds the error codes of AWS KMS that a later try may not get.
var transient = map[string]bool{
	"ThrottlingException":         true,
	"LimitExceededException":      true,
	"RequestLimitExceeded":        true,
	"KeyUnavailableException":     true,
	"KMSInternalException":        true,
	"DependencyTimeoutException":  true,
	"InternalFailure":             true,
	"InternalFailureException":    true,
	"ServiceUnavailable":          true,
	"ServiceUnavailableException": true,
	"ExpiredTokenException":       true, // web identity and instance credentials are refreshed by the SDK
}

// callError classifies err, returned by the AWS SDK for op (wrap, unwrap, health, prove, verify) with key and
// permission: the caller's cancelled context as itself; a throttled, failing or unreachable AWS KMS, or this
// provider's own timeout, as [kleidi.ErrUnavailable]; a refusal as refused (if not nil) and this package's
// sentinel for its reason. The message names the key, the endpoint and the AWS error code, never a key or a
// plaintext (AWS KMS puts neither in its errors).
func (p *Provider) callError(ctx context.Context, op, key, permission string, refused, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("awskms: %s: %w", op, ctx.Err())
	}
	if errors.Is(err, kleidi.ErrUnavailable) {
		return fmt.Errorf("awskms: %s with key %s: %w", op, key, err)
	}
	var api smithy.APIError
	if errors.As(err, &api) {
		code := api.ErrorCode()
		if r, ok := refusals[code]; ok {
			reason := fmt.Sprintf(r.reason, key, permission)
			if refused == nil {
				return fmt.Errorf("awskms: %s: %w: %s (%s)", op, r.err, reason, code)
			}
			return fmt.Errorf("awskms: %s: %w: %w: %s (%s)", op, refused, r.err, reason, code)
		}
		var status *awshttp.ResponseError
		if transient[code] || (errors.As(err, &status) && status.HTTPStatusCode() >= http.StatusInternalServerError) {
			return fmt.Errorf("awskms: %s with key %s: %w: %s answered %s after the retries", op, key, kleidi.ErrUnavailable, p.endpoint, code)
		}
		if refused == nil {
			return fmt.Errorf("awskms: %s with key %s: AWS KMS refused: %s", op, key, code)
		}
		return fmt.Errorf("awskms: %s with key %s: %w: AWS KMS refused: %s", op, key, refused, code)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("awskms: %s with key %s: %w: no answer from %s within %s", op, key, kleidi.ErrUnavailable, p.endpoint, p.timeout)
	}
	// No answer from AWS KMS at all: the network, the endpoint, or the credentials chain (which may itself need
	// the network, as IRSA and instance roles do).
	return fmt.Errorf("awskms: %s with key %s: %w: %v", op, key, kleidi.ErrUnavailable, err)
}

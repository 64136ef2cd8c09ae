package awskms

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

func TestConformance(t *testing.T) {
	kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider { return newSharedProvider(t) })
}

func randomKey(t testing.TB) []byte {
	t.Helper()
	key := make([]byte, kleidi.KeySize)
	rand.Read(key)
	return key
}

func TestNewRefusesIncompleteConfig(t *testing.T) {
	ctx := context.Background()
	for name, c := range map[string]Config{
		"no key":          {SigningKeyID: "alias/s", Region: testRegion},
		"no signing key":  {KeyID: "alias/k", Region: testRegion},
		"reserved pair":   {KeyID: "alias/k", SigningKeyID: "alias/s", Region: testRegion, EncryptionContext: map[string]string{"kleidi": "x"}},
		"empty pair key":  {KeyID: "alias/k", SigningKeyID: "alias/s", Region: testRegion, EncryptionContext: map[string]string{"": "x"}},
		"negative":        {KeyID: "alias/k", SigningKeyID: "alias/s", Region: testRegion, Timeout: -1},
		"no region known": {KeyID: "alias/k", SigningKeyID: "alias/s"},
	} {
		if _, err := New(ctx, c); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("New(ctx, %s) err = %v, want an error wrapping ErrInvalidConfig", name, err)
		}
	}
}

func TestAliasNamesTheKey(t *testing.T) {
	ctx := context.Background()
	keys := sharedKeys
	admin := adminClient(server.endpoint())
	if _, err := admin.CreateAlias(ctx, &kms.CreateAliasInput{AliasName: aws.String("alias/kleidi-test"), TargetKeyId: aws.String(keys.encrypt)}); err != nil {
		t.Fatalf("CreateAlias err = %v, want nil", err)
	}
	byARN := newSharedProvider(t)
	byAlias := newSharedProvider(t, func(c *Config) { c.KeyID = "alias/kleidi-test" })
	key := randomKey(t)
	wrapped, err := byAlias.Wrap(ctx, key)
	if err != nil {
		t.Fatalf("byAlias.Wrap(ctx, key) err = %v, want nil", err)
	}
	if got, err := byARN.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("byARN.Unwrap(ctx, byAlias.Wrap(key)) err = %v, equal = %v; want nil, true", err, bytes.Equal(got, key))
	}
}

// TestEncryptionContextIsEnforced: a blob unwraps only under the encryption context it was made with: not under
// another cluster's pairs, not as the health probe's purpose, not as a bare KMS ciphertext of the same key.
func TestEncryptionContextIsEnforced(t *testing.T) {
	ctx := context.Background()
	clusterA := newSharedProvider(t, func(c *Config) { c.EncryptionContext = map[string]string{"cluster": "a"} })
	clusterB := newSharedProvider(t, func(c *Config) { c.EncryptionContext = map[string]string{"cluster": "b"} })
	plain := newSharedProvider(t)
	key := randomKey(t)
	wrapped, err := clusterA.Wrap(ctx, key)
	if err != nil {
		t.Fatalf("clusterA.Wrap(ctx, key) err = %v, want nil", err)
	}
	for name, p := range map[string]*Provider{"cluster b": clusterB, "no pairs": plain} {
		got, err := p.Unwrap(ctx, wrapped)
		if !errors.Is(err, kleidi.ErrUnwrap) || !errors.Is(err, ErrInvalidCiphertext) || got != nil {
			t.Errorf("%s: Unwrap(ctx, clusterA.Wrap(key)) = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnwrap and ErrInvalidCiphertext", name, len(got), err)
		}
	}
	if got, err := clusterA.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("clusterA.Unwrap(ctx, clusterA.Wrap(key)) err = %v, want nil", err)
	}

	// Blobs of the same key under other contexts: none, the health probe's, and one chosen by another program.
	admin := adminClient(server.endpoint())
	for name, encContext := range map[string]map[string]string{
		"no context":     nil,
		"health probe":   {"kleidi": purposeHealth},
		"another format": {"kleidi": "kek-v2"},
	} {
		out, err := admin.Encrypt(ctx, &kms.EncryptInput{KeyId: aws.String(sharedKeys.encrypt), Plaintext: key, EncryptionContext: encContext})
		if err != nil {
			t.Fatalf("Encrypt(%s) err = %v, want nil", name, err)
		}
		got, err := plain.Unwrap(ctx, append([]byte{'a', 1}, out.CiphertextBlob...))
		if !errors.Is(err, kleidi.ErrUnwrap) || !errors.Is(err, ErrInvalidCiphertext) || got != nil {
			t.Errorf("Unwrap(a blob made with %s) = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnwrap and ErrInvalidCiphertext", name, len(got), err)
		}
	}
}

// TestBlobOfAnotherKeyIsRefused: a blob of another KMS key is refused even where the credentials may use both.
func TestBlobOfAnotherKeyIsRefused(t *testing.T) {
	ctx := context.Background()
	other := newTestProvider(t, server.endpoint(), mustCreateKeys(t, server.endpoint()))
	wrapped, err := other.Wrap(ctx, randomKey(t))
	if err != nil {
		t.Fatalf("other.Wrap(ctx, key) err = %v, want nil", err)
	}
	got, err := newSharedProvider(t).Unwrap(ctx, wrapped)
	if !errors.Is(err, kleidi.ErrUnwrap) || got != nil {
		t.Fatalf("Unwrap(ctx, other.Wrap(key)) = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnwrap", len(got), err)
	}
}

// TestKeyStates: a disabled key, or one pending deletion, refuses with kleidi.ErrUnwrap and a sentinel that says
// which; Health reports it; the provider works again once the key is usable, without a restart.
func TestKeyStates(t *testing.T) {
	ctx := context.Background()
	keys := mustCreateKeys(t, server.endpoint())
	p := newTestProvider(t, server.endpoint(), keys)
	admin := adminClient(server.endpoint())
	key := randomKey(t)
	wrapped, err := p.Wrap(ctx, key)
	if err != nil {
		t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
	}
	if err := p.Health(ctx); err != nil {
		t.Fatalf("p.Health(ctx) = %v, want nil", err)
	}
	check := func(state string, want error, wantText string) {
		t.Helper()
		got, err := p.Unwrap(ctx, wrapped)
		if !errors.Is(err, kleidi.ErrUnwrap) || !errors.Is(err, want) || got != nil {
			t.Errorf("%s: p.Unwrap(ctx, wrapped) = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnwrap and %v", state, len(got), err, want)
		} else if !strings.Contains(err.Error(), wantText) || !strings.Contains(err.Error(), keys.encrypt) {
			t.Errorf("%s: p.Unwrap(ctx, wrapped) err = %q, want it to say %q and name the key", state, err, wantText)
		}
		if err := p.Health(ctx); !errors.Is(err, want) {
			t.Errorf("%s: p.Health(ctx) = %v, want an error wrapping %v", state, err, want)
		}
		if _, err := p.Wrap(ctx, key); !errors.Is(err, want) || errors.Is(err, kleidi.ErrUnavailable) {
			t.Errorf("%s: p.Wrap(ctx, key) err = %v, want an error wrapping %v", state, err, want)
		}
	}
	recovered := func(state string) {
		t.Helper()
		if got, err := p.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
			t.Errorf("after %s: p.Unwrap(ctx, wrapped) err = %v, want nil", state, err)
		}
		if err := p.Health(ctx); err != nil {
			t.Errorf("after %s: p.Health(ctx) = %v, want nil", state, err)
		}
	}

	if _, err := admin.DisableKey(ctx, &kms.DisableKeyInput{KeyId: aws.String(keys.encrypt)}); err != nil {
		t.Fatalf("DisableKey err = %v, want nil", err)
	}
	check("disabled", ErrKeyDisabled, "disabled")
	if _, err := admin.EnableKey(ctx, &kms.EnableKeyInput{KeyId: aws.String(keys.encrypt)}); err != nil {
		t.Fatalf("EnableKey err = %v, want nil", err)
	}
	recovered("EnableKey")

	if _, err := admin.ScheduleKeyDeletion(ctx, &kms.ScheduleKeyDeletionInput{KeyId: aws.String(keys.encrypt), PendingWindowInDays: aws.Int32(7)}); err != nil {
		t.Fatalf("ScheduleKeyDeletion err = %v, want nil", err)
	}
	check("pending deletion", ErrKeyState, "pending deletion")
	if _, err := admin.CancelKeyDeletion(ctx, &kms.CancelKeyDeletionInput{KeyId: aws.String(keys.encrypt)}); err != nil {
		t.Fatalf("CancelKeyDeletion err = %v, want nil", err)
	}
	if _, err := admin.EnableKey(ctx, &kms.EnableKeyInput{KeyId: aws.String(keys.encrypt)}); err != nil {
		t.Fatalf("EnableKey err = %v, want nil", err)
	}
	recovered("CancelKeyDeletion and EnableKey")
}

func TestMissingKey(t *testing.T) {
	ctx := context.Background()
	p := newSharedProvider(t, func(c *Config) { c.KeyID = "alias/kleidi-no-such-key" })
	if _, err := p.Wrap(ctx, randomKey(t)); !errors.Is(err, ErrKeyNotFound) {
		t.Errorf("p.Wrap(ctx, key) with a missing key err = %v, want an error wrapping ErrKeyNotFound", err)
	}
	if err := p.Health(ctx); !errors.Is(err, ErrKeyNotFound) || !errors.Is(err, kleidi.ErrUnwrap) {
		t.Errorf("p.Health(ctx) with a missing key = %v, want an error wrapping kleidi.ErrUnwrap and ErrKeyNotFound", err)
	}
}

// TestSigningKeyCannotWrap: a signing key named as the encryption key is refused by AWS KMS, and the error says
// the key's usage is wrong.
func TestSigningKeyCannotWrap(t *testing.T) {
	p := newSharedProvider(t, func(c *Config) { c.KeyID = sharedKeys.sign })
	if _, err := p.Wrap(context.Background(), randomKey(t)); !errors.Is(err, ErrKeyUsage) {
		t.Errorf("p.Wrap(ctx, key) with a signing key err = %v, want an error wrapping ErrKeyUsage", err)
	}
}

func TestWrapRefusesOversizedKey(t *testing.T) {
	p := newSharedProvider(t)
	if _, err := p.Wrap(context.Background(), make([]byte, MaxKeySize+1)); !errors.Is(err, kleidi.ErrTooLarge) {
		t.Errorf("p.Wrap(ctx, %d bytes) err = %v, want an error wrapping kleidi.ErrTooLarge", MaxKeySize+1, err)
	}
}

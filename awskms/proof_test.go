package awskms

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

// counting counts the Unwrap calls of a provider; its Prove and Verify are the provider's.
type counting struct {
	*Provider
	unwraps atomic.Int64
}

func (c *counting) Unwrap(ctx context.Context, wrapped []byte) ([]byte, error) {
	c.unwraps.Add(1)
	return c.Provider.Unwrap(ctx, wrapped)
}

// TestForgedKEKIsRefused plays the threat model's etcd writer, here with kms:Encrypt on the encryption key (which
// AWS key policies often grant widely) and a signing key of its own in the same AWS account: it makes a blob that
// Unwrap accepts, yet no attached key of its making is unwrapped, and none costs a call to AWS KMS.
func TestForgedKEKIsRefused(t *testing.T) {
	ctx := context.Background()
	writer, err := kleidi.NewEnvelope(ctx, newSharedProvider(t), kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatalf("kleidi.NewEnvelope err = %v, want nil", err)
	}
	defer writer.Close()
	genuine, err := writer.Encrypt(ctx, []byte("a genuine seed"), nil)
	if err != nil {
		t.Fatalf("writer.Encrypt err = %v, want nil", err)
	}

	// A node that lost its keyring: a new provider and an empty keyring.
	node := &counting{Provider: newSharedProvider(t)}
	reader, err := kleidi.NewEnvelope(ctx, node, kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatalf("kleidi.NewEnvelope err = %v, want nil", err)
	}
	defer reader.Close()
	if got, err := reader.Decrypt(ctx, genuine, nil); err != nil || string(got) != "a genuine seed" {
		t.Fatalf("reader.Decrypt(genuine) = %q, %v; want the seed, nil", got, err)
	}

	// The attacker's KEK, wrapped with kms:Encrypt alone under the provider's key and encryption context.
	kek := make([]byte, kleidi.KeySize)
	rand.Read(kek)
	keyID, raw := kleiditest.ForgeCiphertext("awskms", kek, []byte("the attacker's own 32-byte seed!"))
	out, err := adminClient(server.endpoint()).Encrypt(ctx, &kms.EncryptInput{
		KeyId:             aws.String(sharedKeys.encrypt),
		Plaintext:         kek,
		EncryptionContext: map[string]string{"kleidi": purposeKEK},
	})
	if err != nil {
		t.Fatalf("Encrypt(the attacker's KEK) err = %v, want nil", err)
	}
	blob := append([]byte{'a', 1}, out.CiphertextBlob...)
	if got, err := node.Provider.Unwrap(ctx, blob); err != nil || !bytes.Equal(got, kek) {
		t.Fatalf("Unwrap(the attacker's blob) err = %v; want nil and the attacker's KEK: Encrypt alone makes a blob that unwraps", err)
	}

	// Mallory's provider: the same encryption key, a signing key of her own.
	mallory := newTestProvider(t, server.endpoint(), testKeys{encrypt: sharedKeys.encrypt, sign: mustCreateKeys(t, server.endpoint()).sign})
	malloryProof, err := mallory.Prove(ctx, kleiditest.ProofMessage(keyID, "awskms", blob))
	if err != nil {
		t.Fatalf("mallory.Prove err = %v, want nil", err)
	}
	random := make([]byte, len(malloryProof))
	rand.Read(random)
	genuineProof := genuine.AttachedKey[4 : 4+int(genuine.AttachedKey[2])<<8|int(genuine.AttachedKey[3])]
	for name, attached := range map[string][]byte{
		"a bare blob":                      blob,
		"a random proof":                   kleiditest.ForgeAttachedKey(blob, random),
		"a proof by another signing key":   kleiditest.ForgeAttachedKey(blob, malloryProof),
		"the genuine proof of another KEK": kleiditest.ForgeAttachedKey(blob, genuineProof),
		"the genuine attached key":         genuine.AttachedKey,
	} {
		c, err := kleidi.ParseCiphertext(raw)
		if err != nil {
			t.Fatalf("kleidi.ParseCiphertext(forged) err = %v, want nil", err)
		}
		c.AttachedKey = attached
		got, err := reader.Decrypt(ctx, c, nil)
		if !errors.Is(err, kleidi.ErrUnauthenticated) || got != nil {
			t.Errorf("reader.Decrypt(a forged KEK with %s) = %q, %v; want nil, an error wrapping kleidi.ErrUnauthenticated", name, got, err)
		}
	}
	if n := node.unwraps.Load(); n != 1 {
		t.Errorf("the node unwrapped %d keys, want 1 (the genuine one): forged keys must cost no call to AWS KMS", n)
	}
}

// TestVerifyNeedsAWSKMSOnlyOnce: after its first call, Verify checks proofs with AWS KMS stopped.
func TestVerifyNeedsAWSKMSOnlyOnce(t *testing.T) {
	ctx := context.Background()
	s, err := startLocalKMS(t.TempDir(), "0")
	if err != nil {
		t.Fatal(err)
	}
	defer s.stop()
	p := newTestProvider(t, s.endpoint(), mustCreateKeys(t, s.endpoint()))
	message := []byte("a wrapped key and its key ID")
	proof, err := p.Prove(ctx, message)
	if err != nil {
		t.Fatalf("p.Prove(ctx, message) err = %v, want nil", err)
	}
	s.stop()
	for i := range 100 {
		if err := p.Verify(ctx, message, proof); err != nil {
			t.Fatalf("p.Verify(ctx, message, proof) #%d with AWS KMS stopped = %v, want nil", i, err)
		}
	}
	if err := p.Verify(ctx, append(message, '!'), proof); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("p.Verify(ctx, another message, proof) = %v, want an error wrapping kleidi.ErrUnauthenticated", err)
	}
}

// TestSignatureForAnotherPurposeIsNoProof: a signature the signing key made over a message without the proof's
// domain label is refused.
func TestSignatureForAnotherPurposeIsNoProof(t *testing.T) {
	ctx := context.Background()
	p := newSharedProvider(t)
	message := []byte("a wrapped key and its key ID")
	digest := sha256.Sum256(message)
	out, err := adminClient(server.endpoint()).Sign(ctx, &kms.SignInput{
		KeyId: aws.String(sharedKeys.sign), Message: digest[:], MessageType: types.MessageTypeDigest,
		SigningAlgorithm: types.SigningAlgorithmSpecEcdsaSha256,
	})
	if err != nil {
		t.Fatalf("Sign err = %v, want nil", err)
	}
	if err := p.Verify(ctx, message, out.Signature); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("p.Verify(ctx, message, a signature without the label) = %v, want an error wrapping kleidi.ErrUnauthenticated", err)
	}
}

func TestP384SigningKey(t *testing.T) {
	ctx := context.Background()
	sig, err := adminClient(server.endpoint()).CreateKey(ctx, &kms.CreateKeyInput{KeySpec: types.KeySpecEccNistP384, KeyUsage: types.KeyUsageTypeSignVerify})
	if err != nil {
		t.Fatalf("CreateKey(ECC_NIST_P384) err = %v, want nil", err)
	}
	p := newSharedProvider(t, func(c *Config) { c.SigningKeyID = *sig.KeyMetadata.Arn })
	proof, err := p.Prove(ctx, []byte("m"))
	if err != nil {
		t.Fatalf("p.Prove(ctx, m) err = %v, want nil", err)
	}
	if err := p.Verify(ctx, []byte("m"), proof); err != nil {
		t.Errorf("p.Verify(ctx, m, p.Prove(m)) = %v, want nil", err)
	}
}

// TestUnsuitableSigningKey: a symmetric key, or an RSA signing key, named as the signing key is refused with
// ErrKeyUsage by Prove and by Verify.
func TestUnsuitableSigningKey(t *testing.T) {
	ctx := context.Background()
	rsaKey, err := adminClient(server.endpoint()).CreateKey(ctx, &kms.CreateKeyInput{KeySpec: types.KeySpecRsa2048, KeyUsage: types.KeyUsageTypeSignVerify})
	if err != nil {
		t.Fatalf("CreateKey(RSA_2048) err = %v, want nil", err)
	}
	for name, key := range map[string]string{"symmetric": sharedKeys.encrypt, "RSA": *rsaKey.KeyMetadata.Arn} {
		p := newSharedProvider(t, func(c *Config) { c.SigningKeyID = key })
		if _, err := p.Prove(ctx, []byte("m")); !errors.Is(err, ErrKeyUsage) {
			t.Errorf("%s: p.Prove(ctx, m) err = %v, want an error wrapping ErrKeyUsage", name, err)
		}
		if err := p.Verify(ctx, []byte("m"), make([]byte, 70)); !errors.Is(err, ErrKeyUsage) || !errors.Is(err, kleidi.ErrUnauthenticated) {
			t.Errorf("%s: p.Verify(ctx, m, proof) = %v, want an error wrapping kleidi.ErrUnauthenticated and ErrKeyUsage", name, err)
		}
	}
}

package awskms

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/aws/aws-sdk-go-v2/service/kms/types"

	"github.com/kleidi-kms/kleidi"
)

// FuzzParseBlob feeds parseBlob, which reads every wrapped key before AWS KMS sees it, arbitrary bytes: it never
// panics, and it returns either an error wrapping ErrInvalidCiphertext or a bounded part of its input.
func FuzzParseBlob(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{'a', 1})
	f.Add([]byte{'a', 1, 0})
	f.Add([]byte{'a', 2, 0})
	f.Add(append([]byte{'a', 1}, make([]byte, maxCiphertextBlobSize+1)...))
	f.Fuzz(func(t *testing.T, b []byte) {
		blob, err := parseBlob(b)
		if err != nil {
			if !errors.Is(err, ErrInvalidCiphertext) || blob != nil {
				t.Fatalf("parseBlob(%d bytes) = %d bytes, %v; want nil, an error wrapping ErrInvalidCiphertext", len(b), len(blob), err)
			}
			return
		}
		if len(blob) == 0 || len(blob) > maxCiphertextBlobSize || !bytes.Equal(append([]byte{'a', 1}, blob...), b) {
			t.Fatalf("parseBlob(%d bytes) = %d bytes, want 1 to %d bytes: the input after its header", len(b), len(blob), maxCiphertextBlobSize)
		}
	})
}

// FuzzVerify feeds Verify, which runs on proofs an attacker sends, arbitrary proofs and messages, with the
// public key already fetched: it never panics and never accepts one.
func FuzzVerify(f *testing.F) {
	p, err := New(context.Background(), Config{KeyID: "k", SigningKeyID: "s", Region: testRegion, Endpoint: "http://127.0.0.1:1"})
	if err != nil {
		f.Fatal(err)
	}
	defer p.Close()
	// A public key of local-kms's making, fetched once by the shared provider.
	genuine := newSharedProvider(f)
	proof, err := genuine.Prove(context.Background(), []byte("m"))
	if err != nil {
		f.Fatal(err)
	}
	s, err := genuine.signerOf(context.Background())
	if err != nil {
		f.Fatal(err)
	}
	p.proof.signer = s
	f.Add([]byte("m"), proof[:len(proof)-1])
	f.Add([]byte("n"), proof)
	f.Add([]byte{}, []byte{0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01})
	f.Add([]byte("m"), make([]byte, maxSignatureSize+1))
	f.Fuzz(func(t *testing.T, message, proof []byte) {
		if err := p.Verify(context.Background(), message, proof); !errors.Is(err, kleidi.ErrUnauthenticated) {
			t.Fatalf("p.Verify(%q, %x) = %v, want an error wrapping kleidi.ErrUnauthenticated", message, proof, err)
		}
	})
}

// FuzzNewSigner feeds newSigner, which parses the public key AWS KMS returns, arbitrary bytes: no panic.
func FuzzNewSigner(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0x30, 0x59, 0x30, 0x13})
	f.Fuzz(func(t *testing.T, der []byte) {
		for _, spec := range []types.KeySpec{types.KeySpecEccNistP256, types.KeySpecEccNistP384, types.KeySpecRsa2048} {
			if s, err := newSigner(spec, der); err == nil && s.pub == nil {
				t.Fatalf("newSigner(%s, %x) = a signer without a key, nil", spec, der)
			}
		}
	})
}

//go:build cgo

package pkcs11_test

import (
	"context"
	"crypto/rand"
	"testing"

	"github.com/kleidi-kms/kleidi"
)

// The costs of the provider on SoftHSM 2: Wrap and Unwrap call the token; Prove and Verify, once the proof key is
// derived, do not.
func BenchmarkSoftHSM(b *testing.B) {
	p := open(b, newHSM(b).token(b, "bench"))
	ctx := context.Background()
	key := make([]byte, kleidi.KeySize)
	rand.Read(key)
	wrapped, err := p.Wrap(ctx, key)
	if err != nil {
		b.Fatal(err)
	}
	message := make([]byte, 200)
	proof, err := p.Prove(ctx, message)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("Wrap", func(b *testing.B) {
		for b.Loop() {
			if _, err := p.Wrap(ctx, key); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Unwrap", func(b *testing.B) {
		for b.Loop() {
			if _, err := p.Unwrap(ctx, wrapped); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Prove", func(b *testing.B) {
		for b.Loop() {
			if _, err := p.Prove(ctx, message); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Verify", func(b *testing.B) {
		for b.Loop() {
			if err := p.Verify(ctx, message, proof); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("UnwrapParallel", func(b *testing.B) {
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := p.Unwrap(ctx, wrapped); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
}

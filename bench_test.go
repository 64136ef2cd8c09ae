package kleidi_test

import (
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"testing"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

var benchSizes = []int{32, 4096}

// BenchmarkFloor is bare AES-256-GCM with a random nonce (crypto/cipher.NewGCMWithRandomNonce), the least any
// correct encryption of the same bytes costs: the floor for BenchmarkEnvelope.
func BenchmarkFloor(b *testing.B) {
	key := make([]byte, 32)
	block, _ := aes.NewCipher(key)
	aead, _ := cipher.NewGCMWithRandomNonce(block)
	for _, size := range benchSizes {
		plaintext := make([]byte, size)
		b.Run(fmt.Sprintf("Seal/%dB", size), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(size))
			for b.Loop() {
				aead.Seal(nil, nil, plaintext, nil)
			}
		})
		sealed := aead.Seal(nil, nil, plaintext, nil)
		b.Run(fmt.Sprintf("Open/%dB", size), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(size))
			for b.Loop() {
				if _, err := aead.Open(nil, nil, sealed, nil); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkEnvelope is the hot path: Encrypt; Decrypt of a parsed ciphertext; and ParseAndDecrypt, what a reader of
// stored bytes pays (ParseCiphertext copies and checks the bytes, then Decrypt).
func BenchmarkEnvelope(b *testing.B) {
	e, err := kleidi.NewEnvelope(ctx, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		b.Fatal(err)
	}
	for _, size := range benchSizes {
		plaintext := make([]byte, size)
		b.Run(fmt.Sprintf("Encrypt/%dB", size), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(size))
			for b.Loop() {
				if _, err := e.Encrypt(ctx, plaintext, nil); err != nil {
					b.Fatal(err)
				}
			}
		})
		c, _ := e.Encrypt(ctx, plaintext, nil)
		raw := c.Bytes()
		parsed, _ := kleidi.ParseCiphertext(raw)
		b.Run(fmt.Sprintf("Decrypt/%dB", size), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(size))
			for b.Loop() {
				if _, err := e.Decrypt(ctx, parsed, nil); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("ParseAndDecrypt/%dB", size), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(size))
			for b.Loop() {
				c, err := kleidi.ParseCiphertext(raw)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := e.Decrypt(ctx, c, nil); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

package gpg_test

import (
	"testing"

	"github.com/kleidi-kms/kleidi/gpg"
)

// benchmarkProviders are a Curve25519 key made by go-crypto and an RSA 3072 key made by gpg.
func benchmarkProviders(b *testing.B) map[string]*gpg.Provider {
	g := gnupg(b)
	return map[string]*gpg.Provider{
		"Curve25519": newProvider(b, gpg.Config{PrivateKeyFile: newTestKey(b, keyOptions{}).priv}),
		"RSA3072":    newProvider(b, gpg.Config{PrivateKeyFile: g.rsa.privBinary}),
	}
}

func BenchmarkWrap(b *testing.B) {
	for name, p := range benchmarkProviders(b) {
		b.Run(name, func(b *testing.B) {
			key := randomKey(b)
			for b.Loop() {
				if _, err := p.Wrap(ctx, key); err != nil {
					b.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
				}
			}
		})
	}
}

func BenchmarkUnwrap(b *testing.B) {
	for name, p := range benchmarkProviders(b) {
		b.Run(name, func(b *testing.B) {
			wrapped, err := p.Wrap(ctx, randomKey(b))
			if err != nil {
				b.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
			}
			for b.Loop() {
				if _, err := p.Unwrap(ctx, wrapped); err != nil {
					b.Fatalf("p.Unwrap(ctx, wrapped) err = %v, want nil", err)
				}
			}
		})
	}
}

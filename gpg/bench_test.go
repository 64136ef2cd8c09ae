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

// BenchmarkVerify measures what checking the proof of a wrapped key costs, and what refusing a proof of a key
// the provider does not know costs: the price of a flood of forged keys.
func BenchmarkVerify(b *testing.B) {
	stranger := newProvider(b, gpg.Config{PrivateKeyFile: newTestKey(b, keyOptions{}).priv})
	message := []byte("kleidi benchmark proof")
	forged, err := stranger.Prove(ctx, message)
	if err != nil {
		b.Fatalf("stranger.Prove(ctx, message) err = %v, want nil", err)
	}
	for name, p := range benchmarkProviders(b) {
		proof, err := p.Prove(ctx, message)
		if err != nil {
			b.Fatalf("p.Prove(ctx, message) err = %v, want nil", err)
		}
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				if err := p.Verify(ctx, message, proof); err != nil {
					b.Fatalf("p.Verify(ctx, message, proof) err = %v, want nil", err)
				}
			}
		})
		b.Run(name+"/UnknownKey", func(b *testing.B) {
			for b.Loop() {
				if err := p.Verify(ctx, message, forged); err == nil {
					b.Fatalf("p.Verify(ctx, message, stranger's proof) err = nil, want an error")
				}
			}
		})
	}
}

func BenchmarkProve(b *testing.B) {
	for name, p := range benchmarkProviders(b) {
		b.Run(name, func(b *testing.B) {
			message := []byte("kleidi benchmark proof")
			for b.Loop() {
				if _, err := p.Prove(ctx, message); err != nil {
					b.Fatalf("p.Prove(ctx, message) err = %v, want nil", err)
				}
			}
		})
	}
}

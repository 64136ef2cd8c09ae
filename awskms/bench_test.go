package awskms

import (
	"context"
	"testing"
)

// The benchmarks measure each operation against local-kms on loopback: a round trip over HTTP to a server that
// does the cryptography, without AWS's network latency (add it: a few milliseconds within a region).

func BenchmarkWrap(b *testing.B) {
	p, ctx, key := newSharedProvider(b), context.Background(), randomKey(b)
	for b.Loop() {
		if _, err := p.Wrap(ctx, key); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkUnwrap(b *testing.B) {
	p, ctx := newSharedProvider(b), context.Background()
	wrapped, err := p.Wrap(ctx, randomKey(b))
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := p.Unwrap(ctx, wrapped); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkProve(b *testing.B) {
	p, ctx := newSharedProvider(b), context.Background()
	message := make([]byte, 256)
	for b.Loop() {
		if _, err := p.Prove(ctx, message); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVerify is what each attached key costs before any unwrap: local, after the first call.
func BenchmarkVerify(b *testing.B) {
	p, ctx := newSharedProvider(b), context.Background()
	message := make([]byte, 256)
	proof, err := p.Prove(ctx, message)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if err := p.Verify(ctx, message, proof); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkHealth(b *testing.B) {
	p, ctx := newSharedProvider(b), context.Background()
	for b.Loop() {
		if err := p.Health(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

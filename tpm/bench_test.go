package tpm

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/kleidi-kms/kleidi"
)

// countingTPM counts the commands sent to the TPM.
type countingTPM struct {
	transport.TPMCloser
	n *atomic.Int64
}

func (c *countingTPM) Send(cmd []byte) ([]byte, error) {
	c.n.Add(1)
	return c.TPMCloser.Send(cmd)
}

// benchmarkProvider benchmarks Wrap and Unwrap of a 32-byte key on the TPM that open reaches (connecting for each
// operation with perOp), with and without a PCR binding, and reports the TPM commands each call sends.
func benchmarkProvider(b *testing.B, open opener, perOp bool) {
	for _, bc := range []struct {
		name string
		cfg  Config
	}{
		{"plain", Config{}},
		{"pcr7", Config{PCRs: []int{7}}},
	} {
		var n atomic.Int64
		ctx := context.Background()
		p, err := newProvider(ctx, bc.cfg, func() (transport.TPMCloser, error) {
			t, err := open()
			if err != nil {
				return nil, err
			}
			return &countingTPM{TPMCloser: t, n: &n}, nil
		}, perOp)
		if err != nil {
			b.Fatalf("newProvider(ctx, %+v) err = %v, want nil", bc.cfg, err)
		}
		key := make([]byte, 32)
		wrapped, err := p.Wrap(ctx, key)
		if err != nil {
			b.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
		}
		b.Run("Wrap/"+bc.name, func(b *testing.B) {
			n.Store(0)
			for b.Loop() {
				if _, err := p.Wrap(ctx, key); err != nil {
					b.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
				}
			}
			b.ReportMetric(float64(n.Load())/float64(b.N), "tpmcmds/op")
		})
		b.Run("Unwrap/"+bc.name, func(b *testing.B) {
			n.Store(0)
			for b.Loop() {
				if _, err := p.Unwrap(ctx, wrapped); err != nil {
					b.Fatalf("p.Unwrap(ctx, wrapped) err = %v, want nil", err)
				}
			}
			b.ReportMetric(float64(n.Load())/float64(b.N), "tpmcmds/op")
		})
		if bc.name == "plain" {
			benchmarkFirstDecrypt(b, p)
		}
		p.Close()
	}
}

// benchmarkFirstDecrypt measures Envelope.Decrypt of a ciphertext under a KEK the process has not used yet (one
// provider Unwrap, then AES-GCM) beside a Decrypt whose KEK is in memory.
func benchmarkFirstDecrypt(b *testing.B, p kleidi.Provider) {
	ctx := context.Background()
	ring := kleidi.NewMemoryKeyring()
	e, err := kleidi.NewEnvelope(ctx, p, ring, kleidi.WithCreateIfEmpty())
	if err != nil {
		b.Fatal(err)
	}
	c, err := e.Encrypt(ctx, make([]byte, 32), nil)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := e.Rotate(ctx); err != nil {
		b.Fatal(err)
	}
	b.Run("Envelope/FirstDecrypt", func(b *testing.B) {
		for b.Loop() {
			b.StopTimer()
			fresh, err := kleidi.NewEnvelope(ctx, p, ring) // unwraps the active KEK, not c's
			if err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			if _, err := fresh.Decrypt(ctx, c, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Envelope/CachedDecrypt", func(b *testing.B) {
		for b.Loop() {
			if _, err := e.Decrypt(ctx, c, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkSwtpm(b *testing.B) {
	s := startSwtpm(b, false, swtpmFlags)
	open, perOp, err := newOpener(s.path())
	if err != nil {
		b.Fatal(err)
	}
	benchmarkProvider(b, open, perOp)
}

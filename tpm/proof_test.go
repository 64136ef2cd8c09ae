//go:build cgo

package tpm

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/tpm/tpmsim"
)

func prove(t testing.TB, p *Provider, message []byte) []byte {
	t.Helper()
	proof, err := p.Prove(context.Background(), message)
	if err != nil {
		t.Fatalf("p.Prove(ctx, message) err = %v, want nil", err)
	}
	if len(proof) != ProofSize || len(proof) > kleidi.MaxProofSize {
		t.Fatalf("p.Prove(ctx, message) = %d bytes, want %d", len(proof), ProofSize)
	}
	return proof
}

func TestProveVerify(t *testing.T) {
	ctx := context.Background()
	for name, cfg := range map[string]Config{
		"plain":    {},
		"pcr+auth": {PCRs: []int{7, 16}, AuthFile: writeAuthFile(t, "correct horse\n")},
	} {
		t.Run(name, func(t *testing.T) {
			p := newSimProvider(t, cfg)
			msg := []byte("kleidi wrapped key v2\x00kleidi-tpm-abc\x00tpm\x00blob")
			proof := prove(t, p, msg)
			if err := p.Verify(ctx, msg, proof); err != nil {
				t.Fatalf("p.Verify(ctx, msg, p.Prove(msg)) = %v, want nil", err)
			}
			if again := prove(t, p, msg); !bytes.Equal(again, proof) {
				t.Fatalf("p.Prove(ctx, msg) twice gave two proofs")
			}
			other := bytes.Clone(msg)
			other[len(other)-1] ^= 1
			if err := p.Verify(ctx, other, proof); !errors.Is(err, kleidi.ErrUnauthenticated) {
				t.Fatalf("p.Verify(ctx, other message, proof) = %v, want an error wrapping kleidi.ErrUnauthenticated", err)
			}
			for i := range proof {
				bad := bytes.Clone(proof)
				bad[i] ^= 0x80
				if err := p.Verify(ctx, msg, bad); !errors.Is(err, kleidi.ErrUnauthenticated) {
					t.Fatalf("p.Verify(ctx, msg, proof with byte %d flipped) = %v, want an error wrapping kleidi.ErrUnauthenticated", i, err)
				}
			}
			for _, n := range []int{0, 1, ProofSize - 1, ProofSize + 1, kleidi.MaxProofSize, kleidi.MaxProofSize + 1, 1 << 20} {
				bad := make([]byte, n)
				copy(bad, proof)
				if err := p.Verify(ctx, msg, bad); !errors.Is(err, kleidi.ErrUnauthenticated) {
					t.Fatalf("p.Verify(ctx, msg, %d-byte proof) = %v, want an error wrapping kleidi.ErrUnauthenticated", n, err)
				}
			}
			assertNoHandles(t, p)
		})
	}
}

// TestProofKeyBoundToTPMAndPolicy: the proof key is the same for every provider of the same configuration on the
// same TPM, after a reboot too, and another for another PCR selection, other PCR values, another auth value or
// a cleared TPM: a process that does not satisfy the configured policy cannot make a proof the provider accepts
// (issue 12, item 1: a blob sealed by another process, with no policy or other PCRs, comes with no valid proof).
func TestProofKeyBoundToTPMAndPolicy(t *testing.T) {
	ctx := context.Background()
	msg := []byte("a wrapped key")
	authFile := writeAuthFile(t, "s3cret")
	cfg := Config{PCRs: []int{7}, AuthFile: authFile}
	p := newSimProvider(t, cfg)
	proof := prove(t, p, msg)

	// The same configuration in another provider (another process) gives the same proof.
	same := newSimProviderShared(t, p, cfg)
	if got := prove(t, same, msg); !bytes.Equal(got, proof) {
		t.Fatalf("Prove on a second provider of the same configuration differs")
	}
	same.Close()

	// Other configurations on the same TPM cannot make a proof p accepts.
	for name, other := range map[string]Config{
		"no PCRs, no auth": {},
		"no PCRs":          {AuthFile: authFile},
		"PCR 8":            {PCRs: []int{8}, AuthFile: authFile},
		"PCRs 7, 8":        {PCRs: []int{7, 8}, AuthFile: authFile},
		"no auth":          {PCRs: []int{7}},
		"wrong auth":       {PCRs: []int{7}, AuthFile: writeAuthFile(t, "s3cres")},
	} {
		q := newSimProviderShared(t, p, other)
		forged := prove(t, q, msg)
		if err := p.Verify(ctx, msg, forged); !errors.Is(err, kleidi.ErrUnauthenticated) {
			t.Errorf("p.Verify(ctx, msg, proof by %s) = %v, want an error wrapping kleidi.ErrUnauthenticated", name, err)
		}
		q.Close()
	}

	// A reboot keeps the proof key.
	if err := sim(t, p).Reset(); err != nil {
		t.Fatalf("simulator Reset() = %v", err)
	}
	rebooted := newSimProviderShared(t, p, cfg)
	if got := prove(t, rebooted, msg); !bytes.Equal(got, proof) {
		t.Fatalf("Prove after a reboot differs from before")
	}
	rebooted.Close()

	// Another boot state (PCR 7 extended) gives another key: a process there cannot prove for p.
	extendPCR(t, p, 7)
	changed := newSimProviderShared(t, p, cfg)
	if err := p.Verify(ctx, msg, prove(t, changed, msg)); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("p.Verify(ctx, msg, proof made after PCR 7 changed) = %v, want an error wrapping kleidi.ErrUnauthenticated", err)
	}
	if err := changed.Verify(ctx, msg, proof); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("Verify after PCR 7 changed of a proof made before = %v, want an error wrapping kleidi.ErrUnauthenticated", err)
	}
	changed.Close()

	// p derived its key before: it keeps verifying without the TPM.
	if err := p.Verify(ctx, msg, proof); err != nil {
		t.Fatalf("p.Verify(ctx, msg, proof) after PCR 7 changed = %v, want nil (the key is kept in memory)", err)
	}
	if err := p.Health(ctx); err != nil { // sets up the SRK the reboot unloaded
		t.Fatalf("p.Health(ctx) = %v, want nil", err)
	}
	assertNoHandles(t, p)
}

// TestProofKeyClearedTPM: after a TPM clear, the same configuration gives another proof key.
func TestProofKeyClearedTPM(t *testing.T) {
	ctx := context.Background()
	msg := []byte("a wrapped key")
	p := newSimProvider(t, Config{})
	proof := prove(t, p, msg)
	if err := sim(t, p).ManufactureReset(); err != nil {
		t.Fatalf("simulator ManufactureReset() = %v", err)
	}
	q := newSimProviderShared(t, p, Config{})
	if err := q.Verify(ctx, msg, proof); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Fatalf("q.Verify(ctx, msg, proof made before the clear) = %v, want an error wrapping kleidi.ErrUnauthenticated", err)
	}
}

// TestVerifyCallsTheTPMOnce: Verify runs on bytes an attacker sends, so after the first call it never calls the
// TPM, whatever it is given, and a proof of the wrong size never calls it at all.
func TestVerifyCallsTheTPMOnce(t *testing.T) {
	ctx := context.Background()
	p := newSimProvider(t, Config{PCRs: []int{7}})
	log := recordCommands(t, p)
	for _, n := range []int{0, ProofSize - 1, kleidi.MaxProofSize + 1} {
		if err := p.Verify(ctx, []byte("m"), make([]byte, n)); !errors.Is(err, kleidi.ErrUnauthenticated) {
			t.Fatalf("p.Verify(ctx, m, %d bytes) = %v, want an error wrapping kleidi.ErrUnauthenticated", n, err)
		}
	}
	if n := log.total(); n != 0 {
		t.Fatalf("Verify of proofs of the wrong size sent %d TPM commands, want 0", n)
	}
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			msg := []byte{byte(i)}
			if err := p.Verify(ctx, msg, make([]byte, ProofSize)); !errors.Is(err, kleidi.ErrUnauthenticated) {
				t.Errorf("p.Verify(ctx, msg, zeros) = %v, want an error wrapping kleidi.ErrUnauthenticated", err)
			}
		})
	}
	wg.Wait()
	if n := log.count(tpm2.TPMCCHMAC); n != 1 {
		t.Fatalf("8 concurrent first Verify calls sent %d TPM2_HMAC commands, want 1", n)
	}
	first := log.total()
	proof := prove(t, p, []byte("m"))
	for i := range 1000 {
		msg := []byte{byte(i), byte(i >> 8)}
		if err := p.Verify(ctx, msg, proof); !errors.Is(err, kleidi.ErrUnauthenticated) {
			t.Fatalf("p.Verify(ctx, msg %d, proof of m) = %v, want an error wrapping kleidi.ErrUnauthenticated", i, err)
		}
	}
	if err := p.Verify(ctx, []byte("m"), proof); err != nil {
		t.Fatalf("p.Verify(ctx, m, proof) = %v, want nil", err)
	}
	if n := log.total(); n != first {
		t.Fatalf("1,001 Verify and a Prove after the first Verify sent %d TPM commands, want 0", n-first)
	}
}

// TestProofKeyUnavailable: with the TPM gone, Verify reports ErrUnavailable and asks the TPM at most once per
// retry interval.
func TestProofKeyUnavailable(t *testing.T) {
	ctx := context.Background()
	p := newSimProvider(t, Config{})
	var tries atomic.Int64
	p.sem <- struct{}{}
	inner := p.tpm
	t.Cleanup(func() { inner.Close() })
	p.tpm = goneTPM{&tries}
	p.srk = nil
	p.open = func() (transport.TPMCloser, error) {
		tries.Add(1)
		return nil, errors.New("connection refused")
	}
	<-p.sem
	for range 100 {
		if err := p.Verify(ctx, []byte("m"), make([]byte, ProofSize)); !errors.Is(err, kleidi.ErrUnavailable) {
			t.Fatalf("p.Verify(ctx, m, proof) with the TPM gone = %v, want an error wrapping kleidi.ErrUnavailable", err)
		}
	}
	if n := tries.Load(); n > 2 {
		t.Fatalf("100 Verify calls with the TPM gone made %d attempts to reach it, want at most 2", n)
	}
}

// goneTPM is a connection to a TPM that went away.
type goneTPM struct{ tries *atomic.Int64 }

func (g goneTPM) Send([]byte) ([]byte, error) {
	g.tries.Add(1)
	return nil, errors.New("broken pipe")
}

func (goneTPM) Close() error { return nil }

// TestProofCloseZeroes: after Close, Prove and Verify fail with ErrClosed.
func TestProofCloseZeroes(t *testing.T) {
	ctx := context.Background()
	p := newSimProvider(t, Config{AuthFile: writeAuthFile(t, "s3cret")})
	proof := prove(t, p, []byte("m"))
	p.Close() // kleidi.ProofKey's tests check that its Close zeroes the key
	if _, err := p.Prove(ctx, []byte("m")); !errors.Is(err, kleidi.ErrClosed) {
		t.Fatalf("p.Prove(ctx, m) after Close err = %v, want an error wrapping kleidi.ErrClosed", err)
	}
	if err := p.Verify(ctx, []byte("m"), proof); !errors.Is(err, kleidi.ErrClosed) {
		t.Fatalf("p.Verify(ctx, m, proof) after Close = %v, want an error wrapping kleidi.ErrClosed", err)
	}
}

// TestProofErrorsHoldNoSecret: no error of Prove or Verify holds the proof key, a proof, or the auth value.
func TestProofErrorsHoldNoSecret(t *testing.T) {
	ctx := context.Background()
	p := newSimProvider(t, Config{AuthFile: writeAuthFile(t, "s3cret")})
	proof := prove(t, p, []byte("m"))
	key, err := p.deriveProofKey(ctx) // the same key, derived again
	if err != nil {
		t.Fatal(err)
	}
	secrets := []string{"s3cret", hex.EncodeToString(key), hex.EncodeToString(proof), string(key), string(proof)}
	var errs []error
	for _, bad := range [][]byte{nil, proof[:31], append(bytes.Clone(proof), 0), make([]byte, ProofSize)} {
		errs = append(errs, p.Verify(ctx, []byte("m"), bad))
	}
	errs = append(errs, p.Verify(ctx, []byte("n"), proof))
	p.Close()
	_, err = p.Prove(ctx, []byte("m"))
	errs = append(errs, err, p.Verify(ctx, []byte("m"), proof))
	for _, err := range errs {
		if err == nil {
			t.Fatalf("an error case returned nil")
		}
		for _, s := range secrets {
			if s != "" && strings.Contains(err.Error(), s) {
				t.Fatalf("error %q holds a secret", err)
			}
		}
	}
}

// FuzzVerify checks that Verify, which runs on untrusted bytes, never panics and accepts only the proof Prove
// gives.
func FuzzVerify(f *testing.F) {
	p, err := New(context.Background(), Config{Open: tpmsim.Open, PCRs: []int{7}})
	if err != nil {
		f.Fatalf("New(ctx, simulator) err = %v, want nil", err)
	}
	f.Cleanup(func() { p.Close() })
	good, err := p.Prove(context.Background(), []byte("m"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add([]byte("m"), good)
	f.Add([]byte("m"), []byte{})
	f.Add([]byte{}, make([]byte, ProofSize))
	f.Add([]byte("m"), make([]byte, kleidi.MaxProofSize+1))
	f.Fuzz(func(t *testing.T, msg, proof []byte) {
		err := p.Verify(context.Background(), msg, proof)
		want, perr := p.Prove(context.Background(), msg)
		if perr != nil {
			t.Fatal(perr)
		}
		if bytes.Equal(want, proof) != (err == nil) {
			t.Fatalf("p.Verify(ctx, msg, proof) = %v, with proof == Prove(msg) %v", err, bytes.Equal(want, proof))
		}
		if err != nil && !errors.Is(err, kleidi.ErrUnauthenticated) {
			t.Fatalf("p.Verify(ctx, msg, proof) = %v, want nil or an error wrapping kleidi.ErrUnauthenticated", err)
		}
	})
}

// TestAuthValueNeverOnTheBus watches every command a provider with an auth value sends, from its first proof to a
// wrap and an unwrap: none carries the auth value in clear, so an interposer on the bus learns nothing of it.
func TestAuthValueNeverOnTheBus(t *testing.T) {
	secret := make([]byte, 16)
	rand.Read(secret)
	p := newSimProvider(t, Config{PCRs: []int{7}, AuthFile: writeAuthFile(t, hex.EncodeToString(secret))}) // 32 bytes
	log := recordCommands(t, p)
	ctx := context.Background()
	proof, err := p.Prove(ctx, []byte("m"))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Verify(ctx, []byte("m"), proof); err != nil {
		t.Fatal(err)
	}
	blob, err := p.Wrap(ctx, make([]byte, kleidi.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Unwrap(ctx, blob); err != nil {
		t.Fatal(err)
	}
	auth := []byte(hex.EncodeToString(secret))
	log.mu.Lock()
	defer log.mu.Unlock()
	if len(log.raw) == 0 {
		t.Fatal("no command recorded")
	}
	for i, cmd := range log.raw {
		if bytes.Contains(cmd, auth) {
			t.Errorf("command %d (code %v) carries the auth value in clear", i, log.codes[i])
		}
	}
}

//go:build cgo

package tpm

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
	"github.com/kleidi-kms/kleidi/tpm/tpmsim"
)

// newSimProvider returns a provider on a fresh in-process simulator, closed at the end of the test.
func newSimProvider(t testing.TB, cfg Config) *Provider {
	t.Helper()
	cfg.Open = tpmsim.Open
	p, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("New(ctx, %+v) err = %v, want nil", cfg, err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// sim returns the in-process simulator behind p.
func sim(t testing.TB, p *Provider) *tpmsim.TPM {
	t.Helper()
	var s *tpmsim.TPM
	withTPM(t, p, func(tp transport.TPM) {
		c, ok := tp.(*tpmsim.TPM)
		if !ok {
			t.Fatalf("provider transport is %T, want *tpmsim.TPM", tp)
		}
		s = c
	})
	return s
}

func TestConformanceSimulator(t *testing.T) {
	kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider {
		return newSimProvider(t, Config{})
	})
}

func TestConformanceSimulatorPCRAndAuth(t *testing.T) {
	authFile := writeAuthFile(t, "correct horse\n")
	kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider {
		return newSimProvider(t, Config{PCRs: []int{7, 16}, AuthFile: authFile})
	})
}

func TestSimulatorSecondOpenFails(t *testing.T) {
	newSimProvider(t, Config{})
	if p, err := New(context.Background(), Config{Open: tpmsim.Open}); err == nil {
		p.Close()
		t.Fatalf("second New(ctx, simulator) err = nil, want an error")
	}
}

// TestReboot: a TPM reset (power cycle) unloads every transient object; the SRK is recreated from the same seed
// and every key sealed before unwraps after.
func TestReboot(t *testing.T) {
	ctx := context.Background()
	for _, name := range []string{"plain", "pcr+auth"} {
		t.Run(name, func(t *testing.T) {
			cfg := Config{}
			if name != "plain" {
				cfg = Config{PCRs: []int{7}, AuthFile: writeAuthFile(t, "pw")}
			}
			p := newSimProvider(t, cfg)
			var keys, blobs [][]byte
			for range 3 {
				k, w := wrapUnwrap(t, p)
				keys, blobs = append(keys, k), append(blobs, w)
			}
			for reboot := range 2 {
				if err := sim(t, p).Reset(); err != nil {
					t.Fatalf("simulator Reset() = %v", err)
				}
				if reboot == 1 {
					// The second time, Health is the first call after the reset.
					if err := p.Health(ctx); err != nil {
						t.Fatalf("p.Health(ctx) after reset = %v, want nil", err)
					}
				}
				for i, w := range blobs {
					got, err := p.Unwrap(ctx, w)
					if err != nil {
						t.Fatalf("p.Unwrap(ctx, blob %d) after reset err = %v, want nil", i, err)
					}
					if !bytes.Equal(got, keys[i]) {
						t.Fatalf("p.Unwrap(ctx, blob %d) after reset differs from its key", i)
					}
				}
			}
			wrapUnwrap(t, p)
		})
	}
}

// TestClear: a TPM clear (new owner seed) makes every sealed key unrecoverable, and Unwrap says why; the provider
// that pinned the old storage root key refuses to seal under the new one, and a new provider works.
func TestClear(t *testing.T) {
	ctx := context.Background()
	p := newSimProvider(t, Config{})
	_, blob := wrapUnwrap(t, p)
	if err := sim(t, p).ManufactureReset(); err != nil {
		t.Fatalf("simulator ManufactureReset() = %v", err)
	}
	got, err := p.Unwrap(ctx, blob)
	if !errors.Is(err, kleidi.ErrUnwrap) || !errors.Is(err, ErrStorageKeyChanged) || got != nil {
		t.Fatalf("p.Unwrap(ctx, blob) after clear = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnwrap and ErrStorageKeyChanged", len(got), err)
	}
	if !strings.Contains(err.Error(), "cleared") {
		t.Errorf("p.Unwrap(ctx, blob) after clear err = %q, want it to say the TPM was cleared", err)
	}
	if _, err := p.Wrap(ctx, randomKey(t)); !errors.Is(err, ErrStorageKeyChanged) {
		t.Fatalf("p.Wrap(ctx, key) after clear err = %v, want an error wrapping ErrStorageKeyChanged", err)
	}
	if err := p.Health(ctx); !errors.Is(err, ErrStorageKeyChanged) {
		t.Fatalf("p.Health(ctx) after clear = %v, want an error wrapping ErrStorageKeyChanged", err)
	}
	// New keys work under the new seed, with a provider started after the clear.
	wrapUnwrap(t, newSimProviderShared(t, p, Config{}))
}

func extendPCR(t *testing.T, p *Provider, pcr int) {
	t.Helper()
	withTPM(t, p, func(tp transport.TPM) {
		_, err := tpm2.PCRExtend{
			PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
			Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{
				HashAlg: tpm2.TPMAlgSHA256, Digest: bytes.Repeat([]byte{0x42}, 32),
			}}},
		}.Execute(tp)
		if err != nil {
			t.Fatalf("PCRExtend(%d) err = %v, want nil", pcr, err)
		}
	})
}

func TestPCRPolicy(t *testing.T) {
	ctx := context.Background()
	p := newSimProvider(t, Config{PCRs: []int{7}})
	unbound := newSimProviderShared(t, p, Config{})
	key, blob := wrapUnwrap(t, p)
	freeKey, freeBlob := wrapUnwrap(t, unbound)

	// Another PCR changes: the key still unwraps.
	extendPCR(t, p, 8)
	if got, err := p.Unwrap(ctx, blob); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("p.Unwrap(ctx, blob) after extending PCR 8 err = %v, want nil and the key", err)
	}

	// The bound PCR changes: Unwrap refuses and says it is the PCR policy.
	extendPCR(t, p, 7)
	got, err := p.Unwrap(ctx, blob)
	if !errors.Is(err, ErrPolicy) || !errors.Is(err, kleidi.ErrUnwrap) || got != nil {
		t.Fatalf("p.Unwrap(ctx, blob) after extending PCR 7 = %d bytes, %v; want nil, an error wrapping ErrPolicy and kleidi.ErrUnwrap", len(got), err)
	}
	if !strings.Contains(err.Error(), "PCR") {
		t.Errorf("p.Unwrap(ctx, blob) after extending PCR 7 err = %q, want it to mention PCR", err)
	}
	// A key not bound to PCRs is unaffected, for a provider configured without PCRs.
	if got, err := unbound.Unwrap(ctx, freeBlob); err != nil || !bytes.Equal(got, freeKey) {
		t.Fatalf("unbound.Unwrap(ctx, unbound blob) after extending PCR 7 err = %v, want nil and the key", err)
	}
	// A key sealed now binds the new value.
	wrapUnwrap(t, p)
	assertNoHandles(t, p, unbound)
}

// newSimProviderShared returns a second provider on the simulator connection of p, with another configuration.
func newSimProviderShared(t *testing.T, p *Provider, cfg Config) *Provider {
	t.Helper()
	var tp transport.TPM
	withTPM(t, p, func(c transport.TPM) { tp = c })
	q, err := newProvider(context.Background(), cfg, func() (transport.TPMCloser, error) { return nopCloser{tp}, nil }, false)
	if err != nil {
		t.Fatalf("newProvider(ctx, %+v) err = %v, want nil", cfg, err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

type nopCloser struct{ transport.TPM }

func (nopCloser) Close() error { return nil }

func TestAuthValue(t *testing.T) {
	ctx := context.Background()
	p := newSimProvider(t, Config{AuthFile: writeAuthFile(t, "s3cret\n")})
	_, blob := wrapUnwrap(t, p)

	wrong := newSimProviderShared(t, p, Config{AuthFile: writeAuthFile(t, "wrong")})
	got, err := wrong.Unwrap(ctx, blob)
	if !errors.Is(err, kleidi.ErrUnwrap) || got != nil {
		t.Fatalf("wrong.Unwrap(ctx, blob) = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnwrap", len(got), err)
	}
	if strings.Contains(err.Error(), "s3cret") {
		t.Errorf("wrong.Unwrap(ctx, blob) err = %q holds the auth value", err)
	}
	// The simulator has room for three objects: close each second provider when done.
	wrong.Close()
	none := newSimProviderShared(t, p, Config{})
	if _, err := none.Unwrap(ctx, blob); !errors.Is(err, kleidi.ErrUnwrap) || !strings.Contains(err.Error(), "auth value") {
		t.Fatalf("none.Unwrap(ctx, blob) err = %v, want an error wrapping kleidi.ErrUnwrap that names the auth value", err)
	}
	_, plain := wrapUnwrap(t, none)
	if _, err := p.Unwrap(ctx, plain); !errors.Is(err, kleidi.ErrUnwrap) {
		t.Fatalf("p.Unwrap(ctx, blob sealed without auth) err = %v, want an error wrapping kleidi.ErrUnwrap", err)
	}
	none.Close()
	assertNoHandles(t, p)
}

func TestAuthFileErrors(t *testing.T) {
	for name, content := range map[string]string{"empty": "", "newline only": "\n", "too long": strings.Repeat("a", MaxAuthSize+1)} {
		_, err := New(context.Background(), Config{Open: tpmsim.Open, AuthFile: writeAuthFile(t, content)})
		if err == nil {
			t.Errorf("New(ctx, auth file %s) err = nil, want an error", name)
		}
	}
	if _, err := New(context.Background(), Config{Open: tpmsim.Open, AuthFile: filepath.Join(t.TempDir(), "missing")}); err == nil {
		t.Errorf("New(ctx, missing auth file) err = nil, want an error")
	}
}

func TestConfigErrors(t *testing.T) {
	for _, cfg := range []Config{
		{Path: "nonsense"},
		{Path: "tcp://127.0.0.1"},
		{Path: "unix://"},
		{Open: tpmsim.Open, PCRs: []int{24}},
		{Open: tpmsim.Open, PCRs: []int{-1}},
		{Open: tpmsim.Open, SRKName: "zz"},
		{Open: tpmsim.Open, SRKName: "000b"},
		{Open: tpmsim.Open, SRKName: "0004" + strings.Repeat("00", 32)},
		{Open: tpmsim.Open, SRKName: "000b" + strings.Repeat("00", 32)}, // well formed, not this TPM's
	} {
		if p, err := New(context.Background(), cfg); err == nil {
			p.Close()
			t.Errorf("New(ctx, %+v) err = nil, want an error", cfg)
		}
	}
}

func TestNoHandleLeak(t *testing.T) {
	ctx := context.Background()
	p := newSimProvider(t, Config{PCRs: []int{7}, AuthFile: writeAuthFile(t, "pw")})
	_, blob := wrapUnwrap(t, p)
	bad := bytes.Clone(blob)
	bad[len(bad)-1] ^= 1
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	for range 20 {
		wrapUnwrap(t, p)
		if _, err := p.Unwrap(ctx, bad); err == nil {
			t.Fatalf("p.Unwrap(ctx, tampered) err = nil, want an error")
		}
		if _, err := p.Unwrap(cancelled, blob); err == nil {
			t.Fatalf("p.Unwrap(cancelled, blob) err = nil, want an error")
		}
		if err := p.Health(ctx); err != nil {
			t.Fatalf("p.Health(ctx) = %v, want nil", err)
		}
	}
	// A policy failure happens after the session and the object are loaded.
	extendPCR(t, p, 7)
	for range 5 {
		if _, err := p.Unwrap(ctx, blob); !errors.Is(err, ErrPolicy) {
			t.Fatalf("p.Unwrap(ctx, blob) err = %v, want ErrPolicy", err)
		}
	}
	assertNoHandles(t, p)
	// Close flushes the SRK too.
	var tp transport.TPM
	withTPM(t, p, func(c transport.TPM) { tp = c })
	s := tp.(*tpmsim.TPM)
	q := newSimProviderShared(t, p, Config{})
	q.Close()
	objects, _ := countHandles(t, s)
	if len(objects) != 1 {
		t.Errorf("transient handles after closing a second provider = %#x, want only the first provider's SRK", objects)
	}
}

// TestPersistentSRK: an SRK provisioned at the TCG handle is used instead of a transient one, and keys sealed
// under either unseal under the other.
func TestPersistentSRK(t *testing.T) {
	ctx := context.Background()
	p := newSimProvider(t, Config{})
	key, blob := wrapUnwrap(t, p)
	withTPM(t, p, func(tp transport.TPM) {
		_, err := tpm2.EvictControl{
			Auth:             tpm2.TPMRHOwner,
			ObjectHandle:     &tpm2.NamedHandle{Handle: p.srk.handle, Name: p.srk.name},
			PersistentHandle: srkHandle,
		}.Execute(tp)
		if err != nil {
			t.Fatalf("EvictControl err = %v, want nil", err)
		}
	})
	q := newSimProviderShared(t, p, Config{})
	if !q.srk.persistent || q.srk.handle != srkHandle {
		t.Fatalf("q.srk = %#x (persistent %v), want the persistent handle %#x", q.srk.handle, q.srk.persistent, srkHandle)
	}
	if got, err := q.Unwrap(ctx, blob); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("q.Unwrap(ctx, blob) err = %v, want nil and the key", err)
	}
	k2, b2 := wrapUnwrap(t, q)
	if got, err := p.Unwrap(ctx, b2); err != nil || !bytes.Equal(got, k2) {
		t.Fatalf("p.Unwrap(ctx, blob sealed under the persistent SRK) err = %v, want nil and the key", err)
	}
}

func TestParsePCRs(t *testing.T) {
	for in, want := range map[string][]int{"": nil, "7": {7}, "7, 0,7,23": {0, 7, 23}} {
		got, err := ParsePCRs(in)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("ParsePCRs(%q) = %v, %v; want %v, nil", in, got, err, want)
		}
	}
	for _, in := range []string{"24", "-1", "a", "7,,8"} {
		if got, err := ParsePCRs(in); err == nil {
			t.Errorf("ParsePCRs(%q) = %v, nil; want an error", in, got)
		}
	}
}

func BenchmarkSimulator(b *testing.B) {
	benchmarkProvider(b, tpmsim.Open, false)
}

func TestNodeConformanceSimulator(t *testing.T) {
	authFile := writeAuthFile(t, "correct horse\n")
	kleiditest.TestNode(t, func(t *testing.T) kleidi.Provider {
		return newSimProvider(t, Config{PCRs: []int{7}, AuthFile: authFile})
	}, OpenRecipient)
}

// The path "simulator" says where the simulator went, rather than failing as an unknown device.
func TestSimulatorPathPointsToTpmsim(t *testing.T) {
	_, err := New(context.Background(), Config{Path: "simulator"})
	if err == nil || !strings.Contains(err.Error(), "tpmsim.Open") {
		t.Errorf(`New(Config{Path: "simulator"}) err = %v, want a pointer to tpmsim.Open`, err)
	}
}

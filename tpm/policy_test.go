//go:build cgo

package tpm

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/kleidi-kms/kleidi"
)

// foreignConfigs are the configurations of other processes on the same TPM whose blobs a provider configured with
// PCR 7 must refuse: no PCR policy at all, another PCR, a superset of its PCRs.
var foreignConfigs = map[string]Config{
	"no PCRs":   {},
	"PCR 8":     {PCRs: []int{8}},
	"PCRs 7, 8": {PCRs: []int{7, 8}},
	"PCR 0":     {PCRs: []int{0}},
}

// assertRefusesForeign checks that p (configured with PCR 7) refuses a key wrapped by other, which unwraps it
// itself, with kleidi.ErrUnwrap and ErrPolicy, and that p's own keys still unwrap.
func assertRefusesForeign(t *testing.T, p, other *Provider) {
	t.Helper()
	ctx := context.Background()
	key, blob := wrapUnwrap(t, other)
	got, err := p.Unwrap(ctx, blob)
	if !errors.Is(err, kleidi.ErrUnwrap) || !errors.Is(err, ErrPolicy) || got != nil {
		t.Fatalf("p.Unwrap(ctx, blob sealed by another provider) = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnwrap and ErrPolicy", len(got), err)
	}
	if bytes.Contains([]byte(err.Error()), key) {
		t.Fatalf("p.Unwrap(ctx, foreign blob) err holds the key")
	}
	wrapUnwrap(t, p)
}

// TestUnwrapRefusesForeignPolicySimulator: a provider configured with PCR 7 unseals only blobs whose policy is
// the one its configuration gives, not whatever policy a blob carries (issue 12, item 1: another process with
// TPM access seals a KEK of its choice with no PCR policy, or with another PCR set).
func TestUnwrapRefusesForeignPolicySimulator(t *testing.T) {
	p := newSimProvider(t, Config{PCRs: []int{7}})
	for name, cfg := range foreignConfigs {
		t.Run(name, func(t *testing.T) {
			other := newSimProviderShared(t, p, cfg)
			defer other.Close() // the simulator has room for three objects
			assertRefusesForeign(t, p, other)
		})
	}
	assertNoHandles(t, p)
}

// TestUnwrapRefusesLyingHeader: a blob whose header claims the configured PCRs but whose sealed object carries
// another policy is refused before the TPM is asked to unseal it.
func TestUnwrapRefusesLyingHeader(t *testing.T) {
	ctx := context.Background()
	p := newSimProvider(t, Config{PCRs: []int{7}})
	other := newSimProviderShared(t, p, Config{})
	_, wrapped := wrapUnwrap(t, other)
	b, err := parseBlob(wrapped)
	if err != nil {
		t.Fatal(err)
	}
	b.pcrs = 1 << 7
	if got, err := p.Unwrap(ctx, b.marshal()); !errors.Is(err, kleidi.ErrUnwrap) || !errors.Is(err, ErrPolicy) || got != nil {
		t.Fatalf("p.Unwrap(ctx, blob claiming PCR 7 with an unbound policy) = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnwrap and ErrPolicy", len(got), err)
	}
	// And a blob of p whose header says it is unbound.
	_, own := wrapUnwrap(t, p)
	b, err = parseBlob(own)
	if err != nil {
		t.Fatal(err)
	}
	b.pcrs = 0
	if got, err := p.Unwrap(ctx, b.marshal()); !errors.Is(err, kleidi.ErrUnwrap) || got != nil {
		t.Fatalf("p.Unwrap(ctx, own blob with its PCRs cleared from the header) = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnwrap", len(got), err)
	}
}

// TestUnwrapChecksPolicyWithoutPCRs: a provider without PCRs refuses a PCR-bound blob too: the configured policy
// is the whole policy, not a minimum.
func TestUnwrapChecksPolicyWithoutPCRs(t *testing.T) {
	ctx := context.Background()
	p := newSimProvider(t, Config{})
	bound := newSimProviderShared(t, p, Config{PCRs: []int{7}})
	_, blob := wrapUnwrap(t, bound)
	if got, err := p.Unwrap(ctx, blob); !errors.Is(err, ErrPolicy) || got != nil {
		t.Fatalf("p.Unwrap(ctx, PCR 7 blob) with no PCRs configured = %d bytes, %v; want nil, an error wrapping ErrPolicy", len(got), err)
	}
}

// TestUnwrapPolicyCheckSendsOnePCRRead: checking the policy costs one PCR_Read with PCRs.
func TestUnwrapPolicyCheckSendsOnePCRRead(t *testing.T) {
	ctx := context.Background()
	p := newSimProvider(t, Config{PCRs: []int{7}})
	_, blob := wrapUnwrap(t, p)
	codes := recordCommands(t, p)
	if _, err := p.Unwrap(ctx, blob); err != nil {
		t.Fatalf("p.Unwrap(ctx, blob) err = %v, want nil", err)
	}
	if n := codes.count(tpm2.TPMCCPCRRead); n != 1 {
		t.Errorf("p.Unwrap(ctx, blob) sent %d PCR_Read commands, want 1", n)
	}
}

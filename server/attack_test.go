package server_test

import (
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/audit"
	"github.com/kleidi-kms/kleidi/server"
)

func TestWornKeyIsRotated(t *testing.T) {
	ts := startWith(t, nil, nil, server.Config{HealthInterval: 20 * time.Millisecond}, kleidi.WithKeyUsageLimit(1000))
	ctx := callCtx(t)
	first := ts.env.KeyID()
	// The health probe encrypts too; 500 calls reach half the limit whatever it did.
	for range 500 {
		if _, err := ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("seed")}); err != nil {
			t.Fatalf("Encrypt() err = %v", err)
		}
	}
	st := pollStatus(t, ts.client, func(st *kmsapi.StatusResponse) bool { return st.KeyId != first })
	if st.Healthz != "ok" {
		t.Errorf("Status() after the rotation healthz = %q, want ok", st.Healthz)
	}
	enc, err := ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("seed")})
	if err != nil || enc.KeyId == first {
		t.Errorf("Encrypt() after the rotation = key %s, %v; want a new key, nil", enc.GetKeyId(), err)
	}
}

func TestExhaustedKeyIsResourceExhausted(t *testing.T) {
	// A limit the health loop never gets to act on (an hour between probes): Encrypt refuses past it.
	ts := startWith(t, nil, nil, server.Config{HealthInterval: time.Hour}, kleidi.WithKeyUsageLimit(2))
	ctx := callCtx(t)
	var err error
	for range 3 {
		if _, err = ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("seed")}); err != nil {
			break
		}
	}
	wantCode(t, "Encrypt() past the key usage limit", err, codes.ResourceExhausted)
	if _, err := ts.client.Status(ctx, &kmsapi.StatusRequest{}); err != nil {
		t.Errorf("Status() after a refused Encrypt err = %v, want nil", err)
	}
}

func TestUnwritableAuditLogIsUnhealthy(t *testing.T) {
	l, err := audit.OpenFile("/dev/full")
	if err != nil {
		t.Fatalf("audit.OpenFile(/dev/full) err = %v", err)
	}
	defer l.Close()
	ts := start(t, nil, nil, server.Config{HealthInterval: 20 * time.Millisecond, Audit: l})
	ctx := callCtx(t)
	if _, err := ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("seed")}); err != nil {
		t.Fatalf("Encrypt() err = %v, want nil: the plugin keeps serving", err)
	}
	pollStatus(t, ts.client, func(st *kmsapi.StatusResponse) bool { return st.Healthz == "audit log not written" })
	if l.WriteErrors() == 0 {
		t.Errorf("l.WriteErrors() = 0 after writes to /dev/full, want more")
	}
}

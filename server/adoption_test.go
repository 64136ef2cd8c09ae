package server_test

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/server"
	kmsapi "k8s.io/kms/apis/v2"
)

// The plugin tells when kube-apiserver adopted a key: Status reported it, then an Encrypt under it was served.
func TestAdoption(t *testing.T) {
	ring := kleidi.NewFileKeyring(filepath.Join(shortDir(t), "keyring.json"))
	ts := start(t, nil, ring, server.Config{ReloadInterval: 50 * time.Millisecond})
	ctx := callCtx(t)
	first := ts.env.KeyID()
	if a := ts.srv.Adoption(); a.KeyID != first || a.StatusAt.IsZero() || !a.EncryptAt.IsZero() {
		t.Fatalf("Adoption() after the first Status = %+v, want key %s, StatusAt set, EncryptAt zero", a, first)
	}
	if _, err := ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	adopted := ts.srv.Adoption()
	if adopted.EncryptAt.IsZero() {
		t.Fatalf("Adoption() after Status then Encrypt = %+v, want EncryptAt set", adopted)
	}

	// Another process rotates. Encrypt uses the new key at once, but kube-apiserver has not asked Status yet: it
	// has not adopted it (a caller that encrypts under a key it never saw in Status is no kube-apiserver's DEK).
	rotator, err := kleidi.NewEnvelope(ctx, ts.provider, kleidi.NewFileKeyring(ring.Path()))
	if err != nil {
		t.Fatal(err)
	}
	defer rotator.Close()
	next, err := rotator.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ts.env.KeyID() != next && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	if a := ts.srv.Adoption(); a != adopted {
		t.Errorf("Adoption() after an Encrypt before Status = %+v, want it unchanged %+v", a, adopted)
	}
	if _, err := ts.client.Status(ctx, &kmsapi.StatusRequest{}); err != nil {
		t.Fatal(err)
	}
	if a := ts.srv.Adoption(); a.KeyID != next || !a.EncryptAt.IsZero() {
		t.Errorf("Adoption() after Status reported %s = %+v, want it reported, not yet encrypted under", next, a)
	}
	if _, err := ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	if a := ts.srv.Adoption(); a.KeyID != next || a.EncryptAt.Before(a.StatusAt) {
		t.Errorf("Adoption() after Status and Encrypt under %s = %+v, want EncryptAt at or after StatusAt", next, a)
	}
}

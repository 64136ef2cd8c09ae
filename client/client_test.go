package client_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/client"
	"github.com/kleidi-kms/kleidi/kleiditest"
	"github.com/kleidi-kms/kleidi/server"
)

// startPlugin serves kleidi's server for p on a unix socket, and returns its endpoint.
func startPlugin(t *testing.T, p kleidi.Provider) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "cl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ctx, cancel := context.WithCancel(context.Background())
	srv, err := server.New(ctx, p, kleidi.NewMemoryKeyring(), server.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		HealthInterval: 20 * time.Millisecond}, kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatalf("server.New() err = %v", err)
	}
	endpoint := "unix://" + filepath.Join(dir, "kms.sock")
	done := make(chan error, 1)
	go func() { done <- srv.ListenAndServe(ctx, endpoint) }()
	t.Cleanup(func() {
		cancel()
		<-done
		srv.Close()
	})
	// Serving once the socket exists: a test that calls at once must not race the bind.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, err := os.Stat(filepath.Join(dir, "kms.sock")); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the plugin did not create its socket")
		}
	}
	return endpoint
}

func dial(t *testing.T, endpoint string) *client.Client {
	t.Helper()
	c, err := client.Dial(endpoint)
	if err != nil {
		t.Fatalf("client.Dial(%q) err = %v", endpoint, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestDialRefusesABadEndpoint(t *testing.T) {
	if _, err := client.Dial("tcp://127.0.0.1:1"); err == nil {
		t.Errorf("client.Dial(tcp://...) err = nil, want an error")
	}
}

// TestNoPlugin: Status and WaitHealthy say that nothing answers, and why.
func TestNoPlugin(t *testing.T) {
	endpoint := "unix://" + filepath.Join(t.TempDir(), "none.sock")
	c := dial(t, endpoint)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Status(ctx); !errors.Is(err, client.ErrNoPlugin) || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("Status() err = %v, want ErrNoPlugin saying no such file", err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer wcancel()
	if _, err := c.WaitHealthy(wctx); !errors.Is(err, client.ErrNoPlugin) {
		t.Errorf("WaitHealthy() err = %v, want ErrNoPlugin", err)
	}
}

// TestWaitHealthy: WaitHealthy waits through an unhealthy plugin, returns once it is healthy, and reports the last
// reason when it never is.
func TestWaitHealthy(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	p.SetError(kleiditest.OpHealth, kleidi.ErrUnavailable)
	c := dial(t, startPlugin(t, p))
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	st, err := c.WaitHealthy(ctx)
	if !errors.Is(err, client.ErrUnhealthy) || st.Healthz != "root of trust unavailable" || st.Healthy() {
		t.Errorf("WaitHealthy() of an unhealthy plugin = %+v, %v; want its reason and ErrUnhealthy", st, err)
	}
	if st, err := c.Status(context.Background()); err != nil || st.Healthy() {
		t.Errorf("Status() of an unhealthy plugin = %+v, %v; want an answer, unhealthy", st, err)
	}
	go func() {
		time.Sleep(100 * time.Millisecond)
		p.SetError(kleiditest.OpHealth, nil)
	}()
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if st, err = c.WaitHealthy(ctx); err != nil || !st.Healthy() || st.Version != "v2" || st.KeyID == "" {
		t.Errorf("WaitHealthy() of a plugin that recovers = %+v, %v; want healthy, v2 and a key ID", st, err)
	}
}

// TestPassThrough: Encrypt and Decrypt carry requests, responses and the plugin's codes as they are.
func TestPassThrough(t *testing.T) {
	c := dial(t, startPlugin(t, kleiditest.NewInsecureProvider()))
	ctx := context.Background()
	enc, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("seed"), Uid: "u"})
	if err != nil {
		t.Fatalf("Encrypt() err = %v", err)
	}
	dec, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations, Uid: "u"})
	if err != nil || string(dec.Plaintext) != "seed" {
		t.Errorf("Decrypt(Encrypt(seed)) = %v, %v; want seed", dec, err)
	}
	if _, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("Encrypt(empty) err = %v, want InvalidArgument", err)
	}
}

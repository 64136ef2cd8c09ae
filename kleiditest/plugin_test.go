package kleiditest_test

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
	"github.com/kleidi-kms/kleidi/server"
)

// socketPath returns a unix socket path in a directory of its own, short enough for a socket.
func socketPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "kms.sock")
}

// TestPluginKleidi runs the plugin suite against kleidi's own server.
func TestPluginKleidi(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	srv, err := server.New(ctx, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring(),
		server.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatalf("server.New() err = %v", err)
	}
	path := socketPath(t)
	done := make(chan error, 1)
	go func() { done <- srv.ListenAndServe(ctx, "unix://"+path) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("ListenAndServe() = %v", err)
		}
		srv.Close()
	})
	kleiditest.TestPlugin(t, "unix://"+path)
}

// laxPlugin is a KMS v2 plugin that does the least: AES-256-GCM under one key, no check of any request, its
// errors returned as they are (gRPC Unknown).
type laxPlugin struct {
	kmsapi.UnimplementedKeyManagementServiceServer
	aead cipher.AEAD
}

func (p *laxPlugin) Status(context.Context, *kmsapi.StatusRequest) (*kmsapi.StatusResponse, error) {
	return &kmsapi.StatusResponse{Version: "v2", Healthz: "ok", KeyId: "lax"}, nil
}

func (p *laxPlugin) Encrypt(_ context.Context, r *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	nonce := make([]byte, p.aead.NonceSize())
	rand.Read(nonce)
	return &kmsapi.EncryptResponse{Ciphertext: p.aead.Seal(nonce, nonce, r.Plaintext, nil), KeyId: "lax"}, nil
}

func (p *laxPlugin) Decrypt(_ context.Context, r *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	if len(r.Ciphertext) < p.aead.NonceSize() {
		return nil, errors.New("short")
	}
	n := p.aead.NonceSize()
	plaintext, err := p.aead.Open(nil, r.Ciphertext[:n], r.Ciphertext[n:], nil)
	return &kmsapi.DecryptResponse{Plaintext: plaintext}, err
}

// TestPluginCatchesALaxPlugin: the suite fails a plugin that answers malformed requests with Unknown and
// encrypts what cannot fit. The suite runs in a child process of this test, whose failure is the expected
// outcome.
func TestPluginCatchesALaxPlugin(t *testing.T) {
	if os.Getenv("KLEIDITEST_LAX_PLUGIN") == "1" {
		block, _ := aes.NewCipher(make([]byte, 32))
		aead, _ := cipher.NewGCM(block)
		path := socketPath(t)
		l, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		gs := grpc.NewServer()
		kmsapi.RegisterKeyManagementServiceServer(gs, &laxPlugin{aead: aead})
		go gs.Serve(l)
		t.Cleanup(gs.Stop)
		kleiditest.TestPlugin(t, "unix://"+path)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run", "^TestPluginCatchesALaxPlugin$", "-test.v")
	cmd.Env = append(os.Environ(), "KLEIDITEST_LAX_PLUGIN=1")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("TestPlugin against a lax plugin passed, want failures:\n%s", out)
	}
	for _, want := range []string{
		"--- FAIL: TestPluginCatchesALaxPlugin/decrypt:_empty_ciphertext",
		"--- FAIL: TestPluginCatchesALaxPlugin/decrypt:_byte_0_of_the_ciphertext_altered",
		"--- FAIL: TestPluginCatchesALaxPlugin/encrypt:_1_KiB_plaintext,_whose_ciphertext_cannot_fit",
		"--- PASS: TestPluginCatchesALaxPlugin/encrypt:_8_KiB_uid",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("TestPlugin against a lax plugin: output lacks %q", want)
		}
	}
}

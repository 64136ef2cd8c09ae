package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/apiserver/pkg/storage/value"
	"k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/client"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

// TestConformance: the file key is a Provider and an Authenticator that passes kleidi's conformance suite.
func TestConformance(t *testing.T) {
	key := filepath.Join(t.TempDir(), "root.key")
	kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider {
		p, err := openFileKey(key)
		if err != nil {
			t.Fatalf("openFileKey() err = %v", err)
		}
		return p
	})
}

// plugin is the plugin running in this process.
type plugin struct {
	endpoint, httpAddr, auditLog string
	stderr                       *bytes.Buffer
	stop                         func()
}

// startPlugin runs the plugin with the root key and the state directory given, and waits until it is healthy.
func startPlugin(t *testing.T, key, stateDir string) *plugin {
	t.Helper()
	dir, err := os.MkdirTemp("", "cp") // short, for a unix socket
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pl := &plugin{endpoint: "unix://" + filepath.Join(dir, "kms.sock"), httpAddr: l.Addr().String(),
		auditLog: filepath.Join(dir, "audit.log"), stderr: &bytes.Buffer{}}
	l.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"--key", key, "--state-dir", stateDir, "--listen", pl.endpoint,
			"--http-addr", pl.httpAddr, "--audit-log", pl.auditLog}, pl.stderr)
	}()
	pl.stop = func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run() = %v, want nil", err)
		}
	}
	c, err := client.Dial(pl.endpoint)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	if st, err := c.WaitHealthy(wctx); err != nil {
		cancel()
		<-done
		t.Fatalf("WaitHealthy() = %+v, %v; want a healthy plugin", st, err)
	}
	return pl
}

// TestPlugin: the running plugin passes the KMS v2 plugin suite.
func TestPlugin(t *testing.T) {
	dir := t.TempDir()
	pl := startPlugin(t, filepath.Join(dir, "root.key"), filepath.Join(dir, "state"))
	defer pl.stop()
	kleiditest.TestPlugin(t, pl.endpoint)
}

// apiserverStore writes and reads a Secret through kube-apiserver's own KMS v2 client and envelope
// transformer, as kube-apiserver does with a plugin on endpoint.
func apiserverStore(t *testing.T, endpoint string) (value.Transformer, value.Context) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	svc, err := kmsv2.NewGRPCService(ctx, endpoint, "custom", 3*time.Second)
	if err != nil {
		t.Fatalf("kmsv2.NewGRPCService() err = %v", err)
	}
	st, err := svc.Status(ctx)
	if err != nil || st.Healthz != "ok" {
		t.Fatalf("Status() = %+v, %v; want healthz ok", st, err)
	}
	tr, obj, cacheKey, err := kmsv2.GenerateTransformer(ctx, "uid-seed", svc, true)
	if err != nil {
		t.Fatalf("kmsv2.GenerateTransformer() err = %v", err)
	}
	state := kmsv2.State{Transformer: tr, EncryptedObjectKeyID: obj.KeyID, EncryptedObjectEncryptedDEKSource: obj.EncryptedDEKSource,
		EncryptedObjectAnnotations: obj.Annotations, EncryptedObjectEncryptedDEKSourceType: obj.EncryptedDEKSourceType,
		UID: "uid-seed", ExpirationTimestamp: time.Now().Add(3 * time.Minute), CacheKey: cacheKey, KMSProviderName: "custom"}
	return kmsv2.NewEnvelopeTransformer(svc, "custom", func() (kmsv2.State, error) { return state, nil }, "apiserver-test"),
		value.DefaultContext("/registry/secrets/default/db")
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s err = %v", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// TestAPIServer drives the plugin with kube-apiserver's own KMS v2 client: a Secret written and read back, the
// health and metrics endpoints and the audit log describing that traffic, and a plugin that lost its keyring
// reading the Secret with the root key alone.
func TestAPIServer(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "root.key")
	pl := startPlugin(t, key, filepath.Join(dir, "state"))
	tr, secret := apiserverStore(t, pl.endpoint)
	ctx := context.Background()
	stored, err := tr.TransformToStorage(ctx, []byte("password"), secret)
	if err != nil {
		t.Fatalf("TransformToStorage() err = %v", err)
	}
	if bytes.Contains(stored, []byte("password")) {
		t.Fatalf("TransformToStorage() stored the plaintext")
	}
	restarted, _ := apiserverStore(t, pl.endpoint) // an apiserver with no DEK cache: the plugin decrypts the seed
	if got, _, err := restarted.TransformFromStorage(ctx, stored, secret); err != nil || string(got) != "password" {
		t.Fatalf("TransformFromStorage() = %q, %v; want password", got, err)
	}

	for path, want := range map[string]string{"/livez": "ok", "/readyz": "ok", "/healthz": "ok",
		"/metrics": `kleidi_provider_operations_total{operation="wrap",outcome="ok",provider="filekey"}`} {
		if code, body := get(t, "http://"+pl.httpAddr+path); code != http.StatusOK || !strings.Contains(body, want) {
			t.Errorf("GET %s = %d, %.200q; want 200 and %s", path, code, body, want)
		}
	}
	pl.stop()
	log, err := os.ReadFile(pl.auditLog)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"event":"plugin.start"`, `"event":"kms.encrypt"`, `"event":"kms.decrypt"`, `"event":"plugin.stop"`, `"provider":"filekey"`} {
		if !bytes.Contains(log, []byte(want)) {
			t.Errorf("audit log lacks %s", want)
		}
	}
	for _, out := range [][]byte{log, pl.stderr.Bytes()} {
		if bytes.Contains(out, []byte("password")) {
			t.Errorf("the audit or operational log holds the plaintext")
		}
	}

	// A plugin that lost its keyring reads the Secret: the KEK travels with it, proven by the root key.
	lost := startPlugin(t, key, filepath.Join(dir, "new-state"))
	defer lost.stop()
	reader, _ := apiserverStore(t, lost.endpoint)
	if got, _, err := reader.TransformFromStorage(ctx, stored, secret); err != nil || string(got) != "password" {
		t.Errorf("TransformFromStorage() by a plugin without the keyring = %q, %v; want password", got, err)
	}
	// Another root key cannot.
	other := startPlugin(t, filepath.Join(dir, "other.key"), filepath.Join(dir, "other-state"))
	defer other.stop()
	thief, _ := apiserverStore(t, other.endpoint)
	if _, _, err := thief.TransformFromStorage(ctx, stored, secret); err == nil {
		t.Errorf("TransformFromStorage() by a plugin of another root key err = nil, want an error")
	}
}

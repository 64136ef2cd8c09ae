package kmsclient

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/apiserver/pkg/storage/value"
	"k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmsapi "k8s.io/kms/apis/v2"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/client"
	"github.com/kleidi-kms/kleidi/kleiditest"
	"github.com/kleidi-kms/kleidi/server"
)

// plugin is a kleidi server on a unix socket.
type plugin struct {
	endpoint string
	env      *kleidi.Envelope
	client   *client.Client
}

func startPlugin(t *testing.T, p kleidi.Provider, ring kleidi.Keyring, cfg server.Config) *plugin {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	srv, err := server.New(ctx, p, ring, cfg, kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatalf("server.New() err = %v", err)
	}
	env := srv.Envelope()
	dir, err := os.MkdirTemp("", "kc")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "kms.sock")
	done := make(chan error, 1)
	go func() { done <- srv.ListenAndServe(ctx, "unix://"+path) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("ListenAndServe() = %v, want nil", err)
		}
		os.RemoveAll(dir)
	})
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if _, err := os.Lstat(path); err == nil {
			break
		}
	}
	c, err := client.Dial("unix://" + path)
	if err != nil {
		t.Fatalf("client.Dial() err = %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return &plugin{endpoint: "unix://" + path, env: env, client: c}
}

func flip(b []byte, i int) []byte {
	c := bytes.Clone(b)
	c[i] ^= 0x01
	return c
}

func withAnnotation(a map[string][]byte, k string, v []byte) map[string][]byte {
	c := map[string][]byte{}
	for key, val := range a {
		c[key] = val
	}
	c[k] = v
	return c
}

// TestPluginConformance runs kleiditest.TestPlugin, the malformed-request suite any KMS v2 plugin can run,
// against kleidi's server.
func TestPluginConformance(t *testing.T) {
	pl := startPlugin(t, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring(), server.Config{})
	kleiditest.TestPlugin(t, pl.endpoint)
}

// TestMalformedRequests sends requests that break kleidi's own rules (its key IDs, its attached keys, its
// plaintext limit) through the KMS v2 gRPC client, checks the code each gets, and checks after each that a valid
// round trip still works.
func TestMalformedRequests(t *testing.T) {
	ctx := context.Background()
	root := make([]byte, 32)
	rand.Read(root)
	p := kleiditest.NewInsecureProviderWithRoot(root)
	pl := startPlugin(t, p, kleidi.NewMemoryKeyring(), server.Config{})
	enc, err := pl.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: make([]byte, 32), Uid: "valid"})
	if err != nil {
		t.Fatalf("Encrypt() err = %v", err)
	}
	ct, id, ann := enc.Ciphertext, enc.KeyId, enc.Annotations
	wrapped := ann[server.AttachedKeyAnnotation]

	// A ciphertext under a KEK of the same root that this plugin's keyring lacks (another node's keyring).
	sibling, err := kleidi.NewEnvelope(ctx, kleiditest.NewInsecureProviderWithRoot(root), kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatal(err)
	}
	sc, err := sibling.Encrypt(ctx, make([]byte, 32), nil)
	if err != nil {
		t.Fatal(err)
	}
	// A wrapped KEK of another root of trust.
	foreign, err := kleidi.NewEnvelope(ctx, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatal(err)
	}
	fc, err := foreign.Encrypt(ctx, make([]byte, 32), nil)
	if err != nil {
		t.Fatal(err)
	}

	decrypt := func(ct []byte, keyID string, a map[string][]byte) func() error {
		return func() error {
			_, err := pl.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: ct, KeyId: keyID, Annotations: a, Uid: "t"})
			return err
		}
	}
	encrypt := func(pt []byte, uid string) func() error {
		return func() error {
			resp, err := pl.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: pt, Uid: uid})
			if err == nil && (len(resp.Ciphertext) > server.MaxKMSCiphertextSize || resp.KeyId != id) {
				t.Errorf("Encrypt() response breaks the limits: %d bytes, key_id %q", len(resp.Ciphertext), resp.KeyId)
			}
			return err
		}
	}
	cases := []struct {
		name string
		call func() error
		want codes.Code
	}{
		{"decrypt: key_id of another key", decrypt(ct, sc.KeyID(), ann), codes.InvalidArgument},
		{"decrypt: unknown key without annotation", decrypt(sc.Bytes(), sc.KeyID(), nil), codes.NotFound},
		{"decrypt: unknown key of another root (its proof is not this root's)", decrypt(fc.Bytes(), fc.KeyID(), map[string][]byte{server.AttachedKeyAnnotation: fc.AttachedKey}), codes.InvalidArgument},
		{"decrypt: unknown key, wrapped key tampered (its proof fails)", decrypt(sc.Bytes(), sc.KeyID(), map[string][]byte{server.AttachedKeyAnnotation: flip(sc.AttachedKey, len(sc.AttachedKey)-1)}), codes.InvalidArgument},
		{"decrypt: unknown key, wrapped key of another key", decrypt(sc.Bytes(), sc.KeyID(), map[string][]byte{server.AttachedKeyAnnotation: wrapped}), codes.InvalidArgument},
		{"decrypt: wrapped key annotation empty", decrypt(ct, id, map[string][]byte{server.AttachedKeyAnnotation: {}}), codes.InvalidArgument},
		{"decrypt: wrapped key annotation over the attached key limit", decrypt(ct, id, map[string][]byte{server.AttachedKeyAnnotation: make([]byte, kleidi.MaxAttachedKeySize+1)}), codes.InvalidArgument},
		{"decrypt: annotation key upper case", decrypt(ct, id, withAnnotation(ann, "KEK.kleidi.dev", []byte{1})), codes.InvalidArgument},
		{"decrypt: request over the message limit", decrypt(ct, id, map[string][]byte{"a.kleidi.dev": make([]byte, 1<<20)}), codes.ResourceExhausted},
		{"encrypt: plaintext one byte over the limit", encrypt(make([]byte, server.MaxPlaintextSize+1), "t"), codes.InvalidArgument},
		{"encrypt: largest plaintext", encrypt(make([]byte, server.MaxPlaintextSize), "t"), codes.OK},
	}
	for _, c := range cases {
		if got := status.Code(c.call()); got != c.want {
			t.Errorf("%s: code %v, want %v", c.name, got, c.want)
		}
		// The plugin still works.
		again, err := pl.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("still works")})
		if err != nil {
			t.Fatalf("Encrypt() after %s err = %v", c.name, err)
		}
		dec, err := pl.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: again.Ciphertext, KeyId: again.KeyId, Annotations: again.Annotations})
		if err != nil || string(dec.Plaintext) != "still works" {
			t.Fatalf("Decrypt() after %s = %v, %v", c.name, dec, err)
		}
	}
	if st, err := pl.client.Status(ctx); err != nil || !st.Healthy() {
		t.Errorf("Status() after the malformed requests = %v, %v; want healthz ok", st, err)
	}
}

// apiserver is the part of kube-apiserver that talks to a KMS v2 plugin: its own gRPC client, and its envelope
// transformer over the DEK seed it generates and has the plugin encrypt.
type apiserver struct {
	svc   kmsservice.Service
	state kmsv2.State
	tr    value.Transformer
}

func newAPIServer(t *testing.T, endpoint string) *apiserver {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	svc, err := kmsv2.NewGRPCService(ctx, endpoint, "kleidi", 3*time.Second)
	if err != nil {
		t.Fatalf("kmsv2.NewGRPCService() err = %v", err)
	}
	a := &apiserver{svc: svc}
	a.tr = kmsv2.NewEnvelopeTransformer(svc, "kleidi", func() (kmsv2.State, error) { return a.state, nil }, "apiserver-test")
	return a
}

// sync does what kube-apiserver's KMS health loop does: Status, and a new DEK seed encrypted by the plugin when
// the key_id changed. It returns the key_id.
func (a *apiserver) sync(t *testing.T) string {
	t.Helper()
	ctx := context.Background()
	st, err := a.svc.Status(ctx)
	if err != nil {
		t.Fatalf("Status() err = %v", err)
	}
	if st.Version != "v2" || st.Healthz != "ok" {
		t.Fatalf("Status() = %+v, want version v2, healthz ok", st)
	}
	if code, err := kmsv2.ValidateKeyID(st.KeyID); err != nil {
		t.Fatalf("kmsv2.ValidateKeyID(Status().KeyID) = %s, %v", code, err)
	}
	if st.KeyID == a.state.EncryptedObjectKeyID {
		return st.KeyID
	}
	tr, obj, cacheKey, err := kmsv2.GenerateTransformer(ctx, "uid-seed", a.svc, true)
	if err != nil {
		t.Fatalf("kmsv2.GenerateTransformer() err = %v", err)
	}
	if obj.KeyID != st.KeyID {
		t.Fatalf("Encrypt() key_id %s, Status() key_id %s: want the same", obj.KeyID, st.KeyID)
	}
	a.state = kmsv2.State{
		Transformer:                           tr,
		EncryptedObjectKeyID:                  obj.KeyID,
		EncryptedObjectEncryptedDEKSource:     obj.EncryptedDEKSource,
		EncryptedObjectAnnotations:            obj.Annotations,
		EncryptedObjectEncryptedDEKSourceType: obj.EncryptedDEKSourceType,
		UID:                                   "uid-seed",
		ExpirationTimestamp:                   time.Now().Add(3 * time.Minute),
		CacheKey:                              cacheKey,
		KMSProviderName:                       "kleidi",
	}
	return st.KeyID
}

// TestAPIServerClient writes and reads objects through kube-apiserver's own KMS v2 client and envelope
// transformer: a write, a read by a restarted apiserver (empty DEK cache), a rotation (old objects read as
// stale, still decrypt), and a read by a plugin that lost its keyring (the wrapped KEK annotation).
func TestAPIServerClient(t *testing.T) {
	ctx := context.Background()
	root := make([]byte, 32)
	rand.Read(root)
	dir, err := os.MkdirTemp("", "kc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ring := kleidi.NewFileKeyring(filepath.Join(dir, "keyring.json"))
	pl := startPlugin(t, kleiditest.NewInsecureProviderWithRoot(root), ring, server.Config{ReloadInterval: 20 * time.Millisecond})

	api := newAPIServer(t, pl.endpoint)
	first := api.sync(t)
	secret := value.DefaultContext("/registry/secrets/default/db")
	stored, err := api.tr.TransformToStorage(ctx, []byte("password"), secret)
	if err != nil {
		t.Fatalf("TransformToStorage() err = %v", err)
	}
	if bytes.Contains(stored, []byte("password")) {
		t.Fatalf("TransformToStorage() stored the plaintext")
	}

	// A restarted apiserver has no DEK cache: it asks the plugin to decrypt the seed.
	restarted := newAPIServer(t, pl.endpoint)
	restarted.sync(t)
	got, stale, err := restarted.tr.TransformFromStorage(ctx, stored, secret)
	if err != nil || string(got) != "password" || stale {
		t.Fatalf("TransformFromStorage() after restart = %q, stale %v, %v; want password, false, nil", got, stale, err)
	}

	// Rotation by another process: the apiserver sees the new key_id, old objects are stale but readable.
	rotator, err := kleidi.NewEnvelope(ctx, kleiditest.NewInsecureProviderWithRoot(root), kleidi.NewFileKeyring(ring.Path()))
	if err != nil {
		t.Fatal(err)
	}
	second, err := rotator.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); api.sync(t) != second; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("Status() key_id still %s 10 s after rotation to %s", first, second)
		}
	}
	fresh := newAPIServer(t, pl.endpoint)
	fresh.sync(t)
	got, stale, err = fresh.tr.TransformFromStorage(ctx, stored, secret)
	if err != nil || string(got) != "password" || !stale {
		t.Fatalf("TransformFromStorage() of an object under the old key = %q, stale %v, %v; want password, true, nil", got, stale, err)
	}
	rewritten, err := fresh.tr.TransformToStorage(ctx, got, secret)
	if err != nil {
		t.Fatal(err)
	}

	// A plugin on the same root that lost its keyring reads what the first one wrote.
	lost := startPlugin(t, kleiditest.NewInsecureProviderWithRoot(root), kleidi.NewMemoryKeyring(), server.Config{})
	reader := newAPIServer(t, lost.endpoint)
	reader.sync(t)
	for _, obj := range [][]byte{stored, rewritten} {
		got, _, err := reader.tr.TransformFromStorage(ctx, obj, secret)
		if err != nil || string(got) != "password" {
			t.Errorf("TransformFromStorage() by a plugin without the keyring = %q, %v; want password, nil", got, err)
		}
	}
	// Another root of trust refuses.
	other := startPlugin(t, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring(), server.Config{})
	thief := newAPIServer(t, other.endpoint)
	thief.sync(t)
	if _, _, err := thief.tr.TransformFromStorage(ctx, stored, secret); err == nil {
		t.Errorf("TransformFromStorage() by a plugin of another root err = nil, want an error")
	}
}

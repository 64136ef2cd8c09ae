package server_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kleidi-kms/kleidi"
	kleidiaudit "github.com/kleidi-kms/kleidi/audit"
	"github.com/kleidi-kms/kleidi/kleiditest"
	"github.com/kleidi-kms/kleidi/server"
)

// testServer is a Server listening on a real unix socket, and a client of it.
type testServer struct {
	srv      *server.Server
	env      *kleidi.Envelope
	provider *kleiditest.Provider
	path     string
	client   kmsapi.KeyManagementServiceClient
	conn     *grpc.ClientConn
	stop     func() error // stops the server gracefully and returns what Serve returned
}

// shortDir returns a temporary directory with a path short enough for a unix socket.
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func start(t *testing.T, p *kleiditest.Provider, ring kleidi.Keyring, cfg server.Config) *testServer {
	t.Helper()
	return startWith(t, p, ring, cfg)
}

// startWith is start, with options for the Envelope.
func startWith(t *testing.T, p *kleiditest.Provider, ring kleidi.Keyring, cfg server.Config, opts ...kleidi.Option) *testServer {
	t.Helper()
	ctx := context.Background()
	if p == nil {
		p = kleiditest.NewInsecureProvider()
	}
	if ring == nil {
		ring = kleidi.NewMemoryKeyring()
	}
	if cfg.Logger == nil {
		cfg.Logger = quietLogger()
	}
	srv, err := server.New(ctx, p, ring, cfg, append(opts, kleidi.WithCreateIfEmpty())...)
	if err != nil {
		t.Fatalf("server.New() err = %v, want nil", err)
	}
	env := srv.Envelope()
	path := filepath.Join(shortDir(t), "run", "kms.sock")
	serveCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- srv.ListenAndServe(serveCtx, "unix://"+path) }()
	// Dial once the socket exists, so the client does not start with a reconnection backoff.
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if _, err := os.Lstat(path); err == nil {
			break
		}
	}
	conn := dial(t, path)
	ts := &testServer{srv: srv, env: env, provider: p, path: path, conn: conn, client: kmsapi.NewKeyManagementServiceClient(conn)}
	var once sync.Once
	var serveErr error
	ts.stop = func() error {
		once.Do(func() {
			cancel()
			serveErr = <-done
		})
		return serveErr
	}
	t.Cleanup(func() {
		if err := ts.stop(); err != nil {
			t.Errorf("ListenAndServe() = %v, want nil", err)
		}
	})
	// Wait until the server answers.
	waitCtx, waitCancel := context.WithTimeout(ctx, 10*time.Second)
	defer waitCancel()
	if _, err := ts.client.Status(waitCtx, &kmsapi.StatusRequest{}, grpc.WaitForReady(true)); status.Code(err) == codes.DeadlineExceeded {
		t.Fatalf("Status() err = %v, want an answer", err)
	}
	return ts
}

func dial(t *testing.T, path string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc.NewClient() err = %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func callCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func wantCode(t *testing.T, call string, err error, want codes.Code) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Errorf("%s err = %v, want code %v", call, err, want)
	}
}

func TestRoundTrip(t *testing.T) {
	ts := start(t, nil, nil, server.Config{})
	ctx := callCtx(t)
	st, err := ts.client.Status(ctx, &kmsapi.StatusRequest{})
	if err != nil {
		t.Fatalf("Status() err = %v, want nil", err)
	}
	if st.Version != "v2" || st.Healthz != "ok" || st.KeyId != ts.env.KeyID() {
		t.Errorf("Status() = %v, want version v2, healthz ok, key_id %s", st, ts.env.KeyID())
	}
	seed := make([]byte, 32)
	rand.Read(seed)
	enc, err := ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: "req-1"})
	if err != nil {
		t.Fatalf("Encrypt() err = %v, want nil", err)
	}
	if enc.KeyId != st.KeyId {
		t.Errorf("Encrypt().KeyId = %q, want Status().KeyId %q", enc.KeyId, st.KeyId)
	}
	if len(enc.Annotations[server.AttachedKeyAnnotation]) == 0 {
		t.Errorf("Encrypt().Annotations = %v, want %s", enc.Annotations, server.AttachedKeyAnnotation)
	}
	if bytes.Contains(enc.Ciphertext, seed) {
		t.Errorf("Encrypt().Ciphertext contains the plaintext")
	}
	enc2, err := ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: "req-2"})
	if err != nil {
		t.Fatalf("second Encrypt() err = %v, want nil", err)
	}
	if bytes.Equal(enc.Ciphertext, enc2.Ciphertext) {
		t.Errorf("two Encrypt() of one plaintext gave the same ciphertext")
	}
	if !bytes.Equal(enc.Annotations[server.AttachedKeyAnnotation], enc2.Annotations[server.AttachedKeyAnnotation]) {
		t.Errorf("Encrypt() annotations differ under one key, want byte-stable")
	}
	dec, err := ts.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations, Uid: "req-3"})
	if err != nil {
		t.Fatalf("Decrypt() err = %v, want nil", err)
	}
	if !bytes.Equal(dec.Plaintext, seed) {
		t.Errorf("Decrypt(Encrypt(seed)) differs from seed")
	}
	// Refused requests get InvalidArgument, and the call after them works.
	_, err = ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{})
	wantCode(t, "Encrypt(empty plaintext)", err, codes.InvalidArgument)
	_, err = ts.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext})
	wantCode(t, "Decrypt(no key_id)", err, codes.InvalidArgument)
	// Without annotations the keyring has the key.
	if _, err := ts.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId}); err != nil {
		t.Errorf("Decrypt() without annotations err = %v, want nil", err)
	}
}

// A server whose keyring lacks a KEK decrypts with the wrapped KEK of the annotation, if its root unwraps it.
func TestSelfContained(t *testing.T) {
	writer := start(t, nil, nil, server.Config{})
	ctx := callCtx(t)
	enc, err := writer.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("seed")})
	if err != nil {
		t.Fatalf("Encrypt() err = %v, want nil", err)
	}
	// Same root of trust, empty keyring: a node that lost its keyring, or an etcd restore.
	sameRoot := start(t, writer.provider, nil, server.Config{})
	dec, err := sameRoot.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations})
	if err != nil || string(dec.GetPlaintext()) != "seed" {
		t.Errorf("Decrypt() on a fresh keyring = %q, %v; want seed, nil", dec.GetPlaintext(), err)
	}
	fresh := start(t, writer.provider, nil, server.Config{})
	_, err = fresh.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId})
	wantCode(t, "Decrypt() of an unknown key without annotation", err, codes.NotFound)

	// Another root of trust refuses the attached key: its proof is not this root's.
	otherRoot := start(t, nil, nil, server.Config{})
	_, err = otherRoot.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations})
	wantCode(t, "Decrypt() with a KEK of another root", err, codes.InvalidArgument)

	// A wrapped KEK of the same root that is not the key the ciphertext names.
	other, err := writer.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("x")})
	if err != nil {
		t.Fatal(err)
	}
	writer.env.Rotate(ctx)
	rotated, err := writer.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("x")})
	if err != nil {
		t.Fatal(err)
	}
	if rotated.KeyId == other.KeyId {
		t.Fatalf("Encrypt() after Rotate kept key %s", other.KeyId)
	}
	mismatched := start(t, writer.provider, nil, server.Config{})
	_, err = mismatched.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: other.Ciphertext, KeyId: other.KeyId, Annotations: rotated.Annotations})
	wantCode(t, "Decrypt() with the wrapped KEK of another key", err, codes.InvalidArgument)
}

func TestRootOfTrustDown(t *testing.T) {
	ts := start(t, nil, nil, server.Config{HealthInterval: 20 * time.Millisecond})
	ctx := callCtx(t)
	// A ciphertext under a KEK this server has not unwrapped yet.
	other := start(t, ts.provider, nil, server.Config{})
	enc, err := other.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("seed")})
	if err != nil {
		t.Fatal(err)
	}
	ts.provider.SetError(kleiditest.OpUnwrap, kleidi.ErrUnavailable)
	ts.provider.SetError(kleiditest.OpHealth, kleidi.ErrUnavailable)
	_, err = ts.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations})
	wantCode(t, "Decrypt() while the root is down", err, codes.Unavailable)
	pollStatus(t, ts.client, func(st *kmsapi.StatusResponse) bool { return st.Healthz == "root of trust unavailable" })
	// Data under the KEKs already in memory keeps working.
	if _, err := ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("seed")}); err != nil {
		t.Errorf("Encrypt() while the root is down err = %v, want nil", err)
	}
	ts.provider.SetError(kleiditest.OpUnwrap, nil)
	ts.provider.SetError(kleiditest.OpHealth, nil)
	pollStatus(t, ts.client, func(st *kmsapi.StatusResponse) bool { return st.Healthz == "ok" })
	// A failed unwrap is remembered for a second, so the first Decrypts after the return may still fail.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		_, err = ts.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations})
		if err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Errorf("Decrypt() 5 s after the root came back err = %v, want nil", err)
	}
}

// pollStatus calls Status until cond holds, for at most 10 s.
func pollStatus(t *testing.T, c kmsapi.KeyManagementServiceClient, cond func(*kmsapi.StatusResponse) bool) *kmsapi.StatusResponse {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	var last *kmsapi.StatusResponse
	for time.Now().Before(deadline) {
		st, err := c.Status(callCtx(t), &kmsapi.StatusRequest{})
		if err == nil && cond(st) {
			return st
		}
		last = st
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("Status() = %v after 10 s, condition never held", last)
	return nil
}

func TestDeadline(t *testing.T) {
	ts := start(t, nil, nil, server.Config{CallTimeout: 50 * time.Millisecond})
	other := start(t, ts.provider, nil, server.Config{})
	ctx := callCtx(t)
	enc, err := other.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("seed")})
	if err != nil {
		t.Fatal(err)
	}
	ts.provider.SetLatency(time.Hour)
	_, err = ts.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations})
	wantCode(t, "Decrypt() of a slow unwrap", err, codes.DeadlineExceeded)
	// The server still answers at once.
	if _, err := ts.client.Status(ctx, &kmsapi.StatusRequest{}); err != nil {
		t.Errorf("Status() after a timed-out call err = %v, want nil", err)
	}
	ts.provider.SetLatency(0)
}

// rawCodec sends bytes as they are, to put a malformed message on the wire.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error)      { return *v.(*[]byte), nil }
func (rawCodec) Unmarshal(data []byte, v any) error { *v.(*[]byte) = data; return nil }
func (rawCodec) Name() string                       { return "proto" }

func TestMalformedWire(t *testing.T) {
	ts := start(t, nil, nil, server.Config{})
	ctx := callCtx(t)
	cases := map[string]struct {
		method string
		msg    []byte
		want   codes.Code
	}{
		"truncated field":             {kmsapi.KeyManagementService_Decrypt_FullMethodName, []byte{0x0a, 0x10, 0x01}, codes.InvalidArgument},
		"invalid UTF-8 key_id":        {kmsapi.KeyManagementService_Decrypt_FullMethodName, []byte{0x1a, 0x02, 0xff, 0xfe}, codes.InvalidArgument},
		"invalid UTF-8 uid":           {kmsapi.KeyManagementService_Encrypt_FullMethodName, []byte{0x0a, 0x01, 0x41, 0x12, 0x01, 0xff}, codes.InvalidArgument},
		"bad wire type":               {kmsapi.KeyManagementService_Encrypt_FullMethodName, []byte{0x0f}, codes.InvalidArgument},
		"garbage status request":      {kmsapi.KeyManagementService_Status_FullMethodName, []byte{0xff, 0xff, 0xff}, codes.InvalidArgument},
		"message over the wire limit": {kmsapi.KeyManagementService_Encrypt_FullMethodName, append([]byte{0x0a, 0x80, 0x80, 0x08}, make([]byte, 128<<10)...), codes.ResourceExhausted},
		"unknown method":              {"/v2.KeyManagementService/Rotate", nil, codes.Unimplemented},
	}
	for name, c := range cases {
		var out []byte
		msg := c.msg
		err := ts.conn.Invoke(ctx, c.method, &msg, &out, grpc.ForceCodec(rawCodec{}))
		wantCode(t, name, err, c.want)
		if _, err := ts.client.Status(ctx, &kmsapi.StatusRequest{}); err != nil {
			t.Errorf("Status() after %s err = %v, want nil", name, err)
		}
	}
}

func TestRotationPickedUp(t *testing.T) {
	dir := shortDir(t)
	ring := kleidi.NewFileKeyring(filepath.Join(dir, "keyring.json"))
	changed := make(chan struct{}, 1)
	onReload := func(err error, keyChanged bool) {
		if err == nil && keyChanged {
			select {
			case changed <- struct{}{}:
			default:
			}
		}
	}
	ts := start(t, nil, ring, server.Config{ReloadInterval: 50 * time.Millisecond, OnReload: onReload})
	ctx := callCtx(t)
	before, err := ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("before")})
	if err != nil {
		t.Fatal(err)
	}
	// Another process (a rotate command) rotates the keyring file.
	rotator, err := kleidi.NewEnvelope(ctx, ts.provider, kleidi.NewFileKeyring(ring.Path()))
	if err != nil {
		t.Fatal(err)
	}
	newID, err := rotator.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pollStatus(t, ts.client, func(st *kmsapi.StatusResponse) bool { return st.KeyId == newID })
	select {
	case <-changed:
	case <-time.After(10 * time.Second):
		t.Errorf("OnReload was not called with keyChanged after a rotation")
	}
	after, err := ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("after")})
	if err != nil || after.KeyId != newID {
		t.Errorf("Encrypt() after rotation key_id = %q, %v; want %s, nil", after.GetKeyId(), err, newID)
	}
	dec, err := ts.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: before.Ciphertext, KeyId: before.KeyId, Annotations: before.Annotations})
	if err != nil || string(dec.GetPlaintext()) != "before" {
		t.Errorf("Decrypt() of data under the old key = %q, %v; want before, nil", dec.GetPlaintext(), err)
	}
}

func TestAllowedUIDs(t *testing.T) {
	me := uint32(os.Getuid())
	denied := start(t, nil, nil, server.Config{AllowedUIDs: []uint32{me + 1}})
	_, err := denied.client.Encrypt(callCtx(t), &kmsapi.EncryptRequest{Plaintext: []byte("x")})
	wantCode(t, "Encrypt() from a uid not allowed", err, codes.PermissionDenied)
	allowed := start(t, nil, nil, server.Config{AllowedUIDs: []uint32{me + 1, me}})
	if _, err := allowed.client.Encrypt(callCtx(t), &kmsapi.EncryptRequest{Plaintext: []byte("x")}); err != nil {
		t.Errorf("Encrypt() from an allowed uid err = %v, want nil", err)
	}
}

func TestCallerAndAudit(t *testing.T) {
	var mu sync.Mutex
	var callers []server.Caller
	record := func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		c, ok := server.CallerFromContext(ctx)
		if ok {
			mu.Lock()
			callers = append(callers, c)
			mu.Unlock()
		}
		return h(ctx, req)
	}
	var audit syncBuffer
	auditLog := kleidiaudit.New(&audit)
	defer auditLog.Close()
	ts := start(t, nil, nil, server.Config{
		Interceptors: []grpc.UnaryServerInterceptor{record},
		Audit:        auditLog,
	})
	secret := []byte("plaintext-that-must-not-be-logged")
	if _, err := ts.client.Encrypt(callCtx(t), &kmsapi.EncryptRequest{Plaintext: secret, Uid: "audit-uid-1"}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(callers) == 0 {
		t.Fatalf("CallerFromContext() in an interceptor: no caller")
	}
	if c := callers[len(callers)-1]; c.UID != uint32(os.Getuid()) || c.PID != int32(os.Getpid()) {
		t.Errorf("CallerFromContext() = %+v, want uid %d pid %d", c, os.Getuid(), os.Getpid())
	}
	auditLog.Flush()
	log := audit.String()
	for _, want := range []string{`"request_uid":"audit-uid-1"`, `"event":"kms.encrypt"`, `"outcome":"ok"`, ts.env.KeyID(),
		fmt.Sprintf(`"caller_pid":%d`, os.Getpid())} {
		if !strings.Contains(log, want) {
			t.Errorf("audit log %s does not contain %s", log, want)
		}
	}
	if strings.Contains(log, string(secret)) {
		t.Errorf("audit log contains the plaintext")
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// SIGTERM's path: the context ends; a call in flight finishes, Serve returns nil, the socket is gone.
func TestGracefulStop(t *testing.T) {
	ts := start(t, nil, nil, server.Config{CallTimeout: time.Minute})
	other := start(t, ts.provider, nil, server.Config{})
	ctx := callCtx(t)
	enc, err := other.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("in flight")})
	if err != nil {
		t.Fatal(err)
	}
	ts.provider.SetLatency(300 * time.Millisecond) // the first unwrap of other's KEK is slow
	result := make(chan error, 1)
	go func() {
		dec, err := ts.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations})
		if err == nil && string(dec.Plaintext) != "in flight" {
			err = errors.New("wrong plaintext")
		}
		result <- err
	}()
	// Stop once the call is in the provider.
	for ts.provider.Calls(kleiditest.OpUnwrap) == 0 {
		time.Sleep(time.Millisecond)
	}
	if err := ts.stop(); err != nil {
		t.Errorf("ListenAndServe() after stop = %v, want nil", err)
	}
	if err := <-result; err != nil {
		t.Errorf("Decrypt() in flight during stop err = %v, want nil", err)
	}
	if _, err := os.Lstat(ts.path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("os.Lstat(socket) after stop err = %v, want not exist", err)
	}
}

func TestSocketMode(t *testing.T) {
	for _, mode := range []os.FileMode{0, 0o600, 0o660} {
		ts := start(t, nil, nil, server.Config{SocketMode: mode})
		fi, err := os.Stat(ts.path)
		if err != nil {
			t.Fatal(err)
		}
		want := mode
		if want == 0 {
			want = 0o600
		}
		if fi.Mode().Perm() != want || fi.Mode().Type() != os.ModeSocket {
			t.Errorf("socket mode with SocketMode %v = %v, want socket %v", mode, fi.Mode(), want)
		}
		dir, _ := os.Stat(filepath.Dir(ts.path))
		if dir.Mode().Perm() != 0o700 {
			t.Errorf("socket directory mode = %v, want 0700", dir.Mode().Perm())
		}
	}
}

func TestConcurrentLoad(t *testing.T) {
	dir := shortDir(t)
	ring := kleidi.NewFileKeyring(filepath.Join(dir, "keyring.json"))
	ts := start(t, nil, ring, server.Config{ReloadInterval: 5 * time.Millisecond, HealthInterval: 5 * time.Millisecond})
	ctx := callCtx(t)
	rotator, err := kleidi.NewEnvelope(ctx, ts.provider, kleidi.NewFileKeyring(ring.Path()))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := range 16 {
		wg.Go(func() {
			for i := range 40 {
				pt := fmt.Appendf(nil, "seed %d %d", g, i)
				enc, err := ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: pt})
				if err != nil {
					errs <- err
					return
				}
				dec, err := ts.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations})
				if err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(dec.Plaintext, pt) {
					errs <- errors.New("round trip changed the data")
					return
				}
				if _, err := ts.client.Status(ctx, &kmsapi.StatusRequest{}); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Go(func() {
		for range 5 {
			if _, err := rotator.Rotate(ctx); err != nil {
				errs <- err
				return
			}
		}
	})
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("concurrent call: %v", err)
	}
	pollStatus(t, ts.client, func(st *kmsapi.StatusResponse) bool { return st.KeyId == rotator.KeyID() })
}

func TestHandler(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	ring := kleidi.NewMemoryKeyring()
	srv, err := server.New(context.Background(), p, ring, server.Config{Logger: quietLogger()}, kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatal(err)
	}
	get := func(path string) (int, string) {
		rec := httptest.NewRecorder()
		srv.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		return rec.Code, strings.TrimSpace(rec.Body.String())
	}
	for _, path := range []string{"/livez", "/readyz", "/healthz"} {
		if code, body := get(path); code != http.StatusOK || body != "ok" {
			t.Errorf("GET %s = %d %q, want 200 ok", path, code, body)
		}
	}
	// A server whose root was down at start reports it at once.
	p.SetError(kleiditest.OpHealth, kleidi.ErrUnavailable)
	srv, err = server.New(context.Background(), p, ring, server.Config{Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if code, body := get("/readyz"); code != http.StatusServiceUnavailable || body != "root of trust unavailable" {
		t.Errorf("GET /readyz with the root down = %d %q, want 503 root of trust unavailable", code, body)
	}
	if code, _ := get("/livez"); code != http.StatusOK {
		t.Errorf("GET /livez with the root down = %d, want 200", code)
	}
}

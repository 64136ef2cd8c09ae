package server_test

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kleidi-kms/kleidi"
	kleidiaudit "github.com/kleidi-kms/kleidi/audit"
	"github.com/kleidi-kms/kleidi/kleiditest"
	"github.com/kleidi-kms/kleidi/metrics"
	"github.com/kleidi-kms/kleidi/server"
)

// auditRecords returns the records of an audit log, in order.
func auditRecords(t *testing.T, log string) []map[string]any {
	t.Helper()
	var records []map[string]any
	for line := range strings.SplitSeq(strings.TrimSpace(log), "\n") {
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		records = append(records, r)
	}
	return records
}

// TestAssembly: given Metrics and Audit, and nothing else, the server wires every piece. The audit log holds the
// start and stop records, the KMS calls, and the Envelope's key operations (a reload that changed the key and the
// unwrap of the new key); the metrics count the provider's calls, the KMS calls, the reload and health, served on
// /metrics beside the health endpoints.
func TestAssembly(t *testing.T) {
	m, err := metrics.New()
	if err != nil {
		t.Fatalf("metrics.New() err = %v", err)
	}
	t.Cleanup(func() { m.Shutdown(context.Background()) })
	var log syncBuffer
	a := kleidiaudit.New(&log)
	defer a.Close()
	root := make([]byte, 32)
	rand.Read(root)
	ring := kleidi.NewFileKeyring(filepath.Join(t.TempDir(), "keyring.json"))
	ts := start(t, kleiditest.NewInsecureProviderWithRoot(root), ring,
		server.Config{Metrics: m, Audit: a, ReloadInterval: 20 * time.Millisecond})

	ctx := callCtx(t)
	enc, err := ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("seed"), Uid: "u1"})
	if err != nil {
		t.Fatalf("Encrypt() err = %v", err)
	}
	if _, err := ts.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations, Uid: "u2"}); err != nil {
		t.Fatalf("Decrypt() err = %v", err)
	}
	rotator, err := kleidi.NewEnvelope(ctx, kleiditest.NewInsecureProviderWithRoot(root), kleidi.NewFileKeyring(ring.Path()))
	if err != nil {
		t.Fatal(err)
	}
	second, err := rotator.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pollStatus(t, ts.client, func(st *kmsapi.StatusResponse) bool { return st.KeyId == second })
	if _, err := ts.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("seed"), Uid: "u3"}); err != nil {
		t.Fatalf("Encrypt() after the rotation err = %v", err)
	}

	rec := httptest.NewRecorder()
	ts.srv.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	page, _ := io.ReadAll(rec.Body)
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /metrics = %d, want 200", rec.Code)
	}
	for _, want := range []string{`kleidi_kms_requests_total{`, `operation="unwrap",outcome="ok"`, `operation="health",outcome="ok"`,
		`kleidi_keyring_reloads_total{`, `kleidi_key_rotations_total 1`, `kleidi_active_key_info{key_id="` + second + `"} 1`,
		"kleidi_healthy 1", "kleidi_audit_write_errors_total 0"} {
		if !strings.Contains(string(page), want) {
			t.Errorf("GET /metrics lacks %s", want)
		}
	}

	if err := ts.stop(); err != nil {
		t.Fatalf("ListenAndServe() = %v, want nil", err)
	}
	a.Flush()
	var events []string
	for _, r := range auditRecords(t, log.String()) {
		events = append(events, fmt.Sprint(r["event"]))
	}
	got := strings.Join(events, " ")
	for _, want := range []string{kleidiaudit.EventStart, kleidiaudit.EventEncrypt, kleidiaudit.EventDecrypt, kleidiaudit.EventReload,
		kleidiaudit.EventUnwrap, kleidiaudit.EventStop} {
		if !strings.Contains(got, want) {
			t.Errorf("audit events %s lack %s", got, want)
		}
	}
	if !strings.HasSuffix(got, kleidiaudit.EventStop) {
		t.Errorf("audit events %s: want %s last", got, kleidiaudit.EventStop)
	}
}

// TestErrorKindsAgree: whatever the root of trust answers an unwrap with, the key.unwrap audit record names a
// kind, the client gets the code of that kind, and the kms.decrypt audit record says that code: the log, the
// client and the metrics never disagree, also for an error that holds two kinds.
func TestErrorKindsAgree(t *testing.T) {
	root := make([]byte, 32)
	rand.Read(root)
	p := kleiditest.NewInsecureProviderWithRoot(root)
	var log syncBuffer
	a := kleidiaudit.New(&log)
	defer a.Close()
	ts := start(t, p, nil, server.Config{Audit: a})
	kinds := map[string]error{}
	for _, err := range []error{kleidi.ErrUnwrap, kleidi.ErrUnavailable, kleidi.ErrClosed, kleidi.ErrKeyMismatch,
		kleidi.ErrUnknownKey, context.DeadlineExceeded, errors.New("a provider's raw error")} {
		kinds[kleidi.ErrorKind(err)] = err
	}
	for _, injected := range []error{
		kleidi.ErrUnwrap, kleidi.ErrUnavailable, kleidi.ErrClosed, errors.Join(kleidi.ErrUnwrap, kleidi.ErrUnavailable),
		errors.Join(kleidi.ErrUnavailable, kleidi.ErrUnwrap), errors.New("a provider's raw error"),
	} {
		// A KEK of the same root that the server's keyring lacks: Decrypt must unwrap its attached key.
		sibling, err := kleidi.NewEnvelope(context.Background(), kleiditest.NewInsecureProviderWithRoot(root), kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
		if err != nil {
			t.Fatal(err)
		}
		c, err := sibling.Encrypt(context.Background(), []byte("seed"), nil)
		if err != nil {
			t.Fatal(err)
		}
		p.SetError(kleiditest.OpUnwrap, injected)
		_, err = ts.client.Decrypt(callCtx(t), &kmsapi.DecryptRequest{Ciphertext: c.Bytes(), KeyId: c.KeyID(),
			Annotations: map[string][]byte{server.AttachedKeyAnnotation: c.AttachedKey}, Uid: "u"})
		p.SetError(kleiditest.OpUnwrap, nil)
		a.Flush()
		var unwrapKind, decryptCode string
		for _, r := range auditRecords(t, log.String()) {
			switch r["event"] {
			case kleidiaudit.EventUnwrap:
				unwrapKind, _ = r["error_type"].(string)
			case kleidiaudit.EventDecrypt:
				decryptCode, _ = r["error_type"].(string)
			}
		}
		kindErr, ok := kinds[unwrapKind]
		if !ok {
			t.Errorf("unwrap error %q: key.unwrap error_type %q, want one of %v", injected, unwrapKind, kinds)
			continue
		}
		want := server.Code(fmt.Errorf("unwrap: %w", kindErr))
		if got := status.Code(err); got != want {
			t.Errorf("unwrap error %q: Decrypt() code %v, want %v, the code of the audited kind %s", injected, got, want, unwrapKind)
		}
		if decryptCode != want.String() {
			t.Errorf("unwrap error %q: kms.decrypt error_type %q, want %v", injected, decryptCode, want)
		}
	}
}

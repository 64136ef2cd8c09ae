package metrics_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http/httptest"
	"os/exec"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/audit"
	"github.com/kleidi-kms/kleidi/kleiditest"
	"github.com/kleidi-kms/kleidi/metrics"
)

func scrape(t *testing.T, m *metrics.Metrics) string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("GET /metrics = %d, want 200", rec.Code)
	}
	b, _ := io.ReadAll(rec.Body)
	return string(b)
}

func wantLine(t *testing.T, page, line string) {
	t.Helper()
	for _, l := range strings.Split(page, "\n") {
		if l == line {
			return
		}
	}
	t.Errorf("metrics page lacks %q", line)
}

func TestMetrics(t *testing.T) {
	ctx := context.Background()
	m, err := metrics.New()
	if err != nil {
		t.Fatalf("metrics.New() err = %v", err)
	}
	raw := kleiditest.NewInsecureProvider()
	p := m.Provider(raw)
	ring := kleidi.NewMemoryKeyring()
	e, err := kleidi.NewEnvelope(ctx, p, ring, kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatal(err)
	}
	healthy := true
	if err := m.Observe(e, func() bool { return healthy }); err != nil {
		t.Fatal(err)
	}
	c, _ := e.Encrypt(ctx, []byte("x"), nil)
	for range 3 {
		if _, err := e.Decrypt(ctx, c, nil); err != nil {
			t.Fatal(err)
		}
	}
	// A ciphertext of another root: its attached key's proof fails, and the metrics show it.
	other, err := kleidi.NewEnvelope(ctx, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatal(err)
	}
	foreign, _ := other.Encrypt(ctx, []byte("x"), nil)
	if _, err := e.Decrypt(ctx, foreign, nil); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Fatalf("e.Decrypt(foreign) err = %v, want kleidi.ErrUnauthenticated", err)
	}
	raw.SetError(kleiditest.OpHealth, kleidi.ErrUnavailable)
	p.Health(ctx)
	m.KeyringReloaded(nil, true)
	m.KeyringReloaded(errors.New("boom"), false)

	intercept := m.UnaryServerInterceptor()
	info := &grpc.UnaryServerInfo{FullMethod: "/v2.KeyManagementService/Decrypt"}
	intercept(ctx, nil, info, func(context.Context, any) (any, error) { return nil, status.Error(codes.InvalidArgument, "bad") })
	intercept(ctx, nil, info, func(context.Context, any) (any, error) { return "ok", nil })
	intercept(ctx, nil, &grpc.UnaryServerInfo{FullMethod: "/x/Unknown"}, func(context.Context, any) (any, error) { return nil, nil })

	page := scrape(t, m)
	for _, line := range []string{
		`kleidi_kms_requests_total{code="InvalidArgument",method="Decrypt"} 1`,
		`kleidi_kms_requests_total{code="OK",method="Decrypt"} 1`,
		`kleidi_kms_requests_total{code="OK",method="other"} 1`,
		`kleidi_kms_request_duration_seconds_count{code="OK",method="Decrypt"} 1`,
		`kleidi_provider_operations_total{operation="wrap",outcome="ok",provider="insecure"} 1`,
		`kleidi_provider_operations_total{operation="health",outcome="unavailable",provider="insecure"} 1`,
		`kleidi_provider_operations_total{operation="prove",outcome="ok",provider="insecure"} 1`,
		`kleidi_provider_operations_total{operation="verify",outcome="unauthenticated",provider="insecure"} 1`,
		`kleidi_kek_cache_hits_total 3`,
		`kleidi_kek_cache_misses_total 1`,
		`kleidi_keyring_reloads_total{outcome="ok"} 1`,
		`kleidi_keyring_reloads_total{outcome="error"} 1`,
		`kleidi_key_rotations_total 1`,
		`kleidi_active_key_info{key_id="` + e.KeyID() + `"} 1`,
		`kleidi_healthy 1`,
	} {
		wantLine(t, page, line)
	}
	if !strings.Contains(page, `kleidi_build_info{go_version="`) || !strings.Contains(page, "process_resident_memory_bytes") {
		t.Errorf("metrics page lacks build info or process metrics")
	}

	// The active key series follows a rotation; the old key ID disappears.
	old := e.KeyID()
	if _, err := e.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	healthy = false
	page = scrape(t, m)
	wantLine(t, page, `kleidi_active_key_info{key_id="`+e.KeyID()+`"} 1`)
	wantLine(t, page, `kleidi_healthy 0`)
	if strings.Contains(page, old) {
		t.Errorf("metrics page still shows the old active key %s", old)
	}
	promtool(t, page)
}

// promtool lints the page with Prometheus's own checker (Debian package prometheus).
func promtool(t *testing.T, page string) {
	t.Helper()
	path, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool not found: install it (apt-get install prometheus)")
	}
	cmd := exec.Command(path, "check", "metrics")
	cmd.Stdin = strings.NewReader(page)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out.String())
	}
}

// failingWriter fails every write, as a full disk does.
type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("no space left on device") }

func TestObserveAudit(t *testing.T) {
	m, err := metrics.New()
	if err != nil {
		t.Fatal(err)
	}
	l := audit.New(failingWriter{})
	defer l.Close()
	if err := m.ObserveAudit(l); err != nil {
		t.Fatalf("m.ObserveAudit(l) err = %v", err)
	}
	l.Log(audit.Record{Event: audit.EventStart})
	l.Flush()
	page := scrape(t, m)
	if !strings.Contains(page, "kleidi_audit_write_errors_total ") || strings.Contains(page, "kleidi_audit_write_errors_total 0\n") {
		t.Errorf("metrics page after a failed audit write lacks a non-zero kleidi_audit_write_errors_total:\n%s", page)
	}
	if !strings.Contains(page, "kleidi_audit_lost_records_total ") {
		t.Errorf("metrics page lacks kleidi_audit_lost_records_total")
	}
}

// A provider that shares a keyring with other nodes stays one when instrumented: without it, a node could not
// import the KEKs its peers wrapped for it.
func TestProviderKeepsNode(t *testing.T) {
	m, err := metrics.New()
	if err != nil {
		t.Fatal(err)
	}
	p := m.Provider(kleiditest.NewInsecureNode())
	node, ok := p.(kleidi.Node)
	if !ok {
		t.Fatalf("m.Provider(a kleidi.Node) is not a kleidi.Node")
	}
	id, err := node.Identity(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	sig, err := node.Sign(context.Background(), []byte("message"))
	if err != nil || id.Verify([]byte("message"), sig) != nil {
		t.Fatalf("Sign through the instrumented provider: %v", err)
	}
	if _, ok := m.Provider(kleiditest.NewInsecureProvider()).(kleidi.Node); ok {
		t.Errorf("m.Provider(a provider that is not a Node) is a Node")
	}
	wantLine(t, scrape(t, m), `kleidi_provider_operations_total{operation="sign",outcome="ok",provider="insecure"} 1`)
}

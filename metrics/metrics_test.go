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

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
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
		`kleidi_kms_requests_total{code="invalid_argument",method="decrypt"} 1`,
		`kleidi_kms_requests_total{code="ok",method="decrypt"} 1`,
		`kleidi_kms_requests_total{code="ok",method="other"} 1`,
		`kleidi_kms_request_duration_seconds_count{code="ok",method="decrypt"} 1`,
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

// TestLabelsAreLowerCase checks that every gRPC code and KMS method gets a lower-case label value of its own, as
// the provider labels have, so that one case serves every query.
func TestLabelsAreLowerCase(t *testing.T) {
	ctx := context.Background()
	m, err := metrics.New()
	if err != nil {
		t.Fatal(err)
	}
	intercept := m.UnaryServerInterceptor()
	want := map[string]bool{}
	for c := codes.OK; c <= codes.Unauthenticated; c++ {
		for _, method := range []string{"Status", "Encrypt", "Decrypt"} {
			info := &grpc.UnaryServerInfo{FullMethod: "/v2.KeyManagementService/" + method}
			intercept(ctx, nil, info, func(context.Context, any) (any, error) { return nil, status.Error(c, "x") })
		}
		want[c.String()] = true
	}
	intercept(ctx, nil, &grpc.UnaryServerInfo{FullMethod: "/v2.KeyManagementService/Decrypt"},
		func(context.Context, any) (any, error) { return nil, status.Error(codes.Code(99), "x") })
	m.Provider(kleiditest.NewInsecureProvider()).Health(ctx)

	page := scrape(t, m)
	codesSeen := map[string]bool{}
	for _, line := range strings.Split(page, "\n") {
		if !strings.HasPrefix(line, "kleidi_kms_requests_total{") && !strings.HasPrefix(line, "kleidi_provider_operations_total{") {
			continue
		}
		labels := line[strings.IndexByte(line, '{')+1 : strings.IndexByte(line, '}')]
		for _, kv := range strings.Split(labels, ",") {
			name, value, _ := strings.Cut(kv, "=")
			value = strings.Trim(value, `"`)
			if value != strings.ToLower(value) {
				t.Errorf("metrics page line %q: label %s=%q is not lower case", line, name, value)
			}
			if name == "code" {
				codesSeen[value] = true
			}
		}
	}
	// 17 codes, each its own value, and "other" for a code gRPC does not define.
	if len(codesSeen) != len(want)+1 || !codesSeen["other"] || !codesSeen["invalid_argument"] || !codesSeen["ok"] {
		t.Errorf("code label values = %v, want the %d gRPC codes in snake case and other", codesSeen, len(want))
	}
	for _, line := range []string{
		`kleidi_kms_requests_total{code="failed_precondition",method="decrypt"} 1`,
		`kleidi_kms_requests_total{code="deadline_exceeded",method="status"} 1`,
		`kleidi_kms_requests_total{code="not_found",method="encrypt"} 1`,
		`kleidi_kms_requests_total{code="other",method="decrypt"} 1`,
	} {
		wantLine(t, page, line)
	}
}

// instrument returns the data of the instrument called name in rm, or nil.
func instrument(rm *metricdata.ResourceMetrics, name string) metricdata.Aggregation {
	for _, sm := range rm.ScopeMetrics {
		for _, mt := range sm.Metrics {
			if mt.Name == name {
				return mt.Data
			}
		}
	}
	return nil
}

// sum returns the value of the int64 sum called name in rm whose attributes hold every one of kv (name, value
// pairs), and whether there is one.
func sum(rm *metricdata.ResourceMetrics, name string, kv ...string) (int64, bool) {
	data, ok := instrument(rm, name).(metricdata.Sum[int64])
	if !ok {
		return 0, false
	}
	var total int64
	found := false
	for _, dp := range data.DataPoints {
		match := true
		for i := 0; i+1 < len(kv); i += 2 {
			v, ok := dp.Attributes.Value(attribute.Key(kv[i]))
			match = match && ok && v.AsString() == kv[i+1]
		}
		if match {
			total += dp.Value
			found = true
		}
	}
	return total, found
}

// TestWithMeterProvider checks that the instruments go to the MeterProvider a program gives, with the same
// names and labels, that no page of kleidi's own is served, and that Shutdown stops kleidi's callbacks but not
// the program's provider.
func TestWithMeterProvider(t *testing.T) {
	ctx := context.Background()
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer mp.Shutdown(ctx)
	m, err := metrics.New(metrics.WithMeterProvider(mp))
	if err != nil {
		t.Fatalf("metrics.New(metrics.WithMeterProvider(mp)) err = %v, want nil", err)
	}
	e, err := kleidi.NewEnvelope(ctx, m.Provider(kleiditest.NewInsecureProvider()), kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Observe(e, func() bool { return true }); err != nil {
		t.Fatal(err)
	}
	c, _ := e.Encrypt(ctx, []byte("x"), nil)
	for range 2 {
		if _, err := e.Decrypt(ctx, c, nil); err != nil {
			t.Fatal(err)
		}
	}
	info := &grpc.UnaryServerInfo{FullMethod: "/v2.KeyManagementService/Decrypt"}
	m.UnaryServerInterceptor()(ctx, nil, info, func(context.Context, any) (any, error) { return nil, status.Error(codes.NotFound, "x") })

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(ctx, &rm); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		kv   []string
		want int64
	}{
		{"kleidi.kms.requests", []string{"method", "decrypt", "code", "not_found"}, 1},
		{"kleidi.provider.operations", []string{"provider", "insecure", "operation", "wrap", "outcome", "ok"}, 1},
		{"kleidi.kek.cache.hits", nil, 2},
	} {
		if got, ok := sum(&rm, tc.name, tc.kv...); !ok || got != tc.want {
			t.Errorf("reader.Collect(): %s%v = %d (found %v), want %d", tc.name, tc.kv, got, ok, tc.want)
		}
	}
	if instrument(&rm, "kleidi.build.info") == nil || instrument(&rm, "kleidi.active.key.info") == nil {
		t.Errorf("reader.Collect() lacks kleidi.build.info or kleidi.active.key.info")
	}

	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 404 || strings.Contains(rec.Body.String(), "kleidi_") {
		t.Errorf("GET /metrics of a Metrics with a MeterProvider = %d %q, want 404 and no metrics", rec.Code, rec.Body.String())
	}

	if err := m.Shutdown(ctx); err != nil {
		t.Fatalf("m.Shutdown(ctx) err = %v, want nil", err)
	}
	rm = metricdata.ResourceMetrics{}
	if err := reader.Collect(ctx, &rm); err != nil {
		t.Fatalf("reader.Collect() after m.Shutdown(ctx) err = %v, want nil: the program's provider keeps running", err)
	}
	if _, ok := sum(&rm, "kleidi.kek.cache.hits"); ok {
		t.Errorf("reader.Collect() after m.Shutdown(ctx) still observes kleidi.kek.cache.hits")
	}
}

// TestWithRegisterer checks that the instruments join a program's own Prometheus registry, beside its own
// metrics and without a second copy of the Go collectors, so that one page serves both.
func TestWithRegisterer(t *testing.T) {
	ctx := context.Background()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector())
	files := prometheus.NewCounter(prometheus.CounterOpts{Name: "agent_files_encrypted_total", Help: "Files encrypted."})
	reg.MustRegister(files)
	files.Add(3)
	m, err := metrics.New(metrics.WithRegisterer(reg))
	if err != nil {
		t.Fatalf("metrics.New(metrics.WithRegisterer(reg)) err = %v, want nil", err)
	}
	defer m.Shutdown(ctx)
	m.Provider(kleiditest.NewInsecureProvider()).Health(ctx)

	rec := httptest.NewRecorder()
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("GET the program's /metrics = %d, want 200: %s", rec.Code, rec.Body.String())
	}
	page := rec.Body.String()
	wantLine(t, page, `agent_files_encrypted_total 3`)
	wantLine(t, page, `kleidi_provider_operations_total{operation="health",outcome="ok",provider="insecure"} 1`)
	if !strings.Contains(page, `kleidi_build_info{`) {
		t.Errorf("the program's /metrics lacks kleidi_build_info")
	}
	promtool(t, page)

	own := httptest.NewRecorder()
	m.Handler().ServeHTTP(own, httptest.NewRequest("GET", "/metrics", nil))
	if own.Code != 404 {
		t.Errorf("GET m.Handler() with a registerer = %d, want 404: the program serves the page", own.Code)
	}
}

func TestNewRefusesBadOptions(t *testing.T) {
	mp := sdkmetric.NewMeterProvider()
	defer mp.Shutdown(context.Background())
	for name, opts := range map[string][]metrics.Option{
		"nil MeterProvider":            {metrics.WithMeterProvider(nil)},
		"nil Registerer":               {metrics.WithRegisterer(nil)},
		"MeterProvider and Registerer": {metrics.WithMeterProvider(mp), metrics.WithRegisterer(prometheus.NewRegistry())},
	} {
		if m, err := metrics.New(opts...); err == nil || m != nil {
			t.Errorf("metrics.New(%s) = %v, %v; want nil, an error", name, m, err)
		}
	}
}

// BenchmarkInterceptor is what the metrics add to every KMS call: the interceptor around a handler that does
// nothing.
func BenchmarkInterceptor(b *testing.B) {
	m, err := metrics.New()
	if err != nil {
		b.Fatal(err)
	}
	defer m.Shutdown(context.Background())
	intercept := m.UnaryServerInterceptor()
	info := &grpc.UnaryServerInfo{FullMethod: "/v2.KeyManagementService/Decrypt"}
	handler := func(context.Context, any) (any, error) { return nil, nil }
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			intercept(context.Background(), nil, info, handler)
		}
	})
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsservice "k8s.io/kms/pkg/service"
)

func TestPercentile(t *testing.T) {
	hundred := make([]time.Duration, 100)
	for i := range hundred {
		hundred[i] = time.Duration(i+1) * time.Millisecond
	}
	ten := hundred[:10]
	tests := []struct {
		name   string
		sorted []time.Duration
		p      float64
		want   time.Duration
	}{
		{"empty", nil, 50, 0},
		{"one sample p50", hundred[:1], 50, time.Millisecond},
		{"one sample p99", hundred[:1], 99, time.Millisecond},
		{"100 p50", hundred, 50, 50 * time.Millisecond},
		{"100 p90", hundred, 90, 90 * time.Millisecond},
		{"100 p99", hundred, 99, 99 * time.Millisecond},
		{"100 max", hundred, 100, 100 * time.Millisecond},
		{"10 p50", ten, 50, 5 * time.Millisecond},
		{"10 p90", ten, 90, 9 * time.Millisecond},
		{"10 p99 is the largest", ten, 99, 10 * time.Millisecond},
		{"4 p50 is the lower middle", hundred[:4], 50, 2 * time.Millisecond},
		{"tiny p rounds up to the first", hundred, 0.001, time.Millisecond},
	}
	for _, tt := range tests {
		if got := percentile(tt.sorted, tt.p); got != tt.want {
			t.Errorf("%s: percentile(%d samples, %g) = %v, want %v", tt.name, len(tt.sorted), tt.p, got, tt.want)
		}
	}
}

func TestSummarize(t *testing.T) {
	lat := []time.Duration{3 * time.Millisecond, time.Millisecond, 2 * time.Millisecond, 4 * time.Millisecond}
	got := summarize("encrypt", lat, 1, 2*time.Second)
	want := MethodResult{Method: "encrypt", Count: 5, Errors: 1, Throughput: 2, P50: 2000, P90: 4000, P99: 4000, Max: 4000}
	if got.Method != want.Method || got.Count != want.Count || got.Errors != want.Errors ||
		got.Throughput != want.Throughput || got.P50 != want.P50 || got.P90 != want.P90 || got.P99 != want.P99 ||
		got.Max != want.Max {
		t.Errorf("summarize(%v, 1 error, 2s) = %+v, want %+v", lat, got, want)
	}
}

func TestMedian(t *testing.T) {
	tests := []struct {
		xs   []float64
		want float64
	}{
		{nil, 0},
		{[]float64{5}, 5},
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
	}
	for _, tt := range tests {
		if got := median(tt.xs); got != tt.want {
			t.Errorf("median(%v) = %g, want %g", tt.xs, got, tt.want)
		}
	}
}

func TestMethodSequence(t *testing.T) {
	seq, err := methodSequence("mix", "encrypt=1,decrypt=2,status=0")
	if err != nil {
		t.Fatalf("methodSequence(mix, ...) err = %v, want nil", err)
	}
	if want := []method{methodEncrypt, methodDecrypt, methodDecrypt}; !equalMethods(seq, want) {
		t.Errorf("methodSequence(mix, encrypt=1,decrypt=2,status=0) = %v, want %v", seq, want)
	}
	for _, bad := range [][2]string{{"sign", ""}, {"mix", "encrypt"}, {"mix", "encrypt=x"}, {"mix", "status=0"}, {"mix", "verify=1"}} {
		if _, err := methodSequence(bad[0], bad[1]); err == nil {
			t.Errorf("methodSequence(%q, %q) err = nil, want an error", bad[0], bad[1])
		}
	}
}

func equalMethods(a, b []method) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestParseExposition(t *testing.T) {
	body := []byte(`# HELP kleidi_provider_calls_total Calls.
# TYPE kleidi_provider_calls_total counter
kleidi_provider_calls_total{op="unwrap",result="ok"} 3
kleidi_provider_calls_total{op="wrap",result="a b"} 1.5e+00
kleidi_up 1
go_goroutines 12
`)
	got := parseExposition(body, []string{"kleidi_"})
	want := map[string]float64{
		`kleidi_provider_calls_total{op="unwrap",result="ok"}`: 3,
		`kleidi_provider_calls_total{op="wrap",result="a b"}`:  1.5,
		`kleidi_up`: 1,
	}
	if len(got) != len(want) {
		t.Fatalf("parseExposition() = %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("parseExposition()[%s] = %g, want %g", k, got[k], v)
		}
	}
	d := counterDeltas(map[string]float64{"a": 1, "b": 2}, map[string]float64{"a": 1, "b": 5, "c": 1})
	if d["a"] != 0 || d["b"] != 3 || d["c"] != 1 || len(d) != 3 {
		t.Errorf("counterDeltas() = %v, want a:0 b:3 c:1", d)
	}
}

// startBaseline serves the baseline plugin on a socket in a temporary directory until the test ends.
func startBaseline(t *testing.T) string {
	t.Helper()
	svc, err := newBaselineService()
	if err != nil {
		t.Fatalf("newBaselineService() err = %v, want nil", err)
	}
	return startService(t, svc)
}

func startService(t *testing.T, svc kmsservice.Service) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "kms.sock")
	l, err := listenUnix(path)
	if err != nil {
		t.Fatalf("listenUnix(%q) err = %v, want nil", path, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serveService(ctx, l, 3*time.Second, svc) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serveService() err = %v, want nil", err)
		}
	})
	return "unix://" + path
}

// runJSON runs the command and decodes its JSON report into v.
func runJSON(t *testing.T, v any, args ...string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	if code := mainWithArgs(context.Background(), append(args, "--json"), &stdout, &stderr); code != 0 {
		t.Fatalf("kleidi-bench %s = exit %d, want 0; stderr:\n%s", strings.Join(args, " "), code, stderr.String())
	}
	if err := json.Unmarshal(stdout.Bytes(), v); err != nil {
		t.Fatalf("json.Unmarshal(output of kleidi-bench %s) err = %v, want nil; output:\n%s", strings.Join(args, " "), err, stdout.String())
	}
}

func TestRunAgainstBaseline(t *testing.T) {
	endpoint := startBaseline(t)
	for _, m := range []string{"encrypt", "decrypt", "status", "mix"} {
		t.Run(m, func(t *testing.T) {
			var rep Report
			runJSON(t, &rep, "run", "--endpoint", endpoint, "--method", m, "--concurrency", "4", "--count", "200",
				"--seeds", "3")
			if rep.KeyID != baselineKeyID || rep.Healthz != "ok" {
				t.Errorf("report key_id, healthz = %q, %q, want %q, ok", rep.KeyID, rep.Healthz, baselineKeyID)
			}
			want := []string{m}
			if m == "mix" {
				want = []string{"encrypt", "decrypt", "status", "total"}
			}
			if len(rep.Results) != len(want) {
				t.Fatalf("report results = %+v, want one for each of %v", rep.Results, want)
			}
			var sum int64
			for i, r := range rep.Results {
				if r.Method != want[i] {
					t.Errorf("results[%d].method = %q, want %q", i, r.Method, want[i])
				}
				if r.Errors != 0 {
					t.Errorf("results[%d] (%s) errors = %d, want 0: %v", i, r.Method, r.Errors, r.ErrorSamples)
				}
				if r.Method != "total" {
					sum += r.Count
				}
				if r.Count > 0 && (r.Throughput <= 0 || r.P50 <= 0 || r.P50 > r.P90 || r.P90 > r.P99 || r.P99 > r.Max) {
					t.Errorf("results[%d] = %+v, want positive throughput and p50 <= p90 <= p99 <= max", i, r)
				}
			}
			if sum != 200 {
				t.Errorf("calls made = %d, want 200", sum)
			}
			if total, ok := rep.Result("total"); ok && total.Count != 200 {
				t.Errorf("total count = %d, want 200", total.Count)
			}
		})
	}
}

func TestRunForADuration(t *testing.T) {
	endpoint := startBaseline(t)
	var rep Report
	runJSON(t, &rep, "run", "--endpoint", endpoint, "--method", "decrypt", "--concurrency", "2",
		"--duration", "200ms", "--warmup", "50ms", "--pid", strconv.Itoa(os.Getpid()))
	r, ok := rep.Result("decrypt")
	if !ok || r.Count == 0 || r.Errors != 0 {
		t.Errorf("decrypt result = %+v, want some calls and no errors", r)
	}
	if rep.Elapsed < 0.2 {
		t.Errorf("elapsed = %gs, want at least the 0.2s asked for", rep.Elapsed)
	}
	if rep.Plugin == nil || rep.Plugin.PID != os.Getpid() || rep.Plugin.Before <= 0 || rep.Plugin.CPU < 0 {
		t.Errorf("plugin = %+v, want VmRSS and CPU time of this process (the baseline runs in it)", rep.Plugin)
	}
}

func TestRunTextOutput(t *testing.T) {
	endpoint := startBaseline(t)
	var stdout, stderr bytes.Buffer
	args := []string{"run", "--endpoint", endpoint, "--method", "encrypt", "--count", "20", "--progress"}
	if code := mainWithArgs(context.Background(), args, &stdout, &stderr); code != 0 {
		t.Fatalf("kleidi-bench %s = exit %d, want 0; stderr:\n%s", strings.Join(args, " "), code, stderr.String())
	}
	for _, want := range []string{"method", "req/s", "p99", "encrypt", "machine:"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("kleidi-bench run output = %q, want it to contain %q", stdout.String(), want)
		}
	}
}

// failingService fails every Encrypt, as a plugin whose root of trust is gone would.
type failingService struct{ *baselineService }

func (failingService) Encrypt(context.Context, string, []byte) (*kmsservice.EncryptResponse, error) {
	return nil, status.Error(codes.Unavailable, "root of trust unavailable")
}

func TestRunCountsErrors(t *testing.T) {
	svc, err := newBaselineService()
	if err != nil {
		t.Fatalf("newBaselineService() err = %v, want nil", err)
	}
	endpoint := startService(t, failingService{svc})
	var stdout, stderr bytes.Buffer
	args := []string{"run", "--endpoint", endpoint, "--method", "mix", "--mix", "encrypt=1,status=1", "--concurrency", "2",
		"--count", "40", "--json"}
	if code := mainWithArgs(context.Background(), args, &stdout, &stderr); code != 1 {
		t.Fatalf("kleidi-bench %s = exit %d, want 1 (calls failed); stderr:\n%s", strings.Join(args, " "), code, stderr.String())
	}
	var rep Report
	if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil {
		t.Fatalf("json.Unmarshal(report) err = %v, want nil", err)
	}
	enc, _ := rep.Result("encrypt")
	st, _ := rep.Result("status")
	if enc.Count != 20 || enc.Errors != 20 || st.Count != 20 || st.Errors != 0 {
		t.Errorf("encrypt %d calls %d errors, status %d calls %d errors; want 20/20 and 20/0", enc.Count, enc.Errors,
			st.Count, st.Errors)
	}
	if len(enc.ErrorSamples) != 1 || !strings.Contains(enc.ErrorSamples[0], "root of trust unavailable") {
		t.Errorf("encrypt error samples = %q, want the server's message once", enc.ErrorSamples)
	}
}

func TestCompare(t *testing.T) {
	a, b := startBaseline(t), startBaseline(t)
	var c Comparison
	runJSON(t, &c, "compare", "--endpoint", "a="+a, "--endpoint", "b="+b, "--method", "encrypt,mix",
		"--concurrency", "1,3", "--count", "30", "--repeat", "2")
	if len(c.Cells) != 4 {
		t.Fatalf("comparison has %d cells, want 4 (2 methods x 2 concurrencies)", len(c.Cells))
	}
	for _, cell := range c.Cells {
		if len(cell.Endpoints) != 2 || cell.Endpoints[0].Name != "a" || cell.Endpoints[1].Name != "b" {
			t.Fatalf("cell %s/%d endpoints = %+v, want a then b", cell.Method, cell.Concurrency, cell.Endpoints)
		}
		for _, e := range cell.Endpoints {
			if len(e.Runs) != 2 || e.Errors != 0 || e.Throughput <= 0 || e.P99 <= 0 {
				t.Errorf("cell %s/%d endpoint %s: %d runs, %d errors, %g/s, p99 %gµs; want 2 runs, no errors, positive figures",
					cell.Method, cell.Concurrency, e.Name, len(e.Runs), e.Errors, e.Throughput, e.P99)
			}
		}
		if r := cell.Endpoints[0].ThroughputRatio; r != 1 {
			t.Errorf("cell %s/%d: the reference's own throughput ratio = %g, want 1", cell.Method, cell.Concurrency, r)
		}
	}
}

func TestBadUsage(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"fly"},
		{"run", "--no-such-flag"},
		{"run", "extra-arg"},
	} {
		var stdout, stderr bytes.Buffer
		if code := mainWithArgs(context.Background(), args, &stdout, &stderr); code != 2 {
			t.Errorf("kleidi-bench %q = exit %d, want 2", args, code)
		}
	}
	var stdout, stderr bytes.Buffer
	if code := mainWithArgs(context.Background(), []string{"run", "--count", "1"}, &stdout, &stderr); code != 1 {
		t.Errorf("kleidi-bench run without --endpoint = exit %d, want 1", code)
	}
}

// TestAnnotatedBaseline runs Decrypt against a baseline whose Encrypt returns an annotation of 370 bytes: the
// report says every Decrypt carried them, and the plain baseline's carried none.
func TestAnnotatedBaseline(t *testing.T) {
	annotated, err := newBaselineService()
	if err != nil {
		t.Fatal(err)
	}
	if err := annotated.withAnnotation(370); err != nil {
		t.Fatalf("withAnnotation(370) err = %v, want nil", err)
	}
	if err := annotated.withAnnotation(len(annotationKey) - 1); err == nil {
		t.Errorf("withAnnotation(%d) err = nil, want an error: the key alone is longer", len(annotationKey)-1)
	}
	for _, c := range []struct {
		name     string
		endpoint string
		want     int
	}{{"plain", startBaseline(t), 0}, {"annotated", startService(t, annotated), 370}} {
		var rep Report
		runJSON(t, &rep, "run", "--endpoint", c.endpoint, "--method", "decrypt", "--concurrency", "2", "--count", "50", "--seeds", "2")
		if rep.AnnotationBytes != c.want || rep.Results[0].Errors != 0 {
			t.Errorf("%s baseline: annotation bytes %d, %d errors; want %d, 0", c.name, rep.AnnotationBytes, rep.Results[0].Errors, c.want)
		}
	}
}

// TestPairedRatio pins the paired throughput ratio: the geometric mean of the ratios of runs of the same
// repetition, and a confidence interval that holds it and narrows as the ratios agree.
func TestPairedRatio(t *testing.T) {
	runs := func(tputs ...float64) []*Report {
		var out []*Report
		for _, x := range tputs {
			out = append(out, &Report{Results: []MethodResult{{Method: "decrypt", Throughput: x}}})
		}
		return out
	}
	ref := runs(100, 200, 400)
	mean, low, high := pairedRatio(runs(50, 200, 800), ref, "decrypt") // ratios 0.5, 1, 2
	if math.Abs(mean-1) > 1e-9 || !(low < 0.5 && high > 2) {
		t.Errorf("pairedRatio(0.5, 1, 2) = %v (%v to %v), want 1 inside an interval wider than 0.5 to 2", mean, low, high)
	}
	mean, low, high = pairedRatio(runs(90, 180, 360), ref, "decrypt") // 0.9 every time
	if math.Abs(mean-0.9) > 1e-9 || math.Abs(low-0.9) > 1e-9 || math.Abs(high-0.9) > 1e-9 {
		t.Errorf("pairedRatio(0.9, 0.9, 0.9) = %v (%v to %v), want 0.9 (0.9 to 0.9)", mean, low, high)
	}
	if mean, _, _ := pairedRatio(runs(90), runs(100), "decrypt"); mean != 0 {
		t.Errorf("pairedRatio of one pair = %v, want 0 (no interval from one repetition)", mean)
	}
}

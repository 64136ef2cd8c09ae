package deploy_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// Tests of the monitoring files: the Prometheus alerting rules check and pass their unit tests, the Grafana
// dashboard is valid, and every kleidi_* metric they or docs/observability.md name is one metrics/metrics.go
// lists, so renaming a metric breaks this test until the rules, the dashboard and the doc follow.

var (
	prometheusDir = filepath.Join(deployDir, "prometheus")
	alertsFile    = filepath.Join(prometheusDir, "kleidi-alerts.yaml")
	alertsTest    = filepath.Join(prometheusDir, "kleidi-alerts_test.yaml")
	dashboardFile = filepath.Join(deployDir, "grafana", "kleidi-dashboard.json")
	docFile       = filepath.Join(repoRoot, "docs", "observability.md")
)

// promtoolBin finds promtool, from Debian's prometheus package.
func promtoolBin(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool not found: install Debian's prometheus package (apt-get install prometheus)")
	}
	return p
}

func TestAlertRules(t *testing.T) {
	promtool := promtoolBin(t)
	if out, err := run(t, time.Minute, prometheusDir, nil, promtool, "check", "rules", alertsFile); err != nil {
		t.Errorf("promtool check rules %s: %v\n%s", alertsFile, err, out)
	}
	// The unit tests: KleidiUnhealthy and KleidiDecryptErrors fire on failing series and stay silent on healthy ones.
	if out, err := run(t, time.Minute, prometheusDir, nil, promtool, "test", "rules", alertsTest); err != nil {
		t.Errorf("promtool test rules %s: %v\n%s", alertsTest, err, out)
	}
	rules := readFile(t, alertsFile)
	for _, alert := range []string{"KleidiDown", "KleidiUnhealthy", "KleidiDecryptErrors", "KleidiProviderUnwrapFailures"} {
		if !strings.Contains(rules, "alert: "+alert+"\n") {
			t.Errorf("%s has no alert %s", alertsFile, alert)
		}
	}
	for _, alert := range []string{"KleidiUnhealthy", "KleidiDecryptErrors"} {
		if !strings.Contains(readFile(t, alertsTest), "alertname: "+alert+"\n") {
			t.Errorf("%s does not test %s", alertsTest, alert)
		}
	}
}

// dashboard is the part of a Grafana dashboard the test checks.
type dashboard struct {
	SchemaVersion int `json:"schemaVersion"`
	Templating    struct {
		List []struct {
			Name, Type string
		} `json:"list"`
	} `json:"templating"`
	Panels []struct {
		Title      string `json:"title"`
		Datasource struct {
			UID string `json:"uid"`
		} `json:"datasource"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
	} `json:"panels"`
}

func TestDashboard(t *testing.T) {
	var d dashboard
	if err := json.Unmarshal([]byte(readFile(t, dashboardFile)), &d); err != nil {
		t.Fatalf("json.Unmarshal(%s) err = %v, want nil", dashboardFile, err)
	}
	if d.SchemaVersion != 39 {
		t.Errorf("schemaVersion = %d, want 39", d.SchemaVersion)
	}
	if !slices.ContainsFunc(d.Templating.List, func(v struct{ Name, Type string }) bool {
		return v.Name == "DS_PROMETHEUS" && v.Type == "datasource"
	}) {
		t.Errorf("templating lacks the datasource variable DS_PROMETHEUS")
	}
	var exprs []string
	for _, p := range d.Panels {
		if p.Datasource.UID != "${DS_PROMETHEUS}" {
			t.Errorf("panel %q datasource uid = %q, want ${DS_PROMETHEUS}", p.Title, p.Datasource.UID)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			exprs = append(exprs, q.Expr)
		}
	}
	all := strings.Join(exprs, "\n")
	for _, want := range []string{
		"kleidi_healthy",
		"kleidi_active_key_info",
		"kleidi_kms_requests_total",
		"histogram_quantile(0.5, sum by (le, method) (rate(kleidi_kms_request_duration_seconds_bucket",
		"histogram_quantile(0.99, sum by (le, method) (rate(kleidi_kms_request_duration_seconds_bucket",
		"kleidi_provider_operations_total",
		"kleidi_provider_operation_duration_seconds_bucket",
		"kleidi_kek_cache_hits_total",
		"kleidi_kek_cache_misses_total",
		"kleidi_keyring_reloads_total",
		"kleidi_key_rotations_total",
		"process_resident_memory_bytes",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("no dashboard query contains %s", want)
		}
	}
}

// metricNameRe matches a kleidi metric name in any text.
var metricNameRe = regexp.MustCompile(`\bkleidi_[a-z0-9_]*[a-z0-9]\b`)

// documentedMetrics returns the metric names the package doc of metrics/metrics.go lists, with the _bucket, _sum
// and _count series of those it marks as histograms.
func documentedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	src := readFile(t, filepath.Join(repoRoot, "metrics", "metrics.go"))
	doc, _, ok := strings.Cut(src, "\npackage metrics")
	if !ok {
		t.Fatalf("metrics/metrics.go: no package clause")
	}
	names := map[string]bool{}
	entry := regexp.MustCompile(`(?m)^//\t(kleidi_[a-z0-9_]+)(.*)$`)
	for _, m := range entry.FindAllStringSubmatch(doc, -1) {
		names[m[1]] = true
		if strings.Contains(m[2], "(histogram)") {
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				names[m[1]+suffix] = true
			}
		}
	}
	if len(names) < 10 {
		t.Fatalf("metrics/metrics.go's package doc lists %d metrics, want the whole list", len(names))
	}
	return names
}

func TestMetricNamesDocumented(t *testing.T) {
	known := documentedMetrics(t)
	for _, file := range []string{alertsFile, alertsTest, dashboardFile, docFile} {
		for _, name := range metricNameRe.FindAllString(readFile(t, file), -1) {
			if !known[name] {
				t.Errorf("%s uses metric %s, which metrics/metrics.go's package doc does not list", file, name)
			}
		}
	}
	// And the doc describes every metric.
	doc := readFile(t, docFile)
	for name := range known {
		if !strings.Contains(doc, name) && !strings.HasSuffix(name, "_sum") && !strings.HasSuffix(name, "_count") &&
			!strings.HasSuffix(name, "_bucket") {
			t.Errorf("%s does not describe metric %s", docFile, name)
		}
	}
}

// labelMatcherRe matches a matcher of a kleidi label in a query or a series: method="decrypt", code!="ok", ...
// (the apiserver's method_name and grpc_status_code are not kleidi's, and keep their case).
var labelMatcherRe = regexp.MustCompile(`\b(method|code|operation|outcome|provider)\s*(=|!=|=~|!~)\s*\\?"([^"\\]*)\\?"`)

// TestLabelValuesLowerCase checks that the rules, their tests, the dashboard and the doc match kleidi's labels
// in lower case, as metrics/metrics.go writes every value: a matcher in another case selects nothing, and an
// alert on it never fires.
func TestLabelValuesLowerCase(t *testing.T) {
	for _, file := range []string{alertsFile, alertsTest, dashboardFile, docFile} {
		matchers := labelMatcherRe.FindAllStringSubmatch(readFile(t, file), -1)
		for _, m := range matchers {
			if m[3] != strings.ToLower(m[3]) {
				t.Errorf("%s matches %s, want the lower-case value %q", file, m[0], strings.ToLower(m[3]))
			}
		}
		if file == alertsFile && len(matchers) < 3 {
			t.Errorf("%s holds %d kleidi label matchers, want the rules' method, code, operation and outcome matchers", file, len(matchers))
		}
	}
}

func readFile(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

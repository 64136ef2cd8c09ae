package deploy_test

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestChartAlertsFireOnTheChartsJob renders the chart's ServiceMonitor, metrics Service and PrometheusRule, works
// out the job label Prometheus gives the scraped series (prometheus-operator's rule: the value of the Service's
// label named by jobLabel, else the Service's name), and runs `promtool test rules` over the rendered rules with
// series of that job: KleidiDown stays silent while the plugins are up, and every alert fires on its failure.
func TestChartAlertsFireOnTheChartsJob(t *testing.T) {
	helm, promtool := helmBin(t), promtoolBin(t)
	out := mustRun(t, "", helm, "template", "prod", chartDir, "--namespace", "kube-system",
		"--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.prometheusRule.enabled=true")
	ms := splitManifests(out)
	sm, svc, pr := byKind(ms, "ServiceMonitor"), byKind(ms, "Service"), byKind(ms, "PrometheusRule")
	ds := byKind(ms, "DaemonSet")
	if len(sm) != 1 || len(svc) != 1 || len(pr) != 1 || len(ds) != 1 {
		t.Fatalf("want one ServiceMonitor, Service, PrometheusRule and DaemonSet, got %d, %d, %d, %d:\n%s", len(sm), len(svc), len(pr), len(ds), out)
	}
	job := scrapeJob(t, sm[0].text, svc[0])
	t.Logf("ServiceMonitor %s scrapes Service %s as job %q", sm[0].name, svc[0].name, job)
	// Every target carries its node, so an alert names the control-plane node.
	mustMatch(t, "ServiceMonitor", sm[0].text, `- sourceLabels: \[__meta_kubernetes_pod_node_name\]\n\s+targetLabel: node\n`, 1)

	// The PrometheusRule's spec is a Prometheus rules file: its groups.
	spec, ok := strings.CutPrefix(pr[0].text[strings.Index(pr[0].text, "\nspec:\n")+len("\nspec:\n"):], "  groups:")
	if !ok {
		t.Fatalf("PrometheusRule spec does not start with groups:\n%s", pr[0].text)
	}
	var rules strings.Builder
	rules.WriteString("groups:")
	for line := range strings.SplitSeq(spec, "\n") {
		rules.WriteString(strings.TrimPrefix(line, "  ") + "\n")
	}
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	rulesFile := write("rendered-rules.yaml", rules.String())
	if out, err := run(t, time.Minute, dir, nil, promtool, "check", "rules", rulesFile); err != nil {
		t.Fatalf("promtool check rules (rendered PrometheusRule): %v\n%s", err, out)
	}
	r := strings.NewReplacer("JOB", job, "DAEMONSET", ds[0].name)
	testFile := write("rendered-rules_test.yaml", r.Replace(renderedRulesTest))
	if out, err := run(t, time.Minute, dir, nil, promtool, "test", "rules", testFile); err != nil {
		t.Errorf("promtool test rules over the rendered PrometheusRule, job %q: %v\n%s", job, err, out)
	}
	for _, alert := range []string{"KleidiDown", "KleidiUnhealthy", "KleidiPluginNotRunning", "KleidiAPIServerKMSErrors",
		"KleidiAPIServerTransformationErrors", "KleidiKeyIDMismatch", "KleidiAuditWriteErrors", "KleidiForgedKeys"} {
		if !strings.Contains(renderedRulesTest, `alertname="`+alert+`"`) {
			t.Errorf("the test of the rendered rules does not test %s", alert)
		}
		if !strings.Contains(readFile(t, docFile), "### "+alert+"\n") {
			t.Errorf("%s has no runbook section for %s", docFile, alert)
		}
	}
}

// scrapeJob returns the job label prometheus-operator gives the targets of a ServiceMonitor endpoint: the value
// of the Service's label that jobLabel names, or else the Service's name.
func scrapeJob(t *testing.T, serviceMonitor string, svc manifest) string {
	t.Helper()
	m := regexp.MustCompile(`(?m)^  jobLabel: (\S+)$`).FindStringSubmatch(serviceMonitor)
	if m == nil {
		return svc.name
	}
	meta := svc.text[:strings.Index(svc.text, "\nspec:")]
	v := regexp.MustCompile(`(?m)^    ` + regexp.QuoteMeta(m[1]) + `: "?([^"\s]+)"?$`).FindStringSubmatch(meta)
	if v == nil {
		return svc.name
	}
	return v[1]
}

// renderedRulesTest is a promtool unit test over the rendered rules; JOB is the ServiceMonitor's job, DAEMONSET
// the DaemonSet's name. Three plugins on cp-1, cp-2 and cp-3; each alert's firing is read from ALERTS.
const renderedRulesTest = `rule_files:
  - rendered-rules.yaml
evaluation_interval: 1m
tests:
  # Three healthy plugins, all on the same key: no alert at all, and KleidiDown does not fire through absent().
  - interval: 1m
    input_series:
      - series: 'up{job="JOB", instance="10.0.0.1:8787", node="cp-1"}'
        values: '1x40'
      - series: 'up{job="JOB", instance="10.0.0.2:8787", node="cp-2"}'
        values: '1x40'
      - series: 'kleidi_healthy{job="JOB", instance="10.0.0.1:8787", node="cp-1"}'
        values: '1x40'
      - series: 'kleidi_active_key_info{job="JOB", instance="10.0.0.1:8787", node="cp-1", key_id="kleidi-gpg-a"}'
        values: '1x40'
      - series: 'kleidi_active_key_info{job="JOB", instance="10.0.0.2:8787", node="cp-2", key_id="kleidi-gpg-a"}'
        values: '1x40'
      - series: 'kube_daemonset_status_desired_number_scheduled{job="kube-state-metrics", namespace="kube-system", daemonset="DAEMONSET"}'
        values: '2x40'
      - series: 'kube_daemonset_status_number_available{job="kube-state-metrics", namespace="kube-system", daemonset="DAEMONSET"}'
        values: '2x40'
      - series: 'kube_daemonset_status_number_unavailable{job="kube-state-metrics", namespace="kube-system", daemonset="DAEMONSET"}'
        values: '0x40'
    promql_expr_test:
      - expr: ALERTS
        eval_time: 30m
        exp_samples: []
      - expr: count(ALERTS{alertname="KleidiDown"}) or vector(0)
        eval_time: 30m
        exp_samples:
          - labels: '{}'
            value: 0

  # cp-2's plugin is down and unhealthy before; cp-3's never started: kube-state-metrics sees 2 of 3 available,
  # and the apiserver on cp-3 fails its KMS calls and its reads of Secrets.
  - interval: 1m
    input_series:
      - series: 'up{job="JOB", instance="10.0.0.1:8787", node="cp-1"}'
        values: '1x40'
      - series: 'up{job="JOB", instance="10.0.0.2:8787", node="cp-2"}'
        values: '1x5 0x35'
      - series: 'kleidi_healthy{job="JOB", instance="10.0.0.2:8787", node="cp-2"}'
        values: '0x40'
      - series: 'kube_daemonset_status_desired_number_scheduled{job="kube-state-metrics", namespace="kube-system", daemonset="DAEMONSET"}'
        values: '3x40'
      - series: 'kube_daemonset_status_number_available{job="kube-state-metrics", namespace="kube-system", daemonset="DAEMONSET"}'
        values: '2x40'
      - series: 'kube_daemonset_status_number_unavailable{job="kube-state-metrics", namespace="kube-system", daemonset="DAEMONSET"}'
        values: '1x40'
      - series: 'kube_daemonset_status_number_unavailable{job="kube-state-metrics", namespace="kube-system", daemonset="other"}'
        values: '1x40'
      - series: 'apiserver_envelope_encryption_kms_operations_latency_seconds_count{job="apiserver", instance="10.0.0.3:6443", provider_name="kleidi", method_name="/v2.KeyManagementService/Status", grpc_status_code="Unavailable"}'
        values: '0+6x40'
      - series: 'apiserver_envelope_encryption_kms_operations_latency_seconds_count{job="apiserver", instance="10.0.0.1:6443", provider_name="kleidi", method_name="/v2.KeyManagementService/Decrypt", grpc_status_code="OK"}'
        values: '0+6x40'
      - series: 'apiserver_storage_transformation_operations_total{job="apiserver", instance="10.0.0.3:6443", resource="secrets", transformation_type="from_storage", transformer_prefix="k8s:enc:kms:v2:kleidi:", status="Unavailable"}'
        values: '0+3x40'
      - series: 'apiserver_storage_transformation_operations_total{job="apiserver", instance="10.0.0.1:6443", resource="secrets", transformation_type="from_storage", transformer_prefix="k8s:enc:kms:v2:kleidi:", status="OK"}'
        values: '0+3x40'
    promql_expr_test:
      - expr: ALERTS{alertstate="firing", alertname=~"KleidiDown|KleidiUnhealthy"}
        eval_time: 30m
        exp_samples:
          - labels: 'ALERTS{alertname="KleidiDown", alertstate="firing", severity="critical", job="JOB", instance="10.0.0.2:8787", node="cp-2"}'
            value: 1
          - labels: 'ALERTS{alertname="KleidiUnhealthy", alertstate="firing", severity="critical", job="JOB", instance="10.0.0.2:8787", node="cp-2"}'
            value: 1
      - expr: ALERTS{alertstate="firing", alertname="KleidiPluginNotRunning"}
        eval_time: 30m
        exp_samples:
          - labels: 'ALERTS{alertname="KleidiPluginNotRunning", alertstate="firing", severity="critical", namespace="kube-system", daemonset="DAEMONSET"}'
            value: 1
      - expr: ALERTS{alertstate="firing", alertname=~"KleidiAPIServer.*"}
        eval_time: 30m
        exp_samples:
          - labels: 'ALERTS{alertname="KleidiAPIServerKMSErrors", alertstate="firing", severity="critical", job="apiserver", instance="10.0.0.3:6443", method_name="/v2.KeyManagementService/Status", grpc_status_code="Unavailable"}'
            value: 1
          - labels: 'ALERTS{alertname="KleidiAPIServerTransformationErrors", alertstate="firing", severity="critical", job="apiserver", instance="10.0.0.3:6443", resource="secrets", transformation_type="from_storage", status="Unavailable"}'
            value: 1
      - expr: ALERTS{alertstate="firing", alertname="KleidiPluginNotRunning"}
        eval_time: 5m
        exp_samples: []

  # cp-2 keeps another key for 30 minutes; cp-3 moves to the new key a minute after cp-1 (a rotation); cp-1
  # fails audit writes; cp-2 refuses forged attached keys.
  - interval: 1m
    input_series:
      - series: 'kleidi_active_key_info{job="JOB", instance="10.0.0.1:8787", node="cp-1", key_id="kleidi-gpg-a"}'
        values: '1x40'
      - series: 'kleidi_active_key_info{job="JOB", instance="10.0.0.2:8787", node="cp-2", key_id="kleidi-gpg-b"}'
        values: '1x40'
      - series: 'kleidi_audit_write_errors_total{job="JOB", instance="10.0.0.1:8787", node="cp-1"}'
        values: '0x10 1+1x30'
      - series: 'kleidi_provider_operations_total{job="JOB", instance="10.0.0.2:8787", node="cp-2", provider="gpg", operation="verify", outcome="unauthenticated"}'
        values: '0x10 5+5x30'
      - series: 'kleidi_provider_operations_total{job="JOB", instance="10.0.0.2:8787", node="cp-2", provider="gpg", operation="verify", outcome="ok"}'
        values: '0+10x40'
    promql_expr_test:
      - expr: ALERTS{alertstate="firing", alertname="KleidiKeyIDMismatch"}
        eval_time: 10m
        exp_samples: []
      - expr: ALERTS{alertstate="firing", alertname=~"KleidiKeyIDMismatch|KleidiAuditWriteErrors|KleidiForgedKeys"}
        eval_time: 30m
        exp_samples:
          - labels: 'ALERTS{alertname="KleidiKeyIDMismatch", alertstate="firing", severity="warning", job="JOB"}'
            value: 1
          - labels: 'ALERTS{alertname="KleidiAuditWriteErrors", alertstate="firing", severity="warning", job="JOB", instance="10.0.0.1:8787", node="cp-1"}'
            value: 1
          - labels: 'ALERTS{alertname="KleidiForgedKeys", alertstate="firing", severity="critical", job="JOB", instance="10.0.0.2:8787", node="cp-2", provider="gpg"}'
            value: 1
      - expr: ALERTS{alertstate="firing", alertname=~"KleidiAuditWriteErrors|KleidiForgedKeys"}
        eval_time: 5m
        exp_samples: []
`

package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestDeployManifests has a real kube-apiserver validate what deploy/ ships: the Helm chart rendered with its
// defaults and with every ci/*.yaml, and the kubeadm static pod manifest, through
// kubectl apply --dry-run=server (schema, defaulting, validation and admission, nothing stored).
func TestDeployManifests(t *testing.T) {
	kubectl := requireTool(t, "kubectl", "kubectl (https://kubernetes.io/docs/tasks/tools/)")
	helm := deployHelm(t)
	chart := filepath.Join(repoRoot, "deploy", "helm", "kleidi")
	valueFiles, err := filepath.Glob(filepath.Join(chart, "ci", "*.yaml"))
	if err != nil || len(valueFiles) == 0 {
		t.Fatalf("no ci/*.yaml in %s: %v", chart, err)
	}

	dir := workDir(t, "kleidi-e2e-deploy-")
	ps := newProcs(t)
	c := startCluster(t, ps, dir, `apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: ["secrets"]
    providers:
      - identity: {}
`)
	// Pod admission resolves the pod's service account, and the controller that creates "default" in every
	// namespace (kube-controller-manager) does not run here. The static pod names none, as a static pod must.
	_, err = c.cs.CoreV1().ServiceAccounts("kube-system").Create(context.Background(),
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}

	dryRun := func(t *testing.T, file string) string {
		t.Helper()
		out := deployRun(t, kubectl, "apply", "--dry-run=server", "--validate=strict",
			"--server="+c.apiURL, "--token="+c.token, "--insecure-skip-tls-verify=true", "-f", file)
		return out
	}

	render := func(t *testing.T, args ...string) string {
		t.Helper()
		out := deployRun(t, helm, append([]string{"template", "kleidi", chart, "--namespace", "kube-system"}, args...)...)
		var keep []string
		skipped := 0
		for _, doc := range strings.Split("\n"+out, "\n---") {
			// The prometheus-operator CRDs (ServiceMonitor, PodMonitor, PrometheusRule) are not installed in this bare apiserver, which
			// would refuse those kinds: only they are left out of the server dry run. The root module's
			// deploy tests check what the chart renders for it.
			if regexp.MustCompile(`(?m)^kind: (ServiceMonitor|PodMonitor|PrometheusRule)$`).MatchString(doc) {
				skipped++
				continue
			}
			if strings.TrimSpace(doc) != "" {
				keep = append(keep, doc)
			}
		}
		if skipped > 0 {
			t.Logf("left %d prometheus-operator objects out of the server dry run (no CRD)", skipped)
		}
		file := filepath.Join(t.TempDir(), "rendered.yaml")
		writeFile(t, file, strings.Join(keep, "\n---")+"\n", 0o644)
		return file
	}

	check := func(t *testing.T, out string, want ...string) {
		t.Helper()
		for _, w := range want {
			if !strings.Contains(out, w+" created (server dry run)") {
				t.Errorf("kubectl apply --dry-run=server did not create %s:\n%s", w, out)
			}
		}
		t.Logf("%s", strings.TrimSpace(out))
	}

	t.Run("helm-defaults", func(t *testing.T) {
		out := dryRun(t, render(t))
		check(t, out, "serviceaccount/kleidi", "service/kleidi-metrics", "daemonset.apps/kleidi")
	})
	for _, f := range valueFiles {
		t.Run("helm-"+strings.TrimSuffix(filepath.Base(f), ".yaml"), func(t *testing.T) {
			out := dryRun(t, render(t, "-f", f))
			check(t, out, "serviceaccount/kleidi", "daemonset.apps/kleidi")
		})
	}
	t.Run("static-pod", func(t *testing.T) {
		out := dryRun(t, filepath.Join(repoRoot, "deploy", "static-pod", "kleidi.yaml"))
		check(t, out, "pod/kleidi")
	})

	// The single-node TPM variant: valid once its tss gid placeholder is replaced, refused before.
	t.Run("static-pod-tpm", func(t *testing.T) {
		b, err := os.ReadFile(filepath.Join(repoRoot, "deploy", "static-pod", "kleidi-tpm.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		file := filepath.Join(t.TempDir(), "kleidi-tpm.yaml")
		writeFile(t, file, strings.ReplaceAll(string(b), "TSS_GID", "110"), 0o644)
		check(t, dryRun(t, file), "pod/kleidi")
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		out, err := run(ctx, nil, kubectl, "apply", "--dry-run=server", "--validate=strict",
			"--server="+c.apiURL, "--token="+c.token, "--insecure-skip-tls-verify=true",
			"-f", filepath.Join(repoRoot, "deploy", "static-pod", "kleidi-tpm.yaml"))
		if err == nil || !strings.Contains(out, "supplementalGroups") {
			t.Errorf("kleidi-tpm.yaml with its TSS_GID placeholder: want a refusal naming supplementalGroups, got %v:\n%s", err, out)
		}
	})

	// The dry run does validate: the same pod with an invalid uid and a misspelt field is refused.
	t.Run("refuses-invalid", func(t *testing.T) {
		b, err := os.ReadFile(filepath.Join(repoRoot, "deploy", "static-pod", "kleidi.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		for _, bad := range []struct{ from, to, want string }{
			{"runAsUser: 65532", "runAsUser: -1", "runAsUser"},
			{"readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true", "unknown field"},
		} {
			file := filepath.Join(t.TempDir(), "bad.yaml")
			writeFile(t, file, strings.Replace(string(b), bad.from, bad.to, 1), 0o644)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			out, err := run(ctx, nil, kubectl, "apply", "--dry-run=server", "--validate=strict",
				"--server="+c.apiURL, "--token="+c.token, "--insecure-skip-tls-verify=true", "-f", file)
			cancel()
			if err == nil || !strings.Contains(out, bad.want) {
				t.Errorf("%s: want a refusal naming %q, got %v:\n%s", bad.to, bad.want, err, out)
			}
		}
	})
}

// deployHelm finds helm on PATH or in $(go env GOPATH)/bin, where go install puts it.
func deployHelm(t testing.TB) string {
	t.Helper()
	if p, err := exec.LookPath("helm"); err == nil {
		return p
	}
	if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
		p := filepath.Join(strings.TrimSpace(string(out)), "bin", "helm")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	t.Fatal("helm not found on PATH or in $(go env GOPATH)/bin: install it with `go install helm.sh/helm/v3/cmd/helm@v3.22.0`")
	return ""
}

// deployRun runs a command with a 2 minute limit and fails the test on error.
func deployRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := run(ctx, nil, append([]string{name}, args...)...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
	}
	return out
}

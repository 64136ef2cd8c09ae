// Tests of the deployment files in this directory: the Helm chart renders and lints for every ci/*.yaml with
// the security settings every variant must keep, the static pod manifest keeps the same settings, the
// systemd unit verifies, and a CGO_ENABLED=0 build of kleidi-server (the Containerfile's build) serves with
// the gpg and the tpm provider, as the non-root uid the manifests use.
//
// The tests are split by concern: binary_test.go (the static binary as the manifests run it),
// container_test.go, staticpod_test.go, systemd_test.go, helm_test.go and chart_*_test.go (the chart), host_*
// (kubeadm and several nodes), observability_test.go (alerts and dashboard), operator_chart_test.go (the
// operator's chart and its alerts), images_test.go (the FROM scratch images, run with podman); helpers_test.go
// holds what they share.
//
// They need helm (go install helm.sh/helm/v3/cmd/helm@v3.22.0), swtpm, gnupg and podman; systemd-analyze is used
// where it exists. The same manifests are validated by a real kube-apiserver in test/e2e/deploy_test.go.
package deploy_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// run runs a command with a time limit and returns its combined output.
func run(t testing.TB, timeout time.Duration, dir string, env []string, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("%w (timed out after %s)", err, timeout)
	}
	return string(out), err
}

func mustRun(t testing.TB, dir string, name string, args ...string) string {
	t.Helper()
	out, err := run(t, 5*time.Minute, dir, nil, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// helmBin finds helm on PATH or in $(go env GOPATH)/bin, where go install puts it.
func helmBin(t testing.TB) string {
	t.Helper()
	if p, err := exec.LookPath("helm"); err == nil {
		return p
	}
	if gopath, err := run(t, time.Minute, "", nil, "go", "env", "GOPATH"); err == nil {
		p := filepath.Join(strings.TrimSpace(gopath), "bin", "helm")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	t.Fatal("helm not found on PATH or in $(go env GOPATH)/bin: install it with `go install helm.sh/helm/v3/cmd/helm@v3.22.0`")
	return ""
}

func ciValueFiles(t testing.TB) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(chartDir, "ci", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no ci/*.yaml in %s: %v", chartDir, err)
	}
	return files
}

// manifest is one document of a YAML stream.
type manifest struct {
	kind, name, text string
}

// splitManifests splits a YAML stream at its "---" lines, dropping documents with no kind.
func splitManifests(stream string) []manifest {
	var out []manifest
	for doc := range strings.SplitSeq("\n"+stream, "\n---") {
		k := kindRe.FindStringSubmatch(doc)
		if k == nil {
			continue
		}
		m := manifest{kind: k[1], text: doc + "\n"}
		if n := nameRe.FindStringSubmatch(doc); n != nil {
			m.name = n[1]
		}
		out = append(out, m)
	}
	return out
}

func byKind(ms []manifest, kind string) []manifest {
	var out []manifest
	for _, m := range ms {
		if m.kind == kind {
			out = append(out, m)
		}
	}
	return out
}

// mustMatch fails unless re matches text at least n times.
func mustMatch(t testing.TB, what, text, re string, n int) {
	t.Helper()
	if got := len(regexp.MustCompile(re).FindAllString(text, -1)); got < n {
		t.Errorf("%s: want %d or more matches of %q, got %d", what, n, re, got)
	}
}

func mustNotMatch(t testing.TB, what, text, re string) {
	t.Helper()
	if m := regexp.MustCompile(re).FindString(text); m != "" {
		t.Errorf("%s: unexpected %q", what, m)
	}
}

// checkPodSecurity asserts the settings every pod of kleidi keeps, at pod and container level.
func checkPodSecurity(t testing.TB, what, text string) {
	t.Helper()
	mustMatch(t, what, text, `runAsNonRoot: true`, 2)
	mustMatch(t, what, text, `readOnlyRootFilesystem: true`, 1)
	mustMatch(t, what, text, `allowPrivilegeEscalation: false`, 1)
	mustMatch(t, what, text, `capabilities:\s*\n\s+drop:\s*\n\s+- ALL\n`, 1)
	mustMatch(t, what, text, `seccompProfile:\s*\n\s+type: RuntimeDefault\n`, 2)
	mustMatch(t, what, text, `runAsUser: 65532\n`, 2)
	mustMatch(t, what, text, `runAsGroup: 65532\n`, 2)
	for _, m := range regexp.MustCompile(`(?:runAsUser|runAsGroup|fsGroup): (\S+)`).FindAllStringSubmatch(text, -1) {
		if m[1] != strconv.Itoa(pluginID) {
			t.Errorf("%s: %s, want %d", what, m[0], pluginID)
		}
	}
	mustNotMatch(t, what, text, `privileged: true`)
	mustNotMatch(t, what, text, `capabilities:\s*\n\s+add:`)
	mustNotMatch(t, what, text, `hostPID: true|hostIPC: true`)
	// The socket and state directories come from the host, prepared for the non-root uid.
	mustMatch(t, what, text, `hostPath:\s*\n\s+path: /var/run/kleidi\n\s+type: Directory\n`, 1)
	mustMatch(t, what, text, `hostPath:\s*\n\s+path: /var/lib/kleidi\n\s+type: Directory\n`, 1)
	mustMatch(t, what, text, `- --listen=unix:///var/run/kleidi/kms.sock\n`, 1)
	mustMatch(t, what, text, `- --state-dir=/var/lib/kleidi\n`, 1)
	mustMatch(t, what, text, `- --socket-mode=0600\n`, 1)
	// Probes on the HTTP endpoints.
	mustMatch(t, what, text, `livenessProbe:\s*\n\s+httpGet:\s*\n(?:\s+host: .*\n)?\s+path: /livez\n`, 1)
	mustMatch(t, what, text, `readinessProbe:\s*\n\s+httpGet:\s*\n(?:\s+host: .*\n)?\s+path: /readyz\n`, 1)
	mustMatch(t, what, text, `resources:\s*\n\s+(?:limits|requests):`, 1)
}

func httpGet(addr, path string) (int, string, error) {
	c := http.Client{Timeout: 3 * time.Second}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func keyID(status string) string {
	if m := regexp.MustCompile(`key_id:\s*(\S+)`).FindStringSubmatch(status); m != nil {
		return m[1]
	}
	return ""
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

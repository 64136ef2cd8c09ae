// Tests of the deployment files in this directory: the Helm chart renders and lints for every ci/*.yaml with
// the security settings every variant must keep, the static pod manifest keeps the same settings, the
// systemd unit verifies, and a CGO_ENABLED=0 build of kleidi-server (the Containerfile's build) serves with
// the gpg and the tpm provider, as the non-root uid the manifests use.
//
// They need helm (go install helm.sh/helm/v3/cmd/helm@v3.22.0), swtpm and gnupg; systemd-analyze is used
// where it exists. The same manifests are validated by a real kube-apiserver in test/e2e/deploy_test.go.
package deploy_test

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The uid and gid of every manifest here and of the image's USER.
const pluginID = 65532

var (
	deployDir = func() string {
		wd, err := os.Getwd()
		if err != nil {
			panic(err)
		}
		return wd
	}()
	repoRoot = filepath.Dir(deployDir)
	chartDir = filepath.Join(deployDir, "helm", "kleidi")
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

var (
	kindRe = regexp.MustCompile(`(?m)^kind:\s*(\S+)`)
	nameRe = regexp.MustCompile(`(?m)^metadata:\s*\n(?:\s+.*\n)*?\s+name:\s*(\S+)`)
)

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

// staticPod reads a manifest of deploy/static-pod and checks what every static pod of kleidi keeps.
func staticPod(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(deployDir, "static-pod", name))
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	if strings.Contains(text, "\t") {
		t.Fatalf("%s: tab characters in YAML", name)
	}
	ms := splitManifests(text)
	if len(ms) != 1 || ms[0].kind != "Pod" || ms[0].name != "kleidi" {
		t.Fatalf("%s: want exactly one Pod named kleidi, got %+v", name, ms)
	}
	checkPodSecurity(t, name, text)
	mustMatch(t, name, text, `(?m)^apiVersion: v1$`, 1)
	mustMatch(t, name, text, `\n  namespace: kube-system\n`, 1)
	// The kubelet starts a static pod before any CNI plugin: host network, endpoints on loopback only.
	mustMatch(t, name, text, `\n  hostNetwork: true\n`, 1)
	mustMatch(t, name, text, `- --http-addr=127\.0\.0\.1:8787\n`, 1)
	mustMatch(t, name, text, `host: 127\.0\.0\.1\n`, 3)
	mustMatch(t, name, text, `priorityClassName: system-node-critical`, 1)
	// A static pod may not reference API objects, and nothing the plugin needs at start may come from the API.
	mustNotMatch(t, name, text, `(?m)^\s+(secret|configMap|serviceAccountName|persistentVolumeClaim|projected):`)
	// No hostPath is created by the kubelet (as root), and no device is pretended to open through a hostPath.
	mustNotMatch(t, name, text, `type: (DirectoryOrCreate|FileOrCreate)`)
	mustNotMatch(t, name, text, `path: /dev/|type: CharDevice`)
	return text
}

// TestStaticPod checks the shipped static pod: the gpg provider with keys from host files, safe to copy to
// every control-plane node, and no TPM.
func TestStaticPod(t *testing.T) {
	text := staticPod(t, "kleidi.yaml")
	mustMatch(t, "kleidi.yaml", text, `(?m)^        - --provider=gpg$`, 1)
	mustNotMatch(t, "kleidi.yaml", text, `(?m)^\s*- --(provider=tpm|tpm)`)
	mustNotMatch(t, "kleidi.yaml", text, `supplementalGroups`)
	for _, f := range []string{"public.asc", "private.asc", "passphrase"} {
		mustMatch(t, "kleidi.yaml", text, `(?m)^        - --gpg-[a-z-]+=/etc/kleidi/gpg/`+regexp.QuoteMeta(f)+`$`, 1)
	}
	mustMatch(t, "kleidi.yaml", text, `- name: gpg-keys\n\s+mountPath: /etc/kleidi/gpg\n\s+readOnly: true\n`, 1)
	mustMatch(t, "kleidi.yaml", text, `hostPath:\s*\n\s+path: /etc/kleidi/gpg\n\s+type: Directory\n`, 1)
}

// TestStaticPodTPM checks the single-node TPM variant: its tss gid is a placeholder that must be substituted,
// and the device comes from the runtime through CDI, never from a hostPath.
func TestStaticPodTPM(t *testing.T) {
	text := staticPod(t, "kleidi-tpm.yaml")
	mustMatch(t, "kleidi-tpm.yaml", text, `(?m)^        - --provider=tpm$`, 1)
	mustMatch(t, "kleidi-tpm.yaml", text, `(?m)^        - --tpm=/dev/tpmrm0$`, 1)
	mustMatch(t, "kleidi-tpm.yaml", text, `supplementalGroups:\s*\n\s+- TSS_GID\n`, 1)
	mustMatch(t, "kleidi-tpm.yaml", text, `sed "s/TSS_GID/\$gid/g"`, 1)
	mustNotMatch(t, "kleidi-tpm.yaml", text, `(?m)^\s+- \d+$`) // no gid of some distribution's own

	// The CDI spec names the device the pod's annotation asks for, with the same placeholder as its group.
	cdi, err := os.ReadFile(filepath.Join(deployDir, "static-pod", "tpm-cdi.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	kind := regexp.MustCompile(`(?m)^kind: (\S+)$`).FindStringSubmatch(string(cdi))
	dev := regexp.MustCompile(`(?m)^  - name: (\S+)$`).FindStringSubmatch(string(cdi))
	if kind == nil || dev == nil {
		t.Fatalf("tpm-cdi.yaml: no kind or device name:\n%s", cdi)
	}
	mustMatch(t, "kleidi-tpm.yaml", text, `(?m)^    cdi\.k8s\.io/[a-z0-9-]+: `+regexp.QuoteMeta(kind[1]+"="+dev[1])+`$`, 1)
	mustMatch(t, "tpm-cdi.yaml", string(cdi), `(?m)^cdiVersion: 0\.[6-9]\.\d+$`, 1)
	mustMatch(t, "tpm-cdi.yaml", string(cdi), `path: /dev/tpmrm0\n(?:\s+\S.*\n)*?\s+gid: TSS_GID\n`, 1)

	// Apart from the provider, the device and the group, both static pods are the same.
	plain := staticPod(t, "kleidi.yaml")
	strip := regexp.MustCompile(`(?m)^\s*#.*\n|^\s*- --(provider|tpm|gpg-[a-z-]+)=.*\n`)
	for _, probe := range []string{"startupProbe", "livenessProbe", "readinessProbe", "resources", "securityContext:\n        runAsNonRoot"} {
		re := regexp.MustCompile(`(?s)` + probe + `.*?\n      [a-z]`)
		a, b := re.FindString(strip.ReplaceAllString(plain, "")), re.FindString(strip.ReplaceAllString(text, ""))
		if a == "" || a != b {
			t.Errorf("%s differs between kleidi.yaml and kleidi-tpm.yaml:\n%s\n---\n%s", probe, a, b)
		}
	}
}

func TestTmpfiles(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(deployDir, "tmpfiles.d", "kleidi.conf"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	mustMatch(t, "tmpfiles.d", text, `(?m)^d\s+/run/kleidi\s+0750\s+65532\s+65532\s+-$`, 1)
	mustMatch(t, "tmpfiles.d", text, `(?m)^d\s+/var/lib/kleidi\s+0700\s+65532\s+65532\s+-$`, 1)
	if p, err := exec.LookPath("systemd-tmpfiles"); err == nil {
		// --cat-config-free check: parse the file under a scratch root without creating anything in /.
		root := t.TempDir()
		out, err := run(t, time.Minute, "", nil, p, "--root="+root, "--create", filepath.Join(deployDir, "tmpfiles.d", "kleidi.conf"))
		if err != nil && os.Geteuid() == 0 {
			t.Errorf("systemd-tmpfiles --create under a scratch root: %v\n%s", err, out)
		}
		if os.Geteuid() == 0 {
			for _, d := range []string{"run/kleidi", "var/lib/kleidi"} {
				fi, err := os.Stat(filepath.Join(root, d))
				if err != nil {
					t.Errorf("systemd-tmpfiles did not create /%s: %v\n%s", d, err, out)
					continue
				}
				if st := fi.Sys().(*syscall.Stat_t); st.Uid != pluginID || st.Gid != pluginID {
					t.Errorf("/%s is owned by %d:%d, want %d:%d", d, st.Uid, st.Gid, pluginID, pluginID)
				}
			}
		}
	}
}

// TestSystemdUnit verifies the unit, alone and with its drop-ins, with systemd-analyze where it exists, and rates
// its sandboxing.
func TestSystemdUnit(t *testing.T) {
	unitPath := filepath.Join(deployDir, "systemd", "kleidi.service")
	b, err := os.ReadFile(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	for _, re := range []string{
		`(?m)^User=kleidi$`, `(?m)^Group=kleidi$`, `(?m)^ProtectSystem=strict$`,
		`(?m)^StateDirectory=kleidi$`, `(?m)^RuntimeDirectory=kleidi$`, `(?m)^RuntimeDirectoryPreserve=yes$`,
		`(?m)^NoNewPrivileges=yes$`, `(?m)^CapabilityBoundingSet=$`, `(?m)^Before=kubelet.service$`,
		`(?m)^WantedBy=.*\bkubelet.service\b`, `(?m)^EnvironmentFile=/etc/kleidi/kleidi.env$`,
		`(?m)^ExecStart=/usr/local/bin/kleidi-server serve$`, `(?m)^DevicePolicy=closed$`,
		`(?m)^IPAddressDeny=any$`, `(?m)^IPAddressAllow=localhost$`,
		// Restarted for ever: a TPM driver late at boot must not leave the plugin dead (a [Unit] setting).
		`(?m)^\[Unit\]\n(?:[^\[].*\n|\n)*StartLimitIntervalSec=0\n`, `(?m)^Restart=always$`,
	} {
		mustMatch(t, "kleidi.service", unit, re, 1)
	}
	// The TPM's group, device and ordering belong to the tpm drop-in only: a host without a tss group would fail
	// every start with 216/GROUP.
	mustNotMatch(t, "kleidi.service", unit, `(?m)^[^#\n]*(tss|tpmrm0|TPM)`)
	tpmConf, err := os.ReadFile(filepath.Join(deployDir, "systemd", "tpm.conf"))
	if err != nil {
		t.Fatal(err)
	}
	for _, re := range []string{
		`(?m)^\[Unit\]\n(?:#.*\n)*Wants=dev-tpmrm0.device\nAfter=dev-tpmrm0.device\n`, `(?m)^SupplementaryGroups=tss$`,
		`(?m)^DeviceAllow=/dev/tpmrm0 rw$`,
	} {
		mustMatch(t, "tpm.conf", string(tpmConf), re, 1)
	}
	mustNotMatch(t, "tpm.conf", string(tpmConf), `(?m)^Requires=`)
	remote, err := os.ReadFile(filepath.Join(deployDir, "systemd", "remote-metrics.conf"))
	if err != nil {
		t.Fatal(err)
	}
	mustMatch(t, "remote-metrics.conf", string(remote), `(?m)^\[Service\]\nIPAddressAllow=\S+$`, 1)
	sysusers, err := os.ReadFile(filepath.Join(deployDir, "systemd", "kleidi.sysusers"))
	if err != nil {
		t.Fatal(err)
	}
	mustMatch(t, "kleidi.sysusers", string(sysusers), `(?m)^u kleidi 65532 `, 1)

	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Log("systemd-analyze is not available on this machine: the unit was checked by the rules above only")
		return
	}
	// systemd-analyze verify fails on an ExecStart binary that does not exist, and kleidi-server is not
	// installed here: verify a copy whose ExecStart names an executable stand-in, with nothing else changed.
	dir := t.TempDir()
	stand := filepath.Join(dir, "kleidi-server")
	if err := os.WriteFile(stand, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	copyPath := filepath.Join(dir, "kleidi.service")
	if err := os.WriteFile(copyPath, []byte(strings.Replace(unit, "ExecStart=/usr/local/bin/kleidi-server", "ExecStart="+stand, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	verify := func(what string) string {
		t.Helper()
		out, err := run(t, time.Minute, dir, nil, analyze, "verify", copyPath)
		if err != nil || strings.TrimSpace(out) != "" {
			// Unknown or misspelt directives are only warnings to systemd; they fail here.
			t.Fatalf("systemd-analyze verify, %s: %v\n%s", what, err, out)
		}
		t.Logf("systemd-analyze verify, %s: no findings", what)
		out, err = run(t, time.Minute, dir, nil, analyze, "security", "--offline=yes", "--no-pager", copyPath)
		m := regexp.MustCompile(`Overall exposure level for kleidi.service: ([0-9.]+)`).FindStringSubmatch(out)
		if err != nil || m == nil {
			t.Logf("systemd-analyze security --offline is not supported here (%v); skipped the exposure rating", err)
			return ""
		}
		if level, _ := strconv.ParseFloat(m[1], 64); level > 2.0 {
			t.Errorf("systemd-analyze security, %s: exposure %s, want 2.0 or less:\n%s", what, m[1], out)
		}
		t.Logf("systemd-analyze security, %s: exposure %s", what, m[1])
		return out
	}
	verify("the unit alone")

	// With both drop-ins where systemctl finds them (kleidi.service.d beside the unit).
	dropins := filepath.Join(dir, "kleidi.service.d")
	if err := os.Mkdir(dropins, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, text := range map[string][]byte{"tpm.conf": tpmConf, "remote-metrics.conf": remote} {
		if err := os.WriteFile(filepath.Join(dropins, name), text, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	verify("with tpm.conf and remote-metrics.conf")
	// The drop-ins were read: a misspelt directive in one of them is found.
	if err := os.WriteFile(filepath.Join(dropins, "tpm.conf"), append(slices.Clone(tpmConf), "SupplementaryGroup=tss\n"...), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, _ := run(t, time.Minute, dir, nil, analyze, "verify", copyPath); !strings.Contains(out, "SupplementaryGroup") {
		t.Errorf("systemd-analyze verify did not read the drop-in: %s", out)
	}
}

func TestContainerfile(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(deployDir, "Containerfile"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	froms := regexp.MustCompile(`(?m)^FROM .*$`).FindAllString(text, -1)
	if len(froms) < 2 {
		t.Errorf("want a multi-stage build, got %d FROM lines", len(froms))
	}
	// Every base pinned by digest, its tag kept beside it for the reader.
	for _, f := range froms {
		if !regexp.MustCompile(`^FROM (?:--platform=\S+ )?\S+:[\w.-]+@sha256:[0-9a-f]{64}(?: AS [\w-]+)?$`).MatchString(f) {
			t.Errorf("Containerfile: %q is not pinned as name:tag@sha256:digest", f)
		}
	}
	// The build stage runs on the build host and cross-compiles for the target.
	mustMatch(t, "Containerfile", text, `(?m)^FROM --platform=\$BUILDPLATFORM \S+ AS build$`, 1)
	mustMatch(t, "Containerfile", text, `(?m)^ARG TARGETOS\b`, 1)
	mustMatch(t, "Containerfile", text, `(?m)^ARG TARGETARCH$`, 1)
	mustMatch(t, "Containerfile", text, `GOOS=\$\{TARGETOS\} GOARCH=\$\{TARGETARCH\}`, 1)
	mustMatch(t, "Containerfile", text, `CGO_ENABLED=0`, 1)
	mustMatch(t, "Containerfile", text, `(?m)go -C examples/kleidi-server build -trimpath .* \.$`, 1)
	mustMatch(t, "Containerfile", text, `(?m)^FROM gcr.io/distroless/static\S*:nonroot@sha256:[0-9a-f]{64}$`, 1)
	for _, label := range []string{"title", "description", "source", "version", "revision", "documentation"} {
		mustMatch(t, "Containerfile", text, `org\.opencontainers\.image\.`+label+`="[^"]+"`, 1)
	}
	mustMatch(t, "Containerfile", text, `(?m)^USER 65532:65532$`, 1)
	mustMatch(t, "Containerfile", text, `(?m)^COPY --from=build /out/kleidi-server /usr/local/bin/kleidi-server$`, 1)
	mustMatch(t, "Containerfile", text, `(?m)^ENTRYPOINT \["/usr/local/bin/kleidi-server"\]$`, 1)

	// The cgo target: CGO_ENABLED=1 with OpenSSL's headers (the TPM simulator) on a glibc base with libstdc++
	// (C++ PKCS#11 modules), the same user and entrypoint. The static image stays the default: the last stage.
	stages := regexp.MustCompile(`(?m)^FROM `).Split(text, -1)[1:]
	stage := func(name string) string {
		for _, st := range stages {
			if strings.HasSuffix(strings.SplitN(st, "\n", 2)[0], " AS "+name) {
				return st
			}
		}
		t.Fatalf("Containerfile: no stage %s", name)
		return ""
	}
	buildCgo := stage("build-cgo")
	mustMatch(t, "Containerfile build-cgo", buildCgo, `libssl-dev`, 1)
	mustMatch(t, "Containerfile build-cgo", buildCgo, `CGO_ENABLED=1 \\\n\s+go -C examples/kleidi-server build -trimpath -ldflags="-s -w" -o /out/kleidi-server \.\n`, 1)
	mustNotMatch(t, "Containerfile build-cgo", buildCgo, `CGO_ENABLED=0`)
	cgo := stage("cgo")
	mustMatch(t, "Containerfile cgo", cgo, `^gcr.io/distroless/cc-debian12:nonroot@sha256:[0-9a-f]{64} AS cgo\n`, 1)
	mustMatch(t, "Containerfile cgo", cgo, `(?m)^COPY --from=build-cgo /out/kleidi-server /usr/local/bin/kleidi-server$`, 1)
	mustMatch(t, "Containerfile cgo", cgo, `(?m)^USER 65532:65532$`, 1)
	mustMatch(t, "Containerfile cgo", cgo, `(?m)^ENTRYPOINT \["/usr/local/bin/kleidi-server"\]$`, 1)
	for _, label := range []string{"title", "description", "source", "version", "revision", "documentation"} {
		mustMatch(t, "Containerfile cgo", cgo, `org\.opencontainers\.image\.`+label+`="[^"]+"`, 1)
	}
	last := stages[len(stages)-1]
	mustMatch(t, "Containerfile last stage", last, `^gcr.io/distroless/static\S*:nonroot@sha256:[0-9a-f]{64}\n`, 1)
	mustMatch(t, "Containerfile last stage", last, `(?m)^COPY --from=build /out/kleidi-server `, 1)
	mustMatch(t, "Containerfile", text, `--target cgo -t ghcr\.io/kleidi-kms/kleidi:0\.1\.0-cgo`, 1)

	// .containerignore keeps the context to the root module's Go sources, and keeps every package the build reads.
	ig, err := os.ReadFile(filepath.Join(repoRoot, ".containerignore"))
	if err != nil {
		t.Fatal(err)
	}
	rules := string(ig)
	for _, re := range []string{`(?m)^\*$`, `(?m)^!\*\*/go\.mod$`, `(?m)^!\*\*/go\.sum$`, `(?m)^!\*\*/\*\.go$`, `(?m)^\*\*/\*_test\.go$`} {
		mustMatch(t, ".containerignore", rules, re, 1)
	}
	out := mustRun(t, filepath.Join(repoRoot, "examples", "kleidi-server"), "go", "list", "-deps", "-f", "{{if not .Standard}}{{.Dir}}{{end}}", ".")
	for dir := range strings.SplitSeq(strings.TrimSpace(out), "\n") {
		rel, err := filepath.Rel(repoRoot, dir)
		if err != nil || strings.HasPrefix(rel, "..") {
			continue // a dependency from the module cache
		}
		for _, m := range regexp.MustCompile(`(?m)^([a-z][^*!\n]*)/$`).FindAllStringSubmatch(rules, -1) {
			if rel == m[1] || strings.HasPrefix(rel, m[1]+"/") {
				t.Errorf(".containerignore leaves out %s, which the build reads", rel)
			}
		}
	}
}

// distrolessCCLibs are the shared libraries gcr.io/distroless/cc-debian12 ships (glibc, libgcc, libstdc++, OpenSSL),
// the base of the Containerfile's cgo target.
var distrolessCCLibs = []string{"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libresolv.so.2",
	"ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "libgcc_s.so.1", "libstdc++.so.6", "libssl.so.3", "libcrypto.so.3"}

// TestContainerfileCgoBuild builds kleidi-server as the Containerfile's cgo target does (no registry is reachable
// here, so not the image itself), checks that it needs no shared library its distroless/cc base lacks, nor does
// SoftHSM's PKCS#11 module, and that it runs what the static image cannot: the in-process TPM simulator, served as
// the image's non-root uid, and the pkcs11 provider.
func TestContainerfileCgoBuild(t *testing.T) {
	dir, err := os.MkdirTemp("", "kleidi-deploy-cgo-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "kleidi-server")
	out, err := run(t, 10*time.Minute, filepath.Join(repoRoot, "examples", "kleidi-server"), []string{"CGO_ENABLED=1"}, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, ".")
	if err != nil {
		t.Fatalf("CGO_ENABLED=1 go build (examples/kleidi-server): %v\n%s", err, out)
	}
	const softhsm = "/usr/lib/softhsm/libsofthsm2.so"
	for _, f := range []string{bin, softhsm} {
		libs := neededLibs(t, f)
		t.Logf("%s needs %v", filepath.Base(f), libs)
		for _, l := range libs {
			if !slices.Contains(distrolessCCLibs, l) {
				t.Errorf("%s needs %s, which distroless/cc-debian12 does not ship", f, l)
			}
		}
	}

	t.Run("tpm-simulator", func(t *testing.T) {
		n := newNode(t, bin)
		n.serve(t, nil, append(n.serveFlags(), "--provider=tpm", "--tpm=simulator"), nil)
	})

	// The cgo build gets as far as loading the module; the static one refuses before.
	t.Run("pkcs11", func(t *testing.T) {
		n := newNode(t, bin)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		missing := filepath.Join(n.dir, "missing-module.so")
		pin := filepath.Join(n.stateDir, "pin")
		if err := os.WriteFile(pin, []byte("5678\n"), 0o400); err != nil {
			t.Fatal(err)
		}
		n.chown(t, pin)
		out, err := n.command(ctx, "init", "--state-dir="+n.stateDir, "--provider=pkcs11", "--pkcs11-module="+missing,
			"--pkcs11-token=kleidi", "--pkcs11-key=kleidi", "--pkcs11-pin-file="+pin).CombinedOutput()
		if err == nil {
			t.Fatalf("init with a missing PKCS#11 module succeeded:\n%s", out)
		}
		if strings.Contains(string(out), "cgo") || !strings.Contains(string(out), "missing-module.so") {
			t.Errorf("init --provider pkcs11 in the cgo build: want an error naming the missing module, not cgo:\n%s", out)
		}
		t.Logf("init --provider pkcs11 (module missing): %s", lastLine(string(out)))
	})
}

// neededLibs returns the DT_NEEDED shared libraries of an ELF file and its program interpreter.
func neededLibs(t *testing.T, path string) []string {
	t.Helper()
	f, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	libs, err := f.ImportedLibraries()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			b, err := io.ReadAll(p.Open())
			if err != nil {
				t.Fatal(err)
			}
			libs = append(libs, filepath.Base(strings.TrimRight(string(b), "\x00")))
		}
	}
	return libs
}

// buildStatic builds examples/kleidi-server as the Containerfile does, into a directory every uid can read.
func buildStatic(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kleidi-deploy-bin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "kleidi-server")
	out, err := run(t, 10*time.Minute, filepath.Join(repoRoot, "examples", "kleidi-server"), []string{"CGO_ENABLED=0"}, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, ".")
	if err != nil {
		t.Fatalf("CGO_ENABLED=0 go build (examples/kleidi-server): %v\n%s", err, out)
	}
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Fatal("the CGO_ENABLED=0 build has a dynamic loader: it is not static")
		}
	}
	return bin
}

// node is the host side of a deployment: the state and socket directories, owned by the plugin's uid when the
// test runs as root, as deploy/tmpfiles.d/kleidi.conf makes them.
type node struct {
	bin, dir, stateDir, sockDir, sock, httpAddr string
	asPlugin                                    bool
}

func newNode(t *testing.T, bin string) *node {
	t.Helper()
	dir, err := os.MkdirTemp("", "kleidi-deploy-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	n := &node{bin: bin, dir: dir, stateDir: filepath.Join(dir, "lib"), sockDir: filepath.Join(dir, "run"), asPlugin: os.Geteuid() == 0}
	n.sock = filepath.Join(n.sockDir, "kms.sock")
	n.httpAddr = "127.0.0.1:" + strconv.Itoa(freePort(t))
	for d, mode := range map[string]os.FileMode{n.stateDir: 0o700, n.sockDir: 0o750} {
		if err := os.Mkdir(d, mode); err != nil {
			t.Fatal(err)
		}
		n.chown(t, d)
	}
	return n
}

func (n *node) chown(t testing.TB, path string) {
	t.Helper()
	if n.asPlugin {
		if err := os.Chown(path, pluginID, pluginID); err != nil {
			t.Fatal(err)
		}
	}
}

// command runs kleidi-server as the plugin's uid and gid (when the test is root), with extra supplementary groups.
func (n *node) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, n.bin, args...)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + n.dir}
	if n.asPlugin {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: pluginID, Gid: pluginID, Groups: []uint32{}}}
	}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// serveFlags are the flags of `kleidi-server serve` the manifests pass, for this node.
func (n *node) serveFlags() []string {
	return []string{
		"--listen=unix://" + n.sock,
		"--socket-mode=0600",
		"--state-dir=" + n.stateDir,
		"--http-addr=" + n.httpAddr,
		"--log-format=json",
		"--log-level=info",
		"--audit-log=-",
	}
}

// init runs kleidi-server init with env and args on the node's state directory, as docs/install.md says to once
// per node before the first start.
func (n *node) init(t *testing.T, env []string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := n.command(ctx, append([]string{"init", "--state-dir=" + n.stateDir}, args...)...)
	cmd.Env = append(cmd.Env, env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("kleidi-server init: %v\n%s", err, out)
	}
}

// serve starts kleidi-server serve with env and args (after "serve"), waits until it is ready, checks its
// endpoints and socket, rotates its key as docs/install.md says (rotate with env and rotateArgs; none when
// rotateArgs is nil), and stops it.
func (n *node) serve(t *testing.T, env, args, rotateArgs []string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := n.command(ctx, append([]string{"serve"}, args...)...)
	cmd.Env = append(cmd.Env, env...)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			return err
		case <-time.After(20 * time.Second):
			cancel()
			return errors.New("no exit within 20 s of SIGTERM")
		}
	}
	t.Cleanup(func() {
		stop()
		cancel()
		if t.Failed() {
			t.Logf("kleidi-server output:\n%s", logs.String())
		}
	})

	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case err := <-done:
			stopped = true
			t.Fatalf("kleidi-server serve exited: %v\n%s", err, logs.String())
		default:
		}
		if code, _, err := httpGet(n.httpAddr, "/readyz"); err == nil && code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("kleidi-server not ready within 30 s\n%s", logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The probes of every manifest, and the socket kube-apiserver dials.
	for _, path := range []string{"/livez", "/readyz", "/healthz"} {
		code, body, err := httpGet(n.httpAddr, path)
		if err != nil || code != http.StatusOK {
			t.Errorf("GET %s: %d %q %v", path, code, body, err)
		}
	}
	fi, err := os.Lstat(n.sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket %s: mode %v, want a socket with mode 0600", n.sock, fi.Mode())
	}
	if st := fi.Sys().(*syscall.Stat_t); n.asPlugin && st.Uid != pluginID {
		t.Errorf("socket owned by uid %d, want %d", st.Uid, pluginID)
	}

	// status exits 0 only when the plugin is healthy.
	sctx, scancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer scancel()
	out, err := n.command(sctx, "status", "--listen=unix://"+n.sock).CombinedOutput()
	if err != nil {
		t.Fatalf("kleidi-server status: %v\n%s", err, out)
	}
	before := keyID(string(out))
	t.Logf("status: %s", strings.Join(strings.Fields(string(out)), " "))

	// Rotation: a new KEK in the keyring, which the running server reports within 10 s.
	rcmd := n.command(sctx, append([]string{"rotate"}, rotateArgs...)...)
	rcmd.Env = append(rcmd.Env, env...)
	if rotateArgs == nil {
		rcmd = nil // see tpm-swtpm
	}
	if rcmd != nil {
		if out, err := rcmd.CombinedOutput(); err != nil {
			t.Fatalf("kleidi-server rotate: %v\n%s", err, out)
		}
	}
	for deadline := time.Now().Add(20 * time.Second); rcmd != nil; {
		out, err := n.command(sctx, "status", "--listen=unix://"+n.sock).CombinedOutput()
		if err != nil {
			t.Fatalf("kleidi-server status after rotate: %v\n%s", err, out)
		}
		if after := keyID(string(out)); after != before && after != "" {
			t.Logf("rotated: key_id %s -> %s", before, after)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("key_id still %s 20 s after rotate", before)
		}
		time.Sleep(250 * time.Millisecond)
	}

	// SIGTERM: a clean exit that removes the socket.
	if err := stop(); err != nil {
		t.Fatalf("kleidi-server serve after SIGTERM: %v\n%s", err, logs.String())
	}
	if _, err := os.Lstat(n.sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket still there after SIGTERM: %v", err)
	}
	if strings.Contains(logs.String(), "BEGIN PGP PRIVATE KEY") {
		t.Error("the log holds a private key")
	}
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

// TestStaticBinary builds kleidi-server with CGO_ENABLED=0, as the Containerfile does, and serves with each
// provider as the image's non-root uid.
func TestStaticBinary(t *testing.T) {
	bin := buildStatic(t)

	t.Run("flags", func(t *testing.T) { checkFlags(t, bin) })

	t.Run("gpg", func(t *testing.T) {
		n := newNode(t, bin)
		pub, priv, pass := gpgKey(t, n)
		provider := []string{"--provider=gpg", "--gpg-public-key=" + pub, "--gpg-private-key=" + priv, "--gpg-passphrase-file=" + pass}
		n.init(t, nil, provider...)
		n.serve(t, nil, append(n.serveFlags(), provider...), append([]string{"--state-dir=" + n.stateDir}, provider...))
	})

	t.Run("tpm-swtpm", func(t *testing.T) {
		n := newNode(t, bin)
		addr := startSwtpm(t, n.dir)
		// swtpm serves one TCP client at a time and the running plugin is that client, so a second process
		// (rotate) cannot reach this TPM while it runs; /dev/tpmrm0 has no such limit. No rotation here.
		n.init(t, nil, "--provider=tpm", "--tpm=tcp://"+addr)
		n.serve(t, nil, append(n.serveFlags(), "--provider=tpm", "--tpm=tcp://"+addr), nil)
	})

	// The systemd unit's way: no flags, everything from deploy/systemd/kleidi.env as shipped (gpg; its paths moved
	// to this node), and rotate run with the same environment.
	t.Run("gpg-systemd-env", func(t *testing.T) {
		n := newNode(t, bin)
		pub, priv, pass := gpgKey(t, n)
		env := systemdEnv(t, false, map[string]string{
			"KLEIDI_LISTEN":              "unix://" + n.sock,
			"KLEIDI_STATE_DIR":           n.stateDir,
			"KLEIDI_HTTP_ADDR":           n.httpAddr,
			"KLEIDI_GPG_PUBLIC_KEY":      pub,
			"KLEIDI_GPG_PRIVATE_KEY":     priv,
			"KLEIDI_GPG_PASSPHRASE_FILE": pass,
		})
		n.init(t, env)
		n.serve(t, env, []string{}, []string{})
	})

	// kleidi.env switched to its TPM lines as its comments say, the TPM moved to a swtpm.
	t.Run("tpm-swtpm-systemd-env", func(t *testing.T) {
		n := newNode(t, bin)
		addr := startSwtpm(t, n.dir)
		env := systemdEnv(t, true, map[string]string{
			"KLEIDI_LISTEN":    "unix://" + n.sock,
			"KLEIDI_STATE_DIR": n.stateDir,
			"KLEIDI_HTTP_ADDR": n.httpAddr,
			"KLEIDI_TPM":       "tcp://" + addr,
		})
		n.init(t, env)
		n.serve(t, env, []string{}, nil)
	})

	t.Run("tpm-simulator-absent", func(t *testing.T) {
		n := newNode(t, bin)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := n.command(ctx, "serve", "--listen=unix://"+n.sock, "--state-dir="+n.stateDir,
			"--http-addr="+n.httpAddr, "--provider=tpm", "--tpm=simulator").CombinedOutput()
		if ctx.Err() != nil {
			t.Fatalf("serve --tpm simulator did not exit within 30 s:\n%s", out)
		}
		if err == nil {
			t.Fatalf("serve --tpm simulator in a CGO_ENABLED=0 build succeeded:\n%s", out)
		}
		if !strings.Contains(string(out), "cgo") {
			t.Errorf("serve --tpm simulator: the error does not say the simulator needs cgo:\n%s", out)
		}
		t.Logf("serve --tpm simulator: %v: %s", err, lastLine(string(out)))
	})
}

func keyID(status string) string {
	if m := regexp.MustCompile(`key_id:\s*(\S+)`).FindStringSubmatch(status); m != nil {
		return m[1]
	}
	return ""
}

// systemdEnv reads the active KEY=VALUE lines of deploy/systemd/kleidi.env, replacing the values of the keys in
// override (each of which must be there), as systemd's EnvironmentFile= does. With tpm, the file is first switched
// to the TPM as its comments say: the gpg lines commented out, the KLEIDI_PROVIDER=tpm and KLEIDI_TPM lines
// uncommented.
func systemdEnv(t *testing.T, tpm bool, override map[string]string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(deployDir, "systemd", "kleidi.env"))
	if err != nil {
		t.Fatal(err)
	}
	var env []string
	seen := map[string]bool{}
	for line := range strings.SplitSeq(string(b), "\n") {
		line = strings.TrimSpace(line)
		if tpm {
			switch {
			case strings.HasPrefix(line, "KLEIDI_PROVIDER=") || strings.HasPrefix(line, "KLEIDI_GPG_"):
				continue
			case strings.HasPrefix(line, "#KLEIDI_PROVIDER=tpm") || strings.HasPrefix(line, "#KLEIDI_TPM="):
				line = line[1:]
			}
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("kleidi.env: not KEY=VALUE: %q", line)
		}
		if o, ok := override[k]; ok {
			v, seen[k] = o, true
		}
		env = append(env, k+"="+v)
	}
	for k := range override {
		if !seen[k] {
			t.Fatalf("kleidi.env does not set %s", k)
		}
	}
	if want := map[bool]string{false: "KLEIDI_PROVIDER=gpg", true: "KLEIDI_PROVIDER=tpm"}[tpm]; !slices.Contains(env, want) {
		t.Fatalf("kleidi.env: no %s line to use", want)
	}
	return env
}

var flagRe = regexp.MustCompile(`(?m)^\s+-(?:-)?([a-z][a-z0-9-]*)`)

// checkFlags checks that every flag the manifests pass, and every KLEIDI_ variable of the systemd
// environment file, is one that kleidi-server serve knows.
func checkFlags(t *testing.T, bin string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	help, _ := exec.CommandContext(ctx, bin, "serve", "--help").CombinedOutput()
	var known []string
	for _, m := range flagRe.FindAllStringSubmatch(string(help), -1) {
		known = append(known, m[1])
	}
	if !slices.Contains(known, "listen") || !slices.Contains(known, "state-dir") {
		t.Fatalf("kleidi-server serve --help lists no --listen or --state-dir:\n%s", help)
	}

	var texts []string
	for _, f := range []string{filepath.Join(deployDir, "static-pod", "kleidi.yaml"), filepath.Join(chartDir, "templates", "daemonset.yaml")} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		texts = append(texts, string(b))
	}
	for _, text := range texts {
		for _, m := range regexp.MustCompile(`(?m)^\s*#?\s*- --([a-z][a-z0-9-]*)=`).FindAllStringSubmatch(text, -1) {
			if !slices.Contains(known, m[1]) {
				t.Errorf("a manifest passes --%s, which kleidi-server serve does not know", m[1])
			}
		}
	}
	env, err := os.ReadFile(filepath.Join(deployDir, "systemd", "kleidi.env"))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range regexp.MustCompile(`(?m)^#?KLEIDI_([A-Z0-9_]+)=`).FindAllStringSubmatch(string(env), -1) {
		flag := strings.ToLower(strings.ReplaceAll(m[1], "_", "-"))
		if !slices.Contains(known, flag) {
			t.Errorf("kleidi.env sets KLEIDI_%s, but kleidi-server serve has no --%s", m[1], flag)
		}
	}
}

// gpgKey makes an OpenPGP key pair with GnuPG and returns the armored public and private key files and the
// passphrase file.
func gpgKey(t *testing.T, n *node) (pub, priv, pass string) {
	t.Helper()
	if _, err := exec.LookPath("gpg"); err != nil {
		t.Fatal("gpg not found on PATH: install gnupg (apt-get install gnupg)")
	}
	home := filepath.Join(n.dir, "gnupg")
	if err := os.Mkdir(home, 0o700); err != nil {
		t.Fatal(err)
	}
	keys := filepath.Join(n.dir, "gpg")
	if err := os.Mkdir(keys, 0o750); err != nil {
		t.Fatal(err)
	}
	n.chown(t, keys)
	pass = filepath.Join(keys, "passphrase")
	if err := os.WriteFile(pass, []byte("deploy-test-passphrase\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	gpg := []string{"--homedir", home, "--batch", "--no-tty", "--pinentry-mode", "loopback", "--passphrase-file", pass}
	t.Cleanup(func() { run(t, time.Minute, "", nil, "gpgconf", "--homedir", home, "--kill", "all") })
	email := "deploy@kleidi.invalid"
	mustRun(t, "", "gpg", append(gpg, "--quick-generate-key", "kleidi deploy test <"+email+">", "future-default", "default", "never")...)
	pub = filepath.Join(keys, "public.asc")
	priv = filepath.Join(keys, "private.asc")
	for path, args := range map[string][]string{pub: {"--armor", "--export", email}, priv: {"--armor", "--export-secret-keys", email}} {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		out, err := exec.CommandContext(ctx, "gpg", append(gpg, args...)...).Output()
		cancel()
		if err != nil || len(out) == 0 {
			t.Fatalf("gpg %v: %v", args, err)
		}
		if err := os.WriteFile(path, out, 0o400); err != nil {
			t.Fatal(err)
		}
	}
	// As the chart's Secret volume gives them: root's files, readable by the plugin's group (fsGroup) only.
	for _, f := range []string{pub, priv, pass} {
		if err := os.Chmod(f, 0o440); err != nil {
			t.Fatal(err)
		}
		if n.asPlugin {
			if err := os.Chown(f, 0, pluginID); err != nil {
				t.Fatal(err)
			}
		}
	}
	return pub, priv, pass
}

// startSwtpm starts a swtpm process on two free loopback ports and returns its TPM command address.
func startSwtpm(t *testing.T, dir string) string {
	t.Helper()
	if _, err := exec.LookPath("swtpm"); err != nil {
		t.Fatal("swtpm not found on PATH: install swtpm and swtpm-tools (apt-get install swtpm swtpm-tools)")
	}
	state := filepath.Join(dir, "tpmstate")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	var port int
	for range 50 {
		port = freePort(t)
		if l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port+1)); err == nil {
			l.Close()
			break
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, "swtpm", "socket", "--tpm2",
		"--tpmstate", "dir="+state,
		"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port+1),
		"--flags", "not-need-init,startup-clear")
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		cmd.Wait()
	})
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return addr
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm not listening on %s within 15 s: %v\n%s", addr, err, logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

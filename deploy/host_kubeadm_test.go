package deploy_test

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// kubeadmBin returns kubeadm v1.37.2, built once by hack/kubeadm.sh into the cache outside the clone.
func kubeadmBin(t *testing.T) string {
	t.Helper()
	out, err := run(t, 20*time.Minute, repoRoot, nil, "bash", filepath.Join(repoRoot, "hack", "kubeadm.sh"))
	if err != nil {
		t.Fatalf("hack/kubeadm.sh: %v\n%s", err, out)
	}
	return lastLine(out)
}

// TestKubeadmConfig checks the kubeadm way of configuring kube-apiserver for kleidi: the shipped
// ClusterConfiguration is valid for kubeadm v1.37.2 and is the one docs/install.md shows, and kubeadm itself,
// as at init and at every upgrade, writes a kube-apiserver manifest with the EncryptionConfiguration, the socket
// directory as a hostPath of type Directory, and probes that leave the KMS plugin out.
func TestKubeadmConfig(t *testing.T) {
	dir := filepath.Join(deployDir, "static-pod", "kubeadm")
	cfgPath := filepath.Join(dir, "kubeadm-config.yaml")
	patchPath := filepath.Join(dir, "patches", "kube-apiserver+strategic.yaml")
	cfg, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	patch, err := os.ReadFile(patchPath)
	if err != nil {
		t.Fatal(err)
	}
	doc, err := os.ReadFile(filepath.Join(repoRoot, "docs", "install.md"))
	if err != nil {
		t.Fatal(err)
	}
	// The runbook shows these files as they are (without their leading comments), so what is tested is what a
	// reader types.
	for name, text := range map[string][]byte{"kubeadm-config.yaml": cfg, "kube-apiserver+strategic.yaml": patch} {
		body := regexp.MustCompile(`(?m)\A(?:#.*\n)+`).ReplaceAllString(string(text), "")
		if !strings.Contains(string(doc), body) {
			t.Errorf("docs/install.md does not show %s as shipped:\n%s", name, body)
		}
	}

	kubeadm := kubeadmBin(t)
	out, err := run(t, time.Minute, "", nil, kubeadm, "config", "validate", "--config", cfgPath)
	if err != nil {
		t.Fatalf("kubeadm config validate --config %s: %v\n%s", cfgPath, err, out)
	}
	t.Logf("kubeadm config validate: %s", strings.TrimSpace(out))

	// validate is strict: the v1beta3 map form of extraArgs is refused in v1beta4.
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	mapForm := regexp.MustCompile(`(?m)^  extraArgs:\n    - name: (\S+)\n      value: (\S+)\n`).ReplaceAllString(string(cfg), "  extraArgs:\n    $1: $2\n")
	if mapForm == string(cfg) {
		t.Fatal("kubeadm-config.yaml: no extraArgs in the v1beta4 list form")
	}
	if err := os.WriteFile(bad, []byte(mapForm), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := run(t, time.Minute, "", nil, kubeadm, "config", "validate", "--config", bad); err == nil {
		t.Errorf("kubeadm config validate accepted extraArgs as a map:\n%s", out)
	}

	// What kubeadm writes: the control-plane phase under a scratch root (--rootfs chroots into it), with the
	// patch in the directory the InitConfiguration names.
	root := t.TempDir()
	patchDir := regexp.MustCompile(`(?m)^  directory: (\S+)$`).FindStringSubmatch(string(cfg))
	if patchDir == nil {
		t.Fatal("kubeadm-config.yaml names no patches directory")
	}
	for path, text := range map[string][]byte{
		filepath.Join(root, "cfg", "kubeadm-config.yaml"):                 cfg,
		filepath.Join(root, patchDir[1], "kube-apiserver+strategic.yaml"): patch,
	} {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, text, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out, err = run(t, time.Minute, "", nil, kubeadm, "init", "phase", "control-plane", "apiserver",
		"--rootfs", root, "--config", "/cfg/kubeadm-config.yaml")
	if err != nil {
		t.Fatalf("kubeadm init phase control-plane apiserver: %v\n%s", err, out)
	}
	if !strings.Contains(out, `Applied patch of type "application/strategic-merge-patch+json" to target "kube-apiserver"`) {
		t.Errorf("kubeadm did not apply the patch:\n%s", out)
	}
	b, err := os.ReadFile(filepath.Join(root, "etc", "kubernetes", "manifests", "kube-apiserver.yaml"))
	if err != nil {
		t.Fatalf("kubeadm wrote no kube-apiserver.yaml: %v\n%s", err, out)
	}
	m := string(b)
	what := "kubeadm's kube-apiserver.yaml"
	mustMatch(t, what, m, `(?m)^    - --encryption-provider-config=/etc/kubernetes/enc/encryption-config\.yaml$`, 1)
	mustMatch(t, what, m, `(?m)^    - mountPath: /var/run/kleidi\n      name: kleidi\n`, 1)
	mustMatch(t, what, m, `(?m)^  - hostPath:\n      path: /var/run/kleidi\n      type: Directory\n    name: kleidi\n`, 1)
	mustMatch(t, what, m, `(?m)^  - hostPath:\n      path: /etc/kubernetes/enc\n      type: Directory\n    name: enc\n`, 1)
	for _, probe := range []string{"livenessProbe", "startupProbe"} {
		mustMatch(t, what, m, `(?m)^    `+probe+`:\n(?:      .*\n)*?        path: /livez\?exclude=kms-providers\n`, 1)
	}
	mustMatch(t, what, m, `(?m)^    readinessProbe:\n(?:      .*\n)*?        path: /readyz\n`, 1)
	if t.Failed() {
		t.Logf("%s:\n%s", what, m)
	}
}

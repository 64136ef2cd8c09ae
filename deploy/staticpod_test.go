package deploy_test

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

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

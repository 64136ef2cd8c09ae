package deploy_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Tests of the chart's refusals: values that would deadlock a cold start (keys from the API), a TPM that does
// not open in a non-privileged container, or a TPM root on several control-plane nodes; and of values it must
// accept: as a subchart, a pinned image digest, the cloud provider's uninitialized taint.

// TestChartRefusesKeysFromTheAPI checks that the chart reads nothing the plugin needs at start from the
// Kubernetes API unless the deadlock is acknowledged by name.
func TestChartRefusesKeysFromTheAPI(t *testing.T) {
	helm := helmBin(t)
	helmRefuses(t, helm, []struct {
		set  []string
		want string
	}{
		{[]string{"gpg.existingSecret=kleidi-gpg"}, "gpg.acknowledgeSecretColdStartDeadlock"},
		{[]string{"gpg.existingSecret=kleidi-gpg", "gpg.acknowledgeSecretColdStartDeadlock=false"}, "cold start"},
		{[]string{"extraEnv[0].name=KLEIDI_GPG_PASSPHRASE", "extraEnv[0].valueFrom.secretKeyRef.name=kleidi",
			"extraEnv[0].valueFrom.secretKeyRef.key=passphrase"}, "extraEnv KLEIDI_GPG_PASSPHRASE takes its value from a Secret"},
		{[]string{"extraEnv[0].name=X", "extraEnv[0].valueFrom.configMapKeyRef.name=kleidi",
			"extraEnv[0].valueFrom.configMapKeyRef.key=x"}, "from a Secret or ConfigMap"},
	})
	// With the acknowledgement, the Secret is mounted, and NOTES says why that is dangerous.
	out := mustRun(t, "", helm, "template", "kleidi", chartDir, "--set", "gpg.existingSecret=kleidi-gpg",
		"--set", "gpg.acknowledgeSecretColdStartDeadlock=true", "--show-only", "templates/daemonset.yaml")
	mustMatch(t, "DaemonSet", out, `secretName: kleidi-gpg\n`, 1)
	mustNotMatch(t, "DaemonSet", out, `path: /etc/kleidi/gpg`)
	notes := renderNotes(t, helm, "--set", "gpg.existingSecret=kleidi-gpg", "--set", "gpg.acknowledgeSecretColdStartDeadlock=true")
	if !strings.Contains(notes, "WARNING: the OpenPGP keys come from the Secret kleidi-gpg") {
		t.Errorf("NOTES.txt with a Secret lacks the warning:\n%s", notes)
	}
	notes = renderNotes(t, helm)
	for _, want := range []string{"install -d -o root -g 65532 -m 0750 /etc/kleidi/gpg",
		"install -o root -g 65532 -m 0440 public.asc private.asc passphrase /etc/kleidi/gpg/", "never from the Kubernetes API"} {
		if !strings.Contains(notes, want) {
			t.Errorf("NOTES.txt lacks %q:\n%s", want, notes)
		}
	}
}

// TestChartRefusesTPMWithoutAWayIn checks that provider tpm is refused unless the device reaches a
// non-privileged container by a way that works (device plugin, CDI, a runtime configured for it), and unless it
// runs on one node.
func TestChartRefusesTPMWithoutAWayIn(t *testing.T) {
	helm := helmBin(t)
	oneNode := "tpm.nodeName=cp-1"
	helmRefuses(t, helm, []struct {
		set  []string
		want string
	}{
		// The default of today: a hostPath char device, blocked by the device cgroup.
		{[]string{"provider=tpm", "tpm.tssGid=59", oneNode}, "blocked by the device cgroup"},
		{[]string{"provider=tpm", "tpm.tssGid=59", oneNode}, "tpm.hostPathDeviceAllowedByRuntime=true"},
		{[]string{"provider=tpm", "tpm.tssGid=59", oneNode, "tpm.deviceResource=squat.ai/tpm", "tpm.cdiDevice=kleidi.dev/tpm=tpmrm0"}, "not several"},
		// Every control-plane node: each would encrypt under a key the others cannot unwrap.
		{[]string{"provider=tpm", "tpm.tssGid=59", "tpm.deviceResource=squat.ai/tpm"}, "one control-plane node only"},
		{[]string{"provider=tpm", "tpm.tssGid=59", "tpm.cdiDevice=kleidi.dev/tpm=tpmrm0"}, "tpm.nodeName"},
		{[]string{"provider=tpm", "tpm.tssGid=59", "tpm.hostPathDeviceAllowedByRuntime=true"}, "tpm.acknowledgeSingleControlPlaneNode=true"},
		{[]string{"provider=tpm", "tpm.tssGid=59", "tpm.deviceResource=squat.ai/tpm", "tpm.nodeName=CP_1"}, "/tpm/nodeName"},
	})
	for _, set := range [][]string{
		{"provider=tpm", "tpm.tssGid=59", "tpm.deviceResource=squat.ai/tpm", oneNode},
		{"provider=tpm", "tpm.tssGid=59", "tpm.cdiDevice=kleidi.dev/tpm=tpmrm0", "tpm.acknowledgeSingleControlPlaneNode=true"},
		{"provider=tpm", "tpm.tssGid=59", "tpm.hostPathDeviceAllowedByRuntime=true", oneNode},
	} {
		args := []string{"template", "kleidi", chartDir}
		for _, s := range set {
			args = append(args, "--set", s)
		}
		mustRun(t, "", helm, args...)
	}
	notes := renderNotes(t, helm, "--set", "provider=tpm", "--set", "tpm.tssGid=59", "--set", "tpm.cdiDevice=kleidi.dev/tpm=tpmrm0", "--set", oneNode)
	for _, want := range []string{"the node cp-1 only", "the CDI device kleidi.dev/tpm=tpmrm0", "gid 59"} {
		if !strings.Contains(notes, want) {
			t.Errorf("NOTES.txt for tpm lacks %q:\n%s", want, notes)
		}
	}
}

// TestChartAccepts checks values the chart refused before: global (as every subchart gets), kubeVersion, an
// image digest, and tolerations of any taint, or of the cloud provider's uninitialized one.
func TestChartAccepts(t *testing.T) {
	helm := helmBin(t)
	out := mustRun(t, "", helm, "template", "kleidi", chartDir, "--show-only", "templates/daemonset.yaml",
		"--set", "global.imageRegistry=registry.example", "--set", "kubeVersion=1.37",
		"--set", "image.digest=sha256:"+strings.Repeat("ab", 32),
		"--set", "tolerations[0].key=node.cloudprovider.kubernetes.io/uninitialized",
		"--set", "tolerations[0].operator=Equal", "--set-string", "tolerations[0].value=true",
		"--set", "tolerations[0].effect=NoSchedule")
	mustMatch(t, "DaemonSet", out, `image: ghcr.io/kleidi-kms/kleidi:0.1.0@sha256:(ab){32}\n`, 1)
	mustMatch(t, "DaemonSet", out, `key: node.cloudprovider.kubernetes.io/uninitialized\n`, 1)

	// As the subchart of an umbrella chart that sets global values, the way helm passes them.
	dir := t.TempDir()
	umbrella := filepath.Join(dir, "umbrella")
	if err := os.CopyFS(filepath.Join(umbrella, "charts", "kleidi"), os.DirFS(chartDir)); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		"Chart.yaml":  "apiVersion: v2\nname: umbrella\nversion: 0.1.0\ndependencies:\n  - name: kleidi\n    version: 0.1.0\n",
		"values.yaml": "global:\n  imageRegistry: registry.example\n  storageClass: fast\nkleidi:\n  http:\n    port: 9787\n",
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(umbrella, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out = mustRun(t, "", helm, "template", "platform", umbrella, "--namespace", "kube-system")
	mustMatch(t, "umbrella", out, `- --http-addr=0\.0\.0\.0:9787\n`, 1)
	mustRun(t, "", helm, "lint", "--strict", umbrella)
}

// renderNotes renders NOTES.txt (helm template leaves it out) through a copy of the chart, with extra helm args.
func renderNotes(t *testing.T, helm string, args ...string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "kleidi")
	if err := os.CopyFS(dir, os.DirFS(chartDir)); err != nil {
		t.Fatal(err)
	}
	notes, err := os.ReadFile(filepath.Join(chartDir, "templates", "NOTES.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "notes.tmpl"), notes, 0o644); err != nil {
		t.Fatal(err)
	}
	wrapper := "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n" +
		`{{ tpl (.Files.Get "notes.tmpl") . | indent 4 }}` + "\n"
	if err := os.WriteFile(filepath.Join(dir, "templates", "zz-notes.yaml"), []byte(wrapper), 0o644); err != nil {
		t.Fatal(err)
	}
	return mustRun(t, "", helm, append([]string{"template", "kleidi", dir, "-n", "kube-system", "--show-only", "templates/zz-notes.yaml"}, args...)...)
}

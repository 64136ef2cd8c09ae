// Tests of the Helm chart: it lints and renders for every ci/*.yaml with the security settings every variant
// must keep, refuses invalid values, and its notes print a working EncryptionConfiguration.
package deploy_test

import (
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestHelmLint(t *testing.T) {
	helm := helmBin(t)
	t.Run("defaults", func(t *testing.T) {
		out := mustRun(t, "", helm, "lint", "--strict", chartDir)
		t.Log(lastLine(out))
	})
	for _, f := range ciValueFiles(t) {
		t.Run(filepath.Base(f), func(t *testing.T) {
			out := mustRun(t, "", helm, "lint", "--strict", "-f", f, chartDir)
			t.Log(lastLine(out))
		})
	}
}

func TestHelmTemplate(t *testing.T) {
	helm := helmBin(t)
	seen := map[string]bool{}
	for _, f := range ciValueFiles(t) {
		name := filepath.Base(f)
		seen[name] = true
		want, ok := chartCases[name]
		if !ok {
			t.Errorf("ci/%s has no entry in chartCases: say what it must render", name)
			continue
		}
		t.Run(name, func(t *testing.T) {
			out := mustRun(t, "", helm, "template", "kleidi", chartDir, "--namespace", "kube-system", "-f", f)
			ms := splitManifests(out)
			ds := byKind(ms, "DaemonSet")
			if len(ds) != 1 {
				t.Fatalf("want 1 DaemonSet, got %d:\n%s", len(ds), out)
			}
			text := ds[0].text
			checkPodSecurity(t, "DaemonSet", text)
			for _, m := range ms {
				if !strings.Contains(m.text, "\n  namespace: kube-system\n") {
					t.Errorf("%s %s is not in the release namespace", m.kind, m.name)
				}
			}
			mustMatch(t, "DaemonSet", text, `nodeSelector:\s*\n(?:\s+kubernetes.io/hostname: .*\n)?\s+node-role.kubernetes.io/control-plane: ""\n`, 1)
			// Every taint tolerated, as kube-proxy: the control-plane taint and the cloud provider's uninitialized one.
			mustMatch(t, "DaemonSet", text, `tolerations:\s*\n\s+- operator: Exists\n`, 1)
			mustMatch(t, "DaemonSet", text, `- --http-addr=0\.0\.0\.0:8787\n`, 1)
			mustMatch(t, "DaemonSet", text, `automountServiceAccountToken: false`, 1)
			mustMatch(t, "DaemonSet", text, `hostNetwork: `+strconv.FormatBool(want.hostNetwork)+`\n`, 1)

			if want.tpm {
				mustMatch(t, "DaemonSet", text, `supplementalGroups:\s*\n\s+- 59\n`, 1)
				mustMatch(t, "DaemonSet", text, `- --provider=tpm\n`, 1)
				mustMatch(t, "DaemonSet", text, `- --tpm=/dev/tpmrm0\n`, 1)
				if want.tpmWay == "hostPath" {
					mustMatch(t, "DaemonSet", text, `- --allowed-uids=0\n`, 1)
				}
				mustNotMatch(t, "DaemonSet", text, `gpg`)
				switch want.tpmWay {
				case "devicePlugin":
					mustMatch(t, "DaemonSet", text, `limits:\s*\n(?:\s+.*\n)*?\s+squat.ai/tpm: "1"\n`, 1)
				case "cdi":
					mustMatch(t, "DaemonSet", text, `cdi.k8s.io/kleidi-tpm: "kleidi.dev/tpm=tpmrm0"\n`, 1)
				case "hostPath":
					mustMatch(t, "DaemonSet", text, `- mountPath: /dev/tpmrm0\n\s+name: tpm-device\n|name: tpm-device\n\s+mountPath: /dev/tpmrm0\n`, 1)
					mustMatch(t, "DaemonSet", text, `hostPath:\s*\n\s+path: /dev/tpmrm0\n\s+type: CharDevice\n`, 1)
				default:
					t.Fatalf("chartCases: tpmWay %q", want.tpmWay)
				}
				if want.tpmWay != "hostPath" {
					mustNotMatch(t, "DaemonSet", text, `CharDevice|tpm-device`)
				}
				if want.tpmWay != "cdi" {
					mustNotMatch(t, "DaemonSet", text, `cdi\.k8s\.io`)
				}
				// One node: named, or the single node the nodeSelector matches.
				if want.tpmNode != "" {
					mustMatch(t, "DaemonSet", text, `nodeSelector:\s*\n(?:\s+.*\n)*?\s+kubernetes.io/hostname: `+want.tpmNode+`\n`, 1)
				} else {
					mustNotMatch(t, "DaemonSet", text, `kubernetes.io/hostname`)
				}
			} else {
				// Neither the tss group nor the TPM device reaches a pod that does not use them.
				mustNotMatch(t, "DaemonSet", text, `tpmrm0|--tpm|cdi\.k8s\.io`)
			}
			if want.provider != "pkcs11" {
				mustNotMatch(t, "DaemonSet", text, `pkcs11`)
			}
			if want.provider != "awskms" {
				mustNotMatch(t, "DaemonSet", text, `awskms|AWS_`)
			}
			provider := want.provider
			if want.tpm {
				provider = "tpm"
			}
			switch provider {
			case "tpm":
			case "pkcs11":
				checkPKCS11(t, text)
			case "awskms":
				checkAWSKMS(t, text, want.awsCredentialsFile)
			case "":
				mustNotMatch(t, "DaemonSet", text, `supplementalGroups`)
				mustMatch(t, "DaemonSet", text, `- --provider=gpg\n`, 1)
				mustMatch(t, "DaemonSet", text, `- --gpg-private-key=/etc/kleidi/gpg/private.asc\n`, 1)
				mustMatch(t, "DaemonSet", text, `name: gpg-keys\n\s+mountPath: /etc/kleidi/gpg\n\s+readOnly: true\n|mountPath: /etc/kleidi/gpg\n\s+name: gpg-keys\n\s+readOnly: true\n`, 1)
				if want.gpgSecret {
					// Key files readable by the plugin's group (fsGroup) only.
					mustMatch(t, "DaemonSet", text, `secret:\s*\n\s+secretName: kleidi-gpg\n\s+defaultMode: 0440\n`, 1)
					mustMatch(t, "DaemonSet", text, `fsGroup: 65532\n`, 1)
				} else {
					// The keys come from the host: nothing the plugin needs at start comes from the API.
					mustMatch(t, "DaemonSet", text, `hostPath:\s*\n\s+path: /etc/kleidi/gpg\n\s+type: Directory\n`, 1)
					mustNotMatch(t, "DaemonSet", text, `secret:|secretName|configMap|projected:|secretKeyRef|configMapKeyRef|fsGroup`)
				}
			}

			if got := len(byKind(ms, "Service")); got != b2i(want.service) {
				t.Errorf("want %d metrics Service, got %d", b2i(want.service), got)
			}
			sm := byKind(ms, "ServiceMonitor")
			if got := len(sm); got != b2i(want.serviceMonitor) {
				t.Errorf("want %d ServiceMonitor, got %d", b2i(want.serviceMonitor), got)
			}
			if len(sm) == 1 {
				mustMatch(t, "ServiceMonitor", sm[0].text, `- port: http\n\s+path: /metrics\n`, 1)
				// The job the alerts select, and the node of each target.
				mustMatch(t, "ServiceMonitor", sm[0].text, `\n  jobLabel: app.kubernetes.io/name\n`, 1)
				mustMatch(t, "ServiceMonitor", sm[0].text, `- sourceLabels: \[__meta_kubernetes_pod_node_name\]\n\s+targetLabel: node\n`, 1)
			}
			if got := len(byKind(ms, "PrometheusRule")); got != b2i(want.prometheusRule) {
				t.Errorf("want %d PrometheusRule, got %d", b2i(want.prometheusRule), got)
			}
			// pkcs11 loads its module with dlopen: only the cgo image can.
			tag := "0.1.0"
			if want.provider == "pkcs11" {
				tag = "0.1.0-cgo"
			}
			if want.digest != "" {
				mustMatch(t, "DaemonSet", text, `image: ghcr.io/kleidi-kms/kleidi:`+tag+`@`+want.digest+`\n`, 1)
			} else {
				mustMatch(t, "DaemonSet", text, `image: ghcr.io/kleidi-kms/kleidi:`+tag+`\n`, 1)
			}
			if len(byKind(ms, "ServiceAccount")) != 1 {
				t.Error("want one ServiceAccount")
			}
		})
	}
	for name := range chartCases {
		if !seen[name] {
			t.Errorf("chartCases names ci/%s, which does not exist", name)
		}
	}
}

// chartCase says what each ci/*.yaml must render. A new value file needs an entry in chartCases.
type chartCase struct {
	// provider is pkcs11 or awskms for those providers; tpm says provider tpm; neither is gpg.
	provider           string
	awsCredentialsFile bool // awskms.credentialsHostDir set
	tpm                bool
	tpmWay             string // devicePlugin, cdi or hostPath
	tpmNode            string // the node named in tpm.nodeName
	gpgSecret          bool
	hostNetwork        bool
	service            bool
	// serviceMonitor and prometheusRule: the prometheus-operator objects.
	serviceMonitor, prometheusRule bool
	digest                         string
}

var chartCases = map[string]chartCase{
	"gpg.yaml":                     {service: true},
	"gpg-secret.yaml":              {gpgSecret: true, service: true},
	"tpm.yaml":                     {tpm: true, tpmWay: "hostPath", service: true},
	"pkcs11.yaml":                  {provider: "pkcs11", service: true},
	"awskms.yaml":                  {provider: "awskms", service: true},
	"awskms-credentials-file.yaml": {provider: "awskms", awsCredentialsFile: true, hostNetwork: true, service: true},
	"tpm-device-plugin.yaml":       {tpm: true, tpmWay: "devicePlugin", tpmNode: "cp-1", hostNetwork: true, service: true},
	"tpm-cdi.yaml":                 {tpm: true, tpmWay: "cdi", tpmNode: "cp-1", service: true},
	"metrics-off.yaml":             {},
	"metrics-servicemonitor.yaml":  {service: true, serviceMonitor: true, prometheusRule: true},
	"subchart.yaml":                {service: true, digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestHelmValuesRejected checks that values.schema.json and the templates refuse values that would render a
// broken or unsafe DaemonSet, with a message that names the value.
func TestHelmValuesRejected(t *testing.T) {
	helm := helmBin(t)
	helmRefuses(t, helm, []struct {
		set  []string
		want string
	}{
		{[]string{"provider=vault"}, "/provider"},
		{[]string{"uid=0"}, "/uid"},
		{[]string{"gid=0"}, "/gid"},
		{[]string{"uid=root"}, "/uid"},
		{[]string{"provider=tpm"}, "tssGid"},
		{[]string{"provider=tpm", "tpm.tssGid=tss"}, "tssGid"},
		{[]string{"provider=tpm", "tpm.tssGid=59", "tpm.pcrs=7;8"}, "/tpm/pcrs"},
		{[]string{"gpg.hostDir="}, "/gpg/hostDir"},
		{[]string{"gpg.hostDir=etc/kleidi"}, "/gpg/hostDir"},
		{[]string{"image.digest=latest"}, "/image/digest"},
		{[]string{"tpm.cdiDevice=tpmrm0"}, "/tpm/cdiDevice"},
		{[]string{"tolerations[0].operator=Maybe"}, "/tolerations/0/operator"},
		{[]string{"socket.mode=0666"}, "/socket/mode"},
		{[]string{"socket.hostPathType=DirectoryOrCreat"}, "/socket/hostPathType"},
		{[]string{"http.port=80"}, "/http/port"},
		{[]string{"log.format=xml"}, "/log/format"},
		{[]string{"metrics.enabled=false", "metrics.serviceMonitor.enabled=true"}, "needs metrics.enabled"},
		{[]string{"privileged=true"}, "privileged"},
	})
}

// helmRefuses renders the plugin's chart with each case's --set values and fails unless helm refuses, naming want.
func helmRefuses(t *testing.T, helm string, cases []struct {
	set  []string
	want string
}) {
	t.Helper()
	chartRefuses(t, helm, "kleidi", chartDir, cases)
}

// chartRefuses is helmRefuses for any chart, rendered as release.
func chartRefuses(t *testing.T, helm, release, chart string, cases []struct {
	set  []string
	want string
}) {
	t.Helper()
	for _, c := range cases {
		args := []string{"template", release, chart}
		for _, s := range c.set {
			args = append(args, "--set", s)
		}
		out, err := run(t, time.Minute, "", nil, helm, args...)
		if err == nil {
			t.Errorf("--set %v: rendered, want an error", c.set)
			continue
		}
		if !strings.Contains(out, c.want) {
			t.Errorf("--set %v: error does not name %q:\n%s", c.set, c.want, out)
		}
	}
}

// TestHelmNotes renders NOTES.txt (helm template leaves it out) through a copy of the chart, and checks that
// it prints an EncryptionConfiguration for the chart's socket.
func TestHelmNotes(t *testing.T) {
	out := renderNotes(t, helmBin(t), "--set", "socket.hostDir=/run/kms", "--set", "socket.name=k.sock")
	for _, want := range []string{
		"kind: EncryptionConfiguration",
		"apiVersion: v2",
		"name: kleidi",
		"endpoint: unix:///run/kms/k.sock",
		"- identity: {}",
		"/livez?exclude=kms-providers",
		"install -d -o 65532 -g 65532 -m 0750 /run/kms",
		"rollout status daemonset/kleidi",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("NOTES.txt lacks %q:\n%s", want, out)
		}
	}
}

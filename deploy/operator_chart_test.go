package deploy_test

// This file: the operator's chart (deploy/helm/kleidi-operator) and its alerts
// (deploy/prometheus/kleidi-operator-alerts.yaml).

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

var (
	operatorChartDir    = filepath.Join(deployDir, "helm", "kleidi-operator")
	operatorCRDDir      = filepath.Join(repoRoot, "operator", "config", "crd", "bases")
	operatorAlertsFile  = filepath.Join(prometheusDir, "kleidi-operator-alerts.yaml")
	operatorAlertsTest  = filepath.Join(prometheusDir, "kleidi-operator-alerts_test.yaml")
	operatorNamespace   = "kleidi-system"
	operatorAgentUser   = "system:serviceaccount:" + operatorNamespace + ":kleidi-agent"
	operatorUser        = "system:serviceaccount:" + operatorNamespace + ":kleidi-operator"
	operatorNodeNameKey = "authentication.kubernetes.io/node-name"
)

// operatorCase says what each ci/*.yaml of the operator's chart must render. A new value file needs an entry.
type operatorCase struct {
	prefix             string // namePrefix
	replicas           int
	socketDir, socket  string
	metricsPort        int
	service, plugin    bool
	digest             string
	tokenExpirySeconds int
}

var operatorCases = map[string]operatorCase{
	"defaults.yaml":      {prefix: "kleidi", replicas: 1, socketDir: "/run/kleidi", socket: "admin.sock", metricsPort: 8080, service: true, tokenExpirySeconds: 3600},
	"ha.yaml":            {prefix: "kleidi", replicas: 2, socketDir: "/run/kleidi", socket: "admin.sock", metricsPort: 8080, service: true, tokenExpirySeconds: 3600, digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},
	"plugin.yaml":        {prefix: "kleidi", replicas: 1, socketDir: "/run/kleidi", socket: "admin.sock", metricsPort: 8080, service: true, plugin: true, tokenExpirySeconds: 3600},
	"custom-socket.yaml": {prefix: "kms", replicas: 1, socketDir: "/var/run/kleidi", socket: "kleidi-admin.sock", metricsPort: 9090, tokenExpirySeconds: 7200},
}

func operatorValueFiles(t testing.TB) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(operatorChartDir, "ci", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no ci/*.yaml in %s: %v", operatorChartDir, err)
	}
	return files
}

// TestOperatorChartCRDs checks that the chart's crds/ are exactly the CRDs controller-gen generates into
// operator/config/crd/bases: the same files, byte for byte.
func TestOperatorChartCRDs(t *testing.T) {
	generated, err := filepath.Glob(filepath.Join(operatorCRDDir, "*.yaml"))
	if err != nil || len(generated) == 0 {
		t.Fatalf("no CRDs in %s (make -C operator manifests generates them): %v", operatorCRDDir, err)
	}
	copies, err := filepath.Glob(filepath.Join(operatorChartDir, "crds", "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	names := func(files []string) []string {
		var out []string
		for _, f := range files {
			out = append(out, filepath.Base(f))
		}
		return out
	}
	if !slices.Equal(names(generated), names(copies)) {
		t.Errorf("the chart's crds/ hold %v, operator/config/crd/bases %v: copy them with\n  cp operator/config/crd/bases/*.yaml deploy/helm/kleidi-operator/crds/", names(copies), names(generated))
	}
	for _, g := range generated {
		c := filepath.Join(operatorChartDir, "crds", filepath.Base(g))
		if b, err := os.ReadFile(c); err == nil && !bytes.Equal(b, []byte(readFile(t, g))) {
			t.Errorf("%s differs from %s: copy it again", c, g)
		}
	}
	t.Logf("%d CRDs: %v", len(generated), names(generated))
}

func TestOperatorChartLint(t *testing.T) {
	helm := helmBin(t)
	t.Run("defaults", func(t *testing.T) {
		t.Log(lastLine(mustRun(t, "", helm, "lint", "--strict", operatorChartDir)))
	})
	for _, f := range operatorValueFiles(t) {
		t.Run(filepath.Base(f), func(t *testing.T) {
			t.Log(lastLine(mustRun(t, "", helm, "lint", "--strict", "-f", f, operatorChartDir)))
		})
	}
}

// TestOperatorChartTemplate renders every ci/*.yaml and checks the settings each must keep: both pods non-root
// with a read-only root, seccomp RuntimeDefault and no capability; the agent on control-plane nodes as the
// plugin's uid, with its node from the downward API, a projected token and the plugin's socket directory; the
// operator with leader election; the admission policy bound to the agent's service account.
func TestOperatorChartTemplate(t *testing.T) {
	helm := helmBin(t)
	seen := map[string]bool{}
	for _, f := range operatorValueFiles(t) {
		name := filepath.Base(f)
		seen[name] = true
		want, ok := operatorCases[name]
		if !ok {
			t.Errorf("ci/%s has no entry in operatorCases: say what it must render", name)
			continue
		}
		t.Run(name, func(t *testing.T) {
			out := mustRun(t, "", helm, "template", "kleidi-operator", operatorChartDir, "--namespace", operatorNamespace, "-f", f)
			ms := splitManifests(out)
			for _, m := range ms {
				switch m.kind {
				case "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "KleidiPlugin":
					mustNotMatch(t, m.kind+" "+m.name, m.text, `\n  namespace: `)
				case "Role", "RoleBinding":
					if !strings.Contains(m.text, "\n  namespace: "+operatorNamespace+"\n") && !strings.Contains(m.text, "\n  namespace: kube-system\n") {
						t.Errorf("%s %s is in neither the release namespace nor kube-system", m.kind, m.name)
					}
				default:
					if !strings.Contains(m.text, "\n  namespace: "+operatorNamespace+"\n") {
						t.Errorf("%s %s is not in the release namespace", m.kind, m.name)
					}
				}
			}
			ds, dep := byKind(ms, "DaemonSet"), byKind(ms, "Deployment")
			if len(ds) != 1 || len(dep) != 1 {
				t.Fatalf("want 1 DaemonSet and 1 Deployment, got %d and %d:\n%s", len(ds), len(dep), out)
			}
			if ds[0].name != want.prefix+"-agent" || dep[0].name != want.prefix+"-operator" {
				t.Errorf("DaemonSet %s, Deployment %s: want %s-agent and %s-operator", ds[0].name, dep[0].name, want.prefix, want.prefix)
			}
			for _, m := range []manifest{ds[0], dep[0]} {
				checkOperatorPodSecurity(t, m.kind, m.text)
			}

			agent := ds[0].text
			mustMatch(t, "DaemonSet", agent, `nodeSelector:\s*\n\s+node-role.kubernetes.io/control-plane: ""\n`, 1)
			mustMatch(t, "DaemonSet", agent, `tolerations:\s*\n\s+- operator: Exists\n`, 1)
			mustMatch(t, "DaemonSet", agent, `- name: NODE_NAME\n\s+valueFrom:\n\s+fieldRef:\n\s+fieldPath: spec.nodeName\n`, 1)
			mustMatch(t, "DaemonSet", agent, `- --node-name=\$\(NODE_NAME\)\n`, 1)
			mustMatch(t, "DaemonSet", agent, `- --admin-socket=unix://`+want.socketDir+`/`+want.socket+`\n`, 1)
			mustMatch(t, "DaemonSet", agent, `hostPath:\s*\n\s+path: `+want.socketDir+`\n\s+type: Directory\n`, 1)
			mustMatch(t, "DaemonSet", agent, `- name: admin-socket\n\s+mountPath: `+want.socketDir+`\n\s+readOnly: true\n`, 1)
			// The token: projected, bound to the pod (and so to its node), short-lived; never the automounted one.
			mustMatch(t, "DaemonSet", agent, `automountServiceAccountToken: false\n`, 1)
			mustMatch(t, "DaemonSet", agent, fmt.Sprintf(`projected:\n(?:\s+.*\n)*?\s+- serviceAccountToken:\n\s+path: token\n\s+expirationSeconds: %d\n`, want.tokenExpirySeconds), 1)
			mustMatch(t, "DaemonSet", agent, `- name: kube-api-access\n\s+mountPath: /var/run/secrets/kubernetes.io/serviceaccount\n\s+readOnly: true\n`, 1)
			mustMatch(t, "DaemonSet", agent, `serviceAccountName: `+want.prefix+`-agent\n`, 1)
			mustNotMatch(t, "DaemonSet", agent, `hostNetwork: true|hostPID: true|hostIPC: true|secretName|/var/lib/kleidi`)

			op := dep[0].text
			mustMatch(t, "Deployment", op, fmt.Sprintf(`\n  replicas: %d\n`, want.replicas), 1)
			mustMatch(t, "Deployment", op, `- --leader-elect=true\n`, 1)
			mustMatch(t, "Deployment", op, fmt.Sprintf(`- --metrics-bind-address=:%d\n`, want.metricsPort), 1)
			mustMatch(t, "Deployment", op, `- name: POD_NAMESPACE\n\s+valueFrom:\n\s+fieldRef:\n\s+fieldPath: metadata.namespace\n`, 1)
			mustMatch(t, "Deployment", op, `livenessProbe:\s*\n\s+httpGet:\s*\n\s+path: /healthz\n`, 1)
			mustMatch(t, "Deployment", op, `readinessProbe:\s*\n\s+httpGet:\s*\n\s+path: /readyz\n`, 1)
			mustMatch(t, "Deployment", op, `serviceAccountName: `+want.prefix+`-operator\n`, 1)
			mustNotMatch(t, "Deployment", op, `hostNetwork: true|hostPath`)
			if want.replicas > 1 {
				mustMatch(t, "Deployment", op, `podAntiAffinity:`, 1)
			}
			img := "ghcr.io/kleidi-kms/kleidi-operator:0.1.0"
			if want.digest != "" {
				img += "@" + want.digest
			}
			mustMatch(t, "Deployment", op, `image: `+img+`\n`, 1)
			mustMatch(t, "DaemonSet", agent, `image: ghcr.io/kleidi-kms/kleidi-agent:0.1.0\n`, 1)

			vap := byKind(ms, "ValidatingAdmissionPolicy")
			if len(vap) != 1 || len(byKind(ms, "ValidatingAdmissionPolicyBinding")) != 1 {
				t.Fatalf("want 1 ValidatingAdmissionPolicy and its binding, got %d", len(vap))
			}
			mustMatch(t, "ValidatingAdmissionPolicy", vap[0].text, `apiVersion: admissionregistration.k8s.io/v1\n`, 1)
			mustMatch(t, "ValidatingAdmissionPolicy", vap[0].text, `request.userInfo.username == "system:serviceaccount:`+operatorNamespace+`:`+want.prefix+`-agent"`, 1)
			mustMatch(t, "ValidatingAdmissionPolicy", vap[0].text, `failurePolicy: Fail\n`, 1)
			if got := len(byKind(ms, "Service")); got != b2i(want.service) {
				t.Errorf("want %d metrics Service, got %d", b2i(want.service), got)
			}
			if got := len(byKind(ms, "KleidiPlugin")); got != b2i(want.plugin) {
				t.Errorf("want %d KleidiPlugin, got %d", b2i(want.plugin), got)
			}
			if got := len(byKind(ms, "ServiceAccount")); got != 2 {
				t.Errorf("want 2 ServiceAccounts, got %d", got)
			}
			mustNotMatch(t, "chart", out, `kind: CustomResourceDefinition`) // crds/ are not templates
		})
	}
	for name := range operatorCases {
		if !seen[name] {
			t.Errorf("operatorCases names ci/%s, which does not exist", name)
		}
	}
}

// checkOperatorPodSecurity asserts the settings the operator's and the agent's pods keep, at pod and container
// level.
func checkOperatorPodSecurity(t testing.TB, what, text string) {
	t.Helper()
	mustMatch(t, what, text, `runAsNonRoot: true`, 2)
	mustMatch(t, what, text, `readOnlyRootFilesystem: true`, 1)
	mustMatch(t, what, text, `allowPrivilegeEscalation: false`, 1)
	mustMatch(t, what, text, `capabilities:\s*\n\s+drop:\s*\n\s+- ALL\n`, 1)
	mustMatch(t, what, text, `seccompProfile:\s*\n\s+type: RuntimeDefault\n`, 2)
	mustMatch(t, what, text, `runAsUser: 65532\n`, 2)
	mustMatch(t, what, text, `runAsGroup: 65532\n`, 2)
	mustMatch(t, what, text, `resources:\s*\n\s+(?:limits|requests):`, 1)
	mustNotMatch(t, what, text, `privileged: true|capabilities:\s*\n\s+add:`)
}

// TestOperatorChartValuesRejected checks that values.schema.json and the templates refuse values that would
// render a broken or unsafe deployment, with a message that names the value.
func TestOperatorChartValuesRejected(t *testing.T) {
	helm := helmBin(t)
	cases := []struct {
		set  []string
		want string
	}{
		{[]string{"uid=0"}, "/uid"},
		{[]string{"gid=0"}, "/gid"},
		{[]string{"namePrefix=Kleidi"}, "/namePrefix"},
		{[]string{"operator.replicas=0"}, "/operator/replicas"},
		{[]string{"operator.replicas=2", "operator.leaderElection=false"}, "operator.leaderElection"},
		{[]string{"operator.healthPort=8080"}, "must differ"},
		{[]string{"operator.metrics.port=80"}, "/operator/metrics/port"},
		{[]string{"operator.image.digest=latest"}, "/operator/image/digest"},
		{[]string{"operator.logLevel=trace"}, "/operator/logLevel"},
		{[]string{"agent.adminSocket.hostDir=run/kleidi"}, "/agent/adminSocket/hostDir"},
		{[]string{"agent.adminSocket.name=a/b"}, "/agent/adminSocket/name"},
		{[]string{"agent.tokenExpirationSeconds=60"}, "/agent/tokenExpirationSeconds"},
		{[]string{"agent.nodeSelector=null"}, "/agent"},
		{[]string{"agent.tolerations[0].operator=Maybe"}, "/agent/tolerations/0/operator"},
		{[]string{"plugin.create=true", "plugin.spec.provider=vault"}, "/plugin/spec/provider"},
		{[]string{"privileged=true"}, "privileged"},
	}
	chartRefuses(t, helm, "kleidi-operator", operatorChartDir, cases)
}

// TestOperatorChartOnAPIServer installs the chart's CRDs in a real kube-apiserver, has it validate every rendering
// of the chart (kubectl apply --dry-run=server: schema, defaulting, CEL and admission, nothing stored, the
// KleidiPlugin against its CRD), then installs the chart for real and checks what its RBAC and its
// ValidatingAdmissionPolicy let the agent and the operator do, each impersonated with the chart's service
// account and then with a real token bound to a pod of the agent on cp-1: the agent of cp-1 writes cp-1's KleidiNode
// status, and the policy refuses it cp-2's.
func TestOperatorChartOnAPIServer(t *testing.T) {
	helm := helmBin(t)
	kas, err := run(t, time.Minute, repoRoot, nil, "bash", "hack/k8s-binary.sh", "kube-apiserver")
	kas = strings.TrimSpace(kas)
	if err != nil || kas == "" {
		t.Fatalf("hack/k8s-binary.sh kube-apiserver: %v\n%s", err, kas)
	}
	dir, err := os.MkdirTemp("", "kleidi-operator-chart-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	// An etcd and a kube-apiserver on loopback. Its EncryptionConfiguration names a KMS plugin that is not
	// running: nothing here writes a Secret, and /readyz leaves the KMS check out.
	c := startColdStartCluster(t, dir, kas)
	defer c.stopAll()
	c.startAPIServer(t, "file://"+filepath.Join(dir, "no-plugin.sock"), "/readyz?exclude=kms-providers")
	c.kubectl(t, "create", "namespace", operatorNamespace)

	// The CRDs, for real: the dry runs validate the KleidiPlugin against them.
	start := time.Now()
	out := c.kubectl(t, "apply", "--server-side", "-f", filepath.Join(operatorChartDir, "crds"))
	t.Logf("%s", strings.TrimSpace(out))
	c.kubectl(t, "wait", "--for=condition=Established", "--timeout=60s",
		"crd/kleidiplugins.kleidi.dev", "crd/kleidinodes.kleidi.dev", "crd/keyrotations.kleidi.dev")
	t.Logf("CRDs established in %s", time.Since(start).Round(100*time.Millisecond))

	render := func(t *testing.T, args ...string) string {
		t.Helper()
		out := mustRun(t, "", helm, append([]string{"template", "kleidi-operator", operatorChartDir, "--namespace", operatorNamespace}, args...)...)
		file := filepath.Join(t.TempDir(), "rendered.yaml")
		if err := os.WriteFile(file, []byte(out), 0o644); err != nil {
			t.Fatal(err)
		}
		return file
	}
	for _, f := range operatorValueFiles(t) {
		name := filepath.Base(f)
		t.Run("dry-run/"+name, func(t *testing.T) {
			want := operatorCases[name]
			out := c.kubectl(t, "apply", "--dry-run=server", "--validate=strict", "-f", render(t, "-f", f))
			objects := []string{"serviceaccount/" + want.prefix + "-agent", "serviceaccount/" + want.prefix + "-operator",
				"clusterrole.rbac.authorization.k8s.io/" + want.prefix + "-agent", "clusterrole.rbac.authorization.k8s.io/" + want.prefix + "-operator",
				"role.rbac.authorization.k8s.io/" + want.prefix + "-operator",
				"deployment.apps/" + want.prefix + "-operator", "daemonset.apps/" + want.prefix + "-agent",
				"validatingadmissionpolicy.admissionregistration.k8s.io/" + want.prefix + "-agent-own-node",
				"validatingadmissionpolicybinding.admissionregistration.k8s.io/" + want.prefix + "-agent-own-node"}
			if want.plugin {
				objects = append(objects, "kleidiplugin.kleidi.dev/kleidi")
			}
			for _, o := range objects {
				if !strings.Contains(out, o+" created (server dry run)") {
					t.Errorf("kubectl apply --dry-run=server did not create %s:\n%s", o, out)
				}
			}
			t.Logf("%d objects validated", strings.Count(out, "(server dry run)"))
		})
	}
	// The dry run does validate against the CRD: a KleidiPlugin of another name, and an Automatic approval
	// without CA certificates, are refused by its CEL rules.
	t.Run("dry-run/refuses-invalid-plugin", func(t *testing.T) {
		for _, bad := range []struct{ from, to, want string }{
			{"name: kleidi\n", "name: other\n", "a cluster has one KleidiPlugin, named kleidi"},
			{"approval: Manual", "approval: Automatic", "ekCACertificates"},
		} {
			b := readFile(t, render(t, "-f", filepath.Join(operatorChartDir, "ci", "plugin.yaml"), "--show-only", "templates/kleidiplugin.yaml"))
			file := filepath.Join(t.TempDir(), "bad.yaml")
			if err := os.WriteFile(file, []byte(strings.Replace(b, bad.from, bad.to, 1)), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := c.kubectlErr("apply", "--dry-run=server", "--validate=strict", "-f", file)
			if err == nil || !strings.Contains(out, bad.want) {
				t.Errorf("KleidiPlugin with %q: want a refusal naming %q, got %v:\n%s", strings.TrimSpace(bad.to), bad.want, err, out)
			}
		}
	})

	// The chart for real, then two nodes' KleidiNodes, written by an administrator.
	c.kubectl(t, "apply", "-f", render(t))
	for _, node := range []string{"cp-1", "cp-2"} {
		file := filepath.Join(dir, node+".yaml")
		if err := os.WriteFile(file, []byte("apiVersion: kleidi.dev/v1alpha1\nkind: KleidiNode\nmetadata:\n  name: "+node+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		c.kubectl(t, "create", "-f", file)
	}
	api := &apiClient{c: c}

	t.Run("rbac", func(t *testing.T) {
		for _, check := range []struct {
			user, verb, resource, sub string
			want                      bool
		}{
			{operatorAgentUser, "patch", "kleidinodes", "status", true},
			{operatorAgentUser, "update", "kleidinodes", "status", true},
			{operatorAgentUser, "watch", "kleidiplugins", "", true},
			{operatorAgentUser, "list", "keyrotations", "", true},
			{operatorAgentUser, "patch", "kleidinodes", "", false}, // its spec: approval and requests are the operator's
			{operatorAgentUser, "patch", "kleidiplugins", "status", false},
			{operatorAgentUser, "create", "keyrotations", "", false},
			{operatorAgentUser, "delete", "kleidinodes", "", false},
			{operatorAgentUser, "get", "secrets", "", false},
			{operatorUser, "patch", "kleidinodes", "", true},
			{operatorUser, "patch", "kleidiplugins", "status", true},
			{operatorUser, "patch", "kleidinodes", "status", false}, // only the node's agent writes it
			{operatorUser, "create", "storageversionmigrations.storagemigration.k8s.io", "", true},
			{operatorUser, "list", "secrets", "", false},
			{operatorUser, "delete", "kleidiplugins", "", false},
		} {
			args := []string{"auth", "can-i", check.verb, check.resource, "--as=" + check.user}
			if check.sub != "" {
				args = append(args, "--subresource="+check.sub)
			}
			if strings.Contains(check.resource, "secrets") || strings.Contains(check.resource, "storageversion") {
				args = append(args, "-n", operatorNamespace)
			}
			out, _ := c.kubectlErr(args...)
			if got := lastLine(out) == "yes"; got != check.want {
				t.Errorf("kubectl %s: %s, want %v", strings.Join(args, " "), lastLine(out), check.want)
			}
		}
		// Only the nudge Secret, in the operator's own namespace.
		for _, check := range []struct {
			args []string
			want string
		}{
			{[]string{"auth", "can-i", "update", "secret/kleidi-migration-nudge", "-n", operatorNamespace, "--as=" + operatorUser}, "yes"},
			{[]string{"auth", "can-i", "get", "secret/other", "-n", operatorNamespace, "--as=" + operatorUser}, "no"},
			{[]string{"auth", "can-i", "update", "secret/kleidi-migration-nudge", "-n", "kube-system", "--as=" + operatorUser}, "no"},
			{[]string{"auth", "can-i", "list", "leases.coordination.k8s.io", "-n", "kube-system", "--as=" + operatorUser}, "yes"},
			{[]string{"auth", "can-i", "update", "leases.coordination.k8s.io", "-n", "kube-system", "--as=" + operatorUser}, "no"},
			{[]string{"auth", "can-i", "update", "leases.coordination.k8s.io", "-n", operatorNamespace, "--as=" + operatorUser}, "yes"},
		} {
			out, _ := c.kubectlErr(check.args...)
			if got := lastLine(out); got != check.want {
				t.Errorf("kubectl %s: %s, want %s", strings.Join(check.args, " "), got, check.want)
			}
		}
	})

	t.Run("admission-policy", func(t *testing.T) {
		cp1 := map[string]string{operatorNodeNameKey: "cp-1"}
		status := func(msg string) string {
			return `{"status":{"healthy":true,"message":"` + msg + `"}}`
		}
		// The policy takes effect once the API server has loaded it: wait until cp-1's agent is refused cp-2.
		const refusal = "the kleidi agent of node cp-1 may update only KleidiNode cp-1, not cp-2"
		var code int
		var body string
		deadline := time.Now().Add(60 * time.Second)
		for {
			code, body = api.patchStatus(t, "cp-2", status("forged by cp-1"), operatorAgentUser, cp1)
			if code == http.StatusForbidden && strings.Contains(body, refusal) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("PATCH kleidinodes/cp-2/status as cp-1's agent: %d %s, want 403 with %q", code, body, refusal)
			}
			time.Sleep(250 * time.Millisecond)
		}
		t.Logf("cp-1's agent on cp-2: %d %s", code, policyMessage(body))
		if code, body := api.patchStatus(t, "cp-1", status("reported by cp-1"), operatorAgentUser, cp1); code != http.StatusOK {
			t.Fatalf("PATCH kleidinodes/cp-1/status as cp-1's agent: %d %s, want 200", code, body)
		}
		// What the API holds: cp-1's report, and nothing on cp-2.
		if got := c.kubectl(t, "get", "kleidinode", "cp-1", "-o", "jsonpath={.status.message}"); got != "reported by cp-1" {
			t.Errorf("cp-1's status.message = %q, want %q", got, "reported by cp-1")
		}
		if got := c.kubectl(t, "get", "kleidinode", "cp-2", "-o", "jsonpath={.status}"); got != "" {
			t.Errorf("cp-2's status = %q, want none", got)
		}
		// A PUT of the whole status, and a token of the agent's service account without a node (not bound to a
		// pod), are refused too.
		var kn map[string]any
		if err := json.Unmarshal([]byte(c.kubectl(t, "get", "kleidinode", "cp-2", "-o", "json")), &kn); err != nil {
			t.Fatal(err)
		}
		kn["status"] = map[string]any{"healthy": true, "message": "forged by cp-1"}
		b, _ := json.Marshal(kn)
		if code, body := api.do(t, http.MethodPut, "/apis/kleidi.dev/v1alpha1/kleidinodes/cp-2/status", "application/json", string(b), operatorAgentUser, cp1); code != http.StatusForbidden || !strings.Contains(body, refusal) {
			t.Errorf("PUT kleidinodes/cp-2/status as cp-1's agent: %d %s, want 403 with %q", code, body, refusal)
		}
		if code, body := api.patchStatus(t, "cp-1", status("no node"), operatorAgentUser, nil); code != http.StatusForbidden || !strings.Contains(body, "its token names no node") {
			t.Errorf("PATCH kleidinodes/cp-1/status as the agent without a node claim: %d %s, want 403 naming the missing node", code, body)
		}
		// The operator is not the agent: RBAC refuses it every node's status, the policy does not apply to it.
		if code, body := api.patchStatus(t, "cp-2", status("forged by the operator"), operatorUser, nil); code != http.StatusForbidden || strings.Contains(body, "kleidi agent") {
			t.Errorf("PATCH kleidinodes/cp-2/status as the operator: %d %s, want 403 from RBAC", code, body)
		}
	})

	// The agent's real credential: a token bound to a pod of the agent's service account on node cp-1, as the
	// DaemonSet's projected volume holds. The API server derives the node claim from the pod, not from the caller.
	t.Run("pod-bound-token", func(t *testing.T) {
		manifests := "apiVersion: v1\nkind: Node\nmetadata:\n  name: cp-1\n---\n" +
			"apiVersion: v1\nkind: Pod\nmetadata:\n  name: agent-cp-1\n  namespace: " + operatorNamespace + "\nspec:\n" +
			"  serviceAccountName: kleidi-agent\n  automountServiceAccountToken: false\n  nodeName: cp-1\n" +
			"  containers:\n    - name: agent\n      image: ghcr.io/kleidi-kms/kleidi-agent:0.1.0\n"
		file := filepath.Join(dir, "agent-pod.yaml")
		if err := os.WriteFile(file, []byte(manifests), 0o644); err != nil {
			t.Fatal(err)
		}
		c.kubectl(t, "create", "-f", file)
		token := strings.TrimSpace(c.kubectl(t, "create", "token", "kleidi-agent", "-n", operatorNamespace,
			"--bound-object-kind=Pod", "--bound-object-name=agent-cp-1", "--duration=10m"))
		path := "/apis/kleidi.dev/v1alpha1/kleidinodes/%s/status"
		patch := `{"status":{"message":"reported with cp-1's pod token"}}`
		if code, body := api.send(t, http.MethodPatch, fmt.Sprintf(path, "cp-2"), "application/merge-patch+json", patch, token, nil); code != http.StatusForbidden ||
			!strings.Contains(body, "the kleidi agent of node cp-1 may update only KleidiNode cp-1, not cp-2") {
			t.Errorf("PATCH kleidinodes/cp-2/status with cp-1's pod-bound token: %d %s, want 403 from the policy", code, policyMessage(body))
		}
		if code, body := api.send(t, http.MethodPatch, fmt.Sprintf(path, "cp-1"), "application/merge-patch+json", patch, token, nil); code != http.StatusOK {
			t.Errorf("PATCH kleidinodes/cp-1/status with cp-1's pod-bound token: %d %s, want 200", code, policyMessage(body))
		}
		if got := c.kubectl(t, "get", "kleidinode", "cp-1", "-o", "jsonpath={.status.message}"); got != "reported with cp-1's pod token" {
			t.Errorf("cp-1's status.message = %q after the pod-bound token's write", got)
		}
	})
}

// apiClient sends requests to the test's kube-apiserver with its administrator token, impersonating a user.
type apiClient struct {
	c *coldStartCluster
}

func (a *apiClient) patchStatus(t *testing.T, node, patch, user string, extra map[string]string) (int, string) {
	t.Helper()
	return a.do(t, http.MethodPatch, "/apis/kleidi.dev/v1alpha1/kleidinodes/"+node+"/status", "application/merge-patch+json", patch, user, extra)
}

// do sends one request with the administrator's token as user with the given extra (the Impersonate-User and
// Impersonate-Extra-* headers kubectl --as sends) and returns the status code and body.
func (a *apiClient) do(t *testing.T, method, path, contentType, body, user string, extra map[string]string) (int, string) {
	t.Helper()
	h := http.Header{"Impersonate-User": {user}}
	for k, v := range extra {
		h.Set("Impersonate-Extra-"+url.PathEscape(k), v)
	}
	return a.send(t, method, path, contentType, body, a.c.token, h)
}

// send sends one request with a bearer token and returns the status code and body.
func (a *apiClient) send(t *testing.T, method, path, contentType, body, token string, h http.Header) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, a.c.apiURL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range h {
		req.Header[k] = v
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", contentType)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} // the test apiserver's self-signed certificate, on loopback
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// policyMessage returns the message of a Kubernetes Status body, or the body.
func policyMessage(body string) string {
	var st struct{ Message string }
	if json.Unmarshal([]byte(body), &st) == nil && st.Message != "" {
		return st.Message
	}
	return body
}

// TestOperatorAlertRules checks the operator's alerts with promtool, and runs their unit tests: each alert fires on
// the failure it names and stays silent otherwise.
func TestOperatorAlertRules(t *testing.T) {
	promtool := promtoolBin(t)
	if out, err := run(t, time.Minute, prometheusDir, nil, promtool, "check", "rules", operatorAlertsFile); err != nil {
		t.Errorf("promtool check rules %s: %v\n%s", operatorAlertsFile, err, out)
	}
	out, err := run(t, time.Minute, prometheusDir, nil, promtool, "test", "rules", operatorAlertsTest)
	if err != nil {
		t.Errorf("promtool test rules %s: %v\n%s", operatorAlertsTest, err, out)
	}
	t.Log(lastLine(out))
	rules, tests := readFile(t, operatorAlertsFile), readFile(t, operatorAlertsTest)
	for _, alert := range []string{"KleidiRotationStuck", "KleidiRotationBlocked", "KleidiRotationFailed", "KleidiNodeOutOfSync", "KleidiNodeNotApproved"} {
		if !strings.Contains(rules, "alert: "+alert+"\n") {
			t.Errorf("%s has no alert %s", operatorAlertsFile, alert)
		}
		if !strings.Contains(tests, "alertname: "+alert+"\n") {
			t.Errorf("%s does not test %s", operatorAlertsTest, alert)
		}
	}
}

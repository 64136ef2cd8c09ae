package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
)

var (
	kleidiOperatorBinary = &goBinary{name: "kleidi-operator", moduleDir: "operator", pkg: "./cmd/kleidi-operator"}
	kleidiAgentBinary    = &goBinary{name: "kleidi-agent", moduleDir: "operator", pkg: "./cmd/kleidi-agent"}

	kleidiPlugins = schema.GroupVersionResource{Group: "kleidi.dev", Version: "v1alpha1", Resource: "kleidiplugins"}
	kleidiNodes   = schema.GroupVersionResource{Group: "kleidi.dev", Version: "v1alpha1", Resource: "kleidinodes"}
	keyRotations  = schema.GroupVersionResource{Group: "kleidi.dev", Version: "v1alpha1", Resource: "keyrotations"}
)

// operatorNamespace is where the operator and the agents' service account live, as the chart installs them.
const operatorNamespace = "kleidi-system"

// operatorSuite is the operator deployment model on an haCluster: the chart's CRDs, RBAC and admission policy
// applied to the real apiservers, kube-controller-manager (for StorageVersionMigration and garbage collection),
// the operator, and one agent per node, each a process with its own kubeconfig as it would be a pod: the agent's
// impersonates the chart's agent service account with its node's claim, as a pod-bound token carries it.
type operatorSuite struct {
	h        *haCluster
	dir      string
	kc       string // the administrator's kubeconfig (system:masters), on node 1's apiserver
	dyn      dynamic.Interface
	operator *proc
	agents   map[string]*proc
	kcm      *proc
}

func newOperatorSuite(t testing.TB, h *haCluster) *operatorSuite {
	t.Helper()
	requireTool(t, "kubectl", "kubectl")
	requireTool(t, "helm", "helm (go install helm.sh/helm/v3/cmd/helm@v3.22.0)")
	kleidiOperatorBinary.build(t)
	kleidiAgentBinary.build(t)
	s := &operatorSuite{h: h, dir: filepath.Join(h.dir, "operator"), agents: map[string]*proc{}}
	if err := os.MkdirAll(s.dir, 0o711); err != nil {
		t.Fatal(err)
	}
	return s
}

// connect points the suite at n's apiserver: the administrator's kubeconfig and a dynamic client.
func (s *operatorSuite) connect(t testing.TB, n *haNode) {
	t.Helper()
	s.kc = s.kubeconfig(t, "admin", n, "", "")
	dyn, err := dynamic.NewForConfig(&rest.Config{Host: n.api.apiURL, BearerToken: s.h.token,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true}, Timeout: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	s.dyn = dyn
}

// kubeconfig writes a kubeconfig for n's apiserver with the administrator's token; with user set, it
// impersonates that user, and with node set, the node claim a pod-bound service account token carries. The file
// is readable by the plugin's uid, which the agents run as.
func (s *operatorSuite) kubeconfig(t testing.TB, name string, n *haNode, user, node string) string {
	t.Helper()
	var as strings.Builder
	if user != "" {
		fmt.Fprintf(&as, "    as: %s\n    as-groups: [system:serviceaccounts, system:serviceaccounts:%s, system:authenticated]\n", user, operatorNamespace)
	}
	if node != "" {
		fmt.Fprintf(&as, "    as-user-extra:\n      authentication.kubernetes.io/node-name: [%s]\n", node)
	}
	path := filepath.Join(s.dir, name+".kubeconfig")
	writeFile(t, path, fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: %s
    insecure-skip-tls-verify: true
users:
- name: e2e
  user:
    token: %s
%scontexts:
- name: e2e
  context: {cluster: e2e, user: e2e}
current-context: e2e
`, n.api.apiURL, s.h.token, as.String()), 0o600)
	if s.h.uid >= 0 {
		if err := os.Chown(path, s.h.uid, s.h.uid); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

// kubectl runs kubectl as the administrator with stdin and returns its output.
func (s *operatorSuite) kubectl(t testing.TB, stdin string, args ...string) string {
	t.Helper()
	out, err := s.tryKubectl(stdin, args...)
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (s *operatorSuite) tryKubectl(stdin string, args ...string) (string, error) {
	cmd := exec.Command("kubectl", append([]string{"--kubeconfig", s.kc}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// install applies what the chart installs besides the pods: the CRDs, the namespace, the service accounts, RBAC and
// the admission policy (helm template of deploy/helm/kleidi-operator).
func (s *operatorSuite) install(t testing.TB) {
	t.Helper()
	chart := filepath.Join(repoRoot, "deploy", "helm", "kleidi-operator")
	s.kubectl(t, "", "apply", "--server-side", "-f", filepath.Join(chart, "crds"))
	s.kubectl(t, "", "wait", "--for=condition=Established", "--timeout=60s", "crd/kleidiplugins.kleidi.dev", "crd/kleidinodes.kleidi.dev", "crd/keyrotations.kleidi.dev")
	s.kubectl(t, "", "create", "namespace", operatorNamespace)
	args := []string{"template", "kleidi", chart, "--namespace", operatorNamespace}
	for _, f := range []string{"serviceaccounts.yaml", "rbac-operator.yaml", "rbac-agent.yaml", "admissionpolicy.yaml"} {
		args = append(args, "--show-only", "templates/"+f)
	}
	out, err := exec.Command("helm", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("helm %v: %v\n%s", args, err, out)
	}
	s.kubectl(t, string(out), "apply", "--server-side", "-f", "-")
}

// startControllerManager runs kube-controller-manager against n's apiserver: its storage-version-migrator
// controller runs the StorageVersionMigrations, its garbage collector the owner references.
func (s *operatorSuite) startControllerManager(t testing.TB, n *haNode) {
	t.Helper()
	kcm := k8sBinary(t, "kube-controller-manager")
	kc := s.kubeconfig(t, "kube-controller-manager", n, "", "")
	s.kcm = s.h.procs.start(t, "kube-controller-manager", filepath.Join(s.dir, "kube-controller-manager.log"), nil, kcm,
		"--kubeconfig="+kc, "--authentication-kubeconfig="+kc, "--authorization-kubeconfig="+kc,
		"--leader-elect=false", "--secure-port=0", "--service-account-private-key-file="+s.h.saKey,
		"--controllers=*", "--v=2")
}

// createNodes makes Node objects for the control-plane nodes, as kubelets would register them.
func (s *operatorSuite) createNodes(t testing.TB, c *cluster, names ...string) {
	t.Helper()
	for _, name := range names {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"node-role.kubernetes.io/control-plane": ""}}}
		if _, err := c.cs.CoreV1().Nodes().Create(context.Background(), node, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}

// startOperator starts (or restarts) kleidi-operator with the administrator's kubeconfig and leader election.
func (s *operatorSuite) startOperator(t testing.TB, n *haNode) {
	t.Helper()
	kc := s.kubeconfig(t, "operator", n, "system:serviceaccount:"+operatorNamespace+":kleidi-operator", "")
	s.operator = s.h.procs.start(t, "kleidi-operator", filepath.Join(s.dir, "kleidi-operator.log"), nil,
		kleidiOperatorBinary.build(t), "--kubeconfig="+kc, "--namespace="+operatorNamespace,
		"--leader-elect", "--heartbeat-timeout=20s", fmt.Sprintf("--metrics-bind-address=127.0.0.1:%d", freePort(t)),
		fmt.Sprintf("--health-probe-bind-address=127.0.0.1:%d", freePort(t)))
}

// adminSocket is the path of n's plugin admin socket.
func adminSocket(n *haNode) string { return filepath.Join(n.plugin.sockDir, "admin.sock") }

// startAgent starts n's kleidi-agent as the plugin's uid, on n's apiserver (node 1's while n has none).
func (s *operatorSuite) startAgent(t testing.TB, n, via *haNode) {
	t.Helper()
	kc := s.kubeconfig(t, "agent-"+n.name, via, "system:serviceaccount:"+operatorNamespace+":kleidi-agent", n.name)
	s.agents[n.name] = s.h.procs.start(t, "kleidi-agent "+n.name, filepath.Join(n.dir, "kleidi-agent.log"), nil,
		as(s.h.uid, kleidiAgentBinary.build(t), "--kubeconfig="+kc, "--node-name="+n.name,
			"--admin-socket=unix://"+adminSocket(n))...)
}

func (s *operatorSuite) get(t testing.TB, gvr schema.GroupVersionResource, name string) *unstructured.Unstructured {
	t.Helper()
	u, err := s.dyn.Resource(gvr).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get %s %s: %v", gvr.Resource, name, err)
	}
	return u
}

func (s *operatorSuite) create(t testing.TB, gvr schema.GroupVersionResource, manifest string) {
	t.Helper()
	var obj map[string]any
	if err := json.Unmarshal([]byte(manifest), &obj); err != nil {
		t.Fatal(err)
	}
	if _, err := s.dyn.Resource(gvr).Create(context.Background(), &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create %s: %v", gvr.Resource, err)
	}
}

// mergePatch merge-patches an object (or its status, with subresource "status") as the administrator.
func (s *operatorSuite) mergePatch(t testing.TB, gvr schema.GroupVersionResource, name, patch string, subresource ...string) {
	t.Helper()
	if _, err := s.dyn.Resource(gvr).Patch(context.Background(), name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}, subresource...); err != nil {
		t.Fatalf("patch %s %s: %v", gvr.Resource, name, err)
	}
}

// str returns the string at path in u, or "".
func str(u *unstructured.Unstructured, path ...string) string {
	v, _, _ := unstructured.NestedString(u.Object, path...)
	return v
}

// condition returns the status condition of type typ in u: its status, reason and message.
func condition(u *unstructured.Unstructured, typ string) (status, reason, message string) {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == typ {
			status, _ = m["status"].(string)
			reason, _ = m["reason"].(string)
			message, _ = m["message"].(string)
		}
	}
	return status, reason, message
}

// approve approves n's enrollment as an administrator does: it compares the member ID the KleidiNode reports with
// the one `kleidi-server identity` prints on the node, then sets spec.approvedMemberID.
func (s *operatorSuite) approve(t testing.TB, n *haNode) string {
	t.Helper()
	var member string
	eventually(t, 60*time.Second, 250*time.Millisecond, n.name+" reports its member ID", func() error {
		u, err := s.dyn.Resource(kleidiNodes).Get(context.Background(), n.name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if member = str(u, "status", "memberID"); member == "" {
			return errNotYet
		}
		return nil
	})
	_, errOut, err := n.tryCLI("identity", nil)
	if err != nil {
		t.Fatalf("%s: kleidi-server identity: %v\n%s", n.name, err, errOut)
	}
	if !strings.Contains(errOut, "member ID: "+member) {
		t.Fatalf("%s: KleidiNode says member %s, the node's own identity says %q", n.name, member, errOut)
	}
	s.mergePatch(t, kleidiNodes, n.name, fmt.Sprintf(`{"spec":{"approvedMemberID":%q}}`, member))
	return member
}

// rotationPhase returns the phase of KeyRotation name.
func (s *operatorSuite) rotationPhase(t testing.TB, name string) string {
	return str(s.get(t, keyRotations, name), "status", "phase")
}

// waitPhase waits until KeyRotation name reaches phase, failing early if it fails.
func (s *operatorSuite) waitPhase(t testing.TB, name, phase string, timeout time.Duration) *unstructured.Unstructured {
	t.Helper()
	var u *unstructured.Unstructured
	eventually(t, timeout, 500*time.Millisecond, "rotation "+name+" "+phase, func() error {
		var err error
		if u, err = s.dyn.Resource(keyRotations).Get(context.Background(), name, metav1.GetOptions{}); err != nil {
			return err
		}
		got := str(u, "status", "phase")
		if got == "Failed" && phase != "Failed" {
			_, reason, msg := condition(u, "Complete")
			t.Fatalf("rotation %s failed: %s: %s", name, reason, msg)
		}
		if got != phase {
			_, reason, msg := condition(u, "Blocked")
			return fmt.Errorf("phase %s (blocked: %s %s)", got, reason, msg)
		}
		return nil
	})
	return u
}

// pokeAPIServers asks each apiserver for its KMS health until stop is closed: each request lets it poll its
// plugin's Status, as the kubelet's probes of a real control plane do.
func pokeAPIServers(nodes []*haNode, stop <-chan struct{}) {
	for {
		for _, n := range nodes {
			if n.api != nil {
				n.api.get("/healthz/kms-providers")
			}
		}
		select {
		case <-stop:
			return
		case <-time.After(2 * time.Second):
		}
	}
}

// k8sBinary returns the path of a Kubernetes binary of the e2e's version, built once into the cache by
// hack/k8s-binary.sh (kube-controller-manager, kubectl).
func k8sBinary(t testing.TB, name string) string {
	t.Helper()
	version := os.Getenv(envKubeVersion)
	if version == "" {
		version = defaultKubeVersion
	}
	start := time.Now()
	cmd := exec.Command(filepath.Join(repoRoot, "hack", "k8s-binary.sh"), name, version)
	cmd.Stderr = os.Stderr // progress of a first-time build
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("hack/k8s-binary.sh %s %s: %v", name, version, err)
	}
	t.Logf("%s %s (%s)", name, version, time.Since(start).Round(time.Millisecond))
	return strings.TrimSpace(string(out))
}

// agentClient is a client of node 1's apiserver as the agent of node would be: the chart's agent service account
// with that node's claim.
func (s *operatorSuite) agentClient(t testing.TB, node string) dynamic.Interface {
	t.Helper()
	cfg := &rest.Config{Host: s.h.nodes[0].api.apiURL, BearerToken: s.h.token,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true}, Timeout: 20 * time.Second,
		Impersonate: rest.ImpersonationConfig{UserName: "system:serviceaccount:" + operatorNamespace + ":kleidi-agent",
			Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + operatorNamespace, "system:authenticated"},
			Extra:  map[string][]string{"authentication.kubernetes.io/node-name": {node}}}}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return dyn
}

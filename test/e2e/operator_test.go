package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
)

// TestOperator runs the operator deployment model end to end: one etcd, three kube-apiservers each with its
// kleidi plugin on its own swtpm (the HA harness), kube-controller-manager, the operator, and three agents as
// processes. Nodes 2 and 3 start with no keyring and join through the operator once an administrator approves
// them; a KeyRotation then stages, activates, waits for every apiserver, migrates with StorageVersionMigration,
// verifies and retires, under a reader loop through all three apiservers. Then the faults: a forged transfer and a
// forged status, a node down during staging, an apiserver that does not adopt, the operator killed mid-rotation,
// and a fourth node joining.
func TestOperator(t *testing.T) {
	h := newHACluster(t)
	s := newOperatorSuite(t, h)
	n1, n2, n3 := h.addNode(t, "cp-1"), h.addNode(t, "cp-2"), h.addNode(t, "cp-3")
	nodes := []*haNode{n1, n2, n3}
	adminFlag := func(n *haNode) string { return "--admin-socket=unix://" + adminSocket(n) }

	start := time.Now()
	h.serve(t, n1, true, "--init", adminFlag(n1))
	h.serve(t, n2, false, adminFlag(n2)) // no keyring: they wait to join
	h.serve(t, n3, false, adminFlag(n3))
	h.startAPIServers(t, n1)
	s.connect(t, n1)
	s.install(t)
	s.startControllerManager(t, n1)
	s.createNodes(t, n1.api, "cp-1", "cp-2", "cp-3")
	s.startOperator(t, n1)
	for _, n := range nodes {
		s.startAgent(t, n, n1)
	}
	s.create(t, kleidiPlugins, `{"apiVersion":"kleidi.dev/v1alpha1","kind":"KleidiPlugin","metadata":{"name":"kleidi"},
		"spec":{"provider":"tpm","rotation":{"retiredKeyRetention":"5s"}}}`)
	t.Logf("control plane, operator and agents up in %s", time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		if t.Failed() { // what the operator saw, for the failure's diagnosis (keyrings are public; no key is shown)
			t.Logf("kubectl get kleidiplugins,kleidinodes,keyrotations:\n%s", s.kubectl(t, "", "get", "kleidiplugins,kleidinodes,keyrotations", "-o", "wide"))
			t.Logf("KleidiPlugin conditions:\n%s", s.kubectl(t, "", "get", "kleidiplugin", "kleidi", "-o",
				`jsonpath={range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}`))
			t.Logf("events:\n%s", s.kubectl(t, "", "get", "events", "-A", "--sort-by=.lastTimestamp"))
		}
	})

	members := map[string]string{}
	t.Run("enrollment", func(t *testing.T) {
		start := time.Now()
		for _, n := range nodes {
			members[n.name] = s.approve(t, n)
		}
		for _, n := range []*haNode{n2, n3} {
			n.plugin.waitHealthy(t, 120*time.Second)
		}
		h.startAPIServers(t, n2, n3)
		keyID := n1.plugin.keyID(t)
		for _, n := range nodes {
			if got := n.plugin.keyID(t); got != keyID {
				t.Errorf("%s reports key_id %s, cp-1 %s", n.name, got, keyID)
			}
		}
		eventually(t, 60*time.Second, 500*time.Millisecond, "KleidiPlugin lists three members", func() error {
			got, _, _ := unstructured.NestedStringSlice(s.get(t, kleidiPlugins, "kleidi").Object, "status", "members")
			for _, m := range members {
				if !slices.Contains(got, m) {
					return fmt.Errorf("members %v, want %v", got, members)
				}
			}
			return nil
		})
		t.Logf("three nodes enrolled through the operator in %s\n%s", time.Since(start).Round(time.Millisecond),
			s.kubectl(t, "", "get", "kleidinodes"))
	})
	if t.Failed() {
		return
	}

	ns := "operator-e2e"
	n1.api.ensureNamespace(t, ns)
	want := map[string]map[string]string{}
	for i, n := range nodes {
		for j := range 3 {
			name := fmt.Sprintf("s-%d-%d", i+1, j)
			want[name] = map[string]string{"v": "operator " + randHex(t, 8)}
			n.api.createSecret(t, ns, name, want[name])
		}
	}
	storedUnder := func(t *testing.T) map[string]string {
		ids := map[string]string{}
		for name := range want {
			raw := h.etcd.etcdGet(t, secretKey(ns, name))
			if bytes.Contains(raw, []byte(want[name]["v"])) || bytes.Contains(raw, []byte(base64.StdEncoding.EncodeToString([]byte(want[name]["v"])))) {
				t.Fatalf("etcd value of %s holds its plaintext", name)
			}
			o, err := parseEncryptedObject(raw)
			if err != nil {
				t.Fatalf("etcd value of %s: %v", name, err)
			}
			ids[name] = o.keyID
		}
		return ids
	}
	stopPoke := make(chan struct{})
	go pokeAPIServers(nodes, stopPoke)
	defer close(stopPoke)

	t.Run("rotation", func(t *testing.T) {
		old := n1.plugin.keyID(t)
		reader := startReaderLoop(nodes, ns, want)
		start := time.Now()
		s.create(t, keyRotations, `{"apiVersion":"kleidi.dev/v1alpha1","kind":"KeyRotation","metadata":{"name":"first"},"spec":{"reason":"e2e"}}`)
		var seen []string
		eventually(t, 6*time.Minute, 250*time.Millisecond, "rotation first Succeeded", func() error {
			phase := s.rotationPhase(t, "first")
			if len(seen) == 0 || seen[len(seen)-1] != phase {
				seen = append(seen, phase)
			}
			if phase != "Succeeded" {
				return fmt.Errorf("phase %s", phase)
			}
			return nil
		})
		reads, failures, first := reader.stop()
		t.Logf("rotation in %s through phases %v; reader: %d reads, %d failures", time.Since(start).Round(time.Millisecond), seen, reads, failures)
		if failures != 0 {
			t.Errorf("the reader failed %d of %d reads during the rotation: %v", failures, reads, first)
		}
		u := s.get(t, keyRotations, "first")
		newID := str(u, "status", "keyID")
		if newID == "" || newID == old || str(u, "status", "previousKeyID") != old {
			t.Fatalf("rotation status keyID %q previousKeyID %q, old key %s", newID, str(u, "status", "previousKeyID"), old)
		}
		for _, p := range []string{"Staging", "Observing", "Migrating", "Retiring"} {
			if !slices.Contains(seen, p) {
				t.Errorf("phase %s never seen: %v", p, seen)
			}
		}
		for name, id := range storedUnder(t) {
			if id != newID {
				t.Errorf("secret %s stored under %s after the rotation, want %s", name, id, newID)
			}
		}
		for _, n := range nodes {
			if got := n.plugin.keyID(t); got != newID {
				t.Errorf("%s reports key_id %s, want %s", n.name, got, newID)
			}
			out := n.cliOut(t, "recipients", nil)
			if strings.Contains(out, old) {
				t.Errorf("%s still holds the retired key %s after its retention:\n%s", n.name, old, out)
			}
		}
		t.Logf("kubectl get keyrotations:\n%s", s.kubectl(t, "", "get", "keyrotations"))
	})
	if t.Failed() {
		return
	}

	t.Run("forgeries", func(t *testing.T) {
		// The agent of cp-1 writes cp-2's status (a merge patch needs no read first): the admission policy refuses
		// it; its own passes the policy.
		agent := s.agentClient(t, "cp-1")
		_, err := agent.Resource(kleidiNodes).Patch(context.Background(), "cp-2", types.MergePatchType,
			[]byte(`{"status":{"activeKeyID":"kleidi-tpm-forged"}}`), metav1.PatchOptions{}, "status")
		if err == nil || !strings.Contains(err.Error(), "may update only KleidiNode cp-1, not cp-2") {
			t.Errorf("agent of cp-1 patching cp-2's status: err = %v, want the admission policy's refusal", err)
		}
		if _, err := agent.Resource(kleidiNodes).Patch(context.Background(), "cp-1", types.MergePatchType,
			[]byte(`{"spec":{"approvedMemberID":"tpm-forged"}}`), metav1.PatchOptions{}); err == nil {
			t.Error("the agent of cp-1 approved a member of its choosing")
		}
		if _, err := agent.Resource(kleidiNodes).Patch(context.Background(), "cp-1", types.MergePatchType,
			[]byte(`{"status":{"message":"written by its own agent"}}`), metav1.PatchOptions{}, "status"); err != nil {
			t.Errorf("agent of cp-1 patching its own status: %v", err)
		}
		// Whoever writes the keyring of record hands the nodes a KEK of their choosing, duplicated to cp-2's TPM: no
		// node takes it.
		keyID := n1.plugin.keyID(t)
		forge := buildForger(t, h.dir)
		identity := filepath.Join(h.dir, "cp-2.identity")
		if err := os.WriteFile(identity, n2.identity(t), 0o600); err != nil {
			t.Fatal(err)
		}
		forged := filepath.Join(h.dir, "forged-keyring.json")
		forgedID := strings.TrimSpace(mustRun(t, nil, forge, identity, n1.keyringFile(), forged, members["cp-1"], "bogus"))
		b, err := os.ReadFile(forged)
		if err != nil {
			t.Fatal(err)
		}
		s.mergePatch(t, kleidiPlugins, "kleidi", fmt.Sprintf(`{"status":{"keyring":%q,"keyringDigest":"sha256:forged"}}`,
			base64.StdEncoding.EncodeToString(b)), "status")
		eventually(t, 30*time.Second, 500*time.Millisecond, "the operator replaces the forged keyring of record", func() error {
			u := s.get(t, kleidiPlugins, "kleidi")
			if got := str(u, "status", "keyringDigest"); got == "sha256:forged" {
				return fmt.Errorf("record digest %s", got)
			}
			return nil
		})
		time.Sleep(6 * time.Second) // an agent loop after the replacement
		for _, n := range nodes {
			if got := n.plugin.keyID(t); got != keyID {
				t.Errorf("%s reports key_id %s after the forged keyring of record (forged KEK %s), want %s", n.name, got, forgedID, keyID)
			}
		}
	})

	t.Run("faults", func(t *testing.T) {
		// A node down during staging: cp-3's agent stops. The rotation is blocked, naming it, and resumes when it returns.
		s.agents["cp-3"].stop()
		time.Sleep(2 * time.Second)
		s.create(t, keyRotations, `{"apiVersion":"kleidi.dev/v1alpha1","kind":"KeyRotation","metadata":{"name":"second"},"spec":{}}`)
		eventually(t, 3*time.Minute, time.Second, "rotation second blocked on cp-3", func() error {
			st, reason, msg := condition(s.get(t, keyRotations, "second"), "Blocked")
			if st != "True" || !strings.Contains(msg, "cp-3") {
				return fmt.Errorf("Blocked %s %s: %s", st, reason, msg)
			}
			t.Logf("blocked: %s: %s", reason, msg)
			return nil
		})
		if phase := s.rotationPhase(t, "second"); phase != "Staging" && phase != "Pending" {
			t.Errorf("rotation second is %s while cp-3 is down, want it still staging", phase)
		}
		s.startAgent(t, n3, n1)

		// An apiserver that does not adopt: cp-2's kube-apiserver stops before the new key is active. No migration is
		// made while it has not, and the condition names it.
		u := s.waitPhase(t, "second", "Activating", 3*time.Minute)
		_ = u
		n2.api.apiserver.stop()
		s.waitPhase(t, "second", "Observing", 3*time.Minute)
		eventually(t, 3*time.Minute, time.Second, "rotation second waits for cp-2's apiserver alone", func() error {
			_, reason, msg := condition(s.get(t, keyRotations, "second"), "Progressing")
			_, breason, bmsg := condition(s.get(t, keyRotations, "second"), "Blocked")
			if m := msg + bmsg; !strings.Contains(m, "cp-2") || strings.Contains(m, "cp-1") || strings.Contains(m, "cp-3") {
				return fmt.Errorf("Progressing %s: %s; Blocked %s: %s", reason, msg, breason, bmsg)
			}
			t.Logf("waiting: %s: %s %s", reason, msg, bmsg)
			return nil
		})
		time.Sleep(5 * time.Second)
		if phase := s.rotationPhase(t, "second"); phase != "Observing" {
			t.Errorf("rotation second is %s while cp-2's apiserver has not adopted, want Observing", phase)
		}
		svms := s.kubectl(t, "", "get", "storageversionmigrations", "-o", "name")
		if strings.Contains(svms, "second") {
			t.Errorf("a migration exists before every apiserver adopted the key: %s", svms)
		}

		// The operator killed mid-rotation: it resumes from the status once it is back (with cp-2's apiserver).
		s.operator.cmd.Process.Signal(syscall.SIGKILL)
		<-s.operator.done
		n2.api.apiserver = h.procs.start(t, "kube-apiserver cp-2", filepath.Join(n2.dir, "kube-apiserver.log"), nil, n2.api.apiArgs...)
		h.waitReady(t, n2, 120*time.Second)
		s.startOperator(t, n1)
		u = s.waitPhase(t, "second", "Succeeded", 5*time.Minute)
		newID := str(u, "status", "keyID")
		for name, id := range storedUnder(t) {
			if id != newID {
				t.Errorf("secret %s stored under %s after the second rotation, want %s", name, id, newID)
			}
		}
	})

	t.Run("fourth node joins, then leaves", func(t *testing.T) {
		n4 := h.addNode(t, "cp-4")
		h.serve(t, n4, false, adminFlag(n4))
		s.createNodes(t, n1.api, "cp-4")
		s.startAgent(t, n4, n1)
		member4 := s.approve(t, n4)
		n4.plugin.waitHealthy(t, 120*time.Second)
		if got, want := n4.plugin.keyID(t), n1.plugin.keyID(t); got != want {
			t.Errorf("cp-4 reports key_id %s, cp-1 %s", got, want)
		}
		// It reads what the others wrote: the stored objects' DEKs decrypt through its plugin.
		for name := range want {
			o, err := parseEncryptedObject(h.etcd.etcdGet(t, secretKey(ns, name)))
			if err != nil {
				t.Fatal(err)
			}
			if err := n4.decryptAt(o); err != nil {
				t.Errorf("cp-4 cannot decrypt %s: %v", name, err)
			}
		}
		t.Logf("kubectl get kleidinodes:\n%s", s.kubectl(t, "", "get", "kleidinodes"))

		// The node goes away for good: its Node is deleted, its KleidiNode with it, and the operator unenrolls its
		// member (a rotation to a key it never held), then re-encrypts and retires what it held.
		before := n1.plugin.keyID(t)
		if err := n1.api.cs.CoreV1().Nodes().Delete(context.Background(), "cp-4", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		eventually(t, 2*time.Minute, 500*time.Millisecond, "cp-4's member unenrolled", func() error {
			got, _, _ := unstructured.NestedStringSlice(s.get(t, kleidiPlugins, "kleidi").Object, "status", "members")
			if slices.Contains(got, member4) {
				return fmt.Errorf("members %v", got)
			}
			return nil
		})
		if out := n1.cliOut(t, "recipients", nil); strings.Contains(out, member4) {
			t.Errorf("cp-1's keyring still lists %s:\n%s", member4, out)
		}
		rotations := s.kubectl(t, "", "get", "keyrotations", "-o", "name")
		name := ""
		for line := range strings.SplitSeq(rotations, "\n") {
			if strings.HasPrefix(line, "keyrotation.kleidi.dev/unenroll-") {
				name = strings.TrimPrefix(line, "keyrotation.kleidi.dev/")
			}
		}
		if name == "" {
			t.Fatalf("no KeyRotation after unenrolling cp-4: %s", rotations)
		}
		u := s.waitPhase(t, name, "Succeeded", 5*time.Minute)
		t.Logf("cp-4 removed, re-encrypted and retired in %s", time.Since(start).Round(time.Millisecond))
		newID := str(u, "status", "keyID")
		if newID == before {
			t.Errorf("the key after unenrolling cp-4 is still %s", before)
		}
		for name, id := range storedUnder(t) {
			if id != newID {
				t.Errorf("secret %s stored under %s after cp-4 left, want %s", name, id, newID)
			}
		}
		if out := n2.cliOut(t, "recipients", nil); strings.Contains(out, before) {
			t.Errorf("cp-2 still holds %s, which cp-4 held, after the retention:\n%s", before, out)
		}
	})
}

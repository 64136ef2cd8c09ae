package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// haSuite is the state the HA scenarios share, in order.
type haSuite struct {
	h       *haCluster
	live    []*haNode // members whose plugins serve
	apis    []*haNode // members with a kube-apiserver
	ns      string
	want    map[string]map[string]string // Secret name -> data ("v": value)
	next    int
	members map[string]string // node name -> member ID
}

// TestHA runs an HA control plane on one machine (one etcd; per node a swtpm with an endorsement key, a
// kleidi-server on it as a non-root uid, a kube-apiserver) through the life of a keyring shared by several TPMs:
// bootstrap by enrollment, a coordinated rotation under read traffic, a node replaced, a TPM cleared, every TPM
// cleared and recovered with the offline recovery key, and a forged duplicate refused.
func TestHA(t *testing.T) {
	suiteStart := time.Now()
	var times []string
	defer func() {
		times = append(times, fmt.Sprintf("total: %s", time.Since(suiteStart).Round(time.Millisecond)))
		t.Logf("wall times:\n  %s", strings.Join(times, "\n  "))
	}()
	setup := time.Now()
	s := &haSuite{h: newHACluster(t), ns: "e2e-ha", want: map[string]map[string]string{}, members: map[string]string{}}
	for _, name := range []string{"node1", "node2", "node3"} {
		s.h.addNode(t, name)
	}
	times = append(times, fmt.Sprintf("setup: %s", time.Since(setup).Round(time.Millisecond)))

	scenarios := []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"1_bootstrap_by_enrollment", s.bootstrap},
		{"2_coordinated_rotation", s.coordinatedRotation},
		{"3_node_replaced", s.nodeReplaced},
		{"4_one_tpm_cleared", s.oneTPMCleared},
		{"5_every_tpm_cleared_recovery", s.everyTPMCleared},
		{"6_forged_duplicate", s.forgedDuplicate},
	}
	for _, sc := range scenarios {
		start := time.Now()
		ok := t.Run(sc.name, sc.fn)
		times = append(times, fmt.Sprintf("%s: %s", sc.name, time.Since(start).Round(time.Millisecond)))
		if !ok {
			t.Fatalf("scenario %s failed; the later ones depend on its state and are not run", sc.name)
		}
	}
	// No log a plugin wrote, through every scenario, holds the recovery key's passphrase.
	pass := readSecret(t, s.h.recoveryPass)
	for _, n := range s.h.nodes {
		logs, err := filepath.Glob(filepath.Join(n.plugin.dir, "*.log"))
		if err != nil || len(logs) < 2 {
			t.Fatalf("%s: plugin logs %v %v, want the output and the audit log", n.name, logs, err)
		}
		for _, path := range logs {
			if b, err := os.ReadFile(path); err != nil || bytes.Contains(b, pass) {
				t.Errorf("%s holds the recovery passphrase (or cannot be read: %v)", path, err)
			}
		}
	}
}

func (s *haSuite) node(name string) *haNode {
	for _, n := range s.h.nodes {
		if n.name == name {
			return n
		}
	}
	panic("no node " + name)
}

// addSecret creates a Secret with a random value through n's apiserver and remembers it.
func (s *haSuite) addSecret(t testing.TB, n *haNode) string {
	t.Helper()
	name := fmt.Sprintf("ha%02d", s.next)
	s.next++
	data := map[string]string{"v": "ha-" + randHex(t, 16)}
	n.api.createSecret(t, s.ns, name, data)
	s.want[name] = data
	return name
}

// checkEverywhere reads every remembered Secret through every apiserver.
func (s *haSuite) checkEverywhere(t testing.TB) {
	t.Helper()
	for _, n := range s.apis {
		for name, data := range s.want {
			got, err := n.api.readSecret(s.ns, name)
			if err != nil {
				t.Fatalf("get secret %s through %s: %v", name, n.name, err)
			}
			if got["v"] != data["v"] {
				t.Fatalf("secret %s through %s: wrong content", name, n.name)
			}
		}
	}
}

// stored reads a Secret's bytes from etcd, checks that it is a kleidi KMS v2 envelope holding no plaintext, and
// parses it.
func (s *haSuite) stored(t testing.TB, name string) *encryptedObject {
	t.Helper()
	raw := s.h.etcd.etcdGet(t, secretKey(s.ns, name))
	if !bytes.HasPrefix(raw, []byte(kmsPrefix)) {
		t.Fatalf("etcd value of %s does not start with %q: %q", name, kmsPrefix, raw[:min(len(raw), 48)])
	}
	v := s.want[name]["v"]
	if bytes.Contains(raw, []byte(v)) || bytes.Contains(raw, []byte(base64.StdEncoding.EncodeToString([]byte(v)))) {
		t.Fatalf("etcd value of %s holds its plaintext", name)
	}
	o, err := parseEncryptedObject(raw)
	if err != nil {
		t.Fatalf("etcd value of %s: %v", name, err)
	}
	return o
}

// sameKeyID waits until every live plugin reports want (or, with want empty, one same key_id) and returns it.
func (s *haSuite) sameKeyID(t testing.TB, want string) string {
	t.Helper()
	var id string
	eventually(t, 30*time.Second, 200*time.Millisecond, "every plugin reports the same key_id", func() error {
		ids := map[string]string{}
		for _, n := range s.live {
			st, err := n.plugin.status()
			if err != nil {
				return fmt.Errorf("%s: %v", n.name, err)
			}
			if st.Healthz != "ok" {
				return fmt.Errorf("%s: healthz %q", n.name, st.Healthz)
			}
			ids[n.name] = st.KeyId
		}
		first := ids[s.live[0].name]
		for name, got := range ids {
			if got != first || (want != "" && got != want) {
				return fmt.Errorf("%s reports %s (want %q, all: %v)", name, got, want, ids)
			}
		}
		id = first
		return nil
	})
	return id
}

// apiserversObserve waits until every apiserver has seen key_id from its plugin's Status.
func (s *haSuite) apiserversObserve(t testing.TB, keyID string) {
	t.Helper()
	hash := keyIDHash(keyID)
	for _, n := range s.apis {
		eventually(t, 60*time.Second, time.Second, "apiserver "+n.name+" observed "+keyID, func() error {
			if sumMetric(n.api.metrics(t), "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds",
				`provider_name="kleidi"`, `key_id_hash="`+hash+`"`) == 0 {
				// A Status call is due every 20 s when healthy; a health request triggers it.
				_, _, _ = n.api.get("/healthz/kms-providers")
				return errNotYet
			}
			return nil
		})
	}
}

// Scenario 1: node 1 initialises its keyring; nodes 2 and 3 hand their identity to node 1, which enrolls them;
// the keyring is copied to them and they start. Secrets written through each apiserver (and those written by
// node 1 alone before) are read through every other, stored encrypted, and every plugin reports one key_id.
func (s *haSuite) bootstrap(t *testing.T) {
	h := s.h
	n1, n2, n3 := s.node("node1"), s.node("node2"), s.node("node3")
	h.serve(t, n1, true, "--init")
	s.live = []*haNode{n1}
	h.startAPIServers(t, n1)
	s.apis = []*haNode{n1}
	n1.api.ensureNamespace(t, s.ns)
	for range 3 {
		s.addSecret(t, n1)
	}
	s.members["node1"] = mustIdentityID(t, n1.identity(t))
	for _, n := range []*haNode{n2, n3} {
		start := time.Now()
		id := n.identity(t)
		m := n1.enroll(t, id, n.name)
		if want := mustIdentityID(t, id); m != want {
			t.Errorf("enroll of %s printed member %s, its identity file says %s", n.name, m, want)
		}
		s.members[n.name] = m
		t.Logf("%s enrolled as %s in %s", n.name, m, time.Since(start).Round(time.Millisecond))
	}
	h.copyKeyring(t, n1, n2, n3)
	for _, n := range []*haNode{n2, n3} {
		h.serve(t, n, true)
	}
	s.live = []*haNode{n1, n2, n3}
	keyID := s.sameKeyID(t, "")
	t.Logf("every plugin reports key_id %s", keyID)
	h.startAPIServers(t, n2, n3)
	s.apis = []*haNode{n1, n2, n3}
	for _, n := range s.apis {
		for range 2 {
			s.addSecret(t, n)
		}
	}
	s.checkEverywhere(t)
	for name := range s.want {
		if o := s.stored(t, name); o.keyID != keyID {
			t.Errorf("secret %s stored under key_id %s, the plugins report %s", name, o.keyID, keyID)
		}
	}
	// Each plugin decrypts every stored seed on its own, not only through its apiserver's cache.
	for _, n := range s.live {
		for name := range s.want {
			if err := n.decryptAt(s.stored(t, name)); err != nil {
				t.Fatalf("%s's plugin Decrypt of %s's seed: %v", n.name, name, err)
			}
		}
	}
}

// mustIdentityID returns the "id" an identity file states.
func mustIdentityID(t testing.TB, identity []byte) string {
	t.Helper()
	i := bytes.Index(identity, []byte(`"id"`))
	if i < 0 {
		t.Fatalf("identity file without an id:\n%s", identity)
	}
	rest := identity[i+len(`"id"`):]
	start := bytes.IndexByte(rest, '"')
	end := bytes.IndexByte(rest[start+1:], '"')
	if start < 0 || end < 0 {
		t.Fatalf("identity file with a malformed id:\n%s", identity)
	}
	return string(rest[start+1 : start+1+end])
}

// Scenario 2: a coordinated rotation. Node 1 stages a KEK for every member; the keyring goes to nodes 2 and 3;
// each node activates it; every Secret is written again. A reader over all three apiservers sees no error
// throughout, and afterwards every Secret in etcd names the new key.
func (s *haSuite) coordinatedRotation(t *testing.T) {
	h := s.h
	n1, n2, n3 := s.node("node1"), s.node("node2"), s.node("node3")
	old := s.sameKeyID(t, "")
	r := startReaderLoop(s.apis, s.ns, s.want)
	stopped := false
	defer func() {
		if !stopped {
			r.stop()
		}
	}()
	staged := outField(t, n1.cliOut(t, "rotate", []string{"--stage"}), "staged_key_id")
	if staged == old {
		t.Fatalf("rotate --stage staged the active key ID %s", old)
	}
	t.Logf("staged %s", staged)
	// Staged is not active: node 1 keeps encrypting under the old key.
	time.Sleep(6 * time.Second) // longer than a plugin's keyring reload
	if id := n1.plugin.keyID(t); id != old {
		t.Fatalf("node 1 reports %s after rotate --stage, want the active %s", id, old)
	}
	h.copyKeyring(t, n1, n2, n3)
	for _, n := range []*haNode{n2, n3} {
		s.waitImported(t, n, staged)
	}
	for _, n := range []*haNode{n1, n2, n3} {
		if got := outField(t, n.cliOut(t, "activate", nil, staged), "key_id"); got != staged {
			t.Fatalf("%s: activate %s: key_id %s", n.name, staged, got)
		}
	}
	s.sameKeyID(t, staged)
	s.apiserversObserve(t, staged)
	ctx := context.Background()
	list, err := n1.api.cs.CoreV1().Secrets(s.ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range list.Items {
		n := s.apis[i%len(s.apis)]
		if _, err := n.api.cs.CoreV1().Secrets(s.ns).Update(ctx, &list.Items[i], metav1.UpdateOptions{}); err != nil {
			t.Fatalf("re-encrypting update of %s through %s: %v", list.Items[i].Name, n.name, err)
		}
	}
	time.Sleep(2 * time.Second) // the reader goes on a little after the last write
	reads, failures, first := r.stop()
	stopped = true
	t.Logf("reader: %d reads over %d apiservers, %d failures", reads, len(s.apis), failures)
	if failures > 0 || reads == 0 {
		t.Fatalf("reader during the rotation: %d failures of %d reads: %v", failures, reads, first)
	}
	for name := range s.want {
		if o := s.stored(t, name); o.keyID != staged {
			t.Errorf("secret %s still under %s after re-encryption, want %s", name, o.keyID, staged)
		}
	}
	s.checkEverywhere(t)
}

// waitImported waits until n's plugin has imported its copy of keyID, which another member made for it: the
// copy in n's keyring is n's own (no "(from ...)"), as the docs tell an operator to check before activate.
func (s *haSuite) waitImported(t testing.TB, n *haNode, keyID string) {
	t.Helper()
	eventually(t, 20*time.Second, 250*time.Millisecond, n.name+" imported "+keyID, func() error {
		to := wrappedFor(n.cliOut(t, "recipients", nil), keyID)
		for _, m := range to {
			if m == s.members[n.name] {
				return nil
			}
		}
		return fmt.Errorf("%s wrapped for %v", keyID, to)
	})
}

// members returns the member IDs a KEK is wrapped for, with or without a sender.
func members(wrapped []string) map[string]bool {
	out := map[string]bool{}
	for _, w := range wrapped {
		id, _, _ := strings.Cut(w, " ")
		out[id] = true
	}
	return out
}

// Scenario 3: a fourth node joins (identity, enroll, keyring copied) and decrypts everything; node 3 leaves
// (unenroll, which rotates): `recipients` shows the new KEK not wrapped for node 3, and node 3's plugin, even
// with the new keyring and the attached key of data under the new KEK, cannot decrypt it.
func (s *haSuite) nodeReplaced(t *testing.T) {
	h := s.h
	n1, n2, n3 := s.node("node1"), s.node("node2"), s.node("node3")
	n4 := h.addNode(t, "node4")
	before := s.sameKeyID(t, "")
	m4 := n1.enroll(t, n4.identity(t), n4.name)
	s.members["node4"] = m4
	h.copyKeyring(t, n1, n2, n3, n4)
	h.serve(t, n4, true)
	s.live = []*haNode{n1, n2, n3, n4}
	s.sameKeyID(t, before)
	for name := range s.want {
		if err := n4.decryptAt(s.stored(t, name)); err != nil {
			t.Fatalf("node 4's plugin Decrypt of %s's seed: %v", name, err)
		}
	}

	newID := outField(t, n1.cliOut(t, "unenroll", nil, s.members["node3"]), "key_id")
	if newID == before {
		t.Fatalf("unenroll kept the key ID %s, want a rotation", before)
	}
	out := n1.cliOut(t, "recipients", nil)
	t.Logf("recipients after unenrolling node 3:\n%s", out)
	newTo, oldTo := members(wrappedFor(out, newID)), members(wrappedFor(out, before))
	t.Logf("the old KEK %s stays wrapped for %d members", before, len(oldTo))
	if newTo[s.members["node3"]] {
		t.Errorf("recipients: the new KEK %s is wrapped for the unenrolled node 3 (%s)", newID, s.members["node3"])
	}
	for _, m := range []string{"node1", "node2", "node4"} {
		if !newTo[s.members[m]] {
			t.Errorf("recipients: the new KEK %s is not wrapped for %s (%s): %v", newID, m, s.members[m], newTo)
		}
	}
	// Node 3 gets the new keyring too: it is no secret, and a node that left may still read it.
	h.copyKeyring(t, n1, n2, n3, n4)
	s.live, s.apis = []*haNode{n1, n2, n4}, []*haNode{n1, n2}
	s.sameKeyID(t, newID)
	s.apiserversObserve(t, newID)
	name := s.addSecret(t, n1)
	o := s.stored(t, name)
	if o.keyID != newID {
		t.Fatalf("secret %s stored under %s, want %s", name, o.keyID, newID)
	}
	if err := n3.decryptAt(o); err == nil {
		t.Fatalf("node 3's plugin decrypted data under %s, a KEK made after it was unenrolled", newID)
	} else {
		t.Logf("node 3's plugin refuses data under the new KEK: %v", err)
	}
	if id, err := n3.encryptAt(); err == nil && id == newID {
		t.Fatalf("node 3's plugin encrypts under %s, a KEK made after it was unenrolled", newID)
	}
	st, err := n3.plugin.status()
	t.Logf("node 3's plugin with the new keyring: %v %v", st, err)
	// Node 3 leaves the control plane.
	n3.api.apiserver.stop()
	n3.plugin.proc.stop()
	for _, n := range []*haNode{n2, n4} {
		if err := n.decryptAt(o); err != nil {
			t.Fatalf("%s's plugin Decrypt of data under %s: %v", n.name, newID, err)
		}
	}
	s.checkEverywhere(t)
}

// Scenario 4: node 2's TPM is cleared (a new endorsement key). Its plugin reports unhealthy and its apiserver's
// KMS readiness check fails. Node 2 is replaced as the docs say: its state directory emptied, its new identity
// enrolled on node 1, the keyring copied, the plugin started; the old identity is unenrolled (a rotation) and the
// keyring copied again. Node 2 is healthy again and nothing is lost.
func (s *haSuite) oneTPMCleared(t *testing.T) {
	h := s.h
	n1, n2, n4 := s.node("node1"), s.node("node2"), s.node("node4")
	keyID := s.sameKeyID(t, "")
	h.clearTPM(t, n2)
	eventually(t, 30*time.Second, 200*time.Millisecond, "node 2's plugin unhealthy", func() error {
		st, err := n2.plugin.status()
		if err != nil {
			return err
		}
		if st.Healthz == "ok" {
			return errNotYet
		}
		t.Logf("node 2 healthz: %q", st.Healthz)
		return nil
	})
	eventually(t, 60*time.Second, time.Second, "node 2's apiserver KMS readiness fails", func() error {
		code, body, err := n2.kmsReady()
		if err != nil {
			return err
		}
		if code == http.StatusOK {
			return errNotYet
		}
		t.Logf("node 2 /readyz/kms-providers %d: %s", code, lastLines(body, 2))
		return nil
	})
	// The KEKs it unwrapped before stay in memory, so it may still encrypt under the genuine active KEK, which
	// every other member decrypts: nothing is lost by it. Its apiserver, unready, gets no traffic from a load
	// balancer.
	id, err := n2.encryptAt()
	t.Logf("node 2's plugin Encrypt with its TPM cleared: key_id %q, %v", id, err)

	start := time.Now()
	n2.plugin.proc.stop()
	n2.emptyState(t)
	old := s.members["node2"]
	m := n1.enroll(t, n2.identity(t), "node2-replaced")
	if m == old {
		t.Fatalf("node 2 with a cleared TPM has its old member ID %s", m)
	}
	s.members["node2"] = m
	h.copyKeyring(t, n1, n2, n4)
	h.serve(t, n2, true)
	s.sameKeyID(t, keyID)
	t.Logf("node 2 joined again in %s", time.Since(start).Round(time.Millisecond))
	h.waitReady(t, n2, 60*time.Second)
	for name := range s.want {
		if err := n2.decryptAt(s.stored(t, name)); err != nil {
			t.Fatalf("node 2's plugin, joined again, Decrypt of %s's seed: %v", name, err)
		}
	}
	// The old identity goes: a rotation, since the old TPM could still unwrap the copies it had.
	rotated := outField(t, n1.cliOut(t, "unenroll", nil, old), "key_id")
	h.copyKeyring(t, n1, n2, n4)
	s.sameKeyID(t, rotated)
	if members(wrappedFor(n1.cliOut(t, "recipients", nil), rotated))[old] {
		t.Errorf("the KEK %s made by unenrolling node 2's old identity is wrapped for it", rotated)
	}
	s.apiserversObserve(t, rotated)
	s.addSecret(t, n2)
	s.checkEverywhere(t)
}

// Scenario 5: every TPM is cleared. Node 1 recovers a working keyring with the offline recovery key; nodes 2
// and 4 join again; every Secret is readable, also through an apiserver restarted with no DEK cache.
func (s *haSuite) everyTPMCleared(t *testing.T) {
	h := s.h
	n1, n2, n4 := s.node("node1"), s.node("node2"), s.node("node4")
	for _, n := range s.live {
		h.clearTPM(t, n)
	}
	eventually(t, 30*time.Second, 200*time.Millisecond, "node 1's plugin unhealthy", func() error {
		st, err := n1.plugin.status()
		if err != nil {
			return err
		}
		if st.Healthz == "ok" {
			return errNotYet
		}
		return nil
	})
	for _, n := range s.live {
		n.plugin.proc.stop()
	}
	start := time.Now()
	out := n1.cliOut(t, "recover", []string{"--recovery-private-key=" + h.recoveryPriv, "--recovery-passphrase-file=" + h.recoveryPass})
	t.Logf("recover on node 1 in %s: %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(out))
	h.serve(t, n1, true)
	s.members["node1"] = mustIdentityID(t, n1.identity(t))
	for _, n := range []*haNode{n2, n4} {
		n.emptyState(t)
		s.members[n.name] = n1.enroll(t, n.identity(t), n.name+"-recovered")
	}
	h.copyKeyring(t, n1, n2, n4)
	for _, n := range []*haNode{n2, n4} {
		h.serve(t, n, true)
	}
	keyID := s.sameKeyID(t, "")
	t.Logf("after recovery every plugin reports %s", keyID)
	for _, n := range s.live {
		for name := range s.want {
			if err := n.decryptAt(s.stored(t, name)); err != nil {
				t.Fatalf("%s's plugin after recovery, Decrypt of %s's seed: %v", n.name, name, err)
			}
		}
	}
	n1.api.restartAPIServer(t)
	s.checkEverywhere(t)
	s.addSecret(t, n1)
	s.checkEverywhere(t)
}

// Scenario 6: someone who knows node 2's identity (public) and can write its keyring adds a KEK of their own,
// duplicated to node 2's TPM, without a valid sender signature, and makes it active. Node 2's plugin refuses
// it: it never reports or encrypts under the forged key.
func (s *haSuite) forgedDuplicate(t *testing.T) {
	h := s.h
	n1, n2 := s.node("node1"), s.node("node2")
	good := s.sameKeyID(t, "")
	forge := buildForger(t, h.dir)
	identity := filepath.Join(h.dir, "node2-identity.json")
	writeFile(t, identity, string(n2.identity(t)), 0o600)
	for _, mode := range []string{"bogus", "none"} {
		forged := filepath.Join(h.dir, "keyring-forged-"+mode+".json")
		keyID := strings.TrimSpace(mustRun(t, nil, forge, identity, n1.keyringFile(), forged, s.members["node1"], mode))
		t.Logf("forged KEK %s duplicated to node 2 (sender signature: %s)", keyID, mode)
		b, err := os.ReadFile(forged)
		if err != nil {
			t.Fatal(err)
		}
		h.writeKeyring(t, n2, b)
		// The forged keyring is well formed: what refuses the KEK is its missing proof, not the file's form.
		if to := wrappedFor(n2.cliOut(t, "recipients", nil), keyID); len(to) != 1 {
			t.Fatalf("recipients does not list the forged KEK %s once: %v", keyID, to)
		}
		// Longer than a plugin's keyring reload: node 2 reads the forged keyring and must not use the KEK.
		deadline := time.Now().Add(8 * time.Second)
		for time.Now().Before(deadline) {
			if st, err := n2.plugin.status(); err == nil && st.KeyId == keyID {
				t.Fatalf("node 2 reports the forged KEK %s as its key_id (signature %s)", keyID, mode)
			}
			if id, err := n2.encryptAt(); err == nil && id == keyID {
				t.Fatalf("node 2 encrypts under the forged KEK %s (signature %s)", keyID, mode)
			}
			time.Sleep(500 * time.Millisecond)
		}
		name := s.addSecret(t, n2)
		if o := s.stored(t, name); o.keyID == keyID {
			t.Fatalf("node 2's apiserver stored %s under the forged KEK", name)
		}
		st, err := n2.plugin.status()
		t.Logf("node 2 with the forged keyring (%s): status %v %v", mode, st, err)
		h.copyKeyring(t, n1, n2)
		s.sameKeyID(t, good)
	}
	s.checkEverywhere(t)
}

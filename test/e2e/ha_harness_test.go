package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	kmsapi "k8s.io/kms/apis/v2"
)

// haCluster is an HA control plane on one machine: one etcd and, per control-plane node, a swtpm manufactured
// with an endorsement key and its certificate, a kleidi-server on it (as a non-root uid) and a kube-apiserver
// that encrypts Secrets through that plugin. Every apiserver shares the etcd, the service-account key and the
// bearer token, as the apiservers of one cluster do.
type haCluster struct {
	dir   string
	procs *procs
	etcd  *cluster // only the etcd half: its URL and etcdctl
	token string
	saKey string
	toks  string
	// setupConf is the swtpm_setup configuration whose local CA (its own, in dir) signs every EK certificate.
	setupConf string
	// caCert is the root certificate of that local CA.
	caCert string
	// recoveryPub, recoveryPriv and recoveryPass are the OpenPGP recovery key: its public half is given to
	// every plugin, the private half and its passphrase stay with the test, as an operator keeps them offline.
	recoveryPub, recoveryPriv, recoveryPass string
	nodes                                   []*haNode
	uid                                     int
}

// haNode is one control-plane node of an haCluster.
type haNode struct {
	name   string
	dir    string
	tpm    *swtpm
	plugin *plugin
	api    *cluster // nil for a node without a kube-apiserver
}

// newHACluster starts etcd and makes the local EK CA and the recovery key; nodes are added with addNode.
func newHACluster(t testing.TB) *haCluster {
	t.Helper()
	requireTool(t, "etcd", "etcd-server")
	requireTool(t, "etcdctl", "etcd-client")
	requireTool(t, "swtpm_setup", "swtpm-tools")
	requireTool(t, "swtpm_localca", "swtpm-tools")
	h := &haCluster{dir: workDir(t, "kleidi-ha-"), procs: newProcs(t), uid: -1}
	if os.Geteuid() == 0 {
		h.uid = pluginUID
	}
	h.etcd = &cluster{dir: h.dir, procs: h.procs}
	h.etcd.startEtcd(t)

	h.token = "e2e-" + randHex(t, 16)
	h.toks = filepath.Join(h.dir, "tokens.csv")
	writeFile(t, h.toks, h.token+",e2e-admin,e2e-admin,system:masters\n", 0o600)
	h.saKey = filepath.Join(h.dir, "sa.key")
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, h.saKey, string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})), 0o600)

	// A local CA of the test's own, so that swtpm_setup never writes the machine's /var/lib/swtpm-localca.
	ca := filepath.Join(h.dir, "ek-ca")
	if err := os.MkdirAll(ca, 0o700); err != nil {
		t.Fatal(err)
	}
	caConf := filepath.Join(ca, "swtpm-localca.conf")
	writeFile(t, caConf, fmt.Sprintf("statedir = %[1]s\nsigningkey = %[1]s/signkey.pem\nissuercert = %[1]s/issuercert.pem\ncertserial = %[1]s/certserial\n", ca), 0o600)
	caOpts := filepath.Join(ca, "swtpm-localca.options")
	writeFile(t, caOpts, "--platform-manufacturer kleidi\n--platform-version 2.1\n--platform-model e2e\n", 0o600)
	h.setupConf = filepath.Join(ca, "swtpm_setup.conf")
	writeFile(t, h.setupConf, "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = "+caConf+
		"\ncreate_certs_tool_options = "+caOpts+"\nactive_pcr_banks = sha256\n", 0o600)
	h.caCert = filepath.Join(ca, "swtpm-localca-rootca-cert.pem")

	keys := filepath.Join(h.dir, "recovery")
	if err := os.MkdirAll(keys, 0o711); err != nil {
		t.Fatal(err)
	}
	h.recoveryPub, h.recoveryPriv, h.recoveryPass = gpgKey(t, keys, h.uid)
	return h
}

// manufacture makes a new TPM state in dir, as a TPM vendor does: an RSA and an ECC endorsement key, each with
// a certificate from the local CA. Whatever state was there is gone (a cleared TPM).
func (h *haCluster) manufacture(t testing.TB, dir string) {
	t.Helper()
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	mustRun(t, nil, "swtpm_setup", "--tpm2", "--tpmstate", dir, "--createek", "--create-ek-cert",
		"--config", h.setupConf, "--overwrite", "--logfile", filepath.Join(filepath.Dir(dir), "swtpm_setup.log"))
	t.Logf("swtpm_setup (EK and EK certificate) of %s in %s", dir, time.Since(start).Round(time.Millisecond))
}

// addNode manufactures a swtpm for a new node, starts it and prepares (does not start) its plugin.
func (h *haCluster) addNode(t testing.TB, name string) *haNode {
	t.Helper()
	n := &haNode{name: name, dir: filepath.Join(h.dir, name)}
	if err := os.MkdirAll(n.dir, 0o711); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(n.dir, 0o711); err != nil {
		t.Fatal(err)
	}
	swDir := filepath.Join(n.dir, "swtpm")
	if err := os.MkdirAll(swDir, 0o711); err != nil {
		t.Fatal(err)
	}
	h.manufacture(t, filepath.Join(swDir, "tpmstate"))
	n.tpm = startSwtpm(t, h.procs, swDir, h.uid)
	n.plugin = newPlugin(t, h.procs, filepath.Join(n.dir, "kleidi"), "tpm",
		[]string{"--tpm=" + n.tpm.addr(), "--tpm-pcrs=7", "--recovery-key=" + h.recoveryPub})
	h.nodes = append(h.nodes, n)
	return n
}

// clearTPM stops the node's swtpm, manufactures it again (a new endorsement key: what a TPM clear or a new
// board gives) and starts it on the same socket.
func (h *haCluster) clearTPM(t testing.TB, n *haNode) {
	t.Helper()
	n.tpm.proc.stop()
	h.manufacture(t, filepath.Join(n.tpm.dir, "tpmstate"))
	n.tpm.start(t)
}

// serve starts the node's kleidi-server serve with extra flags (such as --init) and, if wait, waits until its
// Status is healthy.
func (h *haCluster) serve(t testing.TB, n *haNode, wait bool, extra ...string) {
	t.Helper()
	p := n.plugin
	args := append([]string{p.bin, "serve",
		"--listen=" + p.endpoint(),
		"--http-addr=" + p.httpAddr,
		"--socket-mode=0600",
		"--audit-log=" + filepath.Join(p.dir, "audit.log"),
		"--log-format=text",
	}, p.commonFlags()...)
	args = append(args, extra...)
	p.proc = p.procs.start(t, "kleidi-server "+n.name, filepath.Join(p.dir, "kleidi-server.log"), p.env, as(p.uid, args...)...)
	if wait {
		p.waitHealthy(t, 30*time.Second)
	}
}

// cliOut runs a kleidi-server command as the plugin's uid with the node's state dir and provider flags after
// the command's own flags, and returns its standard output alone; positional arguments go last.
func (n *haNode) cliOut(t testing.TB, cmd string, flags []string, args ...string) string {
	t.Helper()
	out, errOut, err := n.tryCLI(cmd, flags, args...)
	if err != nil {
		t.Fatalf("%s: kleidi-server %s %s: %v\n%s%s", n.name, cmd, strings.Join(args, " "), err, out, errOut)
	}
	return out
}

// tryCLI is cliOut that returns the error and both outputs.
func (n *haNode) tryCLI(cmd string, flags []string, args ...string) (stdout, stderr string, err error) {
	p := n.plugin
	argv := append([]string{p.bin, cmd}, p.commonFlags()...)
	argv = append(argv, flags...)
	argv = append(argv, args...)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	argv = as(p.uid, argv...)
	c := commandContext(ctx, argv[0], argv[1:]...)
	c.Env = append(os.Environ(), p.env...)
	var o, e bytes.Buffer
	c.Stdout, c.Stderr = &o, &e
	err = c.Run()
	return o.String(), e.String(), err
}

// identity returns the node's identity file, as `kleidi-server identity` prints it.
func (n *haNode) identity(t testing.TB) []byte {
	t.Helper()
	out := n.cliOut(t, "identity", nil)
	if !strings.Contains(out, `"kleidi-identity"`) {
		t.Fatalf("%s: kleidi-server identity printed no identity file:\n%s", n.name, out)
	}
	return []byte(out)
}

// enroll hands the identity file of newcomer to n (written where n's uid reads it) and runs enroll there; it
// returns the member ID enroll prints.
func (n *haNode) enroll(t testing.TB, identity []byte, newcomer string) string {
	t.Helper()
	path := filepath.Join(n.plugin.dir, "identity-"+newcomer+"-"+randHex(t, 4)+".json")
	writeFile(t, path, string(identity), 0o600)
	n.plugin.chown(t, path)
	return outField(t, n.cliOut(t, "enroll", nil, path), "member")
}

// outField returns the value of the line "name: value" of a command's output.
func outField(t testing.TB, out, name string) string {
	t.Helper()
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(line, name+": "); ok && strings.TrimSpace(v) != "" {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("no %q in the output:\n%s", name, out)
	return ""
}

// wrappedFor returns, from the output of `kleidi-server recipients`, whom KEK keyID is wrapped for: member IDs,
// each followed by " (from SENDER)" for a copy another member made and not yet imported.
func wrappedFor(out, keyID string) []string {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == keyID {
			rest := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), keyID))
			rest = strings.TrimSpace(strings.TrimPrefix(rest, f[1]))
			return strings.Split(rest, ", ")
		}
	}
	return nil
}

// emptyState stops nothing: it removes everything in the node's state directory, as an operator does before
// joining a replaced node again.
func (n *haNode) emptyState(t testing.TB) {
	t.Helper()
	entries, err := os.ReadDir(n.plugin.stateDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(n.plugin.stateDir, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
}

func (n *haNode) keyringFile() string { return filepath.Join(n.plugin.stateDir, "keyring.json") }

// copyKeyring distributes from's keyring to each of to as an operator copies it: the same bytes, owned by the
// plugin's uid, mode 0600, put in place atomically (a rename) beside a running plugin.
func (h *haCluster) copyKeyring(t testing.TB, from *haNode, to ...*haNode) {
	t.Helper()
	b, err := os.ReadFile(from.keyringFile())
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range to {
		h.writeKeyring(t, n, b)
	}
}

func (h *haCluster) writeKeyring(t testing.TB, n *haNode, b []byte) {
	t.Helper()
	tmp := n.keyringFile() + ".e2e-copy"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	n.plugin.chown(t, tmp)
	if err := os.Rename(tmp, n.keyringFile()); err != nil {
		t.Fatal(err)
	}
}

// startAPIServers starts a kube-apiserver for each node, on the shared etcd, each encrypting through its own
// node's plugin, and waits until every one is ready.
func (h *haCluster) startAPIServers(t testing.TB, nodes ...*haNode) {
	t.Helper()
	kas := kubeAPIServer(t)
	for _, n := range nodes {
		c := &cluster{dir: n.dir, procs: h.procs, etcdURL: h.etcd.etcdURL, token: h.token}
		encPath := filepath.Join(n.dir, "encryption-config.yaml")
		writeFile(t, encPath, encryptionConfig(n.plugin.sock), 0o600)
		port := freePort(t)
		c.apiURL = fmt.Sprintf("https://127.0.0.1:%d", port)
		c.apiArgs = []string{kas,
			"--etcd-servers=" + c.etcdURL,
			fmt.Sprintf("--secure-port=%d", port),
			"--bind-address=127.0.0.1",
			"--advertise-address=127.0.0.1",
			"--endpoint-reconciler-type=none",
			"--cert-dir=" + filepath.Join(n.dir, "apiserver-certs"),
			"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
			"--service-account-key-file=" + h.saKey,
			"--service-account-signing-key-file=" + h.saKey,
			"--token-auth-file=" + h.toks,
			"--authorization-mode=RBAC",
			"--service-cluster-ip-range=10.96.0.0/24",
			"--encryption-provider-config=" + encPath,
			"--profiling=false",
			"--v=2",
		}
		c.hc = &http.Client{
			Timeout:   10 * time.Second,
			Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}, // loopback, self-signed
		}
		cs, err := kubernetes.NewForConfig(&rest.Config{
			Host: c.apiURL, BearerToken: h.token, TLSClientConfig: rest.TLSClientConfig{Insecure: true},
			QPS: 200, Burst: 400, Timeout: 20 * time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		c.cs = cs
		n.api = c
		c.apiserver = h.procs.start(t, "kube-apiserver "+n.name, filepath.Join(n.dir, "kube-apiserver.log"), nil, c.apiArgs...)
	}
	for _, n := range nodes {
		h.waitReady(t, n, 120*time.Second)
	}
}

// waitReady waits until the node's kube-apiserver answers /readyz with 200.
func (h *haCluster) waitReady(t testing.TB, n *haNode, timeout time.Duration) {
	t.Helper()
	c := n.api
	eventually(t, timeout, 250*time.Millisecond, "kube-apiserver "+n.name+" ready", func() error {
		if c.apiserver.exited() {
			t.Fatalf("kube-apiserver %s exited: %v\n%s", n.name, c.apiserver.waitErr, tail(c.apiserver.logPath, 30))
		}
		code, body, err := c.get("/readyz")
		if err != nil {
			return err
		}
		if code != http.StatusOK {
			return fmt.Errorf("/readyz %d: %s", code, lastLines(body, 5))
		}
		return nil
	})
}

// kmsReady returns the node's kube-apiserver's verdict on its KMS plugin: the status code and body of
// /readyz/kms-providers.
func (n *haNode) kmsReady() (int, string, error) { return n.api.get("/readyz/kms-providers") }

// decryptAt asks n's plugin, over its socket, to decrypt the encrypted seed of one stored object, with the
// attached key it carries; it returns the gRPC error.
func (n *haNode) decryptAt(o *encryptedObject) error {
	client, closeFn, err := n.plugin.dial()
	if err != nil {
		return err
	}
	defer closeFn()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{
		Ciphertext: o.encryptedDEKSource, Uid: "e2e-ha-" + randHexNoT(4), KeyId: o.keyID, Annotations: o.annotations,
	})
	if err != nil {
		return err
	}
	if len(resp.Plaintext) != 32 {
		return fmt.Errorf("decrypted seed of %d bytes, want 32", len(resp.Plaintext))
	}
	return nil
}

// encryptAt asks n's plugin, over its socket, to encrypt a fresh seed, and returns the key_id it used.
func (n *haNode) encryptAt() (string, error) {
	client, closeFn, err := n.plugin.dial()
	if err != nil {
		return "", err
	}
	defer closeFn()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	seed := make([]byte, 32)
	if _, err := rand.Read(seed); err != nil {
		return "", err
	}
	resp, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: "e2e-ha-" + randHexNoT(4)})
	if err != nil {
		return "", err
	}
	return resp.KeyId, nil
}

func randHexNoT(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%x", b)
}

// readerLoop reads every Secret of want through every node's apiserver, over and over, until stop is closed,
// and counts reads and failures; it is the traffic that a coordinated rotation must not disturb.
type readerLoop struct {
	mu     sync.Mutex
	reads  int
	errs   []string
	nerrs  int
	done   chan struct{}
	stopCh chan struct{}
}

func startReaderLoop(nodes []*haNode, ns string, want map[string]map[string]string) *readerLoop {
	r := &readerLoop{done: make(chan struct{}), stopCh: make(chan struct{})}
	names := make([]string, 0, len(want))
	values := make(map[string]string, len(want))
	for name, data := range want {
		names = append(names, name)
		values[name] = data["v"]
	}
	go func() {
		defer close(r.done)
		for {
			for _, n := range nodes {
				for _, name := range names {
					select {
					case <-r.stopCh:
						return
					default:
					}
					got, err := n.api.readSecret(ns, name)
					if err == nil && got["v"] != values[name] {
						err = fmt.Errorf("secret %s: wrong content", name)
					}
					r.mu.Lock()
					r.reads++
					if err != nil {
						r.nerrs++
						if len(r.errs) < 5 {
							r.errs = append(r.errs, fmt.Sprintf("%s via %s: %v", name, n.name, err))
						}
					}
					r.mu.Unlock()
				}
			}
		}
	}()
	return r
}

// stop ends the loop and returns the number of reads and the failures.
func (r *readerLoop) stop() (reads, failures int, first []string) {
	close(r.stopCh)
	<-r.done
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.reads, r.nerrs, r.errs
}

// forgerSource is a program for an attacker who holds a node's identity (public) and write access to a keyring
// but no KEK: it makes a KEK of its own choosing, duplicates it to the node's TPM with the library's own
// recipient (tpm.OpenRecipient), names it with the key ID that KEK really has, adds it to the keyring as the
// active key (every other active key retired) and claims that the member sender made the copy. With mode
// "bogus" the copy carries a signature of random bytes, with "none" no sender and no signature at all.
//
// Usage: forge IDENTITY_FILE KEYRING_IN KEYRING_OUT SENDER_ID bogus|none; it prints the forged key ID.
const forgerSource = `package main

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/tpm"
)

func main() {
	if err := forge(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "forge:", err)
		os.Exit(1)
	}
}

func forge(args []string) error {
	if len(args) != 5 {
		return fmt.Errorf("usage: forge IDENTITY KEYRING_IN KEYRING_OUT SENDER bogus|none")
	}
	b, err := os.ReadFile(args[0])
	if err != nil {
		return err
	}
	id, err := kleidi.ParseIdentity(b)
	if err != nil {
		return err
	}
	r, err := tpm.OpenRecipient(id)
	if err != nil {
		return err
	}
	kek := make([]byte, 32)
	if _, err := rand.Read(kek); err != nil {
		return err
	}
	blob, err := r.Wrap(context.Background(), kek)
	if err != nil {
		return err
	}
	mac := hmac.New(sha256.New, kek)
	mac.Write([]byte("kleidi key id v1\x00tpm"))
	keyID := "kleidi-tpm-" + base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding).EncodeToString(mac.Sum(nil)[:20])

	ring, err := os.ReadFile(args[1])
	if err != nil {
		return err
	}
	var doc map[string]any
	if err := json.Unmarshal(ring, &doc); err != nil {
		return err
	}
	keys, _ := doc["keys"].([]any)
	for _, k := range keys {
		if m, ok := k.(map[string]any); ok && m["state"] == "active" {
			m["state"] = "retired"
		}
	}
	dup := map[string]any{"root": "tpm", "blob": blob, "recipient": id.ID()}
	if args[4] == "bogus" {
		sig := make([]byte, 71)
		if _, err := rand.Read(sig); err != nil {
			return err
		}
		dup["sender"], dup["proof"] = args[3], sig
	}
	doc["keys"] = append(keys, map[string]any{
		"id": keyID, "created": time.Now().UTC().Format(time.RFC3339Nano), "state": "active", "wrapped": []any{dup},
	})
	out, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(args[2], out, 0o600); err != nil {
		return err
	}
	fmt.Println(keyID)
	return nil
}
`

// buildForger builds forgerSource against this checkout in a module of its own (the e2e module does not
// depend on the kleidi library) and returns the binary's path.
func buildForger(t testing.TB, dir string) string {
	t.Helper()
	src := filepath.Join(dir, "forge-src")
	if err := os.MkdirAll(src, 0o700); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(src, "main.go"), forgerSource, 0o600)
	writeFile(t, filepath.Join(src, "go.mod"), "module kleidi-e2e-forge\n\ngo 1.26.0\n\nrequire github.com/kleidi-kms/kleidi v0.0.0\n\nreplace github.com/kleidi-kms/kleidi => "+repoRoot+"\n", 0o600)
	sum, err := os.ReadFile(filepath.Join(repoRoot, "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(src, "go.sum"), string(sum), 0o600)
	bin := filepath.Join(dir, "forge")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := commandContext(ctx, "go", "build", "-mod=mod", "-o", bin, ".")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build of the forger: %v\n%s", err, out)
	}
	return bin
}

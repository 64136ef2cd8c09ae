package deploy_test

import (
	"bytes"
	"context"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"
)

// TestSeveralControlPlaneNodes follows docs/install.md, "Several control-plane nodes", with the static binary:
// the same OpenPGP key files on two nodes, init on the first only, its keyring copied to the second before the
// second starts, and both serving. Both then report the same key_id, and a ciphertext one node made decrypts on
// the other from its keyring alone (no attached key). A node that ran init on its own instead, as each node did
// before, reports another key_id and cannot decrypt the others' data from its keyring: its apiserver would call
// every other node's objects stale.
func TestSeveralControlPlaneNodes(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join(repoRoot, "docs", "install.md"))
	if err != nil {
		t.Fatal(err)
	}
	// The runbook's section: init on one node, the keyring and its initialised file copied before the others start.
	section := regexp.MustCompile(`(?s)\n## Several control-plane nodes\n.*?\n## `).FindString(string(doc))
	for _, want := range []string{"kleidi-server init", "keyring.json", "initialised", "install -o 65532 -g 65532 -m 0600"} {
		if !strings.Contains(section, want) {
			t.Errorf("docs/install.md, \"Several control-plane nodes\": no %q", want)
		}
	}

	bin := buildStatic(t)
	a, b, lone := newNode(t, bin), newNode(t, bin), newNode(t, bin)
	pub, priv, pass := gpgKey(t, a)
	provider := func(n *node) []string {
		// Each node reads its own copy of the key files, as /etc/kleidi/gpg on each host.
		keys := filepath.Join(n.dir, "gpg")
		if n != a {
			if err := os.Mkdir(keys, 0o750); err != nil {
				t.Fatal(err)
			}
			n.chown(t, keys)
			for _, f := range []string{pub, priv, pass} {
				copyFile(t, f, filepath.Join(keys, filepath.Base(f)), 0o440, n.asPlugin, 0, pluginID)
			}
		}
		return []string{"--provider=gpg", "--gpg-public-key=" + filepath.Join(keys, filepath.Base(pub)),
			"--gpg-private-key=" + filepath.Join(keys, filepath.Base(priv)), "--gpg-passphrase-file=" + filepath.Join(keys, filepath.Base(pass))}
	}
	pa, pb, pl := provider(a), provider(b), provider(lone)

	// 1. init on one node only.
	a.init(t, nil, pa...)
	// 2. its keyring and initialised file to the other, owned by the plugin's uid, mode 0600.
	for _, f := range []string{"keyring.json", "initialised"} {
		copyFile(t, filepath.Join(a.stateDir, f), filepath.Join(b.stateDir, f), 0o600, b.asPlugin, pluginID, pluginID)
	}
	// init refuses the copied state directory, so a runbook step run twice does no harm.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if out, err := b.command(ctx, append([]string{"init", "--state-dir=" + b.stateDir}, pb...)...).CombinedOutput(); err == nil {
		t.Fatalf("init on the node that received the keyring succeeded:\n%s", out)
	}
	// The node that made its own keyring, for comparison.
	lone.init(t, nil, pl...)

	// 3. serve on every node.
	ca := startServe(t, a, pa)
	cb := startServe(t, b, pb)
	cl := startServe(t, lone, pl)

	keyIDOf := func(c kmsapi.KeyManagementServiceClient) string {
		t.Helper()
		resp, err := c.Status(ctx, &kmsapi.StatusRequest{})
		if err != nil || resp.Healthz != "ok" {
			t.Fatalf("Status: %v %v", resp, err)
		}
		return resp.KeyId
	}
	ka, kb, kl := keyIDOf(ca), keyIDOf(cb), keyIDOf(cl)
	if ka != kb {
		t.Errorf("the nodes sharing a keyring report key_id %s and %s, want one", ka, kb)
	}
	if kl == ka {
		t.Errorf("a node with its own keyring reports the shared key_id %s", kl)
	}
	t.Logf("key_id: shared %s, lone node %s", ka, kl)

	// 4. what one node encrypts, the other decrypts, both ways, from the keyring alone.
	for _, dir := range []struct {
		name     string
		from, to kmsapi.KeyManagementServiceClient
	}{{"a to b", ca, cb}, {"b to a", cb, ca}} {
		seed := bytes.Repeat([]byte{0x5a}, 32)
		enc, err := dir.from.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: "multinode-" + dir.name})
		if err != nil {
			t.Fatalf("%s: Encrypt: %v", dir.name, err)
		}
		dec, err := dir.to.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Uid: "multinode-" + dir.name})
		if err != nil {
			t.Fatalf("%s: Decrypt without the attached key: %v", dir.name, err)
		}
		if !bytes.Equal(dec.Plaintext, seed) {
			t.Errorf("%s: Decrypt returned other bytes", dir.name)
		}
		if dir.name == "a to b" {
			_, err := cl.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Uid: "multinode-lone"})
			if status.Code(err) != codes.NotFound {
				t.Errorf("the lone node decrypted the shared keyring's data from its own keyring: %v", err)
			}
		}
	}
}

// copyFile copies src to dst with mode, owned by uid:gid when chown is set.
func copyFile(t *testing.T, src, dst string, mode os.FileMode, chown bool, uid, gid int) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dst, mode); err != nil {
		t.Fatal(err)
	}
	if chown {
		if err := os.Chown(dst, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
}

// startServe starts kleidi-server serve on the node with the manifests' flags and args, waits until it is
// ready, and returns a KMS v2 client on its socket; the test's cleanup stops it.
func startServe(t *testing.T, n *node, args []string) kmsapi.KeyManagementServiceClient {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := n.command(ctx, append(append([]string{"serve"}, n.serveFlags()...), args...)...)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Error("kleidi-server serve: no exit within 20 s of SIGTERM")
		}
		cancel()
		if t.Failed() {
			t.Logf("kleidi-server output (%s):\n%s", n.stateDir, logs.String())
		}
	})
	for deadline := time.Now().Add(30 * time.Second); ; {
		select {
		case err := <-done:
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
	conn, err := grpc.NewClient("unix://"+n.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return kmsapi.NewKeyManagementServiceClient(conn)
}

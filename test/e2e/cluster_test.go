package e2e

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// cluster is an etcd plus a kube-apiserver on loopback, both started by the test.
type cluster struct {
	dir       string
	procs     *procs
	etcdURL   string
	etcd      *proc
	apiserver *proc
	apiArgs   []string
	apiURL    string
	token     string
	cs        *kubernetes.Clientset
	hc        *http.Client
}

// startCluster starts etcd and kube-apiserver with the given EncryptionConfiguration.
func startCluster(t testing.TB, ps *procs, dir, encryptionConfig string) *cluster {
	t.Helper()
	requireTool(t, "etcd", "etcd-server")
	requireTool(t, "etcdctl", "etcd-client")
	kas := kubeAPIServer(t)

	c := &cluster{dir: dir, procs: ps}
	c.startEtcd(t)

	c.token = "e2e-" + randHex(t, 16)
	tokens := filepath.Join(dir, "tokens.csv")
	writeFile(t, tokens, c.token+",e2e-admin,e2e-admin,system:masters\n", 0o600)
	saKey := filepath.Join(dir, "sa.key")
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, saKey, string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})), 0o600)
	encPath := filepath.Join(dir, "encryption-config.yaml")
	writeFile(t, encPath, encryptionConfig, 0o600)

	port := freePort(t)
	c.apiURL = fmt.Sprintf("https://127.0.0.1:%d", port)
	c.apiArgs = []string{kas,
		"--etcd-servers=" + c.etcdURL,
		fmt.Sprintf("--secure-port=%d", port),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--endpoint-reconciler-type=none", // no kubernetes Service endpoint on loopback
		"--cert-dir=" + filepath.Join(dir, "apiserver-certs"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + saKey,
		"--service-account-signing-key-file=" + saKey,
		"--token-auth-file=" + tokens,
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
		Host:            c.apiURL,
		BearerToken:     c.token,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true},
		QPS:             200,
		Burst:           400,
		Timeout:         20 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	c.cs = cs
	c.startAPIServer(t)
	return c
}

func (c *cluster) startEtcd(t testing.TB) {
	t.Helper()
	client, peer := freePort(t), freePort(t)
	c.etcdURL = fmt.Sprintf("http://127.0.0.1:%d", client)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peer)
	c.etcd = c.procs.start(t, "etcd", filepath.Join(c.dir, "etcd.log"), nil,
		"etcd",
		"--name=e2e",
		"--data-dir="+filepath.Join(c.dir, "etcd-data"),
		"--listen-client-urls="+c.etcdURL,
		"--advertise-client-urls="+c.etcdURL,
		"--listen-peer-urls="+peerURL,
		"--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=e2e="+peerURL,
		"--log-level=warn",
	)
	eventually(t, 30*time.Second, 100*time.Millisecond, "etcd healthy", func() error {
		if c.etcd.exited() {
			t.Fatalf("etcd exited: %v\n%s", c.etcd.waitErr, tail(c.etcd.logPath, 20))
		}
		resp, err := http.Get(c.etcdURL + "/health")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("etcd /health: %s", resp.Status)
		}
		return nil
	})
}

func (c *cluster) startAPIServer(t testing.TB) {
	t.Helper()
	c.apiserver = c.procs.start(t, "kube-apiserver", filepath.Join(c.dir, "kube-apiserver.log"), nil, c.apiArgs...)
	eventually(t, 120*time.Second, 250*time.Millisecond, "kube-apiserver ready", func() error {
		if c.apiserver.exited() {
			t.Fatalf("kube-apiserver exited: %v\n%s", c.apiserver.waitErr, tail(c.apiserver.logPath, 30))
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

// restartAPIServer stops kube-apiserver gracefully and starts it again with the
// same flags: its DEK cache is gone, so every seed must be decrypted again.
func (c *cluster) restartAPIServer(t testing.TB) {
	t.Helper()
	start := time.Now()
	c.apiserver.stop()
	t.Logf("kube-apiserver stopped in %s", time.Since(start).Round(time.Millisecond))
	c.startAPIServer(t)
}

// get sends an authenticated GET to the apiserver and returns status and body.
func (c *cluster) get(path string) (int, string, error) {
	req, err := http.NewRequest(http.MethodGet, c.apiURL+path, nil)
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func (c *cluster) metrics(t testing.TB) string {
	t.Helper()
	code, body, err := c.get("/metrics")
	if err != nil || code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %v", code, err)
	}
	return body
}

func (c *cluster) etcdctl(t testing.TB, stdin []byte, args ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := commandContext(ctx, "etcdctl", append([]string{"--endpoints=" + c.etcdURL}, args...)...)
	cmd.Env = append(os.Environ(), "ETCDCTL_API=3")
	if stdin != nil {
		cmd.Stdin = strings.NewReader(string(stdin))
	}
	out, err := cmd.Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(interface{ Stderr() []byte }); ok {
			stderr = string(ee.Stderr())
		}
		t.Fatalf("etcdctl %s: %v %s", strings.Join(args, " "), err, stderr)
	}
	return out
}

// etcdGet returns the raw value stored in etcd under key; it fails if absent.
func (c *cluster) etcdGet(t testing.TB, key string) []byte {
	t.Helper()
	var resp struct {
		KVs []struct {
			Key   string `json:"key"`
			Value string `json:"value"`
		} `json:"kvs"`
	}
	out := c.etcdctl(t, nil, "get", key, "-w", "json")
	if err := json.Unmarshal(out, &resp); err != nil {
		t.Fatalf("etcdctl get %s: %v: %s", key, err, out)
	}
	if len(resp.KVs) != 1 {
		t.Fatalf("etcd key %s: %d values", key, len(resp.KVs))
	}
	v, err := base64.StdEncoding.DecodeString(resp.KVs[0].Value)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// etcdPut overwrites key with value, bypassing the apiserver.
func (c *cluster) etcdPut(t testing.TB, key string, value []byte) {
	t.Helper()
	c.etcdctl(t, value, "put", key)
	if got := c.etcdGet(t, key); string(got) != string(value) {
		t.Fatalf("etcd put %s: read back %d bytes, wrote %d", key, len(got), len(value))
	}
}

func secretKey(ns, name string) string { return "/registry/secrets/" + ns + "/" + name }

func (c *cluster) createSecret(t testing.TB, ns, name string, data map[string]string) {
	t.Helper()
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}, Data: map[string][]byte{}}
	for k, v := range data {
		s.Data[k] = []byte(v)
	}
	if _, err := c.cs.CoreV1().Secrets(ns).Create(context.Background(), s, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create secret %s/%s: %v", ns, name, err)
	}
}

func (c *cluster) readSecret(ns, name string) (map[string]string, error) {
	s, err := c.cs.CoreV1().Secrets(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for k, v := range s.Data {
		out[k] = string(v)
	}
	return out, nil
}

func (c *cluster) ensureNamespace(t testing.TB, ns string) {
	t.Helper()
	_, err := c.cs.CoreV1().Namespaces().Create(context.Background(),
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create namespace %s: %v", ns, err)
	}
}

func writeFile(t testing.TB, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

func randHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

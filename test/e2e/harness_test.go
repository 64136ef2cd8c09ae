package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"testing"
	"time"
)

// TestHarness checks the control plane on its own, with the apiserver's built-in
// aesgcm provider, so that a failure here points at the environment, not at kleidi.
func TestHarness(t *testing.T) {
	start := time.Now()
	defer func() { t.Logf("TestHarness wall time: %s", time.Since(start).Round(time.Millisecond)) }()

	dir := workDir(t, "kleidi-e2e-")
	ps := newProcs(t)
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	c := startCluster(t, ps, dir, `apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: ["secrets"]
    providers:
      - aesgcm:
          keys:
            - name: key1
              secret: `+base64.StdEncoding.EncodeToString(key)+`
      - identity: {}
`)
	c.ensureNamespace(t, "e2e")
	value := "harness-" + randHex(t, 8)
	c.createSecret(t, "e2e", "one", map[string]string{"v": value})
	raw := c.etcdGet(t, secretKey("e2e", "one"))
	if !bytes.HasPrefix(raw, []byte("k8s:enc:aesgcm:v1:key1:")) {
		t.Fatalf("etcd value does not start with the aesgcm prefix: %q", raw[:min(len(raw), 40)])
	}
	if bytes.Contains(raw, []byte(value)) {
		t.Fatal("etcd value contains the plaintext")
	}
	got, err := c.readSecret("e2e", "one")
	if err != nil || got["v"] != value {
		t.Fatalf("read back: %v %v", got, err)
	}

	// A tampered value fails for that object only.
	c.createSecret(t, "e2e", "two", map[string]string{"v": "2"})
	orig := c.etcdGet(t, secretKey("e2e", "two"))
	bad := bytes.Clone(orig)
	bad[len(bad)-5] ^= 0xff
	c.etcdPut(t, secretKey("e2e", "two"), bad)
	if _, err := c.readSecret("e2e", "two"); err == nil {
		t.Fatal("reading a tampered Secret succeeded")
	} else {
		t.Logf("tampered read: %v", err)
	}
	if got, err := c.readSecret("e2e", "one"); err != nil || got["v"] != value {
		t.Fatalf("untampered Secret after tampering another: %v %v", got, err)
	}
	c.etcdPut(t, secretKey("e2e", "two"), orig)
	if got, err := c.readSecret("e2e", "two"); err != nil || got["v"] != "2" {
		t.Fatalf("restored Secret: %v %v", got, err)
	}
	c.restartAPIServer(t)
	if got, err := c.readSecret("e2e", "one"); err != nil || got["v"] != value {
		t.Fatalf("after apiserver restart: %v %v", got, err)
	}
}

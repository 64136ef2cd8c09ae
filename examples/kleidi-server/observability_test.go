package main_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/gpg"
)

// TestNoSecretsInLogsAuditOrMetrics drives traffic with known plaintexts through the binary (good calls, refused
// calls, a rotation, an audit log rotation) and searches the operational log, the audit log, the metrics page and
// the command outputs for every plaintext and every KEK, raw, in hex and in base64: there must be none. It also
// checks that the metrics and the audit log describe that traffic.
func TestNoSecretsInLogsAuditOrMetrics(t *testing.T) {
	s := newSandbox(t)
	auditPath := filepath.Join(s.dir, "audit.json")
	srv := s.serve(t, s.command(false, append([]string{"serve", "--audit-log", auditPath, "--log-level", "debug", "--log-format", "json"}, s.flags()...)...))
	if code, out, errOut := s.run(t, "status", "--listen", "unix://"+s.socket(), "--wait", "30s"); code != 0 {
		t.Fatalf("status = %d, %q, %q; want 0", code, out, errOut)
	}
	client := kmsClient(t, s.socket())
	ctx := context.Background()

	var secrets [][]byte
	for i := range 20 {
		p := make([]byte, 32)
		rand.Read(p)
		if i == 0 {
			p = []byte("a-plaintext-that-must-never-show")
		}
		secrets = append(secrets, p)
		enc, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: p, Uid: "req-enc"})
		if err != nil {
			t.Fatalf("Encrypt() err = %v", err)
		}
		for range 3 {
			dec, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations, Uid: "req-dec"})
			if err != nil || !bytes.Equal(dec.Plaintext, p) {
				t.Fatalf("Decrypt() = %v, %v", dec, err)
			}
		}
		tampered := bytes.Clone(enc.Ciphertext)
		tampered[len(tampered)-1] ^= 1
		if _, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: tampered, KeyId: enc.KeyId, Uid: "req-bad"}); err == nil {
			t.Fatalf("Decrypt(tampered) err = nil")
		}
	}
	huge := bytes.Repeat(secrets[0], 64) // refused as too large: the error must not echo it
	if _, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: huge}); err == nil {
		t.Fatalf("Encrypt(2 KiB) err = nil")
	}
	_, rotateOut, rotateErr := s.run(t, append([]string{"rotate"}, s.flags()[:2]...)...)
	rotated := field(rotateOut, "key_id")
	waitFor(t, func() bool {
		_, out, _ := s.run(t, "status", "--listen", "unix://"+s.socket())
		return field(out, "key_id") == rotated
	}, "rotation seen by the server")
	if err := os.Rename(auditPath, auditPath+".1"); err != nil {
		t.Fatal(err)
	}
	srv.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, func() bool { _, err := os.Stat(auditPath); return err == nil }, "a new audit log after SIGHUP")

	resp, err := http.Get("http://" + srv.httpAddr(t) + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	srv.cmd.Process.Signal(syscall.SIGTERM)
	if code := srv.wait(t); code != 0 {
		t.Fatalf("serve exit after SIGTERM = %d", code)
	}
	oldLog, _ := os.ReadFile(auditPath + ".1")
	current, _ := os.ReadFile(auditPath)
	auditLog := append(bytes.Clone(oldLog), current...)

	// The KEKs, unwrapped with the development key of the state directory.
	keys, err := gpg.New(gpg.Config{PrivateKeyFile: filepath.Join(s.dir, "state", "gpg", gpg.DevelopmentPrivateKeyFile)})
	if err != nil {
		t.Fatal(err)
	}
	defer keys.Close()
	loaded, err := kleidi.NewFileKeyring(filepath.Join(s.dir, "state", "keyring.json")).Load(ctx)
	records := loaded.Keys
	if err != nil || len(records) != 2 {
		t.Fatalf("keyring: %d records, %v; want 2", len(records), err)
	}
	for _, r := range records {
		kek, err := keys.Unwrap(ctx, r.Wrapped[0].Blob)
		if err != nil {
			t.Fatal(err)
		}
		secrets = append(secrets, kek)
	}

	outputs := map[string]string{"log": srv.stderr.String(), "audit log": string(auditLog), "metrics": string(page),
		"rotate output": rotateOut + rotateErr}
	for name, text := range outputs {
		for i, secret := range secrets {
			for _, form := range []string{string(secret), hex.EncodeToString(secret), strings.ToUpper(hex.EncodeToString(secret)),
				base64.StdEncoding.EncodeToString(secret), base64.RawStdEncoding.EncodeToString(secret),
				base64.URLEncoding.EncodeToString(secret), base64.RawURLEncoding.EncodeToString(secret)} {
				if strings.Contains(text, form) {
					t.Errorf("the %s holds secret %d", name, i)
				}
			}
		}
	}

	// The metrics describe the traffic: 60 decryptions from memory, no provider call on the hot path.
	for _, line := range []string{
		`kleidi_kms_requests_total{code="ok",method="encrypt"} 20`,
		`kleidi_kms_requests_total{code="ok",method="decrypt"} 60`,
		`kleidi_kms_requests_total{code="invalid_argument",method="decrypt"} 20`,
		`kleidi_kms_requests_total{code="invalid_argument",method="encrypt"} 1`,
		`kleidi_kek_cache_misses_total 0`,
		`kleidi_provider_operations_total{operation="unwrap",outcome="ok",provider="gpg"} 1`,
		`kleidi_healthy 1`,
	} {
		if !strings.Contains(string(page), line+"\n") {
			t.Errorf("metrics page lacks %q", line)
		}
	}
	// 80 decryptions of the test, and the health probe's own every 5 s.
	if m := regexp.MustCompile(`(?m)^kleidi_kek_cache_hits_total (\d+)$`).FindStringSubmatch(string(page)); m == nil || atoi(m[1]) < 80 {
		t.Errorf("kleidi_kek_cache_hits_total = %v, want at least 80", m)
	}
	promtool := exec.Command("promtool", "check", "metrics")
	promtool.Stdin = bytes.NewReader(page)
	if out, err := promtool.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}

	// The audit log: one record per call, start and stop, the rotation seen, an intact chain across the files.
	counts := map[string]int{}
	for _, line := range strings.Split(strings.TrimSpace(string(auditLog)), "\n") {
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("audit record %q: %v", line, err)
		}
		counts[r["event"].(string)+" "+r["outcome"].(string)]++
	}
	for event, want := range map[string]int{"kms.encrypt ok": 20, "kms.decrypt ok": 60, "kms.decrypt error": 20,
		"kms.encrypt error": 1, "plugin.start ok": 1, "plugin.stop ok": 1, "keyring.reload ok": 1} {
		if counts[event] != want {
			t.Errorf("audit log has %d %q records, want %d (all: %v)", counts[event], event, want, counts)
		}
	}
	code, out, errOut := s.run(t, "verify-audit", auditPath+".1", auditPath)
	if code != 0 || !strings.Contains(out, "hash chain intact") {
		t.Errorf("verify-audit = %d, %q, %q; want 0 and an intact chain", code, out, errOut)
	}
	tampered := bytes.Replace(oldLog, []byte(`"req-dec"`), []byte(`"req-xxx"`), 1)
	os.WriteFile(auditPath+".1", tampered, 0o600)
	if code, _, errOut := s.run(t, "verify-audit", auditPath+".1", auditPath); code == 0 || !strings.Contains(errOut, "chain broken") {
		t.Errorf("verify-audit of an edited log = %d, %q; want a broken chain", code, errOut)
	}
}

// waitFor polls cond for up to 15 s.
func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); !cond(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within 15 s", what)
		}
	}
}

func atoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		return -1
	}
	return n
}

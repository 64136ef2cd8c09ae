package main_test

import (
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi/pkcs11"
)

// softHSM is a SoftHSM 2 token directory with one token, for the plugin's pkcs11 provider.
type softHSM struct {
	conf, tokens string
	args         []string // the plugin's provider flags
}

// newSoftHSM initialises a token labelled label in a directory of its own and returns the provider flags of a
// plugin on it. The sandbox's plugins and this test process both read it through SOFTHSM2_CONF.
func newSoftHSM(t *testing.T, s *sandbox, label string) *softHSM {
	t.Helper()
	const module = "/usr/lib/softhsm/libsofthsm2.so"
	if _, err := os.Stat(module); err != nil {
		t.Fatalf("SoftHSM 2 is missing (%v): apt-get install softhsm2", err)
	}
	dir, err := os.MkdirTemp(s.dir, "hsm")
	if err != nil {
		t.Fatal(err)
	}
	h := &softHSM{conf: filepath.Join(dir, "softhsm2.conf"), tokens: filepath.Join(dir, "tokens")}
	if err := os.Mkdir(h.tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	text := "directories.tokendir = " + h.tokens + "\nobjectstore.backend = file\nlog.level = ERROR\n"
	if err := os.WriteFile(h.conf, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", "1234", "--pin", "5678")
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+h.conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util --init-token: %v\n%s", err, out)
	}
	pin := filepath.Join(dir, "pin")
	if err := os.WriteFile(pin, []byte("5678\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	h.args = []string{"--provider", "pkcs11", "--pkcs11-module", module, "--pkcs11-token", label, "--pkcs11-key", "kleidi", "--pkcs11-pin-file", pin}
	s.env = append(s.env, "SOFTHSM2_CONF="+h.conf)
	return h
}

// config is the configuration of a provider on the same token and keys, for this test process.
func (h *softHSM) config(t *testing.T) pkcs11.Config {
	t.Setenv("SOFTHSM2_CONF", h.conf)
	return pkcs11.Config{Module: h.args[3], Token: h.args[5], KeyLabel: h.args[7], PINFile: h.args[9]}
}

// TestPKCS11Plugin runs the real binary on a SoftHSM token: init creates the keys, serve encrypts and decrypts
// over the socket; a second plugin (another process, its own state directory, the same token) decrypts from the
// attached key alone; forged KEKs, wrapped and proved with another token, are refused; and when the token goes
// away Status says so, then ok again once it is back, without a restart.
func TestPKCS11Plugin(t *testing.T) {
	s := newSandbox(t)
	h := newSoftHSM(t, s, "plugin")
	srv, client := s.startPlugin(t, h.args...)
	enc := encryptOK(t, client, "a genuine seed")
	decryptOK(t, client, enc, "a genuine seed")

	// Only init creates keys: serve with a key label the token lacks is refused, and says to run init.
	other := newSandbox(t)
	other.env = s.env
	args := append([]string(nil), h.args...)
	args[7] = "absent"
	if code, _, errOut := other.run(t, append(append([]string{"serve"}, args...), other.flags()...)...); code == 0 || !strings.Contains(errOut, "init") {
		t.Fatalf("kleidi-server serve (no such key) = %d, %q; want an error that says to run init", code, errOut)
	}

	// Two processes on one token: a second plugin with a keyring of its own decrypts the first one's object.
	second := newSandbox(t)
	second.env = s.env
	_, secondClient := second.startPlugin(t, h.args...)
	decryptOK(t, secondClient, enc, "a genuine seed")
	decryptOK(t, client, encryptOK(t, secondClient, "from the second"), "from the second")

	// The attacker has a token of its own, labelled the same, with keys of the same label: its wrapped KEKs and
	// proofs are worthless here.
	attackerBox := newSandbox(t)
	attackerHSM := newSoftHSM(t, attackerBox, "plugin")
	cfg := attackerHSM.config(t)
	cfg.CreateKeys = true
	attacker, err := pkcs11.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	assertRefused(t, client, forgeries(t, "pkcs11",
		func(kek []byte) []byte { return must(attacker.Wrap(ctx, kek)) },
		func(m []byte) []byte { return must(attacker.Prove(ctx, m)) }))
	attacker.Close()
	decryptOK(t, client, enc, "a genuine seed")

	// The token goes away while serving, and comes back.
	if err := os.Rename(h.tokens, h.tokens+".away"); err != nil {
		t.Fatal(err)
	}
	waitHealthz(t, s, func(h string) bool { return h != "ok" }, "a healthz other than ok with the token away")
	if err := os.Rename(h.tokens+".away", h.tokens); err != nil {
		t.Fatal(err)
	}
	waitHealthz(t, s, func(h string) bool { return h == "ok" }, "healthz ok with the token back")
	decryptOK(t, client, enc, "a genuine seed")
	decryptOK(t, client, encryptOK(t, client, "after the outage"), "after the outage")
	if strings.Contains(srv.stderr.String(), "5678") {
		t.Errorf("the plugin's log holds the PIN")
	}
}

// waitHealthz polls Status until ok(healthz) holds, for up to 30 s (the plugin probes its root every 5 s).
func waitHealthz(t *testing.T, s *sandbox, ok func(string) bool, what string) {
	t.Helper()
	var last string
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		_, out, _ := s.run(t, "status", "--listen", "unix://"+s.socket())
		if last = field(out, "healthz"); ok(last) {
			return
		}
	}
	t.Fatalf("waited 30 s for %s; last healthz %q", what, last)
}

// TestPKCS11WrongPINIsNotRetried: serve with a PIN the token refuses stays up, unhealthy, instead of exiting, so
// that neither systemd nor the kubelet starts it again and again until an HSM that counts failed logins locks the
// token; SIGTERM stops it.
func TestPKCS11WrongPINIsNotRetried(t *testing.T) {
	s := newSandbox(t)
	h := newSoftHSM(t, s, "pin")
	if code, out, errOut := s.run(t, append(append([]string{"init"}, h.args...), s.flags()[:2]...)...); code != 0 {
		t.Fatalf("kleidi-server init = %d, %q, %q", code, out, errOut)
	}
	wrong := filepath.Join(s.dir, "wrong-pin")
	if err := os.WriteFile(wrong, []byte("0000\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	args := append([]string(nil), h.args...)
	args[9] = wrong
	srv := s.serve(t, s.command(false, append(append([]string{"serve"}, args...), s.flags()...)...))
	addr := srv.httpAddr(t)
	select {
	case <-srv.done:
		t.Fatalf("serve with a refused PIN exited (code %d): a supervisor would start it again and retry the PIN", srv.cmd.ProcessState.ExitCode())
	case <-time.After(2 * time.Second):
	}
	for path, want := range map[string]int{"/livez": http.StatusOK, "/readyz": http.StatusServiceUnavailable} {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s = %d, want %d", path, resp.StatusCode, want)
		}
	}
	if !strings.Contains(srv.stderr.String(), "refused the PIN") || strings.Contains(srv.stderr.String(), "0000") {
		t.Errorf("serve's log should say the PIN was refused, without the PIN:\n%s", srv.stderr.String())
	}
	srv.cmd.Process.Signal(syscall.SIGTERM)
	srv.wait(t)
}

//go:build cgo

package pkcs11_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/kleidi-kms/kleidi/pkcs11"
)

// softHSMModule is the SoftHSM 2 library of Debian's softhsm2 package.
const softHSMModule = "/usr/lib/softhsm/libsofthsm2.so"

// testPIN is the user PIN of every test token: no secret.
const testPIN = "5678"

// hsm is a SoftHSM 2 token directory of one test, with its configuration in SOFTHSM2_CONF.
type hsm struct {
	dir, tokens string
}

// newHSM makes a token directory and points SOFTHSM2_CONF at it for the test. SoftHSM reads the variable when the
// library is initialised, which happens again once every provider of the previous test is closed.
func newHSM(t testing.TB) *hsm {
	t.Helper()
	for _, need := range []string{softHSMModule, "/usr/bin/softhsm2-util"} {
		if _, err := os.Stat(need); err != nil {
			t.Fatalf("SoftHSM 2 is missing (%v): apt-get install softhsm2", err)
		}
	}
	dir := t.TempDir()
	h := &hsm{dir: dir, tokens: filepath.Join(dir, "tokens")}
	if err := os.Mkdir(h.tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	text := "directories.tokendir = " + h.tokens + "\nobjectstore.backend = file\nlog.level = ERROR\n"
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOFTHSM2_CONF", conf)
	return h
}

// token initialises a token labelled label with testPIN and returns the configuration of a provider on it, key
// label "kek", that creates its keys.
func (h *hsm) token(t testing.TB, label string) pkcs11.Config {
	t.Helper()
	out, err := exec.Command("softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", "1234", "--pin", testPIN).CombinedOutput()
	if err != nil {
		t.Fatalf("softhsm2-util --init-token: %v\n%s", err, out)
	}
	return pkcs11.Config{Module: softHSMModule, Token: label, KeyLabel: "kek", PINFile: h.pinFile(t, testPIN), CreateKeys: true}
}

// pinFile writes pin to a file and returns its path.
func (h *hsm) pinFile(t testing.TB, pin string) string {
	t.Helper()
	f, err := os.CreateTemp(h.dir, "pin")
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(pin + "\n")
	f.Close()
	return f.Name()
}

// open opens a provider and closes it at the end of the test.
func open(t testing.TB, cfg pkcs11.Config) *pkcs11.Provider {
	t.Helper()
	p, err := pkcs11.New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("pkcs11.New(%v) err = %v, want nil", cfg, err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

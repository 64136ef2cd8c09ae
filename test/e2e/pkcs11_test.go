package e2e

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// softHSMModule is the PKCS#11 library of Debian's softhsm2 package.
const softHSMModule = "/usr/lib/softhsm/libsofthsm2.so"

// softHSM is a SoftHSM 2 configuration with one token, owned by the plugin's uid. Its token directory can be moved
// away and back to take the token from a running plugin and return it.
type softHSM struct {
	conf   string // SOFTHSM2_CONF
	tokens string // directories.tokendir
	pin    string // the user PIN's file
	uid    int
}

// newSoftHSM initialises a token labelled label in dir with softhsm2-util, run as uid so that every file of the
// token belongs to the plugin's user.
func newSoftHSM(t testing.TB, dir, label string, uid int) *softHSM {
	t.Helper()
	requireTool(t, "softhsm2-util", "softhsm2")
	if _, err := os.Stat(softHSMModule); err != nil {
		t.Fatalf("SoftHSM 2 module: %v: install softhsm2 (e.g. apt-get install softhsm2)", err)
	}
	h := &softHSM{
		conf:   filepath.Join(dir, "softhsm2.conf"),
		tokens: filepath.Join(dir, "tokens"),
		pin:    filepath.Join(dir, "pin"),
		uid:    uid,
	}
	for _, d := range []string{dir, h.tokens} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		h.chown(t, d)
	}
	writeFile(t, h.conf, "directories.tokendir = "+h.tokens+"\nobjectstore.backend = file\nlog.level = ERROR\n", 0o600)
	h.chown(t, h.conf)
	soPIN, pin := randHex(t, 8), randHex(t, 8)
	writeFile(t, h.pin, pin+"\n", 0o400)
	h.chown(t, h.pin)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Not mustRun: its failure message would show the PINs of the command line.
	if out, err := run(ctx, h.env(), as(uid, "softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", soPIN, "--pin", pin)...); err != nil {
		t.Fatalf("softhsm2-util --init-token --label %s: %v\n%s", label, err, out)
	}
	return h
}

func (h *softHSM) chown(t testing.TB, path string) {
	t.Helper()
	if h.uid < 0 {
		return
	}
	if err := os.Chown(path, h.uid, h.uid); err != nil {
		t.Fatal(err)
	}
}

// env is the environment of every process that opens the token.
func (h *softHSM) env() []string { return []string{"SOFTHSM2_CONF=" + h.conf} }

// flags are kleidi-server's provider flags for the token; init creates the keys labelled key.
func (h *softHSM) flags(label, key string) []string {
	return []string{
		"--pkcs11-module=" + softHSMModule,
		"--pkcs11-token=" + label,
		"--pkcs11-key=" + key,
		"--pkcs11-pin-file=" + h.pin,
	}
}

// remove moves the token directory away: SoftHSM then finds no token in the slot, as when an HSM is unplugged or
// its daemon is gone.
func (h *softHSM) remove(t testing.TB) {
	t.Helper()
	if err := os.Rename(h.tokens, h.tokens+".away"); err != nil {
		t.Fatal(err)
	}
}

// restore moves the token directory back.
func (h *softHSM) restore(t testing.TB) {
	t.Helper()
	if err := os.Rename(h.tokens+".away", h.tokens); err != nil {
		t.Fatal(err)
	}
}

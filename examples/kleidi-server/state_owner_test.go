package main_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestRootRotateKeepsOwner: root rotates (`sudo kleidi-server rotate`) the keyring of a plugin that runs as uid
// 65534; the keyring and its lock keep their owner, and the running plugin reloads the new key.
func TestRootRotateKeepsOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Fatalf("needs setpriv (util-linux): %v", err)
	}
	s := newSandbox(t)
	os.Chmod(s.dir, 0o755)
	if err := os.Chown(s.dir, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(s.dir, "state")
	if code, out, errOut := runCmd(t, s.command(true, append([]string{"init"}, s.flags()[:2]...)...)); code != 0 {
		t.Fatalf("init as uid 65534 = %d, %q, %q; want 0", code, out, errOut)
	}
	s.serve(t, s.command(true, append([]string{"serve"}, s.flags()...)...))
	code, out, errOut := s.run(t, "status", "--listen", "unix://"+s.socket(), "--wait", "30s")
	if code != 0 {
		t.Fatalf("status = %d, %q, %q; want 0", code, out, errOut)
	}
	before := field(out, "key_id")
	// The lock file as root would make it: absent, so root's rotate creates it.
	os.Remove(filepath.Join(state, "keyring.json.lock"))
	code, out, errOut = s.run(t, append([]string{"rotate"}, s.flags()[:2]...)...)
	if code != 0 {
		t.Fatalf("rotate as root = %d, %q, %q; want 0", code, out, errOut)
	}
	rotated := field(out, "key_id")
	for _, name := range []string{"keyring.json", "keyring.json.lock"} {
		fi, err := os.Stat(filepath.Join(state, name))
		if err != nil {
			t.Fatal(err)
		}
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != 65534 || st.Gid != 65534 {
			t.Errorf("%s after rotate as root: owner %d:%d, want 65534:65534", name, st.Uid, st.Gid)
		}
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(250 * time.Millisecond) {
		_, out, _ := s.run(t, "status", "--listen", "unix://"+s.socket())
		if got := field(out, "key_id"); got == rotated && got != before {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the plugin of uid 65534 still reports %q 20 s after root rotated to %s", field(out, "key_id"), rotated)
		}
	}
	if strings.Contains(errOut, "BEGIN PGP") {
		t.Errorf("rotate's output holds key material")
	}
}

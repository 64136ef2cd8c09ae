package e2e

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// swtpm is a software TPM 2.0 process. It listens on a unix socket rather than
// TCP: killing swtpm leaves its TCP server port in TIME_WAIT for a minute, so a
// restarted swtpm could not bind the port the running plugin is configured
// with; a unix socket path is free again at once.
type swtpm struct {
	dir   string
	uid   int // owner of the sockets, -1 for the test's own uid
	procs *procs
	proc  *proc
}

func startSwtpm(t testing.TB, ps *procs, dir string, uid int) *swtpm {
	t.Helper()
	requireTool(t, "swtpm", "swtpm swtpm-tools")
	s := &swtpm{dir: dir, uid: uid, procs: ps}
	if err := os.MkdirAll(filepath.Join(dir, "tpmstate"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	s.start(t)
	return s
}

func (s *swtpm) sock() string { return filepath.Join(s.dir, "tpm.sock") }

func (s *swtpm) addr() string { return "unix://" + s.sock() }

func (s *swtpm) start(t testing.TB) {
	t.Helper()
	owner := ",mode=0600"
	if s.uid >= 0 {
		owner += fmt.Sprintf(",uid=%d,gid=%d", s.uid, s.uid)
	}
	s.proc = s.procs.start(t, "swtpm", filepath.Join(s.dir, "swtpm.log"), nil,
		"swtpm", "socket", "--tpm2",
		"--tpmstate", "dir="+filepath.Join(s.dir, "tpmstate"),
		"--server", "type=unixio,path="+s.sock()+owner,
		"--ctrl", "type=unixio,path="+filepath.Join(s.dir, "ctrl.sock")+",mode=0600",
		"--flags", "not-need-init,startup-clear",
	)
	eventually(t, 15*time.Second, 50*time.Millisecond, "swtpm listening", func() error {
		if s.proc.exited() {
			t.Fatalf("swtpm exited: %v\n%s", s.proc.waitErr, tail(s.proc.logPath, 20))
		}
		conn, err := net.DialTimeout("unix", s.sock(), time.Second)
		if err != nil {
			return err
		}
		return conn.Close()
	})
}

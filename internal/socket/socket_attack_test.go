package socket

import (
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The environment variables that make this test binary a racing client instead of a test run.
const (
	racerDirEnv = "KLEIDI_SOCKET_RACER_DIR"
	racerPIDEnv = "KLEIDI_SOCKET_RACER_PID"
)

// TestMain runs the racing client of TestListenBindRace when the environment asks for it.
func TestMain(m *testing.M) {
	if dir := os.Getenv(racerDirEnv); dir != "" {
		race(dir, os.Getenv(racerPIDEnv))
		return
	}
	os.Exit(m.Run())
}

// race dials, until its standard input closes, every name under dir a socket could be bound at: the socket,
// the temporary name of the listening process pid, and every entry of dir and of each of its subdirectories
// (the private directories a socket is bound in first). It keeps each connection it makes open, so that a server
// that accepts it has served another user.
func race(dir, pid string) {
	done := make(chan struct{})
	go func() {
		io.Copy(io.Discard, os.Stdin)
		close(done)
	}()
	var held []net.Conn
	names := []string{filepath.Join(dir, "kms.sock"), filepath.Join(dir, ".kms.sock."+pid+".tmp")}
	for i := 0; ; i++ {
		select {
		case <-done:
			for _, c := range held {
				c.Close()
			}
			return
		default:
		}
		if i%64 == 0 {
			names = names[:2]
			entries, _ := os.ReadDir(dir)
			for _, e := range entries {
				p := filepath.Join(dir, e.Name())
				names = append(names, p)
				sub, _ := os.ReadDir(p) // a private bind directory: every name in it, whatever it is called
				for _, s := range sub {
					names = append(names, filepath.Join(p, s.Name()))
				}
			}
		}
		for _, n := range names {
			if c, err := net.Dial("unix", n); err == nil {
				held = append(held, c)
			}
		}
	}
}

// TestListenBindRace races a client of uid 65534 against Listen under umask 0, in a socket directory every
// user may enter: the client must never be accepted, whatever name it dials while the socket is being set up.
func TestListenBindRace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as uid 65534")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Fatalf("setpriv not found (%v): install util-linux", err)
	}
	// The test binary, where uid 65534 may run it.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	binDir := shortDir(t)
	os.Chmod(binDir, 0o755)
	racer := filepath.Join(binDir, "racer")
	b, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(racer, b, 0o755); err != nil {
		t.Fatal(err)
	}

	dir := shortDir(t)
	os.Chmod(dir, 0o755)
	path := filepath.Join(dir, "kms.sock")
	cmd := exec.Command(setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", racer)
	cmd.Env = []string{racerDirEnv + "=" + dir, racerPIDEnv + "=" + strconv.Itoa(os.Getpid())}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		stdin.Close()
		cmd.Wait()
	}()
	time.Sleep(100 * time.Millisecond)

	old := syscall.Umask(0)
	defer syscall.Umask(old)
	served := 0
	deadline := time.Now().Add(3 * time.Second)
	n := 0
	for ; time.Now().Before(deadline); n++ {
		l, err := Listen(path, 0o600)
		if err != nil {
			t.Fatalf("Listen() err = %v, want nil", err)
		}
		ul := l.(interface{ SetDeadline(time.Time) error })
		for {
			ul.SetDeadline(time.Now().Add(2 * time.Millisecond))
			c, err := l.Accept()
			if err != nil {
				break
			}
			if cred, err := PeerCred(c); err == nil && cred.UID == 65534 {
				served++
			}
			c.Close()
		}
		l.Close()
	}
	if served > 0 {
		t.Errorf("%d connections of uid 65534 accepted in %d Listen calls under umask 0, want none", served, n)
	}
	t.Logf("%d Listen calls raced by uid 65534: %d of its connections accepted", n, served)
}

// TestListenKeepsLiveSocket binds a second server at the path after Listen found it free and before it moves its
// own socket there, as a second instance starting at the same time would: Listen must refuse, not replace it.
func TestListenKeepsLiveSocket(t *testing.T) {
	path := filepath.Join(shortDir(t), "kms.sock")
	var other *net.UnixListener
	testHookBeforeRename = func() {
		var err error
		other, err = net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Errorf("the other server's bind err = %v", err)
		}
	}
	defer func() { testHookBeforeRename = nil }()
	l, err := Listen(path, 0o600)
	if err == nil {
		l.Close()
	}
	if err == nil || !strings.Contains(err.Error(), "another server") {
		t.Errorf("Listen() beside a server that bound first err = %v, want another server is listening", err)
	}
	if other == nil {
		t.Fatal("the other server did not bind")
	}
	defer other.Close()
	go func() {
		if c, err := other.Accept(); err == nil {
			c.Close()
		}
	}()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("the other server's socket is gone: %v", err)
	}
	c.Close()
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("socket directory holds %d entries after the refused Listen, want only the other socket", len(entries))
	}
}

// TestCloseKeepsOthersSocket replaces the socket while the listener runs, as a second instance would after an
// operator removed the first one's socket: closing the first listener must not remove the second one's socket.
func TestCloseKeepsOthersSocket(t *testing.T) {
	path := filepath.Join(shortDir(t), "kms.sock")
	l, err := Listen(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	other, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	l.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Errorf("os.Lstat(the other server's socket) after the first Close err = %v, want nil", err)
	}
}

// TestListenUnsafeDirectories refuses socket directories another user could change: group-writable, under a
// group- or world-writable directory, or owned by another user.
func TestListenUnsafeDirectories(t *testing.T) {
	base := shortDir(t)
	mk := func(p string, mode os.FileMode) string {
		t.Helper()
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, mode)
		return p
	}
	group := mk(filepath.Join(base, "group"), 0o770)
	open := mk(filepath.Join(base, "open"), 0o777)
	under := mk(filepath.Join(open, "private"), 0o700)
	cases := map[string]string{
		"group-writable":                 filepath.Join(group, "kms.sock"),
		"under a world-writable dir":     filepath.Join(under, "kms.sock"),
		"created under a world-writable": filepath.Join(open, "new", "kms.sock"),
	}
	if os.Geteuid() == 0 {
		other := mk(filepath.Join(base, "other"), 0o700)
		os.Chown(other, 65534, 65534)
		cases["owned by uid 65534"] = filepath.Join(other, "kms.sock")
		parent := mk(filepath.Join(base, "parent"), 0o755)
		os.Chown(parent, 65534, 65534)
		cases["under a dir of uid 65534"] = filepath.Join(mk(filepath.Join(parent, "d"), 0o700), "kms.sock")
	}
	for name, path := range cases {
		l, err := Listen(path, 0o600)
		if err == nil {
			l.Close()
			t.Errorf("%s: Listen(%s) err = nil, want an error", name, path)
			continue
		}
		if _, serr := os.Lstat(path); !errors.Is(serr, os.ErrNotExist) {
			t.Errorf("%s: a socket was left at %s", name, path)
		}
	}
}

package socket

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ks")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestParseEndpoint(t *testing.T) {
	cases := map[string]string{
		"unix:///run/kleidi/kms.sock": "/run/kleidi/kms.sock",
		"/run/kleidi/kms.sock":        "/run/kleidi/kms.sock",
		"unix:///@kleidi":             "@kleidi",
		"unix://relative/kms.sock":    "",
		"tcp://127.0.0.1:1":           "",
		"unix://":                     "",
		"unix:///@":                   "",
		"kms.sock":                    "",
	}
	for in, want := range cases {
		got, err := ParseEndpoint(in)
		if got != want || (err == nil) != (want != "") {
			t.Errorf("ParseEndpoint(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

func TestListen(t *testing.T) {
	path := filepath.Join(shortDir(t), "new", "kms.sock")
	l, err := Listen(path, 0o660)
	if err != nil {
		t.Fatalf("Listen() err = %v, want nil", err)
	}
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o660 {
		t.Errorf("os.Lstat(socket) = %v, %v; want a socket of mode 0660", fi.Mode(), err)
	}
	dir, _ := os.Stat(filepath.Dir(path))
	if dir.Mode().Perm() != 0o700 {
		t.Errorf("socket directory mode = %v, want 0700", dir.Mode().Perm())
	}
	if got := l.Addr().String(); got != path {
		t.Errorf("l.Addr() = %s, want %s", got, path)
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("socket directory holds %d entries, want only the socket", len(entries))
	}

	// A second server on the same path is refused while the first answers.
	accepted := make(chan Cred, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		cred, _ := PeerCred(c)
		accepted <- cred
		c.Close()
	}()
	if _, err := Listen(path, 0o600); err == nil || !strings.Contains(err.Error(), "another server") {
		t.Errorf("Listen() on a live socket err = %v, want another server is listening", err)
	}
	cred := <-accepted
	if cred.UID != uint32(os.Getuid()) || cred.PID != int32(os.Getpid()) {
		t.Errorf("PeerCred() = %v, want uid %d pid %d", cred, os.Getuid(), os.Getpid())
	}
	if err := l.Close(); err != nil {
		t.Errorf("Close() err = %v", err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("os.Lstat(socket) after Close err = %v, want not exist", err)
	}
}

func TestListenStale(t *testing.T) {
	path := filepath.Join(shortDir(t), "kms.sock")
	// A socket whose server is gone, as a crash leaves it.
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	l, err := Listen(path, 0o600)
	if err != nil {
		t.Fatalf("Listen() over a stale socket err = %v, want nil", err)
	}
	l.Close()
}

func TestListenRefuses(t *testing.T) {
	dir := shortDir(t)
	file := filepath.Join(dir, "not-a-socket")
	os.WriteFile(file, []byte("data"), 0o600)
	if _, err := Listen(file, 0o600); err == nil {
		t.Errorf("Listen() over a regular file err = nil, want an error")
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "data" {
		t.Errorf("the regular file was changed: %q, %v", b, err)
	}
	open := filepath.Join(dir, "open")
	os.Mkdir(open, 0o777)
	os.Chmod(open, 0o777)
	if _, err := Listen(filepath.Join(open, "kms.sock"), 0o600); err == nil {
		t.Errorf("Listen() in a world-writable directory err = nil, want an error")
	}
	if _, err := Listen("relative.sock", 0o600); err == nil {
		t.Errorf("Listen() on a relative path err = nil, want an error")
	}
	if _, err := Listen(filepath.Join(dir, "x.sock"), 0o4600); err == nil {
		t.Errorf("Listen() with a setuid mode err = nil, want an error")
	}
}

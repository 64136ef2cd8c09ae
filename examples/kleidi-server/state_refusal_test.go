package main_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi/gpg"
)

// TestServeRefusesNewKeyring: serve never creates a keyring where one is expected, only init does. With a real
// root of trust (OpenPGP keys given by flags, a TPM) a state directory without a keyring is refused, since it
// may be a volume that did not mount; nothing is created in it.
func TestServeRefusesNewKeyring(t *testing.T) {
	s := newSandbox(t)
	keys, err := gpg.GenerateDevelopmentKey(filepath.Join(s.dir, "keys"))
	if err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(s.dir, "state")
	if err := os.Mkdir(state, 0o700); err != nil { // an empty mount point
		t.Fatal(err)
	}
	gpgFlags := []string{"--gpg-private-key", keys.PrivateKeyFile, "--gpg-public-key", filepath.Join(s.dir, "keys", gpg.DevelopmentPublicKeyFile)}
	for _, c := range []struct {
		name  string
		flags []string
		want  string
	}{
		{"gpg keys", gpgFlags, "run kleidi-server init"},
		{"tpm", []string{"--provider", "tpm", "--tpm", startSwtpmUnix(t)}, "run kleidi-server init"},
		// A provider's own errors come first.
		{"missing tpm", []string{"--provider", "tpm", "--tpm", filepath.Join(s.dir, "no-tpm")}, "no-tpm"},
	} {
		name := c.name
		code, _, errOut := runBounded(t, s.command(false, append(append([]string{"serve"}, s.flags()...), c.flags...)...))
		if code == 0 || !strings.Contains(errOut, c.want) {
			t.Errorf("%s: serve on a state directory without a keyring = %d, %q; want a refusal that says %q", name, code, errOut, c.want)
		}
		if entries, _ := os.ReadDir(state); len(entries) != 0 {
			t.Errorf("%s: serve left %d entries in the state directory, want none", name, len(entries))
		}
		if _, err := os.Lstat(s.socket()); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: serve made its socket: %v", name, err)
		}
	}
	// init is the explicit way; serve then starts.
	if code, out, errOut := s.run(t, append(append([]string{"init"}, s.flags()[:2]...), gpgFlags...)...); code != 0 {
		t.Fatalf("init with gpg keys = %d, %q, %q; want 0", code, out, errOut)
	}
	s.serve(t, s.command(false, append(append([]string{"serve"}, s.flags()...), gpgFlags...)...))
	if code, out, errOut := s.run(t, "status", "--listen", "unix://"+s.socket(), "--wait", "30s"); code != 0 {
		t.Errorf("status after init = %d, %q, %q; want 0", code, out, errOut)
	}
}

// TestServeRefusesLostKeyring: with the development key too, a state directory that was initialised before and
// lost its keyring is refused rather than given a new keyring (and a new key nothing was encrypted under).
func TestServeRefusesLostKeyring(t *testing.T) {
	s := newSandbox(t)
	state := filepath.Join(s.dir, "state")
	if code, out, errOut := s.run(t, append([]string{"init"}, s.flags()[:2]...)...); code != 0 {
		t.Fatalf("init = %d, %q, %q; want 0", code, out, errOut)
	}
	if err := os.Remove(filepath.Join(state, "keyring.json")); err != nil {
		t.Fatal(err)
	}
	// Each sign of an earlier keyring is enough on its own: the file init writes, the lock, the development key.
	for _, sign := range []string{"initialised", "keyring.json.lock", "gpg"} {
		code, _, errOut := runBounded(t, s.command(false, append([]string{"serve"}, s.flags()...)...))
		if code == 0 || !strings.Contains(errOut, "initialised before") || !strings.Contains(errOut, sign) {
			t.Errorf("serve on a state directory holding %s but no keyring = %d, %q; want a refusal naming %s", sign, code, errOut, sign)
		}
		if _, err := os.Lstat(filepath.Join(state, "keyring.json")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("serve created a keyring in a state directory that had lost its own")
		}
		if err := os.Remove(filepath.Join(state, sign)); err != nil && sign != "gpg" {
			t.Fatal(err)
		}
	}
	if code, out, errOut := s.run(t, append([]string{"init"}, s.flags()[:2]...)...); code != 0 {
		t.Errorf("init on a state directory that lost its keyring = %d, %q, %q; want 0 (init is the explicit way)", code, out, errOut)
	}
}

// TestUnsafeStateDir: the state directory and the keyring must be safe from other users.
func TestUnsafeStateDir(t *testing.T) {
	s := newSandbox(t)
	state := filepath.Join(s.dir, "state")
	if code, out, errOut := s.run(t, append([]string{"init"}, s.flags()[:2]...)...); code != 0 {
		t.Fatalf("init = %d, %q, %q; want 0", code, out, errOut)
	}
	cases := []struct {
		name, path string
		mode       os.FileMode
		want       string
	}{
		{"group-writable state directory", state, 0o770, "writable by group"},
		{"world-writable directory above it", s.dir, 0o777, "writable by group"},
		{"world-writable keyring", filepath.Join(state, "keyring.json"), 0o666, "writable by group"},
	}
	for _, c := range cases {
		fi, err := os.Stat(c.path)
		if err != nil {
			t.Fatal(err)
		}
		os.Chmod(c.path, c.mode)
		code, _, errOut := s.run(t, append([]string{"rotate"}, s.flags()[:2]...)...)
		if code == 0 || !strings.Contains(errOut, c.want) {
			t.Errorf("%s: rotate = %d, %q; want a refusal that says %q", c.name, code, errOut, c.want)
		}
		os.Chmod(c.path, fi.Mode().Perm())
	}
	if code, out, errOut := s.run(t, append([]string{"rotate"}, s.flags()[:2]...)...); code != 0 {
		t.Errorf("rotate once the modes are back = %d, %q, %q; want 0", code, out, errOut)
	}
	if os.Geteuid() == 0 {
		other := filepath.Join(s.dir, "other")
		os.Mkdir(other, 0o700)
		os.Chown(other, 65534, 65534)
		code, _, errOut := runBounded(t, s.command(true, "serve", "--state-dir", filepath.Join(other, "state"), "--listen", "unix://"+filepath.Join(s.dir, "x.sock")))
		if code == 0 || !strings.Contains(errOut, "state directory") {
			t.Errorf("serve as uid 65534 under a directory of root it may not enter = %d, %q; want a state directory error", code, errOut)
		}
	}
}

// runBounded runs cmd like runCmd, but kills it after 20 s: a serve that should have refused to start fails the
// test instead of hanging it.
func runBounded(t *testing.T, cmd *exec.Cmd) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	bounded := exec.CommandContext(ctx, cmd.Path, cmd.Args[1:]...)
	bounded.Env = cmd.Env
	return runCmd(t, bounded)
}

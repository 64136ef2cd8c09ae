package main_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/gpg"
)

// binary is kleidi-server, built once by TestMain into a directory every user may read, or the binary
// KLEIDI_SERVER_BINARY names (to run the attacks against another build).
var binary string

func TestMain(m *testing.M) {
	if b := os.Getenv("KLEIDI_SERVER_BINARY"); b != "" {
		binary = b
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "kleidi-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Chmod(dir, 0o755)
	binary = filepath.Join(dir, "kleidi-server")
	build := exec.Command("go", "build", "-o", binary, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "go build:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// sandbox is a directory for one test with a path short enough for a unix socket, and the environment of a
// user whose home, state and runtime directories are in it.
type sandbox struct {
	dir string
	env []string
}

func newSandbox(t *testing.T) *sandbox {
	t.Helper()
	dir, err := os.MkdirTemp("", "kb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir, "TMPDIR=" + dir, "KLEIDI_HTTP_ADDR=127.0.0.1:0"}
	return &sandbox{dir: dir, env: env}
}

func (s *sandbox) socket() string { return filepath.Join(s.dir, "run", "kms.sock") }

// flags are the flags that keep a test's server inside its sandbox.
func (s *sandbox) flags() []string {
	return []string{"--state-dir", filepath.Join(s.dir, "state"), "--listen", "unix://" + s.socket()}
}

// command returns kleidi-server args in the sandbox's environment, run as the current user or, with asNobody,
// as uid and gid 65534.
func (s *sandbox) command(asNobody bool, args ...string) *exec.Cmd {
	var cmd *exec.Cmd
	if asNobody {
		cmd = exec.Command("setpriv", append([]string{"--reuid=65534", "--regid=65534", "--clear-groups", binary}, args...)...)
	} else {
		cmd = exec.Command(binary, args...)
	}
	cmd.Env = s.env
	return cmd
}

// run runs kleidi-server to completion and returns its exit code, stdout and stderr.
func (s *sandbox) run(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	return runCmd(t, s.command(false, args...))
}

func runCmd(t *testing.T, cmd *exec.Cmd) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("%v: %v", cmd.Args, err)
	}
	return cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()
}

// server is a running kleidi-server serve.
type server struct {
	cmd    *exec.Cmd
	stderr *syncBuffer
	done   chan struct{}
}

func (s *sandbox) serve(t *testing.T, cmd *exec.Cmd) *server {
	t.Helper()
	srv := &server{cmd: cmd, stderr: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stderr = srv.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %v: %v", cmd.Args, err)
	}
	go func() {
		cmd.Wait()
		close(srv.done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-srv.done
		if t.Failed() {
			t.Logf("kleidi-server serve stderr:\n%s", srv.stderr.String())
		}
	})
	return srv
}

// wait waits for the server to exit and returns its exit code.
func (srv *server) wait(t *testing.T) int {
	t.Helper()
	select {
	case <-srv.done:
		return srv.cmd.ProcessState.ExitCode()
	case <-time.After(30 * time.Second):
		t.Fatalf("kleidi-server serve still running 30 s after SIGTERM")
		return -1
	}
}

// httpAddress finds the HTTP address in a text or JSON log.
var httpAddress = regexp.MustCompile(`address"?[=:]"?http://([0-9.:]+)`)

// httpAddr returns the address of the server's HTTP endpoints, from its log.
func (srv *server) httpAddr(t *testing.T) string {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if m := httpAddress.FindStringSubmatch(srv.stderr.String()); m != nil {
			return m[1]
		}
	}
	t.Fatalf("no HTTP address in the log:\n%s", srv.stderr.String())
	return ""
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// field returns the value of "name: value" in a command's output.
func field(out, name string) string {
	for line := range strings.SplitSeq(out, "\n") {
		if v, ok := strings.CutPrefix(line, name+": "); ok {
			return v
		}
	}
	return ""
}

func TestVersionAndHelp(t *testing.T) {
	s := newSandbox(t)
	code, out, _ := s.run(t, "version")
	if code != 0 || !strings.Contains(out, kleidi.Version) {
		t.Errorf("kleidi-server version = %d, %q; want 0 and %s", code, out, kleidi.Version)
	}
	for _, c := range []string{"serve", "init", "rotate", "status", "version"} {
		code, _, errOut := s.run(t, c, "--help")
		if code != 0 || !strings.Contains(errOut, "Example:") || !strings.Contains(errOut, "kleidi-server "+c) {
			t.Errorf("kleidi-server %s --help = %d, %q; want 0 and an explanation with an example", c, code, errOut)
		}
	}
	if code, out, _ := s.run(t, "help"); code != 0 || !strings.Contains(out, "rotate") {
		t.Errorf("kleidi-server help = %d, %q; want 0 and the commands", code, out)
	}
}

func TestErrorsAreOneLine(t *testing.T) {
	s := newSandbox(t)
	cases := []struct {
		args []string
		env  string
		want string
	}{
		{[]string{"frobnicate"}, "", "unknown command"},
		{[]string{"rotate", "--state-dir", filepath.Join(s.dir, "none")}, "", "no keyring in"},
		{[]string{"status", "--listen", "unix://" + filepath.Join(s.dir, "none.sock")}, "", "no plugin answers"},
		{[]string{"serve", "--provider", "hsm", "--state-dir", filepath.Join(s.dir, "st")}, "", `--provider "hsm"`},
		{[]string{"serve", "--state-dir", filepath.Join(s.dir, "st")}, "KLEIDI_SOCKET_MODE=abc", "KLEIDI_SOCKET_MODE"},
		{[]string{"serve", "--state-dir", filepath.Join(s.dir, "st"), "--gpg-private-key", filepath.Join(s.dir, "missing.asc")}, "", "missing.asc"},
		{[]string{"serve", "--state-dir", filepath.Join(s.dir, "st"), "--listen", "tcp://127.0.0.1:1"}, "", "only unix://"},
	}
	for _, c := range cases {
		cmd := s.command(false, c.args...)
		if c.env != "" {
			cmd.Env = append(cmd.Env, c.env)
		}
		code, _, errOut := runCmd(t, cmd)
		lines := strings.Split(strings.TrimSpace(errOut), "\n")
		last := lines[len(lines)-1]
		if code == 0 || !strings.Contains(last, c.want) || !strings.HasPrefix(last, "kleidi-server") {
			t.Errorf("kleidi-server %v = %d, last line %q; want non-zero and one line with %q", c.args, code, last, c.want)
		}
	}
	if code, _, _ := s.run(t, "serve", "--no-such-flag"); code != 2 {
		t.Errorf("kleidi-server serve --no-such-flag = %d, want 2", code)
	}
}

// TestServeRotate runs a server configured through the environment, rotates under it, reads its health
// endpoints, refuses a second init, and stops it with SIGTERM.
func TestServeRotate(t *testing.T) {
	s := newSandbox(t)
	s.env = append(s.env, "KLEIDI_STATE_DIR="+filepath.Join(s.dir, "state"), "KLEIDI_LISTEN=unix://"+s.socket())
	srv := s.serve(t, s.command(false, "serve"))
	code, out, errOut := s.run(t, "status", "--wait", "30s")
	if code != 0 || field(out, "healthz") != "ok" || field(out, "version") != "v2" {
		t.Fatalf("kleidi-server status = %d, %q, %q; want 0, healthz ok, version v2", code, out, errOut)
	}
	first := field(out, "key_id")
	if !strings.HasPrefix(first, "kleidi-gpg-") {
		t.Errorf("key_id = %q, want kleidi-gpg-...", first)
	}
	// The warning is written before serving, but the pipe that carries it to this test may lag behind the socket.
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(srv.stderr.String(), "INSECURE development"); {
		if time.Now().After(deadline) {
			t.Errorf("serve with no gpg key did not warn about the development key")
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	fi, err := os.Stat(s.socket())
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode = %v, %v; want 0600", fi.Mode(), err)
	}
	for _, path := range []string{"/livez", "/readyz", "/healthz"} {
		resp, err := http.Get("http://" + srv.httpAddr(t) + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || strings.TrimSpace(string(body)) != "ok" {
			t.Errorf("GET %s = %d %q, want 200 ok", path, resp.StatusCode, body)
		}
	}

	client := kmsClient(t, s.socket())
	ctx := context.Background()
	old, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("under the first key")})
	if err != nil || old.KeyId != first {
		t.Fatalf("Encrypt() = %v, %v; want key_id %s", old, err, first)
	}

	code, out, errOut = s.run(t, "rotate")
	second := field(out, "key_id")
	if code != 0 || second == "" || second == first || field(out, "previous_key_id") != first {
		t.Fatalf("kleidi-server rotate = %d, %q, %q; want a new key_id", code, out, errOut)
	}
	// The running server reports the new key within 10 s, and Encrypt with it.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, out, _ = s.run(t, "status")
		if field(out, "key_id") == second {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status key_id = %q 10 s after rotate, want %s", field(out, "key_id"), second)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if enc, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("x")}); err != nil || enc.KeyId != second {
		t.Errorf("Encrypt() after rotate = %v, %v; want key_id %s", enc, err, second)
	}
	dec, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: old.Ciphertext, KeyId: old.KeyId, Annotations: old.Annotations})
	if err != nil || string(dec.Plaintext) != "under the first key" {
		t.Errorf("Decrypt() of data under the first key after rotate = %v, %v", dec, err)
	}

	if code, _, errOut := s.run(t, "init"); code == 0 || !strings.Contains(errOut, "refusing to overwrite") {
		t.Errorf("kleidi-server init on an initialised state dir = %d, %q; want an error", code, errOut)
	}

	// SIGTERM: exit 0, socket removed.
	srv.cmd.Process.Signal(syscall.SIGTERM)
	if code := srv.wait(t); code != 0 {
		t.Errorf("kleidi-server serve after SIGTERM exit = %d, want 0", code)
	}
	if _, err := os.Lstat(s.socket()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket after SIGTERM: %v, want removed", err)
	}
	// The state survives: a new server serves the second key and decrypts the old data.
	s.serve(t, s.command(false, "serve"))
	code, out, _ = s.run(t, "status", "--wait", "30s")
	if code != 0 || field(out, "key_id") != second {
		t.Errorf("status after restart = %d, %q; want key_id %s", code, out, second)
	}
	client = kmsClient(t, s.socket())
	if _, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: old.Ciphertext, KeyId: old.KeyId}); err != nil {
		t.Errorf("Decrypt() of data under the first key after restart err = %v", err)
	}
}

func kmsClient(t *testing.T, socket string) kmsapi.KeyManagementServiceClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return kmsapi.NewKeyManagementServiceClient(conn)
}

func TestInit(t *testing.T) {
	s := newSandbox(t)
	state := filepath.Join(s.dir, "state")
	code, out, errOut := s.run(t, "init", "--state-dir", state)
	if code != 0 || !strings.HasPrefix(field(out, "key_id"), "kleidi-gpg-") {
		t.Fatalf("kleidi-server init = %d, %q, %q; want 0 and a key_id", code, out, errOut)
	}
	fi, err := os.Stat(state)
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("state dir mode = %v, %v; want 0700", fi.Mode(), err)
	}
	if fi, err := os.Stat(filepath.Join(state, "keyring.json")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("keyring mode = %v, %v; want 0600", fi.Mode(), err)
	}
	// serve uses the initialised state: the same key.
	s.serve(t, s.command(false, append([]string{"serve"}, s.flags()...)...))
	code, status, errOut := s.run(t, "status", "--listen", "unix://"+s.socket(), "--wait", "30s")
	if code != 0 || field(status, "key_id") != field(out, "key_id") {
		t.Errorf("status after init = %d, %q, %q; want key_id %s", code, status, errOut, field(out, "key_id"))
	}
}

// A server killed with SIGKILL leaves its socket behind; the next start removes it and serves.
func TestStaleSocketAfterKill(t *testing.T) {
	s := newSandbox(t)
	srv := s.serve(t, s.command(false, append([]string{"serve"}, s.flags()...)...))
	if code, out, errOut := s.run(t, "status", "--listen", "unix://"+s.socket(), "--wait", "30s"); code != 0 {
		t.Fatalf("status = %d, %q, %q; want 0", code, out, errOut)
	}
	srv.cmd.Process.Signal(syscall.SIGKILL)
	srv.wait(t)
	if fi, err := os.Lstat(s.socket()); err != nil || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("socket after SIGKILL: %v, %v; want a stale socket left behind", fi, err)
	}
	if c, err := net.Dial("unix", s.socket()); err == nil {
		c.Close()
		t.Fatalf("something still answers on the socket after SIGKILL")
	}
	s.serve(t, s.command(false, append([]string{"serve"}, s.flags()...)...))
	if code, out, errOut := s.run(t, "status", "--listen", "unix://"+s.socket(), "--wait", "30s"); code != 0 || field(out, "healthz") != "ok" {
		t.Fatalf("status after restart over a stale socket = %d, %q, %q; want 0, healthz ok", code, out, errOut)
	}
	// A second server on a live socket refuses to start and leaves the first one alone.
	code, _, errOut := s.run(t, append([]string{"serve"}, s.flags()...)...)
	if code == 0 || !strings.Contains(errOut, "another server is listening") {
		t.Errorf("a second serve on a live socket = %d, %q; want an error", code, errOut)
	}
	if code, _, _ := s.run(t, "status", "--listen", "unix://"+s.socket()); code != 0 {
		t.Errorf("status of the first server after a second one was refused = %d, want 0", code)
	}
}

// TestFirstCommand runs what the README's first command runs: serve with no flag at all, in the background,
// then status, as a non-root user (uid 65534 when the tests run as root). Only the environment is set: a home
// directory and TMPDIR in the sandbox, and an HTTP port of its own.
func TestFirstCommand(t *testing.T) {
	s := newSandbox(t)
	asNobody := os.Geteuid() == 0
	if asNobody {
		if _, err := exec.LookPath("setpriv"); err != nil {
			t.Fatalf("running as root, the non-root part needs setpriv (util-linux): %v", err)
		}
		os.Chmod(s.dir, 0o755)
		if err := os.Chown(s.dir, 65534, 65534); err != nil {
			t.Fatal(err)
		}
	}
	script := `"$0" serve & "$0" status --wait 60s; s=$?; kill $!; wait $!; echo "serve exit: $?"; exit $s`
	var cmd *exec.Cmd
	if asNobody {
		cmd = exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", script, binary)
	} else {
		cmd = exec.Command("sh", "-c", script, binary)
	}
	cmd.Env = s.env
	code, out, errOut := runCmd(t, cmd)
	if code != 0 || field(out, "healthz") != "ok" || field(out, "serve exit") != "0" {
		t.Fatalf("first command = %d, stdout %q, stderr %q; want 0, healthz ok, serve exit 0", code, out, errOut)
	}
	// What it made belongs to the user, with private modes.
	uid := uint32(os.Geteuid())
	if asNobody {
		uid = 65534
	}
	state := filepath.Join(s.dir, ".local", "state", "kleidi")
	for path, mode := range map[string]os.FileMode{state: 0o700, filepath.Join(state, "keyring.json"): 0o600, filepath.Join(s.dir, fmt.Sprintf("kleidi-%d", uid)): 0o700} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Errorf("os.Stat(%s) err = %v", path, err)
			continue
		}
		if fi.Mode().Perm() != mode || fi.Sys().(*syscall.Stat_t).Uid != uid {
			t.Errorf("%s: mode %v owner %d, want %v owner %d", path, fi.Mode().Perm(), fi.Sys().(*syscall.Stat_t).Uid, mode, uid)
		}
	}
}

// TestProviders serves with an OpenPGP key given by flags and the environment, with an audit log, and with
// the in-process TPM simulator.
func TestProviders(t *testing.T) {
	t.Run("gpg", func(t *testing.T) {
		s := newSandbox(t)
		keys, err := gpg.GenerateDevelopmentKey(filepath.Join(s.dir, "keys"))
		if err != nil {
			t.Fatal(err)
		}
		public := filepath.Join(s.dir, "keys", gpg.DevelopmentPublicKeyFile)
		s.env = append(s.env, "KLEIDI_GPG_PRIVATE_KEY="+keys.PrivateKeyFile)
		code, out, errOut := s.run(t, append([]string{"init", "--gpg-public-key", public}, s.flags()[:2]...)...)
		if code != 0 || strings.Contains(errOut, "INSECURE") {
			t.Fatalf("init with gpg keys = %d, %q, %q; want 0 and no development key warning", code, out, errOut)
		}
		audit := filepath.Join(s.dir, "audit.json")
		s.serve(t, s.command(false, append([]string{"serve", "--audit-log", audit}, s.flags()...)...))
		code, out, errOut = s.run(t, "status", "--listen", "unix://"+s.socket(), "--wait", "30s")
		if code != 0 || !strings.HasPrefix(field(out, "key_id"), "kleidi-gpg-") {
			t.Fatalf("status = %d, %q, %q; want 0 and a gpg key_id", code, out, errOut)
		}
		if code, out, errOut := s.run(t, append([]string{"rotate"}, s.flags()[:2]...)...); code != 0 {
			t.Fatalf("rotate with gpg keys from the environment = %d, %q, %q; want 0", code, out, errOut)
		}
		b, err := os.ReadFile(audit)
		if err != nil || !strings.Contains(string(b), `"event":"kms.status"`) ||
			!strings.Contains(string(b), fmt.Sprintf(`"caller_uid":%d`, os.Getuid())) {
			t.Errorf("audit log = %q, %v; want a Status record with the caller's uid", b, err)
		}
	})
	t.Run("tpm simulator", func(t *testing.T) {
		s := newSandbox(t)
		s.serve(t, s.command(false, append([]string{"serve", "--provider", "tpm", "--tpm", "simulator", "--tpm-pcrs", "7"}, s.flags()...)...))
		code, out, errOut := s.run(t, "status", "--listen", "unix://"+s.socket(), "--wait", "30s")
		if code != 0 || !strings.HasPrefix(field(out, "key_id"), "kleidi-tpm-") {
			t.Fatalf("status = %d, %q, %q; want 0 and a tpm key_id", code, out, errOut)
		}
	})
}

// TestRewrapAddsARecipient adds a second OpenPGP recipient to a keyring: before rewrap the second node's key cannot
// open it, after rewrap it can, and every key_id is the same.
func TestRewrapAddsARecipient(t *testing.T) {
	s := newSandbox(t)
	a, err := gpg.GenerateDevelopmentKey(filepath.Join(s.dir, "node-a"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := gpg.GenerateDevelopmentKey(filepath.Join(s.dir, "node-b"))
	if err != nil {
		t.Fatal(err)
	}
	pubA, pubB := filepath.Join(s.dir, "node-a", gpg.DevelopmentPublicKeyFile), filepath.Join(s.dir, "node-b", gpg.DevelopmentPublicKeyFile)
	state := []string{"--state-dir", filepath.Join(s.dir, "state")}
	asA := append([]string{"--gpg-private-key", a.PrivateKeyFile, "--gpg-public-key", pubA}, state...)
	asB := append([]string{"--gpg-private-key", b.PrivateKeyFile, "--gpg-public-key", pubA, "--gpg-public-key", pubB}, state...)
	for _, args := range [][]string{append([]string{"init"}, asA...), append([]string{"rotate"}, asA...)} {
		if code, out, errOut := s.run(t, args...); code != 0 {
			t.Fatalf("kleidi-server %s = %d, %q, %q; want 0", args[0], code, out, errOut)
		}
	}
	ids := func() string {
		loaded, err := kleidi.NewFileKeyring(filepath.Join(s.dir, "state", "keyring.json")).Load(context.Background())
		records := loaded.Keys
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, r := range records {
			ids = append(ids, r.ID)
		}
		return strings.Join(ids, ",")
	}
	before := ids()
	if code, _, errOut := s.run(t, append([]string{"rotate"}, asB...)...); code == 0 || !strings.Contains(errOut, "unwrap") {
		t.Fatalf("rotate as node B before rewrap = %d, %q; want an unwrap error", code, errOut)
	}
	if code, out, errOut := s.run(t, append([]string{"rewrap", "--gpg-public-key", pubB}, asA...)...); code != 0 {
		t.Fatalf("kleidi-server rewrap = %d, %q, %q; want 0", code, out, errOut)
	}
	if got := ids(); got != before {
		t.Errorf("key_ids after rewrap = %s, want %s", got, before)
	}
	if code, out, errOut := s.run(t, append([]string{"rotate"}, asB...)...); code != 0 {
		t.Errorf("rotate as node B after rewrap = %d, %q, %q; want 0", code, out, errOut)
	}
}

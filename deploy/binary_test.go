package deploy_test

// This file: the reference binary built as the Containerfile builds it, run as the manifests run it.

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The uid and gid of every manifest here and of the image's USER.
const pluginID = 65532

var (
	deployDir = func() string {
		wd, err := os.Getwd()
		if err != nil {
			panic(err)
		}
		return wd
	}()
	repoRoot = filepath.Dir(deployDir)
	chartDir = filepath.Join(deployDir, "helm", "kleidi")
)

var (
	kindRe = regexp.MustCompile(`(?m)^kind:\s*(\S+)`)
	nameRe = regexp.MustCompile(`(?m)^metadata:\s*\n(?:\s+.*\n)*?\s+name:\s*(\S+)`)
)

// distrolessCCLibs are the shared libraries gcr.io/distroless/cc-debian12 ships (glibc, libgcc, libstdc++, OpenSSL),
// the base of the Containerfile's cgo target.
var distrolessCCLibs = []string{"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libresolv.so.2",
	"ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "libgcc_s.so.1", "libstdc++.so.6", "libssl.so.3", "libcrypto.so.3"}

// buildStatic builds examples/kleidi-server as the Containerfile does, into a directory every uid can read.
func buildStatic(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kleidi-deploy-bin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "kleidi-server")
	out, err := run(t, 10*time.Minute, filepath.Join(repoRoot, "examples", "kleidi-server"), []string{"CGO_ENABLED=0"}, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, ".")
	if err != nil {
		t.Fatalf("CGO_ENABLED=0 go build (examples/kleidi-server): %v\n%s", err, out)
	}
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Fatal("the CGO_ENABLED=0 build has a dynamic loader: it is not static")
		}
	}
	return bin
}

// node is the host side of a deployment: the state and socket directories, owned by the plugin's uid when the
// test runs as root, as deploy/tmpfiles.d/kleidi.conf makes them.
type node struct {
	bin, dir, stateDir, sockDir, sock, httpAddr string
	asPlugin                                    bool
}

func newNode(t *testing.T, bin string) *node {
	t.Helper()
	dir, err := os.MkdirTemp("", "kleidi-deploy-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	n := &node{bin: bin, dir: dir, stateDir: filepath.Join(dir, "lib"), sockDir: filepath.Join(dir, "run"), asPlugin: os.Geteuid() == 0}
	n.sock = filepath.Join(n.sockDir, "kms.sock")
	n.httpAddr = "127.0.0.1:" + strconv.Itoa(freePort(t))
	for d, mode := range map[string]os.FileMode{n.stateDir: 0o700, n.sockDir: 0o750} {
		if err := os.Mkdir(d, mode); err != nil {
			t.Fatal(err)
		}
		n.chown(t, d)
	}
	return n
}

func (n *node) chown(t testing.TB, path string) {
	t.Helper()
	if n.asPlugin {
		if err := os.Chown(path, pluginID, pluginID); err != nil {
			t.Fatal(err)
		}
	}
}

// command runs kleidi-server as the plugin's uid and gid (when the test is root), with extra supplementary groups.
func (n *node) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, n.bin, args...)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + n.dir}
	if n.asPlugin {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: pluginID, Gid: pluginID, Groups: []uint32{}}}
	}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// serveFlags are the flags of `kleidi-server serve` the manifests pass, for this node.
func (n *node) serveFlags() []string {
	return []string{
		"--listen=unix://" + n.sock,
		"--socket-mode=0600",
		"--state-dir=" + n.stateDir,
		"--http-addr=" + n.httpAddr,
		"--log-format=json",
		"--log-level=info",
		"--audit-log=-",
	}
}

// init runs kleidi-server init with env and args on the node's state directory, as docs/install.md says to once
// per node before the first start.
func (n *node) init(t *testing.T, env []string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := n.command(ctx, append([]string{"init", "--state-dir=" + n.stateDir}, args...)...)
	cmd.Env = append(cmd.Env, env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("kleidi-server init: %v\n%s", err, out)
	}
}

// serve starts kleidi-server serve with env and args (after "serve"), waits until it is ready, checks its
// endpoints and socket, rotates its key as docs/install.md says (rotate with env and rotateArgs; none when
// rotateArgs is nil), and stops it.
func (n *node) serve(t *testing.T, env, args, rotateArgs []string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := n.command(ctx, append([]string{"serve"}, args...)...)
	cmd.Env = append(cmd.Env, env...)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			return err
		case <-time.After(20 * time.Second):
			cancel()
			return errors.New("no exit within 20 s of SIGTERM")
		}
	}
	t.Cleanup(func() {
		stop()
		cancel()
		if t.Failed() {
			t.Logf("kleidi-server output:\n%s", logs.String())
		}
	})

	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case err := <-done:
			stopped = true
			t.Fatalf("kleidi-server serve exited: %v\n%s", err, logs.String())
		default:
		}
		if code, _, err := httpGet(n.httpAddr, "/readyz"); err == nil && code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("kleidi-server not ready within 30 s\n%s", logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The probes of every manifest, and the socket kube-apiserver dials.
	for _, path := range []string{"/livez", "/readyz", "/healthz"} {
		code, body, err := httpGet(n.httpAddr, path)
		if err != nil || code != http.StatusOK {
			t.Errorf("GET %s: %d %q %v", path, code, body, err)
		}
	}
	fi, err := os.Lstat(n.sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket %s: mode %v, want a socket with mode 0600", n.sock, fi.Mode())
	}
	if st := fi.Sys().(*syscall.Stat_t); n.asPlugin && st.Uid != pluginID {
		t.Errorf("socket owned by uid %d, want %d", st.Uid, pluginID)
	}

	// status exits 0 only when the plugin is healthy.
	sctx, scancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer scancel()
	out, err := n.command(sctx, "status", "--listen=unix://"+n.sock).CombinedOutput()
	if err != nil {
		t.Fatalf("kleidi-server status: %v\n%s", err, out)
	}
	before := keyID(string(out))
	t.Logf("status: %s", strings.Join(strings.Fields(string(out)), " "))

	// Rotation: a new KEK in the keyring, which the running server reports within 10 s.
	rcmd := n.command(sctx, append([]string{"rotate"}, rotateArgs...)...)
	rcmd.Env = append(rcmd.Env, env...)
	if rotateArgs == nil {
		rcmd = nil // see tpm-swtpm
	}
	if rcmd != nil {
		if out, err := rcmd.CombinedOutput(); err != nil {
			t.Fatalf("kleidi-server rotate: %v\n%s", err, out)
		}
	}
	for deadline := time.Now().Add(20 * time.Second); rcmd != nil; {
		out, err := n.command(sctx, "status", "--listen=unix://"+n.sock).CombinedOutput()
		if err != nil {
			t.Fatalf("kleidi-server status after rotate: %v\n%s", err, out)
		}
		if after := keyID(string(out)); after != before && after != "" {
			t.Logf("rotated: key_id %s -> %s", before, after)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("key_id still %s 20 s after rotate", before)
		}
		time.Sleep(250 * time.Millisecond)
	}

	// SIGTERM: a clean exit that removes the socket.
	if err := stop(); err != nil {
		t.Fatalf("kleidi-server serve after SIGTERM: %v\n%s", err, logs.String())
	}
	if _, err := os.Lstat(n.sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket still there after SIGTERM: %v", err)
	}
	if strings.Contains(logs.String(), "BEGIN PGP PRIVATE KEY") {
		t.Error("the log holds a private key")
	}
}

// TestStaticBinary builds kleidi-server with CGO_ENABLED=0, as the Containerfile does, and serves with each
// provider as the image's non-root uid.
func TestStaticBinary(t *testing.T) {
	bin := buildStatic(t)

	t.Run("flags", func(t *testing.T) { checkFlags(t, bin) })

	t.Run("gpg", func(t *testing.T) {
		n := newNode(t, bin)
		pub, priv, pass := gpgKey(t, n)
		provider := []string{"--provider=gpg", "--gpg-public-key=" + pub, "--gpg-private-key=" + priv, "--gpg-passphrase-file=" + pass}
		n.init(t, nil, provider...)
		n.serve(t, nil, append(n.serveFlags(), provider...), append([]string{"--state-dir=" + n.stateDir}, provider...))
	})

	t.Run("tpm-swtpm", func(t *testing.T) {
		n := newNode(t, bin)
		addr := startSwtpm(t, n.dir)
		// swtpm serves one TCP client at a time and the running plugin is that client, so a second process
		// (rotate) cannot reach this TPM while it runs; /dev/tpmrm0 has no such limit. No rotation here.
		n.init(t, nil, "--provider=tpm", "--tpm=tcp://"+addr)
		n.serve(t, nil, append(n.serveFlags(), "--provider=tpm", "--tpm=tcp://"+addr), nil)
	})

	// The systemd unit's way: no flags, everything from deploy/systemd/kleidi.env as shipped (gpg; its paths moved
	// to this node), and rotate run with the same environment.
	t.Run("gpg-systemd-env", func(t *testing.T) {
		n := newNode(t, bin)
		pub, priv, pass := gpgKey(t, n)
		env := systemdEnv(t, false, map[string]string{
			"KLEIDI_LISTEN":              "unix://" + n.sock,
			"KLEIDI_STATE_DIR":           n.stateDir,
			"KLEIDI_HTTP_ADDR":           n.httpAddr,
			"KLEIDI_GPG_PUBLIC_KEY":      pub,
			"KLEIDI_GPG_PRIVATE_KEY":     priv,
			"KLEIDI_GPG_PASSPHRASE_FILE": pass,
		})
		n.init(t, env)
		n.serve(t, env, []string{}, []string{})
	})

	// kleidi.env switched to its TPM lines as its comments say, the TPM moved to a swtpm.
	t.Run("tpm-swtpm-systemd-env", func(t *testing.T) {
		n := newNode(t, bin)
		addr := startSwtpm(t, n.dir)
		env := systemdEnv(t, true, map[string]string{
			"KLEIDI_LISTEN":    "unix://" + n.sock,
			"KLEIDI_STATE_DIR": n.stateDir,
			"KLEIDI_HTTP_ADDR": n.httpAddr,
			"KLEIDI_TPM":       "tcp://" + addr,
		})
		n.init(t, env)
		n.serve(t, env, []string{}, nil)
	})

	t.Run("tpm-simulator-absent", func(t *testing.T) {
		n := newNode(t, bin)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := n.command(ctx, "serve", "--listen=unix://"+n.sock, "--state-dir="+n.stateDir,
			"--http-addr="+n.httpAddr, "--provider=tpm", "--tpm=simulator").CombinedOutput()
		if ctx.Err() != nil {
			t.Fatalf("serve --tpm simulator did not exit within 30 s:\n%s", out)
		}
		if err == nil {
			t.Fatalf("serve --tpm simulator in a CGO_ENABLED=0 build succeeded:\n%s", out)
		}
		if !strings.Contains(string(out), "cgo") {
			t.Errorf("serve --tpm simulator: the error does not say the simulator needs cgo:\n%s", out)
		}
		t.Logf("serve --tpm simulator: %v: %s", err, lastLine(string(out)))
	})
}

var flagRe = regexp.MustCompile(`(?m)^\s+-(?:-)?([a-z][a-z0-9-]*)`)

// checkFlags checks that every flag the manifests pass, and every KLEIDI_ variable of the systemd
// environment file, is one that kleidi-server serve knows.
func checkFlags(t *testing.T, bin string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	help, _ := exec.CommandContext(ctx, bin, "serve", "--help").CombinedOutput()
	var known []string
	for _, m := range flagRe.FindAllStringSubmatch(string(help), -1) {
		known = append(known, m[1])
	}
	if !slices.Contains(known, "listen") || !slices.Contains(known, "state-dir") {
		t.Fatalf("kleidi-server serve --help lists no --listen or --state-dir:\n%s", help)
	}

	var texts []string
	for _, f := range []string{filepath.Join(deployDir, "static-pod", "kleidi.yaml"), filepath.Join(chartDir, "templates", "daemonset.yaml")} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		texts = append(texts, string(b))
	}
	for _, text := range texts {
		for _, m := range regexp.MustCompile(`(?m)^\s*#?\s*- --([a-z][a-z0-9-]*)=`).FindAllStringSubmatch(text, -1) {
			if !slices.Contains(known, m[1]) {
				t.Errorf("a manifest passes --%s, which kleidi-server serve does not know", m[1])
			}
		}
	}
	env, err := os.ReadFile(filepath.Join(deployDir, "systemd", "kleidi.env"))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range regexp.MustCompile(`(?m)^#?KLEIDI_([A-Z0-9_]+)=`).FindAllStringSubmatch(string(env), -1) {
		flag := strings.ToLower(strings.ReplaceAll(m[1], "_", "-"))
		if !slices.Contains(known, flag) {
			t.Errorf("kleidi.env sets KLEIDI_%s, but kleidi-server serve has no --%s", m[1], flag)
		}
	}
}

// gpgKey makes an OpenPGP key pair with GnuPG and returns the armored public and private key files and the
// passphrase file.
func gpgKey(t *testing.T, n *node) (pub, priv, pass string) {
	t.Helper()
	if _, err := exec.LookPath("gpg"); err != nil {
		t.Fatal("gpg not found on PATH: install gnupg (apt-get install gnupg)")
	}
	home := filepath.Join(n.dir, "gnupg")
	if err := os.Mkdir(home, 0o700); err != nil {
		t.Fatal(err)
	}
	keys := filepath.Join(n.dir, "gpg")
	if err := os.Mkdir(keys, 0o750); err != nil {
		t.Fatal(err)
	}
	n.chown(t, keys)
	pass = filepath.Join(keys, "passphrase")
	if err := os.WriteFile(pass, []byte("deploy-test-passphrase\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	gpg := []string{"--homedir", home, "--batch", "--no-tty", "--pinentry-mode", "loopback", "--passphrase-file", pass}
	t.Cleanup(func() { run(t, time.Minute, "", nil, "gpgconf", "--homedir", home, "--kill", "all") })
	email := "deploy@kleidi.invalid"
	mustRun(t, "", "gpg", append(gpg, "--quick-generate-key", "kleidi deploy test <"+email+">", "future-default", "default", "never")...)
	pub = filepath.Join(keys, "public.asc")
	priv = filepath.Join(keys, "private.asc")
	for path, args := range map[string][]string{pub: {"--armor", "--export", email}, priv: {"--armor", "--export-secret-keys", email}} {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		out, err := exec.CommandContext(ctx, "gpg", append(gpg, args...)...).Output()
		cancel()
		if err != nil || len(out) == 0 {
			t.Fatalf("gpg %v: %v", args, err)
		}
		if err := os.WriteFile(path, out, 0o400); err != nil {
			t.Fatal(err)
		}
	}
	// As the chart's Secret volume gives them: root's files, readable by the plugin's group (fsGroup) only.
	for _, f := range []string{pub, priv, pass} {
		if err := os.Chmod(f, 0o440); err != nil {
			t.Fatal(err)
		}
		if n.asPlugin {
			if err := os.Chown(f, 0, pluginID); err != nil {
				t.Fatal(err)
			}
		}
	}
	return pub, priv, pass
}

// startSwtpm starts a swtpm process on two free loopback ports and returns its TPM command address.
func startSwtpm(t *testing.T, dir string) string {
	t.Helper()
	if _, err := exec.LookPath("swtpm"); err != nil {
		t.Fatal("swtpm not found on PATH: install swtpm and swtpm-tools (apt-get install swtpm swtpm-tools)")
	}
	state := filepath.Join(dir, "tpmstate")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	var port int
	for range 50 {
		port = freePort(t)
		if l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port+1)); err == nil {
			l.Close()
			break
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, "swtpm", "socket", "--tpm2",
		"--tpmstate", "dir="+state,
		"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port+1),
		"--flags", "not-need-init,startup-clear")
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		cmd.Wait()
	})
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return addr
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm not listening on %s within 15 s: %v\n%s", addr, err, logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

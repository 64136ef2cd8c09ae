package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// proc is a long-running child process started by a test. Each one runs in its
// own process group so that stopping it also stops anything it spawned, and
// gets SIGKILL from the kernel if the test binary dies without cleaning up.
type proc struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error
}

// procs owns every process of one top-level test and stops whatever is still
// running when that test ends, whether it passed, failed or panicked.
type procs struct {
	mu   sync.Mutex
	list []*proc
}

func newProcs(t testing.TB) *procs {
	ps := &procs{}
	t.Cleanup(func() {
		ps.stopAll(t)
		if t.Failed() {
			ps.dumpLogs(t)
		}
	})
	return ps
}

// start launches argv with its output appended to logPath.
func (ps *procs) start(t testing.TB, name, logPath string, env []string, argv ...string) *proc {
	t.Helper()
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("%s: log file: %v", name, err)
	}
	defer f.Close()
	fmt.Fprintf(f, "==== %s: %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(argv, " "))
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout = f
	cmd.Stderr = f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("%s: start %s: %v", name, argv[0], err)
	}
	p := &proc{name: name, logPath: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	ps.mu.Lock()
	ps.list = append(ps.list, p)
	ps.mu.Unlock()
	return p
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill9 sends SIGKILL to the process group and waits for the process to go.
func (p *proc) kill9() {
	_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
	<-p.done
}

// stop asks the process group to terminate and escalates to SIGKILL after 15 s.
func (p *proc) stop() {
	if p.exited() {
		_ = syscall.Kill(-p.pid(), syscall.SIGKILL) // stragglers in its group
		return
	}
	_ = syscall.Kill(-p.pid(), syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
	}
	p.kill9()
}

func (ps *procs) stopAll(t testing.TB) {
	ps.mu.Lock()
	list := append([]*proc(nil), ps.list...)
	ps.mu.Unlock()
	// In reverse start order: the apiserver goes before the etcd it needs to
	// shut down cleanly, the plugin after the apiserver that calls it.
	for i := len(list) - 1; i >= 0; i-- {
		p := list[i]
		if p.exited() {
			p.stop()
			continue
		}
		start := time.Now()
		p.stop()
		t.Logf("stopped %s (pid %d) in %s", p.name, p.pid(), time.Since(start).Round(time.Millisecond))
	}
}

func (ps *procs) dumpLogs(t testing.TB) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	seen := map[string]bool{}
	for _, p := range ps.list {
		if seen[p.logPath] {
			continue
		}
		seen[p.logPath] = true
		t.Logf("---- last lines of %s (%s):\n%s", p.name, p.logPath, tail(p.logPath, 40))
	}
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// run executes a short-lived command and returns its combined output.
func run(ctx context.Context, env []string, argv ...string) (string, error) {
	cmd := commandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	return out.String(), err
}

// commandContext is exec.CommandContext in a process group of its own that is
// killed as a whole when ctx ends or the test binary dies.
func commandContext(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// mustRun is run with a 2 minute limit that fails the test on error.
func mustRun(t testing.TB, env []string, argv ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := run(ctx, env, argv...)
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(argv, " "), err, out)
	}
	return out
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// eventually polls cond every interval until it returns nil or timeout passes.
func eventually(t testing.TB, timeout, interval time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	start := time.Now()
	for {
		err := cond()
		if err == nil {
			t.Logf("%s after %s", what, time.Since(start).Round(10*time.Millisecond))
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, timeout, err)
		}
		time.Sleep(interval)
	}
}

// requireTool fails the test naming the package to install when name is not on PATH.
func requireTool(t testing.TB, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s not found on PATH: install %s (e.g. apt-get install %s)", name, pkg, pkg)
	}
	return p
}

var errNotYet = errors.New("not yet")

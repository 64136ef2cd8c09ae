package tpm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

// swtpm is a swtpm process that keeps its state in dir, so it can be killed and started again.
type swtpm struct {
	t     testing.TB
	dir   string
	port  int // the TPM port; the control port is port+1
	unix  bool
	flags string
	cmd   *exec.Cmd
}

// startSwtpm starts swtpm (Debian package swtpm) on free loopback ports, or a unix socket, and stops it at the
// end of the test.
func startSwtpm(t testing.TB, unix bool, flags string) *swtpm {
	t.Helper()
	if _, err := exec.LookPath("swtpm"); err != nil {
		t.Fatalf("swtpm not found (%v): install it, e.g. apt-get install swtpm swtpm-tools", err)
	}
	s := &swtpm{t: t, dir: t.TempDir(), unix: unix, flags: flags}
	if !unix {
		s.port = freePortPair(t)
	}
	s.start()
	t.Cleanup(s.kill)
	return s
}

// path is the Config.Path of this swtpm.
func (s *swtpm) path() string {
	if s.unix {
		return "unix://" + filepath.Join(s.dir, "sock")
	}
	return "tcp://127.0.0.1:" + strconv.Itoa(s.port)
}

func (s *swtpm) start() {
	s.t.Helper()
	args := []string{"socket", "--tpm2", "--tpmstate", "dir=" + s.dir, "--flags", s.flags}
	if s.unix {
		args = append(args, "--server", "type=unixio,path="+filepath.Join(s.dir, "sock"),
			"--ctrl", "type=unixio,path="+filepath.Join(s.dir, "ctrl"))
	} else {
		args = append(args,
			"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", s.port),
			"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", s.port+1))
	}
	s.cmd = exec.Command("swtpm", args...)
	log, err := os.OpenFile(filepath.Join(s.dir, "log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		s.t.Fatal(err)
	}
	defer log.Close()
	s.cmd.Stdout, s.cmd.Stderr = log, log
	if err := s.cmd.Start(); err != nil {
		s.t.Fatalf("starting swtpm: %v", err)
	}
	network, addr := "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port))
	if s.unix {
		network, addr = "unix", filepath.Join(s.dir, "sock")
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.Dial(network, addr)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("swtpm does not answer on %s %s: %v", network, addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (s *swtpm) kill() {
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Kill()
	s.cmd.Wait()
	s.cmd = nil
}

// freePortPair returns a loopback port p such that p and p+1 are free now.
func freePortPair(t testing.TB) int {
	t.Helper()
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := l.Addr().(*net.TCPAddr).Port
		l2, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p+1)))
		l.Close()
		if err == nil {
			l2.Close()
			return p
		}
	}
	t.Fatalf("no pair of free loopback ports")
	return 0
}

const swtpmFlags = "not-need-init,startup-clear"

func newSwtpmProvider(t testing.TB, s *swtpm, cfg Config) *Provider {
	t.Helper()
	cfg.Path = s.path()
	p, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("New(ctx, %+v) err = %v, want nil", cfg, err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func TestConformanceSwtpm(t *testing.T) {
	s := startSwtpm(t, false, swtpmFlags)
	kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider {
		return newSwtpmProvider(t, s, Config{PCRs: []int{7}})
	})
	// Every provider flushed what it loaded, its SRK included.
	p := newSwtpmProvider(t, s, Config{})
	assertNoHandles(t, p)
}

func TestConformanceSwtpmUnixSocket(t *testing.T) {
	s := startSwtpm(t, true, swtpmFlags)
	kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider {
		return newSwtpmProvider(t, s, Config{})
	})
}

// TestSwtpmNeedsStartup: a TPM that was never started up gets TPM2_Startup from the provider.
func TestSwtpmNeedsStartup(t *testing.T) {
	s := startSwtpm(t, false, "not-need-init")
	p := newSwtpmProvider(t, s, Config{})
	wrapUnwrap(t, p)
}

// TestSwtpmRestart kills swtpm under a running provider and starts it again on the same state: the provider reports
// the outage, recovers on its own, and keys sealed before still unwrap.
func TestSwtpmRestart(t *testing.T) {
	ctx := context.Background()
	s := startSwtpm(t, false, swtpmFlags)
	p := newSwtpmProvider(t, s, Config{PCRs: []int{7}, AuthFile: writeAuthFile(t, "pw")})
	key, blob := wrapUnwrap(t, p)

	for round := range 2 {
		s.kill()
		if err := p.Health(ctx); !errors.Is(err, kleidi.ErrUnavailable) {
			t.Fatalf("round %d: p.Health(ctx) with swtpm down = %v, want an error wrapping kleidi.ErrUnavailable", round, err)
		}
		if got, err := p.Unwrap(ctx, blob); !errors.Is(err, kleidi.ErrUnavailable) || got != nil {
			t.Fatalf("round %d: p.Unwrap(ctx, blob) with swtpm down = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnavailable", round, len(got), err)
		}
		if _, err := p.Wrap(ctx, key); !errors.Is(err, kleidi.ErrUnavailable) {
			t.Fatalf("round %d: p.Wrap(ctx, key) with swtpm down err = %v, want an error wrapping kleidi.ErrUnavailable", round, err)
		}

		s.start()
		if round == 0 {
			// Health notices the TPM is back.
			deadline := time.Now().Add(20 * time.Second)
			for {
				err := p.Health(ctx)
				if err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("round %d: p.Health(ctx) after swtpm restart = %v, want nil", round, err)
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		// In round 1 Unwrap is the first call after the restart.
		got, err := p.Unwrap(ctx, blob)
		if err != nil || !bytes.Equal(got, key) {
			t.Fatalf("round %d: p.Unwrap(ctx, blob) after swtpm restart err = %v, want nil and the key", round, err)
		}
		wrapUnwrap(t, p)
	}
	assertNoHandles(t, p)
}

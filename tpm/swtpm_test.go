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
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
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
	}, kleiditest.WithOutage(func(t *testing.T, _ kleidi.Provider) func() {
		s.kill() // swtpm stopped; its state stays on disk
		return s.start
	}))
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

// TestSwtpmNeedsStartup: a TPM that was never started up gets TPM2_Startup from the provider, from Health too.
func TestSwtpmNeedsStartup(t *testing.T) {
	s := startSwtpm(t, false, "not-need-init")
	p := newSwtpmProvider(t, s, Config{})
	_, blob := wrapUnwrap(t, p)
	s.kill()
	s.start()
	if err := p.Health(context.Background()); err != nil {
		t.Fatalf("p.Health(ctx) on a restarted swtpm that needs TPM2_Startup = %v, want nil", err)
	}
	if _, err := p.Unwrap(context.Background(), blob); err != nil {
		t.Fatalf("p.Unwrap(ctx, blob) after the restart err = %v, want nil", err)
	}
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

// swtpmHandles returns the transient objects and loaded sessions in s, read on a connection of its own: it also
// proves that no provider holds the TPM, which serves one client at a time.
func swtpmHandles(t *testing.T, s *swtpm) (objects, sessions []tpm2.TPMHandle) {
	t.Helper()
	open, _, err := newOpener(s.path())
	if err != nil {
		t.Fatal(err)
	}
	tp, err := open()
	if err != nil {
		t.Fatalf("connecting to swtpm: %v", err)
	}
	defer tp.Close()
	return countHandles(t, tp)
}

// TestSwtpmSharedByProviders: swtpm serves one client at a time, yet two providers on it (a running server and
// kleidi-server rotate, say) both work, alternately and concurrently; a key wrapped by one unwraps with the other;
// and nothing they loaded stays in the TPM.
func TestSwtpmSharedByProviders(t *testing.T) {
	for _, unix := range []bool{false, true} {
		name := "tcp"
		if unix {
			name = "unix"
		}
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			s := startSwtpm(t, unix, swtpmFlags)
			cfg := Config{PCRs: []int{7}, AuthFile: writeAuthFile(t, "pw")}
			a := newSwtpmProvider(t, s, cfg)
			b := newSwtpmProvider(t, s, cfg)
			pairs := [][2]*Provider{{a, b}, {b, a}}

			// wrapCross wraps a key with one provider and unwraps it with both.
			wrapCross := func(by, other *Provider) error {
				key := randomKey(t)
				wrapped, err := by.Wrap(ctx, key)
				if err != nil {
					return fmt.Errorf("Wrap(ctx, key) err = %w, want nil", err)
				}
				for _, q := range []*Provider{other, by} {
					got, err := q.Unwrap(ctx, wrapped)
					if err != nil || !bytes.Equal(got, key) {
						return fmt.Errorf("Unwrap(ctx, wrapped) err = %w, want nil and the key", err)
					}
				}
				if err := by.Health(ctx); err != nil {
					return fmt.Errorf("Health(ctx) = %w, want nil", err)
				}
				return nil
			}

			for round := range 3 {
				for _, pair := range pairs {
					if err := wrapCross(pair[0], pair[1]); err != nil {
						t.Fatalf("alternately, round %d: %v", round, err)
					}
				}
			}
			if objects, sessions := swtpmHandles(t, s); len(objects) != 0 || len(sessions) != 0 {
				t.Fatalf("after alternate use: transient handles = %#x, sessions = %#x; want none", objects, sessions)
			}

			var wg sync.WaitGroup
			errs := make(chan error, 16)
			for range 3 {
				for _, pair := range pairs {
					wg.Go(func() {
						for range 5 {
							if err := wrapCross(pair[0], pair[1]); err != nil {
								errs <- err
								return
							}
						}
					})
				}
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Errorf("concurrently: %v", err)
			}
			if objects, sessions := swtpmHandles(t, s); len(objects) != 0 || len(sessions) != 0 {
				t.Errorf("after concurrent use: transient handles = %#x, sessions = %#x; want none", objects, sessions)
			}
		})
	}
}

// TestSwtpmPersistentSRK: with the SRK provisioned at the TCG persistent handle, a provider that connects per
// operation uses it, leaves nothing loaded, and unwraps keys sealed under the transient SRK before.
func TestSwtpmPersistentSRK(t *testing.T) {
	ctx := context.Background()
	s := startSwtpm(t, false, swtpmFlags)
	p := newSwtpmProvider(t, s, Config{})
	key, blob := wrapUnwrap(t, p)
	withTPM(t, p, func(tp transport.TPM) {
		cp, err := tpm2.CreatePrimary{
			PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate),
		}.Execute(tp)
		if err != nil {
			t.Fatalf("CreatePrimary err = %v, want nil", err)
		}
		defer tpm2.FlushContext{FlushHandle: cp.ObjectHandle}.Execute(tp) //nolint:errcheck // checked by swtpmHandles
		_, err = tpm2.EvictControl{
			Auth:             tpm2.TPMRHOwner,
			ObjectHandle:     &tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name},
			PersistentHandle: srkHandle,
		}.Execute(tp)
		if err != nil {
			t.Fatalf("EvictControl err = %v, want nil", err)
		}
	})
	q := newSwtpmProvider(t, s, Config{})
	if got, err := q.Unwrap(ctx, blob); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("q.Unwrap(ctx, blob sealed under the transient SRK) err = %v, want nil and the key", err)
	}
	wrapUnwrap(t, q)
	if objects, sessions := swtpmHandles(t, s); len(objects) != 0 || len(sessions) != 0 {
		t.Errorf("transient handles = %#x, sessions = %#x; want none", objects, sessions)
	}
	// The provider took the persistent SRK: an operation sends no CreatePrimary.
	var n atomic.Int64
	open, _, err := newOpener(s.path())
	if err != nil {
		t.Fatal(err)
	}
	r, err := newProvider(ctx, Config{}, func() (transport.TPMCloser, error) {
		tp, err := open()
		if err != nil {
			return nil, err
		}
		return &countingTPM{TPMCloser: tp, n: &n}, nil
	}, true)
	if err != nil {
		t.Fatalf("newProvider(ctx, counting swtpm) err = %v, want nil", err)
	}
	defer r.Close()
	n.Store(0)
	if got, err := r.Unwrap(ctx, blob); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("r.Unwrap(ctx, blob) err = %v, want nil and the key", err)
	}
	// ReadPublic, Load, StartAuthSession, PolicyAuthValue, Unseal, FlushContext of the sealed object.
	if got := n.Load(); got != 6 {
		t.Errorf("Unwrap with a persistent SRK sent %d TPM commands, want 6", got)
	}
}

// TestSwtpmUnwrapRefusesForeignPolicy: on a real vTPM, a provider configured with PCR 7 refuses keys sealed by
// other providers (other processes) with no PCR policy or other PCRs, and its own keys still unwrap.
func TestSwtpmUnwrapRefusesForeignPolicy(t *testing.T) {
	s := startSwtpm(t, false, swtpmFlags)
	p := newSwtpmProvider(t, s, Config{PCRs: []int{7}})
	for name, cfg := range map[string]Config{"no PCRs": {}, "PCR 8": {PCRs: []int{8}}, "PCRs 7, 8": {PCRs: []int{7, 8}}} {
		t.Run(name, func(t *testing.T) {
			other := newSwtpmProvider(t, s, cfg)
			ctx := context.Background()
			key, blob := wrapUnwrap(t, other)
			got, err := p.Unwrap(ctx, blob)
			if !errors.Is(err, kleidi.ErrUnwrap) || !errors.Is(err, ErrPolicy) || got != nil {
				t.Fatalf("p.Unwrap(ctx, blob sealed with %s) = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnwrap and ErrPolicy", name, len(got), err)
			}
			if bytes.Contains([]byte(err.Error()), key) {
				t.Fatalf("p.Unwrap(ctx, foreign blob) err holds the key")
			}
			// Nor can the other process make a proof that p accepts.
			msg := []byte("wrapped key")
			forged, err := other.Prove(ctx, msg)
			if err != nil {
				t.Fatalf("other.Prove(ctx, msg) err = %v, want nil", err)
			}
			if err := p.Verify(ctx, msg, forged); !errors.Is(err, kleidi.ErrUnauthenticated) {
				t.Fatalf("p.Verify(ctx, msg, proof by a provider with %s) = %v, want an error wrapping kleidi.ErrUnauthenticated", name, err)
			}
			wrapUnwrap(t, p)
		})
	}
	if objects, sessions := swtpmHandles(t, s); len(objects) != 0 || len(sessions) != 0 {
		t.Errorf("transient handles = %#x, sessions = %#x; want none", objects, sessions)
	}
}

// TestSwtpmProofSurvivesRestart: the proof key is the same after swtpm restarts and for a new provider (a
// restarted plugin that lost its keyring), so proofs made before still verify.
func TestSwtpmProofSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	s := startSwtpm(t, false, swtpmFlags)
	cfg := Config{PCRs: []int{7}, AuthFile: writeAuthFile(t, "pw")}
	p := newSwtpmProvider(t, s, cfg)
	msg := []byte("wrapped key")
	proof, err := p.Prove(ctx, msg)
	if err != nil {
		t.Fatalf("p.Prove(ctx, msg) err = %v, want nil", err)
	}
	p.Close()
	s.kill()
	s.start()
	q := newSwtpmProvider(t, s, cfg)
	if err := q.Verify(ctx, msg, proof); err != nil {
		t.Fatalf("q.Verify(ctx, msg, proof made before the restart) = %v, want nil", err)
	}
	if objects, sessions := swtpmHandles(t, s); len(objects) != 0 || len(sessions) != 0 {
		t.Errorf("transient handles = %#x, sessions = %#x; want none", objects, sessions)
	}
}

// TestSwtpmSRKPinned: a provider refuses to seal under a storage root key other than the one it pinned: swtpm
// restarted on a new state directory (another TPM, as a replaced chip or something that answers in the TPM's
// place between an unwrap and a wrap at rotation time) gets no key. A provider pinned by Config.SRKName refuses
// another TPM from the start.
func TestSwtpmSRKPinned(t *testing.T) {
	ctx := context.Background()
	s := startSwtpm(t, false, swtpmFlags)
	p := newSwtpmProvider(t, s, Config{})
	_, blob := wrapUnwrap(t, p)
	pin := p.SRKName()
	if len(pin) != 68 || pin[:4] != "000b" {
		t.Fatalf("p.SRKName() = %q, want 68 hex digits starting with 000b", pin)
	}

	s.kill()
	if err := os.Remove(filepath.Join(s.dir, "tpm2-00.permall")); err != nil {
		t.Fatalf("removing swtpm's state: %v", err)
	}
	s.start()
	key := randomKey(t)
	wrapped, err := p.Wrap(ctx, key)
	if !errors.Is(err, ErrStorageKeyChanged) || wrapped != nil {
		t.Fatalf("p.Wrap(ctx, key) on another TPM = %d bytes, %v; want nil, an error wrapping ErrStorageKeyChanged", len(wrapped), err)
	}
	if _, err := p.Unwrap(ctx, blob); !errors.Is(err, ErrStorageKeyChanged) || !errors.Is(err, kleidi.ErrUnwrap) {
		t.Fatalf("p.Unwrap(ctx, blob) on another TPM err = %v, want an error wrapping ErrStorageKeyChanged and kleidi.ErrUnwrap", err)
	}
	if _, err := p.Prove(ctx, []byte("m")); !errors.Is(err, ErrStorageKeyChanged) {
		t.Fatalf("p.Prove(ctx, m) on another TPM err = %v, want an error wrapping ErrStorageKeyChanged", err)
	}
	if err := p.Verify(ctx, []byte("m"), make([]byte, ProofSize)); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Fatalf("p.Verify(ctx, m, proof) on another TPM = %v, want an error wrapping kleidi.ErrUnauthenticated", err)
	}
	if objects, sessions := swtpmHandles(t, s); len(objects) != 0 || len(sessions) != 0 {
		t.Errorf("transient handles = %#x, sessions = %#x; want none", objects, sessions)
	}

	// Pinned by configuration: New refuses the new TPM; the new TPM's own name works.
	if q, err := New(ctx, Config{Path: s.path(), SRKName: pin}); !errors.Is(err, ErrStorageKeyChanged) {
		if q != nil {
			q.Close()
		}
		t.Fatalf("New(ctx, SRKName of the old TPM) on a new TPM err = %v, want an error wrapping ErrStorageKeyChanged", err)
	}
	fresh := newSwtpmProvider(t, s, Config{})
	q := newSwtpmProvider(t, s, Config{SRKName: fresh.SRKName()})
	wrapUnwrap(t, q)
}

func TestNodeConformanceSwtpm(t *testing.T) {
	s := startSwtpm(t, false, swtpmFlags)
	kleiditest.TestNode(t, func(t *testing.T) kleidi.Provider {
		return newSwtpmProvider(t, s, Config{PCRs: []int{7}})
	}, OpenRecipient)
	p := newSwtpmProvider(t, s, Config{})
	assertNoHandles(t, p)
}

package main_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	kmsapi "k8s.io/kms/apis/v2"
)

// serveAudited starts kleidi-server serve with --audit-log path and waits until it answers.
func serveAudited(t *testing.T, s *sandbox, path string) *server {
	t.Helper()
	srv := s.serve(t, s.command(false, append([]string{"serve", "--audit-log", path}, s.flags()...)...))
	if code, out, errOut := s.run(t, "status", "--listen", "unix://"+s.socket(), "--wait", "30s"); code != 0 {
		t.Fatalf("status = %d, %q, %q; want 0", code, out, errOut)
	}
	return srv
}

// stop stops the server with SIGTERM and checks it exits 0.
func (srv *server) stop(t *testing.T) {
	t.Helper()
	srv.cmd.Process.Signal(syscall.SIGTERM)
	if code := srv.wait(t); code != 0 {
		t.Fatalf("serve exit after SIGTERM = %d, want 0", code)
	}
}

// traffic sends Encrypt calls from 4 goroutines until stop is closed, and returns how many succeeded.
func traffic(t *testing.T, socket string, stop <-chan struct{}) func() int64 {
	t.Helper()
	client := kmsClient(t, socket)
	var ok atomic.Int64
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				_, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("x"), Uid: fmt.Sprint(g, "-", i)})
				cancel()
				if err == nil {
					ok.Add(1)
				}
			}
		}()
	}
	return func() int64 { wg.Wait(); return ok.Load() }
}

// verifyAudit runs kleidi-server verify-audit with args.
func verifyAudit(t *testing.T, s *sandbox, args ...string) (int, string, string) {
	t.Helper()
	return s.run(t, append([]string{"verify-audit"}, args...)...)
}

// A plugin stopped and started again continues the chain of its audit log: verify-audit passes with no note.
func TestAuditRestart(t *testing.T) {
	s := newSandbox(t)
	path := filepath.Join(s.dir, "audit.json")
	for range 3 {
		srv := serveAudited(t, s, path)
		srv.stop(t)
	}
	code, out, errOut := verifyAudit(t, s, path)
	if code != 0 || !strings.Contains(out, "hash chain intact") || strings.Contains(out, "note:") {
		t.Errorf("verify-audit after three runs = %d, %q, %q; want 0, an intact chain and no note", code, out, errOut)
	}
}

// A plugin killed with SIGKILL in the middle of traffic leaves a log without a checkpoint, perhaps with a torn
// last record: verify-audit says so (and passes with --live, as for a running plugin). The next plugin continues
// the chain, and verify-audit then passes, with a note of where the first one stopped.
func TestAuditSIGKILL(t *testing.T) {
	s := newSandbox(t)
	path := filepath.Join(s.dir, "audit.json")
	srv := serveAudited(t, s, path)
	stop := make(chan struct{})
	wait := traffic(t, s.socket(), stop)
	time.Sleep(500 * time.Millisecond)
	srv.cmd.Process.Signal(syscall.SIGKILL)
	srv.wait(t)
	close(stop)
	if n := wait(); n == 0 {
		t.Fatalf("no Encrypt succeeded before SIGKILL")
	}
	code, out, errOut := verifyAudit(t, s, path)
	if code == 0 || !strings.Contains(errOut, "ends without a checkpoint: the plugin stopped without closing the log, or records were cut") {
		t.Errorf("verify-audit after SIGKILL = %d, %q, %q; want an error: ends without a checkpoint", code, out, errOut)
	}
	if code, out, errOut := verifyAudit(t, s, "--live", path); code != 0 || !strings.Contains(out, "hash chain intact") {
		t.Errorf("verify-audit --live after SIGKILL = %d, %q, %q; want 0", code, out, errOut)
	}
	// A kill in the middle of a write leaves the first bytes of a record: add them, after what the kill left.
	b := read(t, path)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	part := `{"time":"2026-11-25T18:40:12.381502127Z","event":"kms.encr`
	f.WriteString(part)
	f.Close()
	torn := len(b) - (strings.LastIndexByte(string(b), '\n') + 1) + len(part)

	srv = serveAudited(t, s, path)
	stop = make(chan struct{})
	wait = traffic(t, s.socket(), stop)
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wait()
	srv.stop(t)
	code, out, errOut = verifyAudit(t, s, path)
	if code != 0 || !strings.Contains(out, "hash chain intact") || strings.Count(out, "note:") != 1 ||
		!strings.Contains(out, "the plugin stopped without closing the log") || !strings.Contains(out, fmt.Sprintf("torn record of %d bytes", torn)) {
		t.Errorf("verify-audit after a restart = %d, %q, %q; want 0 and one note of the crash and its torn record", code, out, errOut)
	}
}

// logrotate renames the log and signals the plugin (SIGHUP): the old file ends with a checkpoint, the new one begins
// by naming it, and verify-audit checks both in order. Records cut from the end of the old one or from the start
// of the new one, or a wrong order, are reported.
func TestAuditLogrotate(t *testing.T) {
	s := newSandbox(t)
	path := filepath.Join(s.dir, "audit.json")
	srv := serveAudited(t, s, path)
	stop := make(chan struct{})
	wait := traffic(t, s.socket(), stop)
	time.Sleep(200 * time.Millisecond)
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // records land in the renamed file until the signal
	srv.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, func() bool { _, err := os.Stat(path); return err == nil }, "a new audit log after SIGHUP")
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wait()
	srv.stop(t)

	code, out, errOut := verifyAudit(t, s, path+".1", path)
	if code != 0 || !strings.Contains(out, "in 2 files, hash chain intact") || strings.Contains(out, "note:") ||
		strings.Count(out, "ends with a checkpoint") != 2 {
		t.Fatalf("verify-audit old new = %d, %q, %q; want 0, both closed, no note", code, out, errOut)
	}
	if code, out, errOut := verifyAudit(t, s, path, path+".1"); code == 0 {
		t.Errorf("verify-audit new old = %d, %q, %q; want an error", code, out, errOut)
	}
	old, cur := read(t, path+".1"), read(t, path)
	for _, n := range []int{1, 3} {
		lo, lc := lines(old), lines(cur)
		os.WriteFile(path+".1", []byte(strings.Join(lo[:len(lo)-n], "")), 0o600)
		if code, _, errOut := verifyAudit(t, s, path+".1", path); code == 0 || !strings.Contains(errOut, "cut end") {
			t.Errorf("verify-audit with the last %d records of the old file cut = %d, %q; want cut end", n, code, errOut)
		}
		os.WriteFile(path+".1", old, 0o600)
		os.WriteFile(path, []byte(strings.Join(lc[n:], "")), 0o600)
		if code, _, errOut := verifyAudit(t, s, path+".1", path); code == 0 || !strings.Contains(errOut, "cut start") {
			t.Errorf("verify-audit with the first %d records of the new file cut = %d, %q; want cut start", n, code, errOut)
		}
		os.WriteFile(path, []byte(strings.Join(lc[:len(lc)-n], "")), 0o600)
		if code, _, errOut := verifyAudit(t, s, path+".1", path); code == 0 || !strings.Contains(errOut, "ends without a checkpoint") {
			t.Errorf("verify-audit with the last %d records of the new file cut = %d, %q; want ends without a checkpoint", n, code, errOut)
		}
		os.WriteFile(path, cur, 0o600)
	}
}

// A plugin whose audit log cannot be written (/dev/full) keeps serving.
func TestAuditWriteErrorsKeepServing(t *testing.T) {
	s := newSandbox(t)
	srv := serveAudited(t, s, "/dev/full")
	client := kmsClient(t, s.socket())
	for i := range 50 {
		if _, err := client.Encrypt(context.Background(), &kmsapi.EncryptRequest{Plaintext: []byte("x"), Uid: fmt.Sprint(i)}); err != nil {
			t.Fatalf("Encrypt() with an audit log on /dev/full err = %v", err)
		}
	}
	if code, out, errOut := s.run(t, "status", "--listen", "unix://"+s.socket()); code != 0 {
		t.Errorf("status with an audit log on /dev/full = %d, %q, %q; want 0", code, out, errOut)
	}
	srv.stop(t)
}

func read(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// lines splits a log into its lines, newlines kept.
func lines(b []byte) []string {
	ls := strings.SplitAfter(string(b), "\n")
	if ls[len(ls)-1] == "" {
		ls = ls[:len(ls)-1]
	}
	return ls
}

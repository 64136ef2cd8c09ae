package audit_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/audit"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

func TestRecordSchema(t *testing.T) {
	var buf bytes.Buffer
	l := audit.New(&buf)
	l.Log(audit.Record{
		Time: time.Date(2026, 11, 25, 10, 0, 0, 0, time.UTC), Event: audit.EventDecrypt, RequestUID: "req-1",
		Caller: &audit.Caller{UID: 0, GID: 0, PID: 42}, KeyID: "kleidi-tpm-x", Provider: "tpm",
		ErrorType: "InvalidArgument", Duration: 1500 * time.Microsecond,
	})
	l.Close()
	var got map[string]any
	if err := json.Unmarshal(buf.Bytes(), &got); err != nil {
		t.Fatalf("record %q is not JSON: %v", buf.String(), err)
	}
	want := map[string]any{
		"time": "2026-11-25T10:00:00Z", "event": "kms.decrypt", "request_uid": "req-1", "caller_uid": 0.0,
		"caller_gid": 0.0, "caller_pid": 42.0, "key_id": "kleidi-tpm-x", "provider": "tpm", "outcome": "error",
		"error_type": "InvalidArgument", "duration_us": 1500.0,
		"prev": strings.Repeat("0", 64),
	}
	if len(got) != len(want) {
		t.Errorf("record has keys %v, want %v", keys(got), keys(want))
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("record[%q] = %v, want %v", k, got[k], v)
		}
	}
}

func keys(m map[string]any) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}

func TestHashChain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := audit.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		l.Log(audit.Record{Event: audit.EventEncrypt, RequestUID: string(rune('a' + i))})
	}
	// logrotate moves the file away; the chain continues in the new file.
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	if err := l.Reopen(); err != nil {
		t.Fatalf("l.Reopen() err = %v", err)
	}
	l.Log(audit.Record{Event: audit.EventStop})
	l.Close()

	fi, _ := os.Stat(path)
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("audit log mode = %v, want 0600", fi.Mode().Perm())
	}
	old, _ := os.ReadFile(path + ".1")
	cur, _ := os.ReadFile(path)
	if n, err := audit.Verify(bytes.NewReader(append(old, cur...))); err != nil || n != 6 {
		t.Errorf("audit.Verify(rotated + new) = %d, %v; want 6, nil", n, err)
	}
	lines := strings.SplitAfter(string(old), "\n")
	tampered := strings.Replace(string(old), lines[2], strings.Replace(lines[2], `"c"`, `"x"`, 1), 1)
	if _, err := audit.Verify(strings.NewReader(tampered)); err == nil || !strings.Contains(err.Error(), "line 4") {
		t.Errorf("audit.Verify(a changed line 3) err = %v, want a broken chain at line 4", err)
	}
	removed := strings.Replace(string(old), lines[1], "", 1)
	if _, err := audit.Verify(strings.NewReader(removed)); err == nil {
		t.Errorf("audit.Verify(a removed line) err = nil, want a broken chain")
	}
}

func TestKeyEvents(t *testing.T) {
	var buf bytes.Buffer
	l := audit.New(&buf)
	ctx := context.Background()
	p := kleiditest.NewInsecureProvider()
	ring := kleidi.NewMemoryKeyring()
	e, err := kleidi.NewEnvelope(ctx, p, ring, kleidi.WithKeyEvents(l.KeyEvents(p.Name())), kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatal(err)
	}
	first := e.KeyID()
	if err := e.Reload(ctx); err != nil { // changes nothing: not recorded
		t.Fatal(err)
	}
	rotator, err := kleidi.NewEnvelope(ctx, p, ring)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rotator.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.Reload(ctx); err != nil { // picks up the rotation
		t.Fatal(err)
	}
	p.SetError(kleiditest.OpUnwrap, errors.Join(kleidi.ErrUnwrap, errors.New("secret detail")))
	if _, err := kleidi.NewEnvelope(ctx, p, ring, kleidi.WithKeyEvents(l.KeyEvents(p.Name()))); err == nil {
		t.Fatal("NewEnvelope with a failing provider err = nil")
	}
	l.Flush()
	var events []string
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatal(err)
		}
		events = append(events, r["event"].(string)+" "+r["outcome"].(string)+" "+r["key_id"].(string)+" "+r["provider"].(string))
		if r["error_type"] != nil && r["error_type"] != "unwrap_refused" {
			t.Errorf("error_type = %v, want unwrap_refused", r["error_type"])
		}
	}
	want := []string{"key.rotate ok " + first + " insecure", "key.unwrap ok " + e.KeyID() + " insecure",
		"keyring.reload ok " + e.KeyID() + " insecure", "key.unwrap error " + e.KeyID() + " insecure"}
	if strings.Join(events, "\n") != strings.Join(want, "\n") {
		t.Errorf("audit events:\n%s\nwant:\n%s", strings.Join(events, "\n"), strings.Join(want, "\n"))
	}
	if strings.Contains(buf.String(), "secret detail") {
		t.Errorf("audit log holds an error message: %s", buf.String())
	}
}

func TestLogHandler(t *testing.T) {
	var buf bytes.Buffer
	for _, format := range []string{"auto", "json"} {
		buf.Reset()
		h, err := audit.NewLogHandler(&buf, format, slog.LevelInfo)
		if err != nil {
			t.Fatal(err)
		}
		slog.New(h).Info("hello", "k", "v")
		if !json.Valid(buf.Bytes()) {
			t.Errorf("format %s on a non-terminal wrote %q, want JSON", format, buf.String())
		}
	}
	buf.Reset()
	h, _ := audit.NewLogHandler(&buf, "text", slog.LevelInfo)
	slog.New(h).Info("hello", "k", "v")
	if !strings.Contains(buf.String(), "hello k=v") || strings.Contains(buf.String(), "\x1b[") {
		t.Errorf("text format on a non-terminal wrote %q, want uncoloured text", buf.String())
	}
	if _, err := audit.NewLogHandler(&buf, "xml", slog.LevelInfo); err == nil {
		t.Errorf("NewLogHandler(xml) err = nil, want an error")
	}
}

func TestConcurrentRecordsKeepTheChain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := audit.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	const goroutines, each = 8, 200
	done := make(chan struct{})
	for g := range goroutines {
		go func() {
			defer func() { done <- struct{}{} }()
			for i := range each {
				l.Log(audit.Record{Event: audit.EventDecrypt, RequestUID: fmt.Sprint(g, "-", i)})
				if i == each/2 && g == 0 {
					l.Reopen()
				}
			}
		}()
	}
	for range goroutines {
		<-done
	}
	l.Close()
	b, _ := os.ReadFile(path)
	if n, err := audit.Verify(bytes.NewReader(b)); err != nil || n != goroutines*each {
		t.Errorf("audit.Verify(log of %d concurrent records) = %d, %v; want %d, nil", goroutines*each, n, err, goroutines*each)
	}
}

package audit_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
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
	lines := strings.SplitAfter(strings.TrimSuffix(buf.String(), "\n"), "\n")
	if len(lines) != 3 {
		t.Fatalf("a stream with one record holds %d lines, want 3 (opening, record, checkpoint):\n%s", len(lines), buf.String())
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(lines[1]), &got); err != nil {
		t.Fatalf("record %q is not JSON: %v", lines[1], err)
	}
	open := sha256.Sum256([]byte(lines[0]))
	want := map[string]any{
		"time": "2026-11-25T10:00:00Z", "event": "kms.decrypt", "request_uid": "req-1", "caller_uid": 0.0,
		"caller_gid": 0.0, "caller_pid": 42.0, "key_id": "kleidi-tpm-x", "provider": "tpm", "outcome": "error",
		"error_type": "InvalidArgument", "duration_us": 1500.0,
		"prev": hex.EncodeToString(open[:]),
	}
	if len(got) != len(want) {
		t.Errorf("record has keys %v, want %v", keys(got), keys(want))
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("record[%q] = %v, want %v", k, got[k], v)
		}
	}
	for i, w := range []map[string]any{
		{"event": "audit.open", "outcome": "ok", "records": 0.0, "prev": strings.Repeat("0", 64)},
		{"event": "audit.checkpoint", "outcome": "ok", "records": 2.0},
	} {
		line := lines[2*i]
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("line %q is not JSON: %v", line, err)
		}
		if _, err := time.Parse(time.RFC3339Nano, fmt.Sprint(r["time"])); err != nil || len(r) != len(w)+1+boolInt(w["prev"] == nil) {
			t.Errorf("%s record %v: want time and %v", w["event"], r, w)
		}
		for k, v := range w {
			if r[k] != v {
				t.Errorf("%s record[%q] = %v, want %v", w["event"], k, r[k], v)
			}
		}
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
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
	// 1 + 5 + 1 records, then 1 + 1 + 1.
	if r, err := audit.Verify(file("audit.log.1", old), file("audit.log", cur)); err != nil || r.Records != 10 || len(r.Notes) != 0 {
		t.Errorf("audit.Verify(rotated, new) = %+v, %v; want 10 records, no note, nil", r, err)
	}
	lines := strings.SplitAfter(string(old), "\n")
	tampered := strings.Replace(string(old), lines[3], strings.Replace(lines[3], `"c"`, `"x"`, 1), 1)
	if _, err := audit.Verify(file("audit.log.1", []byte(tampered))); !errors.Is(err, audit.ErrTampered) || !strings.Contains(err.Error(), "line 5") {
		t.Errorf("audit.Verify(a changed line 4) err = %v, want a tampered record at line 5", err)
	}
	removed := strings.Replace(string(old), lines[2], "", 1)
	if _, err := audit.Verify(file("audit.log.1", []byte(removed))); !errors.Is(err, audit.ErrTampered) {
		t.Errorf("audit.Verify(a removed line) err = %v, want ErrTampered", err)
	}
}

// file is an audit.File of b.
func file(name string, b []byte) audit.File { return audit.File{Name: name, R: bytes.NewReader(b)} }

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
		if strings.HasPrefix(r["event"].(string), "audit.") {
			continue
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
					l.Reopen() // the path was not moved: nothing changes
				}
				if i == each/2 && g == 1 {
					os.Rename(path, path+".1")
					if err := l.Reopen(); err != nil {
						t.Errorf("l.Reopen() err = %v", err)
					}
				}
			}
		}()
	}
	for range goroutines {
		<-done
	}
	l.Close()
	old, _ := os.ReadFile(path + ".1")
	b, _ := os.ReadFile(path)
	// The Reopen of a path not moved writes nothing; the other: a checkpoint and an opening record. With the first
	// opening record and the last checkpoint, 4 more records.
	if r, err := audit.Verify(file("audit.log.1", old), file("audit.log", b)); err != nil || r.Records != goroutines*each+4 {
		t.Errorf("audit.Verify(log of %d concurrent records) = %+v, %v; want %d, nil", goroutines*each, r, err, goroutines*each+4)
	}
}

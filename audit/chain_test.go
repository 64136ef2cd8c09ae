package audit_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/kleidi-kms/kleidi/audit"
)

// writeLog opens path, logs n records and closes it.
func writeLog(t *testing.T, path string, n int) {
	t.Helper()
	l, err := audit.OpenFile(path)
	if err != nil {
		t.Fatalf("audit.OpenFile(%s) err = %v", path, err)
	}
	for i := range n {
		l.Log(audit.Record{Event: audit.EventDecrypt, RequestUID: fmt.Sprint("req-", i)})
	}
	if err := l.Close(); err != nil {
		t.Fatalf("l.Close() err = %v", err)
	}
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

// A Logger opened again on the same file continues its chain: a restart is not tampering.
func TestRestartContinuesTheChain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	writeLog(t, path, 3)
	writeLog(t, path, 2)
	writeLog(t, path, 0)
	r, err := audit.Verify(file("audit.log", read(t, path)))
	// (open, 3, checkpoint) + (open, 2, checkpoint) + (open, checkpoint)
	if err != nil || r.Records != 11 || len(r.Notes) != 0 || len(r.Files) != 1 || !r.Files[0].Closed {
		t.Errorf("audit.Verify(a log written by three Loggers in turn) = %+v, %v; want 11 records, closed, no note", r, err)
	}
}

// crash leaves path as a plugin killed while writing leaves it: records without a checkpoint, and with torn, the
// first torn bytes of one more record.
func crash(t *testing.T, path string, records, torn int) {
	t.Helper()
	writeLog(t, path, records+1)
	ls := lines(read(t, path))
	keep := strings.Join(ls[:len(ls)-2], "")                // without the last record and the checkpoint
	keep += ls[len(ls)-2][:min(torn, len(ls[len(ls)-2])-1)] // a record cut before its newline
	if err := os.WriteFile(path, []byte(keep), 0o600); err != nil {
		t.Fatal(err)
	}
}

// A log whose last record is torn (a crash while it was written) is continued from its last whole record; verify
// reports where the plugin stopped, and passes.
func TestTornTailContinues(t *testing.T) {
	for _, torn := range []int{0, 1, 40, 1000} { // 1000: all of the record but its newline
		t.Run(fmt.Sprint(torn), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "audit.log")
			crash(t, path, 4, torn)
			_, err := audit.Verify(file("audit.log", read(t, path)))
			if !errors.Is(err, audit.ErrNoCheckpoint) ||
				!strings.Contains(err.Error(), "ends without a checkpoint: the plugin stopped without closing the log, or records were cut") {
				t.Errorf("audit.Verify(a crashed log) err = %v, want ErrNoCheckpoint", err)
			}
			if r, err := audit.VerifyLive(file("audit.log", read(t, path))); err != nil || r.Records != 5 {
				t.Errorf("audit.VerifyLive(a crashed log) = %+v, %v; want 5 records, nil", r, err)
			}
			writeLog(t, path, 2)
			b := read(t, path)
			r, err := audit.Verify(file("audit.log", b))
			// (open, 4 records) + (open, 2 records, checkpoint): the torn record is not counted
			if err != nil || r.Records != 9 || len(r.Notes) != 1 || !strings.Contains(r.Notes[0], "stopped without closing the log") {
				t.Fatalf("audit.Verify(a crashed log, continued) = %+v, %v; want 9 records and a note", r, err)
			}
			if torn > 0 && !strings.Contains(r.Notes[0], fmt.Sprintf("line 6 is a torn record of %d bytes", min(torn, len(lines(b)[5])-1))) {
				t.Errorf("note %q does not name the torn record", r.Notes[0])
			}
			// Opened again, the log stays verifiable: the torn line does not fail it forever after.
			writeLog(t, path, 1)
			if r, err := audit.Verify(file("audit.log", read(t, path))); err != nil || len(r.Notes) != 1 {
				t.Errorf("audit.Verify(after one more restart) = %+v, %v; want the same single note", r, err)
			}
		})
	}
}

// rotated writes a log of two files, as logrotate and SIGHUP leave it, and returns the old and the new file.
func rotated(t *testing.T, dir string, first, second int) ([]byte, []byte) {
	t.Helper()
	path := filepath.Join(dir, "audit.log")
	l, err := audit.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for i := range first {
		l.Log(audit.Record{Event: audit.EventEncrypt, RequestUID: fmt.Sprint("a-", i)})
	}
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	l.Log(audit.Record{Event: audit.EventEncrypt, RequestUID: "between the rename and the signal"})
	if err := l.Reopen(); err != nil {
		t.Fatal(err)
	}
	for i := range second {
		l.Log(audit.Record{Event: audit.EventEncrypt, RequestUID: fmt.Sprint("b-", i)})
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return read(t, path+".1"), read(t, path)
}

// Records cut from the start of a file are seen, in the first file and in a later one.
func TestCutStart(t *testing.T) {
	old, cur := rotated(t, t.TempDir(), 10, 10)
	if r, err := audit.Verify(file("audit.log.1", old), file("audit.log", cur)); err != nil || r.Records != 25 {
		t.Fatalf("audit.Verify(rotated log) = %+v, %v; want 25 records, nil", r, err)
	}
	for _, n := range []int{1, 2, 5} {
		cutOld := strings.Join(lines(old)[n:], "")
		if _, err := audit.Verify(file("audit.log.1", []byte(cutOld)), file("audit.log", cur)); !errors.Is(err, audit.ErrCutStart) ||
			!strings.Contains(err.Error(), "audit.log.1: cut start") {
			t.Errorf("audit.Verify(first %d records cut from the first file) err = %v, want ErrCutStart naming audit.log.1", n, err)
		}
		cutCur := strings.Join(lines(cur)[n:], "")
		if _, err := audit.Verify(file("audit.log.1", old), file("audit.log", []byte(cutCur))); !errors.Is(err, audit.ErrCutStart) ||
			!strings.Contains(err.Error(), "audit.log: cut start") {
			t.Errorf("audit.Verify(first %d records cut from the second file) err = %v, want ErrCutStart naming audit.log", n, err)
		}
	}
	// The second file alone is intact: it says it continues a file not given.
	if r, err := audit.Verify(file("audit.log", cur)); err != nil || len(r.Notes) != 1 || !strings.Contains(r.Notes[0], "continues an earlier file") {
		t.Errorf("audit.Verify(second file alone) = %+v, %v; want a note that it continues an earlier file", r, err)
	}
}

// Records cut from the end of a file are seen: the last file lacks its checkpoint, an earlier one the record the
// next file links to.
func TestCutEnd(t *testing.T) {
	old, cur := rotated(t, t.TempDir(), 10, 10)
	for _, n := range []int{1, 2, 5} {
		ls := lines(cur)
		cutCur := strings.Join(ls[:len(ls)-n], "")
		if _, err := audit.Verify(file("audit.log.1", old), file("audit.log", []byte(cutCur))); !errors.Is(err, audit.ErrNoCheckpoint) ||
			!strings.Contains(err.Error(), "audit.log ends without a checkpoint") {
			t.Errorf("audit.Verify(last %d records cut from the last file) err = %v, want ErrNoCheckpoint", n, err)
		}
		ls = lines(old)
		cutOld := strings.Join(ls[:len(ls)-n], "")
		if _, err := audit.Verify(file("audit.log.1", []byte(cutOld)), file("audit.log", cur)); !errors.Is(err, audit.ErrCutEnd) ||
			!strings.Contains(err.Error(), "audit.log.1: cut end") {
			t.Errorf("audit.Verify(last %d records cut from the first file) err = %v, want ErrCutEnd naming audit.log.1", n, err)
		}
	}
	// A file missing between two, and files in the wrong order.
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	l, err := audit.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var files [][]byte
	for i := range 3 {
		l.Log(audit.Record{Event: audit.EventEncrypt})
		name := fmt.Sprint(path, ".", i)
		os.Rename(path, name)
		if err := l.Reopen(); err != nil {
			t.Fatal(err)
		}
		files = append(files, read(t, name))
	}
	l.Close()
	if r, err := audit.Verify(file("0", files[0]), file("1", files[1]), file("2", files[2])); err != nil || len(r.Files) != 3 {
		t.Errorf("audit.Verify(three rotated files) = %+v, %v; want nil", r, err)
	}
	if _, err := audit.Verify(file("0", files[0]), file("2", files[2])); !errors.Is(err, audit.ErrCutEnd) {
		t.Errorf("audit.Verify(a file missing between two) err = %v, want ErrCutEnd", err)
	}
	if _, err := audit.Verify(file("1", files[1]), file("0", files[0])); err == nil {
		t.Errorf("audit.Verify(files in the wrong order) err = nil, want an error")
	}
	// A plugin that started on an empty file while its log was elsewhere begins a new chain.
	fresh := filepath.Join(dir, "fresh.log")
	writeLog(t, fresh, 1)
	if _, err := audit.Verify(file("2", files[2]), file("fresh", read(t, fresh))); !errors.Is(err, audit.ErrNewChain) {
		t.Errorf("audit.Verify(a new chain after a file) err = %v, want ErrNewChain", err)
	}
}

// Every kind of change inside the chain is a tampered record, named by line.
func TestTamperedRecord(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	writeLog(t, path, 6)
	ls := lines(read(t, path))
	join := func(ls []string) []byte { return []byte(strings.Join(ls, "")) }
	edit := func(i int, f func(string) string) []byte {
		c := append([]string(nil), ls...)
		c[i] = f(c[i])
		return join(c)
	}
	cases := []struct {
		name string
		log  []byte
		line string
	}{
		{"record 4 changed", edit(3, func(s string) string { return strings.Replace(s, "req-2", "req-X", 1) }), "line 5"},
		{"record 4 removed", join(append(append([]string(nil), ls[:3]...), ls[4:]...)), "line 4"},
		{"a record inserted after 4", join(append(append(append([]string(nil), ls[:4]...), ls[2]), ls[4:]...)), "line 5"},
		{"garbage after 3", join(append(append(append([]string(nil), ls[:3]...), "garbage\n"), ls[3:]...)), "line 4"},
		{"checkpoint count changed", edit(len(ls)-1, func(s string) string { return strings.Replace(s, `"records":7`, `"records":6`, 1) }), "line 8"},
		{"opening record claims a torn line", edit(0, func(s string) string { return strings.Replace(s, `"records":0`, `"records":0,"torn_bytes":5`, 1) }), "line 1"},
	}
	for _, c := range cases {
		_, err := audit.Verify(file("audit.log", c.log))
		if !errors.Is(err, audit.ErrTampered) || !strings.Contains(err.Error(), c.line) {
			t.Errorf("audit.Verify(%s) err = %v, want ErrTampered at %s", c.name, err, c.line)
		}
	}
}

// A Logger on a file it cannot write (/dev/full: every write fails with ENOSPC) counts the failures, reports them,
// drops what it cannot keep, and keeps serving.
func TestWriteErrorsAreCounted(t *testing.T) {
	l, err := audit.OpenFile("/dev/full")
	if err != nil {
		t.Fatal(err)
	}
	if l.Err() != nil || l.WriteErrors() != 0 {
		t.Fatalf("new Logger: Err() = %v, WriteErrors() = %d; want nil, 0", l.Err(), l.WriteErrors())
	}
	l.Log(audit.Record{Event: audit.EventEncrypt})
	l.Flush()
	if l.WriteErrors() == 0 || !errors.Is(l.Err(), audit.ErrWrite) || !errors.Is(l.Err(), syscall.ENOSPC) {
		t.Fatalf("after a failed write: WriteErrors() = %d, Err() = %v; want > 0 and ErrWrite wrapping ENOSPC", l.WriteErrors(), l.Err())
	}
	// 20,000 records (about 6 MiB) while every write fails: memory stays bounded, the records are counted lost.
	for range 20000 {
		l.Log(audit.Record{Event: audit.EventDecrypt, RequestUID: "0f1e4c55-35a4-4a43-9c3c-8b3f1c0f2a9d", KeyID: "kleidi-gpg-x"})
	}
	if l.LostRecords() == 0 {
		t.Errorf("LostRecords() = 0 after 20,000 records to /dev/full, want > 0")
	}
	if err := l.Close(); !errors.Is(err, audit.ErrWrite) {
		t.Errorf("l.Close() err = %v, want ErrWrite", err)
	}
	// Every record is lost: the first opening record, the first record, the 20,000, the checkpoint, and the
	// opening records that tell of each drop.
	lost := l.LostRecords()
	if lost < 20000+3 {
		t.Errorf("LostRecords() = %d after Close, want at least %d", lost, 20000+3)
	}
	l.Log(audit.Record{Event: audit.EventStop}) // after Close: dropped and counted
	if got := l.LostRecords(); got != lost+1 {
		t.Errorf("LostRecords() = %d after a record logged after Close, want %d", got, lost+1)
	}
}

// flakyWriter fails writes while down, after writing the first part bytes of each: a disk that fills and is
// freed again.
type flakyWriter struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	down bool
	part int
}

func (w *flakyWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.down {
		return w.buf.Write(p)
	}
	n := min(w.part, len(p))
	w.buf.Write(p[:n])
	return n, syscall.ENOSPC
}

func (w *flakyWriter) set(down bool) {
	w.mu.Lock()
	w.down = down
	w.mu.Unlock()
}

func (w *flakyWriter) bytes() []byte {
	w.mu.Lock()
	defer w.mu.Unlock()
	return bytes.Clone(w.buf.Bytes())
}

// A short outage loses nothing: what a failed write did not write, even half a record, is written by the next.
// A long one drops the records beyond MaxPending; the chain goes on past the torn line, and verify says how many
// records are missing.
func TestWriteErrorsRecover(t *testing.T) {
	for _, part := range []int{0, 37} {
		t.Run(fmt.Sprint("short, partial writes of ", part), func(t *testing.T) {
			w := &flakyWriter{part: part}
			l := audit.New(w)
			w.set(true)
			for i := range 50 {
				l.Log(audit.Record{Event: audit.EventEncrypt, RequestUID: fmt.Sprint(i)})
				if i%10 == 0 {
					l.Flush()
				}
			}
			if l.WriteErrors() == 0 || l.Err() == nil {
				t.Fatalf("WriteErrors() = %d, Err() = %v during the outage; want > 0, an error", l.WriteErrors(), l.Err())
			}
			w.set(false)
			l.Log(audit.Record{Event: audit.EventStop})
			if err := l.Close(); err != nil || l.Err() != nil || l.LostRecords() != 0 {
				t.Fatalf("after the outage: Close() = %v, Err() = %v, LostRecords() = %d; want nil, nil, 0", err, l.Err(), l.LostRecords())
			}
			if r, err := audit.Verify(file("stream", w.bytes())); err != nil || r.Records != 53 || len(r.Notes) != 0 {
				t.Errorf("audit.Verify(the stream) = %+v, %v; want 53 records, no note", r, err)
			}
		})
	}
	t.Run("long", func(t *testing.T) {
		w := &flakyWriter{part: 100}
		l := audit.New(w)
		l.Flush()
		w.set(true)
		const n = 10000 // about 3 MiB
		for i := range n {
			l.Log(audit.Record{Event: audit.EventEncrypt, RequestUID: fmt.Sprint("0f1e4c55-35a4-4a43-9c3c-8b3f1c0f2a9d-", i)})
		}
		lost := l.LostRecords()
		if lost == 0 || lost >= n {
			t.Fatalf("LostRecords() = %d, want some of %d", lost, n)
		}
		w.set(false)
		if err := l.Close(); err != nil {
			t.Fatalf("l.Close() err = %v", err)
		}
		r, err := audit.Verify(file("stream", w.bytes()))
		if err != nil || len(r.Notes) == 0 || !strings.Contains(strings.Join(r.Notes, "\n"), "could not be written") {
			t.Fatalf("audit.Verify(the stream) = %+v, %v; want nil and notes of records lost", r, err)
		}
		var sum uint64
		for _, note := range r.Notes {
			var k uint64
			if _, err := fmt.Sscanf(note[strings.Index(note, ": ")+2:], "%d records", &k); err == nil {
				sum += k
			}
		}
		if sum != lost || uint64(r.Records) != 1+n-lost+uint64(len(r.Notes))+1 {
			t.Errorf("notes count %d lost records and %d records written, want %d and %d", sum, r.Records, lost, 1+n-lost+uint64(len(r.Notes))+1)
		}
	})
}

// A Reopen of a path that was not moved writes no checkpoint; a Reopen of a moved one does, and the new file
// begins with a record that links to it.
func TestReopenNamesTheCheckpoint(t *testing.T) {
	old, cur := rotated(t, t.TempDir(), 2, 1)
	lo, lc := lines(old), lines(cur)
	if !strings.Contains(lo[len(lo)-1], `"event":"audit.checkpoint"`) || !strings.Contains(lo[len(lo)-1], `"records":4`) {
		t.Errorf("last line of the rotated file = %s, want a checkpoint of 4 records", lo[len(lo)-1])
	}
	if !strings.Contains(lc[0], `"event":"audit.open"`) || !strings.Contains(lc[0], sha256Hex(lo[len(lo)-1])) {
		t.Errorf("first line of the new file = %s, want an opening record that links to the checkpoint", lc[0])
	}
}

func sha256Hex(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

// FuzzVerify: any bytes, as one file or cut in two, are verified without a panic, and an intact report counts
// the lines it read.
func FuzzVerify(f *testing.F) {
	dir := f.TempDir()
	path := filepath.Join(dir, "seed.log")
	l, _ := audit.OpenFile(path)
	l.Log(audit.Record{Event: audit.EventEncrypt, RequestUID: "x"})
	l.Close()
	seed, _ := os.ReadFile(path)
	f.Add(seed, 0)
	f.Add(seed, len(seed)/2)
	f.Add([]byte("{}\n{\"event\":\"audit.open\"}"), 3)
	f.Add([]byte(strings.Repeat("x", 10)+"\n"+string(seed)), 11)
	long := strings.Replace(string(seed), `"x"`, `"`+strings.Repeat("x", 10000)+`"`, 1) // longer than a read buffer
	f.Add([]byte(long), len(long)-5)
	f.Fuzz(func(t *testing.T, b []byte, cut int) {
		cut = max(0, min(cut, len(b)))
		for _, files := range [][]audit.File{{file("a", b)}, {file("a", b[:cut]), file("b", b[cut:])}} {
			for _, verify := range []func(...audit.File) (audit.Report, error){audit.Verify, audit.VerifyLive} {
				r, err := verify(files...)
				if err == nil && r.Records > bytes.Count(b, []byte{'\n'})+1 {
					t.Fatalf("report of %d records for %d lines", r.Records, bytes.Count(b, []byte{'\n'}))
				}
			}
		}
	})
}

// FuzzOpenAfterCrash: whatever torn bytes a crash left after the last whole record, a Logger opened on the file
// continues the chain, and the log verifies.
func FuzzOpenAfterCrash(f *testing.F) {
	f.Add([]byte(`{"time":"2026-11-25T10:00:00Z","event":"kms.dec`))
	f.Add([]byte{})
	f.Add([]byte{0xff, 0, '{'})
	f.Fuzz(func(t *testing.T, torn []byte) {
		torn = bytes.ReplaceAll(torn, []byte{'\n'}, nil) // a torn record has no newline
		path := filepath.Join(t.TempDir(), "audit.log")
		crash(t, path, 2, 0)
		fd, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		fd.Write(torn)
		fd.Close()
		writeLog(t, path, 1)
		fd, _ = os.Open(path)
		defer fd.Close()
		if r, err := audit.Verify(audit.File{Name: "audit.log", R: io.Reader(fd)}); err != nil || len(r.Notes) != 1 {
			t.Fatalf("audit.Verify(a log continued after a crash that tore %q) = %+v, %v; want nil and one note", torn, r, err)
		}
	})
}

// A record longer than verify's read buffer is checked like any other.
func TestLongRecord(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := audit.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	l.Log(audit.Record{Event: audit.EventDecrypt, RequestUID: strings.Repeat("u", 10000)})
	l.Log(audit.Record{Event: audit.EventDecrypt})
	l.Close()
	b := read(t, path)
	if r, err := audit.Verify(file("audit.log", b)); err != nil || r.Records != 4 {
		t.Errorf("audit.Verify(a log with a 10 kB record) = %+v, %v; want 4 records, nil", r, err)
	}
	edited := bytes.Replace(b, []byte("uuuu"), []byte("uuuv"), 1)
	if _, err := audit.Verify(file("audit.log", edited)); !errors.Is(err, audit.ErrTampered) || !strings.Contains(err.Error(), "line 3") {
		t.Errorf("audit.Verify(the 10 kB record changed) err = %v, want ErrTampered at line 3", err)
	}
}

// Package audit writes one structured record per KMS call, key operation and lifecycle event of a kleidi
// plugin, so operators can prove who asked for which key. It also builds the plugin's operational log handler
// (tint-coloured text for a human at a terminal, JSON otherwise).
//
// # Schema
//
// Records are JSON lines, as log/slog's JSON handler writes them. The keys are stable; a key without a value is left out.
//
//	time         RFC 3339 time with nanoseconds
//	event        kms.status, kms.encrypt, kms.decrypt, key.unwrap, key.rotate, key.rewrap, keyring.reload,
//	             plugin.start or plugin.stop
//	request_uid  the uid the kube-apiserver gave the request (kms.* events)
//	caller_uid, caller_gid, caller_pid   the peer of the unix socket, from SO_PEERCRED (kms.* events)
//	key_id       the key used, unwrapped, created, or active after a reload
//	provider     the root of trust: gpg, tpm, ...
//	outcome      ok or error
//	error_type   for kms.* events the gRPC code (InvalidArgument, ...); otherwise a [kleidi.ErrorKind]
//	changed      keyring.reload only: true when the active key changed
//	duration_us  how long the operation took, in microseconds
//	prev         hex SHA-256 of the previous line of the log: the records form a hash chain ([Verify])
//
// Two events belong to the log itself. Every log file begins with an audit.open record, written when a [Logger]
// opens it; a Logger that opens a file which already holds records (a restart) writes one there too, linked to
// the file's last whole record, so the chain survives restarts. An audit.checkpoint record closes the file at
// [Logger.Close] and before [Logger.Reopen] moves to a new file, so a log whose end was cut lacks it. Their keys:
//
//	records      the number of lines of the file before this record
//	torn_bytes   audit.open only: the length of the line before it, a record torn by a crash while it was being
//	             written; the opening record links to the whole record before that line
//	lost         audit.open only: how many records could not be written (write errors) and were dropped just
//	             before it
//
// A record never holds plaintext, a key, a DEK seed, a passphrase or an error message.
package audit

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kleidi-kms/kleidi"
)

// Events.
const (
	EventStatus  = "kms.status"
	EventEncrypt = "kms.encrypt"
	EventDecrypt = "kms.decrypt"
	EventUnwrap  = "key.unwrap"
	EventRotate  = "key.rotate"
	EventRewrap  = "key.rewrap"
	// EventActivate records a staged KEK made active on this node; EventImport, a KEK another member wrapped
	// for this node, unwrapped and wrapped again by its own root.
	EventActivate = "key.activate"
	EventImport   = "key.import"
	EventReload   = "keyring.reload"
	EventStart    = "plugin.start"
	EventStop     = "plugin.stop"
	// EventOpen begins each log file, and marks each later opening of a file that already holds records.
	EventOpen = "audit.open"
	// EventCheckpoint closes a log file: it counts the lines before it, and its prev is the hash of the last.
	EventCheckpoint = "audit.checkpoint"
)

// Caller is the process at the other end of the socket, as the kernel recorded it (SO_PEERCRED).
type Caller struct {
	UID, GID uint32
	PID      int32
}

// LogValue describes the caller in log records.
func (c Caller) LogValue() slog.Value {
	return slog.GroupValue(slog.Any("uid", c.UID), slog.Any("gid", c.GID), slog.Any("pid", c.PID))
}

// Record is one audit record. Time is set by [Logger.Log] when zero.
type Record struct {
	Time       time.Time
	Event      string
	RequestUID string
	Caller     *Caller
	KeyID      string
	Provider   string
	// ErrorType is empty on success; the outcome is derived from it.
	ErrorType string
	// Changed is for keyring.reload: the active key changed.
	Changed  bool
	Duration time.Duration
}

// Logger writes audit records as JSON lines to a file or a stream. It is safe for concurrent use.
//
// [Logger.Log] encodes the record and hands it to a writer goroutine, which writes whatever records are pending
// in one system call, about a millisecond later: the RPC that logs does not wait for the disk. [Logger.Flush],
// [Logger.Reopen] and [Logger.Close] write every pending record first, so a graceful stop loses nothing; a process
// killed with SIGKILL loses only the records of its last moments that were not yet written.
//
// A write that fails is counted ([Logger.WriteErrors]) and reported by [Logger.Err]; the Logger keeps serving.
// What a failed write did not write stays pending and is written first by the next write, so a short outage loses
// nothing. Beyond [MaxPending] bytes the pending records are dropped ([Logger.LostRecords]), and the next write
// begins with an audit.open record that says how many were lost.
type Logger struct {
	// switchMu serialises Reopen and Close: each waits for batches with mu released (flushed.Wait), and two
	// file switches interleaved there would each write a checkpoint and an opening record.
	switchMu sync.Mutex
	mu       sync.Mutex
	flushed  *sync.Cond // signalled when a batch is written
	path     string     // "" for a stream
	w        io.Writer
	wake     chan struct{} // tells the writer goroutine there are pending records
	closed   bool

	pending  []byte            // lines encoded but not yet wholly written, from the start of a line
	skip     int               // how many bytes of pending a failed write wrote already
	spare    []byte            // the buffer of the last batch, reused
	prev     [sha256.Size]byte // hash of the last line encoded
	lines    uint64            // lines of the current file, written or pending
	diskHead [sha256.Size]byte // hash of the last whole line written to the current file
	writing  bool              // a batch is being written, outside mu
	lost     uint64            // records dropped that the next audit.open record has to tell

	writeErrors atomic.Uint64
	lostRecords atomic.Uint64
	err         atomic.Pointer[error] // the last write's error, nil once a write succeeds
}

// MaxPending is how many bytes of records a [Logger] keeps for a log it cannot write before it drops them:
// about 3,000 records.
const MaxPending = 1 << 20

// batchDelay is how long a record may wait for others before it is written.
const batchDelay = time.Millisecond

// New returns a Logger that writes to w (for example os.Stdout), beginning with an audit.open record. Close it to
// write the checkpoint and stop its writer goroutine.
func New(w io.Writer) *Logger {
	l := newLogger(w)
	l.mu.Lock()
	l.logOpen(0)
	l.mu.Unlock()
	return l
}

func newLogger(w io.Writer) *Logger {
	l := &Logger{w: w, wake: make(chan struct{}, 1)}
	l.flushed = sync.NewCond(&l.mu)
	go l.writeLoop()
	return l
}

// writeLoop writes pending records whenever Log signals, until Close. It lets records gather for batchDelay
// first, so that under load one write carries many.
func (l *Logger) writeLoop() {
	for range l.wake {
		time.Sleep(batchDelay)
		l.mu.Lock()
		if !l.writing && len(l.pending) > 0 {
			l.writeBatch()
		}
		l.mu.Unlock()
	}
}

// OpenFile returns a Logger that appends to the file at path, created with mode 0600. The hash chain continues
// from the file's last whole record: an audit.open record links to it (a torn last line, left by a crash while
// it was being written, is ended with a newline and skipped by the link). [Logger.Reopen] opens the path again,
// for log rotation (SIGHUP); the hash chain continues across files.
func OpenFile(path string) (*Logger, error) {
	f, err := openAppend(path)
	if err != nil {
		return nil, err
	}
	t, err := readTail(f, path)
	if err != nil {
		f.Close()
		return nil, err
	}
	l := newLogger(f)
	l.path = path
	l.mu.Lock()
	l.startFile(t)
	l.mu.Unlock()
	return l, nil
}

func openAppend(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: open %s: %w", path, err)
	}
	return f, nil
}

// tail is what a log file holds already.
type tail struct {
	lines   uint64            // whole lines, the torn one included once it is ended
	head    [sha256.Size]byte // hash of the last whole line before a torn one
	hasHead bool
	torn    int // length of a torn last line, now ended with a newline
}

// readTail reads the file f opened for appending: how many lines it holds and the hash of the last whole one. A
// last line without a newline (a record torn by a crash) is ended with one, so what follows starts a line of its
// own. Anything but a regular file (a pipe, /dev/full) is treated as empty.
func readTail(f *os.File, path string) (tail, error) {
	var t tail
	fi, err := f.Stat()
	if err != nil {
		return t, fmt.Errorf("audit: %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return t, nil
	}
	var (
		buf            = make([]byte, 256<<10)
		off, lastStart int64 // offset read up to; start of the line being read
		prevStart      = int64(-1)
	)
	for {
		n, err := f.ReadAt(buf, off)
		for i := 0; i < n; {
			j := bytes.IndexByte(buf[i:n], '\n')
			if j < 0 {
				break
			}
			t.lines++
			prevStart, lastStart = lastStart, off+int64(i+j+1)
			i += j + 1
		}
		off += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			return t, fmt.Errorf("audit: read %s: %w", path, err)
		}
	}
	if prevStart >= 0 { // the last whole line is [prevStart, lastStart)
		h := sha256.New()
		if _, err := io.Copy(h, io.NewSectionReader(f, prevStart, lastStart-prevStart)); err != nil {
			return t, fmt.Errorf("audit: read %s: %w", path, err)
		}
		h.Sum(t.head[:0])
		t.hasHead = true
	}
	if off > lastStart {
		if _, err := f.Write([]byte{'\n'}); err != nil {
			return t, fmt.Errorf("audit: end the torn last line of %s: %w", path, err)
		}
		t.torn = int(off - lastStart)
		t.lines++
	}
	return t, nil
}

// startFile begins writing to a file that holds t: the chain continues from its last whole record, or from the
// Logger's last record when the file has none. The caller holds mu.
func (l *Logger) startFile(t tail) {
	if t.hasHead {
		l.prev = t.head
	}
	l.lines, l.diskHead = t.lines, l.prev
	l.logOpen(t.torn)
}

// logOpen encodes an audit.open record. The caller holds mu.
func (l *Logger) logOpen(torn int) {
	start := len(l.pending)
	b := appendHead(l.pending, time.Now(), EventOpen)
	b = appendString(b, "outcome", "ok")
	b = appendUint(b, "records", l.lines)
	if torn > 0 {
		b = appendInt(b, "torn_bytes", int64(torn))
	}
	if l.lost > 0 {
		b = appendUint(b, "lost", l.lost)
		l.lost = 0
	}
	l.seal(b, start)
}

// checkpoint writes the pending records and an audit.checkpoint record, the last of the file: mu stays held
// while the checkpoint is written, so no record can follow it. What cannot be written stays pending. The caller
// holds mu.
func (l *Logger) checkpoint() {
	l.idle()
	start := len(l.pending)
	b := appendHead(l.pending, time.Now(), EventCheckpoint)
	b = appendString(b, "outcome", "ok")
	l.seal(appendUint(b, "records", l.lines), start)
	l.write(false)
}

// seal ends the record that b, the pending lines, holds from start: it links it to the record before with prev,
// and makes b the pending lines and the record's hash the next one's prev. The caller holds mu.
func (l *Logger) seal(b []byte, start int) {
	b = appendPrev(b, &l.prev)
	l.prev = sha256.Sum256(b[start:])
	l.pending = b
	l.lines++
}

// idle writes every pending record, waiting for a batch the writer goroutine is writing. It gives up after a
// write fails: the records stay pending. The caller holds mu.
func (l *Logger) idle() {
	for len(l.pending) > 0 || l.writing {
		if l.writing {
			l.flushed.Wait()
			continue
		}
		if !l.writeBatch() {
			return
		}
	}
}

// Flush writes every record logged so far.
func (l *Logger) Flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.idle()
}

// Reopen moves to a new file at the path, for log rotation: when the path no longer names the file being written
// (logrotate renamed it), Reopen writes the pending records and a checkpoint to that file, closes it and opens
// the path, where the chain continues. When the path still names the same file, and for a stream, it only writes
// the pending records.
func (l *Logger) Reopen() error {
	if l.path == "" {
		l.Flush()
		return nil
	}
	l.switchMu.Lock()
	defer l.switchMu.Unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return fmt.Errorf("audit: reopen %s: %w", l.path, kleidi.ErrClosed)
	}
	f, err := openAppend(l.path) // under mu: two Reopens at once see the path one after the other
	if err != nil {
		return err
	}
	old := l.w.(*os.File)
	if sameFile(old, f) {
		f.Close()
		l.idle()
		return nil
	}
	l.checkpoint()
	if len(l.pending) > 0 { // the old file cannot be written: what it lacks is lost, and said so in the new one
		l.drop(false)
	}
	t, err := readTail(f, l.path) // a new file is empty: this is quick
	if err != nil {
		f.Close()
		l.logOpen(0) // the chain goes on in the old file
		return err
	}
	l.w = f
	l.startFile(t)
	return old.Close()
}

func sameFile(a, b *os.File) bool {
	fa, err := a.Stat()
	if err != nil {
		return false
	}
	fb, err := b.Stat()
	return err == nil && os.SameFile(fa, fb)
}

// Close writes the pending records and a checkpoint, stops the writer goroutine and closes the file of a Logger
// made by OpenFile. Records logged after Close are dropped and counted by [Logger.LostRecords]. It returns an
// error wrapping [ErrWrite] when records could not be written.
func (l *Logger) Close() error {
	l.switchMu.Lock()
	defer l.switchMu.Unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.checkpoint()
	var err error
	if len(l.pending) > 0 {
		err = fmt.Errorf("%w: %d records not written", ErrWrite, bytes.Count(l.pending, []byte{'\n'}))
		l.drop(false)
	}
	l.closed = true
	close(l.wake)
	if l.path == "" {
		return err
	}
	return errors.Join(err, l.w.(*os.File).Close())
}

// Log writes r.
func (l *Logger) Log(r Record) {
	if r.Time.IsZero() {
		r.Time = time.Now()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		l.lostRecords.Add(1)
		return
	}
	start := len(l.pending)
	l.seal(appendFields(appendHead(l.pending, r.Time, r.Event), &r), start)
	if len(l.pending) > MaxPending && !l.writing { // the log cannot be written: do not grow without bound
		l.writeBatch() // drops the records beyond MaxPending if it fails
	}
	select {
	case l.wake <- struct{}{}:
	default: // the writer has a signal pending already
	}
}

// writeBatch writes every pending record, releasing mu during the write, and reports whether it succeeded. The
// caller holds mu.
func (l *Logger) writeBatch() bool { return l.write(true) }

// write writes every pending record, releasing mu during the write when unlock is true, and reports whether it
// succeeded. The caller holds mu and, without unlock, no batch is being written.
func (l *Logger) write(unlock bool) bool {
	batch, skip, head, w := l.pending, l.skip, l.prev, l.w
	l.pending, l.skip = l.spare[:0], 0
	if unlock {
		l.writing = true
		l.mu.Unlock()
	}
	n, err := w.Write(batch[skip:])
	if unlock {
		l.mu.Lock()
		l.writing = false
		l.flushed.Broadcast()
	}
	if err == nil {
		l.spare, l.diskHead = batch, head
		if l.err.Load() != nil {
			l.err.Store(nil)
		}
		return true
	}
	l.writeFailed(batch, skip+n, err)
	return false
}

// writeFailed keeps what a failed write of batch did not write (all but its first done bytes) pending, before the
// records logged during the write, and drops them all beyond MaxPending. The caller holds mu.
func (l *Logger) writeFailed(batch []byte, done int, err error) {
	l.writeErrors.Add(1)
	err = fmt.Errorf("%w: %w", ErrWrite, err)
	l.err.Store(&err)
	i := bytes.LastIndexByte(batch[:done], '\n')
	if i >= 0 { // the last whole line written
		start := bytes.LastIndexByte(batch[:i], '\n') + 1
		l.diskHead = sha256.Sum256(batch[start : i+1])
	}
	rest := batch[i+1:]
	p := make([]byte, 0, len(rest)+len(l.pending))
	l.pending, l.skip = append(append(p, rest...), l.pending...), done-(i+1)
	if len(l.pending) > MaxPending {
		l.drop(true)
	}
}

// drop gives up the pending records: they are counted as lost, and the chain goes on from the last whole line
// written. With resume, the writing goes on in the same file: a line a failed write began is ended, and an
// audit.open record says what was lost. Otherwise (Close, Reopen) nothing more is written to the file. The caller
// holds mu.
func (l *Logger) drop(resume bool) {
	lost := uint64(bytes.Count(l.pending, []byte{'\n'}))
	l.lostRecords.Add(lost)
	l.lost += lost
	l.lines -= lost
	l.prev = l.diskHead
	torn := l.skip
	if !resume || torn == 0 {
		l.pending, l.skip = l.pending[:0], 0
		if resume {
			l.logOpen(0)
		}
		return
	}
	// The torn line is written up to skip: end it there.
	l.pending = append(l.pending[:torn], '\n')
	l.lines++
	l.logOpen(torn)
}

// WriteErrors returns how many writes to the log failed since the Logger was made. Each write carries one or more
// records; what a failed write did not write is written by a later one, unless it is lost ([Logger.LostRecords]).
func (l *Logger) WriteErrors() uint64 { return l.writeErrors.Load() }

// LostRecords returns how many records were dropped since the Logger was made: records that could not be written
// while more than [MaxPending] bytes waited, at [Logger.Close] or [Logger.Reopen], and records logged after Close.
func (l *Logger) LostRecords() uint64 { return l.lostRecords.Load() }

// Err returns nil while the log is being written, and an error wrapping [ErrWrite] from a failed write until a
// write succeeds again: a plugin reports it in its health. The error holds the file name and the system's reason
// (such as "no space left on device"), never a record.
func (l *Logger) Err() error {
	if p := l.err.Load(); p != nil {
		return *p
	}
	return nil
}

// KeyEvents returns a function for [kleidi.WithKeyEvents] that records the Envelope's key operations of
// provider. A reload that changed nothing and did not fail is not recorded: a server reloads every few seconds.
func (l *Logger) KeyEvents(provider string) func(kleidi.KeyEvent) {
	events := map[string]string{"unwrap": EventUnwrap, "rotate": EventRotate, "reload": EventReload,
		"activate": EventActivate, "import": EventImport}
	return func(ev kleidi.KeyEvent) {
		if ev.Op == "reload" && !ev.Changed && ev.Err == nil {
			return
		}
		r := Record{Event: events[ev.Op], KeyID: ev.KeyID, Provider: provider, Changed: ev.Changed, Duration: ev.Duration}
		if ev.Err != nil {
			r.ErrorType = kleidi.ErrorKind(ev.Err)
		}
		l.Log(r)
	}
}

// Package audit writes one structured record per KMS call, key operation and lifecycle event of a kleidi
// plugin, so operators can prove who asked for which key. It also builds the plugin's operational log handler
// (tint-coloured text for a human at a terminal, JSON otherwise).
//
// # Schema
//
// Records are JSON lines written through log/slog. The keys are stable; a key without a value is left out.
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
// A record never holds plaintext, a key, a DEK seed, a passphrase or an error message.
package audit

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
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
	EventReload  = "keyring.reload"
	EventStart   = "plugin.start"
	EventStop    = "plugin.stop"
)

// Caller is the process at the other end of the socket.
type Caller struct {
	UID, GID uint32
	PID      int32
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
type Logger struct {
	mu      sync.Mutex
	flushed *sync.Cond // signalled when a batch is written
	path    string     // "" for a stream
	w       io.Writer
	logger  *slog.Logger
	wake    chan struct{} // tells the writer goroutine there are pending records
	closed  bool

	pending  []byte            // records encoded but not yet written
	spare    []byte            // the buffer of the last batch, reused
	prev     [sha256.Size]byte // hash of the last record encoded
	appended uint64            // records encoded
	written  uint64            // records written
	writing  bool              // a batch is being written, outside mu
}

// batchDelay is how long a record may wait for others before it is written.
const batchDelay = time.Millisecond

// New returns a Logger that writes to w (for example os.Stdout). Close it to stop its writer goroutine.
func New(w io.Writer) *Logger {
	l := &Logger{w: w, wake: make(chan struct{}, 1)}
	l.flushed = sync.NewCond(&l.mu)
	l.logger = slog.New(&recordHandler{w: (*recordBuffer)(l)})
	go l.writeLoop()
	return l
}

// writeLoop writes pending records whenever Log signals, until Close. It lets records gather for batchDelay
// first, so that under load one write carries many.
func (l *Logger) writeLoop() {
	for range l.wake {
		time.Sleep(batchDelay)
		l.mu.Lock()
		if !l.writing && l.written < l.appended {
			l.writeBatch()
		}
		l.mu.Unlock()
	}
}

// OpenFile returns a Logger that appends to the file at path, created with mode 0600. [Logger.Reopen] opens the
// path again, for log rotation (SIGHUP); the hash chain continues across files.
func OpenFile(path string) (*Logger, error) {
	f, err := openAppend(path)
	if err != nil {
		return nil, err
	}
	l := New(f)
	l.path = path
	return l, nil
}

func openAppend(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: open %s: %w", path, err)
	}
	return f, nil
}

// idle writes every pending record, waiting for a batch the writer goroutine is writing. The caller holds mu.
func (l *Logger) idle() {
	for l.writing || l.written < l.appended {
		if !l.writing {
			l.writeBatch()
			continue
		}
		l.flushed.Wait()
	}
}

// Flush writes every record logged so far.
func (l *Logger) Flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.idle()
}

// Reopen writes the pending records, closes the file and opens its path again; for a stream it only writes.
func (l *Logger) Reopen() error {
	if l.path == "" {
		l.Flush()
		return nil
	}
	f, err := openAppend(l.path)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.idle()
	old := l.w.(*os.File)
	l.w = f
	return old.Close()
}

// Close writes the pending records, stops the writer goroutine and closes the file of a Logger made by OpenFile.
// Records logged after Close are written by Log itself.
func (l *Logger) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.idle()
	if l.closed {
		return nil
	}
	l.closed = true
	close(l.wake)
	if l.path == "" {
		return nil
	}
	return l.w.(*os.File).Close()
}

// Log writes r.
func (l *Logger) Log(r Record) {
	if r.Time.IsZero() {
		r.Time = time.Now()
	}
	attrs := make([]slog.Attr, 0, 12)
	if r.RequestUID != "" {
		attrs = append(attrs, slog.String("request_uid", r.RequestUID))
	}
	if r.Caller != nil {
		attrs = append(attrs, slog.Uint64("caller_uid", uint64(r.Caller.UID)), slog.Uint64("caller_gid", uint64(r.Caller.GID)),
			slog.Int64("caller_pid", int64(r.Caller.PID)))
	}
	if r.KeyID != "" {
		attrs = append(attrs, slog.String("key_id", r.KeyID))
	}
	if r.Provider != "" {
		attrs = append(attrs, slog.String("provider", r.Provider))
	}
	if r.ErrorType == "" {
		attrs = append(attrs, slog.String("outcome", "ok"))
	} else {
		attrs = append(attrs, slog.String("outcome", "error"), slog.String("error_type", r.ErrorType))
	}
	if r.Event == EventReload {
		attrs = append(attrs, slog.Bool("changed", r.Changed))
	}
	attrs = append(attrs, slog.Int64("duration_us", r.Duration.Microseconds())) // an integer: slog encodes floats slowly
	l.mu.Lock()
	defer l.mu.Unlock()
	attrs = append(attrs, slog.String("prev", hex.EncodeToString(l.prev[:])))
	rec := slog.NewRecord(r.Time, slog.LevelInfo, r.Event, 0)
	rec.AddAttrs(attrs...)
	l.logger.Handler().Handle(context.Background(), rec) // appends the line to pending
	if l.closed {
		l.idle()
		return
	}
	select {
	case l.wake <- struct{}{}:
	default: // the writer has a signal pending already
	}
}

// writeBatch writes every pending record, releasing mu during the write. The caller holds mu.
func (l *Logger) writeBatch() {
	batch, upto, w := l.pending, l.appended, l.w
	l.pending, l.writing = l.spare[:0], true
	l.mu.Unlock()
	w.Write(batch) // an audit sink that fails cannot be reported anywhere better than in the records it loses
	l.mu.Lock()
	l.spare, l.written, l.writing = batch, upto, false
	l.flushed.Broadcast()
}

// KeyEvents returns a function for [kleidi.WithKeyEvents] that records the Envelope's key operations of
// provider. A reload that changed nothing and did not fail is not recorded: a server reloads every few seconds.
func (l *Logger) KeyEvents(provider string) func(kleidi.KeyEvent) {
	events := map[string]string{"unwrap": EventUnwrap, "rotate": EventRotate, "reload": EventReload, "rewrap": EventRewrap}
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

// recordBuffer is where the JSON handler writes: each record arrives as one Write (slog writes a record at once)
// and is appended to the pending batch, and its hash becomes the next record's prev. Logger.mu is held.
type recordBuffer Logger

func (b *recordBuffer) Write(line []byte) (int, error) {
	b.prev = sha256.Sum256(line)
	b.pending = append(b.pending, line...)
	b.appended++
	return len(line), nil
}

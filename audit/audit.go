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
//	duration_ms  how long the operation took, in milliseconds
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
type Logger struct {
	mu     sync.Mutex
	path   string // "" for a stream
	file   *os.File
	chain  *chainWriter
	logger *slog.Logger
}

// New returns a Logger that writes to w (for example os.Stdout).
func New(w io.Writer) *Logger {
	l := &Logger{chain: &chainWriter{}}
	l.chain.w = w
	l.logger = slog.New(slog.NewJSONHandler(l.chain, &slog.HandlerOptions{ReplaceAttr: schemaAttr}))
	return l
}

// OpenFile returns a Logger that appends to the file at path, created with mode 0600. [Logger.Reopen] opens the
// path again, for log rotation (SIGHUP); the hash chain continues across files.
func OpenFile(path string) (*Logger, error) {
	f, err := openAppend(path)
	if err != nil {
		return nil, err
	}
	l := New(f)
	l.path, l.file = path, f
	return l, nil
}

func openAppend(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: open %s: %w", path, err)
	}
	return f, nil
}

// Reopen closes the file and opens its path again; for a stream it does nothing.
func (l *Logger) Reopen() error {
	if l.path == "" {
		return nil
	}
	f, err := openAppend(l.path)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	old := l.file
	l.file, l.chain.w = f, f
	return old.Close()
}

// Close closes the file of a Logger made by OpenFile.
func (l *Logger) Close() error {
	if l.file == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.file.Close()
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
	attrs = append(attrs, slog.Float64("duration_ms", float64(r.Duration.Microseconds())/1000))
	l.mu.Lock()
	defer l.mu.Unlock()
	attrs = append(attrs, slog.String("prev", hex.EncodeToString(l.chain.prev[:])))
	rec := slog.NewRecord(r.Time, slog.LevelInfo, r.Event, 0)
	rec.AddAttrs(attrs...)
	l.logger.Handler().Handle(context.Background(), rec)
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

// schemaAttr drops slog's level and names its message "event".
func schemaAttr(groups []string, a slog.Attr) slog.Attr {
	switch a.Key {
	case slog.LevelKey:
		return slog.Attr{}
	case slog.MessageKey:
		a.Key = "event"
	}
	return a
}

// chainWriter receives each record as one Write (slog's JSON handler writes a record at once) and remembers
// the hash of the last line for the next record's prev.
type chainWriter struct {
	w    io.Writer
	prev [sha256.Size]byte
}

func (c *chainWriter) Write(line []byte) (int, error) {
	c.prev = sha256.Sum256(line)
	return c.w.Write(line)
}

// Package server is a Kubernetes KMS v2 plugin: the gRPC service k8s.io/kms/apis/v2 on a unix socket, on top of a
// [kleidi.Envelope] it builds over a root of trust and a keyring.
//
// It validates every request and every response against the limits kube-apiserver enforces, maps kleidi's errors
// to gRPC codes (see [Code]), bounds each call with a deadline, answers Status from a health probe that runs in the
// background, picks up a keyring rotated by another process, records the peer credentials of each caller, and stops
// gracefully. Encrypt responses carry the wrapped KEK in the annotation [AttachedKeyAnnotation], so each one is
// self-contained. Given [Config.Metrics] and [Config.Audit], it does all of their wiring: the provider counted, the
// Envelope's key operations, reloads, calls and start and stop recorded, health and the audit log observed, and
// /metrics served by [Server.Handler].
//
//	srv, err := server.New(ctx, provider, kleidi.NewFileKeyring(path), server.Config{Metrics: m, Audit: a})
//	defer srv.Close()
//	go http.Serve(httpListener, srv.Handler())             // /livez, /readyz, /healthz, /metrics
//	err = srv.ListenAndServe(ctx, "unix:///run/kleidi/kms.sock") // returns after ctx ends and calls finish
package server

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/peer"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/audit"
	"github.com/kleidi-kms/kleidi/internal/socket"
	"github.com/kleidi-kms/kleidi/metrics"
)

// Config holds the settings of a [Server]. The zero value is valid: every field has a default.
type Config struct {
	// HealthInterval is how often the provider's health is probed in the background; Status answers from the
	// last probe. Default 5 s.
	HealthInterval time.Duration
	// ReloadInterval is how often the keyring is read again, to pick up a rotation made by another process.
	// Default 5 s, so a rotation shows in Status within 10 s. Negative: never.
	ReloadInterval time.Duration
	// CallTimeout bounds each call, whatever deadline the client sets. Default 3 s, kube-apiserver's own.
	CallTimeout time.Duration
	// ShutdownTimeout bounds how long a graceful stop waits for calls in flight. Default 10 s.
	ShutdownTimeout time.Duration
	// AllowedUIDs, if not empty, are the only user IDs whose calls are served; others get PermissionDenied.
	// Empty: any process that may open the socket.
	AllowedUIDs []uint32
	// SocketMode is the file mode of the socket [Server.ListenAndServe] creates. Default 0600: only the user
	// the plugin runs as, normally the same as kube-apiserver's. 0660 lets the socket's group in.
	SocketMode fs.FileMode
	// Logger receives operational records: start, stop, key changes, health changes and failed calls.
	// Default: slog.Default(). Nothing secret is ever logged.
	Logger *slog.Logger
	// Metrics, if not nil, counts and times every call to the provider and every KMS call, and reports keyring
	// reloads, the KEK cache, the active key, health and the audit log's write errors; [Server.Handler] serves them
	// on /metrics. The server does all of this wiring: pass the provider itself to [New], not one Metrics wrapped.
	Metrics *metrics.Metrics
	// Audit, if not nil, receives one record per call (event, request uid, caller uid/gid/pid, key_id, provider,
	// gRPC code and duration), one per key operation of the Envelope (unwrap, rotate, reload), and the plugin's
	// start and stop. Never plaintext or key material. Its write errors make the plugin unhealthy.
	Audit *audit.Logger
	// Interceptors run around every call, inside panic recovery and the metrics and outside the server's own
	// error mapping, caller check and deadline, so they see the gRPC code the client gets.
	// [CallerFromContext] gives the caller of a call.
	Interceptors []grpc.UnaryServerInterceptor
	// OnReload, if not nil, is called after each background keyring reload with its error and whether the
	// active key changed, after the metrics recorded it.
	OnReload func(err error, keyChanged bool)
}

// Server is a KMS v2 plugin serving one [kleidi.Envelope]. Create it with [New].
type Server struct {
	env      *kleidi.Envelope
	provider kleidi.Provider // as the Envelope has it: counted by Config.Metrics, if any
	cfg      Config
	log      *slog.Logger

	health             atomic.Pointer[string] // "ok" or a short reason
	serving            atomic.Bool
	encryptAnnotations atomic.Pointer[encryptAnnotations]
	adoption           atomic.Pointer[Adoption]
}

// New assembles a plugin: the Envelope over ring, with p as its root of trust, built with opts and with the
// wiring [Config.Metrics] and [Config.Audit] need (p counted, key operations audited; an option of opts for key
// events is replaced). The Server owns the Envelope ([Server.Close] closes it); the caller keeps p and closes it
// after the Server. New probes health once before returning, so the first Status is truthful.
func New(ctx context.Context, p kleidi.Provider, ring kleidi.Keyring, cfg Config, opts ...kleidi.Option) (*Server, error) {
	if p == nil || ring == nil {
		return nil, errors.New("server: New needs a Provider and a Keyring")
	}
	if cfg.HealthInterval < 0 || cfg.CallTimeout < 0 || cfg.ShutdownTimeout < 0 {
		return nil, errors.New("server: HealthInterval, CallTimeout and ShutdownTimeout must not be negative")
	}
	if cfg.SocketMode&^fs.ModePerm != 0 {
		return nil, fmt.Errorf("server: SocketMode %v has bits other than permissions", cfg.SocketMode)
	}
	setDefault(&cfg.HealthInterval, 5*time.Second)
	setDefault(&cfg.ReloadInterval, 5*time.Second)
	setDefault(&cfg.CallTimeout, 3*time.Second)
	setDefault(&cfg.ShutdownTimeout, 10*time.Second)
	setDefault(&cfg.SocketMode, 0o600)
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	cfg.AllowedUIDs = slices.Clone(cfg.AllowedUIDs)
	cfg.Interceptors = slices.Clone(cfg.Interceptors)
	opts = slices.Clone(opts)
	if cfg.Metrics != nil {
		p = cfg.Metrics.Provider(p)
		cfg.Interceptors = append([]grpc.UnaryServerInterceptor{cfg.Metrics.UnaryServerInterceptor()}, cfg.Interceptors...)
	}
	if cfg.Audit != nil {
		opts = append(opts, kleidi.WithKeyEvents(cfg.Audit.KeyEvents(p.Name())))
	}
	env, err := kleidi.NewEnvelope(ctx, p, ring, opts...)
	if err != nil {
		return nil, err
	}
	s := &Server{env: env, provider: p, cfg: cfg, log: cfg.Logger}
	s.probe(ctx)
	if err := s.observe(); err != nil {
		env.Close()
		return nil, fmt.Errorf("server: metrics: %w", err)
	}
	return s, nil
}

// observe has the metrics read the Envelope, health and the audit log at every scrape.
func (s *Server) observe() error {
	m := s.cfg.Metrics
	if m == nil {
		return nil
	}
	if err := m.Observe(s.env, func() bool { return s.Healthz() == healthy }); err != nil {
		return err
	}
	if s.cfg.Audit != nil {
		return m.ObserveAudit(s.cfg.Audit)
	}
	return nil
}

// Envelope returns the Envelope the Server serves, for what the plugin does beside serving (rotation, node state).
func (s *Server) Envelope() *kleidi.Envelope { return s.env }

// Close closes the Envelope: every KEK is forgotten, and later calls fail with Unavailable. Close it after
// [Server.ListenAndServe] returns.
func (s *Server) Close() error { return s.env.Close() }

func setDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// ListenAndServe listens on the unix socket endpoint ("unix:///path/kms.sock", "unix:///@abstract" or a plain
// path) with [Config.SocketMode], and serves until ctx ends; see [Server.Serve]. The socket's directory is
// created with mode 0700 if missing; it and every directory above it must be safe from other users. The socket
// is bound where no other user can reach it and gets its mode before it appears at its path; a stale socket
// left by a crash is replaced only if nothing answers on it. The socket is removed on return, if it is still
// this server's.
//
// An abstract socket ("unix:///@name") has no file mode: every process in the network namespace may connect to
// it. It is refused unless [Config.AllowedUIDs] limits the callers.
func (s *Server) ListenAndServe(ctx context.Context, endpoint string) error {
	path, err := socket.ParseEndpoint(endpoint)
	if err != nil {
		return fmt.Errorf("server: %w", err)
	}
	if strings.HasPrefix(path, "@") && len(s.cfg.AllowedUIDs) == 0 {
		return fmt.Errorf("server: abstract socket %s: every process in the network namespace may connect to it and "+
			"the socket mode cannot apply; refusing it without allowed uids (--allowed-uids), or use a socket path", endpoint)
	}
	l, err := socket.Listen(path, s.cfg.SocketMode)
	if err != nil {
		return fmt.Errorf("server: %w", err)
	}
	return s.Serve(ctx, l)
}

// Serve serves KMS v2 on l until ctx ends, then stops gracefully: it stops accepting, lets calls in flight
// finish (for at most [Config.ShutdownTimeout]), closes l and returns nil. It runs the health probe and the
// keyring reload in the background while it serves. A Server serves one listener at a time.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	if !s.serving.CompareAndSwap(false, true) {
		l.Close()
		return errors.New("server: Serve called while serving")
	}
	defer s.serving.Store(false)

	gs := s.newGRPCServer()
	loops, stopLoops := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { s.backgroundLoop(loops) })
	defer func() {
		stopLoops()
		wg.Wait()
	}()

	errc := make(chan error, 1)
	go func() { errc <- gs.Serve(l) }()
	s.log.Info("serving KMS v2", "address", l.Addr().String(), "provider", s.provider.Name(),
		"key_id", s.env.KeyID(), "healthz", s.Healthz())
	s.lifecycle(audit.EventStart)
	defer s.lifecycle(audit.EventStop)

	select {
	case err := <-errc:
		gs.Stop()
		return fmt.Errorf("server: %w", err)
	case <-ctx.Done():
	}
	s.log.Info("stopping: finishing calls in flight")
	stopped := make(chan struct{})
	go func() {
		gs.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(s.cfg.ShutdownTimeout):
		s.log.Warn("calls still in flight after the shutdown timeout: cancelling them", "timeout", s.cfg.ShutdownTimeout)
		gs.Stop()
		<-stopped
	}
	<-errc
	l.Close() // gRPC closes it too; this makes sure the socket file is gone
	s.log.Info("stopped")
	return nil
}

// lifecycle writes a plugin.start or plugin.stop record to the audit log, if there is one.
func (s *Server) lifecycle(event string) {
	if s.cfg.Audit != nil {
		s.cfg.Audit.Log(audit.Record{Event: event, KeyID: s.env.KeyID(), Provider: s.provider.Name()})
	}
}

// Caller is the process at the other end of a call's unix socket connection: the one type of the audit records.
type Caller = audit.Caller

// CallerFromContext returns the caller of the call ctx belongs to, as the kernel recorded it when the
// connection was made (SO_PEERCRED). ok is false outside a call or on a connection that is not a unix socket.
func CallerFromContext(ctx context.Context) (c Caller, ok bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return Caller{}, false
	}
	info, ok := p.AuthInfo.(socket.AuthInfo)
	if !ok || info.Cred == nil {
		return Caller{}, false
	}
	return Caller{UID: info.Cred.UID, GID: info.Cred.GID, PID: info.Cred.PID}, true
}

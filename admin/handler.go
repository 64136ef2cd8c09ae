package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"time"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/internal/socket"
)

// maxBody bounds a request or answer: a keyring of many members and keys stays far below it.
const maxBody = 8 << 20

// Backend is what a plugin does for each call of the admin API. Errors are answered with their [Error] code when
// they are an *Error, else classified by their kleidi sentinel (see [Code]).
type Backend interface {
	State(ctx context.Context) (State, error)
	Keyring(ctx context.Context) ([]byte, error)
	Stage(ctx context.Context) (keyID string, err error)
	Activate(ctx context.Context, keyID string) error
	Forget(ctx context.Context, keyID string) error
	Enroll(ctx context.Context, identity []byte) (memberID string, err error)
	Unenroll(ctx context.Context, memberID string) (keyID string, err error)
	// Adopt makes keyring, published by another node, this node's keyring. It keeps this node's own copies,
	// refuses a keyring that drops a key this node holds, and believes only copies signed by members this node
	// trusts. A node with no keyring yet joins with it, trusting as its endorsers only the members of trusted.
	Adopt(ctx context.Context, keyring []byte, trusted []string) error
}

// Code returns the [Error] code for err.
func Code(err error) string {
	var e *Error
	switch {
	case errors.As(err, &e):
		return e.Code
	case errors.Is(err, kleidi.ErrUnavailable), errors.Is(err, kleidi.ErrClosed), errors.Is(err, context.DeadlineExceeded):
		return CodeUnavailable
	case errors.Is(err, kleidi.ErrInvalidKeyring) && !errors.Is(err, kleidi.ErrUnauthenticated):
		return CodeInvalid
	default:
		return CodeRefused
	}
}

// Handler returns the HTTP handler of the admin API over b. Each call is logged to log (nil for none) with the
// caller's uid and its outcome; request bodies are never logged.
func Handler(b Backend, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	mux := http.NewServeMux()
	handle := func(pattern string, do func(r *http.Request) (any, error)) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			out, err := do(r)
			attrs := []any{"call", pattern, "duration", time.Since(start)}
			if c, ok := r.Context().Value(credKey{}).(socket.Cred); ok {
				attrs = append(attrs, "caller_uid", c.UID, "caller_pid", c.PID)
			}
			if err != nil {
				code := Code(err)
				log.Warn("admin call refused", append(attrs, "code", code, "error", err)...)
				writeJSON(w, statusOf(code), &Error{Code: code, Message: err.Error()})
				return
			}
			if r.Method != http.MethodGet {
				log.Info("admin call", attrs...)
			}
			writeJSON(w, http.StatusOK, out)
		})
	}
	handle("GET /v1/state", func(r *http.Request) (any, error) { return b.State(r.Context()) })
	handle("GET /v1/keyring", func(r *http.Request) (any, error) {
		k, err := b.Keyring(r.Context())
		return json.RawMessage(k), err
	})
	handle("POST /v1/stage", func(r *http.Request) (any, error) {
		id, err := b.Stage(r.Context())
		return keyIDBody{id}, err
	})
	handle("POST /v1/activate", func(r *http.Request) (any, error) {
		var in keyIDBody
		if err := decode(r, &in); err != nil {
			return nil, err
		}
		if in.KeyID == "" {
			return nil, &Error{Code: CodeInvalid, Message: "keyID is required"}
		}
		return struct{}{}, b.Activate(r.Context(), in.KeyID)
	})
	handle("POST /v1/forget", func(r *http.Request) (any, error) {
		var in keyIDBody
		if err := decode(r, &in); err != nil {
			return nil, err
		}
		if in.KeyID == "" {
			return nil, &Error{Code: CodeInvalid, Message: "keyID is required"}
		}
		return struct{}{}, b.Forget(r.Context(), in.KeyID)
	})
	handle("POST /v1/enroll", func(r *http.Request) (any, error) {
		var in identityBody
		if err := decode(r, &in); err != nil {
			return nil, err
		}
		if len(in.Identity) == 0 {
			return nil, &Error{Code: CodeInvalid, Message: "identity is required"}
		}
		id, err := b.Enroll(r.Context(), in.Identity)
		return memberBody{id}, err
	})
	handle("POST /v1/unenroll", func(r *http.Request) (any, error) {
		var in memberBody
		if err := decode(r, &in); err != nil {
			return nil, err
		}
		if in.MemberID == "" {
			return nil, &Error{Code: CodeInvalid, Message: "memberID is required"}
		}
		id, err := b.Unenroll(r.Context(), in.MemberID)
		return keyIDBody{id}, err
	})
	handle("POST /v1/adopt", func(r *http.Request) (any, error) {
		var in adoptBody
		if err := decode(r, &in); err != nil {
			return nil, err
		}
		if len(in.Keyring) == 0 {
			return nil, &Error{Code: CodeInvalid, Message: "keyring is required"}
		}
		return struct{}{}, b.Adopt(r.Context(), in.Keyring, in.Trusted)
	})
	return mux
}

func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return &Error{Code: CodeInvalid, Message: fmt.Sprintf("request body: %v", err)}
	}
	if err := checkKeyID(v); err != nil {
		return err
	}
	return nil
}

// checkKeyID refuses a key ID that could not be one (kube-apiserver's own limit is 1 KiB).
func checkKeyID(v any) error {
	if in, ok := v.(*keyIDBody); ok && len(in.KeyID) > 1024 {
		return &Error{Code: CodeInvalid, Message: "keyID too long"}
	}
	return nil
}

func statusOf(code string) int {
	switch code {
	case CodeInvalid:
		return http.StatusBadRequest
	case CodeNotJoined:
		return http.StatusConflict
	case CodeUnavailable:
		return http.StatusServiceUnavailable
	default:
		return http.StatusForbidden
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

type credKey struct{}

// Listen listens on the unix socket endpoint ("unix:///run/kleidi/admin.sock") with mode 0600, with the hygiene of
// the KMS socket: its directory is created private if missing, a stale socket is replaced, and the socket has its
// mode before it appears at its path. An abstract socket is refused: it has no mode.
func Listen(endpoint string) (net.Listener, error) {
	path, err := socket.ParseEndpoint(endpoint)
	if err != nil {
		return nil, fmt.Errorf("admin: %w", err)
	}
	if len(path) > 0 && path[0] == '@' {
		return nil, fmt.Errorf("admin: %s: an abstract socket has no file mode; give the admin socket a path", endpoint)
	}
	l, err := socket.Listen(path, 0o600)
	if err != nil {
		return nil, fmt.Errorf("admin: %w", err)
	}
	return l, nil
}

// Serve serves h on l until ctx ends, to callers whose uid is one of allowedUIDs (the kernel's peer credentials
// of each connection); every other connection is closed unanswered and logged. allowedUIDs must not be empty.
func Serve(ctx context.Context, l net.Listener, h http.Handler, allowedUIDs []uint32, log *slog.Logger) error {
	if len(allowedUIDs) == 0 {
		l.Close()
		return errors.New("admin: no allowed uids")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	hs := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if cred, err := socket.PeerCred(c); err == nil {
				return context.WithValue(ctx, credKey{}, cred)
			}
			return ctx
		},
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(&peerFilter{Listener: l, allowed: allowedUIDs, log: log}) }()
	select {
	case err := <-errc:
		return fmt.Errorf("admin: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hs.Shutdown(sctx)
	<-errc
	return nil
}

// peerFilter accepts only connections from the allowed uids.
type peerFilter struct {
	net.Listener
	allowed []uint32
	log     *slog.Logger
}

func (p *peerFilter) Accept() (net.Conn, error) {
	for {
		c, err := p.Listener.Accept()
		if err != nil {
			return nil, err
		}
		cred, err := socket.PeerCred(c)
		if err == nil && slices.Contains(p.allowed, cred.UID) {
			return c, nil
		}
		if err != nil {
			p.log.Warn("admin connection refused: no peer credentials", "error", err)
		} else {
			p.log.Warn("admin connection refused: uid not allowed", "caller_uid", cred.UID, "caller_pid", cred.PID)
		}
		c.Close()
	}
}

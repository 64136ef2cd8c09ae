package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/admin"
	"github.com/kleidi-kms/kleidi/server"
)

// adminBackend is serve's side of the admin API (package admin): the operator's agent on this node drives the
// plugin through it. Until the node has a keyring it is joining: only State and Adopt answer.
type adminBackend struct {
	o *options

	mu     sync.Mutex
	srv    *server.Server // nil while joining
	node   kleidi.Node    // the root of trust's identity, nil for a root with none
	name   string         // the provider's name
	join   func(ctx context.Context, keyring []byte, trusted []string) error
	joined chan struct{} // closed once the node has a keyring
}

func newAdminBackend(o *options) *adminBackend {
	return &adminBackend{o: o, joined: make(chan struct{})}
}

// serving switches the backend to srv, once the node has a keyring.
func (b *adminBackend) serving(srv *server.Server, p kleidi.Provider) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.srv, b.name = srv, p.Name()
	b.node, _ = p.(kleidi.Node)
	select {
	case <-b.joined:
	default:
		close(b.joined)
	}
}

// joining makes the backend answer for a node with no keyring yet: p gives its identity, join takes the keyring.
func (b *adminBackend) joining(p kleidi.Provider, join func(ctx context.Context, keyring []byte, trusted []string) error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.name, b.join = p.Name(), join
	b.node, _ = p.(kleidi.Node)
}

// current returns the server, or the error the agent gets while the node is joining.
func (b *adminBackend) current() (*server.Server, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.srv == nil {
		return nil, &admin.Error{Code: admin.CodeNotJoined, Message: "this node has no keyring yet: it waits for Adopt"}
	}
	return b.srv, nil
}

func (b *adminBackend) State(ctx context.Context) (admin.State, error) {
	b.mu.Lock()
	srv, node, name, join := b.srv, b.node, b.name, b.join
	b.mu.Unlock()
	if srv == nil && join == nil {
		return admin.State{}, &admin.Error{Code: admin.CodeUnavailable, Message: "the plugin is starting"}
	}
	s := admin.State{Provider: name}
	if node != nil {
		id, err := node.Identity(ctx)
		if err != nil {
			return s, fmt.Errorf("identity: %w", err)
		}
		if s.Identity, err = kleidi.MarshalIdentity(id); err != nil {
			return s, err
		}
		s.MemberID = id.ID()
	}
	if srv == nil {
		s.Message = "joining: no keyring yet"
		return s, nil
	}
	env := srv.Envelope()
	s.Joined = true
	s.Healthy = srv.Healthz() == "ok"
	if !s.Healthy {
		s.Message = srv.Healthz()
	}
	s.ActiveKeyID = env.KeyID()
	raw, err := os.ReadFile(b.o.keyringPath())
	if err != nil {
		return s, fmt.Errorf("keyring: %w", err)
	}
	sum := sha256.Sum256(raw)
	s.KeyringDigest = "sha256:" + hex.EncodeToString(sum[:])
	ring, err := kleidi.ParseKeyring(raw)
	if err != nil {
		return s, err
	}
	for _, r := range ring.Keys {
		s.Keys = append(s.Keys, admin.Key{ID: r.ID, State: string(r.State), Created: r.Created, Held: env.Holds(r.ID)})
	}
	for _, m := range ring.Members {
		s.Members = append(s.Members, m.ID)
	}
	a := srv.Adoption()
	s.Adoption = admin.Adoption{KeyID: a.KeyID, StatusAt: a.StatusAt, EncryptAt: a.EncryptAt}
	return s, nil
}

func (b *adminBackend) Keyring(context.Context) ([]byte, error) {
	if _, err := b.current(); err != nil {
		return nil, err
	}
	raw, err := os.ReadFile(b.o.keyringPath())
	if err != nil {
		return nil, fmt.Errorf("keyring: %w", err)
	}
	return raw, nil
}

// change runs f on the Envelope and saves the node state it leaves.
func (b *adminBackend) change(f func(env *kleidi.Envelope) error) error {
	srv, err := b.current()
	if err != nil {
		return err
	}
	if err := f(srv.Envelope()); err != nil {
		return err
	}
	return b.o.saveNodeState(srv.Envelope())
}

func (b *adminBackend) Stage(ctx context.Context) (id string, err error) {
	err = b.change(func(env *kleidi.Envelope) error {
		id, err = env.Stage(ctx)
		return err
	})
	return id, err
}

func (b *adminBackend) Activate(ctx context.Context, id string) error {
	return b.change(func(env *kleidi.Envelope) error { return env.Activate(ctx, id) })
}

func (b *adminBackend) Forget(ctx context.Context, id string) error {
	return b.change(func(env *kleidi.Envelope) error { return env.Forget(ctx, id) })
}

func (b *adminBackend) Enroll(ctx context.Context, identity []byte) (member string, err error) {
	id, err := kleidi.ParseIdentity(identity)
	if err != nil {
		return "", &admin.Error{Code: admin.CodeInvalid, Message: err.Error()}
	}
	err = b.change(func(env *kleidi.Envelope) error {
		member, err = env.Enroll(ctx, id)
		return err
	})
	return member, err
}

func (b *adminBackend) Unenroll(ctx context.Context, member string) (id string, err error) {
	err = b.change(func(env *kleidi.Envelope) error {
		id, err = env.Unenroll(ctx, member)
		return err
	})
	return id, err
}

// Adopt takes a keyring another node published. A node that has one already believes the new one only as far as
// its own trust reaches: trusted is ignored, since what arrives through the cluster must never widen it. A node
// that has none joins with it, trusting as its endorsers only the members of trusted (the approved members).
func (b *adminBackend) Adopt(ctx context.Context, keyring []byte, trusted []string) error {
	b.mu.Lock()
	srv, join := b.srv, b.join
	b.mu.Unlock()
	if srv != nil {
		return b.change(func(env *kleidi.Envelope) error { return env.Adopt(ctx, keyring) })
	}
	if join == nil {
		return &admin.Error{Code: admin.CodeUnavailable, Message: "the plugin is starting"}
	}
	return join(ctx, keyring, trusted)
}

// joinWith writes keyring and the trust of a joining node to the state directory, then opens them with open
// (serve's usual start). If the node cannot unwrap the active key with that trust, both are removed again and the
// node keeps waiting.
func (o *options) joinWith(ctx context.Context, keyring []byte, trusted []string, open func(context.Context) error) error {
	if len(trusted) == 0 {
		return &admin.Error{Code: admin.CodeInvalid, Message: "a joining node needs the member IDs it may trust as its endorsers"}
	}
	ring, err := kleidi.ParseKeyring(keyring)
	if err != nil {
		return &admin.Error{Code: admin.CodeInvalid, Message: err.Error()}
	}
	if len(ring.Keys) == 0 {
		return &admin.Error{Code: admin.CodeInvalid, Message: "the keyring has no keys"}
	}
	state, err := o.loadNodeState()
	if err != nil {
		return err
	}
	saved := state
	state.Trusted = slices.Compact(slices.Sorted(slices.Values(append(slices.Clone(state.Trusted), trusted...))))
	if err := o.resetNodeState(state); err != nil {
		return err
	}
	undo := func() {
		os.Remove(o.keyringPath())
		o.resetNodeState(saved)
	}
	if _, err := kleidi.NewFileKeyring(o.keyringPath()).Update(ctx, func(r *kleidi.Ring) error {
		r.Keys, r.Members, r.Removed = ring.Keys, ring.Members, ring.Removed
		return nil
	}); err != nil {
		undo()
		return fmt.Errorf("keyring: %w", err)
	}
	if err := o.giveToStateOwner(o.keyringPath()); err != nil {
		undo()
		return err
	}
	if err := open(ctx); err != nil {
		undo()
		return err
	}
	return nil
}

// serveAdmin serves the admin API on endpoint until ctx ends.
func serveAdmin(ctx context.Context, endpoint string, allowed []uint32, b *adminBackend, log *slog.Logger) (stop func(), err error) {
	l, err := admin.Listen(endpoint)
	if err != nil {
		return nil, fmt.Errorf("--admin-socket: %w", err)
	}
	if len(allowed) == 0 {
		allowed = []uint32{uint32(os.Getuid())}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := admin.Serve(ctx, l, admin.Handler(b, log), allowed, log); err != nil {
			log.Error("admin socket stopped", "error", err)
		}
	}()
	log.Info("serving the admin API", "address", l.Addr().String(), "allowed_uids", allowed)
	return func() { cancel(); <-done }, nil
}

// mayJoin reports whether serve waits for a keyring from the agent: the state directory has none, and serve may
// not create one (no --init, not the development default).
func (o *options) mayJoin() bool {
	exists, err := o.keyringExists()
	return err == nil && !exists && !o.firstStart && !o.isDevelopmentDefault()
}

// awaitJoin waits, serving the admin API's State and Adopt, until the agent hands the node a keyring it can use,
// then opens it as serve does. Meanwhile /livez answers ok and /readyz 503. It returns a nil provider if ctx ends
// first.
func (o *options) awaitJoin(ctx context.Context, ab *adminBackend, httpAddr string) (kleidi.Provider, *kleidi.Envelope, error) {
	type opened struct {
		p   kleidi.Provider
		env *kleidi.Envelope
	}
	var (
		mu     sync.Mutex
		jp     kleidi.Provider // the root of trust, open for its identity until the join
		done   bool            // joined: later calls wait for the server
		result = make(chan opened, 1)
	)
	openProvider := func() error {
		p, err := o.openProvider(ctx)
		if err != nil {
			return err
		}
		if _, ok := p.(kleidi.Node); !ok {
			p.Close()
			return fmt.Errorf("--admin-socket: no keyring in %s, and provider %s has no identity to join a keyring with: run "+
				"kleidi-server init first", o.stateDir, p.Name())
		}
		jp = p
		return nil
	}
	if err := openProvider(); err != nil {
		return nil, nil, err
	}
	var join func(context.Context, []byte, []string) error
	join = func(reqCtx context.Context, keyring []byte, trusted []string) error {
		mu.Lock()
		defer mu.Unlock()
		if done {
			return &admin.Error{Code: admin.CodeUnavailable, Message: "the plugin is starting"}
		}
		return o.joinWith(reqCtx, keyring, trusted, func(context.Context) error {
			jp.Close() // a TPM behind a socket serves one connection at a time
			p, env, _, err := o.open(ctx)
			if err != nil {
				if perr := openProvider(); perr != nil {
					o.log.Error("reopening the root of trust failed", "error", perr)
				} else {
					ab.joining(jp, join)
				}
				return err
			}
			done = true
			result <- opened{p, env}
			return nil
		})
	}
	ab.joining(jp, join)
	stop, err := serveNotReady(httpAddr, "joining: no keyring yet", o.log)
	if err != nil {
		jp.Close()
		return nil, nil, err
	}
	defer stop()
	st, _ := ab.State(ctx)
	o.log.Info("joining: no keyring yet; waiting for the agent to hand this node the cluster's keyring", "member", st.MemberID)
	select {
	case r := <-result:
		o.log.Info("joined the keyring", "key_id", r.env.KeyID())
		return r.p, r.env, nil
	case <-ctx.Done():
		mu.Lock()
		defer mu.Unlock()
		select {
		case r := <-result:
			return r.p, r.env, nil
		default:
		}
		jp.Close()
		return nil, nil, nil
	}
}

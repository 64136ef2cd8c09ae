package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime/debug"
	"time"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/audit"
	"github.com/kleidi-kms/kleidi/client"
	"github.com/kleidi-kms/kleidi/gpg"
	"github.com/kleidi-kms/kleidi/metrics"
	"github.com/kleidi-kms/kleidi/pkcs11"
	"github.com/kleidi-kms/kleidi/server"
)

// serveGCPercent is serve's garbage collector target unless GOGC says otherwise: every call allocates its request
// and response, and at Go's default of 100 the collector took about 12% of a loaded plugin; at 200 the heap stays a
// few MiB larger and the collector runs half as often.
const serveGCPercent = 200

func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(serveGCPercent)
	}
	var o options
	fs := newFlagSet("serve", stderr)
	o.register(fs)
	listen := fs.String("listen", defaultListen(), "unix `socket` to serve on, as unix:///path/kms.sock (its directory is created with mode 0700)")
	httpAddr := fs.String("http-addr", "127.0.0.1:8787", "`host:port` of the HTTP endpoints /livez, /readyz, /healthz (\"off\" for none)")
	mode := modeValue(0o600)
	fs.Var(&mode, "socket-mode", "file `mode` of the socket, in octal: 0600 for the plugin's own user, 0660 to let its group in")
	auditPath := fs.String("audit-log", "", "`file` to append the audit log to (one JSON record per KMS call and key operation; reopened on SIGHUP), or - for standard output (default: none)")
	var allowed uidList
	fs.Var(&allowed, "allowed-uids", "comma-separated `uids` allowed to call the plugin (default: any that may open the socket)")
	adminSocket := fs.String("admin-socket", "", "unix `socket` of the admin API for the operator's agent on this node, as unix:///run/kleidi/admin.sock "+
		"(default: none). Mode 0600; with it, a node that has no keyring yet waits for the agent to hand it one (joining)")
	var adminUIDs uidList
	fs.Var(&adminUIDs, "admin-allowed-uids", "comma-separated `uids` allowed to call the admin API (default: the plugin's own)")
	firstStart := fs.Bool("init", false, "on a state directory never initialised, create its keyring with the root of trust of the flags "+
		"(a deployment's first start); a state directory that held a keyring before is still refused")
	if err := parse(fs, args); err != nil {
		return err
	}
	o.firstStart = *firstStart
	if err := o.setup(stderr); err != nil {
		return err
	}
	o.devKeyAllowed, o.createKeyring = true, true
	m, err := metrics.New()
	if err != nil {
		return err
	}
	defer m.Shutdown(context.Background())
	var auditLog *audit.Logger
	if *auditPath != "" {
		if auditLog, err = openAudit(*auditPath, stdout); err != nil {
			return err
		}
		defer auditLog.Close()
		defer reopenOnSIGHUP(auditLog, o.log)()
	}
	var srv *server.Server
	cfg := server.Config{Logger: o.log, SocketMode: mode.fileMode(), AllowedUIDs: allowed, Metrics: m, Audit: auditLog,
		OnReload: func(err error, _ bool) {
			if err == nil {
				if err := o.saveNodeState(srv.Envelope()); err != nil {
					o.log.Warn("could not record the node state", "error", err)
				}
			}
		}}
	// open checks and, on a first start, initialises the state directory, as every command does; the Envelope it
	// opens is the server's.
	o.newEnvelope = func(ctx context.Context, p kleidi.Provider, ring kleidi.Keyring, opts ...kleidi.Option) (*kleidi.Envelope, error) {
		s, err := server.New(ctx, p, ring, cfg, opts...)
		if err != nil {
			return nil, err
		}
		srv = s
		return s.Envelope(), nil
	}
	var ab *adminBackend
	if *adminSocket != "" {
		ab = newAdminBackend(&o)
		stop, err := serveAdmin(ctx, *adminSocket, adminUIDs, ab, o.log)
		if err != nil {
			return err
		}
		defer stop()
	}
	var p kleidi.Provider
	var env *kleidi.Envelope
	var created bool
	if ab != nil && o.mayJoin() {
		if p, env, err = o.awaitJoin(ctx, ab, *httpAddr); err != nil || p == nil {
			return err // nil: stopped while joining
		}
	} else {
		p, env, created, err = o.open(ctx)
	}
	if errors.Is(err, pkcs11.ErrPIN) {
		return holdRefusedPIN(ctx, *httpAddr, o.log, err)
	}
	if err != nil {
		return err
	}
	defer p.Close()
	defer srv.Close()
	if created {
		o.log.Info("initialised the state directory with a first KEK", "state_dir", o.stateDir, "key_id", env.KeyID())
	}
	if ab != nil {
		ab.serving(srv, p)
	}
	if *httpAddr != "off" && *httpAddr != "" {
		stopHTTP, err := serveHTTP(*httpAddr, srv.Handler(), o.log)
		if err != nil {
			return err
		}
		defer stopHTTP()
	}
	return srv.ListenAndServe(ctx, *listen)
}

// holdRefusedPIN keeps serve running, unhealthy, after the token refused its PIN, until SIGTERM: exiting would have
// systemd or the kubelet start it again, and each start would try the PIN once more, until an HSM that counts
// failed logins locks the token. /livez answers ok, so the kubelet does not restart it either; /readyz and
// /healthz answer 503 with the reason.
func holdRefusedPIN(ctx context.Context, httpAddr string, log *slog.Logger, err error) error {
	log.Error("the PKCS#11 token refused the PIN: serving nothing and not trying again, so that the token does not "+
		"lock; correct the PIN file, then restart the plugin", "error", err)
	stop, herr := serveNotReady(httpAddr, "root of trust refused the PIN", log)
	if herr != nil {
		return herr
	}
	defer stop()
	<-ctx.Done()
	return nil // stopped on request: the refusal was logged
}

// serveNotReady serves, on httpAddr ("off" or "" for none), the health endpoints of a plugin that is alive but
// serves no KMS: /livez answers ok, so the kubelet does not restart it; /readyz and /healthz answer 503 with reason.
func serveNotReady(httpAddr, reason string, log *slog.Logger) (stop func(), err error) {
	if httpAddr == "off" || httpAddr == "" {
		return func() {}, nil
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /livez", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	notReady := func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, reason+"\n")
	}
	mux.HandleFunc("GET /readyz", notReady)
	mux.HandleFunc("GET /healthz", notReady)
	return serveHTTP(httpAddr, mux, log)
}

// serveHTTP serves h on addr until the returned function is called.
func serveHTTP(addr string, h http.Handler, log *slog.Logger) (stop func(), err error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--http-addr: %w", err)
	}
	if ap, ok := l.Addr().(*net.TCPAddr); ok && !ap.IP.IsLoopback() {
		log.Warn("the HTTP health endpoints listen beyond loopback", "address", l.Addr().String())
	}
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go hs.Serve(l)
	log.Info("serving HTTP health endpoints", "address", "http://"+l.Addr().String())
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		hs.Shutdown(ctx)
	}, nil
}

func (m modeValue) fileMode() os.FileMode { return os.FileMode(m) }

func runInit(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var o options
	fs := newFlagSet("init", stderr)
	o.register(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := o.setup(stderr); err != nil {
		return err
	}
	if exists, err := o.keyringExists(); err != nil {
		return err
	} else if exists {
		return fmt.Errorf("%s is already initialised (%s exists); refusing to overwrite it", o.stateDir, o.keyringPath())
	}
	o.devKeyAllowed, o.createKeyring = true, true
	p, env, _, err := o.open(ctx)
	if err != nil {
		return err
	}
	defer p.Close()
	fmt.Fprintf(stdout, "initialised %s\nprovider: %s\nkey_id: %s\n", o.stateDir, p.Name(), env.KeyID())
	return nil
}

// keyringCommand parses the shared flags of a command that changes an initialised keyring, opens the root of trust
// and the Envelope, and runs change on them.
func keyringCommand(ctx context.Context, name string, args []string, stderr io.Writer, change func([]string, kleidi.Provider, *kleidi.Envelope) error) error {
	return keyringCommandFlags(ctx, name, args, stderr, nil, change)
}

// keyringCommandFlags is keyringCommand with flags of the command's own, which extra registers.
func keyringCommandFlags(ctx context.Context, name string, args []string, stderr io.Writer, extra func(*flag.FlagSet),
	change func([]string, kleidi.Provider, *kleidi.Envelope) error) error {
	var o options
	fs := newFlagSet(name, stderr)
	o.register(fs)
	if extra != nil {
		extra(fs)
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := o.setup(stderr); err != nil {
		return err
	}
	p, env, _, err := o.open(ctx)
	if err != nil {
		return err
	}
	defer p.Close()
	return change(fs.Args(), p, env)
}

func runRotate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var stage bool
	flags := func(fs *flag.FlagSet) {
		fs.BoolVar(&stage, "stage", false, "only stage the new KEK: wrap it for every member without making it active; "+
			"activate it on every node once each holds it (kleidi-server activate KEY_ID)")
	}
	return keyringCommandFlags(ctx, "rotate", args, stderr, flags, func(_ []string, _ kleidi.Provider, env *kleidi.Envelope) error {
		old := env.KeyID()
		if stage {
			id, err := env.Stage(ctx)
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "staged_key_id: %s\nkey_id: %s\n", id, old)
			return nil
		}
		id, err := env.Rotate(ctx)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "key_id: %s\nprevious_key_id: %s\n", id, old)
		return nil
	})
}

func runRewrap(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var o options
	fs := newFlagSet("rewrap", stderr)
	o.register(fs)
	fromPCRs := fs.String("from-tpm-pcrs", "", "the `PCRs` the KEKs are sealed to now, when they differ from --tpm-pcrs (\"\" for none)")
	fromAuth := fs.String("from-tpm-auth-file", "", "`file` of the auth value the KEKs are sealed with now, when it differs from --tpm-auth-file")
	fromGPG := fs.String("from-gpg-private-key", "", "OpenPGP private key `file` that unwraps the KEKs now, to move them to another root "+
		"(--provider tpm): its copies stay beside the new ones")
	fromGPGPass := fs.String("from-gpg-passphrase-file", "", "`file` holding the passphrase of --from-gpg-private-key")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := o.setup(stderr); err != nil {
		return err
	}
	if exists, err := o.keyringExists(); err != nil {
		return fmt.Errorf("state directory: %w", err)
	} else if !exists {
		return fmt.Errorf("no keyring in %s: run kleidi-server init first", o.stateDir)
	}
	to, err := o.openProvider(ctx)
	if err != nil {
		return err
	}
	defer to.Close()
	from := to
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if *fromGPG != "" {
		if from, err = gpg.New(gpg.Config{PrivateKeyFile: *fromGPG, PassphraseFile: *fromGPGPass}); err != nil {
			return fmt.Errorf("--from-gpg-private-key: %w", err)
		}
		defer from.Close()
	} else if set["from-tpm-pcrs"] || set["from-tpm-auth-file"] {
		old := o
		if set["from-tpm-pcrs"] {
			old.tpmPCRs = *fromPCRs
		}
		if set["from-tpm-auth-file"] {
			old.tpmAuthFile = *fromAuth
		}
		if from, err = old.openProvider(ctx); err != nil {
			return fmt.Errorf("the current configuration (--from-tpm-*): %w", err)
		}
		defer from.Close()
	}
	ring := kleidi.NewFileKeyring(o.keyringPath())
	if err := refuseRemovedRecipients(ctx, ring, to); err != nil {
		return err
	}
	if err := kleidi.Rewrap(ctx, ring, from, to); err != nil {
		return err
	}
	loaded, err := ring.Load(ctx)
	records := loaded.Keys
	if err != nil {
		return err
	}
	for _, r := range records {
		if r.State == kleidi.KeyActive {
			fmt.Fprintf(stdout, "rewrapped %d KEKs for %s\nkey_id: %s\n", len(records), to.Name(), r.ID)
		}
	}
	return nil
}

// refuseRemovedRecipients refuses a rewrap that would drop an OpenPGP recipient: every ciphertext stored so far
// carries a copy wrapped to it, so dropping it revokes nothing.
func refuseRemovedRecipients(ctx context.Context, ring kleidi.Keyring, to kleidi.Provider) error {
	p, ok := to.(*gpg.Provider)
	if !ok {
		return nil
	}
	loaded, err := ring.Load(ctx)
	records := loaded.Keys
	if err != nil {
		return err
	}
	for _, r := range records {
		for _, w := range r.Wrapped {
			if w.Root != p.Name() {
				continue
			}
			if err := p.CheckRecipients(w.Blob); err != nil && !errors.Is(err, gpg.ErrRecipientRemoved) {
				return fmt.Errorf("key %s: %w", r.ID, err)
			} else if err != nil {
				return fmt.Errorf("key %s: %w. Rewrapping would revoke nothing: every Secret stored so far carries a copy "+
					"for the removed key. To remove a recipient, rotate with the remaining recipients (kleidi-server rotate with the "+
					"new --gpg-public-key list) and re-encrypt every Secret (kubectl get secrets -A -o json | kubectl replace -f -)", r.ID, err)
			}
		}
	}
	return nil
}

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("status", stderr)
	listen := fs.String("listen", defaultListen(), "the plugin's `socket`, as unix:///path/kms.sock")
	wait := fs.Duration("wait", 0, "wait up to this `duration` for a plugin to answer healthy (for one that is starting)")
	timeout := fs.Duration("timeout", 5*time.Second, "`duration` the Status call may take once connected")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := client.Dial(*listen)
	if err != nil {
		return err
	}
	defer c.Close()
	var st client.Status
	if *wait > 0 {
		wctx, cancel := context.WithTimeout(ctx, *wait)
		st, err = c.WaitHealthy(wctx)
		cancel()
	} else {
		tctx, cancel := context.WithTimeout(ctx, *timeout)
		st, err = c.Status(tctx)
		cancel()
	}
	if err != nil && !errors.Is(err, client.ErrUnhealthy) {
		return err
	}
	fmt.Fprintf(stdout, "version: %s\nhealthz: %s\nkey_id: %s\n", st.Version, st.Healthz, st.KeyID)
	if !st.Healthy() {
		fmt.Fprintf(stderr, "kleidi-server status: unhealthy: %s\n", st.Healthz)
		return errUnhealthy
	}
	return nil
}

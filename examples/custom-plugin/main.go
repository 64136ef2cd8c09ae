// Command custom-plugin is a Kubernetes KMS v2 plugin built on kleidi whose root of trust is an AES-256 key in a
// file: a stand-in for an HSM or a cloud KMS. It serves KMS v2 on a unix socket, with Prometheus metrics, an audit
// log and health endpoints, and stops gracefully on SIGTERM.
//
//	custom-plugin --key /etc/custom-plugin/root.key --state-dir /var/lib/custom-plugin \
//		--listen unix:///run/custom-plugin/kms.sock --audit-log /var/log/custom-plugin/audit.log
//
// Everything but the root of trust (filekey.go) is kleidi's: the Envelope, the keyring, the server and its wiring.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/audit"
	"github.com/kleidi-kms/kleidi/metrics"
	"github.com/kleidi-kms/kleidi/server"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "custom-plugin:", err)
		os.Exit(1)
	}
}

// run serves the plugin until ctx ends.
func run(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("custom-plugin", flag.ContinueOnError)
	fs.SetOutput(stderr)
	keyFile := fs.String("key", "", "`file` of the 32-byte root key; created, mode 0600, if it does not exist")
	stateDir := fs.String("state-dir", "", "`directory` of the keyring (keyring.json)")
	listen := fs.String("listen", "unix:///tmp/custom-plugin/kms.sock", "unix `socket` to serve KMS v2 on")
	httpAddr := fs.String("http-addr", "127.0.0.1:8788", "`host:port` of /livez, /readyz, /healthz and /metrics")
	auditLog := fs.String("audit-log", "", "`file` to append the audit log to (default: none)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *keyFile == "" || *stateDir == "" {
		return fmt.Errorf("--key and --state-dir are needed")
	}
	p, err := openFileKey(*keyFile)
	if err != nil {
		return err
	}
	defer p.Close()
	m, err := metrics.New()
	if err != nil {
		return err
	}
	defer m.Shutdown(context.Background())
	cfg := server.Config{Logger: slog.New(slog.NewJSONHandler(stderr, nil)), Metrics: m}
	if *auditLog != "" {
		if cfg.Audit, err = audit.OpenFile(*auditLog); err != nil {
			return err
		}
		defer cfg.Audit.Close()
	}
	if err := os.MkdirAll(*stateDir, 0o700); err != nil {
		return err
	}
	ring := kleidi.NewFileKeyring(filepath.Join(*stateDir, "keyring.json"))
	srv, err := server.New(ctx, p, ring, cfg, kleidi.WithCreateIfEmpty())
	if err != nil {
		return err
	}
	defer srv.Close()
	l, err := net.Listen("tcp", *httpAddr)
	if err != nil {
		return err
	}
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 5 * time.Second}
	go hs.Serve(l)
	defer hs.Close()
	return srv.ListenAndServe(ctx, *listen)
}

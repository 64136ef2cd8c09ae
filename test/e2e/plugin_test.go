package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"
)

// The plugin runs as pluginUID; otherUID is an unrelated non-root user that must
// not reach its socket.
const (
	pluginUID = 64531
	otherUID  = 64532
)

// plugin is one kleidi-server, run as a non-root uid when the test runs as root.
type plugin struct {
	bin           string
	provider      string // gpg | tpm | pkcs11 | awskms
	dir           string // everything of this plugin: state, socket, logs
	stateDir      string
	sockDir       string
	sock          string
	httpAddr      string
	providerFlags []string
	env           []string // added to the environment of every kleidi-server process that opens the root
	uid           int      // -1: run as the test's own uid
	procs         *procs
	proc          *proc
}

func newPlugin(t testing.TB, ps *procs, dir, provider string, providerFlags []string) *plugin {
	t.Helper()
	p := &plugin{
		bin:           kleidiServer(t),
		provider:      provider,
		dir:           dir,
		stateDir:      filepath.Join(dir, "state"),
		sockDir:       filepath.Join(dir, "run"),
		httpAddr:      fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		providerFlags: providerFlags,
		uid:           -1,
		procs:         ps,
	}
	p.sock = filepath.Join(p.sockDir, "kms.sock")
	if os.Geteuid() == 0 {
		requireTool(t, "setpriv", "util-linux")
		p.uid = pluginUID
	}
	for _, d := range []string{p.dir, p.stateDir, p.sockDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		p.chown(t, d)
	}
	return p
}

func (p *plugin) chown(t testing.TB, path string) {
	t.Helper()
	if p.uid < 0 {
		return
	}
	if err := os.Chown(path, p.uid, p.uid); err != nil {
		t.Fatal(err)
	}
}

// as prefixes argv so that it runs as uid (with no supplementary groups), or
// unchanged for uid -1.
func as(uid int, argv ...string) []string {
	if uid < 0 {
		return argv
	}
	u := strconv.Itoa(uid)
	return append([]string{"setpriv", "--reuid=" + u, "--regid=" + u, "--clear-groups", "--pdeathsig=KILL", "--"}, argv...)
}

func (p *plugin) commonFlags() []string {
	return append([]string{"--state-dir=" + p.stateDir, "--provider=" + p.provider}, p.providerFlags...)
}

func (p *plugin) endpoint() string { return "unix://" + p.sock }

// cli runs a kleidi-server subcommand as the plugin's uid and fails the test on error.
func (p *plugin) cli(t testing.TB, args ...string) string {
	t.Helper()
	return mustRun(t, p.env, as(p.uid, append([]string{p.bin}, args...)...)...)
}

// start runs kleidi-server serve and waits until its Status is healthy.
func (p *plugin) start(t testing.TB) {
	t.Helper()
	args := append([]string{p.bin, "serve",
		"--listen=" + p.endpoint(),
		"--http-addr=" + p.httpAddr,
		"--socket-mode=0600",
		"--audit-log=" + filepath.Join(p.dir, "audit.log"),
		"--log-format=text",
	}, p.commonFlags()...)
	p.proc = p.procs.start(t, "kleidi-server", filepath.Join(p.dir, "kleidi-server.log"), p.env, as(p.uid, args...)...)
	p.waitHealthy(t, 30*time.Second)
}

func (p *plugin) waitHealthy(t testing.TB, timeout time.Duration) {
	t.Helper()
	eventually(t, timeout, 100*time.Millisecond, "kleidi-server healthy", func() error {
		if p.proc != nil && p.proc.exited() {
			t.Fatalf("kleidi-server exited: %v\n%s", p.proc.waitErr, tail(p.proc.logPath, 30))
		}
		st, err := p.status()
		if err != nil {
			return err
		}
		if st.Healthz != "ok" {
			return fmt.Errorf("healthz %q", st.Healthz)
		}
		return nil
	})
}

func (p *plugin) dial() (kmsapi.KeyManagementServiceClient, func(), error) {
	conn, err := grpc.NewClient("unix:"+p.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, err
	}
	return kmsapi.NewKeyManagementServiceClient(conn), func() { conn.Close() }, nil
}

// status calls the KMS v2 Status RPC on the plugin's socket, as the test's uid.
func (p *plugin) status() (*kmsapi.StatusResponse, error) {
	client, closeFn, err := p.dial()
	if err != nil {
		return nil, err
	}
	defer closeFn()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	return client.Status(ctx, &kmsapi.StatusRequest{})
}

func (p *plugin) keyID(t testing.TB) string {
	t.Helper()
	st, err := p.status()
	if err != nil {
		t.Fatalf("plugin Status: %v", err)
	}
	if st.Healthz != "ok" || st.KeyId == "" {
		t.Fatalf("plugin Status: healthz %q key_id %q", st.Healthz, st.KeyId)
	}
	return st.KeyId
}

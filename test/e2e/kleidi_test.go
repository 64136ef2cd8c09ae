package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protowire"
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

// swtpm is a software TPM 2.0 process. It listens on a unix socket rather than
// TCP: killing swtpm leaves its TCP server port in TIME_WAIT for a minute, so a
// restarted swtpm could not bind the port the running plugin is configured
// with; a unix socket path is free again at once.
type swtpm struct {
	dir   string
	uid   int // owner of the sockets, -1 for the test's own uid
	procs *procs
	proc  *proc
}

func startSwtpm(t testing.TB, ps *procs, dir string, uid int) *swtpm {
	t.Helper()
	requireTool(t, "swtpm", "swtpm swtpm-tools")
	s := &swtpm{dir: dir, uid: uid, procs: ps}
	if err := os.MkdirAll(filepath.Join(dir, "tpmstate"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	s.start(t)
	return s
}

func (s *swtpm) sock() string { return filepath.Join(s.dir, "tpm.sock") }

func (s *swtpm) addr() string { return "unix://" + s.sock() }

func (s *swtpm) start(t testing.TB) {
	t.Helper()
	owner := ",mode=0600"
	if s.uid >= 0 {
		owner += fmt.Sprintf(",uid=%d,gid=%d", s.uid, s.uid)
	}
	s.proc = s.procs.start(t, "swtpm", filepath.Join(s.dir, "swtpm.log"), nil,
		"swtpm", "socket", "--tpm2",
		"--tpmstate", "dir="+filepath.Join(s.dir, "tpmstate"),
		"--server", "type=unixio,path="+s.sock()+owner,
		"--ctrl", "type=unixio,path="+filepath.Join(s.dir, "ctrl.sock")+",mode=0600",
		"--flags", "not-need-init,startup-clear",
	)
	eventually(t, 15*time.Second, 50*time.Millisecond, "swtpm listening", func() error {
		if s.proc.exited() {
			t.Fatalf("swtpm exited: %v\n%s", s.proc.waitErr, tail(s.proc.logPath, 20))
		}
		conn, err := net.DialTimeout("unix", s.sock(), time.Second)
		if err != nil {
			return err
		}
		return conn.Close()
	})
}

// gpgKey makes an OpenPGP key pair with GnuPG, outside any kleidi state
// directory, and returns the armored public and private key files and the
// passphrase file, readable by uid.
func gpgKey(t testing.TB, dir string, uid int) (pub, priv, pass string) {
	t.Helper()
	requireTool(t, "gpg", "gnupg")
	home := filepath.Join(dir, "gnupg")
	if err := os.MkdirAll(home, 0o700); err != nil {
		t.Fatal(err)
	}
	pass = filepath.Join(dir, "passphrase")
	writeFile(t, pass, "e2e-"+randHex(t, 12)+"\n", 0o600)
	gpg := []string{"gpg", "--homedir", home, "--batch", "--no-tty", "--pinentry-mode", "loopback", "--passphrase-file", pass}
	defer func() {
		// gpg starts an agent for the home directory; it must not outlive the test.
		_, _ = run(context.Background(), nil, "gpgconf", "--homedir", home, "--kill", "all")
	}()
	email := "e2e@kleidi.invalid"
	mustRun(t, nil, append(gpg, "--quick-generate-key", "kleidi e2e <"+email+">", "future-default", "default", "never")...)
	pub = filepath.Join(dir, "public.asc")
	priv = filepath.Join(dir, "private.asc")
	writeFile(t, pub, mustRun(t, nil, append(gpg, "--armor", "--export", email)...), 0o644)
	writeFile(t, priv, mustRun(t, nil, append(gpg, "--armor", "--export-secret-keys", email)...), 0o600)
	for _, f := range []string{pub, priv, pass} {
		if uid >= 0 {
			if err := os.Chown(f, uid, uid); err != nil {
				t.Fatal(err)
			}
		}
	}
	return pub, priv, pass
}

// encryptedObject is the part of k8s.io/apiserver's kmsv2 EncryptedObject the
// tests look at, parsed from the bytes after the k8s:enc:kms:v2:<name>: prefix.
type encryptedObject struct {
	encryptedData      []byte
	keyID              string
	encryptedDEKSource []byte
	annotations        map[string][]byte
	dekSourceType      uint64
	// offsets of the field values in the raw bytes (including the prefix)
	dataOff, dekOff int
}

const kmsPrefix = "k8s:enc:kms:v2:kleidi:"

func parseEncryptedObject(raw []byte) (*encryptedObject, error) {
	if !strings.HasPrefix(string(raw), kmsPrefix) {
		return nil, fmt.Errorf("no %q prefix: %q", kmsPrefix, raw[:min(len(raw), 40)])
	}
	b := raw[len(kmsPrefix):]
	off := len(kmsPrefix)
	o := &encryptedObject{annotations: map[string][]byte{}}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, protowire.ParseError(n)
		}
		b, off = b[n:], off+n
		switch {
		case typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return nil, protowire.ParseError(m)
			}
			valOff := off + m - len(v)
			switch num {
			case 1:
				o.encryptedData, o.dataOff = v, valOff
			case 2:
				o.keyID = string(v)
			case 3:
				o.encryptedDEKSource, o.dekOff = v, valOff
			case 4:
				k, val, err := parseMapEntry(v)
				if err != nil {
					return nil, err
				}
				o.annotations[k] = val
			}
			b, off = b[m:], off+m
		case typ == protowire.VarintType:
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return nil, protowire.ParseError(m)
			}
			if num == 5 {
				o.dekSourceType = v
			}
			b, off = b[m:], off+m
		default:
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return nil, protowire.ParseError(m)
			}
			b, off = b[m:], off+m
		}
	}
	if len(o.encryptedData) == 0 || o.keyID == "" || len(o.encryptedDEKSource) == 0 {
		return nil, errors.New("EncryptedObject misses encryptedData, keyID or encryptedDEKSource")
	}
	return o, nil
}

func parseMapEntry(b []byte) (string, []byte, error) {
	var key string
	var val []byte
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || typ != protowire.BytesType {
			return "", nil, errors.New("bad annotations entry")
		}
		b = b[n:]
		v, m := protowire.ConsumeBytes(b)
		if m < 0 {
			return "", nil, protowire.ParseError(m)
		}
		if num == 1 {
			key = string(v)
		} else if num == 2 {
			val = v
		}
		b = b[m:]
	}
	return key, val, nil
}

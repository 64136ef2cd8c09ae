package deploy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestChartColdStart renders the chart's DaemonSet with its defaults and runs its container the way the kubelet
// would after a cold start of the control plane: kleidi-server with exactly the rendered args and env, every
// volume taken from its source (hostPaths from directories standing for the node's, anything else from the
// Kubernetes API), while a real kube-apiserver holds Secrets that only this kleidi, stopped, can decrypt. The
// plugin must start from host inputs alone, after which the apiserver reads its Secrets again. A volume, env or
// token from the API fails the test: the API cannot serve it until the plugin runs.
func TestChartColdStart(t *testing.T) {
	helm := helmBin(t)
	for _, tool := range []string{"etcd", "etcdctl", "kubectl", "gpg"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found on PATH: install Debian's etcd-server, etcd-client, kubectl, gnupg", tool)
		}
	}
	kas, err := run(t, time.Minute, repoRoot, nil, "bash", "hack/kube-apiserver.sh")
	kas = strings.TrimSpace(kas)
	if err != nil || kas == "" {
		t.Fatalf("hack/kube-apiserver.sh: %v\n%s", err, kas)
	}
	bin := buildStatic(t)
	dir, err := os.MkdirTemp("", "kleidi-coldstart-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	asPlugin := os.Geteuid() == 0
	host := func(p string) string { return filepath.Join(dir, "host", p) }

	// The node's kube-apiserver dials the socket the chart's NOTES print, under the node's directory.
	rendered := mustRun(t, "", helm, "template", "kleidi", chartDir, "--namespace", "kube-system",
		"--show-only", "templates/daemonset.yaml")
	c := startColdStartCluster(t, dir, kas)
	defer c.stopAll()
	sock := host("/var/run/kleidi/kms.sock")
	c.startAPIServer(t, "file://"+sock, "/readyz?exclude=kms-providers") // the plugin is not there yet

	// The rendered DaemonSet as the apiserver stores it (defaults applied), then its pod spec.
	dsFile := filepath.Join(dir, "daemonset.yaml")
	if err := os.WriteFile(dsFile, []byte(rendered), 0o644); err != nil {
		t.Fatal(err)
	}
	var ds struct {
		Spec struct {
			Template struct {
				Spec podSpec `json:"spec"`
			} `json:"template"`
		} `json:"spec"`
	}
	if err := json.Unmarshal([]byte(c.kubectl(t, "create", "--dry-run=server", "-o", "json", "-f", dsFile)), &ds); err != nil {
		t.Fatal(err)
	}
	pod := ds.Spec.Template.Spec
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Errorf("automountServiceAccountToken is not false: the kubelet would fetch a token from the API")
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("want 1 container, got %d", len(pod.Containers))
	}
	ctr := pod.Containers[0]
	for _, e := range ctr.EnvFrom {
		t.Errorf("envFrom %s: the kubelet reads it through the API", e)
	}
	env := []string{"PATH=/usr/bin:/bin", "HOME=" + dir}
	for _, e := range ctr.Env {
		if e.ValueFrom != nil {
			t.Errorf("env %s comes from %s: the kubelet reads it through the API", e.Name, e.ValueFrom)
			continue
		}
		env = append(env, e.Name+"="+e.Value)
	}

	// The node: the directories tmpfiles.d and docs/install.md prepare, and the OpenPGP keys in gpg.hostDir.
	hostPaths := map[string]string{}
	for _, v := range pod.Volumes {
		if v.HostPath == nil {
			continue
		}
		hostPaths[v.Name] = host(v.HostPath.Path)
	}
	mkdir := func(p string, mode os.FileMode, uid, gid int) {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(p, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		if asPlugin {
			if err := os.Chown(p, uid, gid); err != nil {
				t.Fatal(err)
			}
		}
	}
	mkdir(host("/var/run/kleidi"), 0o750, pluginID, pluginID)
	mkdir(host("/var/lib/kleidi"), 0o700, pluginID, pluginID)
	mkdir(host("/etc/kleidi/gpg"), 0o750, 0, pluginID)
	coldStartGPGKey(t, filepath.Join(dir, "gnupg"), host("/etc/kleidi/gpg"), asPlugin)

	// The container's view: each mount path is its volume's source.
	var mounts [][2]string // container path, host path
	for _, m := range ctr.VolumeMounts {
		src, ok := hostPaths[m.Name]
		if !ok {
			vol := "?"
			for _, v := range pod.Volumes {
				if v.Name == m.Name {
					b, _ := json.Marshal(v)
					vol = string(b)
				}
			}
			// What the kubelet would do: read it from the API, which cannot decrypt it without this plugin.
			c.stopPlugin()
			t.Fatalf("volume %s (%s) at %s does not come from the host: the kubelet needs the API for it, and the "+
				"API needs this plugin to read any Secret: a cold start deadlocks", m.Name, vol, m.MountPath)
		}
		mounts = append(mounts, [2]string{m.MountPath, src})
	}
	translate := func(arg string) string {
		for _, m := range mounts {
			for _, sep := range []string{"=", "=unix://"} {
				arg = strings.Replace(arg, sep+m[0], sep+m[1], 1)
			}
		}
		return arg
	}
	var args []string
	for _, a := range append(append([]string{}, ctr.Command...), ctr.Args...) {
		a = translate(a)
		if strings.HasPrefix(a, "--http-addr=") {
			c.pluginHTTP = fmt.Sprintf("127.0.0.1:%d", freePort(t))
			a = "--http-addr=" + c.pluginHTTP // the pod's own network namespace: a free loopback port here
		}
		args = append(args, a)
	}
	if len(args) == 0 || args[0] != "serve" {
		t.Fatalf("container args %q do not start with serve", args)
	}
	t.Logf("kleidi-server %s", strings.Join(args, " "))
	if !strings.Contains(strings.Join(args, " "), "--listen=unix://"+sock) {
		t.Fatalf("the rendered args do not listen on the socket of the host directory %s: %q", sock, args)
	}

	// Once per node, as docs/install.md says: init with the provider flags of serve.
	var initArgs []string
	for _, a := range args[1:] {
		for _, f := range []string{"--state-dir=", "--provider=", "--gpg-", "--tpm"} {
			if strings.HasPrefix(a, f) {
				initArgs = append(initArgs, a)
			}
		}
	}
	if out, err := c.pluginCommand(bin, env, asPlugin, append([]string{"init"}, initArgs...)...).CombinedOutput(); err != nil {
		t.Fatalf("kleidi-server init %q: %v\n%s", initArgs, err, out)
	}

	// Day one: the plugin runs, the apiserver encrypts Secrets with it, among them the Secret the chart used to
	// read its keys from.
	c.startPlugin(t, bin, env, asPlugin, args)
	c.waitAPIServer(t, "/readyz")
	pub := readFile(t, filepath.Join(host("/etc/kleidi/gpg"), "public.asc"))
	c.kubectl(t, "-n", "kube-system", "create", "secret", "generic", "kleidi-gpg", "--from-literal=public.asc="+pub)
	c.kubectl(t, "-n", "kube-system", "create", "secret", "generic", "app", "--from-literal=password=cold-start-test-value")
	raw := c.etcdctl(t, "get", "/registry/secrets/kube-system/kleidi-gpg", "--print-value-only")
	if !strings.HasPrefix(raw, "k8s:enc:kms:v2:kleidi:") {
		t.Fatalf("etcd value of the Secret does not start with k8s:enc:kms:v2:kleidi: %q", raw[:min(len(raw), 40)])
	}

	// The cold start: the plugin is down, the apiserver restarts (its DEK cache is gone) and can read no Secret.
	c.stopPlugin()
	c.stopAPIServer()
	c.startAPIServer(t, "", "/livez?exclude=kms-providers") // readyz waits for Secrets it cannot read
	if out, err := c.kubectlErr("-n", "kube-system", "get", "secret", "kleidi-gpg"); err == nil {
		t.Fatalf("the apiserver read a Secret with its plugin down:\n%s", out)
	} else {
		t.Logf("plugin down, the apiserver cannot read Secret kleidi-gpg: %s", lastLine(strings.TrimSpace(out)))
	}

	// The kubelet starts the pod from the node's disk alone: the plugin serves, and the apiserver reads again.
	c.startPlugin(t, bin, env, asPlugin, args)
	deadline := time.Now().Add(90 * time.Second)
	for {
		out, err := c.kubectlErr("-n", "kube-system", "get", "secret", "app", "-o", "jsonpath={.data.password}")
		if err == nil && strings.TrimSpace(out) != "" {
			t.Logf("after the cold start, the apiserver reads Secret app through the plugin")
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the apiserver cannot read Secret app 90 s after the plugin started: %v\n%s", err, out)
		}
		time.Sleep(time.Second)
	}
}

// podSpec is the part of a pod spec the cold-start test reads.
type podSpec struct {
	AutomountServiceAccountToken *bool `json:"automountServiceAccountToken"`
	Containers                   []struct {
		Command, Args []string
		Env           []struct {
			Name      string          `json:"name"`
			Value     string          `json:"value"`
			ValueFrom json.RawMessage `json:"valueFrom"`
		} `json:"env"`
		EnvFrom      []json.RawMessage `json:"envFrom"`
		VolumeMounts []struct {
			Name      string `json:"name"`
			MountPath string `json:"mountPath"`
		} `json:"volumeMounts"`
	} `json:"containers"`
	Volumes []struct {
		Name     string `json:"name"`
		HostPath *struct {
			Path string `json:"path"`
		} `json:"hostPath,omitempty"`
		Secret    json.RawMessage `json:"secret,omitempty"`
		ConfigMap json.RawMessage `json:"configMap,omitempty"`
		Projected json.RawMessage `json:"projected,omitempty"`
	} `json:"volumes"`
}

// coldStartCluster is an etcd, a kube-apiserver and the kleidi-server under test, all on loopback.
type coldStartCluster struct {
	dir, kas, etcdURL, apiURL, token, pluginHTTP string
	etcd, apiserver, plugin                      *exec.Cmd
	pluginLog                                    bytes.Buffer
	starts                                       int
}

func startColdStartCluster(t *testing.T, dir, kas string) *coldStartCluster {
	t.Helper()
	c := &coldStartCluster{dir: dir, kas: kas, token: "coldstart-" + fmt.Sprint(time.Now().UnixNano())}
	client, peer := freePort(t), freePort(t)
	c.etcdURL = fmt.Sprintf("http://127.0.0.1:%d", client)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peer)
	c.etcd = c.start(t, "etcd", "etcd", "--name=coldstart", "--data-dir="+filepath.Join(dir, "etcd-data"),
		"--listen-client-urls="+c.etcdURL, "--advertise-client-urls="+c.etcdURL, "--listen-peer-urls="+peerURL,
		"--initial-advertise-peer-urls="+peerURL, "--initial-cluster=coldstart="+peerURL, "--log-level=warn")
	c.waitHTTP(t, c.etcdURL+"/health", 30*time.Second)
	return c
}

func (c *coldStartCluster) start(t *testing.T, name, bin string, args ...string) *exec.Cmd {
	t.Helper()
	logf, err := os.Create(filepath.Join(c.dir, name+".log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("%s log (last 2000 bytes):\n%s", name, b[max(0, len(b)-2000):])
		}
	})
	return cmd
}

func stopProc(cmd *exec.Cmd) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

func (c *coldStartCluster) stopAll() {
	c.stopPlugin()
	c.stopAPIServer()
	stopProc(c.etcd)
}

func (c *coldStartCluster) stopPlugin()    { stopProc(c.plugin); c.plugin = nil }
func (c *coldStartCluster) stopAPIServer() { stopProc(c.apiserver); c.apiserver = nil }

// startAPIServer starts kube-apiserver with the kleidi provider on endpoint (the first time; later starts keep
// the configuration) and waits until it answers path.
func (c *coldStartCluster) startAPIServer(t *testing.T, endpoint, path string) {
	t.Helper()
	enc := filepath.Join(c.dir, "encryption-config.yaml")
	if endpoint != "" {
		sock := strings.TrimPrefix(endpoint, "file://")
		cfg := "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [\"secrets\"]\n" +
			"    providers:\n      - kms: {apiVersion: v2, name: kleidi, endpoint: unix://" + sock + ", timeout: 3s}\n      - identity: {}\n"
		tokens := filepath.Join(c.dir, "tokens.csv")
		saKey := filepath.Join(c.dir, "sa.key")
		for path, text := range map[string]string{enc: cfg, tokens: c.token + ",admin,admin,system:masters\n"} {
			if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		mustRun(t, "", "openssl", "genrsa", "-out", saKey, "2048")
		c.apiURL = fmt.Sprintf("https://127.0.0.1:%d", freePort(t))
	}
	port := strings.TrimPrefix(c.apiURL, "https://127.0.0.1:")
	c.starts++
	c.apiserver = c.start(t, fmt.Sprintf("kube-apiserver-%d", c.starts), c.kas, "--etcd-servers="+c.etcdURL, "--secure-port="+port,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none",
		"--cert-dir="+filepath.Join(c.dir, "apiserver-certs"), "--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+filepath.Join(c.dir, "sa.key"), "--service-account-signing-key-file="+filepath.Join(c.dir, "sa.key"),
		"--token-auth-file="+filepath.Join(c.dir, "tokens.csv"), "--authorization-mode=RBAC",
		"--service-cluster-ip-range=10.96.0.0/24", "--encryption-provider-config="+enc, "--profiling=false")
	c.waitAPIServer(t, path)
}

// waitAPIServer waits until the apiserver answers path with 200.
func (c *coldStartCluster) waitAPIServer(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if _, err := c.kubectlErr("get", "--raw", path); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("kube-apiserver not ready (%s) within 2 minutes", path)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func (c *coldStartCluster) kubectlErr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "kubectl", append([]string{"--server=" + c.apiURL, "--token=" + c.token,
		"--insecure-skip-tls-verify=true", "--request-timeout=10s"}, args...)...)
	cmd.Env = append(os.Environ(), "KUBECONFIG=/dev/null")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (c *coldStartCluster) kubectl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := c.kubectlErr(args...)
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", args[0], err, out) // never the other args: they may hold a Secret's data
	}
	return out
}

func (c *coldStartCluster) etcdctl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := run(t, 30*time.Second, "", []string{"ETCDCTL_API=3"}, "etcdctl", append([]string{"--endpoints=" + c.etcdURL}, args...)...)
	if err != nil {
		t.Fatalf("etcdctl %s: %v", strings.Join(args, " "), err)
	}
	return out
}

func (c *coldStartCluster) waitHTTP(t *testing.T, url string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not ready within %s: %v", url, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// pluginCommand runs kleidi-server as the chart's uid and gid (when the test is root), with env only.
func (c *coldStartCluster) pluginCommand(bin string, env []string, asPlugin bool, args ...string) *exec.Cmd {
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	if asPlugin {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: pluginID, Gid: pluginID, Groups: []uint32{}}}
	}
	return cmd
}

// startPlugin starts kleidi-server with args and env and waits until /readyz answers 200.
func (c *coldStartCluster) startPlugin(t *testing.T, bin string, env []string, asPlugin bool, args []string) {
	t.Helper()
	c.pluginLog.Reset()
	c.plugin = c.pluginCommand(bin, env, asPlugin, args...)
	c.plugin.Stdout, c.plugin.Stderr = &c.pluginLog, &c.pluginLog
	if err := c.plugin.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if code, _, err := httpGet(c.pluginHTTP, "/readyz"); err == nil && code == http.StatusOK {
			return
		}
		if c.plugin.ProcessState != nil || time.Now().After(deadline) {
			c.stopPlugin()
			t.Fatalf("kleidi-server from the rendered pod spec not ready within 30 s:\n%s", c.pluginLog.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// coldStartGPGKey writes an OpenPGP key pair protected by a passphrase into keyDir as the chart's default
// gpg.hostDir holds them: public.asc, private.asc and passphrase, root's, readable by the plugin's group only.
func coldStartGPGKey(t *testing.T, home, keyDir string, asPlugin bool) {
	t.Helper()
	if err := os.Mkdir(home, 0o700); err != nil {
		t.Fatal(err)
	}
	pass := filepath.Join(keyDir, "passphrase")
	if err := os.WriteFile(pass, []byte("cold-start-test-passphrase\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	gpg := []string{"--homedir", home, "--batch", "--no-tty", "--pinentry-mode", "loopback", "--passphrase-file", pass}
	t.Cleanup(func() { run(t, time.Minute, "", nil, "gpgconf", "--homedir", home, "--kill", "all") })
	email := "coldstart@kleidi.invalid"
	mustRun(t, "", "gpg", append(gpg, "--quick-generate-key", "kleidi cold start test <"+email+">", "future-default", "default", "never")...)
	for name, args := range map[string][]string{"public.asc": {"--armor", "--export", email}, "private.asc": {"--armor", "--export-secret-keys", email}} {
		out, err := exec.Command("gpg", append(gpg, args...)...).Output()
		if err != nil || len(out) == 0 {
			t.Fatalf("gpg %v: %v", args, err)
		}
		if err := os.WriteFile(filepath.Join(keyDir, name), out, 0o400); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"public.asc", "private.asc", "passphrase"} {
		p := filepath.Join(keyDir, f)
		if err := os.Chmod(p, 0o440); err != nil {
			t.Fatal(err)
		}
		if asPlugin {
			if err := os.Chown(p, 0, pluginID); err != nil {
				t.Fatal(err)
			}
		}
	}
}

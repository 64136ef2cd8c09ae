package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kmsapi "k8s.io/kms/apis/v2"
)

func TestKleidiGPG(t *testing.T) { runScenarios(t, "gpg") }

func TestKleidiTPM(t *testing.T) { runScenarios(t, "tpm") }

func TestKleidiPKCS11(t *testing.T) { runScenarios(t, "pkcs11") }

func TestKleidiAWSKMS(t *testing.T) { runScenarios(t, "awskms") }

// env is one control plane (etcd, kube-apiserver, kleidi-server and the root of
// trust's own process or files: swtpm, a SoftHSM token, local-kms) shared by the
// scenarios of one provider, run in order.
type env struct {
	provider string
	dir      string
	procs    *procs
	tpm      *swtpm
	hsm      *softHSM
	kms      *localKMS
	plugin   *plugin
	c        *cluster
	ns       string
	want     map[string]map[string]string // Secret name -> data
	// secrets are what unlocks the root of trust (passphrase, PIN, access key):
	// no log of the plugin may hold one.
	secrets [][]byte
	next    int
}

func encryptionConfig(sock string) string {
	return `apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: ["secrets"]
    providers:
      - kms:
          apiVersion: v2
          name: kleidi
          endpoint: unix://` + sock + `
          timeout: 3s
      - identity: {}
`
}

func runScenarios(t *testing.T, provider string) {
	suiteStart := time.Now()
	var times []string
	defer func() {
		times = append(times, fmt.Sprintf("total (%s provider): %s", provider, time.Since(suiteStart).Round(time.Millisecond)))
		t.Logf("wall times:\n  %s", strings.Join(times, "\n  "))
	}()

	e := &env{provider: provider, ns: "e2e", want: map[string]map[string]string{}}
	e.dir = workDir(t, "kleidi-e2e-")
	e.procs = newProcs(t)
	setup := time.Now()
	e.setup(t)
	times = append(times, fmt.Sprintf("setup: %s", time.Since(setup).Round(time.Millisecond)))

	scenarios := []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"1_encrypted_at_rest", e.encryptedAtRest},
		{"2_plugin_kill9_restart", e.pluginKillRestart},
		{"3_apiserver_restart", e.apiserverRestart},
		{"4_rotation_and_reencryption", e.rotation},
		{"5_keyring_lost_root_kept", e.keyringLost},
		{"6_non_root_socket", e.nonRoot},
		{"7_tampered_etcd_value", e.tampered},
	}
	// Each root of trust that can go away here goes away once, and comes back.
	outage := map[string]string{"tpm": "8_tpm_outage", "pkcs11": "8_pkcs11_token_away", "awskms": "8_awskms_outage"}
	if name, ok := outage[provider]; ok {
		scenarios = append(scenarios, struct {
			name string
			fn   func(t *testing.T)
		}{name, e.rootOutage})
	}
	for _, s := range scenarios {
		start := time.Now()
		ok := t.Run(s.name, func(t *testing.T) {
			defer func() { t.Logf("%s wall time: %s", s.name, time.Since(start).Round(time.Millisecond)) }()
			s.fn(t)
		})
		times = append(times, fmt.Sprintf("%s: %s", s.name, time.Since(start).Round(time.Millisecond)))
		if !ok {
			t.Fatalf("scenario %s failed; the later ones depend on its state and are not run", s.name)
		}
	}
	e.noSecretInLogs(t)
}

// noSecretInLogs checks that no log the plugin wrote over every scenario (its
// output and its audit log, errors and outages included) holds a secret of its
// root of trust.
func (e *env) noSecretInLogs(t testing.TB) {
	t.Helper()
	logs, err := filepath.Glob(filepath.Join(e.plugin.dir, "*.log"))
	if err != nil || len(logs) < 2 {
		t.Fatalf("plugin logs in %s: %v %v, want the output and the audit log", e.plugin.dir, logs, err)
	}
	for _, path := range logs {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for i, secret := range e.secrets {
			if len(secret) > 0 && bytes.Contains(b, secret) {
				t.Errorf("%s holds secret %d of the %s root of trust", path, i, e.provider)
			}
		}
	}
}

// readSecret returns the content of a secret file without its trailing newline.
func readSecret(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.TrimRight(b, "\n")
}

func (e *env) setup(t testing.TB) {
	var flags, env []string
	switch e.provider {
	case "gpg":
		// The key lives outside the state directory so that scenario 5 can lose
		// the keyring and keep the root of trust.
		keys := filepath.Join(e.dir, "gpg-key")
		if err := os.MkdirAll(keys, 0o700); err != nil {
			t.Fatal(err)
		}
		uid := -1
		if os.Geteuid() == 0 {
			uid = pluginUID
			if err := os.Chown(keys, uid, uid); err != nil {
				t.Fatal(err)
			}
		}
		start := time.Now()
		pub, priv, pass := gpgKey(t, keys, uid)
		t.Logf("OpenPGP key made with gpg in %s", time.Since(start).Round(time.Millisecond))
		flags = []string{"--gpg-public-key=" + pub, "--gpg-private-key=" + priv, "--gpg-passphrase-file=" + pass}
		e.secrets = append(e.secrets, readSecret(t, pass))
	case "tpm":
		uid := -1
		if os.Geteuid() == 0 {
			uid = pluginUID
		}
		e.tpm = startSwtpm(t, e.procs, filepath.Join(e.dir, "swtpm"), uid)
		flags = []string{"--tpm=" + e.tpm.addr(), "--tpm-pcrs=7"}
	case "pkcs11":
		uid := -1
		if os.Geteuid() == 0 {
			uid = pluginUID
		}
		start := time.Now()
		// The token lives outside the state directory so that scenario 5 can lose
		// the keyring and keep the root of trust.
		e.hsm = newSoftHSM(t, filepath.Join(e.dir, "softhsm"), "kleidi-e2e", uid)
		t.Logf("SoftHSM token initialised in %s", time.Since(start).Round(time.Millisecond))
		flags, env = e.hsm.flags("kleidi-e2e", "kleidi"), e.hsm.env()
		e.secrets = append(e.secrets, readSecret(t, e.hsm.pin))
	case "awskms":
		e.kms = startLocalKMS(t, e.procs, filepath.Join(e.dir, "local-kms"))
		flags, env = awsKMSPlugin(t, e.kms)
		e.secrets = append(e.secrets, []byte(localKMSSecretKey))
	default:
		t.Fatalf("no end-to-end setup for provider %q", e.provider)
	}
	e.plugin = newPlugin(t, e.procs, filepath.Join(e.dir, "kleidi"), e.provider, flags)
	e.plugin.env = env
	start := time.Now()
	e.plugin.cli(t, append([]string{"init"}, e.plugin.commonFlags()...)...)
	t.Logf("kleidi-server init in %s", time.Since(start).Round(time.Millisecond))
	e.plugin.start(t)
	e.c = startCluster(t, e.procs, e.dir, encryptionConfig(e.plugin.sock))
	e.c.ensureNamespace(t, e.ns)
}

// addSecret creates a new Secret with random values and remembers them.
func (e *env) addSecret(t testing.TB) string {
	t.Helper()
	name := fmt.Sprintf("s%02d", e.next)
	e.next++
	data := map[string]string{
		"password": "pw-" + randHex(t, 16),
		"token":    "tok-" + randHex(t, 24),
	}
	e.c.createSecret(t, e.ns, name, data)
	e.want[name] = data
	return name
}

// checkSecret reads one Secret through the API and compares its data.
func (e *env) checkSecret(name string) error {
	got, err := e.c.readSecret(e.ns, name)
	if err != nil {
		return fmt.Errorf("get secret %s: %w", name, err)
	}
	for k, v := range e.want[name] {
		if got[k] != v {
			return fmt.Errorf("secret %s key %s: got %q, want %q", name, k, got[k], v)
		}
	}
	if len(got) != len(e.want[name]) {
		return fmt.Errorf("secret %s: %d keys, want %d", name, len(got), len(e.want[name]))
	}
	return nil
}

func (e *env) checkAllSecrets(t testing.TB, skip ...string) {
	t.Helper()
	for name := range e.want {
		if slices.Contains(skip, name) {
			continue
		}
		if err := e.checkSecret(name); err != nil {
			t.Fatal(err)
		}
	}
}

// rawSecret reads one Secret's bytes from etcd and checks that it is a kleidi
// KMS v2 envelope without any of the Secret's values in it.
func (e *env) rawSecret(t testing.TB, name string) ([]byte, *encryptedObject) {
	t.Helper()
	raw := e.c.etcdGet(t, secretKey(e.ns, name))
	if !bytes.HasPrefix(raw, []byte(kmsPrefix)) {
		t.Fatalf("etcd value of %s does not start with %q: %q", name, kmsPrefix, raw[:min(len(raw), 48)])
	}
	for k, v := range e.want[name] {
		for _, form := range []string{v, base64.StdEncoding.EncodeToString([]byte(v))} {
			if bytes.Contains(raw, []byte(form)) {
				t.Fatalf("etcd value of %s contains the value of key %s in clear", name, k)
			}
		}
	}
	o, err := parseEncryptedObject(raw)
	if err != nil {
		t.Fatalf("etcd value of %s: %v", name, err)
	}
	return raw, o
}

// etcdKeyIDs returns the key_id every remembered Secret is stored under.
func (e *env) etcdKeyIDs(t testing.TB) map[string]string {
	t.Helper()
	ids := map[string]string{}
	for name := range e.want {
		_, o := e.rawSecret(t, name)
		ids[name] = o.keyID
	}
	return ids
}

// distinctSeeds counts the different encrypted DEK seeds the remembered
// Secrets are stored with: a freshly started apiserver decrypts each once.
func (e *env) distinctSeeds(t testing.TB) int {
	t.Helper()
	seen := map[string]bool{}
	for name := range e.want {
		_, o := e.rawSecret(t, name)
		seen[string(o.encryptedDEKSource)] = true
	}
	return len(seen)
}

// kmsHealthz triggers (and returns) the apiserver's KMS health check; the
// apiserver calls the plugin's Status when its cached answer is older than 20 s
// (3 s after a failure).
func (e *env) kmsHealthz() (int, string, error) {
	return e.c.get("/healthz/kms-providers")
}

func (e *env) waitAPIServerKMSHealthy(t testing.TB) {
	t.Helper()
	eventually(t, 60*time.Second, time.Second, "apiserver /healthz/kms-providers ok", func() error {
		code, body, err := e.kmsHealthz()
		if err != nil {
			return err
		}
		if code != http.StatusOK {
			return fmt.Errorf("%d: %s", code, lastLines(body, 3))
		}
		return nil
	})
}

// kmsOps sums apiserver_envelope_encryption_kms_operations_latency_seconds_count
// for one KMS method with gRPC code OK.
func (e *env) kmsOps(t testing.TB, method string) float64 {
	t.Helper()
	return sumMetric(e.c.metrics(t), "apiserver_envelope_encryption_kms_operations_latency_seconds_count",
		`provider_name="kleidi"`, `grpc_status_code="OK"`, "KeyManagementService/"+method+`"`)
}

// sumMetric adds the values of every sample of metric whose labels contain all of parts.
func sumMetric(exposition, metric string, parts ...string) float64 {
	var sum float64
	sc := bufio.NewScanner(strings.NewReader(exposition))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, metric+"{") && !strings.HasPrefix(line, metric+" ") {
			continue
		}
		ok := true
		for _, p := range parts {
			if !strings.Contains(line, p) {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		f := strings.Fields(line)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			sum += v
		}
	}
	return sum
}

func keyIDHash(keyID string) string {
	return fmt.Sprintf("sha256:%x", sha256.Sum256([]byte(keyID)))
}

// Scenario 1: Secrets written through the API are stored as kleidi KMS v2
// envelopes with no plaintext, under the plugin's current key_id, and read back.
func (e *env) encryptedAtRest(t *testing.T) {
	keyID := e.plugin.keyID(t)
	t.Logf("plugin key_id %s", keyID)
	for range 5 {
		e.addSecret(t)
	}
	for name := range e.want {
		_, o := e.rawSecret(t, name)
		if o.keyID != keyID {
			t.Errorf("secret %s stored under key_id %q, plugin reports %q", name, o.keyID, keyID)
		}
		if len(o.annotations) == 0 {
			t.Errorf("secret %s: no annotations (the wrapped KEK should travel with it)", name)
		}
	}
	_, o := e.rawSecret(t, "s00")
	var keys []string
	for k, v := range o.annotations {
		keys = append(keys, fmt.Sprintf("%s (%d bytes)", k, len(v)))
	}
	t.Logf("EncryptedObject: data %d bytes, encrypted seed %d bytes, source type %d, annotations %v",
		len(o.encryptedData), len(o.encryptedDEKSource), o.dekSourceType, keys)
	e.checkAllSecrets(t)
}

// Scenario 2: kill -9 of the plugin and a restart (with the stale socket still
// there): the apiserver reconnects, reads and writes carry on.
func (e *env) pluginKillRestart(t *testing.T) {
	before := e.kmsOps(t, "Status")
	e.plugin.proc.kill9()
	if _, err := os.Lstat(e.plugin.sock); err != nil {
		t.Logf("socket after kill -9: %v", err)
	}
	e.plugin.start(t)
	// Reads are served from the apiserver's DEK cache meanwhile; make sure it
	// really talks to the new process before going on.
	eventually(t, 60*time.Second, time.Second, "apiserver Status call to the restarted plugin", func() error {
		code, body, err := e.kmsHealthz()
		if err != nil {
			return err
		}
		if code != http.StatusOK {
			return fmt.Errorf("kms-providers %d: %s", code, lastLines(body, 3))
		}
		if e.kmsOps(t, "Status") <= before {
			return errNotYet
		}
		return nil
	})
	e.checkAllSecrets(t)
	name := e.addSecret(t)
	e.rawSecret(t, name)
	if err := e.checkSecret(name); err != nil {
		t.Fatal(err)
	}
}

// Scenario 3: a kube-apiserver restart loses its DEK cache; every seed is
// decrypted by the plugin again and all Secrets are readable.
func (e *env) apiserverRestart(t *testing.T) {
	seeds := e.distinctSeeds(t)
	e.c.restartAPIServer(t)
	e.checkAllSecrets(t)
	if n := e.kmsOps(t, "Decrypt"); n < float64(seeds) {
		t.Fatalf("the restarted apiserver made %v successful Decrypt calls for %d distinct encrypted seeds", n, seeds)
	} else {
		t.Logf("successful Decrypt calls since the restart: %v, for %d distinct encrypted seeds", n, seeds)
	}
	name := e.addSecret(t)
	if err := e.checkSecret(name); err != nil {
		t.Fatal(err)
	}
}

// Scenario 4: kleidi-server rotate; Status reports a new key_id, the apiserver
// picks it up, a no-op update re-encrypts every Secret under it.
func (e *env) rotation(t *testing.T) {
	old := e.plugin.keyID(t)
	// rotate runs beside the serving plugin, also on swtpm: the tpm provider
	// holds a socket TPM only for the duration of each operation.
	out := e.plugin.cli(t, append([]string{"rotate"}, e.plugin.commonFlags()...)...)
	t.Logf("kleidi-server rotate: %s", strings.TrimSpace(out))
	var newID string
	eventually(t, 30*time.Second, 200*time.Millisecond, "plugin Status reports the new key_id", func() error {
		id := e.plugin.keyID(t)
		if id == old {
			return fmt.Errorf("key_id still %s", old)
		}
		newID = id
		return nil
	})
	t.Logf("key_id %s -> %s", old, newID)
	hash := keyIDHash(newID)
	eventually(t, 60*time.Second, time.Second, "apiserver observed the new key_id", func() error {
		if code, body, err := e.kmsHealthz(); err != nil || code != http.StatusOK {
			return fmt.Errorf("kms-providers %d %v: %s", code, err, lastLines(body, 3))
		}
		if sumMetric(e.c.metrics(t), "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds",
			`provider_name="kleidi"`, `key_id_hash="`+hash+`"`) == 0 {
			return errNotYet
		}
		return nil
	})
	stale := 0
	for name, id := range e.etcdKeyIDs(t) {
		if id != newID {
			stale++
		}
		_ = name
	}
	t.Logf("%d of %d Secrets under an older key_id before the update", stale, len(e.want))
	// The documented re-encryption: read every Secret and write it back unchanged.
	ctx := context.Background()
	list, err := e.c.cs.CoreV1().Secrets(e.ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range list.Items {
		if _, err := e.c.cs.CoreV1().Secrets(e.ns).Update(ctx, &list.Items[i], metav1.UpdateOptions{}); err != nil {
			t.Fatalf("no-op update of %s: %v", list.Items[i].Name, err)
		}
	}
	for name, id := range e.etcdKeyIDs(t) {
		if id != newID {
			t.Errorf("secret %s still under key_id %s after the update, want %s", name, id, newID)
		}
	}
	if sumMetric(e.c.metrics(t), "apiserver_envelope_encryption_key_id_hash_total",
		`provider_name="kleidi"`, `transformation_type="to_storage"`, `key_id_hash="`+hash+`"`) == 0 {
		t.Error("apiserver_envelope_encryption_key_id_hash_total shows no write under the new key_id")
	}
	e.checkAllSecrets(t)
}

// Scenario 5: the keyring file is lost, the root of trust is kept. A plugin
// started with a fresh keyring decrypts what the apiserver stored, because the
// wrapped KEK travels in the annotations of every object.
func (e *env) keyringLost(t *testing.T) {
	old := e.plugin.keyID(t)
	e.plugin.proc.stop()
	ring := e.plugin.keyringPath(t)
	if err := os.Remove(ring); err != nil {
		t.Fatal(err)
	}
	t.Logf("removed %s", ring)
	e.plugin.cli(t, append([]string{"init"}, e.plugin.commonFlags()...)...)
	e.plugin.start(t)
	fresh := e.plugin.keyID(t)
	if fresh == old {
		t.Fatalf("fresh keyring reports the old key_id %s", old)
	}
	// Straight to the plugin: every stored seed decrypts.
	client, closeFn, err := e.plugin.dial()
	if err != nil {
		t.Fatal(err)
	}
	defer closeFn()
	for name := range e.want {
		_, o := e.rawSecret(t, name)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		resp, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{
			Ciphertext: o.encryptedDEKSource, Uid: "e2e-" + name, KeyId: o.keyID, Annotations: o.annotations,
		})
		cancel()
		if err != nil {
			t.Fatalf("Decrypt of %s's seed (key_id %s) with a fresh keyring: %v", name, o.keyID, err)
		}
		if len(resp.Plaintext) != 32 {
			t.Fatalf("Decrypt of %s's seed: %d bytes, want 32", name, len(resp.Plaintext))
		}
	}
	// And through a restarted apiserver, whose DEK cache is empty.
	seeds := e.distinctSeeds(t)
	e.c.restartAPIServer(t)
	e.checkAllSecrets(t)
	if n := e.kmsOps(t, "Decrypt"); n < float64(seeds) {
		t.Fatalf("the restarted apiserver made %v successful Decrypt calls for %d distinct encrypted seeds", n, seeds)
	}
	name := e.addSecret(t)
	if _, o := e.rawSecret(t, name); o.keyID != fresh {
		t.Errorf("new Secret stored under %s, want the fresh key_id %s", o.keyID, fresh)
	}
	if err := e.checkSecret(name); err != nil {
		t.Fatal(err)
	}
}

// keyringPath is the one keyring file in the state directory.
func (p *plugin) keyringPath(t testing.TB) string {
	t.Helper()
	entries, err := os.ReadDir(p.stateDir)
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, ent := range entries {
		n := strings.ToLower(ent.Name())
		if strings.Contains(n, "keyring") && !strings.HasSuffix(n, ".lock") && ent.Type().IsRegular() {
			found = append(found, filepath.Join(p.stateDir, ent.Name()))
		}
	}
	if len(found) != 1 {
		t.Fatalf("want one keyring file in %s, found %v", p.stateDir, found)
	}
	return found[0]
}

// Scenario 6: the plugin runs as a non-root uid; its socket is reachable by the
// apiserver (root) and not by another non-root uid.
func (e *env) nonRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("scenario 6 switches uids with setpriv and must run as root (as it does in CI)")
	}
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", e.plugin.proc.pid()))
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("%d\t%d\t%d\t%d", pluginUID, pluginUID, pluginUID, pluginUID)
	for _, field := range []string{"Uid:", "Gid:"} {
		line := grepLine(string(st), field)
		if !strings.Contains(line, want) {
			t.Errorf("plugin process %s want all %d: %q", field, pluginUID, line)
		}
	}
	if g := grepLine(string(st), "Groups:"); strings.TrimSpace(strings.TrimPrefix(g, "Groups:")) != "" {
		t.Errorf("plugin process has supplementary groups: %q", g)
	}
	for _, path := range []string{e.plugin.sock, e.plugin.sockDir, e.plugin.stateDir} {
		fi, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		sys := fi.Sys().(*syscall.Stat_t)
		t.Logf("%s: %v uid %d gid %d", path, fi.Mode(), sys.Uid, sys.Gid)
		if sys.Uid != pluginUID {
			t.Errorf("%s owned by uid %d, want %d", path, sys.Uid, pluginUID)
		}
		if fi.Mode().Perm()&0o007 != 0 {
			t.Errorf("%s is accessible to others: %v", path, fi.Mode())
		}
	}
	if fi, _ := os.Lstat(e.plugin.sock); fi == nil || fi.Mode()&os.ModeSocket == 0 {
		t.Errorf("%s is not a socket", e.plugin.sock)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	statusCmd := []string{e.plugin.bin, "status", "--listen=" + e.plugin.endpoint()}
	if out, err := run(ctx, nil, as(pluginUID, statusCmd...)...); err != nil {
		t.Fatalf("kleidi-server status as the plugin's uid: %v\n%s", err, out)
	}
	out, err := run(ctx, nil, as(otherUID, statusCmd...)...)
	if err == nil {
		t.Fatalf("uid %d reached the plugin's socket:\n%s", otherUID, out)
	}
	t.Logf("uid %d refused as expected: %s", otherUID, lastLines(out, 2))
	// The apiserver, as root, does reach it.
	e.waitAPIServerKMSHealthy(t)
	name := e.addSecret(t)
	e.rawSecret(t, name)
	if err := e.checkSecret(name); err != nil {
		t.Fatal(err)
	}
}

func grepLine(s, prefix string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

// Scenario 7: a tampered value in etcd fails for that object only and the
// plugin stays healthy; both the apiserver's own ciphertext and the plugin's
// encrypted seed are tampered with (the latter reaches the plugin's Decrypt).
func (e *env) tampered(t *testing.T) {
	dataVictim, seedVictim := e.addSecret(t), e.addSecret(t)
	origData, o1 := e.rawSecret(t, dataVictim)
	origSeed, o2 := e.rawSecret(t, seedVictim)
	bad1 := bytes.Clone(origData)
	bad1[o1.dataOff+len(o1.encryptedData)/2] ^= 0x5a
	bad2 := bytes.Clone(origSeed)
	bad2[o2.dekOff+len(o2.encryptedDEKSource)/2] ^= 0x5a
	decryptFailsBefore := e.kmsOpsFailed(t, "Decrypt")
	e.c.etcdPut(t, secretKey(e.ns, dataVictim), bad1)
	e.c.etcdPut(t, secretKey(e.ns, seedVictim), bad2)
	for _, name := range []string{dataVictim, seedVictim} {
		eventually(t, 10*time.Second, 200*time.Millisecond, "tampered "+name+" refused", func() error {
			if err := e.checkSecret(name); err == nil {
				return fmt.Errorf("secret %s still reads", name)
			} else {
				t.Logf("GET %s: %v", name, err)
			}
			return nil
		})
	}
	e.checkAllSecrets(t, dataVictim, seedVictim)
	if n := e.kmsOpsFailed(t, "Decrypt"); n <= decryptFailsBefore {
		t.Errorf("the tampered seed did not reach the plugin's Decrypt (failed Decrypt calls %v)", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := run(ctx, nil, as(e.plugin.uid, e.plugin.bin, "status", "--listen="+e.plugin.endpoint())...); err != nil {
		t.Fatalf("kleidi-server status after tampering: %v\n%s", err, out)
	} else {
		t.Logf("kleidi-server status: %s", strings.TrimSpace(out))
	}
	if e.plugin.proc.exited() {
		t.Fatal("kleidi-server exited")
	}
	// Restored bytes read again: nothing was cached as broken.
	e.c.etcdPut(t, secretKey(e.ns, dataVictim), origData)
	e.c.etcdPut(t, secretKey(e.ns, seedVictim), origSeed)
	eventually(t, 10*time.Second, 200*time.Millisecond, "restored Secrets readable", func() error {
		if err := e.checkSecret(dataVictim); err != nil {
			return err
		}
		return e.checkSecret(seedVictim)
	})
	e.checkAllSecrets(t)
}

func (e *env) kmsOpsFailed(t testing.TB, method string) float64 {
	t.Helper()
	all := sumMetric(e.c.metrics(t), "apiserver_envelope_encryption_kms_operations_latency_seconds_count",
		`provider_name="kleidi"`, "KeyManagementService/"+method+`"`)
	return all - e.kmsOps(t, method)
}

// Scenario 8 (tpm, pkcs11, awskms): the root of trust goes away (swtpm dies, the
// SoftHSM token directory is moved away, local-kms dies); the plugin reports
// unhealthy within seconds and the apiserver's KMS health check follows, while
// cached reads carry on; the root comes back (swtpm and local-kms restarted on
// the same socket or port and state, the token directory moved back) and so
// does the plugin, without a restart.
func (e *env) rootOutage(t *testing.T) {
	var down, up func(t testing.TB)
	switch e.provider {
	case "tpm":
		down, up = func(testing.TB) { e.tpm.proc.kill9() }, e.tpm.start
	case "pkcs11":
		down, up = e.hsm.remove, e.hsm.restore
	case "awskms":
		down, up = func(testing.TB) { e.kms.proc.kill9() }, e.kms.start
	default:
		t.Fatalf("no outage for provider %q", e.provider)
	}
	pid := e.plugin.proc.pid()
	down(t)
	eventually(t, 20*time.Second, 200*time.Millisecond, "plugin Status unhealthy", func() error {
		st, err := e.plugin.status()
		if err != nil {
			return err
		}
		if st.Healthz == "ok" {
			return errNotYet
		}
		t.Logf("plugin healthz: %q", st.Healthz)
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	statusCmd := as(e.plugin.uid, e.plugin.bin, "status", "--listen="+e.plugin.endpoint())
	if out, err := run(ctx, nil, statusCmd...); err == nil {
		t.Errorf("kleidi-server status exits 0 while the root of trust is gone:\n%s", out)
	}
	eventually(t, 60*time.Second, time.Second, "apiserver /healthz/kms-providers reports the failure", func() error {
		code, body, err := e.kmsHealthz()
		if err != nil {
			return err
		}
		if code == http.StatusOK {
			return errNotYet
		}
		t.Logf("/healthz/kms-providers %d: %s", code, lastLines(body, 3))
		return nil
	})
	// Reads of already cached seeds keep working during the outage.
	e.checkAllSecrets(t)

	up(t)
	e.plugin.waitHealthy(t, 60*time.Second)
	if e.plugin.proc.exited() || e.plugin.proc.pid() != pid {
		t.Fatal("the plugin was restarted")
	}
	if out, err := run(ctx, nil, statusCmd...); err != nil {
		t.Errorf("kleidi-server status after the root of trust came back: %v\n%s", err, out)
	}
	e.waitAPIServerKMSHealthy(t)
	name := e.addSecret(t)
	e.rawSecret(t, name)
	e.checkAllSecrets(t)
}

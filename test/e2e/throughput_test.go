package e2e

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Benchmarks of Secret traffic through a real kube-apiserver, with kleidi as its
// KMS v2 plugin and with the apiserver's built-in identity and aesgcm providers
// for comparison. They are not run by `go test` without -bench. Each provider
// gets its own control plane, started by its sub-benchmark and stopped at its
// end, so only one apiserver runs at a time.
//
// go test repeats each leaf benchmark -count times in a row; to let providers
// share machine conditions, repeat the whole run instead:
//
//	for i in 1 2 3; do go test -run '^$' -bench . -benchtime 2000x -count 1 -timeout 30m; done
//
// Reported metrics, besides ns/op:
//
//	secrets/s        calls completed per second at benchWorkers concurrent calls
//	p99-ms           99th percentile latency of one call
//	load1            1-minute load average at the end of the timed run
//	plugin-encrypts  kleidi Encrypt calls during the timed run (kleidi only)
//	plugin-decrypts  kleidi Decrypt calls during the timed run (kleidi only)
//	plugin-ms        time spent inside kleidi Encrypt and Decrypt during the timed run

// benchWorkers is the number of concurrent client-go callers.
const benchWorkers = 16

// kms-baseline is examples/kleidi-bench's baseline plugin (AES-GCM under an in-memory key, nothing else) behind
// the same KMS v2 configuration as kleidi: what any KMS v2 plugin costs the apiserver.
var benchProviders = []string{"identity", "aesgcm", "kms-baseline", "kleidi-gpg", "kleidi-tpm"}

// benchTarget is one control plane under benchmark.
type benchTarget struct {
	name   string
	c      *cluster
	cs     *kubernetes.Clientset // without client-side rate limit
	plugin *plugin               // nil for the built-in providers
	data   map[string][]byte
}

func startBenchTarget(b *testing.B, name string) *benchTarget {
	b.Helper()
	dir := workDir(b, "kleidi-bench-")
	ps := newProcs(b)
	bt := &benchTarget{name: name}
	switch name {
	case "identity":
		bt.c = startCluster(b, ps, dir, `apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: ["secrets"]
    providers:
      - identity: {}
`)
	case "aesgcm":
		key := make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			b.Fatal(err)
		}
		bt.c = startCluster(b, ps, dir, `apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: ["secrets"]
    providers:
      - aesgcm:
          keys:
            - name: key1
              secret: `+base64.StdEncoding.EncodeToString(key)+`
      - identity: {}
`)
	case "kms-baseline":
		sock := filepath.Join(dir, "baseline.sock")
		ps.start(b, "kms-baseline", filepath.Join(dir, "baseline.log"), nil, kleidiBenchBinary.build(b), "baseline", "--listen", "unix://"+sock)
		eventually(b, 30*time.Second, 50*time.Millisecond, "the baseline plugin listens", func() error {
			_, err := os.Stat(sock)
			return err
		})
		bt.c = startCluster(b, ps, dir, encryptionConfig(sock))
	case "kleidi-gpg", "kleidi-tpm":
		e := &env{provider: strings.TrimPrefix(name, "kleidi-"), ns: "e2e", dir: dir, procs: ps, want: map[string]map[string]string{}}
		e.setup(b)
		bt.c, bt.plugin = e.c, e.plugin
	default:
		b.Fatalf("unknown provider %q", name)
	}
	cs, err := kubernetes.NewForConfig(&rest.Config{
		Host:            bt.c.apiURL,
		BearerToken:     bt.c.token,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true},
		QPS:             -1, // no client-side rate limit
		ContentConfig:   rest.ContentConfig{ContentType: "application/vnd.kubernetes.protobuf"},
		Timeout:         60 * time.Second,
	})
	if err != nil {
		b.Fatal(err)
	}
	bt.cs = cs
	// Two values of the size addSecret writes; the same for every Secret, so
	// the client spends no time making them.
	bt.data = map[string][]byte{
		"password": []byte("pw-" + randHex(b, 16)),
		"token":    []byte("tok-" + randHex(b, 24)),
	}
	return bt
}

func (bt *benchTarget) create(ns, name string) error {
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}, Data: bt.data}
	_, err := bt.cs.CoreV1().Secrets(ns).Create(context.Background(), s, metav1.CreateOptions{})
	return err
}

func (bt *benchTarget) get(ns, name string) error {
	s, err := bt.cs.CoreV1().Secrets(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if string(s.Data["token"]) != string(bt.data["token"]) {
		return fmt.Errorf("secret %s/%s: wrong data", ns, name)
	}
	return nil
}

// pluginStats is a reading of the plugin's own counters.
type pluginStats struct {
	encrypts, decrypts, seconds float64
}

func (bt *benchTarget) pluginStats(b testing.TB) pluginStats {
	b.Helper()
	if bt.plugin == nil {
		return pluginStats{}
	}
	resp, err := http.Get("http://" + bt.plugin.httpAddr + "/metrics")
	if err != nil {
		b.Fatalf("plugin /metrics: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		b.Fatalf("plugin /metrics: %v", err)
	}
	m := string(body)
	return pluginStats{
		encrypts: sumMetric(m, "kleidi_kms_requests_total", `method="encrypt"`),
		decrypts: sumMetric(m, "kleidi_kms_requests_total", `method="decrypt"`),
		seconds: sumMetric(m, "kleidi_kms_request_duration_seconds_sum", `method="encrypt"`) +
			sumMetric(m, "kleidi_kms_request_duration_seconds_sum", `method="decrypt"`),
	}
}

func (bt *benchTarget) reportPlugin(b *testing.B, before, after pluginStats, prefix string) {
	if bt.plugin == nil {
		return
	}
	b.ReportMetric(after.encrypts-before.encrypts, prefix+"plugin-encrypts")
	b.ReportMetric(after.decrypts-before.decrypts, prefix+"plugin-decrypts")
	b.ReportMetric((after.seconds-before.seconds)*1000, prefix+"plugin-ms")
}

// drive runs op(0..n-1) on benchWorkers goroutines and returns the latency of each call.
func drive(b testing.TB, n int, op func(i int) error) []time.Duration {
	b.Helper()
	lat := make([]time.Duration, n)
	var next atomic.Int64
	var failed atomic.Pointer[error]
	var wg sync.WaitGroup
	for range benchWorkers {
		wg.Go(func() {
			for failed.Load() == nil {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				start := time.Now()
				if err := op(i); err != nil {
					failed.CompareAndSwap(nil, &err)
					return
				}
				lat[i] = time.Since(start)
			}
		})
	}
	wg.Wait()
	if p := failed.Load(); p != nil {
		b.Fatal(*p)
	}
	return lat
}

func p99(lat []time.Duration) time.Duration {
	if len(lat) == 0 {
		return 0
	}
	s := slices.Clone(lat)
	slices.Sort(s)
	return s[min(len(s)-1, (len(s)*99+99)/100-1)]
}

func load1() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	f, _ := strconv.ParseFloat(strings.Fields(string(b))[0], 64)
	return f
}

func reportRate(b *testing.B, prefix string, n int, elapsed time.Duration, lat []time.Duration) {
	b.ReportMetric(float64(n)/elapsed.Seconds(), prefix+"secrets/s")
	b.ReportMetric(float64(p99(lat))/float64(time.Millisecond), prefix+"p99-ms")
}

// BenchmarkSecrets measures Secret create and get throughput through the
// apiserver at benchWorkers concurrent calls. One op is one Secret.
func BenchmarkSecrets(b *testing.B) {
	for _, name := range benchProviders {
		b.Run(name, func(b *testing.B) {
			bt := startBenchTarget(b, name)
			if bt.plugin != nil {
				b.Cleanup(func() {
					s := bt.pluginStats(b)
					b.Logf("%s plugin calls since start: %v Encrypt, %v Decrypt, %.1f ms in them", name, s.encrypts, s.decrypts, s.seconds*1000)
				})
			}
			const ns = "bench"
			bt.c.ensureNamespace(b, ns)
			created := 0
			secretName := func(i int) string { return fmt.Sprintf("s%07d", i) }
			b.Run("create", func(b *testing.B) {
				base := created
				before := bt.pluginStats(b)
				b.ResetTimer()
				start := time.Now()
				lat := drive(b, b.N, func(i int) error { return bt.create(ns, secretName(base+i)) })
				elapsed := time.Since(start)
				b.StopTimer()
				created += b.N
				reportRate(b, "", b.N, elapsed, lat)
				b.ReportMetric(load1(), "load1")
				bt.reportPlugin(b, before, bt.pluginStats(b), "")
			})
			b.Run("get", func(b *testing.B) {
				if created == 0 { // create was filtered out by -bench
					drive(b, 1000, func(i int) error { return bt.create(ns, secretName(i)) })
					created = 1000
				}
				n := created
				before := bt.pluginStats(b)
				b.ResetTimer()
				start := time.Now()
				lat := drive(b, b.N, func(i int) error { return bt.get(ns, secretName(i%n)) })
				elapsed := time.Since(start)
				b.StopTimer()
				reportRate(b, "", b.N, elapsed, lat)
				b.ReportMetric(load1(), "load1")
				bt.reportPlugin(b, before, bt.pluginStats(b), "")
			})
		})
	}
}

const (
	// restartSecrets is the number of Secrets read after an apiserver restart.
	restartSecrets = 1000
	// restartLifetimes is the number of apiserver lifetimes (so, with KMS v2,
	// distinct DEK seeds) the Secrets of the second kleidi set are written across.
	restartLifetimes = 4
)

// BenchmarkReadAfterRestart restarts the apiserver, which loses its DEK seed
// cache, and reads restartSecrets Secrets, each once, at benchWorkers
// concurrent calls. For kleidi it does so for Secrets written in one apiserver
// lifetime (one DEK seed) and for Secrets written across restartLifetimes
// lifetimes (as many seeds). One op is one Secret read; the op count must be at
// least restartSecrets (e.g. -benchtime 2000x): the first restartSecrets reads
// are the cold pass (first-* metrics), the rest read the same Secrets again
// warm. Runs with fewer ops (the framework's first probe run with one op) read
// warm without a restart and report nothing of interest.
//
// The apiserver's Secret watch cache lists every Secret while it starts, so
// most seed decryption happens before /readyz turns ok: restart-s is the time
// from stopping the apiserver to /readyz ok, restart-plugin-* the plugin calls
// in that window, first-plugin-* those during the cold reads.
func BenchmarkReadAfterRestart(b *testing.B) {
	for _, name := range benchProviders {
		b.Run(name, func(b *testing.B) {
			bt := startBenchTarget(b, name)
			lifetimes := []int{1}
			if bt.plugin != nil {
				lifetimes = append(lifetimes, restartLifetimes)
			}
			for _, k := range lifetimes {
				ns := fmt.Sprintf("lifetimes-%d", k)
				bt.c.ensureNamespace(b, ns)
			}
			secretName := func(i int) string { return fmt.Sprintf("r%05d", i) }
			// Lifetime 1 writes the one-lifetime set and the first part of the other.
			write := func(ns string, from, to int) {
				drive(b, to-from, func(i int) error { return bt.create(ns, secretName(from+i)) })
			}
			write("lifetimes-1", 0, restartSecrets)
			per := restartSecrets / restartLifetimes
			if bt.plugin != nil {
				ns := fmt.Sprintf("lifetimes-%d", restartLifetimes)
				for l := range restartLifetimes {
					if l > 0 {
						bt.c.restartAPIServer(b)
					}
					to := (l + 1) * per
					if l == restartLifetimes-1 {
						to = restartSecrets
					}
					write(ns, l*per, to)
				}
			}
			for _, k := range lifetimes {
				ns := fmt.Sprintf("lifetimes-%d", k)
				if bt.plugin != nil {
					b.Logf("%s: %d Secrets under %d distinct encrypted DEK seeds", ns, restartSecrets, distinctSeedsIn(b, bt.c, ns))
				}
				b.Run(fmt.Sprintf("lifetimes=%d", k), func(b *testing.B) {
					get := func(i int) error { return bt.get(ns, secretName(i%restartSecrets)) }
					if b.N < restartSecrets {
						drive(b, b.N, get)
						return
					}
					b.StopTimer()
					s0 := bt.pluginStats(b)
					start := time.Now()
					bt.c.restartAPIServer(b)
					restart := time.Since(start)
					s1 := bt.pluginStats(b)
					b.StartTimer()
					start = time.Now()
					lat := drive(b, restartSecrets, get)
					cold := time.Since(start)
					s2 := bt.pluginStats(b)
					drive(b, b.N-restartSecrets, get)
					b.StopTimer()
					b.ReportMetric(restart.Seconds(), "restart-s")
					b.ReportMetric(float64(cold)/float64(time.Millisecond), "first-read-ms")
					reportRate(b, "first-", restartSecrets, cold, lat)
					b.ReportMetric(load1(), "load1")
					bt.reportPlugin(b, s0, s1, "restart-")
					bt.reportPlugin(b, s1, s2, "first-")
				})
			}
		})
	}
}

// distinctSeedsIn counts the different encrypted DEK seeds of the Secrets of
// namespace ns, read straight from etcd.
func distinctSeedsIn(b testing.TB, c *cluster, ns string) int {
	b.Helper()
	var resp struct {
		KVs []struct {
			Value string `json:"value"`
		} `json:"kvs"`
	}
	out := c.etcdctl(b, nil, "get", secretKey(ns, ""), "--prefix", "-w", "json")
	if err := json.Unmarshal(out, &resp); err != nil {
		b.Fatal(err)
	}
	seen := map[string]bool{}
	for _, kv := range resp.KVs {
		raw, err := base64.StdEncoding.DecodeString(kv.Value)
		if err != nil {
			b.Fatal(err)
		}
		o, err := parseEncryptedObject(raw)
		if err != nil {
			b.Fatal(err)
		}
		seen[string(o.encryptedDEKSource)] = true
	}
	return len(seen)
}

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/status"
	"k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmsservice "k8s.io/kms/pkg/service"
)

// providerName is the name under which the apiserver's client records its metrics for this tool.
const providerName = "kleidi-bench"

// method is one call of the KMS v2 API.
type method int

const (
	methodEncrypt method = iota
	methodDecrypt
	methodStatus
	numMethods
)

var methodNames = [numMethods]string{"encrypt", "decrypt", "status"}

func (m method) String() string { return methodNames[m] }

func parseMethod(s string) (method, error) {
	for m, name := range methodNames {
		if strings.EqualFold(s, name) {
			return method(m), nil
		}
	}
	return 0, fmt.Errorf("unknown method %q (want encrypt, decrypt, status or mix)", s)
}

// methodSequence turns --method (and, for "mix", --mix) into the sequence of calls a worker cycles through.
// The mix is weights such as "encrypt=1,decrypt=8,status=1".
func methodSequence(name, mix string) ([]method, error) {
	if !strings.EqualFold(name, "mix") {
		m, err := parseMethod(name)
		if err != nil {
			return nil, err
		}
		return []method{m}, nil
	}
	var seq []method
	for item := range strings.SplitSeq(mix, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(item), "=")
		if !ok {
			return nil, fmt.Errorf("--mix item %q: want method=weight", item)
		}
		m, err := parseMethod(k)
		if err != nil {
			return nil, fmt.Errorf("--mix: %w", err)
		}
		w, err := strconv.Atoi(v)
		if err != nil || w < 0 || w > 1000 {
			return nil, fmt.Errorf("--mix item %q: weight must be an integer from 0 to 1000", item)
		}
		for range w {
			seq = append(seq, m)
		}
	}
	if len(seq) == 0 {
		return nil, errors.New("--mix gives no calls")
	}
	return seq, nil
}

// RunConfig describes one load run.
type RunConfig struct {
	Endpoint string
	// Method is encrypt, decrypt, status or mix; Mix weighs the methods of a mix.
	Method, Mix   string
	Concurrency   int
	Duration      time.Duration // used when Count is 0
	Count         int64
	PlaintextSize int
	// Warmup runs the same load for this long, unrecorded, before the measured run.
	Warmup      time.Duration
	CallTimeout time.Duration
	// Seeds is how many plaintexts are encrypted before a run with Decrypt calls; the Decrypt calls cycle
	// through their ciphertexts.
	Seeds int
	// PID, if not 0, is the plugin's process: its resident set is sampled during the run.
	PID int
	// MetricsURL, if set, is scraped before and after the run; the change of every series whose name starts
	// with one of MetricsMatch is reported.
	MetricsURL   string
	MetricsMatch []string
	// Progress, if not nil, receives a progress line once a second; Rewrite rewrites it in place ("\r").
	Progress io.Writer
	Rewrite  bool
}

func (c *RunConfig) check() error {
	switch {
	case c.Endpoint == "":
		return errors.New("--endpoint is required")
	case c.Concurrency < 1:
		return errors.New("--concurrency must be at least 1")
	case c.Count < 0 || c.Duration < 0 || c.Warmup < 0:
		return errors.New("--count, --duration and --warmup must not be negative")
	case c.Count == 0 && c.Duration == 0:
		return errors.New("one of --count or --duration must be set")
	case c.PlaintextSize < 1:
		return errors.New("--plaintext-size must be at least 1")
	case c.Seeds < 1:
		return errors.New("--seeds must be at least 1")
	case c.CallTimeout <= 0:
		return errors.New("--call-timeout must be positive")
	}
	return nil
}

// Report is the outcome of one run.
type Report struct {
	Endpoint      string    `json:"endpoint"`
	Method        string    `json:"method"`
	Concurrency   int       `json:"concurrency"`
	Duration      float64   `json:"duration_seconds,omitempty"`
	Count         int64     `json:"count,omitempty"`
	PlaintextSize int       `json:"plaintext_size"`
	Start         time.Time `json:"start"`
	// Elapsed is the measured time, from the first call to the end of the last one.
	Elapsed float64 `json:"elapsed_seconds"`
	KeyID   string  `json:"key_id"`
	Healthz string  `json:"healthz"`
	// AnnotationBytes is the size of the annotations Encrypt returned (their keys and values), which every
	// Decrypt request carries back; runs that call no Decrypt leave it 0.
	AnnotationBytes int `json:"annotation_bytes,omitempty"`
	// Results has one entry per method called, then "total" if there were several.
	Results []MethodResult     `json:"results"`
	Plugin  *Process           `json:"plugin,omitempty"`
	Metrics map[string]float64 `json:"metric_deltas,omitempty"`
	Machine Machine            `json:"machine"`
	// LoadAvgEnd is the load average when the run ended.
	LoadAvgEnd string `json:"loadavg_end"`
	// ClientCPUPerCall is the CPU time this tool (the client) used per call, in µs.
	ClientCPUPerCall float64 `json:"client_cpu_per_call_us"`
}

// Result returns the result of the method named name ("encrypt", "total", ...).
func (r *Report) Result(name string) (MethodResult, bool) {
	for _, m := range r.Results {
		if m.Method == name {
			return m, true
		}
	}
	return MethodResult{}, false
}

// seed is a ciphertext the plugin made, with what the apiserver stores beside it.
type seed struct {
	plaintext, ciphertext []byte
	keyID                 string
	annotations           map[string][]byte
}

var errPlaintextMismatch = errors.New("decrypt returned a different plaintext")

// worker is one caller. Its counters are read by the progress line while it runs.
type worker struct {
	id        int
	plaintext []byte
	latencies [numMethods][]time.Duration
	errors    [numMethods]int64
	samples   [numMethods]map[string]string // kind of error -> first message
	calls     atomic.Int64
	failed    atomic.Int64
	_         [64]byte // keep two workers' counters off one cache line
}

type load struct {
	cfg    RunConfig
	client kmsservice.Service
	seq    []method
	seeds  []seed
}

// Run drives cfg.Endpoint through kube-apiserver's own KMS v2 client and reports what it measured. Cancelling
// ctx stops issuing calls; the report then covers the calls made so far.
func Run(ctx context.Context, cfg RunConfig) (*Report, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	seq, err := methodSequence(cfg.Method, cfg.Mix)
	if err != nil {
		return nil, err
	}
	connCtx, closeConn := context.WithCancel(context.Background())
	defer closeConn()
	client, err := kmsv2.NewGRPCService(connCtx, cfg.Endpoint, providerName, cfg.CallTimeout)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", cfg.Endpoint, err)
	}
	l := &load{cfg: cfg, client: client, seq: seq}

	st, err := client.Status(ctx)
	if err != nil {
		return nil, fmt.Errorf("status of %s: %w", cfg.Endpoint, err)
	}
	rep := &Report{
		Endpoint: cfg.Endpoint, Method: strings.ToLower(cfg.Method), Concurrency: cfg.Concurrency,
		Duration: cfg.Duration.Seconds(), Count: cfg.Count, PlaintextSize: cfg.PlaintextSize,
		KeyID: st.KeyID, Healthz: st.Healthz,
	}
	if cfg.Count > 0 {
		rep.Duration = 0
	}
	for _, m := range seq {
		if m == methodDecrypt {
			if err := l.makeSeeds(ctx); err != nil {
				return nil, err
			}
			for k, v := range l.seeds[0].annotations {
				rep.AnnotationBytes += len(k) + len(v)
			}
			break
		}
	}
	if cfg.Warmup > 0 {
		l.drive(ctx, 0, cfg.Warmup, nil)
	}

	if cfg.MetricsURL != "" {
		rep.Metrics, err = scrapeCounters(ctx, cfg.MetricsURL, cfg.MetricsMatch)
		if err != nil {
			return nil, fmt.Errorf("scrape metrics: %w", err)
		}
	}
	var proc *processSampler
	if cfg.PID != 0 {
		if proc, err = startProcessSampler(cfg.PID); err != nil {
			return nil, err
		}
	}
	rep.Machine = machineFacts()
	rep.Start = time.Now()
	clientCPU := selfCPU()
	workers, elapsed := l.drive(ctx, cfg.Count, cfg.Duration, cfg.Progress)
	clientCPU = selfCPU() - clientCPU
	rep.Elapsed = elapsed.Seconds()
	rep.LoadAvgEnd = loadAvg()
	var calls int64
	for _, w := range workers {
		calls += w.calls.Load()
	}
	if calls > 0 {
		rep.ClientCPUPerCall = clientCPU.Seconds() * 1e6 / float64(calls)
	}
	if proc != nil {
		p := proc.finish(calls)
		rep.Plugin = &p
	}
	if cfg.MetricsURL != "" {
		after, err := scrapeCounters(context.Background(), cfg.MetricsURL, cfg.MetricsMatch)
		if err != nil {
			return nil, fmt.Errorf("scrape metrics: %w", err)
		}
		rep.Metrics = counterDeltas(rep.Metrics, after)
	}
	rep.Results = l.results(workers, elapsed)
	return rep, nil
}

// makeSeeds encrypts cfg.Seeds plaintexts, so Decrypt calls have ciphertexts the plugin made.
func (l *load) makeSeeds(ctx context.Context) error {
	for i := range l.cfg.Seeds {
		pt := make([]byte, l.cfg.PlaintextSize)
		rand.Read(pt)
		resp, err := l.client.Encrypt(ctx, fmt.Sprintf("kleidi-bench-seed-%d", i), pt)
		if err != nil {
			return fmt.Errorf("encrypt the plaintexts to decrypt: %w", err)
		}
		l.seeds = append(l.seeds, seed{plaintext: pt, ciphertext: resp.Ciphertext, keyID: resp.KeyID,
			annotations: resp.Annotations})
	}
	return nil
}

// drive runs cfg.Concurrency workers until count calls are made (count > 0) or for d, and returns the workers
// and the time from start until the last call ended. Progress, if not nil, gets a progress line each second.
func (l *load) drive(ctx context.Context, count int64, d time.Duration, progress io.Writer) ([]*worker, time.Duration) {
	workers := make([]*worker, l.cfg.Concurrency)
	for i := range workers {
		workers[i] = &worker{id: i, plaintext: make([]byte, l.cfg.PlaintextSize)}
		rand.Read(workers[i].plaintext)
	}
	var remaining atomic.Int64
	remaining.Store(count)
	start := time.Now()
	deadline := start.Add(d)
	more := func() bool {
		if ctx.Err() != nil {
			return false
		}
		if count > 0 {
			return remaining.Add(-1) >= 0
		}
		return time.Now().Before(deadline)
	}

	stopProgress := func() {}
	if progress != nil {
		stopProgress = l.progress(progress, workers, start, count, d)
	}
	var wg sync.WaitGroup
	for _, w := range workers {
		wg.Go(func() { l.work(w, more) })
	}
	wg.Wait()
	elapsed := time.Since(start)
	stopProgress()
	return workers, elapsed
}

func (l *load) work(w *worker, more func() bool) {
	for n := 0; more(); n++ {
		m := l.seq[(w.id+n)%len(l.seq)]
		start := time.Now()
		err := l.call(w, m, n)
		took := time.Since(start)
		if err != nil {
			w.errors[m]++
			if w.samples[m] == nil {
				w.samples[m] = map[string]string{}
			}
			if kind := errorKind(err); len(w.samples[m]) < 8 && w.samples[m][kind] == "" {
				w.samples[m][kind] = err.Error()
			}
			w.failed.Add(1)
		} else {
			w.latencies[m] = append(w.latencies[m], took)
		}
		w.calls.Add(1)
	}
}

// call makes one call as kube-apiserver would: a fresh request uid each time, the plaintext a 32-byte seed
// (by default) that differs from call to call, and Decrypt with the key_id and annotations Encrypt returned.
// Calls are not cancelled when the run ends: each is bounded by the client's call timeout.
func (l *load) call(w *worker, m method, n int) error {
	ctx := context.Background()
	uid := fmt.Sprintf("%08x-0000-4000-8000-%012x", w.id, n)
	switch m {
	case methodEncrypt:
		pt := w.plaintext
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(n))
		copy(pt, b[8-min(8, len(pt)):])
		resp, err := l.client.Encrypt(ctx, uid, pt)
		if err != nil {
			return err
		}
		if len(resp.Ciphertext) == 0 || resp.KeyID == "" {
			return errors.New("encrypt returned an empty ciphertext or key_id")
		}
	case methodDecrypt:
		s := &l.seeds[(w.id+n)%len(l.seeds)]
		pt, err := l.client.Decrypt(ctx, uid, &kmsservice.DecryptRequest{
			Ciphertext: s.ciphertext, KeyID: s.keyID, Annotations: s.annotations,
		})
		if err != nil {
			return err
		}
		if !bytes.Equal(pt, s.plaintext) {
			return errPlaintextMismatch
		}
	case methodStatus:
		resp, err := l.client.Status(ctx)
		if err != nil {
			return err
		}
		if resp.Healthz != "ok" {
			return fmt.Errorf("healthz %q", resp.Healthz)
		}
	}
	return nil
}

// errorKind groups errors by gRPC code, or by message for errors that are not gRPC statuses.
func errorKind(err error) string {
	if s, ok := status.FromError(err); ok {
		return s.Code().String()
	}
	return err.Error()
}

// progress prints a line each second until the returned function is called.
func (l *load) progress(out io.Writer, workers []*worker, start time.Time, count int64, d time.Duration) (stop func()) {
	done := make(chan struct{})
	finished := make(chan struct{})
	end := "\n"
	if l.cfg.Rewrite {
		end = "\x1b[K"
	}
	go func() {
		defer close(finished)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		var last int64
		for {
			select {
			case <-done:
				if l.cfg.Rewrite {
					fmt.Fprint(out, "\r\x1b[K")
				}
				return
			case now := <-t.C:
				var calls, failed int64
				for _, w := range workers {
					calls += w.calls.Load()
					failed += w.failed.Load()
				}
				target := fmt.Sprintf("/%s", d.Round(time.Second))
				if count > 0 {
					target = fmt.Sprintf(", %d/%d calls", calls, count)
				}
				prefix := ""
				if l.cfg.Rewrite {
					prefix = "\r"
				}
				fmt.Fprintf(out, "%s%s %s%s: %d calls, %d/s now, %.0f/s mean, %d errors%s", prefix,
					l.cfg.Method, now.Sub(start).Round(time.Second), target, calls, calls-last,
					float64(calls)/now.Sub(start).Seconds(), failed, end)
				last = calls
			}
		}
	}()
	return func() {
		close(done)
		<-finished
	}
}

// results merges the workers' records into one result per method called, plus "total" for a mix.
func (l *load) results(workers []*worker, elapsed time.Duration) []MethodResult {
	var used [numMethods]bool
	for _, m := range l.seq {
		used[m] = true
	}
	var out []MethodResult
	var all []time.Duration
	var allErrors int64
	var n int
	for m := range numMethods {
		if !used[m] {
			continue
		}
		n++
		var lat []time.Duration
		var errs int64
		samples := map[string]string{}
		for _, w := range workers {
			lat = append(lat, w.latencies[m]...)
			errs += w.errors[m]
			for k, v := range w.samples[m] {
				if _, ok := samples[k]; !ok {
					samples[k] = v
				}
			}
		}
		all = append(all, lat...)
		allErrors += errs
		r := summarize(m.String(), lat, errs, elapsed)
		for _, kind := range slices.Sorted(maps.Keys(samples)) {
			r.ErrorSamples = append(r.ErrorSamples, samples[kind])
		}
		out = append(out, r)
	}
	if n > 1 {
		out = append(out, summarize("total", all, allErrors, elapsed))
	}
	return out
}

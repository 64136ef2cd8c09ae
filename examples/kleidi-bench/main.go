// Command kleidi-bench puts load on a Kubernetes KMS v2 plugin through kube-apiserver's own gRPC client
// (k8s.io/apiserver's kmsv2.NewGRPCService), and serves a baseline plugin to measure it beside.
//
//	kleidi-bench run --endpoint unix:///run/kleidi/kms.sock --method encrypt --concurrency 16 --duration 10s
//	kleidi-bench run --endpoint unix:///run/kleidi/kms.sock --method mix --mix encrypt=1,decrypt=8,status=1 --count 100000 --json
//	kleidi-bench baseline --listen unix:///tmp/baseline.sock
//	kleidi-bench compare --endpoint baseline=unix:///tmp/baseline.sock --endpoint kleidi=unix:///run/kleidi/kms.sock \
//	    --method encrypt,decrypt --concurrency 1,16,64 --duration 10s --repeat 3
//
// run prints, per method, the number of calls, failed calls, throughput (successful calls per second) and the
// p50/p90/p99/max latency of the successful calls, as text or JSON; it exits 1 if any call failed. While it
// runs, a progress line goes to stderr once a second when stderr is a terminal (or with --progress).
//
// compare runs each (method, concurrency) cell --repeat times on every endpoint, the endpoints taking turns,
// and reports the medians and their ratio to the first endpoint: figures measured in one run, side by side,
// under the same machine conditions.
//
// baseline serves the least a KMS v2 plugin can do: k8s.io/kms/pkg/service over AES-256-GCM under a random key
// held in memory, Status always ok with a fixed key_id.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(mainWithArgs(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

const usage = `usage: kleidi-bench <command> [flags]

commands:
  run       put load on one KMS v2 endpoint and report throughput and latency per method
  compare   alternate runs on several endpoints and report medians side by side
  baseline  serve the baseline KMS v2 plugin (AES-256-GCM under an in-memory key)

Run "kleidi-bench <command> -h" for a command's flags.
`

// mainWithArgs runs a command and returns the exit code: 0, 1 if the command failed or a call failed, 2 for
// bad usage.
func mainWithArgs(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "run":
		err = runCommand(ctx, args[1:], stdout, stderr)
	case "compare":
		err = compareCommand(ctx, args[1:], stdout, stderr)
	case "baseline":
		err = baselineCommand(ctx, args[1:], stderr)
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "kleidi-bench: unknown command %q\n%s", args[0], usage)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	default:
		fmt.Fprintf(stderr, "kleidi-bench %s: %v\n", args[0], err)
		return 1
	}
}

// errUsage means the flags were wrong; the flag package has already said how.
var errUsage = errors.New("usage")

// errCallsFailed means the run completed but some calls failed; the report shows which.
var errCallsFailed = errors.New("some calls failed")

// loadFlags registers the flags run and compare share and returns the RunConfig they fill.
func loadFlags(fs *flag.FlagSet) *RunConfig {
	c := &RunConfig{}
	fs.StringVar(&c.Mix, "mix", "encrypt=1,decrypt=1,status=1", "weights of the methods for --method mix")
	fs.DurationVar(&c.Duration, "duration", 10*time.Second, "how long to run (ignored with --count)")
	fs.Int64Var(&c.Count, "count", 0, "number of calls to make, over all workers (instead of --duration)")
	fs.IntVar(&c.PlaintextSize, "plaintext-size", 32, "bytes per Encrypt plaintext (kube-apiserver sends a 32-byte seed)")
	fs.DurationVar(&c.Warmup, "warmup", 0, "run the load unrecorded for this long first")
	fs.DurationVar(&c.CallTimeout, "call-timeout", 3*time.Second, "per-call timeout of the client (kube-apiserver's default is 3s)")
	fs.IntVar(&c.Seeds, "seeds", 16, "plaintexts to encrypt before a run with Decrypt calls; Decrypt cycles through them")
	return c
}

func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "unexpected arguments: %v\n", fs.Args())
		return errUsage
	}
	return nil
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func runCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("kleidi-bench run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	c := loadFlags(fs)
	fs.StringVar(&c.Endpoint, "endpoint", "", "the plugin's socket, unix:///path.sock")
	fs.StringVar(&c.Method, "method", "encrypt", "encrypt, decrypt, status or mix")
	fs.IntVar(&c.Concurrency, "concurrency", 1, "calls in flight at once (workers sharing one connection, as in kube-apiserver)")
	fs.IntVar(&c.PID, "pid", 0, "the plugin's process id: sample its resident set (VmRSS) and measure its CPU time during the run")
	fs.StringVar(&c.MetricsURL, "metrics-url", "", "a Prometheus endpoint of the plugin to read counters from before and after the run")
	match := fs.String("metrics-match", "kleidi_", "comma-separated metric name prefixes to report from --metrics-url")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	jsonOut := fs.String("json-out", "", "also write the report as JSON to this `file`")
	progress := fs.Bool("progress", false, "print a progress line each second even when stderr is not a terminal")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	c.MetricsMatch = splitList(*match)
	if c.Count > 0 {
		c.Duration = 0
	}
	if *progress || isTerminal(stderr) {
		c.Progress, c.Rewrite = stderr, isTerminal(stderr)
	}
	rep, err := Run(ctx, *c)
	if err != nil {
		return err
	}
	if err := output(stdout, *asJSON, *jsonOut, rep, func() { writeReport(stdout, rep) }); err != nil {
		return err
	}
	for _, r := range rep.Results {
		if r.Errors > 0 {
			return errCallsFailed
		}
	}
	return nil
}

// output prints v as JSON to stdout (asJSON) or as text (text), and writes it as JSON to the file jsonOut
// if that is set.
func output(stdout io.Writer, asJSON bool, jsonOut string, v any, text func()) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if jsonOut != "" {
		if err := os.WriteFile(jsonOut, b, 0o644); err != nil {
			return err
		}
	}
	if asJSON {
		_, err = stdout.Write(b)
		return err
	}
	text()
	return nil
}

func writeReport(w io.Writer, r *Report) {
	span := fmt.Sprintf("%d calls", r.Count)
	if r.Count == 0 {
		span = fmt.Sprintf("%gs", r.Duration)
	}
	fmt.Fprintf(w, "%s: %s, concurrency %d, %s (%.2fs measured), %d-byte plaintexts, key_id %s\n",
		r.Endpoint, r.Method, r.Concurrency, span, r.Elapsed, r.PlaintextSize, r.KeyID)
	fmt.Fprintf(w, "machine: %d CPUs, %s; load average %s at start, %s at end\n",
		r.Machine.NumCPU, r.Machine.CPU, r.Machine.LoadAvg, r.LoadAvgEnd)
	writeResults(w, r.Results)
	fmt.Fprintf(w, "client (this tool): %.1fµs CPU per call\n", r.ClientCPUPerCall)
	if p := r.Plugin; p != nil {
		fmt.Fprintf(w, "plugin pid %d: VmRSS %.1f MiB before, %.1f MiB max during the run; VmHWM %.1f MiB; "+
			"CPU %.2fs, %.1fµs per call\n", p.PID, float64(p.Before)/1024, float64(p.Max)/1024, float64(p.HWM)/1024,
			p.CPU, p.CPUPerCall)
	}
	for _, k := range sortedKeys(r.Metrics) {
		fmt.Fprintf(w, "metric %s: %+g\n", k, r.Metrics[k])
	}
}

func compareCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("kleidi-bench compare", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg := CompareConfig{Log: stderr}
	run := loadFlags(fs)
	fs.Var(&cfg.Endpoints, "endpoint", "NAME=unix:///path.sock, repeatable; the first is the reference")
	fs.Var(&cfg.PIDs, "pid", "NAME=PID of an endpoint's plugin process, to sample its resident set; repeatable")
	fs.Var(&cfg.MetricsURLs, "metrics-url", "NAME=URL of an endpoint's Prometheus metrics; repeatable")
	match := fs.String("metrics-match", "kleidi_", "comma-separated metric name prefixes to report from --metrics-url")
	methods := fs.String("method", "encrypt,decrypt", "comma-separated methods (encrypt, decrypt, status, mix)")
	concurrency := fs.String("concurrency", "1,16,64", "comma-separated concurrencies")
	fs.IntVar(&cfg.Repeat, "repeat", 3, "runs per endpoint and cell; the figures are their medians")
	asJSON := fs.Bool("json", false, "print the comparison, with every run's report, as JSON")
	jsonOut := fs.String("json-out", "", "also write the comparison as JSON to this `file`")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	run.MetricsMatch = splitList(*match)
	if run.Count > 0 {
		run.Duration = 0
	}
	cfg.Run = *run
	cfg.Methods = splitList(*methods)
	for _, s := range splitList(*concurrency) {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			return fmt.Errorf("--concurrency %q: want positive integers", s)
		}
		cfg.Concurrencies = append(cfg.Concurrencies, n)
	}
	for _, m := range cfg.Methods {
		if _, err := methodSequence(m, run.Mix); err != nil {
			return err
		}
	}
	c, err := Compare(ctx, cfg)
	if err != nil {
		return err
	}
	if err := output(stdout, *asJSON, *jsonOut, c, func() { writeComparison(stdout, c) }); err != nil {
		return err
	}
	for _, cell := range c.Cells {
		for _, e := range cell.Endpoints {
			if e.Errors > 0 {
				return errCallsFailed
			}
		}
	}
	return nil
}

func baselineCommand(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("kleidi-bench baseline", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "", "the socket to serve on, unix:///path.sock")
	timeout := fs.Duration("timeout", 3*time.Second, "the gRPC server's connection timeout")
	annotationBytes := fs.Int("annotation-bytes", 0, "return an annotation of this many `bytes` (key and value) with every Encrypt, as a plugin with self-contained ciphertexts does; 0: none")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	path, err := socketPath(*listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	l, err := listenUnix(path)
	if err != nil {
		return err
	}
	defer os.Remove(path)
	fmt.Fprintf(stderr, "kleidi-bench baseline: serving KMS v2 on unix://%s (pid %d), key_id %s\n", path, os.Getpid(), baselineKeyID)
	return serveBaseline(ctx, l, *timeout, *annotationBytes)
}

package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"text/tabwriter"
)

// namedValues is a repeatable flag of NAME=VALUE items, in the order given.
type namedValues []namedValue

type namedValue struct{ name, value string }

func (n *namedValues) String() string {
	var parts []string
	for _, v := range *n {
		parts = append(parts, v.name+"="+v.value)
	}
	return strings.Join(parts, ",")
}

func (n *namedValues) Set(s string) error {
	name, value, ok := strings.Cut(s, "=")
	if !ok || name == "" || value == "" {
		return fmt.Errorf("%q: want NAME=VALUE", s)
	}
	for _, v := range *n {
		if v.name == name {
			return fmt.Errorf("%q given twice", name)
		}
	}
	*n = append(*n, namedValue{name, value})
	return nil
}

func (n namedValues) get(name string) string {
	for _, v := range n {
		if v.name == name {
			return v.value
		}
	}
	return ""
}

// CompareConfig describes a comparison: every (method, concurrency) cell is run Repeat times on each
// endpoint, the endpoints taking turns, so that every endpoint sees the same machine conditions.
type CompareConfig struct {
	// Endpoints are the plugins, by name; the first is the reference the others are compared with.
	Endpoints namedValues
	// PIDs and MetricsURLs are optional, by endpoint name.
	PIDs, MetricsURLs namedValues
	Methods           []string
	Concurrencies     []int
	Repeat            int
	// Run holds the settings of each run; its Endpoint, Method, Concurrency, PID and MetricsURL are set
	// per run.
	Run RunConfig
	// Log, if not nil, gets a line before each run.
	Log io.Writer
}

// Comparison is the outcome of a comparison.
type Comparison struct {
	Machine Machine `json:"machine"`
	Repeat  int     `json:"repeat"`
	Cells   []Cell  `json:"cells"`
}

// Cell is one (method, concurrency) pair, measured on every endpoint.
type Cell struct {
	Method      string          `json:"method"`
	Concurrency int             `json:"concurrency"`
	Endpoints   []EndpointCells `json:"endpoints"`
}

// EndpointCells is what one endpoint did in one cell: every run, and the medians over the runs.
type EndpointCells struct {
	Name       string  `json:"name"`
	Throughput float64 `json:"median_throughput_per_second"`
	P50        float64 `json:"median_p50_us"`
	P99        float64 `json:"median_p99_us"`
	Errors     int64   `json:"errors"`
	// ThroughputRatio and P99Ratio compare the medians with those of the first endpoint.
	ThroughputRatio float64 `json:"throughput_ratio"`
	P99Ratio        float64 `json:"p99_ratio"`
	// PairedRatio is the geometric mean over the repetitions of this endpoint's throughput divided by the first
	// endpoint's in the same repetition (the runs next to each other in time), with its 95% confidence interval
	// PairedLow to PairedHigh (Student's t; with 2 repetitions or more).
	PairedRatio float64 `json:"paired_throughput_ratio,omitempty"`
	PairedLow   float64 `json:"paired_throughput_ratio_low,omitempty"`
	PairedHigh  float64 `json:"paired_throughput_ratio_high,omitempty"`
	// ClientCPUPerCall is the median over the runs of the client's (this tool's) CPU time per call, in µs: what
	// the endpoint's requests and responses cost the caller.
	ClientCPUPerCall float64 `json:"median_client_cpu_per_call_us"`
	// RSSMax is the largest resident set sampled during the runs, in KiB (0 without a PID).
	RSSMax int64 `json:"rss_max_kib,omitempty"`
	// CPUPerCall is the median over the runs of the plugin's CPU time per call, in µs (0 without a PID).
	CPUPerCall float64 `json:"median_plugin_cpu_per_call_us,omitempty"`
	// Calls is the number of calls of all the runs; Metrics sums each metric's change over the runs.
	Calls   int64              `json:"calls"`
	Metrics map[string]float64 `json:"metric_deltas,omitempty"`
	Runs    []*Report          `json:"runs"`
}

// Compare runs the comparison. The endpoints take turns within each repetition, and the one that goes first
// rotates from one repetition to the next.
func Compare(ctx context.Context, cfg CompareConfig) (*Comparison, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, fmt.Errorf("at least one --endpoint NAME=unix:///path is required")
	}
	if cfg.Repeat < 1 {
		return nil, fmt.Errorf("--repeat must be at least 1")
	}
	out := &Comparison{Machine: machineFacts(), Repeat: cfg.Repeat}
	total := len(cfg.Methods) * len(cfg.Concurrencies) * cfg.Repeat * len(cfg.Endpoints)
	done := 0
	for _, m := range cfg.Methods {
		for _, c := range cfg.Concurrencies {
			cell := Cell{Method: m, Concurrency: c, Endpoints: make([]EndpointCells, len(cfg.Endpoints))}
			for i, e := range cfg.Endpoints {
				cell.Endpoints[i].Name = e.name
			}
			for rep := range cfg.Repeat {
				for k := range cfg.Endpoints {
					i := (rep + k) % len(cfg.Endpoints)
					e := cfg.Endpoints[i]
					run := cfg.Run
					run.Endpoint, run.Method, run.Concurrency = e.value, m, c
					run.MetricsURL = cfg.MetricsURLs.get(e.name)
					if pid := cfg.PIDs.get(e.name); pid != "" {
						n, err := strconv.Atoi(pid)
						if err != nil {
							return nil, fmt.Errorf("--pid %s=%s: %w", e.name, pid, err)
						}
						run.PID = n
					}
					done++
					if cfg.Log != nil {
						fmt.Fprintf(cfg.Log, "[%d/%d] %s %s concurrency %d, repetition %d (load %s)\n", done, total,
							e.name, m, c, rep+1, loadAvg())
					}
					r, err := Run(ctx, run)
					if err != nil {
						return nil, fmt.Errorf("%s: %w", e.name, err)
					}
					cell.Endpoints[i].Runs = append(cell.Endpoints[i].Runs, r)
				}
			}
			for i := range cell.Endpoints {
				cell.Endpoints[i].summarize(headline(m))
			}
			ref := cell.Endpoints[0]
			for i := range cell.Endpoints {
				e := &cell.Endpoints[i]
				if ref.Throughput > 0 {
					e.ThroughputRatio = e.Throughput / ref.Throughput
				}
				if ref.P99 > 0 {
					e.P99Ratio = e.P99 / ref.P99
				}
				if i > 0 {
					e.PairedRatio, e.PairedLow, e.PairedHigh = pairedRatio(e.Runs, ref.Runs, headline(m))
				}
			}
			out.Cells = append(out.Cells, cell)
		}
	}
	return out, nil
}

// headline is the result a cell's figures are taken from: the method's own, or the total of a mix.
func headline(method string) string {
	if strings.EqualFold(method, "mix") {
		return "total"
	}
	return strings.ToLower(method)
}

func (e *EndpointCells) summarize(result string) {
	var tput, p50, p99, cpu, client []float64
	for _, r := range e.Runs {
		m, _ := r.Result(result)
		client = append(client, r.ClientCPUPerCall)
		tput = append(tput, m.Throughput)
		p50 = append(p50, m.P50)
		p99 = append(p99, m.P99)
		e.Errors += m.Errors
		e.Calls += m.Count
		for k, v := range r.Metrics {
			if e.Metrics == nil {
				e.Metrics = map[string]float64{}
			}
			e.Metrics[k] += v
		}
		if r.Plugin != nil {
			e.RSSMax = max(e.RSSMax, r.Plugin.Max)
			cpu = append(cpu, r.Plugin.CPUPerCall)
		}
	}
	e.Throughput, e.P50, e.P99, e.CPUPerCall = median(tput), median(p50), median(p99), median(cpu)
	e.ClientCPUPerCall = median(client)
}

// pairedRatio returns the geometric mean of the throughput ratios of runs to the reference runs of the same
// repetition, and its 95% confidence interval; zeros with fewer than 2 pairs.
func pairedRatio(runs, ref []*Report, result string) (mean, low, high float64) {
	var logs []float64
	for i := range min(len(runs), len(ref)) {
		a, _ := runs[i].Result(result)
		b, _ := ref[i].Result(result)
		if a.Throughput > 0 && b.Throughput > 0 {
			logs = append(logs, math.Log(a.Throughput/b.Throughput))
		}
	}
	n := len(logs)
	if n < 2 {
		return 0, 0, 0
	}
	var sum, sq float64
	for _, x := range logs {
		sum += x
	}
	m := sum / float64(n)
	for _, x := range logs {
		sq += (x - m) * (x - m)
	}
	half := tQuantile95(n-1) * math.Sqrt(sq/float64(n-1)) / math.Sqrt(float64(n))
	return math.Exp(m), math.Exp(m - half), math.Exp(m + half)
}

// tQuantile95 is the two-sided 95% quantile of Student's t distribution with df degrees of freedom.
func tQuantile95(df int) float64 {
	t := []float64{12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
		2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042}
	if df >= 1 && df <= len(t) {
		return t[df-1]
	}
	return 1.960
}

// writeComparison prints one table per cell: the medians of each endpoint, their ratio to the first, and the
// figures of every run.
func writeComparison(w io.Writer, c *Comparison) {
	fmt.Fprintf(w, "machine: %d CPUs, %s, kernel %s, %s; load average at start %s\n",
		c.Machine.NumCPU, c.Machine.CPU, c.Machine.Kernel, c.Machine.GoVersion, c.Machine.LoadAvg)
	for _, cell := range c.Cells {
		fmt.Fprintf(w, "\n%s, concurrency %d: median of %d alternating runs\n", cell.Method, cell.Concurrency, c.Repeat)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "endpoint\treq/s\tp50\tp99\terrors\treq/s ratio\tpaired (95% CI)\tp99 ratio\tmax RSS\tCPU/call\tclient CPU/call\truns (req/s, p99, load)\t")
		for _, e := range cell.Endpoints {
			rss, cpu := "-", "-"
			if e.RSSMax > 0 {
				rss = fmt.Sprintf("%.1f MiB", float64(e.RSSMax)/1024)
				cpu = fmt.Sprintf("%.1fµs", e.CPUPerCall)
			}
			var runs []string
			for _, r := range e.Runs {
				m, _ := r.Result(headline(cell.Method))
				runs = append(runs, fmt.Sprintf("%.0f %s %s", m.Throughput, formatMicros(m.P99),
					strings.Fields(r.Machine.LoadAvg + " ?")[0]))
			}
			paired := "-"
			if e.PairedRatio > 0 {
				paired = fmt.Sprintf("%.2fx (%.2f-%.2f)", e.PairedRatio, e.PairedLow, e.PairedHigh)
			}
			fmt.Fprintf(tw, "%s\t%.0f\t%s\t%s\t%d\t%.2fx\t%s\t%.2fx\t%s\t%s\t%.1fµs\t%s\t\n", e.Name, e.Throughput,
				formatMicros(e.P50), formatMicros(e.P99), e.Errors, e.ThroughputRatio, paired, e.P99Ratio, rss, cpu,
				e.ClientCPUPerCall, strings.Join(runs, "; "))
		}
		tw.Flush()
		for _, e := range cell.Endpoints {
			if len(e.Runs) > 0 && e.Runs[0].AnnotationBytes > 0 {
				fmt.Fprintf(w, "%s: every Decrypt request carries %d bytes of annotations\n", e.Name, e.Runs[0].AnnotationBytes)
			}
			for _, k := range sortedKeys(e.Metrics) {
				fmt.Fprintf(w, "%s: %s %+g over %d calls (%.2f per 10,000 calls)\n", e.Name, k, e.Metrics[k], e.Calls,
					e.Metrics[k]*1e4/float64(max(e.Calls, 1)))
			}
		}
	}
}

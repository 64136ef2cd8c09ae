package main

import (
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// percentile returns the p-th percentile (0 < p <= 100) of sorted by the nearest-rank method: the smallest
// sample such that at least p percent of the samples are at or below it. It returns 0 for no samples.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}

// median returns the median of xs (the mean of the two middle values for an even count), 0 for none.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// MethodResult is what one method did in one run. Latencies are in microseconds.
type MethodResult struct {
	Method     string  `json:"method"`
	Count      int64   `json:"count"`
	Errors     int64   `json:"errors"`
	Throughput float64 `json:"throughput_per_second"`
	P50        float64 `json:"p50_us"`
	P90        float64 `json:"p90_us"`
	P99        float64 `json:"p99_us"`
	Max        float64 `json:"max_us"`
	// ErrorSamples holds the first message seen for each kind of error, at most a few.
	ErrorSamples []string `json:"error_samples,omitempty"`
}

// summarize computes a MethodResult from the latencies of the successful calls (sorted in place) and the
// number of failed ones, over elapsed.
func summarize(method string, latencies []time.Duration, errors int64, elapsed time.Duration) MethodResult {
	slices.Sort(latencies)
	r := MethodResult{
		Method: method,
		Count:  int64(len(latencies)) + errors,
		Errors: errors,
		P50:    micros(percentile(latencies, 50)),
		P90:    micros(percentile(latencies, 90)),
		P99:    micros(percentile(latencies, 99)),
		Max:    micros(percentile(latencies, 100)),
	}
	if elapsed > 0 {
		r.Throughput = float64(len(latencies)) / elapsed.Seconds()
	}
	return r
}

func micros(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

// formatMicros prints a latency in microseconds with a unit a reader takes in at a glance.
func formatMicros(us float64) string {
	switch {
	case us >= 1e6:
		return fmt.Sprintf("%.2fs", us/1e6)
	case us >= 1e3:
		return fmt.Sprintf("%.2fms", us/1e3)
	default:
		return fmt.Sprintf("%.0fµs", us)
	}
}

// writeResults prints one line per method: count, errors, throughput (successful calls per second) and
// latency percentiles of the successful calls.
func writeResults(w io.Writer, results []MethodResult) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "method\tcount\terrors\treq/s\tp50\tp90\tp99\tmax\t")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.0f\t%s\t%s\t%s\t%s\t\n", r.Method, r.Count, r.Errors, r.Throughput,
			formatMicros(r.P50), formatMicros(r.P90), formatMicros(r.P99), formatMicros(r.Max))
	}
	tw.Flush()
	for _, r := range results {
		for _, e := range r.ErrorSamples {
			fmt.Fprintf(w, "%s error: %s\n", r.Method, e)
		}
	}
}

// splitList splits a comma-separated flag value, dropping empty items.
func splitList(s string) []string {
	var out []string
	for item := range strings.SplitSeq(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }

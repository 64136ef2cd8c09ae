package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Machine describes where a figure was measured. The load average matters: a figure taken while other work
// runs on the machine is only comparable to one taken beside it.
type Machine struct {
	NumCPU    int    `json:"nproc"`
	CPU       string `json:"cpu_model"`
	Kernel    string `json:"kernel"`
	GoVersion string `json:"go_version"`
	// LoadAvg is the 1, 5 and 15 minute load average from /proc/loadavg when the run started.
	LoadAvg string `json:"loadavg"`
}

func machineFacts() Machine {
	m := Machine{NumCPU: runtime.NumCPU(), GoVersion: runtime.Version(), LoadAvg: loadAvg()}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	return m
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// Process is what the plugin process used during a run, from /proc/PID/status and /proc/PID/stat. Memory is
// in KiB.
type Process struct {
	PID int `json:"pid"`
	// Before is VmRSS just before the load started (idle, after any warm-up).
	Before int64 `json:"rss_before_kib"`
	// Max is the largest VmRSS sampled (every 100 ms) while the load ran.
	Max int64 `json:"rss_max_kib"`
	// HWM is VmHWM after the load: the peak resident set since the process started.
	HWM int64 `json:"hwm_kib"`
	// CPU is the user plus system CPU time the process used during the run, in seconds (10 ms resolution).
	CPU float64 `json:"cpu_seconds"`
	// CPUPerCall is CPU divided by the calls made, in microseconds: unlike throughput, it hardly depends on
	// what else runs on the machine.
	CPUPerCall float64 `json:"cpu_per_call_us"`
}

// clockTicks is USER_HZ, the unit of the times in /proc/PID/stat: 100 on every Linux architecture Go supports.
const clockTicks = 100

// procCPU returns the user plus system CPU time of every thread of pid, in seconds.
func procCPU(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces: count fields after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64) // field 14
	stime, err2 := strconv.ParseInt(f[12], 10, 64) // field 15
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: bad utime or stime", pid)
	}
	return float64(utime+stime) / clockTicks, nil
}

// procStatus reads the KiB values of VmRSS and VmHWM of pid.
func procStatus(pid int) (rss, hwm int64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			continue
		}
		switch k {
		case "VmRSS":
			rss = n
		case "VmHWM":
			hwm = n
		}
	}
	return rss, hwm, nil
}

// selfCPU returns the user plus system CPU time this process has used.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// processSampler samples the resident set of a process until stopped, and measures its CPU time.
type processSampler struct {
	mem  Process
	cpu  float64
	stop context.CancelFunc
	done chan struct{}
}

func startProcessSampler(pid int) (*processSampler, error) {
	rss, _, err := procStatus(pid)
	if err != nil {
		return nil, fmt.Errorf("read memory of pid %d: %w", pid, err)
	}
	cpu, err := procCPU(pid)
	if err != nil {
		return nil, err
	}
	ctx, stop := context.WithCancel(context.Background())
	s := &processSampler{mem: Process{PID: pid, Before: rss, Max: rss}, cpu: cpu, stop: stop, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if rss, _, err := procStatus(pid); err == nil {
					s.mem.Max = max(s.mem.Max, rss)
				}
			}
		}
	}()
	return s, nil
}

// finish stops sampling and returns what the process used; calls is the number of calls made meanwhile.
func (s *processSampler) finish(calls int64) Process {
	s.stop()
	<-s.done
	if cpu, err := procCPU(s.mem.PID); err == nil {
		s.mem.CPU = cpu - s.cpu
		if calls > 0 {
			s.mem.CPUPerCall = s.mem.CPU * 1e6 / float64(calls)
		}
	}
	if rss, hwm, err := procStatus(s.mem.PID); err == nil {
		s.mem.Max = max(s.mem.Max, rss)
		s.mem.HWM = hwm
	}
	return s.mem
}

// scrapeCounters fetches a Prometheus text exposition from url and returns the value of every sample whose
// metric name starts with one of prefixes, keyed by the series as written (name and labels).
func scrapeCounters(ctx context.Context, url string, prefixes []string) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "text/plain")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return parseExposition(body, prefixes), nil
}

// parseExposition reads the samples of a Prometheus text exposition whose names start with one of prefixes.
func parseExposition(body []byte, prefixes []string) map[string]float64 {
	out := map[string]float64{}
	for line := range bytes.SplitSeq(body, []byte("\n")) {
		s := strings.TrimSpace(string(line))
		if s == "" || s[0] == '#' {
			continue
		}
		end := strings.IndexAny(s, "{ ")
		if end < 0 {
			continue
		}
		name := s[:end]
		if !hasAnyPrefix(name, prefixes) {
			continue
		}
		series, rest := name, s[end:]
		if rest[0] == '{' {
			closing := strings.LastIndex(rest, "}")
			if closing < 0 {
				continue
			}
			series, rest = name+rest[:closing+1], rest[closing+1:]
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		out[series] = v
	}
	return out
}

func hasAnyPrefix(s string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

// counterDeltas returns after-before for every series in after (a series missing before counts from 0).
func counterDeltas(before, after map[string]float64) map[string]float64 {
	out := map[string]float64{}
	for k, v := range after {
		out[k] = v - before[k]
	}
	return out
}

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"testing"
	"time"

	"k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/audit"
	"github.com/kleidi-kms/kleidi/gpg"
	"github.com/kleidi-kms/kleidi/metrics"
	"github.com/kleidi-kms/kleidi/server"
)

// BenchmarkPlugin runs the baseline and kleidi's server (gpg root of trust; bare, with metrics, and as operators
// run it, with metrics and an audit log file, wired as kleidi-server wires them) in this process and calls each
// through kube-apiserver's client on a unix socket, concurrency 16 (b.SetParallelism over GOMAXPROCS), so a
// CPU profile shows where each spends its time:
//
//	go test -run '^$' -bench 'Plugin/kleidi-gpg/encrypt' -cpuprofile cpu.out && go tool pprof -top cpu.out
//
// The figures of record come from compare.sh against the real binaries, not from this benchmark.
func BenchmarkPlugin(b *testing.B) {
	for _, plugin := range []string{"baseline", "kleidi-gpg", "kleidi-gpg-metrics", "kleidi-gpg-operator"} {
		b.Run(plugin, func(b *testing.B) {
			endpoint := startBenchPlugin(b, plugin)
			client, err := kmsv2.NewGRPCService(b.Context(), endpoint, providerName, 3*time.Second)
			if err != nil {
				b.Fatalf("kmsv2.NewGRPCService(%s) err = %v, want nil", endpoint, err)
			}
			pt := make([]byte, 32)
			resp, err := client.Encrypt(b.Context(), "seed", pt)
			if err != nil {
				b.Fatalf("client.Encrypt() err = %v, want nil", err)
			}
			req := &kmsservice.DecryptRequest{Ciphertext: resp.Ciphertext, KeyID: resp.KeyID, Annotations: resp.Annotations}
			calls := map[string]func(ctx context.Context) error{
				"encrypt": func(ctx context.Context) error {
					_, err := client.Encrypt(ctx, "00000000-0000-4000-8000-000000000000", pt)
					return err
				},
				"decrypt": func(ctx context.Context) error {
					_, err := client.Decrypt(ctx, "00000000-0000-4000-8000-000000000000", req)
					return err
				},
			}
			for _, name := range []string{"encrypt", "decrypt"} {
				call := calls[name]
				b.Run(name, func(b *testing.B) {
					b.SetParallelism(8) // 16 callers on 2 CPUs
					b.ReportAllocs()
					b.RunParallel(func(pb *testing.PB) {
						for pb.Next() {
							if err := call(context.Background()); err != nil {
								b.Errorf("%s err = %v, want nil", name, err)
								return
							}
						}
					})
				})
			}
		})
	}
}

func startBenchPlugin(b *testing.B, plugin string) string {
	b.Helper()
	dir := b.TempDir()
	path := filepath.Join(dir, "kms.sock")
	l, err := listenUnix(path)
	if err != nil {
		b.Fatalf("listenUnix(%q) err = %v, want nil", path, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	switch plugin {
	case "baseline":
		go func() { done <- serveBaseline(ctx, l, 3*time.Second, 0) }()
	case "kleidi-gpg", "kleidi-gpg-metrics", "kleidi-gpg-operator":
		cfg, err := gpg.GenerateDevelopmentKey(filepath.Join(dir, "gpg"))
		if err != nil {
			b.Fatalf("gpg.GenerateDevelopmentKey() err = %v, want nil", err)
		}
		p, err := gpg.New(cfg)
		if err != nil {
			b.Fatalf("gpg.New() err = %v, want nil", err)
		}
		b.Cleanup(func() { p.Close() })
		scfg := server.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
		if plugin != "kleidi-gpg" {
			m, err := metrics.New()
			if err != nil {
				b.Fatalf("metrics.New() err = %v, want nil", err)
			}
			b.Cleanup(func() { m.Shutdown(context.Background()) })
			scfg.Metrics = m
		}
		if plugin == "kleidi-gpg-operator" {
			a, err := audit.OpenFile(filepath.Join(dir, "audit.log"))
			if err != nil {
				b.Fatalf("audit.OpenFile() err = %v, want nil", err)
			}
			b.Cleanup(func() { a.Close() })
			scfg.Audit = a
		}
		srv, err := server.New(ctx, p, kleidi.NewFileKeyring(filepath.Join(dir, "keyring.json")), scfg, kleidi.WithCreateIfEmpty())
		if err != nil {
			b.Fatalf("server.New() err = %v, want nil", err)
		}
		b.Cleanup(func() { srv.Close() })
		go func() { done <- srv.Serve(ctx, l) }()
	default:
		b.Fatalf("unknown plugin %q", plugin)
	}
	b.Cleanup(func() {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, net.ErrClosed) {
			b.Errorf("%s stopped with %v", plugin, err)
		}
	})
	return fmt.Sprintf("unix://%s", path)
}

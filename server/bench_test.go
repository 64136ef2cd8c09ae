package server_test

import (
	"context"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/audit"
	"github.com/kleidi-kms/kleidi/kleiditest"
	"github.com/kleidi-kms/kleidi/metrics"
	"github.com/kleidi-kms/kleidi/server"
)

// BenchmarkServer measures what metrics and the audit log cost: the real server on a unix socket with the
// insecure test provider, bare, with metrics wired as kleidi-server wires them, with an audit log file, and
// with both, called through the KMS v2 gRPC client by 8×GOMAXPROCS goroutines. ns/op is the inverse of
// throughput; cpu-ns/op is the CPU time of the whole process (client and server) per call, which a busy
// machine disturbs less. Compare the variants with benchstat:
//
//	go test -run '^$' -bench BenchmarkServer -benchmem -count 6 ./server/ | tee bench.txt
func BenchmarkServer(b *testing.B) {
	for _, v := range []struct {
		name           string
		metrics, audit bool
	}{
		{"bare", false, false},
		{"metrics", true, false},
		{"audit", false, true},
		{"both", true, true},
	} {
		b.Run(v.name, func(b *testing.B) {
			client := startBench(b, v.metrics, v.audit)
			ctx := context.Background()
			pt := make([]byte, 32)
			enc, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: pt, Uid: "bench"})
			if err != nil {
				b.Fatalf("Encrypt() err = %v, want nil", err)
			}
			calls := []struct {
				name string
				call func() error
			}{
				{"Encrypt", func() error {
					_, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: pt, Uid: "00000000-0000-4000-8000-000000000000"})
					return err
				}},
				{"Decrypt", func() error {
					_, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId,
						Annotations: enc.Annotations, Uid: "00000000-0000-4000-8000-000000000000"})
					return err
				}},
			}
			for _, c := range calls {
				b.Run(c.name, func(b *testing.B) {
					b.SetParallelism(8)
					b.ReportAllocs()
					cpu := cpuTime(b)
					b.RunParallel(func(pb *testing.PB) {
						for pb.Next() {
							if err := c.call(); err != nil {
								b.Errorf("%s() err = %v, want nil", c.name, err)
								return
							}
						}
					})
					b.ReportMetric(float64(cpuTime(b)-cpu)/float64(b.N), "cpu-ns/op")
				})
			}
		})
	}
}

// cpuTime returns the user and system CPU time this process has used.
func cpuTime(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatalf("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// startBench serves a Server on a unix socket in tb's temporary directory, instrumented as kleidi-server's serve
// does it, and returns a client of it. The server stops when tb ends.
func startBench(tb testing.TB, withMetrics, withAudit bool) kmsapi.KeyManagementServiceClient {
	tb.Helper()
	ctx := context.Background()
	dir := tb.TempDir()
	cfg := server.Config{Logger: quietLogger()}
	if withMetrics {
		m, err := metrics.New()
		if err != nil {
			tb.Fatalf("metrics.New() err = %v, want nil", err)
		}
		tb.Cleanup(func() { m.Shutdown(context.Background()) })
		cfg.Metrics = m
	}
	if withAudit {
		l, err := audit.OpenFile(filepath.Join(dir, "audit.json"))
		if err != nil {
			tb.Fatalf("audit.OpenFile() err = %v, want nil", err)
		}
		tb.Cleanup(func() { l.Close() })
		cfg.Audit = l
	}
	srv, err := server.New(ctx, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring(), cfg, kleidi.WithCreateIfEmpty())
	if err != nil {
		tb.Fatalf("server.New() err = %v, want nil", err)
	}
	tb.Cleanup(func() { srv.Close() })
	path := filepath.Join(dir, "kms.sock")
	serveCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- srv.ListenAndServe(serveCtx, "unix://"+path) }()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		tb.Fatalf("grpc.NewClient() err = %v, want nil", err)
	}
	// Registered after the server's stop, so it runs first: the client goes before the server stops.
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("ListenAndServe() = %v, want nil", err)
		}
	})
	tb.Cleanup(func() { conn.Close() })
	client := kmsapi.NewKeyManagementServiceClient(conn)
	waitCtx, waitCancel := context.WithTimeout(ctx, 10*time.Second)
	defer waitCancel()
	if _, err := client.Status(waitCtx, &kmsapi.StatusRequest{}, grpc.WaitForReady(true)); err != nil {
		tb.Fatalf("Status() err = %v, want an answer", err)
	}
	return client
}

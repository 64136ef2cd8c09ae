package server_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
	"github.com/kleidi-kms/kleidi/server"
)

func newServer(t *testing.T, cfg server.Config) *server.Server {
	t.Helper()
	p := kleiditest.NewInsecureProvider()
	cfg.Logger = quietLogger()
	srv, err := server.New(context.Background(), p, kleidi.NewMemoryKeyring(), cfg, kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatalf("server.New() err = %v, want nil", err)
	}
	return srv
}

// TestAbstractSocketRefused: an abstract socket ignores the socket mode and is open to every process of the
// network namespace, so it is refused unless allowed uids limit the callers.
func TestAbstractSocketRefused(t *testing.T) {
	name := fmt.Sprintf("kleidi-test-%d-refused", os.Getpid())
	srv := newServer(t, server.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := srv.ListenAndServe(ctx, "unix:///@"+name)
	if err == nil || !strings.Contains(err.Error(), "abstract socket") || !strings.Contains(err.Error(), "allowed uids") {
		t.Fatalf("ListenAndServe(abstract) without AllowedUIDs err = %v, want a refusal naming allowed uids", err)
	}
	if c, err := net.Dial("unix", "@"+name); err == nil {
		c.Close()
		t.Errorf("net.Dial(@%s) err = nil after the refusal, want nothing listening", name)
	}
}

// TestAbstractSocketAllowedUIDs serves on an abstract socket when allowed uids limit the callers.
func TestAbstractSocketAllowedUIDs(t *testing.T) {
	name := fmt.Sprintf("kleidi-test-%d-allowed", os.Getpid())
	srv := newServer(t, server.Config{AllowedUIDs: []uint32{uint32(os.Getuid())}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.ListenAndServe(ctx, "unix:///@"+name) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("ListenAndServe(abstract) = %v, want nil", err)
		}
	}()
	conn, err := grpc.NewClient("unix-abstract:"+name, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer ccancel()
	st, err := kmsapi.NewKeyManagementServiceClient(conn).Status(cctx, &kmsapi.StatusRequest{}, grpc.WaitForReady(true))
	if err != nil || st.Healthz != "ok" {
		t.Errorf("Status() over the abstract socket = %v, %v; want healthz ok", st, err)
	}
}

package controller

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/kleidi-kms/kleidi/operator/internal/cmdutil"
	"github.com/kleidi-kms/kleidi/operator/internal/testenv"
)

// TestMain points envtest at the cached kube-apiserver and the system's etcd; a missing binary fails the tests.
func TestMain(m *testing.M) {
	if err := testenv.SetAssets(); err != nil {
		fmt.Fprintln(os.Stderr, "controller tests:", err)
		os.Exit(1)
	}
	if os.Getenv("KLEIDI_TEST_LOG") != "" {
		ctrl.SetLogger(zap.New(zap.WriteTo(os.Stderr)))
	} else {
		ctrl.SetLogger(logr.Discard())
	}
	os.Exit(m.Run())
}

func startAPI(t *testing.T) (*rest.Config, client.Client) { return testenv.Start(t) }

// startOperator runs the operator against cfg until the returned stop function is called (or the test ends).
func startOperator(t *testing.T, cfg *rest.Config) (stop func()) {
	t.Helper()
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:     cmdutil.Scheme(),
		Metrics:    metricsserver.Options{BindAddress: "0"},
		Client:     client.Options{Cache: &client.CacheOptions{DisableFor: []client.Object{&corev1.Secret{}}}},
		Controller: config.Controller{SkipNameValidation: ptr(true)},
	})
	if err != nil {
		t.Fatal(err)
	}
	r := &Reconciler{
		Client:           mgr.GetClient(),
		Recorder:         mgr.GetEventRecorder("kleidi-operator"),
		Namespace:        "kleidi-system",
		HeartbeatTimeout: 2 * time.Second,
		Resync:           200 * time.Millisecond,
		NudgeAfter:       time.Second,
	}
	if err := r.SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	var stopped bool
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("manager Start() err = %v, want nil", err)
		}
	}
	t.Cleanup(stop)
	return stop
}

func ptr[T any](v T) *T { return &v }

// eventually polls cond until it returns "" (success) or the timeout passes; then it fails with cond's last
// answer, which says what it saw.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for time.Now().Before(deadline) {
		if last = cond(); last == "" {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s: not within %s: %s", what, timeout, last)
}

// Package testenv starts, for tests, a real kube-apiserver and etcd with the kleidi.dev CRDs (envtest), from the
// cached kube-apiserver (hack/k8s-binary.sh) and the system's etcd. It never downloads anything: a missing
// binary fails the test.
package testenv

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/kleidi-kms/kleidi/operator/internal/cmdutil"
)

// Namespace is the operator's namespace in tests.
const Namespace = "kleidi-system"

// moduleDir is the operator module's directory.
func moduleDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// SetAssets sets TEST_ASSET_KUBE_APISERVER (from hack/k8s-binary.sh) and TEST_ASSET_ETCD (/usr/bin/etcd) unless
// they are set, and returns an error when either binary is missing.
func SetAssets() error {
	if os.Getenv("TEST_ASSET_KUBE_APISERVER") == "" {
		out, err := exec.Command(filepath.Join(moduleDir(), "..", "hack", "k8s-binary.sh"), "kube-apiserver").Output()
		if err != nil {
			return err
		}
		os.Setenv("TEST_ASSET_KUBE_APISERVER", strings.TrimSpace(string(out)))
	}
	if os.Getenv("TEST_ASSET_ETCD") == "" {
		os.Setenv("TEST_ASSET_ETCD", "/usr/bin/etcd")
	}
	for _, v := range []string{"TEST_ASSET_KUBE_APISERVER", "TEST_ASSET_ETCD"} {
		if _, err := os.Stat(os.Getenv(v)); err != nil {
			return err
		}
	}
	return nil
}

// Start starts a kube-apiserver and etcd with the CRDs of config/crd/bases and the namespace [Namespace], and
// returns its config and a client; both stop when the test ends.
func Start(t *testing.T) (*rest.Config, client.Client) {
	t.Helper()
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join(moduleDir(), "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
	}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("envtest Start() err = %v, want nil", err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Errorf("envtest Stop() err = %v", err)
		}
	})
	c, err := client.New(cfg, client.Options{Scheme: cmdutil.Scheme()})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: Namespace}}); err != nil {
		t.Fatal(err)
	}
	return cfg, c
}

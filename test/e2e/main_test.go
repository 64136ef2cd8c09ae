package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// Environment variables read by the suite.
const (
	// envKubeAPIServer names an existing kube-apiserver binary to use instead of
	// the one hack/kube-apiserver.sh builds and caches.
	envKubeAPIServer = "KLEIDI_E2E_KUBE_APISERVER"
	// envKubeVersion is the Kubernetes version to build (default v1.37.2).
	envKubeVersion = "KLEIDI_E2E_KUBE_VERSION"
	// envKeep keeps the temporary directories (logs, etcd data) after the tests.
	envKeep = "KLEIDI_E2E_KEEP"
	// KLEIDI_CACHE (read by hack/kube-apiserver.sh) is the cache directory,
	// default $HOME/.cache/kleidi.
)

const defaultKubeVersion = "v1.37.2"

var repoRoot = func() string {
	wd, err := os.Getwd()
	if err != nil {
		panic(err)
	}
	return filepath.Clean(filepath.Join(wd, "..", ".."))
}()

func TestMain(m *testing.M) {
	start := time.Now()
	code := m.Run()
	kleidiServerBinary.remove()
	kleidiBenchBinary.remove()
	fmt.Printf("e2e suite wall time: %s\n", time.Since(start).Round(time.Millisecond))
	os.Exit(code)
}

var (
	kasOnce sync.Once
	kasPath string
	kasErr  error
)

// kubeAPIServer returns the path of a kube-apiserver binary, building it on
// first use (several minutes) through hack/kube-apiserver.sh.
func kubeAPIServer(t testing.TB) string {
	t.Helper()
	kasOnce.Do(func() {
		if p := os.Getenv(envKubeAPIServer); p != "" {
			kasPath = p
			return
		}
		version := os.Getenv(envKubeVersion)
		if version == "" {
			version = defaultKubeVersion
		}
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
		defer cancel()
		cmd := commandContext(ctx, filepath.Join(repoRoot, "hack", "kube-apiserver.sh"), version)
		var out bytes.Buffer
		cmd.Stdout = &out
		cmd.Stderr = os.Stderr // progress of a first-time build
		if err := cmd.Run(); err != nil {
			kasErr = fmt.Errorf("hack/kube-apiserver.sh %s: %w (it needs Go and access to the Go module proxy)", version, err)
			return
		}
		kasPath = strings.TrimSpace(out.String())
		t.Logf("kube-apiserver %s at %s (%s)", version, kasPath, time.Since(start).Round(time.Millisecond))
	})
	if kasErr != nil {
		t.Fatal(kasErr)
	}
	if _, err := os.Stat(kasPath); err != nil {
		t.Fatalf("kube-apiserver binary: %v", err)
	}
	return kasPath
}

// goBinary is a program of this repository, built once per run into a directory every uid can read (the plugin
// runs as a non-root uid).
type goBinary struct {
	name, moduleDir, pkg string // moduleDir is relative to the repository root
	once                 sync.Once
	path                 string
	err                  error
}

var (
	kleidiServerBinary = &goBinary{name: "kleidi-server", moduleDir: "examples/kleidi-server", pkg: "."}
	kleidiBenchBinary  = &goBinary{name: "kleidi-bench", moduleDir: "examples/kleidi-bench", pkg: "."}
)

// build returns the binary's path, building it on first use.
func (g *goBinary) build(t testing.TB) string {
	t.Helper()
	g.once.Do(func() {
		start := time.Now()
		dir, err := os.MkdirTemp("", "kleidi-e2e-bin-")
		if err == nil {
			err = os.Chmod(dir, 0o755)
		}
		if err != nil {
			g.err = err
			return
		}
		g.path = filepath.Join(dir, g.name)
		cmd := exec.Command("go", "build", "-o", g.path, g.pkg)
		cmd.Dir = filepath.Join(repoRoot, g.moduleDir)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=1") // the pkcs11 provider needs cgo
		if out, err := cmd.CombinedOutput(); err != nil {
			g.err = fmt.Errorf("go build %s: %v\n%s", g.name, err, out)
			return
		}
		t.Logf("built %s in %s", g.name, time.Since(start).Round(time.Millisecond))
	})
	if g.err != nil {
		t.Fatal(g.err)
	}
	return g.path
}

// remove deletes the binary's directory, if it was built.
func (g *goBinary) remove() {
	if g.path != "" {
		os.RemoveAll(filepath.Dir(g.path))
	}
}

// kleidiServer returns kleidi-server built from this checkout.
func kleidiServer(t testing.TB) string { return kleidiServerBinary.build(t) }

// workDir makes a short temporary directory (unix socket paths are limited to
// 108 bytes) that any uid may traverse but not list, removed at the end of the test.
func workDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if os.Getenv(envKeep) != "" {
			t.Logf("kept %s", dir)
			return
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Logf("remove %s: %v", dir, err)
		}
	})
	return dir
}

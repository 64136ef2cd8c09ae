// Package cmdutil holds what kleidi-operator and kleidi-agent share: the scheme of the objects they use, the
// version they print, and their logger.
package cmdutil

import (
	"fmt"
	"log/slog"
	"os"
	"runtime/debug"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"

	kleidiv1 "github.com/kleidi-kms/kleidi/operator/api/v1alpha1"
)

// Version is the release version, set at build time with
// -ldflags "-X github.com/kleidi-kms/kleidi/operator/internal/cmdutil.Version=v1.2.3"; without it, the module
// version or VCS revision the binary was built from.
var Version = ""

// VersionString returns the program's version line.
func VersionString(program string) string {
	v := Version
	if bi, ok := debug.ReadBuildInfo(); ok && v == "" {
		v = bi.Main.Version
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && (v == "" || v == "(devel)") {
				v = "devel-" + s.Value
			}
		}
	}
	if v == "" {
		v = "(devel)"
	}
	return fmt.Sprintf("%s %s", program, v)
}

// Scheme returns a scheme with the built-in kinds and the kleidi.dev kinds.
func Scheme() *runtime.Scheme {
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		panic(err)
	}
	if err := kleidiv1.AddToScheme(s); err != nil {
		panic(err)
	}
	return s
}

// Logger returns a JSON logger on standard error at level ("debug", "info", "warn" or "error").
func Logger(level string) (logr.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return logr.Logger{}, fmt.Errorf("--log-level: %v", err)
	}
	return logr.FromSlogHandler(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: l})), nil
}

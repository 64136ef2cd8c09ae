package deploy_test

import (
	"context"
	"debug/elf"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestContainerfile(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(deployDir, "Containerfile"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	froms := regexp.MustCompile(`(?m)^FROM .*$`).FindAllString(text, -1)
	if len(froms) < 2 {
		t.Errorf("want a multi-stage build, got %d FROM lines", len(froms))
	}
	// Every base pinned by digest, its tag kept beside it for the reader.
	for _, f := range froms {
		if !regexp.MustCompile(`^FROM (?:--platform=\S+ )?\S+:[\w.-]+@sha256:[0-9a-f]{64}(?: AS [\w-]+)?$`).MatchString(f) {
			t.Errorf("Containerfile: %q is not pinned as name:tag@sha256:digest", f)
		}
	}
	// The build stage runs on the build host and cross-compiles for the target.
	mustMatch(t, "Containerfile", text, `(?m)^FROM --platform=\$BUILDPLATFORM \S+ AS build$`, 1)
	mustMatch(t, "Containerfile", text, `(?m)^ARG TARGETOS\b`, 1)
	mustMatch(t, "Containerfile", text, `(?m)^ARG TARGETARCH$`, 1)
	mustMatch(t, "Containerfile", text, `GOOS=\$\{TARGETOS\} GOARCH=\$\{TARGETARCH\}`, 1)
	mustMatch(t, "Containerfile", text, `CGO_ENABLED=0`, 1)
	mustMatch(t, "Containerfile", text, `(?m)go -C examples/kleidi-server build -trimpath .* \.$`, 1)
	mustMatch(t, "Containerfile", text, `(?m)^FROM gcr.io/distroless/static\S*:nonroot@sha256:[0-9a-f]{64}$`, 1)
	for _, label := range []string{"title", "description", "source", "version", "revision", "documentation"} {
		mustMatch(t, "Containerfile", text, `org\.opencontainers\.image\.`+label+`="[^"]+"`, 1)
	}
	mustMatch(t, "Containerfile", text, `(?m)^USER 65532:65532$`, 1)
	mustMatch(t, "Containerfile", text, `(?m)^COPY --from=build /out/kleidi-server /usr/local/bin/kleidi-server$`, 1)
	mustMatch(t, "Containerfile", text, `(?m)^ENTRYPOINT \["/usr/local/bin/kleidi-server"\]$`, 1)

	// The cgo target: CGO_ENABLED=1 with OpenSSL's headers (the TPM simulator) on a glibc base with libstdc++
	// (C++ PKCS#11 modules), the same user and entrypoint. The static image stays the default: the last stage.
	stages := regexp.MustCompile(`(?m)^FROM `).Split(text, -1)[1:]
	stage := func(name string) string {
		for _, st := range stages {
			if strings.HasSuffix(strings.SplitN(st, "\n", 2)[0], " AS "+name) {
				return st
			}
		}
		t.Fatalf("Containerfile: no stage %s", name)
		return ""
	}
	buildCgo := stage("build-cgo")
	mustMatch(t, "Containerfile build-cgo", buildCgo, `libssl-dev`, 1)
	mustMatch(t, "Containerfile build-cgo", buildCgo, `CGO_ENABLED=1 \\\n\s+go -C examples/kleidi-server build -trimpath -ldflags="-s -w" -o /out/kleidi-server \.\n`, 1)
	mustNotMatch(t, "Containerfile build-cgo", buildCgo, `CGO_ENABLED=0`)
	cgo := stage("cgo")
	mustMatch(t, "Containerfile cgo", cgo, `^gcr.io/distroless/cc-debian12:nonroot@sha256:[0-9a-f]{64} AS cgo\n`, 1)
	mustMatch(t, "Containerfile cgo", cgo, `(?m)^COPY --from=build-cgo /out/kleidi-server /usr/local/bin/kleidi-server$`, 1)
	mustMatch(t, "Containerfile cgo", cgo, `(?m)^USER 65532:65532$`, 1)
	mustMatch(t, "Containerfile cgo", cgo, `(?m)^ENTRYPOINT \["/usr/local/bin/kleidi-server"\]$`, 1)
	for _, label := range []string{"title", "description", "source", "version", "revision", "documentation"} {
		mustMatch(t, "Containerfile cgo", cgo, `org\.opencontainers\.image\.`+label+`="[^"]+"`, 1)
	}
	last := stages[len(stages)-1]
	mustMatch(t, "Containerfile last stage", last, `^gcr.io/distroless/static\S*:nonroot@sha256:[0-9a-f]{64}\n`, 1)
	mustMatch(t, "Containerfile last stage", last, `(?m)^COPY --from=build /out/kleidi-server `, 1)
	mustMatch(t, "Containerfile", text, `--target cgo -t ghcr\.io/kleidi-kms/kleidi:0\.1\.0-cgo`, 1)

	// .containerignore keeps the context to the root module's Go sources, and keeps every package the build reads.
	ig, err := os.ReadFile(filepath.Join(repoRoot, ".containerignore"))
	if err != nil {
		t.Fatal(err)
	}
	rules := string(ig)
	for _, re := range []string{`(?m)^\*$`, `(?m)^!\*\*/go\.mod$`, `(?m)^!\*\*/go\.sum$`, `(?m)^!\*\*/\*\.go$`, `(?m)^\*\*/\*_test\.go$`} {
		mustMatch(t, ".containerignore", rules, re, 1)
	}
	out := mustRun(t, filepath.Join(repoRoot, "examples", "kleidi-server"), "go", "list", "-deps", "-f", "{{if not .Standard}}{{.Dir}}{{end}}", ".")
	for dir := range strings.SplitSeq(strings.TrimSpace(out), "\n") {
		rel, err := filepath.Rel(repoRoot, dir)
		if err != nil || strings.HasPrefix(rel, "..") {
			continue // a dependency from the module cache
		}
		for _, m := range regexp.MustCompile(`(?m)^([a-z][^*!\n]*)/$`).FindAllStringSubmatch(rules, -1) {
			if rel == m[1] || strings.HasPrefix(rel, m[1]+"/") {
				t.Errorf(".containerignore leaves out %s, which the build reads", rel)
			}
		}
	}
}

// TestContainerfileCgoBuild builds kleidi-server as the Containerfile's cgo target does (no registry is reachable
// here, so not the image itself), checks that it needs no shared library its distroless/cc base lacks, nor does
// SoftHSM's PKCS#11 module, and that it runs what the static image cannot: the in-process TPM simulator, served as
// the image's non-root uid, and the pkcs11 provider.
func TestContainerfileCgoBuild(t *testing.T) {
	dir, err := os.MkdirTemp("", "kleidi-deploy-cgo-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "kleidi-server")
	out, err := run(t, 10*time.Minute, filepath.Join(repoRoot, "examples", "kleidi-server"), []string{"CGO_ENABLED=1"}, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, ".")
	if err != nil {
		t.Fatalf("CGO_ENABLED=1 go build (examples/kleidi-server): %v\n%s", err, out)
	}
	const softhsm = "/usr/lib/softhsm/libsofthsm2.so"
	for _, f := range []string{bin, softhsm} {
		libs := neededLibs(t, f)
		t.Logf("%s needs %v", filepath.Base(f), libs)
		for _, l := range libs {
			if !slices.Contains(distrolessCCLibs, l) {
				t.Errorf("%s needs %s, which distroless/cc-debian12 does not ship", f, l)
			}
		}
	}

	t.Run("tpm-simulator", func(t *testing.T) {
		n := newNode(t, bin)
		n.serve(t, nil, append(n.serveFlags(), "--provider=tpm", "--tpm=simulator"), nil)
	})

	// The cgo build gets as far as loading the module; the static one refuses before.
	t.Run("pkcs11", func(t *testing.T) {
		n := newNode(t, bin)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		missing := filepath.Join(n.dir, "missing-module.so")
		pin := filepath.Join(n.stateDir, "pin")
		if err := os.WriteFile(pin, []byte("5678\n"), 0o400); err != nil {
			t.Fatal(err)
		}
		n.chown(t, pin)
		out, err := n.command(ctx, "init", "--state-dir="+n.stateDir, "--provider=pkcs11", "--pkcs11-module="+missing,
			"--pkcs11-token=kleidi", "--pkcs11-key=kleidi", "--pkcs11-pin-file="+pin).CombinedOutput()
		if err == nil {
			t.Fatalf("init with a missing PKCS#11 module succeeded:\n%s", out)
		}
		if strings.Contains(string(out), "cgo") || !strings.Contains(string(out), "missing-module.so") {
			t.Errorf("init --provider pkcs11 in the cgo build: want an error naming the missing module, not cgo:\n%s", out)
		}
		t.Logf("init --provider pkcs11 (module missing): %s", lastLine(string(out)))
	})
}

// neededLibs returns the DT_NEEDED shared libraries of an ELF file and its program interpreter.
func neededLibs(t *testing.T, path string) []string {
	t.Helper()
	f, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	libs, err := f.ImportedLibraries()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			b, err := io.ReadAll(p.Open())
			if err != nil {
				t.Fatal(err)
			}
			libs = append(libs, filepath.Base(strings.TrimRight(string(b), "\x00")))
		}
	}
	return libs
}

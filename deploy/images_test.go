package deploy_test

// This file: the images of deploy/images, built offline FROM scratch by deploy/images/build.sh and run with podman.

import (
	"archive/tar"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// podmanRun are the podman flags every container of these tests runs with: runc and cgroupfs (crun fails on
// the cgroups of some hosts), and limits no higher than the host's, which a host without CAP_SYS_RESOURCE
// cannot raise (podman's defaults would). No network: nothing here needs one.
var podmanRun = []string{"--runtime", "runc", "--cgroup-manager=cgroupfs", "run", "--network=none",
	"--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"}

// podmanHardening are the security settings of the chart's pods, given to every container here.
var podmanHardening = []string{"--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges"}

// image is one target of deploy/images/Containerfile.
type image struct {
	name, binary string
}

var images = []image{
	{"kleidi", "kleidi-server"},
	{"kleidi-operator", "kleidi-operator"},
	{"kleidi-agent", "kleidi-agent"},
}

// TestImages builds every image with deploy/images/build.sh (static binaries, podman build FROM scratch) and
// checks what each holds (its binary, /etc/passwd and /etc/group, nothing else), its user, labels and size; then
// it runs them: the plugin initialises a keyring on a real swtpm reached through a unix socket mounted into the
// container and serves, as uid 65532 on a read-only root, and its status subcommand, run from the same image,
// says healthy; the operator and the agent print their version.
func TestImages(t *testing.T) {
	podman := podmanBin(t)
	for _, tool := range []string{"runc", "swtpm"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found on PATH: install it (apt-get install podman runc swtpm)", tool)
		}
	}
	registry := fmt.Sprintf("localhost/kleidi-test-%d", time.Now().UnixNano())
	const version = "0.0.0-test"
	for _, img := range images {
		t.Run(img.name, func(t *testing.T) {
			start := time.Now()
			out, err := run(t, 15*time.Minute, repoRoot, []string{"REGISTRY=" + registry, "VERSION=" + version, "REVISION=0123abc"},
				"bash", filepath.Join(deployDir, "images", "build.sh"), img.name)
			if err != nil {
				t.Fatalf("deploy/images/build.sh %s: %v\n%s", img.name, err, out)
			}
			ref := registry + "/" + img.name + ":" + version
			if !strings.Contains(out, ref+"\n") {
				t.Fatalf("deploy/images/build.sh %s does not print %s:\n%s", img.name, ref, out)
			}
			t.Cleanup(func() { run(t, time.Minute, "", nil, podman, "rmi", "--force", ref) })
			t.Logf("built %s in %s", ref, time.Since(start).Round(100*time.Millisecond))
			checkImage(t, podman, ref, img, version)
			if img.name == "kleidi" {
				runPluginImage(t, podman, ref)
				return
			}
			out, err = run(t, 2*time.Minute, "", nil, podman, append(append(slices.Clone(podmanRun), podmanHardening...), "--rm", ref, "--version")...)
			if err != nil {
				t.Fatalf("podman run %s --version: %v\n%s", ref, err, out)
			}
			if !strings.Contains(out, img.binary) || !strings.Contains(out, version) {
				t.Errorf("%s --version = %q, want it to name %s and %s", img.name, strings.TrimSpace(out), img.binary, version)
			}
			t.Logf("%s --version: %s", img.name, strings.TrimSpace(out))
			if img.name == "kleidi-agent" {
				// The agent says when it runs as root; in its image it does not. Without a cluster it then stops.
				out, err = run(t, 2*time.Minute, "", nil, podman, append(append(slices.Clone(podmanRun), podmanHardening...), "--rm", ref,
					"--node-name=cp-1", "--admin-socket=unix:///run/kleidi/admin.sock")...)
				if err == nil || strings.Contains(out, "running as root") {
					t.Errorf("kleidi-agent without a cluster: err = %v, want an error and no root warning:\n%s", err, out)
				}
				t.Logf("kleidi-agent without a cluster: %s", lastLine(out))
			}
		})
	}
}

// checkImage checks an image's configuration and, through podman export, every file it holds.
func checkImage(t *testing.T, podman, ref string, img image, version string) {
	t.Helper()
	out := mustRun(t, "", podman, "image", "inspect", ref)
	var inspect []struct {
		Size   int64
		Config struct {
			User       string
			Entrypoint []string
			Labels     map[string]string
		}
	}
	if err := json.Unmarshal([]byte(out), &inspect); err != nil || len(inspect) != 1 {
		t.Fatalf("podman image inspect %s: %v\n%s", ref, err, out)
	}
	cfg := inspect[0].Config
	bin := "/usr/local/bin/" + img.binary
	if cfg.User != "65532:65532" {
		t.Errorf("%s: User %q, want 65532:65532", ref, cfg.User)
	}
	if !slices.Equal(cfg.Entrypoint, []string{bin}) {
		t.Errorf("%s: Entrypoint %q, want [%s]", ref, cfg.Entrypoint, bin)
	}
	for label, want := range map[string]string{
		"org.opencontainers.image.title":    img.name,
		"org.opencontainers.image.version":  version,
		"org.opencontainers.image.revision": "0123abc",
		"org.opencontainers.image.source":   "https://github.com/kleidi-kms/kleidi",
	} {
		if got := cfg.Labels[label]; got != want {
			t.Errorf("%s: label %s = %q, want %q", ref, label, got, want)
		}
	}
	for _, label := range []string{"description", "url", "documentation"} {
		if cfg.Labels["org.opencontainers.image."+label] == "" {
			t.Errorf("%s: no label org.opencontainers.image.%s", ref, label)
		}
	}

	// The image's files: podman export of a container made from it (never started).
	ctr := strings.TrimSpace(mustRun(t, "", podman, "create", ref))
	defer run(t, time.Minute, "", nil, podman, "rm", "--force", ctr)
	tarFile := filepath.Join(t.TempDir(), "rootfs.tar")
	mustRun(t, "", podman, "export", "--output", tarFile, ctr)
	files := imageFiles(t, tarFile)
	var binSize int64
	var names []string
	for name, h := range files {
		if h.Typeflag == tar.TypeDir {
			continue
		}
		names = append(names, name)
		switch name {
		case "etc/passwd", "etc/group":
			if h.Mode&0o777 != 0o644 || h.Uid != 0 {
				t.Errorf("%s: /%s mode %o uid %d, want 0644 root", ref, name, h.Mode&0o777, h.Uid)
			}
		case strings.TrimPrefix(bin, "/"):
			binSize = h.Size
			// Root's, executable by anyone, writable by nobody: uid 65532 cannot replace its own binary.
			if h.Mode&0o777 != 0o555 || h.Uid != 0 {
				t.Errorf("%s: %s mode %o uid %d, want 0555 root", ref, bin, h.Mode&0o777, h.Uid)
			}
		}
	}
	slices.Sort(names)
	// Podman's run-time mount points (empty files it adds on export) aside, the image holds three files.
	names = slices.DeleteFunc(names, func(n string) bool {
		return slices.Contains([]string{"etc/hostname", "etc/hosts", "etc/resolv.conf", "run/.containerenv"}, n) && files[n].Size == 0
	})
	if want := []string{"etc/group", "etc/passwd", strings.TrimPrefix(bin, "/")}; !slices.Equal(names, want) {
		t.Errorf("%s holds %q, want exactly %q", ref, names, want)
	}
	passwd := readTarFile(t, tarFile, "etc/passwd")
	mustMatch(t, ref+" /etc/passwd", passwd, `(?m)^nonroot:x:65532:65532:`, 1)
	mustMatch(t, ref+" /etc/group", readTarFile(t, tarFile, "etc/group"), `(?m)^nonroot:x:65532:`, 1)
	// Small: the binary and a few hundred bytes.
	if size := inspect[0].Size; binSize == 0 || size > binSize+64<<10 {
		t.Errorf("%s: image size %d bytes, binary %d: want at most the binary and 64 KiB", ref, size, binSize)
	}
	t.Logf("%s: %d bytes (binary %d), user %s, files %v", ref, inspect[0].Size, binSize, cfg.User, names)
}

// runPluginImage serves the plugin image on a keyring it creates on first start (serve --init) on a real swtpm,
// reached through swtpm's unix socket mounted into the container, and asks the running plugin for its status
// from a second container of the same image.
func runPluginImage(t *testing.T, podman, ref string) {
	dir, err := os.MkdirTemp("", "kleidi-image-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	asRoot := os.Geteuid() == 0
	mkdir := func(name string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.Mkdir(p, mode); err != nil {
			t.Fatal(err)
		}
		if asRoot {
			if err := os.Chown(p, pluginID, pluginID); err != nil {
				t.Fatal(err)
			}
		}
		return p
	}
	stateDir, sockDir := mkdir("lib", 0o700), mkdir("run", 0o750)
	tpmSock := startSwtpmUnix(t, dir)
	if asRoot {
		// The TPM belongs to the plugin's user on the host, as /dev/tpmrm0 belongs to its group.
		if err := os.Chown(tpmSock, pluginID, pluginID); err != nil {
			t.Fatal(err)
		}
	}
	mounts := []string{"-v", tpmSock + ":/run/swtpm/sock", "-v", stateDir + ":/var/lib/kleidi", "-v", sockDir + ":/run/kleidi"}
	name := fmt.Sprintf("kleidi-image-test-%d", time.Now().UnixNano())
	args := append(append(append(slices.Clone(podmanRun), podmanHardening...), mounts...), "--detach", "--name", name, ref,
		"serve", "--init", "--provider=tpm", "--tpm=unix:///run/swtpm/sock", "--state-dir=/var/lib/kleidi",
		"--listen=unix:///run/kleidi/kms.sock", "--socket-mode=0600", "--log-format=json")
	start := time.Now()
	if out, err := run(t, 2*time.Minute, "", nil, podman, args...); err != nil {
		t.Fatalf("podman run %s serve --init: %v\n%s", ref, err, out)
	}
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := run(t, time.Minute, "", nil, podman, "logs", name)
			t.Logf("plugin container log:\n%s", out)
		}
		run(t, time.Minute, "", nil, podman, "rm", "--force", "--time=5", name)
	})

	status, err := run(t, 2*time.Minute, "", nil, podman, append(append(append(slices.Clone(podmanRun), podmanHardening...),
		"-v", sockDir+":/run/kleidi:ro"), "--rm", ref, "status", "--listen=unix:///run/kleidi/kms.sock", "--wait=60s")...)
	if err != nil {
		t.Fatalf("kleidi-server status (in the image): %v\n%s", err, status)
	}
	if !strings.Contains(status, "healthz: ok") || !strings.HasPrefix(keyID(status), "kleidi-tpm-") {
		t.Fatalf("kleidi-server status = %q, want healthz: ok and a kleidi-tpm- key_id", status)
	}
	t.Logf("status after %s: %s", time.Since(start).Round(100*time.Millisecond), strings.Join(strings.Fields(status), " "))

	// The container's process runs as 65532:65532, with no capability.
	pid := strings.TrimSpace(mustRun(t, "", podman, "inspect", "--format", "{{.State.Pid}}", name))
	b, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		t.Fatal(err)
	}
	proc := string(b)
	for _, re := range []string{`(?m)^Uid:\s+65532\s+65532\s+65532\s+65532$`, `(?m)^Gid:\s+65532\s+65532\s+65532\s+65532$`,
		`(?m)^CapEff:\s+0+$`, `(?m)^NoNewPrivs:\s+1$`} {
		if !regexp.MustCompile(re).MatchString(proc) {
			t.Errorf("the plugin's process (pid %s) does not match %s:\n%s", pid, re, proc)
		}
	}
	// The keyring it created is on the host's state directory, and belongs to the plugin's user.
	fi, err := os.Stat(filepath.Join(stateDir, "keyring.json"))
	if err != nil {
		entries, _ := os.ReadDir(stateDir)
		t.Fatalf("no keyring in the state directory (%v): %v", entries, err)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); asRoot && ok && (st.Uid != pluginID || st.Gid != pluginID) {
		t.Errorf("the keyring belongs to %d:%d, want %d:%d", st.Uid, st.Gid, pluginID, pluginID)
	}
	t.Logf("keyring %s: %d bytes", fi.Name(), fi.Size())
}

// startSwtpmUnix starts swtpm serving the TPM on a unix socket in dir and returns the socket's path.
func startSwtpmUnix(t *testing.T, dir string) string {
	t.Helper()
	state := filepath.Join(dir, "tpm")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(state, "sock")
	cmd := exec.Command("swtpm", "socket", "--tpm2", "--tpmstate", "dir="+state,
		"--server", "type=unixio,path="+sock, "--ctrl", "type=unixio,path="+filepath.Join(state, "ctrl"),
		"--flags", "not-need-init,startup-clear")
	logf, err := os.Create(filepath.Join(dir, "swtpm.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return sock
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("swtpm made no socket %s within 15 s:\n%s", sock, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// podmanBin finds podman; the images cannot be tested without it.
func podmanBin(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("podman")
	if err != nil {
		t.Fatal("podman not found on PATH: install it with `apt-get install podman runc` (.ci/run does)")
	}
	return p
}

// imageFiles reads the headers of an exported root file system, by path without a leading slash.
func imageFiles(t *testing.T, tarFile string) map[string]*tar.Header {
	t.Helper()
	f, err := os.Open(tarFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	files := map[string]*tar.Header{}
	r := tar.NewReader(f)
	for {
		h, err := r.Next()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("reading %s: %v", tarFile, err)
			}
			return files
		}
		files[strings.TrimSuffix(strings.TrimPrefix(strings.TrimPrefix(h.Name, "./"), "/"), "/")] = h
	}
}

// readTarFile returns the contents of one file of a tar archive.
func readTarFile(t *testing.T, tarFile, name string) string {
	t.Helper()
	f, err := os.Open(tarFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := tar.NewReader(f)
	for {
		h, err := r.Next()
		if err != nil {
			t.Fatalf("%s holds no %s: %v", tarFile, name, err)
		}
		if strings.TrimPrefix(strings.TrimPrefix(h.Name, "./"), "/") == name {
			b, err := io.ReadAll(r)
			if err != nil {
				t.Fatalf("reading %s from %s: %v", name, tarFile, err)
			}
			return string(b)
		}
	}
}

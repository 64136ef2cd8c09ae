package deploy_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestTmpfiles(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(deployDir, "tmpfiles.d", "kleidi.conf"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	mustMatch(t, "tmpfiles.d", text, `(?m)^d\s+/run/kleidi\s+0750\s+65532\s+65532\s+-$`, 1)
	mustMatch(t, "tmpfiles.d", text, `(?m)^d\s+/var/lib/kleidi\s+0700\s+65532\s+65532\s+-$`, 1)
	if p, err := exec.LookPath("systemd-tmpfiles"); err == nil {
		// --cat-config-free check: parse the file under a scratch root without creating anything in /.
		root := t.TempDir()
		out, err := run(t, time.Minute, "", nil, p, "--root="+root, "--create", filepath.Join(deployDir, "tmpfiles.d", "kleidi.conf"))
		if err != nil && os.Geteuid() == 0 {
			t.Errorf("systemd-tmpfiles --create under a scratch root: %v\n%s", err, out)
		}
		if os.Geteuid() == 0 {
			for _, d := range []string{"run/kleidi", "var/lib/kleidi"} {
				fi, err := os.Stat(filepath.Join(root, d))
				if err != nil {
					t.Errorf("systemd-tmpfiles did not create /%s: %v\n%s", d, err, out)
					continue
				}
				if st := fi.Sys().(*syscall.Stat_t); st.Uid != pluginID || st.Gid != pluginID {
					t.Errorf("/%s is owned by %d:%d, want %d:%d", d, st.Uid, st.Gid, pluginID, pluginID)
				}
			}
		}
	}
}

// TestSystemdUnit verifies the unit, alone and with its drop-ins, with systemd-analyze where it exists, and rates
// its sandboxing.
func TestSystemdUnit(t *testing.T) {
	unitPath := filepath.Join(deployDir, "systemd", "kleidi.service")
	b, err := os.ReadFile(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	for _, re := range []string{
		`(?m)^User=kleidi$`, `(?m)^Group=kleidi$`, `(?m)^ProtectSystem=strict$`,
		`(?m)^StateDirectory=kleidi$`, `(?m)^RuntimeDirectory=kleidi$`, `(?m)^RuntimeDirectoryPreserve=yes$`,
		`(?m)^NoNewPrivileges=yes$`, `(?m)^CapabilityBoundingSet=$`, `(?m)^Before=kubelet.service$`,
		`(?m)^WantedBy=.*\bkubelet.service\b`, `(?m)^EnvironmentFile=/etc/kleidi/kleidi.env$`,
		`(?m)^ExecStart=/usr/local/bin/kleidi-server serve$`, `(?m)^DevicePolicy=closed$`,
		`(?m)^IPAddressDeny=any$`, `(?m)^IPAddressAllow=localhost$`,
		// Restarted for ever: a TPM driver late at boot must not leave the plugin dead (a [Unit] setting).
		`(?m)^\[Unit\]\n(?:[^\[].*\n|\n)*StartLimitIntervalSec=0\n`, `(?m)^Restart=always$`,
	} {
		mustMatch(t, "kleidi.service", unit, re, 1)
	}
	// The TPM's group, device and ordering belong to the tpm drop-in only: a host without a tss group would fail
	// every start with 216/GROUP.
	mustNotMatch(t, "kleidi.service", unit, `(?m)^[^#\n]*(tss|tpmrm0|TPM)`)
	tpmConf, err := os.ReadFile(filepath.Join(deployDir, "systemd", "tpm.conf"))
	if err != nil {
		t.Fatal(err)
	}
	for _, re := range []string{
		`(?m)^\[Unit\]\n(?:#.*\n)*Wants=dev-tpmrm0.device\nAfter=dev-tpmrm0.device\n`, `(?m)^SupplementaryGroups=tss$`,
		`(?m)^DeviceAllow=/dev/tpmrm0 rw$`,
	} {
		mustMatch(t, "tpm.conf", string(tpmConf), re, 1)
	}
	mustNotMatch(t, "tpm.conf", string(tpmConf), `(?m)^Requires=`)
	remote, err := os.ReadFile(filepath.Join(deployDir, "systemd", "remote-metrics.conf"))
	if err != nil {
		t.Fatal(err)
	}
	mustMatch(t, "remote-metrics.conf", string(remote), `(?m)^\[Service\]\nIPAddressAllow=\S+$`, 1)
	sysusers, err := os.ReadFile(filepath.Join(deployDir, "systemd", "kleidi.sysusers"))
	if err != nil {
		t.Fatal(err)
	}
	mustMatch(t, "kleidi.sysusers", string(sysusers), `(?m)^u kleidi 65532 `, 1)

	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Log("systemd-analyze is not available on this machine: the unit was checked by the rules above only")
		return
	}
	// systemd-analyze verify fails on an ExecStart binary that does not exist, and kleidi-server is not
	// installed here: verify a copy whose ExecStart names an executable stand-in, with nothing else changed.
	dir := t.TempDir()
	stand := filepath.Join(dir, "kleidi-server")
	if err := os.WriteFile(stand, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	copyPath := filepath.Join(dir, "kleidi.service")
	if err := os.WriteFile(copyPath, []byte(strings.Replace(unit, "ExecStart=/usr/local/bin/kleidi-server", "ExecStart="+stand, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	verify := func(what string) string {
		t.Helper()
		out, err := run(t, time.Minute, dir, nil, analyze, "verify", copyPath)
		if err != nil || strings.TrimSpace(out) != "" {
			// Unknown or misspelt directives are only warnings to systemd; they fail here.
			t.Fatalf("systemd-analyze verify, %s: %v\n%s", what, err, out)
		}
		t.Logf("systemd-analyze verify, %s: no findings", what)
		out, err = run(t, time.Minute, dir, nil, analyze, "security", "--offline=yes", "--no-pager", copyPath)
		m := regexp.MustCompile(`Overall exposure level for kleidi.service: ([0-9.]+)`).FindStringSubmatch(out)
		if err != nil || m == nil {
			t.Logf("systemd-analyze security --offline is not supported here (%v); skipped the exposure rating", err)
			return ""
		}
		if level, _ := strconv.ParseFloat(m[1], 64); level > 2.0 {
			t.Errorf("systemd-analyze security, %s: exposure %s, want 2.0 or less:\n%s", what, m[1], out)
		}
		t.Logf("systemd-analyze security, %s: exposure %s", what, m[1])
		return out
	}
	verify("the unit alone")

	// With both drop-ins where systemctl finds them (kleidi.service.d beside the unit).
	dropins := filepath.Join(dir, "kleidi.service.d")
	if err := os.Mkdir(dropins, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, text := range map[string][]byte{"tpm.conf": tpmConf, "remote-metrics.conf": remote} {
		if err := os.WriteFile(filepath.Join(dropins, name), text, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	verify("with tpm.conf and remote-metrics.conf")
	// The drop-ins were read: a misspelt directive in one of them is found.
	if err := os.WriteFile(filepath.Join(dropins, "tpm.conf"), append(slices.Clone(tpmConf), "SupplementaryGroup=tss\n"...), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, _ := run(t, time.Minute, dir, nil, analyze, "verify", copyPath); !strings.Contains(out, "SupplementaryGroup") {
		t.Errorf("systemd-analyze verify did not read the drop-in: %s", out)
	}
}

// systemdEnv reads the active KEY=VALUE lines of deploy/systemd/kleidi.env, replacing the values of the keys in
// override (each of which must be there), as systemd's EnvironmentFile= does. With tpm, the file is first switched
// to the TPM as its comments say: the gpg lines commented out, the KLEIDI_PROVIDER=tpm and KLEIDI_TPM lines
// uncommented.
func systemdEnv(t *testing.T, tpm bool, override map[string]string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(deployDir, "systemd", "kleidi.env"))
	if err != nil {
		t.Fatal(err)
	}
	var env []string
	seen := map[string]bool{}
	for line := range strings.SplitSeq(string(b), "\n") {
		line = strings.TrimSpace(line)
		if tpm {
			switch {
			case strings.HasPrefix(line, "KLEIDI_PROVIDER=") || strings.HasPrefix(line, "KLEIDI_GPG_"):
				continue
			case strings.HasPrefix(line, "#KLEIDI_PROVIDER=tpm") || strings.HasPrefix(line, "#KLEIDI_TPM="):
				line = line[1:]
			}
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("kleidi.env: not KEY=VALUE: %q", line)
		}
		if o, ok := override[k]; ok {
			v, seen[k] = o, true
		}
		env = append(env, k+"="+v)
	}
	for k := range override {
		if !seen[k] {
			t.Fatalf("kleidi.env does not set %s", k)
		}
	}
	if want := map[bool]string{false: "KLEIDI_PROVIDER=gpg", true: "KLEIDI_PROVIDER=tpm"}[tpm]; !slices.Contains(env, want) {
		t.Fatalf("kleidi.env: no %s line to use", want)
	}
	return env
}

package e2e

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestDemoHA runs the HA demo as a reader runs it, `hack/demo.sh ha`, and checks what each of its steps prints,
// not only its exit status: the three plugins on one key id after enrollment, a Secret written through one
// apiserver read through the two others and stored encrypted, a coordinated rotation with no reader error and
// every Secret re-encrypted under the staged key, a cleared TPM reported unhealthy and its node joining again as a
// new member, every TPM cleared and recovered with the recovery key, and every Secret readable at the end. It also
// checks that the demo stops every process it started and removes its temporary directory.
func TestDemoHA(t *testing.T) {
	for _, tool := range [][2]string{
		{"etcd", "etcd-server"}, {"etcdctl", "etcd-client"}, {"swtpm", "swtpm"}, {"swtpm_setup", "swtpm-tools"},
		{"swtpm_localca", "swtpm-tools"}, {"gpg", "gnupg"}, {"openssl", "openssl"}, {"curl", "curl"},
	} {
		requireTool(t, tool[0], tool[1])
	}
	if os.Geteuid() == 0 {
		requireTool(t, "setpriv", "util-linux")
	}
	// The demo gets kube-apiserver from the same cache; a first build belongs to the suite, not to the demo's time.
	kubeAPIServer(t)

	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	start := time.Now()
	out, err := run(ctx, nil, filepath.Join(repoRoot, "hack", "demo.sh"), "ha")
	elapsed := time.Since(start).Round(time.Millisecond)
	if err != nil {
		t.Fatalf("hack/demo.sh ha: %v after %s\n%s", err, elapsed, out)
	}
	t.Logf("hack/demo.sh ha ran in %s", elapsed)
	d := &demoOutput{t: t, out: out}
	defer func() {
		if t.Failed() {
			t.Logf("the demo's output:\n%s", out)
		}
	}()

	// Enrollment: every plugin on the key cp1 made; a Secret written through apiserver 1 and read through 2 and 3.
	equal := d.all(`(?m)^ +key ids equal on the three nodes: (kleidi-tpm-[a-z2-7]{32})$`)
	if len(equal) != 5 {
		t.Fatalf("%d lines \"key ids equal on the three nodes\", want 5 (enrollment, rotation, a node joining again, "+
			"unenroll, recovery)", len(equal))
	}
	first := d.one(`(?m)^ +initialised .*\n +provider: tpm\n +key_id: (kleidi-tpm-[a-z2-7]{32})$`)
	if equal[0] != first {
		t.Errorf("after enrollment the plugins report %s, want the key init made, %s", equal[0], first)
	}
	for _, key := range equal {
		d.has(`(?m)^ +cp1: healthz ok, key_id `+key+`\n +cp2: healthz ok, key_id `+key+`\n +cp3: healthz ok, key_id `+key+`\n +key ids equal`,
			"each node's own status line before \"key ids equal\" "+key)
	}
	for _, s := range []string{"alpha", "beta", "gamma"} {
		d.has(`(?m)^ +`+s+` = `+s+`-[0-9a-f]{12} through apiserver 2 and through apiserver 3$`, "secret "+s+" read through apiservers 2 and 3")
	}
	d.has(`(?m)^ +k8s:enc:kms:v2:kleidi: \.\.\. key id `+first+`; no plaintext$`, "the etcd value of a Secret under the first key")

	// The coordinated rotation: staged, then active everywhere; zero reader errors; every Secret re-encrypted.
	staged := d.one(`(?m)^ +staged_key_id: (kleidi-tpm-[a-z2-7]{32})$`)
	if staged == first || equal[1] != staged {
		t.Errorf("rotation: staged %s, then the plugins report %s; want a new key, reported everywhere", staged, equal[1])
	}
	if n := strings.Count(out, "key_id: "+staged+"\n"); n < 3 {
		t.Errorf("activate printed key_id %s %d times, want once per node", staged, n)
	}
	m := d.match(`(?m)^ +reader errors: (\d+) \((\d+) reads through the three apiservers during the rotation and re-encryption\)$`)
	if m == nil {
		t.Fatal("no \"reader errors\" line")
	}
	if reads, _ := strconv.Atoi(m[2]); m[1] != "0" || reads < 9 {
		t.Errorf("reader during the rotation: %s errors in %s reads, want 0 errors in at least one round (9 reads)", m[1], m[2])
	}
	d.has(`(?m)^ +every Secret in etcd is now under `+staged+`$`, "every Secret re-encrypted under the staged key")

	// One TPM cleared: its plugin unhealthy, the node a new member that joins again; its old member unenrolled.
	d.has(`(?s)cp2's TPM is cleared.*\n +healthz: root of trust unhealthy\n`, "cp2's plugin reports unhealthy after its TPM is cleared")
	m = d.match(`(?m)^ +> cp2\.identity .*member ID: (tpm-[a-z2-7]+)\n +\(it was (tpm-[a-z2-7]+): a new TPM is a new member\)$`)
	if m == nil || m[1] == m[2] {
		t.Errorf("cp2 after its TPM was cleared: member IDs %v, want a new one", m)
	}
	if equal[2] != staged {
		t.Errorf("after cp2 joined again the plugins report %s, want %s", equal[2], staged)
	}
	d.has(`(?m)^ +every Secret reads through apiserver 2 again$`, "apiserver 2 reads every Secret after cp2 joined again")
	unenrolled := d.one(`(?m)^ +unenrolled: tpm-[a-z2-7]+\n +key_id: (kleidi-tpm-[a-z2-7]{32})$`)
	if unenrolled == staged || equal[3] != unenrolled {
		t.Errorf("unenroll rotated to %s, then the plugins report %s; want a new key, reported everywhere", unenrolled, equal[3])
	}

	// Every TPM cleared: recovery with the offline key keeps the key ids; every Secret readable at the end.
	for _, n := range []string{"cp1", "cp2", "cp3"} {
		d.has(`(?m)^ +`+n+`: unhealthy: root of trust unhealthy$`, n+" unhealthy once every TPM is cleared")
	}
	d.has(`(?m)^ +recovered (.*/)?cp1/state/keyring\.json for member tpm-[a-z2-7]+\n +key_id: `+unenrolled+`$`, "recover on cp1, keeping the active key")
	if equal[4] != unenrolled {
		t.Errorf("after recovery the plugins report %s, want %s", equal[4], unenrolled)
	}
	d.has(`(?m)^ +every Secret readable: 4 Secrets through each of the three apiservers$`, "every Secret readable at the end")
	if secs, _ := strconv.Atoi(d.one(`(?m)^==> \d+\. done in (\d+) s; stopping everything`)); secs > 90 {
		t.Errorf("the demo took %d s, want about a minute", secs)
	}
	if strings.Contains(out, "PRIVATE KEY") {
		t.Errorf("the demo printed a private key")
	}

	// Nothing is left behind: no temporary directory, no process of it.
	dir := d.one(`temporary directory (/\S+)\)`)
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("the demo's directory %s is still there (%v)", dir, err)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), dir) {
			t.Errorf("a process of the demo outlived it: %s", strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
}

// demoOutput matches patterns against what a demo printed.
type demoOutput struct {
	t   *testing.T
	out string
}

// match returns the submatches of the first match of pattern, or nil.
func (d *demoOutput) match(pattern string) []string {
	return regexp.MustCompile(pattern).FindStringSubmatch(d.out)
}

// one returns the first submatch of pattern's first match, and fails the test if there is none.
func (d *demoOutput) one(pattern string) string {
	d.t.Helper()
	m := d.match(pattern)
	if m == nil {
		d.t.Fatalf("the demo printed nothing that matches %q", pattern)
	}
	return m[1]
}

// all returns the first submatch of every match of pattern, in order.
func (d *demoOutput) all(pattern string) []string {
	var out []string
	for _, m := range regexp.MustCompile(pattern).FindAllStringSubmatch(d.out, -1) {
		out = append(out, m[1])
	}
	return out
}

// has fails the test if nothing the demo printed matches pattern; what says what that line shows.
func (d *demoOutput) has(pattern, what string) {
	d.t.Helper()
	if d.match(pattern) == nil {
		d.t.Errorf("the demo did not show %s (no match for %q)", what, pattern)
	}
}

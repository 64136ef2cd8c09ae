package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// keyringKeys reads the keys of a keyring file: their id, state and the roots of their copies.
func keyringKeys(t testing.TB, path string) []struct {
	ID      string
	State   string
	Wrapped []struct{ Root string }
} {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var ring struct {
		Keys []struct {
			ID      string
			State   string
			Wrapped []struct{ Root string }
		}
	}
	if err := json.Unmarshal(b, &ring); err != nil {
		t.Fatal(err)
	}
	return ring.Keys
}

// TestMigrateGPGToTPM moves a cluster from the gpg root to the tpm root without re-encrypting first, as
// docs/install.md says: Secrets written under gpg, the plugin stopped, `rewrap --from-gpg-private-key` adds the
// TPM's copy of every KEK (keeping every key id), the plugin started with the TPM flags reads every Secret and
// writes new ones, then a rotation and a re-encryption leave gpg out of every new KEK.
func TestMigrateGPGToTPM(t *testing.T) {
	start := time.Now()
	e := &env{provider: "gpg", ns: "e2e-migrate", want: map[string]map[string]string{}}
	e.dir = workDir(t, "kleidi-migrate-")
	e.procs = newProcs(t)
	e.setup(t)
	e.addSecret(t)
	e.addSecret(t)
	gpgKeyID := e.plugin.keyID(t)

	var priv, pass string
	for _, f := range e.plugin.providerFlags {
		if v, ok := strings.CutPrefix(f, "--gpg-private-key="); ok {
			priv = v
		}
		if v, ok := strings.CutPrefix(f, "--gpg-passphrase-file="); ok {
			pass = v
		}
	}
	uid := -1
	if os.Geteuid() == 0 {
		uid = pluginUID
	}
	e.tpm = startSwtpm(t, e.procs, filepath.Join(e.dir, "swtpm"), uid)
	tpmFlags := []string{"--tpm=" + e.tpm.addr(), "--tpm-pcrs=7"}

	e.plugin.proc.stop()
	out := e.plugin.cli(t, append([]string{"rewrap", "--state-dir=" + e.plugin.stateDir, "--provider=tpm",
		"--from-gpg-private-key=" + priv, "--from-gpg-passphrase-file=" + pass}, tpmFlags...)...)
	t.Logf("kleidi-server rewrap: %s", strings.TrimSpace(out))
	for _, r := range keyringKeys(t, filepath.Join(e.plugin.stateDir, "keyring.json")) {
		roots := map[string]bool{}
		for _, w := range r.Wrapped {
			roots[w.Root] = true
		}
		if !roots["gpg"] || !roots["tpm"] {
			t.Errorf("after the rewrap, key %s has roots %v, want gpg and tpm", r.ID, roots)
		}
	}

	e.plugin.provider, e.plugin.providerFlags = "tpm", tpmFlags
	e.plugin.start(t)
	if id := e.plugin.keyID(t); id != gpgKeyID {
		t.Fatalf("after the switch to the TPM the key id is %s, want %s (a rewrap keeps every key id)", id, gpgKeyID)
	}
	// The apiserver's DEK cache goes with its restart: every Secret written under gpg is decrypted through the TPM.
	e.c.restartAPIServer(t)
	e.waitAPIServerKMSHealthy(t)
	e.checkAllSecrets(t)
	e.addSecret(t)
	e.checkAllSecrets(t)

	// Rotate and re-encrypt: the new KEK is the TPM's alone.
	e.rotation(t)
	for _, r := range keyringKeys(t, filepath.Join(e.plugin.stateDir, "keyring.json")) {
		if r.State != "active" {
			continue
		}
		if !strings.HasPrefix(r.ID, "kleidi-tpm-") {
			t.Errorf("active key %s after the rotation, want a tpm key", r.ID)
		}
		for _, w := range r.Wrapped {
			if w.Root != "tpm" {
				t.Errorf("the new active key has a %s copy: the old root must not receive it", w.Root)
			}
		}
	}
	t.Logf("gpg to tpm migration: %s", time.Since(start).Round(time.Millisecond))
}

package main_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kleidi-kms/kleidi/gpg"
)

// TestRewrapRefusesToRemoveARecipient: dropping an OpenPGP recipient by rewrapping would revoke nothing, since
// every stored ciphertext carries a copy for it; the command refuses and says what to do instead.
func TestRewrapRefusesToRemoveARecipient(t *testing.T) {
	s := newSandbox(t)
	a, err := gpg.GenerateDevelopmentKey(filepath.Join(s.dir, "node-a"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := gpg.GenerateDevelopmentKey(filepath.Join(s.dir, "node-b")); err != nil {
		t.Fatal(err)
	}
	pubA, pubB := filepath.Join(s.dir, "node-a", gpg.DevelopmentPublicKeyFile), filepath.Join(s.dir, "node-b", gpg.DevelopmentPublicKeyFile)
	state := []string{"--state-dir", filepath.Join(s.dir, "state"), "--gpg-private-key", a.PrivateKeyFile}
	for _, args := range [][]string{
		append([]string{"init", "--gpg-public-key", pubA, "--gpg-public-key", pubB}, state...),
	} {
		if code, out, errOut := s.run(t, args...); code != 0 {
			t.Fatalf("kleidi-server %v = %d, %q, %q; want 0", args, code, out, errOut)
		}
	}
	code, out, errOut := s.run(t, append([]string{"rewrap", "--gpg-public-key", pubA}, state...)...)
	if code == 0 || !strings.Contains(errOut, "recipient removed") || !strings.Contains(errOut, "rotate") {
		t.Errorf("rewrap without recipient B = %d, %q, %q; want a refusal that says to rotate", code, out, errOut)
	}
	// Rotating to the remaining recipient is the way, and works.
	if code, out, errOut := s.run(t, append([]string{"rotate", "--gpg-public-key", pubA}, state...)...); code != 0 {
		t.Errorf("rotate with recipient A only = %d, %q, %q; want 0", code, out, errOut)
	}
}

// TestRewrapToAnotherTPMPolicy moves every KEK from PCR 7 to no PCR binding, the first half of the procedure for a
// firmware update: afterwards the plugin serves with --tpm-pcrs "" and refuses to serve with the old policy.
func TestRewrapToAnotherTPMPolicy(t *testing.T) {
	sock := startSwtpmUnix(t)
	s := newSandbox(t)
	_, client := s.startPlugin(t, "--provider", "tpm", "--tpm", sock, "--tpm-pcrs", "7")
	enc := encryptOK(t, client, "sealed to PCR 7")
	stateFlags := s.flags()[:2]
	code, out, errOut := s.run(t, append([]string{"rewrap", "--provider", "tpm", "--tpm", sock, "--from-tpm-pcrs", "7", "--tpm-pcrs", ""}, stateFlags...)...)
	if code != 0 || field(out, "key_id") != enc.KeyId {
		t.Fatalf("rewrap --from-tpm-pcrs 7 --tpm-pcrs \"\" = %d, %q, %q; want 0 and key_id %s", code, out, errOut, enc.KeyId)
	}
	if code, out, errOut := s.run(t, append([]string{"rotate", "--provider", "tpm", "--tpm", sock, "--tpm-pcrs", "7"}, stateFlags...)...); code == 0 {
		t.Errorf("rotate with the old policy after the rewrap = %d, %q, %q; want a refusal", code, out, errOut)
	}
	if code, out, errOut := s.run(t, append([]string{"rotate", "--provider", "tpm", "--tpm", sock, "--tpm-pcrs", ""}, stateFlags...)...); code != 0 {
		t.Errorf("rotate with no PCRs after the rewrap = %d, %q, %q; want 0", code, out, errOut)
	}
}

// TestInitPinsTheStorageRootKey: init records the TPM's storage root key in the state directory, and every later
// process refuses a TPM that presents another one (a replaced or cleared TPM, or something answering in its place)
// before it uses it.
func TestInitPinsTheStorageRootKey(t *testing.T) {
	first, other := startSwtpmUnix(t), startSwtpmUnix(t)
	s := newSandbox(t)
	stateFlags := s.flags()[:2]
	if code, out, errOut := s.run(t, append([]string{"init", "--provider", "tpm", "--tpm", first}, stateFlags...)...); code != 0 {
		t.Fatalf("init = %d, %q, %q", code, out, errOut)
	}
	pin, err := os.ReadFile(filepath.Join(s.dir, "state", "tpm-srk-name"))
	if err != nil || len(strings.TrimSpace(string(pin))) != 68 {
		t.Fatalf("state/tpm-srk-name = %q, %v; want a 68-digit hex TPM name", pin, err)
	}
	code, out, errOut := s.run(t, append([]string{"rotate", "--provider", "tpm", "--tpm", other}, stateFlags...)...)
	if code == 0 || !strings.Contains(errOut, "not the pinned") {
		t.Errorf("rotate on another TPM = %d, %q, %q; want a refusal: not the pinned storage root key", code, out, errOut)
	}
	if code, out, errOut := s.run(t, append([]string{"rotate", "--provider", "tpm", "--tpm", first}, stateFlags...)...); code != 0 {
		t.Errorf("rotate on the pinned TPM = %d, %q, %q; want 0", code, out, errOut)
	}
}

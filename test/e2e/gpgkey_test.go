package e2e

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// gpgKey makes an OpenPGP key pair with GnuPG, outside any kleidi state
// directory, and returns the armored public and private key files and the
// passphrase file, readable by uid.
func gpgKey(t testing.TB, dir string, uid int) (pub, priv, pass string) {
	t.Helper()
	requireTool(t, "gpg", "gnupg")
	home := filepath.Join(dir, "gnupg")
	if err := os.MkdirAll(home, 0o700); err != nil {
		t.Fatal(err)
	}
	pass = filepath.Join(dir, "passphrase")
	writeFile(t, pass, "e2e-"+randHex(t, 12)+"\n", 0o600)
	gpg := []string{"gpg", "--homedir", home, "--batch", "--no-tty", "--pinentry-mode", "loopback", "--passphrase-file", pass}
	defer func() {
		// gpg starts an agent for the home directory; it must not outlive the test.
		_, _ = run(context.Background(), nil, "gpgconf", "--homedir", home, "--kill", "all")
	}()
	email := "e2e@kleidi.invalid"
	mustRun(t, nil, append(gpg, "--quick-generate-key", "kleidi e2e <"+email+">", "future-default", "default", "never")...)
	pub = filepath.Join(dir, "public.asc")
	priv = filepath.Join(dir, "private.asc")
	writeFile(t, pub, mustRun(t, nil, append(gpg, "--armor", "--export", email)...), 0o644)
	writeFile(t, priv, mustRun(t, nil, append(gpg, "--armor", "--export-secret-keys", email)...), 0o600)
	for _, f := range []string{pub, priv, pass} {
		if uid >= 0 {
			if err := os.Chown(f, uid, uid); err != nil {
				t.Fatal(err)
			}
		}
	}
	return pub, priv, pass
}

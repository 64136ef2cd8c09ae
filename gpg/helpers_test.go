package gpg_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp/armor"
	"github.com/ProtonMail/go-crypto/openpgp/packet"
	v2 "github.com/ProtonMail/go-crypto/openpgp/v2"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/gpg"
)

var ctx = context.Background()

// keyOptions describe a key made with go-crypto for a test.
type keyOptions struct {
	v6           bool          // an RFC 9580 version 6 key (Ed25519, X25519); else version 4 Ed25519 + Curve25519
	passphrase   string        // protect the private key
	created      time.Time     // creation time; zero is now
	lifetime     time.Duration // key expiration after creation; zero is never
	revoked      bool          // add a revocation signature
	noEncryption bool          // drop the encryption subkey: a signing-only key
	signing      bool          // add a signing subkey
	revokeSigner bool          // add a signing subkey and revoke it
	armored      bool          // write ASCII armor instead of binary
}

// testKey is a key pair on disk.
type testKey struct {
	pub, priv string     // file paths
	fpr       string     // fingerprint of the primary key, upper-case hex
	entity    *v2.Entity // the key in memory, with its private keys (protected if o.passphrase is set)
}

// newTestKey makes a key with go-crypto and writes it to files in a new temporary directory.
func newTestKey(t testing.TB, o keyOptions) testKey {
	t.Helper()
	created := o.created
	if created.IsZero() {
		created = time.Now()
	}
	config := &packet.Config{
		Algorithm:       packet.PubKeyAlgoEdDSA,
		Curve:           packet.Curve25519,
		Time:            func() time.Time { return created },
		KeyLifetimeSecs: uint32(o.lifetime / time.Second),
	}
	if o.v6 {
		config.Algorithm, config.Curve, config.V6Keys = packet.PubKeyAlgoEd25519, "", true
	}
	e, err := v2.NewEntity("kleidi test", "", "test@kleidi.test", config)
	if err != nil {
		t.Fatalf("v2.NewEntity() err = %v, want nil", err)
	}
	if o.noEncryption {
		e.Subkeys = nil
	}
	if o.signing || o.revokeSigner {
		if err := e.AddSigningSubkey(config); err != nil {
			t.Fatalf("e.AddSigningSubkey() err = %v, want nil", err)
		}
	}
	if o.revokeSigner {
		if err := e.Subkeys[len(e.Subkeys)-1].Revoke(packet.KeyCompromised, "", config); err != nil {
			t.Fatalf("subkey.Revoke() err = %v, want nil", err)
		}
	}
	if o.revoked {
		if err := e.Revoke(packet.NoReason, "", config); err != nil {
			t.Fatalf("e.Revoke() err = %v, want nil", err)
		}
	}
	var pub, priv bytes.Buffer
	serialize(t, &pub, v2.PublicKeyType, o.armored, e.Serialize)
	if o.passphrase != "" {
		if err := e.EncryptPrivateKeys([]byte(o.passphrase), config); err != nil {
			t.Fatalf("e.EncryptPrivateKeys() err = %v, want nil", err)
		}
	}
	serialize(t, &priv, v2.PrivateKeyType, o.armored, func(w io.Writer) error { return e.SerializePrivateWithoutSigning(w, config) })
	dir := t.TempDir()
	k := testKey{pub: filepath.Join(dir, "key.pub"), priv: filepath.Join(dir, "key.sec"), fpr: fmt.Sprintf("%X", e.PrimaryKey.Fingerprint), entity: e}
	writeFile(t, k.pub, pub.Bytes())
	writeFile(t, k.priv, priv.Bytes())
	return k
}

func serialize(t testing.TB, buf *bytes.Buffer, blockType string, armored bool, f func(io.Writer) error) {
	t.Helper()
	if !armored {
		if err := f(buf); err != nil {
			t.Fatalf("serialize key: %v", err)
		}
		return
	}
	w, err := armor.Encode(buf, blockType, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := f(w); err != nil {
		t.Fatalf("serialize key: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

func writeFile(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func newProvider(t testing.TB, c gpg.Config) *gpg.Provider {
	t.Helper()
	p, err := gpg.New(c)
	if err != nil {
		t.Fatalf("gpg.New(%+v) err = %v, want nil", c, err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func randomKey(t testing.TB) []byte {
	t.Helper()
	key := make([]byte, kleidi.KeySize)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	return key
}

// gnupgKeys are keys made by the gpg binary in a GNUPGHOME of this test process, exported to files.
type gnupgKeys struct {
	home       string
	passphrase string // file holding the passphrase of the protected export
	// rsa is an RSA 3072 certify-only primary key with an encryption and a signing subkey; cv an Ed25519
	// primary key that signs, with a Curve25519 encryption subkey; noSign an Ed25519 certify-only primary
	// key with only a Curve25519 encryption subkey: it cannot sign.
	rsa, cv, noSign gnupgKey
	cvStub          string // gpg --export-secret-subkeys of cv: the primary (signing) key is a stub
}

type gnupgKey struct {
	fpr          string
	pubBinary    string // gpg --export
	pubArmored   string // gpg --armor --export
	privBinary   string // gpg --export-secret-keys, unprotected
	privArmored  string // gpg --armor --export-secret-keys, unprotected
	privProtectd string // gpg --export-secret-keys after gpg --passwd: protected by the passphrase
}

var (
	gnupgOnce sync.Once
	gnupgVal  *gnupgKeys
	gnupgErr  error
)

// gnupgPassphrase is a test passphrase; tests check that no error shows it.
const gnupgPassphrase = "correct horse battery staple 7"

// gnupg returns an RSA 3072 key and an Ed25519/Curve25519 key made by gpg, once per test binary.
func gnupg(t testing.TB) *gnupgKeys {
	t.Helper()
	if _, err := exec.LookPath("gpg"); err != nil {
		t.Fatalf("the gpg binary is missing (%v): install GnuPG (Debian: apt-get install gnupg) to run these tests", err)
	}
	gnupgOnce.Do(func() { gnupgVal, gnupgErr = makeGnuPGKeys() })
	if gnupgErr != nil {
		t.Fatalf("making keys with gpg: %v", gnupgErr)
	}
	return gnupgVal
}

func makeGnuPGKeys() (*gnupgKeys, error) {
	// A short path: gpg-agent's socket lives in GNUPGHOME and socket paths are limited to about 100 bytes.
	home, err := os.MkdirTemp("", "kleidi-gnupg-")
	if err != nil {
		return nil, err
	}
	g := &gnupgKeys{home: home, passphrase: filepath.Join(home, "passphrase")}
	if err := os.WriteFile(g.passphrase, []byte(gnupgPassphrase+"\n"), 0o600); err != nil {
		return nil, err
	}
	empty := []string{"--passphrase", ""} // the keys are made unprotected; protected exports come from --passwd
	if _, err := g.run(nil, append(empty, "--quick-gen-key", "kleidi rsa <rsa@kleidi.test>", "rsa3072", "cert", "never")...); err != nil {
		return nil, err
	}
	if _, err := g.run(nil, append(empty, "--quick-gen-key", "kleidi curve <curve@kleidi.test>", "future-default", "default", "never")...); err != nil {
		return nil, err
	}
	if g.rsa.fpr, err = g.fingerprint("rsa@kleidi.test"); err != nil {
		return nil, err
	}
	if _, err := g.run(nil, append(empty, "--quick-gen-key", "kleidi nosign <nosign@kleidi.test>", "ed25519", "cert", "never")...); err != nil {
		return nil, err
	}
	if g.cv.fpr, err = g.fingerprint("curve@kleidi.test"); err != nil {
		return nil, err
	}
	if g.noSign.fpr, err = g.fingerprint("nosign@kleidi.test"); err != nil {
		return nil, err
	}
	for _, args := range [][]string{
		{"--quick-add-key", g.rsa.fpr, "rsa3072", "encr", "never"},
		{"--quick-add-key", g.rsa.fpr, "rsa3072", "sign", "never"},
		{"--quick-add-key", g.noSign.fpr, "cv25519", "encr", "never"},
	} {
		if _, err := g.run(nil, append(empty, args...)...); err != nil {
			return nil, err
		}
	}
	g.cvStub = filepath.Join(home, "curve-stub.sec.gpg")
	if _, err := g.run(nil, append(empty, "--output", g.cvStub, "--export-secret-subkeys", g.cv.fpr)...); err != nil {
		return nil, err
	}
	for _, k := range []*gnupgKey{&g.rsa, &g.cv, &g.noSign} {
		name := k.fpr[len(k.fpr)-8:]
		k.pubBinary = filepath.Join(home, name+".pub.gpg")
		k.pubArmored = filepath.Join(home, name+".pub.asc")
		k.privBinary = filepath.Join(home, name+".sec.gpg")
		k.privArmored = filepath.Join(home, name+".sec.asc")
		for _, args := range [][]string{
			{"--output", k.pubBinary, "--export", k.fpr},
			{"--armor", "--output", k.pubArmored, "--export", k.fpr},
			append(empty, "--output", k.privBinary, "--export-secret-keys", k.fpr),
			append(empty, "--armor", "--output", k.privArmored, "--export-secret-keys", k.fpr),
		} {
			if _, err := g.run(nil, args...); err != nil {
				return nil, err
			}
		}
	}
	// Protect the Curve25519 key with the passphrase and export it protected.
	g.cv.privProtectd = filepath.Join(home, "curve-protected.sec.gpg")
	if _, err := g.run(nil, "--passphrase-file", g.passphrase, "--passwd", g.cv.fpr); err != nil {
		return nil, err
	}
	if _, err := g.run(nil, "--passphrase-file", g.passphrase, "--output", g.cv.privProtectd, "--export-secret-keys", g.cv.fpr); err != nil {
		return nil, err
	}
	return g, nil
}

// run runs gpg in the test GNUPGHOME with stdin and returns its standard output.
func (g *gnupgKeys) run(stdin []byte, args ...string) ([]byte, error) {
	cmd := exec.Command("gpg", append([]string{"--batch", "--no-tty", "--pinentry-mode", "loopback", "--trust-model", "always"}, args...)...)
	cmd.Env = append(os.Environ(), "GNUPGHOME="+g.home)
	cmd.Stdin = bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		// gpg's stderr names keys and files, never the data it handled.
		return nil, fmt.Errorf("gpg %s: %v: %s", args[len(args)-2], err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

func (g *gnupgKeys) fingerprint(email string) (string, error) {
	out, err := g.run(nil, "--with-colons", "--list-keys", email)
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Split(line, ":"); f[0] == "fpr" && len(f) > 9 {
			return f[9], nil
		}
	}
	return "", fmt.Errorf("no fingerprint for %s", email)
}

func TestMain(m *testing.M) {
	code := m.Run()
	if gnupgVal != nil {
		cmd := exec.Command("gpgconf", "--kill", "all")
		cmd.Env = append(os.Environ(), "GNUPGHOME="+gnupgVal.home)
		cmd.Run()
		os.RemoveAll(gnupgVal.home)
	}
	os.Exit(code)
}

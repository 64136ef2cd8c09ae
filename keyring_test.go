package kleidi_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

func TestKeyringFileModeAndNoLeftovers(t *testing.T) {
	ring := fileRing(t)
	e := newEnvelope(t, kleiditest.NewInsecureProvider(), ring)
	if _, err := e.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(ring.Path())
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("keyring mode = %v, want 0600", fi.Mode().Perm())
	}
	entries, _ := os.ReadDir(filepath.Dir(ring.Path()))
	for _, de := range entries {
		if strings.HasSuffix(de.Name(), ".tmp") {
			t.Errorf("temporary file %s left behind", de.Name())
		}
	}
}

func TestCorruptKeyringIsRefusedAndUntouched(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	ring := fileRing(t)
	newEnvelope(t, p, ring)
	good, err := os.ReadFile(ring.Path())
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string][]byte{
		"empty":        {},
		"truncated":    good[:len(good)/2],
		"one byte":     good[:1],
		"garbage":      []byte("\x00\x01not a keyring"),
		"newer":        bytes.Replace(good, []byte(`"version": 2`), []byte(`"version": 4`), 1),
		"other format": bytes.Replace(good, []byte(`"kleidi-keyring"`), []byte(`"other"`), 1),
		"no active":    bytes.Replace(good, []byte(`"active"`), []byte(`"retired"`), 1),
		"bad state":    bytes.Replace(good, []byte(`"active"`), []byte(`"paused"`), 1),
		"bad id":       bytes.Replace(good, []byte(`"kleidi-`), []byte(`"other-`), 1),
		"unknown key":  bytes.Replace(good, []byte(`"state"`), []byte(`"extra": 1, "state"`), 1),
		"trailing":     append(bytes.Clone(good), []byte(`{}`)...),
	}
	for name, content := range cases {
		t.Run(name, func(t *testing.T) {
			if err := os.WriteFile(ring.Path(), content, 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := kleidi.NewEnvelope(ctx, p, ring); !errors.Is(err, kleidi.ErrInvalidKeyring) {
				t.Errorf("kleidi.NewEnvelope(%s keyring) err = %v, want kleidi.ErrInvalidKeyring", name, err)
			}
			_, err := ring.Update(ctx, func(*kleidi.Ring) error { return nil })
			if !errors.Is(err, kleidi.ErrInvalidKeyring) {
				t.Errorf("ring.Update(%s keyring) err = %v, want kleidi.ErrInvalidKeyring", name, err)
			}
			if got, _ := os.ReadFile(ring.Path()); !bytes.Equal(got, content) {
				t.Errorf("the %s keyring was modified", name)
			}
		})
	}
}

func TestReloadPicksUpRotation(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	ring := fileRing(t)
	server := newEnvelope(t, p, ring)
	old := encrypt(t, server, "before", "")
	rotator := newEnvelope(t, p, kleidi.NewFileKeyring(ring.Path()))
	id, err := rotator.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if server.KeyID() == id {
		t.Fatalf("server switched keys before Reload")
	}
	if err := server.Reload(ctx); err != nil {
		t.Fatalf("server.Reload() err = %v, want nil", err)
	}
	if server.KeyID() != id {
		t.Errorf("server.KeyID() after Reload = %q, want %q", server.KeyID(), id)
	}
	if c := encrypt(t, server, "after", ""); c.KeyID() != id {
		t.Errorf("Encrypt after Reload used key %q, want %q", c.KeyID(), id)
	}
	if got := decrypt(t, server, reparse(t, old), ""); got != "before" {
		t.Errorf("Decrypt(old) after Reload = %q", got)
	}
}

func TestReloadOfCorruptKeyringKeepsServing(t *testing.T) {
	ring := fileRing(t)
	e := newEnvelope(t, kleiditest.NewInsecureProvider(), ring)
	id := e.KeyID()
	if err := os.WriteFile(ring.Path(), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := e.Reload(ctx); !errors.Is(err, kleidi.ErrInvalidKeyring) {
		t.Errorf("e.Reload(corrupt keyring) err = %v, want kleidi.ErrInvalidKeyring", err)
	}
	if e.KeyID() != id {
		t.Errorf("e.KeyID() after a failed Reload = %q, want %q", e.KeyID(), id)
	}
	decrypt(t, e, encrypt(t, e, "still", ""), "")
}

// sharedRoot is a root of trust every process of this test binary shares.
func sharedRoot() *kleiditest.Provider {
	return kleiditest.NewInsecureProviderWithRoot(bytes.Repeat([]byte{0x42}, 32))
}

// TestHelperRotate is run as a child process by TestRotateFromManyProcesses.
func TestHelperRotate(t *testing.T) {
	path := os.Getenv("KLEIDI_TEST_KEYRING")
	if path == "" {
		return // not a child: nothing to do
	}
	e, err := kleidi.NewEnvelope(ctx, sharedRoot(), kleidi.NewFileKeyring(path), kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatal(err)
	}
	for range 10 {
		if _, err := e.Rotate(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

func TestRotateFromManyProcesses(t *testing.T) {
	ring := fileRing(t)
	newEnvelope(t, sharedRoot(), ring)
	const procs = 4
	var wg sync.WaitGroup
	for range procs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd := exec.Command(os.Args[0], "-test.run=^TestHelperRotate$", "-test.count=1")
			cmd.Env = append(os.Environ(), "KLEIDI_TEST_KEYRING="+ring.Path())
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("rotating child: %v\n%s", err, out)
			}
		}()
	}
	wg.Wait()
	loaded, err := ring.Load(ctx)
	records := loaded.Keys
	if err != nil {
		t.Fatalf("ring.Load() after concurrent rotations err = %v, want nil", err)
	}
	if want := 1 + procs*10; len(records) != want {
		t.Errorf("keyring has %d keys after concurrent rotations, want %d", len(records), want)
	}
}

func TestNothingSecretInOutput(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	ring := fileRing(t)
	e := newEnvelope(t, p, ring)
	plaintext := []byte("do-not-print-this-plaintext")
	c, err := e.Encrypt(ctx, plaintext, nil)
	if err != nil {
		t.Fatal(err)
	}
	loaded, err := ring.Load(ctx)
	records := loaded.Keys
	if err != nil {
		t.Fatal(err)
	}
	kek, err := p.Unwrap(ctx, records[0].Wrapped[0].Blob)
	if err != nil {
		t.Fatal(err)
	}
	_, decryptErr := e.Decrypt(ctx, c, []byte("wrong"))
	keyring, _ := os.ReadFile(ring.Path())
	text := fmt.Sprintf("%v %+v %#v %s %v %+v %#v %v", e, e, e, e, c, c, c, decryptErr) + string(keyring)
	for _, secret := range [][]byte{kek, plaintext} {
		for _, form := range []string{string(secret), hex.EncodeToString(secret), base64.StdEncoding.EncodeToString(secret)} {
			if strings.Contains(text, form) {
				t.Errorf("output holds a secret: %s", text)
			}
		}
	}
}

// countingRing counts the loads of a keyring.
type countingRing struct {
	kleidi.Keyring
	loads atomic.Int32
}

func (c *countingRing) Load(ctx context.Context) (kleidi.Ring, error) {
	c.loads.Add(1)
	return c.Keyring.Load(ctx)
}

// Another process rotates; a reader that never calls Reload sees the new key through WithReloadOnUnknownKey,
// reading the keyring at most once per interval however many unknown keys arrive.
func TestReloadOnUnknownKey(t *testing.T) {
	p, err := kleidi.NewAEADProvider("filekey", newGCMRoot(t)) // not an Authenticator: no attached key helps
	if err != nil {
		t.Fatal(err)
	}
	ring := fileRing(t)
	writer := newEnvelope(t, p, ring)
	plain, err := kleidi.NewEnvelope(ctx, p, kleidi.NewFileKeyring(ring.Path()))
	if err != nil {
		t.Fatal(err)
	}
	counted := &countingRing{Keyring: kleidi.NewFileKeyring(ring.Path())}
	reader, err := kleidi.NewEnvelope(ctx, p, counted, kleidi.WithReloadOnUnknownKey(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := writer.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	c, err := writer.Encrypt(ctx, []byte("after the rotation"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := plain.Decrypt(ctx, c, nil); !errors.Is(err, kleidi.ErrUnknownKey) {
		t.Errorf("Decrypt(new key) without reload err = %v, want kleidi.ErrUnknownKey", err)
	}
	loads := counted.loads.Load()
	if got, err := reader.Decrypt(ctx, c, nil); err != nil || string(got) != "after the rotation" {
		t.Fatalf("Decrypt(new key) with WithReloadOnUnknownKey = %q, %v", got, err)
	}
	if reader.KeyID() != writer.KeyID() {
		t.Errorf("the reload did not switch the active key")
	}
	// A flood of unknown keys within the interval reads the keyring no more.
	_, forged := kleiditest.ForgeCiphertext("filekey", bytes.Repeat([]byte{9}, kleidi.KeySize), []byte("x"))
	f, _ := kleidi.ParseCiphertext(forged)
	for range 100 {
		reader.Decrypt(ctx, f, nil)
	}
	if n := counted.loads.Load() - loads; n != 1 {
		t.Errorf("%d keyring loads for one new key and 100 unknown ones within the interval, want 1", n)
	}
}

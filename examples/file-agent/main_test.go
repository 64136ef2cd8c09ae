package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// agent is file-agent, built once by TestMain.
var agent string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "file-agent")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	agent = filepath.Join(dir, "file-agent")
	build := exec.Command("go", "build", "-o", agent, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "go build:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// Sizes of the stream format: a segment of plaintext, and of ciphertext.
const (
	segment          = 64 << 10
	encryptedSegment = segment + 16
)

// runAgent runs file-agent with args and the state directory state, and returns its output (stdout and stderr).
func runAgent(t *testing.T, state string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(agent, append(args, "-state-dir", state)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func mustRun(t *testing.T, state string, args ...string) string {
	t.Helper()
	out, err := runAgent(t, state, args...)
	if err != nil {
		t.Fatalf("file-agent %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// writePattern writes size bytes of a fixed pattern to name and returns their SHA-256.
func writePattern(t *testing.T, name string, size int) [32]byte {
	t.Helper()
	f, err := os.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i % 251)
	}
	for left := size; left > 0; left -= min(left, len(buf)) {
		if _, err := io.MultiWriter(f, h).Write(buf[:min(left, len(buf))]); err != nil {
			t.Fatal(err)
		}
	}
	return [32]byte(h.Sum(nil))
}

func fileHash(t *testing.T, name string) [32]byte {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return [32]byte(h.Sum(nil))
}

func TestEncryptDecrypt(t *testing.T) {
	dir, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	for _, size := range []int{0, 1, 64 << 10, 100 << 20} {
		t.Run(fmt.Sprintf("%dB", size), func(t *testing.T) {
			plain, enc, dec := filepath.Join(dir, fmt.Sprint(size)), filepath.Join(dir, fmt.Sprint(size, ".kleidi")), filepath.Join(dir, fmt.Sprint(size, ".out"))
			want := writePattern(t, plain, size)
			start := time.Now()
			mustRun(t, state, "encrypt", "-in", plain, "-out", enc)
			encrypted := time.Since(start)
			start = time.Now()
			mustRun(t, state, "decrypt", "-in", enc, "-out", dec)
			t.Logf("%d bytes: encrypt %v, decrypt %v (whole processes)", size, encrypted, time.Since(start))
			if fileHash(t, dec) != want {
				t.Errorf("decrypt(encrypt(%d bytes)) differs from the file", size)
			}
			fi, err := os.Stat(enc)
			if err != nil {
				t.Fatal(err)
			}
			if segments := max(1, (size+segment-1)/segment); fi.Size() > int64(size+segments*16+4096) {
				t.Errorf("the encrypted file of %d bytes is %d bytes, more than its segments' tags and a header", size, fi.Size())
			}
			if size > 0 && fileHash(t, enc) == want {
				t.Errorf("the encrypted file is the plaintext")
			}
			os.Remove(plain)
			os.Remove(enc)
			os.Remove(dec)
		})
	}
	assertNoLeftovers(t, dir)
}

// TestRotationRestartAndLostKeyring: files written before and after a rotation decrypt in new processes, and
// still after the keyring is lost, since each carries its key; another root decrypts none.
func TestRotationRestartAndLostKeyring(t *testing.T) {
	dir, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	want := writePattern(t, filepath.Join(dir, "plain"), 2*segment+3)
	mustRun(t, state, "encrypt", "-in", filepath.Join(dir, "plain"), "-out", filepath.Join(dir, "before"))
	first := strings.TrimSpace(lastLine(mustRun(t, state, "rotate")))
	second := strings.TrimSpace(lastLine(mustRun(t, state, "rotate")))
	if !strings.HasPrefix(first, "kleidi-gpg-") || first == second {
		t.Fatalf("rotate printed %q then %q, want two new key IDs", first, second)
	}
	mustRun(t, state, "encrypt", "-in", filepath.Join(dir, "plain"), "-out", filepath.Join(dir, "after"))
	decryptAll := func(when string) {
		t.Helper()
		for _, name := range []string{"before", "after"} {
			out := filepath.Join(dir, name+".out")
			mustRun(t, state, "decrypt", "-in", filepath.Join(dir, name), "-out", out)
			if fileHash(t, out) != want {
				t.Errorf("%s: the file encrypted %s rotation decrypts to other bytes", when, name)
			}
		}
	}
	decryptAll("after a rotation")
	if err := os.Remove(filepath.Join(state, "keyring.json")); err != nil {
		t.Fatal(err)
	}
	decryptAll("with a lost keyring")

	other := filepath.Join(t.TempDir(), "other")
	out, err := runAgent(t, other, "decrypt", "-in", filepath.Join(dir, "before"), "-out", filepath.Join(dir, "stolen"))
	if err == nil || !strings.Contains(out, "not authenticated") {
		t.Errorf("decrypting with another root: err = %v, output %q, want a refusal of the attached key", err, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "stolen")); err == nil {
		t.Errorf("decrypting with another root left an output file")
	}
}

func TestRefusesAlteredFiles(t *testing.T) {
	dir, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	const size = 3*segment + 100
	writePattern(t, filepath.Join(dir, "plain"), size)
	mustRun(t, state, "encrypt", "-in", filepath.Join(dir, "plain"), "-out", filepath.Join(dir, "enc"))
	enc, err := os.ReadFile(filepath.Join(dir, "enc"))
	if err != nil {
		t.Fatal(err)
	}
	h := 43 + int(binary.BigEndian.Uint16(enc[41:])) // the header, before the first segment
	if want := h + size + 4*16; len(enc) != want {
		t.Fatalf("the encrypted file is %d bytes, want %d: a header of %d and 4 segments", len(enc), want, h)
	}
	seg := func(i int) []byte { return enc[h+i*encryptedSegment : min(len(enc), h+(i+1)*encryptedSegment)] }
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	flipped := bytes.Clone(enc)
	flipped[h+segment] ^= 1
	for name, altered := range map[string][]byte{
		"tampered":                     flipped,
		"truncated after a segment":    enc[:h+2*encryptedSegment],
		"truncated in a segment":       enc[:len(enc)-1],
		"truncated to its header":      enc[:h],
		"reordered":                    cat(enc[:h], seg(1), seg(0), seg(2), seg(3)),
		"extended by a byte":           cat(enc, []byte{0}),
		"extended by a segment":        cat(enc, seg(1)),
		"extended by its last segment": cat(enc, seg(3)),
	} {
		t.Run(name, func(t *testing.T) {
			in, out := filepath.Join(dir, "altered"), filepath.Join(dir, "altered.out")
			if err := os.WriteFile(in, altered, 0o600); err != nil {
				t.Fatal(err)
			}
			msg, err := runAgent(t, state, "decrypt", "-in", in, "-out", out)
			if err == nil || !strings.Contains(msg, "decryption failed") {
				t.Errorf("file-agent decrypt: err = %v, output %q, want a failed decryption", err, msg)
			}
			if _, err := os.Stat(out); err == nil {
				t.Errorf("a refused file left an output file")
			}
			assertNoLeftovers(t, dir)
		})
	}
}

// assertNoLeftovers fails if dir holds a temporary file of an output.
func assertNoLeftovers(t *testing.T, dir string) {
	t.Helper()
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Errorf("temporary file %s left in %s", e.Name(), dir)
		}
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

package main_test

import (
	"context"
	"crypto/rand"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/gpg"
	"github.com/kleidi-kms/kleidi/kleiditest"
	kleidiserver "github.com/kleidi-kms/kleidi/server"
	"github.com/kleidi-kms/kleidi/tpm"
)

// The attacker of the threat model writes etcd: it chooses every byte of a stored object, so every field of a
// DecryptRequest, and knows every public key. kleiditest.ForgeCiphertext and ForgeAttachedKey build what it would.

// forgery is one forged object: a ciphertext under a KEK the attacker chose, and the annotation it attaches.
type forgery struct {
	name       string
	keyID      string
	ciphertext []byte
	annotation []byte
}

// forgeries builds the attacks on a plugin whose root is provider: wrap wraps a KEK as the attacker can (to the
// public key; into the same TPM under another policy), prove proves as the attacker can (its own key or policy).
func forgeries(t *testing.T, provider string, wrap func([]byte) []byte, prove func([]byte) []byte) []forgery {
	t.Helper()
	var out []forgery
	add := func(name string, annotation func(id string, blob []byte) []byte) {
		kek := make([]byte, kleidi.KeySize)
		rand.Read(kek)
		id, ciphertext := kleiditest.ForgeCiphertext(provider, kek, []byte("the attacker's own 32-byte seed!"))
		out = append(out, forgery{name, id, ciphertext, annotation(id, wrap(kek))})
	}
	add("a bare wrapped KEK, as kleidi 0.1 wrote them", func(_ string, blob []byte) []byte { return blob })
	add("a wrapped KEK with the attacker's own proof", func(id string, blob []byte) []byte {
		return kleiditest.ForgeAttachedKey(blob, prove(kleiditest.ProofMessage(id, provider, blob)))
	})
	add("a wrapped KEK with a random proof", func(_ string, blob []byte) []byte {
		p := make([]byte, 64)
		rand.Read(p)
		return kleiditest.ForgeAttachedKey(blob, p)
	})
	return out
}

// assertRefused sends every forgery to the plugin and checks that each gets InvalidArgument and no plaintext.
func assertRefused(t *testing.T, client kmsapi.KeyManagementServiceClient, fs []forgery) {
	t.Helper()
	for _, f := range fs {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		resp, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: f.ciphertext, KeyId: f.keyID, Uid: "forged",
			Annotations: map[string][]byte{kleidiserver.AttachedKeyAnnotation: f.annotation}})
		cancel()
		if err == nil || resp.GetPlaintext() != nil {
			t.Errorf("Decrypt(%s) = %q, %v; want an error and no plaintext", f.name, resp.GetPlaintext(), err)
			continue
		}
		if code := status.Code(err); code != codes.InvalidArgument {
			t.Errorf("Decrypt(%s) code = %s (%v), want InvalidArgument", f.name, code, err)
		}
	}
}

// decryptOK decrypts enc through client and checks the plaintext.
func decryptOK(t *testing.T, client kmsapi.KeyManagementServiceClient, enc *kmsapi.EncryptResponse, want string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dec, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations})
	if err != nil || string(dec.GetPlaintext()) != want {
		t.Fatalf("Decrypt(genuine) = %q, %v; want %q, nil", dec.GetPlaintext(), err, want)
	}
}

func encryptOK(t *testing.T, client kmsapi.KeyManagementServiceClient, plaintext string) *kmsapi.EncryptResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	enc, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte(plaintext)})
	if err != nil {
		t.Fatalf("Encrypt() err = %v", err)
	}
	return enc
}

// startPlugin initialises the sandbox's state directory with args, serves it, and waits until it answers.
func (s *sandbox) startPlugin(t *testing.T, args ...string) (*server, kmsapi.KeyManagementServiceClient) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(s.dir, "state", "keyring.json")); err != nil {
		if code, out, errOut := s.run(t, append(append([]string{"init"}, args...), s.flags()[:2]...)...); code != 0 {
			t.Fatalf("kleidi-server init = %d, %q, %q", code, out, errOut)
		}
	}
	srv := s.serve(t, s.command(false, append(append([]string{"serve", "--audit-log", filepath.Join(s.dir, "audit.json")}, args...), s.flags()...)...))
	if code, out, errOut := s.run(t, "status", "--listen", "unix://"+s.socket(), "--wait", "60s"); code != 0 {
		t.Fatalf("kleidi-server status = %d, %q, %q\n%s", code, out, errOut, srv.stderr.String())
	}
	return srv, kmsClient(t, s.socket())
}

func TestForgedKEKIsRefusedThroughTheSocket(t *testing.T) {
	t.Run("gpg", func(t *testing.T) {
		s := newSandbox(t)
		keys, err := gpg.GenerateDevelopmentKey(filepath.Join(s.dir, "keys"))
		if err != nil {
			t.Fatal(err)
		}
		public := filepath.Join(s.dir, "keys", gpg.DevelopmentPublicKeyFile)
		args := []string{"--gpg-private-key", keys.PrivateKeyFile, "--gpg-public-key", public}
		_, client := s.startPlugin(t, args...)
		enc := encryptOK(t, client, "a genuine seed")
		decryptOK(t, client, enc, "a genuine seed")

		// The attacker wraps to the public key, as the README tells everyone they may, and signs with its own key.
		wrapper, err := gpg.New(gpg.Config{PublicKeyFiles: []string{public}})
		if err != nil {
			t.Fatal(err)
		}
		own, err := gpg.GenerateDevelopmentKey(filepath.Join(s.dir, "attacker"))
		if err != nil {
			t.Fatal(err)
		}
		signer, err := gpg.New(own)
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		assertRefused(t, client, forgeries(t, "gpg",
			func(kek []byte) []byte { return must(wrapper.Wrap(ctx, kek)) },
			func(m []byte) []byte { return must(signer.Prove(ctx, m)) }))
		decryptOK(t, client, enc, "a genuine seed")

		// A second node with the same private key and a keyring of its own (or this node after losing its
		// keyring) decrypts the genuine object from its attached key alone.
		other := newSandbox(t)
		_, otherClient := other.startPlugin(t, args...)
		decryptOK(t, otherClient, enc, "a genuine seed")
	})

	t.Run("tpm", func(t *testing.T) {
		sock := startSwtpmUnix(t)
		s := newSandbox(t)
		_, client := s.startPlugin(t, "--provider", "tpm", "--tpm", sock, "--tpm-pcrs", "7")
		enc := encryptOK(t, client, "a genuine seed")
		decryptOK(t, client, enc, "a genuine seed")
		// The attacker uses the same TPM from another process: it seals KEKs with no policy, or with PCR 8 rather
		// than 7, and proves with what that configuration derives.
		ctx := context.Background()
		for _, pcrs := range [][]int{nil, {8}} {
			p, err := tpm.New(ctx, tpm.Config{Path: sock, PCRs: pcrs})
			if err != nil {
				t.Fatal(err)
			}
			assertRefused(t, client, forgeries(t, "tpm",
				func(kek []byte) []byte { return must(p.Wrap(ctx, kek)) },
				func(m []byte) []byte { return must(p.Prove(ctx, m)) }))
			p.Close()
		}
		decryptOK(t, client, enc, "a genuine seed")
	})
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

// startSwtpmUnix starts swtpm on a unix socket and returns its --tpm address.
func startSwtpmUnix(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("swtpm"); err != nil {
		t.Fatalf("swtpm not found (%v): install it (apt-get install swtpm swtpm-tools)", err)
	}
	dir, err := os.MkdirTemp("", "sw")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock")
	cmd := exec.Command("swtpm", "socket", "--tpm2", "--tpmstate", "dir="+dir, "--flags", "not-need-init,startup-clear",
		"--server", "type=unixio,path="+sock, "--ctrl", "type=unixio,path="+filepath.Join(dir, "ctrl"))
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting swtpm: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		os.RemoveAll(dir)
	})
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return "unix://" + sock
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm does not answer on %s", sock)
		}
	}
}

// metric returns the sum of the samples of name whose labels contain every one of labels, from a scrape.
func metric(t *testing.T, addr, name string, labels ...string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var sum float64
	for line := range strings.SplitSeq(string(b), "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for _, l := range labels {
			ok = ok && strings.Contains(line, l)
		}
		if ok {
			v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
			if err == nil {
				sum += v
			}
		}
	}
	return sum
}

// TestFloodOfForgedDecryptsOnSwtpm sends 10,000 Decrypts that pair the plugin's own genuine attached key, or a
// forged one, with a new key ID each, while Status is polled and a genuine first unwrap is due.
func TestFloodOfForgedDecryptsOnSwtpm(t *testing.T) {
	sock := startSwtpmUnix(t)
	s := newSandbox(t)
	args := []string{"--provider", "tpm", "--tpm", sock}
	first, client := s.startPlugin(t, args...)
	old := encryptOK(t, client, "under the retired key")
	first.cmd.Process.Signal(syscall.SIGTERM)
	first.wait(t)
	if code, out, errOut := s.run(t, append(append([]string{"rotate"}, args...), s.flags()[:2]...)...); code != 0 {
		t.Fatalf("kleidi-server rotate = %d, %q, %q", code, out, errOut)
	}
	// A fresh process holds only the active KEK: the retired one needs an unwrap.
	srv, client := s.startPlugin(t, args...)
	addr := srv.httpAddr(t)
	genuine := encryptOK(t, client, "x").Annotations[kleidiserver.AttachedKeyAnnotation]

	unwraps := func() float64 {
		return metric(t, addr, "kleidi_provider_operations_total", `operation="unwrap"`)
	}
	rss := func() float64 { return metric(t, addr, "process_resident_memory_bytes") }
	unwrapsBefore, rssBefore := unwraps(), rss()

	var unhealthy atomic.Int64
	stop := make(chan struct{})
	var polls sync.WaitGroup
	polls.Add(1)
	go func() {
		defer polls.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			st, err := client.Status(ctx, &kmsapi.StatusRequest{})
			cancel()
			if err != nil || st.Healthz != "ok" {
				unhealthy.Add(1)
			}
		}
	}()

	const n, workers = 10000, 8
	start := time.Now()
	var wg sync.WaitGroup
	var accepted atomic.Int64
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			kek := make([]byte, kleidi.KeySize)
			for i := w; i < n; i += workers {
				rand.Read(kek)
				id, ciphertext := kleiditest.ForgeCiphertext("tpm", kek, []byte("seed"))
				annotation := genuine
				if i%2 == 1 {
					proof := make([]byte, 32)
					rand.Read(proof)
					annotation = kleiditest.ForgeAttachedKey([]byte("KTPM not a blob"), proof)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				_, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: ciphertext,
					KeyId: id, Annotations: map[string][]byte{kleidiserver.AttachedKeyAnnotation: annotation}})
				cancel()
				if err == nil {
					accepted.Add(1)
				}
				if i == n/2 {
					decryptOK(t, client, old, "under the retired key") // a genuine first unwrap, mid-flood
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(stop)
	polls.Wait()
	unwrapsAfter, rssAfter := unwraps(), rss()
	t.Logf("%d forged Decrypts in %v (%.0f/s); root-of-trust unwraps %v -> %v; RSS %.1f -> %.1f MiB; unhealthy Status polls %d",
		n, elapsed.Round(time.Millisecond), n/elapsed.Seconds(), unwrapsBefore, unwrapsAfter, rssBefore/(1<<20), rssAfter/(1<<20), unhealthy.Load())
	if a := accepted.Load(); a != 0 {
		t.Errorf("%d forged Decrypts succeeded, want 0", a)
	}
	if d := unwrapsAfter - unwrapsBefore; d > 10 {
		t.Errorf("the flood cost %v root-of-trust unwraps, want at most 10 (1: the genuine retired key)", d)
	}
	if grew := rssAfter - rssBefore; grew > 32<<20 {
		t.Errorf("RSS grew by %.1f MiB over the flood, want under 32 MiB", grew/(1<<20))
	}
	if u := unhealthy.Load(); u != 0 {
		t.Errorf("%d Status polls during the flood were not ok, want 0", u)
	}
}

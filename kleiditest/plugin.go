package kleiditest

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kleidi-kms/kleidi/client"
)

// Limits of a KMS v2 response that kube-apiserver enforces; TestPlugin holds requests to them too.
const (
	maxPluginCiphertext  = 1024
	maxPluginKeyID       = 1024
	maxPluginAnnotations = 32 << 10
)

// TestPlugin is the conformance suite of a KMS v2 plugin serving on endpoint ("unix:///path/kms.sock"): kleidi's,
// or any other. It talks to the plugin as kube-apiserver does, over gRPC on the unix socket:
//
//	func TestPluginConformance(t *testing.T) {
//		endpoint := startMyPlugin(t)
//		kleiditest.TestPlugin(t, endpoint)
//	}
//
// The plugin must be healthy, and Status must report version v2 and the key ID Encrypt returns. Every Encrypt
// response must fit kube-apiserver's limits (ciphertext and key_id 1 to 1024 bytes, annotation keys fully
// qualified domain names, annotations at most 32 KiB), and decrypt to its plaintext. Then the suite sends requests
// that break each rule: an empty, a one-byte and an oversized ciphertext, the ciphertext with each one of its bytes
// altered, cut short and extended, an empty and an oversized key_id, annotation keys that are not domain names,
// annotations over 32 KiB, an empty plaintext and plaintexts whose ciphertext cannot fit. Each must be refused
// with InvalidArgument (ResourceExhausted for a message beyond gRPC's limit), never answered with Internal or
// Unknown and never decrypted, and after each the plugin must still encrypt, decrypt and report healthy. An extra
// annotation it does not know and an 8 KiB request uid must be accepted.
func TestPlugin(t *testing.T, endpoint string) {
	t.Helper()
	c, err := client.Dial(endpoint)
	if err != nil {
		t.Fatalf("client.Dial(%q) err = %v", endpoint, err)
	}
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := c.WaitHealthy(ctx)
	if err != nil {
		t.Fatalf("WaitHealthy() = %+v, %v; want a healthy plugin", st, err)
	}
	if st.Version != "v2" || st.KeyID == "" || len(st.KeyID) > maxPluginKeyID {
		t.Errorf("Status() = %+v, want version v2 and a key_id of 1 to %d bytes", st, maxPluginKeyID)
	}
	seed := make([]byte, 32)
	rand.Read(seed)
	enc, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: "kleiditest-valid"})
	if err != nil {
		t.Fatalf("Encrypt(32 bytes) err = %v", err)
	}
	checkEncryptResponse(t, enc)
	if enc.KeyId != st.KeyID {
		t.Errorf("Encrypt() key_id %q, Status() key_id %q: want the same", enc.KeyId, st.KeyID)
	}
	dec, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations, Uid: "kleiditest-valid"})
	if err != nil || !bytes.Equal(dec.GetPlaintext(), seed) {
		t.Fatalf("Decrypt(Encrypt(seed)) = %v; want the seed", err)
	}

	ct, id, ann := enc.Ciphertext, enc.KeyId, enc.Annotations
	decrypt := func(ct []byte, keyID string, a map[string][]byte) func() error {
		return func() error {
			resp, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: ct, KeyId: keyID, Annotations: a, Uid: "kleiditest"})
			if err == nil && bytes.Equal(resp.GetPlaintext(), seed) && !bytes.Equal(ct, enc.Ciphertext) {
				return fmt.Errorf("altered ciphertext decrypted to the seed")
			}
			return err
		}
	}
	encrypt := func(plaintext []byte, uid string) func() error {
		return func() error {
			resp, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: plaintext, Uid: uid})
			if err == nil {
				checkEncryptResponse(t, resp)
			}
			return err
		}
	}
	big := make([]byte, 20<<10)
	refused := []codes.Code{codes.InvalidArgument}
	type pluginCase struct {
		name string
		call func() error
		want []codes.Code
	}
	cases := []pluginCase{
		{"decrypt: empty ciphertext", decrypt(nil, id, ann), refused},
		{"decrypt: one-byte ciphertext", decrypt(ct[:1], id, ann), refused},
		{"decrypt: ciphertext over 1024 bytes", decrypt(append(bytes.Clone(ct), make([]byte, maxPluginCiphertext)...), id, ann), refused},
		{"decrypt: last byte cut off", decrypt(ct[:len(ct)-1], id, ann), refused},
		{"decrypt: last 16 bytes cut off", decrypt(ct[:max(len(ct)-16, 1)], id, ann), refused},
		{"decrypt: trailing byte", decrypt(append(bytes.Clone(ct), 0), id, ann), refused},
		{"decrypt: empty key_id", decrypt(ct, "", ann), refused},
		{"decrypt: key_id over 1024 bytes", decrypt(ct, strings.Repeat("k", maxPluginKeyID+1), ann), refused},
		{"decrypt: annotation key not qualified", decrypt(ct, id, withAnnotation(ann, "kek", []byte{1})), refused},
		{"decrypt: annotation key upper case", decrypt(ct, id, withAnnotation(ann, "KEK.example.com", []byte{1})), refused},
		{"decrypt: annotation key empty", decrypt(ct, id, withAnnotation(ann, "", []byte{1})), refused},
		{"decrypt: annotation key with a slash", decrypt(ct, id, withAnnotation(ann, "example.com/kek", []byte{1})), refused},
		{"decrypt: annotations over 32 KiB", decrypt(ct, id, withAnnotation(withAnnotation(ann, "a.example.com", big), "b.example.com", big)), refused},
		{"decrypt: extra qualified annotation is ignored", decrypt(ct, id, withAnnotation(ann, "other.example.com", []byte("x"))), []codes.Code{codes.OK}},
		{"decrypt: 1 MiB annotation", decrypt(ct, id, withAnnotation(ann, "a.example.com", make([]byte, 1<<20))), []codes.Code{codes.InvalidArgument, codes.ResourceExhausted}},
		{"encrypt: empty plaintext", encrypt(nil, "kleiditest"), refused},
		{"encrypt: 1 KiB plaintext, whose ciphertext cannot fit", encrypt(randomBytes(maxPluginCiphertext), "kleiditest"), refused},
		{"encrypt: 60 KiB plaintext", encrypt(randomBytes(60<<10), "kleiditest"), refused},
		{"encrypt: 4 MiB plaintext", encrypt(make([]byte, 4<<20), "kleiditest"), []codes.Code{codes.InvalidArgument, codes.ResourceExhausted}},
		{"encrypt: 8 KiB uid", encrypt(seed, strings.Repeat("u", 8<<10)), []codes.Code{codes.OK}},
	}
	for i := range ct {
		altered := bytes.Clone(ct)
		altered[i] ^= 0x01
		cases = append(cases, pluginCase{fmt.Sprintf("decrypt: byte %d of the ciphertext altered", i), decrypt(altered, id, ann), refused})
	}
	for _, pc := range cases {
		t.Run(pc.name, func(t *testing.T) {
			err := pc.call()
			got := status.Code(err)
			if !slices.Contains(pc.want, got) {
				t.Errorf("code %v (%v), want %v", got, err, pc.want)
			}
			stillWorks(ctx, t, c)
		})
	}
	if st, err := c.Status(ctx); err != nil || !st.Healthy() {
		t.Errorf("Status() after the malformed requests = %+v, %v; want healthz ok", st, err)
	}
}

// stillWorks checks that the plugin encrypts and decrypts.
func stillWorks(ctx context.Context, t *testing.T, c *client.Client) {
	t.Helper()
	again, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("still works"), Uid: "kleiditest-after"})
	if err != nil {
		t.Fatalf("Encrypt() afterwards err = %v", err)
	}
	dec, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: again.Ciphertext, KeyId: again.KeyId, Annotations: again.Annotations, Uid: "kleiditest-after"})
	if err != nil || string(dec.GetPlaintext()) != "still works" {
		t.Fatalf("Decrypt() afterwards = %v; want the plaintext back", err)
	}
}

// checkEncryptResponse checks r against the limits kube-apiserver enforces on what a plugin returns.
func checkEncryptResponse(t *testing.T, r *kmsapi.EncryptResponse) {
	t.Helper()
	if n := len(r.Ciphertext); n == 0 || n > maxPluginCiphertext {
		t.Errorf("Encrypt() ciphertext of %d bytes, want 1 to %d", n, maxPluginCiphertext)
	}
	if n := len(r.KeyId); n == 0 || n > maxPluginKeyID {
		t.Errorf("Encrypt() key_id of %d bytes, want 1 to %d", n, maxPluginKeyID)
	}
	total := 0
	for k, v := range r.Annotations {
		if !isDomainName(k) {
			t.Errorf("Encrypt() annotation key %q is not a fully qualified domain name", k)
		}
		total += len(k) + len(v)
	}
	if total > maxPluginAnnotations {
		t.Errorf("Encrypt() annotations of %d bytes, want at most %d", total, maxPluginAnnotations)
	}
}

// isDomainName reports whether name is a fully qualified domain name as kube-apiserver checks annotation keys:
// an optional trailing dot, then at most 253 characters in at least two labels, each 1 to 63 characters of
// [a-z0-9-] that neither starts nor ends with '-'.
func isDomainName(name string) bool {
	name = strings.TrimSuffix(name, ".")
	if len(name) == 0 || len(name) > 253 {
		return false
	}
	labels := strings.Split(name, ".")
	for _, l := range labels {
		if len(l) == 0 || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for _, c := range []byte(l) {
			if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
				return false
			}
		}
	}
	return len(labels) >= 2
}

// withAnnotation returns a copy of a with k set to v.
func withAnnotation(a map[string][]byte, k string, v []byte) map[string][]byte {
	c := map[string][]byte{k: v}
	maps.Copy(c, a)
	c[k] = v
	return c
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

package tpm

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kleidi-kms/kleidi"
)

// identity returns p's identity, and fails the test unless it is well formed and survives its identity file.
func identity(t testing.TB, p *Provider) *kleidi.Identity {
	t.Helper()
	id, err := p.Identity(context.Background())
	if err != nil {
		t.Fatalf("p.Identity(ctx) err = %v, want nil", err)
	}
	file, err := kleidi.MarshalIdentity(id)
	if err != nil {
		t.Fatalf("kleidi.MarshalIdentity(id) err = %v, want nil", err)
	}
	back, err := kleidi.ParseIdentity(file)
	if err != nil {
		t.Fatalf("kleidi.ParseIdentity(identity file) err = %v, want nil", err)
	}
	if back.ID() != id.ID() {
		t.Fatalf("identity file round trip: ID %s, want %s", back.ID(), id.ID())
	}
	return id
}

func sign(t testing.TB, p *Provider, message []byte) []byte {
	t.Helper()
	sig, err := p.Sign(context.Background(), message)
	if err != nil {
		t.Fatalf("p.Sign(ctx, message) err = %v, want nil", err)
	}
	if len(sig) > kleidi.MaxSignatureSize {
		t.Fatalf("p.Sign(ctx, message) = %d bytes, more than kleidi.MaxSignatureSize", len(sig))
	}
	return sig
}

func wrapFor(t testing.TB, id *kleidi.Identity, key []byte) []byte {
	t.Helper()
	r, err := OpenRecipient(id)
	if err != nil {
		t.Fatalf("OpenRecipient(id) err = %v, want nil", err)
	}
	if r.Identity().ID() != id.ID() {
		t.Fatalf("OpenRecipient(id).Identity() is %s, want %s", r.Identity().ID(), id.ID())
	}
	wrapped, err := r.Wrap(context.Background(), key)
	if err != nil {
		t.Fatalf("recipient.Wrap(ctx, key) err = %v, want nil", err)
	}
	if !isDuplicate(wrapped) || len(wrapped) > kleidi.MaxWrappedKeySize {
		t.Fatalf("recipient.Wrap(ctx, key) = %d bytes, want a duplicate of at most %d", len(wrapped), kleidi.MaxWrappedKeySize)
	}
	return wrapped
}

// startSwtpmWithEKCert manufactures a swtpm state with swtpm_setup, as a TPM vendor would: an RSA 2048 and an ECC
// endorsement key, persistent, each with a certificate in NV from a certificate authority local to the test.
// Then it starts swtpm on it.
func startSwtpmWithEKCert(t *testing.T) *swtpm {
	t.Helper()
	if _, err := exec.LookPath("swtpm_setup"); err != nil {
		t.Fatalf("swtpm_setup not found (%v): install it, e.g. apt-get install swtpm-tools", err)
	}
	ca := t.TempDir()
	localca := filepath.Join(ca, "swtpm-localca.conf")
	writeFile(t, localca, "statedir = "+ca+"\nsigningkey = "+ca+"/signkey.pem\nissuercert = "+ca+"/issuercert.pem\ncertserial = "+ca+"/certserial\n")
	setup := filepath.Join(ca, "swtpm_setup.conf")
	writeFile(t, setup, "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = "+localca+
		"\ncreate_certs_tool_options = /etc/swtpm-localca.options\nactive_pcr_banks = sha256\n")
	s := &swtpm{t: t, dir: t.TempDir(), port: freePortPair(t), flags: swtpmFlags}
	out, err := exec.Command("swtpm_setup", "--tpm2", "--tpmstate", s.dir, "--create-ek-cert", "--config", setup,
		"--overwrite", "--logfile", filepath.Join(ca, "setup.log")).CombinedOutput()
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(ca, "setup.log"))
		t.Fatalf("swtpm_setup err = %v: %s %s", err, out, log)
	}
	s.start()
	t.Cleanup(s.kill)
	return s
}

func writeFile(t *testing.T, name, content string) {
	t.Helper()
	if err := os.WriteFile(name, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestSwtpmTwoNodes: two TPMs (two swtpm processes), A with an EK certificate and B without, B bound to PCR 16
// with an auth value. Each wraps for the other with no TPM call; each unwraps what was made for it and nothing
// made for the other; each signs what only its own identity verifies; B's identity survives a restart of its TPM;
// and once B's PCR 16 changes, what was made for B's boot state no longer unwraps.
func TestSwtpmTwoNodes(t *testing.T) {
	ctx := context.Background()
	sa := startSwtpmWithEKCert(t)
	sb := startSwtpm(t, false, swtpmFlags)
	cfgB := Config{PCRs: []int{16}, AuthFile: writeAuthFile(t, "b's auth value")}
	a := newSwtpmProvider(t, sa, Config{})
	b := newSwtpmProvider(t, sb, cfgB)
	idA, idB := identity(t, a), identity(t, b)
	if len(idA.Certificate) == 0 {
		t.Fatalf("A's identity has no EK certificate, want the one swtpm_setup made")
	}
	if _, err := x509.ParseCertificate(idA.Certificate); err != nil {
		t.Fatalf("x509.ParseCertificate(A's EK certificate) err = %v, want nil", err)
	}
	if len(idB.Certificate) != 0 {
		t.Fatalf("B's identity has an EK certificate of %d bytes, want none", len(idB.Certificate))
	}
	if idA.ID() == idB.ID() {
		t.Fatalf("A and B have the same identity %s", idA.ID())
	}

	keyForB, keyForA := randomKey(t), randomKey(t)
	forB, forA := wrapFor(t, idB, keyForB), wrapFor(t, idA, keyForA)
	for _, c := range []struct {
		name    string
		p       *Provider
		wrapped []byte
		want    []byte // nil: refused
	}{
		{"B unwraps the key for B", b, forB, keyForB},
		{"A unwraps the key for A", a, forA, keyForA},
		{"A refuses the key for B", a, forB, nil},
		{"B refuses the key for A", b, forA, nil},
	} {
		got, err := c.p.Unwrap(ctx, c.wrapped)
		switch {
		case c.want != nil && (err != nil || !bytes.Equal(got, c.want)):
			t.Errorf("%s: Unwrap err = %v; want the key", c.name, err)
		case c.want == nil && (!errors.Is(err, kleidi.ErrUnwrap) || got != nil):
			t.Errorf("%s: Unwrap = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnwrap", c.name, len(got), err)
		}
	}

	msg := []byte("A endorses a copy")
	sigA, sigB := sign(t, a, msg), sign(t, b, msg)
	if err := idA.Verify(msg, sigA); err != nil {
		t.Errorf("idA.Verify(msg, A's signature) = %v, want nil", err)
	}
	if err := idB.Verify(msg, sigB); err != nil {
		t.Errorf("idB.Verify(msg, B's signature) = %v, want nil", err)
	}
	if err := idB.Verify(msg, sigA); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("idB.Verify(msg, A's signature) = %v, want an error wrapping kleidi.ErrUnauthenticated", err)
	}
	if err := idA.Verify(msg, sigB); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("idA.Verify(msg, B's signature) = %v, want an error wrapping kleidi.ErrUnauthenticated", err)
	}

	// The same identity after a restart of the TPM, and in another process.
	sb.kill()
	sb.start()
	b2 := newSwtpmProvider(t, sb, cfgB)
	if got := identity(t, b2); got.ID() != idB.ID() {
		t.Fatalf("B's identity after a restart is %s, want %s", got.ID(), idB.ID())
	}
	if got, err := b2.Unwrap(ctx, forB); err != nil || !bytes.Equal(got, keyForB) {
		t.Fatalf("B's Unwrap(key for B) after a restart err = %v; want the key", err)
	}
	if got := identity(t, a); got.ID() != idA.ID() || !bytes.Equal(got.Certificate, idA.Certificate) {
		t.Fatalf("A's second identity differs from its first")
	}

	// Another boot state on B: refused.
	withTPM(t, b2, func(tp transport.TPM) {
		_, err := tpm2.PCRExtend{
			PCRHandle: tpm2.AuthHandle{Handle: 16, Auth: tpm2.PasswordAuth(nil)},
			Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: bytes.Repeat([]byte{1}, 32)}}},
		}.Execute(tp)
		if err != nil {
			t.Fatalf("PCRExtend(16) err = %v", err)
		}
	})
	if got, err := b2.Unwrap(ctx, forB); !errors.Is(err, kleidi.ErrUnwrap) || !errors.Is(err, ErrPolicy) || got != nil {
		t.Fatalf("B's Unwrap(key for B) after PCR 16 changed = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnwrap and ErrPolicy", len(got), err)
	}
	assertNoHandles(t, a)
	assertNoHandles(t, b2)
}

// TestSwtpmEKCertificateChecked: OpenRecipient refuses an identity whose EK certificate certifies another key
// (another TPM's certificate, a modulus changed in it) or is not a certificate, and accepts the genuine one.
func TestSwtpmEKCertificateChecked(t *testing.T) {
	sa, sb := startSwtpmWithEKCert(t), startSwtpmWithEKCert(t)
	idA := identity(t, newSwtpmProvider(t, sa, Config{}))
	idB := identity(t, newSwtpmProvider(t, sb, Config{}))
	if _, err := OpenRecipient(idA); err != nil {
		t.Fatalf("OpenRecipient(A's identity) err = %v, want nil", err)
	}
	k, err := parseNodeKey(idA.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	n, err := k.ekPublic.Unique.RSA()
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(idA.Certificate, n.Buffer)
	if i < 0 {
		t.Fatalf("A's EK certificate does not hold A's EK modulus")
	}
	tampered := bytes.Clone(idA.Certificate)
	tampered[i+100] ^= 1
	for name, cert := range map[string][]byte{
		"B's certificate":         idB.Certificate,
		"a changed modulus":       tampered,
		"not a certificate":       []byte("certainly"),
		"a byte after it":         append(bytes.Clone(idA.Certificate), 0),
		"a truncated certificate": idA.Certificate[:len(idA.Certificate)-1],
	} {
		id := *idA
		id.Certificate = cert
		if r, err := OpenRecipient(&id); !errors.Is(err, kleidi.ErrUnauthenticated) || r != nil {
			t.Errorf("OpenRecipient(A's identity with %s) err = %v, want an error wrapping kleidi.ErrUnauthenticated", name, err)
		}
	}
	// B's key with A's certificate: refused too.
	id := *idB
	id.Certificate = idA.Certificate
	if _, err := OpenRecipient(&id); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("OpenRecipient(B's key with A's certificate) err = %v, want an error wrapping kleidi.ErrUnauthenticated", err)
	}
}

// softwareEK returns the public area of an endorsement key of the TCG RSA 2048 template made in software.
// It is made once per process: an RSA key takes a while.
func softwareEK(t testing.TB) *tpm2.TPMTPublic {
	t.Helper()
	k, err := softwareRSAKey()
	if err != nil {
		t.Fatal(err)
	}
	pub := tpm2.RSAEKTemplate
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.FillBytes(make([]byte, 256))})
	return &pub
}

// goldenNodeKey is an identity PublicKey of format version 1 for the EK of goldenEK, auth value, PCR 7 and a
// policy of 32 bytes 0x11: pinned so that identities handed out by earlier builds keep parsing.
var softwareRSAKey = sync.OnceValues(func() (*rsa.PrivateKey, error) { return rsa.GenerateKey(rand.Reader, 2048) })

const goldenNodeKey = "4b54504e010100000080013a0001000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa00060080004300100800000000000100000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff00201111111111111111111111111111111111111111111111111111111111111111"

func goldenEK() tpm2.TPMTPublic {
	n := make([]byte, 256)
	for i := range n {
		n[i] = byte(i)
	}
	pub := tpm2.RSAEKTemplate
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: n})
	return pub
}

func TestNodeKeyGolden(t *testing.T) {
	k := nodeKey{auth: true, pcrs: 1 << 7, ek: tpm2.Marshal(goldenEK()), policy: bytes.Repeat([]byte{0x11}, 32)}
	if got := hex.EncodeToString(k.marshal()); got != goldenNodeKey {
		t.Fatalf("nodeKey.marshal() = %s, want the golden %s", got, goldenNodeKey)
	}
	golden, _ := hex.DecodeString(goldenNodeKey)
	got, err := parseNodeKey(golden)
	if err != nil {
		t.Fatalf("parseNodeKey(golden) err = %v, want nil", err)
	}
	if !got.auth || got.pcrs != 1<<7 || !bytes.Equal(got.ek, k.ek) || !bytes.Equal(got.policy, k.policy) {
		t.Fatalf("parseNodeKey(golden) = %+v, want %+v", got, k)
	}
	for name, bad := range map[string]func(b []byte) []byte{
		"version 2":     func(b []byte) []byte { b[4] = 2; return b },
		"unknown flag":  func(b []byte) []byte { b[5] |= 2; return b },
		"PCR 24":        func(b []byte) []byte { b[6] = 1; return b },
		"trailing byte": func(b []byte) []byte { return append(b, 0) },
		"truncated":     func(b []byte) []byte { return b[:len(b)-1] },
		"short policy": func(b []byte) []byte {
			b = b[:len(b)-1]
			b[len(b)-32] = 31
			return b
		},
		"EK with sign attribute": func(b []byte) []byte { b[17] |= 0x04; return b }, // objectAttributes bit 18: sign
	} {
		if _, err := parseNodeKey(bad(bytes.Clone(golden))); !errors.Is(err, errNodeKey) {
			t.Errorf("parseNodeKey(golden with %s) err = %v, want an error wrapping errNodeKey", name, err)
		}
	}
}

// TestRecipientNeedsNoTPM: Wrap for an identity needs no TPM, gives a duplicate that parses, differs at every
// call, and holds the key only encrypted; an identity of another provider or with a damaged key is refused.
func TestRecipientNeedsNoTPM(t *testing.T) {
	ek := softwareEK(t)
	k := nodeKey{pcrs: 1 << 7, ek: tpm2.Marshal(*ek), policy: bytes.Repeat([]byte{0x22}, 32)}
	id := &kleidi.Identity{Provider: "tpm", PublicKey: k.marshal()}
	key := bytes.Repeat([]byte{0x5a}, kleidi.KeySize)
	w1, w2 := wrapFor(t, id, key), wrapFor(t, id, key)
	if bytes.Equal(w1, w2) {
		t.Fatalf("two Wraps of the same key are equal")
	}
	if bytes.Contains(w1, key[:8]) {
		t.Fatalf("the duplicate holds the key in clear")
	}
	d, err := parseDuplicate(w1)
	if err != nil {
		t.Fatalf("parseDuplicate(Wrap) err = %v, want nil", err)
	}
	name, _ := tpm2.ObjectName(ek)
	if d.pcrs != k.pcrs || d.auth || !bytes.Equal(d.policy, k.policy) || !bytes.Equal(d.parent, name.Buffer) {
		t.Fatalf("the duplicate's header or policy is not the identity's")
	}
	r, _ := OpenRecipient(id)
	for name, in := range map[string][]byte{"empty": nil, "too large": make([]byte, MaxKeySize+1)} {
		if _, err := r.Wrap(context.Background(), in); err == nil {
			t.Errorf("Wrap(%s key) err = nil, want an error", name)
		}
	}
	for name, bad := range map[string]kleidi.Identity{
		"gpg provider": {Provider: "gpg", PublicKey: id.PublicKey},
		"bad key":      {Provider: "tpm", PublicKey: []byte("KTPN\x01")},
	} {
		if r, err := OpenRecipient(&bad); err == nil || r != nil {
			t.Errorf("OpenRecipient(%s) err = nil, want an error", name)
		}
	}
}

// TestParseDuplicateRefuses: damaged duplicates are refused by the parser, before any TPM call.
func TestParseDuplicateRefuses(t *testing.T) {
	k := nodeKey{ek: tpm2.Marshal(*softwareEK(t)), policy: bytes.Repeat([]byte{0x22}, 32)}
	good := wrapFor(t, &kleidi.Identity{Provider: "tpm", PublicKey: k.marshal()}, randomKey(t))
	d, _ := parseDuplicate(good)
	withAttr := func(f func(*tpm2.TPMTPublic)) []byte {
		pub, _ := tpm2.Unmarshal[tpm2.TPMTPublic](d.public)
		f(pub)
		c := *d
		c.public = tpm2.Marshal(*pub)
		return c.marshal()
	}
	for name, bad := range map[string][]byte{
		"version 2":           append([]byte("KTPD\x02"), good[5:]...),
		"trailing byte":       append(bytes.Clone(good), 0),
		"truncated":           good[:len(good)-1],
		"userWithAuth":        withAttr(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.UserWithAuth = true }),
		"no policy":           withAttr(func(p *tpm2.TPMTPublic) { p.AuthPolicy.Buffer = nil }),
		"a signing key":       withAttr(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.SignEncrypt = true }),
		"sealed-blob magic":   append([]byte("KTPM"), good[4:]...),
		"unknown flag":        append([]byte("KTPD\x01\x02"), good[6:]...),
		"larger than the max": append([]byte("KTPD"), make([]byte, kleidi.MaxWrappedKeySize)...),
	} {
		if _, err := parseDuplicate(bad); !errors.Is(err, errBlob) {
			t.Errorf("parseDuplicate(%s) err = %v, want an error wrapping errBlob", name, err)
		}
	}
}

func FuzzParseNodeKey(f *testing.F) {
	golden, _ := hex.DecodeString(goldenNodeKey)
	f.Add(golden)
	f.Add([]byte("KTPN\x01\x00\x00\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, in []byte) {
		k, err := parseNodeKey(in)
		if err != nil {
			if !errors.Is(err, errNodeKey) {
				t.Fatalf("parseNodeKey err = %v, want an error wrapping errNodeKey", err)
			}
			return
		}
		if !bytes.Equal(k.marshal(), in) {
			t.Fatalf("parseNodeKey accepted a non-canonical encoding")
		}
		// An identity of that key opens as a recipient, or is refused with an error.
		id := &kleidi.Identity{Provider: "tpm", PublicKey: in}
		if r, err := OpenRecipient(id); err == nil {
			if _, err := r.Wrap(context.Background(), make([]byte, 32)); err != nil && !strings.Contains(err.Error(), "tpm:") {
				t.Fatalf("Wrap err = %v", err)
			}
		}
	})
}

func FuzzParseDuplicate(f *testing.F) {
	ek := goldenEK()
	name, _ := tpm2.ObjectName(&ek)
	pub := duplicateTemplate(bytes.Repeat([]byte{0x22}, 32))
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: make([]byte, 32)})
	d := dupBlob{pcrs: 1 << 7, parent: name.Buffer, public: tpm2.Marshal(pub), private: make([]byte, 80), seed: make([]byte, 256)}
	f.Add(d.marshal())
	f.Add([]byte("KTPD\x01\x01\x00\x00\x00\x80"))
	f.Fuzz(func(t *testing.T, in []byte) {
		d, err := parseDuplicate(in)
		if err != nil {
			if !errors.Is(err, errBlob) {
				t.Fatalf("parseDuplicate err = %v, want an error wrapping errBlob", err)
			}
			if bytes.Contains([]byte(err.Error()), in) && len(in) > 8 {
				t.Fatalf("parseDuplicate's error holds the input")
			}
			return
		}
		if !bytes.Equal(d.marshal(), in) {
			t.Fatalf("parseDuplicate accepted a non-canonical encoding")
		}
	})
}

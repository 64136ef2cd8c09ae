package kleidi_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"testing"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

// goldenRoot is the root key of the insecure provider that made the golden sealed values and streams.
var goldenRoot = bytes.Repeat([]byte{0x5e}, 32)

// goldenSealedFile pins the sealed format, version 1: bytes sealed once must open forever, on an Envelope that
// never saw their KEK. It is written once by `go test -run TestGoldenSealed -golden.create` when it does not exist,
// and never rewritten.
const goldenSealedFile = "testdata/sealed-v1.json"

type goldenSealed struct {
	Comment        string `json:"comment"`
	Root           string `json:"insecure_root_hex"`
	KeyID          string `json:"key_id"`
	Plaintext      string `json:"plaintext_hex"`
	AssociatedData string `json:"associated_data_hex"`
	Sealed         string `json:"sealed_hex"`
}

// createGolden reports whether -golden.create (defined beside the ciphertext vectors) asks for missing golden
// files to be written.
func createGolden() bool {
	f := flag.Lookup("golden.create")
	return f != nil && f.Value.String() == "true"
}

// strangerEnvelope returns an Envelope of root whose keyring holds a KEK of its own only, and its provider.
func strangerEnvelope(t *testing.T, root []byte) (*kleidi.Envelope, *kleiditest.Provider) {
	t.Helper()
	p := kleiditest.NewInsecureProviderWithRoot(root)
	return newEnvelope(t, p, kleidi.NewMemoryKeyring()), p
}

func TestGoldenSealed(t *testing.T) {
	if createGolden() {
		writeGoldenSealed(t)
	}
	var vectors []goldenSealed
	readGolden(t, goldenSealedFile, &vectors)
	if len(vectors) < 3 {
		t.Fatalf("%s holds %d vectors, want at least 3", goldenSealedFile, len(vectors))
	}
	for _, v := range vectors {
		t.Run(v.Comment, func(t *testing.T) {
			e, p := strangerEnvelope(t, unhex(t, v.Root))
			if e.KeyID() == v.KeyID {
				t.Fatalf("the stranger Envelope's key is the golden one: the test proves nothing")
			}
			before := p.Calls(kleiditest.OpUnwrap)
			sealed := unhex(t, v.Sealed)
			if sealed[0] != 's' || sealed[1] != 1 {
				t.Errorf("golden sealed header = %x, want magic 's' and version 1", sealed[:2])
			}
			a := int(binary.BigEndian.Uint16(sealed[2:]))
			c, err := kleidi.ParseCiphertext(sealed[4+a:])
			if err != nil || c.KeyID() != v.KeyID {
				t.Fatalf("ParseCiphertext(golden after the attached key) = %v, %v, want key %s", c, err, v.KeyID)
			}
			got, err := e.Open(ctx, sealed, unhex(t, v.AssociatedData))
			if err != nil {
				t.Fatalf("e.Open(golden) err = %v, want nil", err)
			}
			if !bytes.Equal(got, unhex(t, v.Plaintext)) {
				t.Errorf("e.Open(golden) = %x, want %x", got, unhex(t, v.Plaintext))
			}
			if n := p.Calls(kleiditest.OpUnwrap) - before; n != 1 {
				t.Errorf("e.Open(golden) made %d unwraps, want 1 (the attached key)", n)
			}
		})
	}
}

func writeGoldenSealed(t *testing.T) {
	if _, err := os.Stat(goldenSealedFile); err == nil {
		return
	}
	e, _ := strangerEnvelope(t, goldenRoot)
	var vectors []goldenSealed
	for _, v := range []struct {
		comment       string
		plaintext, ad []byte
	}{
		{"seed, no associated data", bytes.Repeat([]byte{7}, 32), nil},
		{"text with associated data", []byte("kleidi golden sealed value"), []byte("files/report.pdf")},
		{"empty plaintext", nil, nil},
	} {
		sealed, err := e.Seal(ctx, v.plaintext, v.ad)
		if err != nil {
			t.Fatal(err)
		}
		vectors = append(vectors, goldenSealed{Comment: v.comment, Root: hex.EncodeToString(goldenRoot), KeyID: e.KeyID(),
			Plaintext: hex.EncodeToString(v.plaintext), AssociatedData: hex.EncodeToString(v.ad), Sealed: hex.EncodeToString(sealed)})
	}
	writeGoldenFile(t, goldenSealedFile, vectors)
}

func readGolden(t *testing.T, file string, v any) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("read golden vectors: %v", err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
}

func writeGoldenFile(t *testing.T, file string, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, append(b, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
}

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSealOpen(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	ring := kleidi.NewMemoryKeyring()
	e := newEnvelope(t, p, ring)
	for _, size := range []int{0, 1, 32, kleidi.MaxPlaintextSize} {
		plaintext := bytes.Repeat([]byte{0xa5}, size)
		sealed, err := e.Seal(ctx, plaintext, []byte("ad"))
		if err != nil {
			t.Fatalf("e.Seal(%d bytes) err = %v, want nil", size, err)
		}
		if len(sealed) > kleidi.MaxSealedSize {
			t.Errorf("len(e.Seal(%d bytes)) = %d, more than MaxSealedSize %d", size, len(sealed), kleidi.MaxSealedSize)
		}
		if bytes.Contains(sealed, []byte{0xa5, 0xa5, 0xa5, 0xa5}) && size > 4 {
			t.Errorf("e.Seal(%d bytes) holds the plaintext", size)
		}
		got, err := e.Open(ctx, sealed, []byte("ad"))
		if err != nil || !bytes.Equal(got, plaintext) {
			t.Fatalf("e.Open(e.Seal(%d bytes)) = %d bytes, %v, want the plaintext", size, len(got), err)
		}
		if _, err := e.Open(ctx, sealed, []byte("other ad")); !errors.Is(err, kleidi.ErrDecrypt) {
			t.Errorf("e.Open(sealed, other ad) err = %v, want ErrDecrypt", err)
		}
	}
	if _, err := e.Seal(ctx, make([]byte, kleidi.MaxPlaintextSize+1), nil); !errors.Is(err, kleidi.ErrTooLarge) {
		t.Errorf("e.Seal(MaxPlaintextSize+1 bytes) err = %v, want ErrTooLarge", err)
	}

	// Self-contained: a new keyring on the same root opens it; after a rotation, a restart opens both.
	sealed, _ := e.Seal(ctx, []byte("before rotation"), nil)
	if _, err := e.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	rotated, _ := e.Seal(ctx, []byte("after rotation"), nil)
	for name, other := range map[string]*kleidi.Envelope{
		"restart":    newEnvelope(t, p, ring),
		"no keyring": newEnvelope(t, p, kleidi.NewMemoryKeyring()),
	} {
		for want, s := range map[string][]byte{"before rotation": sealed, "after rotation": rotated} {
			if got, err := other.Open(ctx, s, nil); err != nil || string(got) != want {
				t.Errorf("%s: Open(%q sealed) = %q, %v, want the plaintext", name, want, got, err)
			}
		}
	}

	// Another root neither opens it nor is asked to unwrap: the attached key's proof fails first.
	stranger, sp := strangerEnvelope(t, bytes.Repeat([]byte{1}, 32))
	before := sp.Calls(kleiditest.OpUnwrap)
	if _, err := stranger.Open(ctx, sealed, nil); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("another root's Open(sealed) err = %v, want ErrUnauthenticated", err)
	}
	if n := sp.Calls(kleiditest.OpUnwrap) - before; n != 0 {
		t.Errorf("another root's Open(sealed) made %d unwraps, want 0", n)
	}
}

// TestSealedWithoutAuthenticator: a root that cannot prove its wrapped keys seals with no attached key, and the
// value opens only where the keyring holds its KEK.
func TestSealedWithoutAuthenticator(t *testing.T) {
	p := noProof{kleiditest.NewInsecureProvider()}
	if _, ok := kleidi.Provider(p).(kleidi.Authenticator); ok {
		t.Fatal("noProof is an Authenticator: the test proves nothing")
	}
	ring := kleidi.NewMemoryKeyring()
	sealed, err := newEnvelope(t, p, ring).Seal(ctx, []byte("local"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if a := binary.BigEndian.Uint16(sealed[2:]); a != 0 {
		t.Errorf("attached key length = %d, want 0", a)
	}
	if got, err := newEnvelope(t, p, ring).Open(ctx, sealed, nil); err != nil || string(got) != "local" {
		t.Errorf("Open on the same keyring = %q, %v, want local", got, err)
	}
	if _, err := newEnvelope(t, p, kleidi.NewMemoryKeyring()).Open(ctx, sealed, nil); !errors.Is(err, kleidi.ErrUnknownKey) {
		t.Errorf("Open on another keyring err = %v, want ErrUnknownKey", err)
	}
}

// noProof hides the Authenticator of a provider: only the methods of Provider are promoted.
type noProof struct{ kleidi.Provider }

func TestOpenRefuses(t *testing.T) {
	e := newEnvelope(t, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring())
	sealed, err := e.Seal(ctx, []byte("x"), nil)
	if err != nil {
		t.Fatal(err)
	}
	a := int(binary.BigEndian.Uint16(sealed[2:]))
	with := func(i int, b byte) []byte { s := bytes.Clone(sealed); s[i] = b; return s }
	for name, tc := range map[string]struct {
		sealed []byte
		want   error
	}{
		"empty":                   {nil, kleidi.ErrInvalidCiphertext},
		"header only":             {sealed[:4], kleidi.ErrInvalidCiphertext},
		"bad magic":               {with(0, 'k'), kleidi.ErrInvalidCiphertext},
		"bad version":             {with(1, 2), kleidi.ErrInvalidCiphertext},
		"attached key too long":   {with(2, 0xff), kleidi.ErrInvalidCiphertext},
		"cut in the attached key": {sealed[:4+a/2], kleidi.ErrInvalidCiphertext},
		"cut in the ciphertext":   {sealed[:len(sealed)-1], kleidi.ErrDecrypt},
		"too long":                {append(bytes.Clone(sealed), make([]byte, kleidi.MaxSealedSize)...), kleidi.ErrInvalidCiphertext},
		"altered ciphertext":      {with(len(sealed)-1, sealed[len(sealed)-1]^1), kleidi.ErrDecrypt},
	} {
		if _, err := e.Open(ctx, tc.sealed, nil); !errors.Is(err, tc.want) {
			t.Errorf("%s: e.Open() err = %v, want %v", name, err, tc.want)
		}
	}
	// An altered attached key is refused before the root is asked, on an Envelope that needs it.
	stranger, p := strangerEnvelope(t, bytes.Repeat([]byte{2}, 32))
	before := p.Calls(kleiditest.OpUnwrap)
	if _, err := stranger.Open(ctx, with(4+a-1, sealed[4+a-1]^1), nil); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("Open(altered attached key) err = %v, want ErrUnauthenticated", err)
	}
	if n := p.Calls(kleiditest.OpUnwrap) - before; n != 0 {
		t.Errorf("Open(altered attached key) made %d unwraps, want 0", n)
	}
}

// FuzzOpen feeds Open arbitrary bytes: it never panics, and whatever it opens is a plaintext that was sealed.
func FuzzOpen(f *testing.F) {
	e, err := kleidi.NewEnvelope(ctx, kleiditest.NewInsecureProviderWithRoot(goldenRoot), kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		f.Fatal(err)
	}
	plaintexts := map[string]bool{}
	for _, pt := range []string{"", "a", "kleidi sealed value"} {
		sealed, err := e.Seal(ctx, []byte(pt), []byte("ad"))
		if err != nil {
			f.Fatal(err)
		}
		plaintexts[pt] = true
		f.Add(sealed)
	}
	if b, err := os.ReadFile(goldenSealedFile); err == nil {
		var vectors []goldenSealed
		if json.Unmarshal(b, &vectors) == nil {
			for _, v := range vectors {
				if s, err := hex.DecodeString(v.Sealed); err == nil {
					f.Add(s)
				}
			}
		}
	}
	f.Fuzz(func(t *testing.T, sealed []byte) {
		got, err := e.Open(ctx, sealed, []byte("ad"))
		if err == nil && !plaintexts[string(got)] {
			t.Fatalf("e.Open(%x) = %x, a plaintext never sealed", sealed, got)
		}
		if err != nil && kleidi.ErrorKind(err) == "error" {
			t.Fatalf("e.Open() err = %v, want one that wraps a kleidi sentinel", err)
		}
	})
}

// A value sealed on one node opens on another of the same root, whose keyring never held its key.
func ExampleEnvelope_Seal() {
	ctx := context.Background()
	root := kleiditest.NewInsecureProvider() // the same root of trust on both nodes: a TPM's key, an OpenPGP key
	a, err := kleidi.NewEnvelope(ctx, root, kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		log.Fatal(err)
	}
	sealed, err := a.Seal(ctx, []byte("a token"), []byte("tokens/42"))
	if err != nil {
		log.Fatal(err)
	}

	b, err := kleidi.NewEnvelope(ctx, root, kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		log.Fatal(err)
	}
	plaintext, err := b.Open(ctx, sealed, []byte("tokens/42"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(plaintext))
	// Output: a token
}

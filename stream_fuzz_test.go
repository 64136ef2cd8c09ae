package kleidi_test

import (
	"bytes"
	"io"
	"testing"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

// FuzzDecryptStream feeds DecryptStream arbitrary bytes: it never panics, every error wraps a kleidi sentinel (or
// is the reader's), and a stream that decrypts to its end holds a plaintext that was encrypted, whole.
func FuzzDecryptStream(f *testing.F) {
	e, err := kleidi.NewEnvelope(ctx, kleiditest.NewInsecureProviderWithRoot(goldenRoot), kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		f.Fatal(err)
	}
	ad := []byte("ad")
	plaintexts := map[string]bool{}
	for _, size := range []int{0, 1, 100, segment, segment + 1} {
		plaintext := pattern(size)
		plaintexts[string(plaintext)] = true
		f.Add(encryptStream(f, e, plaintext, ad))
	}
	f.Fuzz(func(t *testing.T, stream []byte) {
		r, err := e.DecryptStream(ctx, bytes.NewReader(stream), ad)
		if err != nil {
			if kleidi.ErrorKind(err) == "error" {
				t.Fatalf("e.DecryptStream() err = %v, want one that wraps a kleidi sentinel", err)
			}
			return
		}
		got, err := io.ReadAll(r)
		switch {
		case err == nil && !plaintexts[string(got)]:
			t.Fatalf("the stream decrypted to %d bytes never encrypted", len(got))
		case err != nil && kleidi.ErrorKind(err) == "error":
			t.Fatalf("reading the stream: err = %v, want one that wraps a kleidi sentinel", err)
		case err != nil && (len(got)%segment != 0 || !bytes.Equal(got, pattern(len(got)))):
			t.Fatalf("the reader returned %d bytes before an error: not whole authenticated segments", len(got))
		}
	})
}

// FuzzStreamRoundTrip writes arbitrary data in writes of arbitrary sizes: it decrypts to the same bytes, in a
// stream of the documented size.
func FuzzStreamRoundTrip(f *testing.F) {
	e, err := kleidi.NewEnvelope(ctx, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		f.Fatal(err)
	}
	f.Add([]byte{}, uint32(1), uint16(0))
	f.Add([]byte("kleidi"), uint32(1), uint16(3))
	f.Add([]byte("a segment and more"), uint32(segment+1), uint16(segment-1))
	f.Fuzz(func(t *testing.T, data []byte, extra uint32, chunk uint16) {
		// extra pads data beyond what a fuzzer makes, to cross segment boundaries.
		plaintext := append(bytes.Clone(data), pattern(int(extra%(3*segment)))...)
		var out bytes.Buffer
		w, err := e.EncryptStream(ctx, &out, data)
		if err != nil {
			t.Fatal(err)
		}
		step := max(1, int(chunk))
		for b := plaintext; len(b) > 0; b = b[min(len(b), step):] {
			if n, err := w.Write(b[:min(len(b), step)]); err != nil || n != min(len(b), step) {
				t.Fatalf("w.Write(%d bytes) = %d, %v", min(len(b), step), n, err)
			}
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		stream := out.Bytes()
		if want := headerSize(stream) + len(plaintext) + segments(len(plaintext))*segmentTag; len(stream) != want {
			t.Errorf("stream of %d bytes is %d bytes, want %d", len(plaintext), len(stream), want)
		}
		got, err := decryptStream(e, stream, data)
		if err != nil || !bytes.Equal(got, plaintext) {
			t.Fatalf("decrypting the stream: %d bytes, %v, want the %d bytes written", len(got), err, len(plaintext))
		}
	})
}

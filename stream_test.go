package kleidi_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

// Sizes of the stream format, version 1, as its documentation gives them.
const (
	segment       = 64 << 10               // plaintext bytes of every segment but the last
	segmentTag    = 16                     // AES-GCM tag of each segment
	streamFixed   = 2 + 32 + 7             // magic, version, salt, nonce prefix
	streamKeySize = 2                      // length of the sealed stream key
	streamLabel   = "kleidi stream v1\x00" // starts the sealed key's associated data
	segmentInfo   = "kleidi stream v1 segment key"
)

// patternReader yields n bytes of a fixed pattern, without allocating: pattern(n) as a stream.
type patternReader struct{ off, n int64 }

func (r *patternReader) Read(p []byte) (int, error) {
	if r.off >= r.n {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), r.n-r.off)]
	for i := range p {
		p[i] = byte((r.off + int64(i)) % 251)
	}
	r.off += int64(len(p))
	return len(p), nil
}

func pattern(n int) []byte {
	b, _ := io.ReadAll(&patternReader{n: int64(n)})
	return b
}

func encryptStream(t testing.TB, e *kleidi.Envelope, plaintext, ad []byte) []byte {
	t.Helper()
	var out bytes.Buffer
	w, err := e.EncryptStream(ctx, &out, ad)
	if err != nil {
		t.Fatalf("e.EncryptStream() err = %v, want nil", err)
	}
	if _, err := w.Write(plaintext); err != nil {
		t.Fatalf("w.Write(%d bytes) err = %v, want nil", len(plaintext), err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("w.Close() err = %v, want nil", err)
	}
	return out.Bytes()
}

// decryptStream returns what a reader of stream gets before its end or its first error.
func decryptStream(e *kleidi.Envelope, stream, ad []byte) ([]byte, error) {
	r, err := e.DecryptStream(ctx, bytes.NewReader(stream), ad)
	if err != nil {
		return nil, err
	}
	return io.ReadAll(r)
}

// segments returns how many segments a stream of n plaintext bytes has.
func segments(n int) int { return max(1, (n+segment-1)/segment) }

// headerSize returns the size of stream's header: up to the first segment.
func headerSize(stream []byte) int {
	return streamFixed + streamKeySize + int(binary.BigEndian.Uint16(stream[streamFixed:]))
}

func TestStreamRoundTrip(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	e := newEnvelope(t, p, kleidi.NewMemoryKeyring())
	ad := []byte("files/report.pdf")
	for _, size := range []int{0, 1, segment - 1, segment, segment + 1, 2 * segment, 3*segment + 17} {
		plaintext := pattern(size)
		writes := map[string]func(w io.Writer) error{
			"one Write": func(w io.Writer) error { _, err := w.Write(plaintext); return err },
			"Writes of 1000 bytes": func(w io.Writer) error {
				for b := plaintext; len(b) > 0; b = b[min(len(b), 1000):] {
					if _, err := w.Write(b[:min(len(b), 1000)]); err != nil {
						return err
					}
				}
				return nil
			},
			"io.Copy of half reads": func(w io.Writer) error {
				_, err := io.Copy(w, iotest.HalfReader(bytes.NewReader(plaintext)))
				return err
			},
		}
		for name, write := range writes {
			t.Run(fmt.Sprintf("%dB/%s", size, name), func(t *testing.T) {
				uses := e.Stats().ActiveKeyEncryptions
				var out bytes.Buffer
				w, err := e.EncryptStream(ctx, &out, ad)
				if err != nil {
					t.Fatal(err)
				}
				if err := write(w); err != nil {
					t.Fatalf("write %d bytes: err = %v, want nil", size, err)
				}
				if err := w.Close(); err != nil {
					t.Fatalf("w.Close() err = %v, want nil", err)
				}
				if n := e.Stats().ActiveKeyEncryptions - uses; n != 1 {
					t.Errorf("the KEK encrypted %d messages for one stream, want 1", n)
				}
				stream := out.Bytes()
				if want := headerSize(stream) + size + segments(size)*segmentTag; len(stream) != want {
					t.Errorf("stream of %d bytes is %d bytes, want %d", size, len(stream), want)
				}
				if size >= 16 && bytes.Contains(stream, plaintext[:16]) {
					t.Errorf("stream of %d bytes holds its plaintext", size)
				}
				r, err := e.DecryptStream(ctx, bytes.NewReader(stream), ad)
				if err != nil {
					t.Fatalf("e.DecryptStream() err = %v, want nil", err)
				}
				if err := iotest.TestReader(r, plaintext); err != nil {
					t.Errorf("iotest.TestReader(decrypted stream of %d bytes): %v", size, err)
				}
				var got bytes.Buffer
				r, _ = e.DecryptStream(ctx, iotest.HalfReader(bytes.NewReader(stream)), ad)
				if n, err := io.Copy(&got, r); err != nil || !bytes.Equal(got.Bytes(), plaintext) {
					t.Errorf("io.Copy(decrypted stream of %d bytes) = %d, %v, want the plaintext", size, n, err)
				}
			})
		}
	}
}

// TestStreamLarge streams 100 MiB through encryption and decryption with memory bounded by a few segments.
func TestStreamLarge(t *testing.T) {
	if testing.Short() {
		t.Skip("100 MiB")
	}
	const size = 100 << 20
	e := newEnvelope(t, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring())
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)

	pr, pw := io.Pipe()
	defer pr.Close()
	sent := sha256.New()
	go func() {
		w, err := e.EncryptStream(ctx, pw, nil)
		if err == nil {
			_, err = io.Copy(w, io.TeeReader(&patternReader{n: size}, sent))
		}
		if err == nil {
			err = w.Close()
		}
		pw.CloseWithError(err)
	}()
	r, err := e.DecryptStream(ctx, pr, nil)
	if err != nil {
		t.Fatalf("e.DecryptStream() err = %v, want nil", err)
	}
	received := sha256.New()
	n, err := io.Copy(received, r)
	if err != nil || n != size {
		t.Fatalf("io.Copy(decrypted 100 MiB stream) = %d, %v, want %d, nil", n, err, size)
	}
	if !bytes.Equal(sent.Sum(nil), received.Sum(nil)) {
		t.Errorf("the decrypted stream differs from the plaintext")
	}
	runtime.ReadMemStats(&after)
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 4<<20 {
		t.Errorf("encrypting and decrypting 100 MiB allocated %d bytes, want at most 4 MiB", alloc)
	}
}

func TestStreamRefuses(t *testing.T) {
	p := kleiditest.NewInsecureProvider()
	e := newEnvelope(t, p, kleidi.NewMemoryKeyring())
	ad := []byte("ad")
	const size = 3*segment + 100
	plaintext := pattern(size)
	stream := encryptStream(t, e, plaintext, ad)
	other := encryptStream(t, e, plaintext, ad)
	h := headerSize(stream)
	seg := func(s []byte, i int) []byte { // segment i of s
		start := h + i*(segment+segmentTag)
		return s[start:min(len(s), start+segment+segmentTag)]
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	flip := func(i int) []byte { s := bytes.Clone(stream); s[i] ^= 1; return s }

	type refusal struct {
		stream []byte
		want   error
		good   int // plaintext bytes the reader may return before the error: those of the segments before the fault
	}
	cases := map[string]refusal{
		"empty":                    {nil, kleidi.ErrInvalidCiphertext, 0},
		"bad magic":                {flip(0), kleidi.ErrInvalidCiphertext, 0},
		"bad version":              {flip(1), kleidi.ErrInvalidCiphertext, 0},
		"altered salt":             {flip(2), kleidi.ErrDecrypt, 0},
		"altered nonce prefix":     {flip(streamFixed - 1), kleidi.ErrDecrypt, 0},
		"altered key length":       {flip(streamFixed + 1), kleidi.ErrDecrypt, 0},
		"key length too large":     {cat(stream[:streamFixed], []byte{0xff, 0xff}, stream[streamFixed+2:]), kleidi.ErrInvalidCiphertext, 0},
		"key length zero":          {cat(stream[:streamFixed], []byte{0, 0}, stream[streamFixed+2:]), kleidi.ErrInvalidCiphertext, 0},
		"altered sealed key":       {flip(h - 1), kleidi.ErrDecrypt, 0},
		"header cut":               {stream[:streamFixed+1], kleidi.ErrInvalidCiphertext, 0},
		"sealed key cut":           {stream[:h-1], kleidi.ErrInvalidCiphertext, 0},
		"no segment":               {stream[:h], kleidi.ErrDecrypt, 0},
		"segments 0 and 1 swapped": {cat(stream[:h], seg(stream, 1), seg(stream, 0), stream[h+2*(segment+segmentTag):]), kleidi.ErrDecrypt, 0},
		"segments 1 and 2 swapped": {cat(stream[:h], seg(stream, 0), seg(stream, 2), seg(stream, 1), seg(stream, 3)), kleidi.ErrDecrypt, segment},
		"last segment repeated":    {cat(stream, seg(stream, 3)), kleidi.ErrDecrypt, 3 * segment},
		"a byte appended":          {cat(stream, []byte{0}), kleidi.ErrDecrypt, 3 * segment},
		"a segment appended":       {cat(stream, seg(stream, 1)), kleidi.ErrDecrypt, 3 * segment},
		"the last segment dropped": {stream[:h+3*(segment+segmentTag)], kleidi.ErrDecrypt, 2 * segment},
		"another stream's header":  {cat(other[:h], stream[h:]), kleidi.ErrDecrypt, 0},
		"another stream's segment": {cat(stream[:h], seg(stream, 0), seg(other, 1), seg(stream, 2), seg(stream, 3)), kleidi.ErrDecrypt, segment},
		"another stream's end":     {cat(stream[:h+3*(segment+segmentTag)], seg(other, 3)), kleidi.ErrDecrypt, 3 * segment},
		"a sealed value":           {mustSeal(t, e, ad), kleidi.ErrInvalidCiphertext, 0},
	}
	for i := range segments(size) {
		start := h + i*(segment+segmentTag)
		end := start + len(seg(stream, i))
		cases[fmt.Sprintf("segment %d: first byte altered", i)] = refusal{flip(start), kleidi.ErrDecrypt, i * segment}
		cases[fmt.Sprintf("segment %d: tag altered", i)] = refusal{flip(end - 1), kleidi.ErrDecrypt, i * segment}
		cases[fmt.Sprintf("cut at the start of segment %d", i)] = refusal{stream[:start], kleidi.ErrDecrypt, max(0, i-1) * segment}
		cases[fmt.Sprintf("cut in segment %d", i)] = refusal{stream[:start+1], kleidi.ErrDecrypt, i * segment}
		cases[fmt.Sprintf("cut one byte before the end of segment %d", i)] = refusal{stream[:end-1], kleidi.ErrDecrypt, i * segment}
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			got, err := decryptStream(e, c.stream, ad)
			if !errors.Is(err, c.want) {
				t.Fatalf("decrypting the stream: err = %v, want %v", err, c.want)
			}
			if len(got) > c.good || !bytes.Equal(got, plaintext[:len(got)]) {
				t.Errorf("the reader returned %d bytes before the error, want at most %d bytes of authenticated segments", len(got), c.good)
			}
		})
	}

	if _, err := decryptStream(e, stream, []byte("other ad")); !errors.Is(err, kleidi.ErrDecrypt) {
		t.Errorf("decrypting with other associated data: err = %v, want ErrDecrypt", err)
	}
	stranger, sp := strangerEnvelope(t, bytes.Repeat([]byte{3}, 32))
	unwraps := sp.Calls(kleiditest.OpUnwrap)
	if _, err := decryptStream(stranger, stream, ad); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("decrypting on another root: err = %v, want ErrUnauthenticated", err)
	}
	if n := sp.Calls(kleiditest.OpUnwrap) - unwraps; n != 0 {
		t.Errorf("decrypting on another root made %d unwraps, want 0", n)
	}
	// The faults did not disturb the Envelope.
	if got, err := decryptStream(e, stream, ad); err != nil || !bytes.Equal(got, plaintext) {
		t.Errorf("decrypting the intact stream: %d bytes, %v, want the plaintext", len(got), err)
	}
}

func mustSeal(t *testing.T, e *kleidi.Envelope, ad []byte) []byte {
	t.Helper()
	s, err := e.Seal(ctx, []byte("not a stream"), ad)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestStreamAfterRotationAndRestart: streams written before and after a rotation decrypt on a restarted Envelope of
// the same keyring, and on one of the same root whose keyring never held their keys.
func TestStreamAfterRotationAndRestart(t *testing.T) {
	p := kleiditest.NewInsecureProviderWithRoot(bytes.Repeat([]byte{4}, 32))
	ring := fileRing(t)
	e := newEnvelope(t, p, ring)
	plaintext := pattern(segment + 1)
	before := encryptStream(t, e, plaintext, nil)
	if _, err := e.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	after := encryptStream(t, e, plaintext, nil)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	for name, other := range map[string]*kleidi.Envelope{
		"restart":    newEnvelope(t, kleiditest.NewInsecureProviderWithRoot(bytes.Repeat([]byte{4}, 32)), ring),
		"no keyring": newEnvelope(t, kleiditest.NewInsecureProviderWithRoot(bytes.Repeat([]byte{4}, 32)), kleidi.NewMemoryKeyring()),
	} {
		for when, stream := range map[string][]byte{"before rotation": before, "after rotation": after} {
			if got, err := decryptStream(other, stream, nil); err != nil || !bytes.Equal(got, plaintext) {
				t.Errorf("%s: decrypting the stream written %s: %d bytes, %v, want the plaintext", name, when, len(got), err)
			}
		}
	}
}

// failingWriter accepts n bytes, then fails.
type failingWriter struct{ n int }

var errDiskFull = errors.New("disk full")

func (w *failingWriter) Write(p []byte) (int, error) {
	if len(p) > w.n {
		return 0, errDiskFull
	}
	w.n -= len(p)
	return len(p), nil
}

func TestStreamWriterErrors(t *testing.T) {
	e := newEnvelope(t, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring())

	var out bytes.Buffer
	w, _ := e.EncryptStream(ctx, &out, nil)
	if err := w.Close(); err != nil {
		t.Fatalf("w.Close() err = %v, want nil", err)
	}
	if err := w.Close(); err != nil {
		t.Errorf("second w.Close() err = %v, want nil", err)
	}
	if _, err := w.Write([]byte("late")); !errors.Is(err, kleidi.ErrClosed) {
		t.Errorf("w.Write() after Close err = %v, want ErrClosed", err)
	}

	if _, err := e.EncryptStream(ctx, &failingWriter{}, nil); !errors.Is(err, errDiskFull) {
		t.Errorf("e.EncryptStream(failing writer) err = %v, want the writer's", err)
	}

	// A writer that fails after the header: every later call fails, and no final segment is written.
	fw := &failingWriter{n: 1 << 10}
	w, err := e.EncryptStream(ctx, fw, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(pattern(2*segment + 1)); !errors.Is(err, errDiskFull) {
		t.Errorf("w.Write() err = %v, want the writer's", err)
	}
	fw.n = 1 << 30
	if _, err := w.Write([]byte("x")); !errors.Is(err, errDiskFull) {
		t.Errorf("w.Write() after an error err = %v, want the first error", err)
	}
	if err := w.Close(); !errors.Is(err, errDiskFull) {
		t.Errorf("w.Close() after an error err = %v, want the first error", err)
	}

	// A source that fails: the stream is never completed, so it never decrypts as if it had ended there.
	out.Reset()
	w, _ = e.EncryptStream(ctx, &out, nil)
	errSource := errors.New("source failed")
	src := io.MultiReader(bytes.NewReader(pattern(segment+5)), iotest.ErrReader(errSource))
	if _, err := io.Copy(w, src); !errors.Is(err, errSource) {
		t.Errorf("io.Copy(w, failing source) err = %v, want the source's", err)
	}
	if err := w.Close(); !errors.Is(err, errSource) {
		t.Errorf("w.Close() after a failed source err = %v, want the source's", err)
	}
	if _, err := decryptStream(e, out.Bytes(), nil); !errors.Is(err, kleidi.ErrDecrypt) {
		t.Errorf("decrypting a stream whose source failed: err = %v, want ErrDecrypt", err)
	}
}

// goldenStreamFile pins the stream format, version 1. It is written once by `go test -run TestGoldenStream
// -golden.create` when it does not exist, and never rewritten. Plaintexts are pattern(size).
const goldenStreamFile = "testdata/stream-v1.json"

type goldenStream struct {
	Comment        string `json:"comment"`
	Root           string `json:"insecure_root_hex"`
	PlaintextSize  int    `json:"plaintext_size"`
	AssociatedData string `json:"associated_data_hex"`
	Stream         string `json:"stream_hex"`
}

func TestGoldenStream(t *testing.T) {
	if createGolden() {
		writeGoldenStream(t)
	}
	var vectors []goldenStream
	readGolden(t, goldenStreamFile, &vectors)
	if len(vectors) < 3 {
		t.Fatalf("%s holds %d vectors, want at least 3", goldenStreamFile, len(vectors))
	}
	for _, v := range vectors {
		t.Run(v.Comment, func(t *testing.T) {
			e, _ := strangerEnvelope(t, unhex(t, v.Root))
			stream, ad, want := unhex(t, v.Stream), unhex(t, v.AssociatedData), pattern(v.PlaintextSize)
			got, err := decryptStream(e, stream, ad)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("decrypting the golden stream: %d bytes, %v, want %d bytes of plaintext", len(got), err, len(want))
			}
			// The format, decrypted by hand from its documentation: only the stream key comes from the Envelope.
			if got := decryptByTheBook(t, e, stream, ad); !bytes.Equal(got, want) {
				t.Errorf("decrypting the golden stream by the book: %d bytes, want the plaintext", len(got))
			}
		})
	}
}

// decryptByTheBook decrypts stream as the format's documentation describes it, with the standard library.
func decryptByTheBook(t *testing.T, e *kleidi.Envelope, stream, ad []byte) []byte {
	t.Helper()
	if stream[0] != 't' || stream[1] != 1 {
		t.Fatalf("stream header %x, want magic 't' and version 1", stream[:2])
	}
	salt, prefix := stream[2:34], stream[34:41]
	h := headerSize(stream)
	key, err := e.Open(ctx, stream[43:h], bytes.Join([][]byte{[]byte(streamLabel), stream[:41], ad}, nil))
	if err != nil {
		t.Fatalf("e.Open(sealed stream key) err = %v, want nil", err)
	}
	segmentKey, err := hkdf.Key(sha256.New, key, salt, segmentInfo, 32)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := aes.NewCipher(segmentKey)
	aead, _ := cipher.NewGCM(block)
	var plaintext []byte
	rest := stream[h:]
	for i := uint32(0); ; i++ {
		n := min(len(rest), segment+segmentTag)
		last := n == len(rest)
		nonce := binary.BigEndian.AppendUint32(bytes.Clone(prefix), i)
		nonce = append(nonce, map[bool]byte{false: 0, true: 1}[last])
		p, err := aead.Open(nil, nonce, rest[:n], nil)
		if err != nil {
			t.Fatalf("segment %d (last %v): %v", i, last, err)
		}
		plaintext, rest = append(plaintext, p...), rest[n:]
		if last {
			return plaintext
		}
	}
}

func writeGoldenStream(t *testing.T) {
	if _, err := os.Stat(goldenStreamFile); err == nil {
		return
	}
	e, _ := strangerEnvelope(t, goldenRoot)
	var vectors []goldenStream
	for _, v := range []struct {
		comment string
		size    int
		ad      []byte
	}{
		{"empty, no associated data", 0, nil},
		{"one byte, associated data", 1, []byte("files/a")},
		{"two segments, the last of one byte", segment + 1, []byte("files/b")},
	} {
		vectors = append(vectors, goldenStream{Comment: v.comment, Root: hex.EncodeToString(goldenRoot), PlaintextSize: v.size,
			AssociatedData: hex.EncodeToString(v.ad), Stream: hex.EncodeToString(encryptStream(t, e, pattern(v.size), v.ad))})
	}
	writeGoldenFile(t, goldenStreamFile, vectors)
}

// BenchmarkStream encrypts and decrypts 100 MiB streams in memory, beside the floor: bare AES-256-GCM over the
// same 100 MiB in 64 KiB segments (RawSeal, RawOpen).
func BenchmarkStream(b *testing.B) {
	const size = 100 << 20
	plaintext := pattern(size)
	block, _ := aes.NewCipher(make([]byte, 32))
	aead, _ := cipher.NewGCM(block)
	nonce := make([]byte, 12)
	buf := make([]byte, 0, segment+segmentTag)
	b.Run("RawSeal", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			for off := 0; off < size; off += segment {
				buf = aead.Seal(buf[:0], nonce, plaintext[off:off+segment], nil)
			}
		}
	})
	var sealed []byte
	for off := 0; off < size; off += segment {
		sealed = aead.Seal(sealed, nonce, plaintext[off:off+segment], nil)
	}
	b.Run("RawOpen", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			for off := 0; off < len(sealed); off += segment + segmentTag {
				var err error
				if buf, err = aead.Open(buf[:0], nonce, sealed[off:off+segment+segmentTag], nil); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
	e, err := kleidi.NewEnvelope(ctx, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		b.Fatal(err)
	}
	b.Run("Encrypt", func(b *testing.B) {
		b.SetBytes(size)
		b.ReportAllocs()
		for b.Loop() {
			w, err := e.EncryptStream(ctx, io.Discard, nil)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := w.Write(plaintext); err != nil {
				b.Fatal(err)
			}
			if err := w.Close(); err != nil {
				b.Fatal(err)
			}
		}
	})
	stream := encryptStream(b, e, plaintext, nil)
	b.Run("Decrypt", func(b *testing.B) {
		b.SetBytes(size)
		b.ReportAllocs()
		for b.Loop() {
			r, err := e.DecryptStream(ctx, bytes.NewReader(stream), nil)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := io.Copy(io.Discard, r); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// A file of any size, encrypted and decrypted with memory bounded by one segment.
func ExampleEnvelope_EncryptStream() {
	ctx := context.Background()
	e, err := kleidi.NewEnvelope(ctx, kleiditest.NewInsecureProvider(), kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		log.Fatal(err)
	}
	var file bytes.Buffer // an *os.File in a real program
	w, err := e.EncryptStream(ctx, &file, []byte("backups/db.dump"))
	if err != nil {
		log.Fatal(err)
	}
	if _, err := io.Copy(w, strings.NewReader("a database dump of any size")); err != nil {
		log.Fatal(err)
	}
	if err := w.Close(); err != nil { // writes the final segment: without it the stream never decrypts
		log.Fatal(err)
	}

	r, err := e.DecryptStream(ctx, &file, []byte("backups/db.dump"))
	if err != nil {
		log.Fatal(err)
	}
	plaintext, err := io.ReadAll(r) // an error, never a short read, if the stream was cut or altered
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(plaintext))
	// Output: a database dump of any size
}

package kleidi

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Stream format, version 1: what [Envelope.EncryptStream] writes, data of any size in segments that are each
// authenticated on their own (the STREAM construction, as tink's AES-GCM-HKDF streaming AEAD). All integers are
// big-endian.
//
//	offset  size  field
//	0       1     magic 't' (0x74)
//	1       1     version (0x01)
//	2       32    salt, random
//	34      7     nonce prefix, random
//	41      2     h, length of the sealed stream key (1 to the size of a sealed 32-byte key, 18631)
//	43      h     sealed stream key: [Envelope.Seal] of a random 256-bit key, with the associated data
//	              "kleidi stream v1" 0x00 || bytes 0 to 41 || the caller's associated data
//	43+h    ...   segments 0 to n-1
//
// Segment i is AES-256-GCM of plaintext bytes [i*64 KiB, (i+1)*64 KiB) under the segment key, with the nonce
// prefix || i (4 bytes) || last (1 byte: 1 for the final segment, else 0), and no additional data; it is 16 bytes
// longer than its plaintext. Every segment holds 64 KiB of plaintext but the last, which holds 0 to 64 KiB (0
// only when the whole stream is empty). The segment key is HKDF-SHA256 of the stream key with the salt and the
// info "kleidi stream v1 segment key".
//
// The seal authenticates the header and binds it to the associated data, so a wrong associated data or another
// root fails before any segment is read. The index and the last flag in the nonce make a segment valid only at its
// place in its own stream: truncation (also at a segment boundary), reordering, extension, or splicing segments
// of another stream all fail authentication. The KEK encrypts one message per stream, the stream key. The golden
// vectors in testdata/stream-v1.json pin the format.
const (
	streamMagic       = 't'
	streamVersion     = 1
	streamSaltSize    = 32
	streamPrefixSize  = 7
	streamFixedHeader = 2 + streamSaltSize + streamPrefixSize // bound into the seal's associated data
	streamHeader      = streamFixedHeader + 2
	streamSegmentSize = 64 << 10
	streamLabel       = "kleidi stream v1\x00"
	streamKeyInfo     = "kleidi stream v1 segment key"
	// maxStreamSegments bounds the segments of a stream: their index is 4 bytes (256 TiB of plaintext).
	maxStreamSegments = 1 << 32
	// maxSealedStreamKey is the size of the largest sealed stream key: the largest attached key, and a
	// ciphertext of KeySize bytes under the longest key ID.
	maxSealedStreamKey = sealedHeader + MaxAttachedKeySize + 3 + MaxKeyIDSize + nonceSize + KeySize + tagSize
)

// EncryptStream returns a writer that encrypts everything written to it into w, in the stream format, under a
// fresh random stream key sealed by the active KEK ([Envelope.Seal]). Data of any size is encrypted in segments
// of 64 KiB, with memory bounded by one segment. The header goes to w before EncryptStream returns; Close writes
// the final segment and must be called, or the stream is incomplete and [Envelope.DecryptStream] refuses it. Close
// does not close w. After an error (of w, or of the reader given to ReadFrom) every later call returns it, and
// Close writes no final segment, so a stream cut short by an error never decrypts.
//
// associatedData is authenticated but not encrypted; DecryptStream needs the same. ctx bounds only the sealing of
// the stream key, which never calls the provider: the writer does not keep it. A stream holds at most 256 TiB; a
// longer one fails with an error wrapping [ErrTooLarge]. The writer is for one goroutine at a time.
func (e *Envelope) EncryptStream(ctx context.Context, w io.Writer, associatedData []byte) (io.WriteCloser, error) {
	key := make([]byte, KeySize)
	defer clear(key)
	header := make([]byte, streamFixedHeader, streamHeader)
	header[0], header[1] = streamMagic, streamVersion
	rand.Read(header[2:])
	rand.Read(key)
	sealed, err := e.Seal(ctx, key, streamAssociatedData(header, associatedData))
	if err != nil {
		return nil, err
	}
	aead, err := streamAEAD(key, header)
	if err != nil {
		return nil, err
	}
	header = binary.BigEndian.AppendUint16(header, uint16(len(sealed)))
	if _, err := w.Write(append(header, sealed...)); err != nil {
		return nil, fmt.Errorf("kleidi: encrypt stream: write header: %w", err)
	}
	s := &streamWriter{w: w, aead: aead, buf: make([]byte, 0, streamSegmentSize+tagSize)}
	copy(s.nonce[:], header[2+streamSaltSize:streamFixedHeader])
	return s, nil
}

// DecryptStream reads a stream that [Envelope.EncryptStream] wrote with the same associated data, and returns a
// reader of its plaintext. It reads the header and opens the stream key at once ([Envelope.Open]: from the
// keyring, or else from the attached key, whose proof must verify), so a wrong associated data, another root or
// an unknown key fails here with the errors of Open. A malformed header gives an error wrapping
// [ErrInvalidCiphertext].
//
// The reader authenticates each segment before it returns any of its bytes, and returns [io.EOF] only after the
// final segment authenticated: a stream that was altered, truncated (at any point, also between segments),
// reordered or extended gives an error wrapping [ErrDecrypt], never a silent short read. Bytes already returned
// came from authenticated segments, but the stream is whole only at io.EOF: write the plaintext somewhere
// temporary and use it only then. Memory is bounded by one segment. ctx bounds only the opening of the stream key.
// The reader is for one goroutine at a time.
func (e *Envelope) DecryptStream(ctx context.Context, r io.Reader, associatedData []byte) (io.Reader, error) {
	header := make([]byte, streamHeader)
	if err := readStream(r, header, "header"); err != nil {
		return nil, err
	}
	switch {
	case header[0] != streamMagic:
		return nil, fmt.Errorf("%w: stream: not a kleidi stream", ErrInvalidCiphertext)
	case header[1] != streamVersion:
		return nil, fmt.Errorf("%w: stream: unsupported version %d", ErrInvalidCiphertext, header[1])
	}
	h := int(binary.BigEndian.Uint16(header[streamFixedHeader:]))
	if h == 0 || h > maxSealedStreamKey {
		return nil, fmt.Errorf("%w: stream: sealed key of %d bytes, want 1 to %d", ErrInvalidCiphertext, h, maxSealedStreamKey)
	}
	sealed := make([]byte, h)
	if err := readStream(r, sealed, "sealed key"); err != nil {
		return nil, err
	}
	key, err := e.Open(ctx, sealed, streamAssociatedData(header[:streamFixedHeader], associatedData))
	if err != nil {
		return nil, err
	}
	defer clear(key)
	if len(key) != KeySize {
		return nil, fmt.Errorf("%w: stream: key of %d bytes, want %d", ErrInvalidCiphertext, len(key), KeySize)
	}
	aead, err := streamAEAD(key, header[:streamFixedHeader])
	if err != nil {
		return nil, err
	}
	s := &streamReader{r: r, aead: aead, buf: make([]byte, streamSegmentSize+tagSize+1)}
	copy(s.nonce[:], header[2+streamSaltSize:streamFixedHeader])
	return s, nil
}

// readStream fills b from r; running out of bytes is a malformed stream.
func readStream(r io.Reader, b []byte, what string) error {
	_, err := io.ReadFull(r, b)
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("%w: stream: %s truncated", ErrInvalidCiphertext, what)
	case err != nil:
		return fmt.Errorf("kleidi: decrypt stream: read %s: %w", what, err)
	}
	return nil
}

// streamAssociatedData is the associated data of a stream's sealed key: the label, the header before the sealed
// key, and the caller's associated data.
func streamAssociatedData(header, associatedData []byte) []byte {
	ad := make([]byte, 0, len(streamLabel)+len(header)+len(associatedData))
	return append(append(append(ad, streamLabel...), header...), associatedData...)
}

// streamAEAD returns the AES-256-GCM of the segments of the stream whose key and fixed header are given.
func streamAEAD(key, header []byte) (cipher.AEAD, error) {
	segmentKey, err := hkdf.Key(sha256.New, key, header[2:2+streamSaltSize], streamKeyInfo, KeySize)
	if err != nil {
		return nil, fmt.Errorf("kleidi: stream: derive segment key: %w", err)
	}
	defer clear(segmentKey)
	block, err := aes.NewCipher(segmentKey)
	if err != nil {
		return nil, fmt.Errorf("kleidi: stream: %w", err)
	}
	return cipher.NewGCM(block)
}

// segmentNonce sets the index and the last flag of nonce, whose first bytes hold the stream's nonce prefix.
func segmentNonce(nonce *[nonceSize]byte, index uint64, last bool) {
	binary.BigEndian.PutUint32(nonce[streamPrefixSize:], uint32(index))
	nonce[nonceSize-1] = 0
	if last {
		nonce[nonceSize-1] = 1
	}
}

// streamWriter encrypts a stream; buf holds the plaintext of the segment being filled (at most one segment), and
// is where the segment is sealed in place.
type streamWriter struct {
	w     io.Writer
	aead  cipher.AEAD
	nonce [nonceSize]byte
	index uint64
	buf   []byte
	err   error // sticky; errWriterClosed after Close
}

var errWriterClosed = fmt.Errorf("kleidi: encrypt stream: write after Close: %w", ErrClosed)

// Write encrypts p. It keeps the last segment's bytes until more come or Close, since only Close knows which
// segment is the last.
func (s *streamWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 && s.err == nil {
		if len(s.buf) == streamSegmentSize {
			s.err = s.seal(s.buf, false)
			continue
		}
		if len(s.buf) == 0 && len(p) > streamSegmentSize {
			s.err = s.seal(p[:streamSegmentSize], false)
			p, n = p[streamSegmentSize:], n+streamSegmentSize
			continue
		}
		k := copy(s.buf[len(s.buf):streamSegmentSize], p)
		s.buf = s.buf[:len(s.buf)+k]
		p, n = p[k:], n+k
	}
	return n, s.err
}

// ReadFrom encrypts what it reads from r until [io.EOF], reading straight into the segment buffer; [io.Copy]
// uses it.
func (s *streamWriter) ReadFrom(r io.Reader) (int64, error) {
	var total int64
	for s.err == nil {
		// Read one byte past a full segment: only a byte that follows proves a segment is not the last.
		m, err := r.Read(s.buf[len(s.buf) : streamSegmentSize+1])
		s.buf, total = s.buf[:len(s.buf)+m], total+int64(m)
		if len(s.buf) > streamSegmentSize {
			next := s.buf[streamSegmentSize]
			if s.err = s.seal(s.buf[:streamSegmentSize], false); s.err == nil {
				s.buf = append(s.buf, next)
			}
		}
		if err == io.EOF {
			return total, s.err
		}
		if err != nil {
			s.err = fmt.Errorf("kleidi: encrypt stream: read: %w", err)
		}
	}
	return total, s.err
}

// Close encrypts and writes the final segment. It does not close the underlying writer. Closing again returns
// nil.
func (s *streamWriter) Close() error {
	switch s.err {
	case nil:
		if s.err = s.seal(s.buf, true); s.err != nil {
			return s.err
		}
		s.err = errWriterClosed
		return nil
	case errWriterClosed:
		return nil
	}
	return s.err
}

// seal encrypts plaintext, which is s.buf or not overlapping it, as the next segment, writes it and empties
// s.buf.
func (s *streamWriter) seal(plaintext []byte, last bool) error {
	if s.index >= maxStreamSegments-1 && !last {
		return fmt.Errorf("kleidi: encrypt stream: %w: more than %d segments", ErrTooLarge, uint64(maxStreamSegments))
	}
	segmentNonce(&s.nonce, s.index, last)
	segment := s.aead.Seal(s.buf[:0], s.nonce[:], plaintext, nil)
	s.index++
	s.buf = s.buf[:0]
	if _, err := s.w.Write(segment); err != nil {
		return fmt.Errorf("kleidi: encrypt stream: write: %w", err)
	}
	return nil
}

// streamReader decrypts a stream; buf holds one ciphertext segment and one byte more, which tells whether the
// segment is the last, and plaintext is the authenticated part of buf not yet returned.
type streamReader struct {
	r         io.Reader
	aead      cipher.AEAD
	nonce     [nonceSize]byte
	index     uint64
	buf       []byte
	plaintext []byte
	next      int   // bytes of the next segment already in buf (0 or 1)
	err       error // sticky; io.EOF after the last segment
}

// Read returns plaintext of authenticated segments only.
func (s *streamReader) Read(p []byte) (int, error) {
	for len(s.plaintext) == 0 {
		if s.err != nil {
			return 0, s.err
		}
		s.err = s.open()
	}
	n := copy(p, s.plaintext)
	s.plaintext = s.plaintext[n:]
	return n, nil
}

// WriteTo writes the plaintext to w one authenticated segment at a time; [io.Copy] uses it.
func (s *streamReader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		if len(s.plaintext) > 0 {
			n, err := w.Write(s.plaintext)
			s.plaintext, total = s.plaintext[n:], total+int64(n)
			if err != nil {
				return total, err
			}
		}
		if s.err == io.EOF {
			return total, nil
		}
		if s.err != nil {
			return total, s.err
		}
		s.err = s.open()
	}
}

// open reads and authenticates the next segment into s.plaintext. It returns io.EOF after the last one.
func (s *streamReader) open() error {
	full := streamSegmentSize + tagSize
	if s.next == 1 {
		s.buf[0] = s.buf[full]
	}
	n, err := io.ReadFull(s.r, s.buf[s.next:])
	n += s.next
	last := err != nil
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
	case err != nil:
		return fmt.Errorf("kleidi: decrypt stream: read: %w", err)
	default:
		n, s.next = full, 1 // the byte past the segment belongs to the next one
	}
	if s.index >= maxStreamSegments || (!last && s.index == maxStreamSegments-1) {
		return fmt.Errorf("kleidi: decrypt stream: segment %d: %w: too many segments", s.index, ErrDecrypt)
	}
	segmentNonce(&s.nonce, s.index, last)
	plaintext, err := s.aead.Open(s.buf[:0], s.nonce[:], s.buf[:n], nil)
	if err != nil {
		return fmt.Errorf("kleidi: decrypt stream: segment %d: %w (altered, truncated, reordered or extended)", s.index, ErrDecrypt)
	}
	s.index++
	s.plaintext = plaintext
	if last {
		return io.EOF
	}
	return nil
}

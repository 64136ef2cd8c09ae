package pkcs11

import (
	"bytes"
	"errors"
	"testing"

	"github.com/kleidi-kms/kleidi"
)

func TestParseBlob(t *testing.T) {
	iv := bytes.Repeat([]byte{0x11}, ivSize)
	ciphertext := bytes.Repeat([]byte{0x22}, kleidi.KeySize+tagSize)
	blob := encodeBlob(iv, ciphertext)
	if want := append([]byte("KP11\x01"), append(iv, ciphertext...)...); !bytes.Equal(blob, want) {
		t.Fatalf("encodeBlob(iv, ciphertext) = %x, want %x", blob, want)
	}
	header, gotIV, gotCiphertext, err := parseBlob(blob)
	if err != nil || !bytes.Equal(header, []byte("KP11\x01")) || !bytes.Equal(gotIV, iv) || !bytes.Equal(gotCiphertext, ciphertext) {
		t.Fatalf("parseBlob(encodeBlob(iv, ciphertext)) = %x, %x, %x, %v; want the header, iv, ciphertext, nil", header, gotIV, gotCiphertext, err)
	}
	for name, b := range map[string][]byte{
		"empty":         nil,
		"header only":   blob[:headerSize],
		"no key":        blob[:headerSize+ivSize+tagSize],
		"other magic":   append([]byte("KTPM"), blob[4:]...),
		"version 2":     append([]byte("KP11\x02"), blob[5:]...),
		"key too large": encodeBlob(iv, make([]byte, MaxKeySize+tagSize+1)),
	} {
		if _, _, _, err := parseBlob(b); !errors.Is(err, kleidi.ErrUnwrap) {
			t.Errorf("parseBlob(%s) err = %v, want an error wrapping kleidi.ErrUnwrap", name, err)
		}
	}
	// The associated data binds the purpose and the version.
	if got, want := associatedData(header), []byte("kleidi pkcs11 wrapped key\x00KP11\x01"); !bytes.Equal(got, want) {
		t.Errorf("associatedData(header) = %q, want %q", got, want)
	}
}

// FuzzParseBlob feeds the parser of wrapped keys, which reads bytes from etcd, anything: it never panics, and
// what it accepts splits into a known header, a 12-byte IV and a ciphertext of a key of 1 to MaxKeySize bytes.
func FuzzParseBlob(f *testing.F) {
	f.Add(encodeBlob(make([]byte, ivSize), make([]byte, kleidi.KeySize+tagSize)))
	f.Add([]byte("KP11\x01"))
	f.Add([]byte("KP11\x02aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		header, iv, ciphertext, err := parseBlob(b)
		if err != nil {
			if !errors.Is(err, kleidi.ErrUnwrap) {
				t.Fatalf("parseBlob err = %v, want an error wrapping kleidi.ErrUnwrap", err)
			}
			return
		}
		if !bytes.Equal(header, blobHeader()) || len(iv) != ivSize || len(ciphertext) <= tagSize || len(ciphertext) > MaxKeySize+tagSize {
			t.Fatalf("parseBlob(%x) accepted a header %x, a %d-byte IV and %d bytes of ciphertext", b, header, len(iv), len(ciphertext))
		}
		if !bytes.Equal(encodeBlob(iv, ciphertext), b) {
			t.Fatalf("encodeBlob(parseBlob(b)) differs from b")
		}
	})
}

package tpm

import (
	"bytes"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/kleidi-kms/kleidi"
)

// testBlob is a well-formed wrapped key with made-up TPM contents.
func testBlob(auth bool, pcrs uint32) *blob {
	return &blob{
		auth:    auth,
		pcrs:    pcrs,
		parent:  append([]byte{0x00, 0x0b}, bytes.Repeat([]byte{0xaa}, 32)...),
		public:  tpm2.Marshal(sealedTemplate(bytes.Repeat([]byte{0xbb}, 32), auth)),
		private: bytes.Repeat([]byte{0xcc}, 120),
	}
}

func TestParseBlobRoundTrip(t *testing.T) {
	for _, b := range []*blob{testBlob(false, 0), testBlob(true, 1<<7|1<<23)} {
		in := b.marshal()
		got, err := parseBlob(in)
		if err != nil {
			t.Fatalf("parseBlob(marshal()) err = %v, want nil", err)
		}
		if !bytes.Equal(got.marshal(), in) {
			t.Fatalf("parseBlob(in).marshal() differs from in")
		}
	}
}

func TestParseBlobRejects(t *testing.T) {
	good := testBlob(false, 1<<7).marshal()
	mutate := func(f func(b *blob)) []byte {
		b := testBlob(false, 1<<7)
		f(b)
		return b.marshal()
	}
	cases := map[string][]byte{
		"empty":          nil,
		"magic":          append([]byte("XTPM"), good[4:]...),
		"version":        append(append([]byte("KTPM"), 2), good[5:]...),
		"unknown flag":   append(append([]byte("KTPM\x01"), 0x80), good[6:]...),
		"PCR 24":         mutate(func(b *blob) { b.pcrs = 1 << 24 }),
		"trailing":       append(bytes.Clone(good), 0),
		"truncated":      good[:len(good)-1],
		"short parent":   mutate(func(b *blob) { b.parent = b.parent[:10] }),
		"empty private":  mutate(func(b *blob) { b.private = nil }),
		"auth flag lies": mutate(func(b *blob) { b.auth = true }),
		"user with auth": mutate(func(b *blob) {
			p := sealedTemplate(make([]byte, 32), false)
			p.ObjectAttributes.UserWithAuth = true
			b.public = tpm2.Marshal(p)
		}),
		"a signing key":   mutate(func(b *blob) { b.public = tpm2.Marshal(tpm2.ECCSRKTemplate) }),
		"no policy":       mutate(func(b *blob) { b.public = tpm2.Marshal(sealedTemplate(nil, false)) }),
		"public trailing": mutate(func(b *blob) { b.public = append(b.public, 0) }),
		"too large":       make([]byte, kleidi.MaxWrappedKeySize+1),
	}
	for name, in := range cases {
		if _, err := parseBlob(in); !errors.Is(err, errBlob) {
			t.Errorf("parseBlob(%s) err = %v, want an error wrapping errBlob", name, err)
		}
	}
}

// FuzzParseBlob checks that the parser of untrusted wrapped keys never panics and accepts only canonical input.
func FuzzParseBlob(f *testing.F) {
	f.Add(testBlob(false, 0).marshal())
	f.Add(testBlob(true, 1<<7).marshal())
	f.Add([]byte("KTPM\x01\x00\x00\x00\x00\x00"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		b, err := parseBlob(in)
		if err != nil {
			if !errors.Is(err, errBlob) {
				t.Fatalf("parseBlob(in) err = %v, want an error wrapping errBlob", err)
			}
			return
		}
		if !bytes.Equal(b.marshal(), in) {
			t.Fatalf("parseBlob(in).marshal() differs from in")
		}
	})
}

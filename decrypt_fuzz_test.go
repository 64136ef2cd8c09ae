package kleidi_test

import (
	"bytes"
	"testing"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

// FuzzDecrypt feeds arbitrary bytes and attached wrapped keys to Decrypt: it must never panic, and must only
// succeed for what the Envelope encrypted.
func FuzzDecrypt(f *testing.F) {
	p := kleiditest.NewInsecureProvider()
	e, err := kleidi.NewEnvelope(ctx, p, kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		f.Fatal(err)
	}
	c, err := e.Encrypt(ctx, []byte("fuzz"), []byte("ad"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(c.Bytes(), c.AttachedKey, []byte("ad"))
	f.Add(c.Bytes(), []byte{}, []byte{})
	f.Add([]byte{'k', 1, 3, 'a', 'b', 'c'}, []byte{1, 2, 3}, []byte{})
	f.Fuzz(func(t *testing.T, raw, wrapped, ad []byte) {
		parsed, err := kleidi.ParseCiphertext(raw)
		if err != nil {
			return
		}
		parsed.AttachedKey = wrapped
		got, err := e.Decrypt(ctx, parsed, ad)
		if err != nil {
			return
		}
		if !bytes.Equal(raw, c.Bytes()) || !bytes.Equal(ad, []byte("ad")) || string(got) != "fuzz" {
			t.Errorf("Decrypt accepted bytes it did not produce: %x (ad %x)", raw, ad)
		}
	})
}

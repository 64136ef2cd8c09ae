package gpg_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/gpg"
)

// FuzzUnwrap feeds arbitrary blobs to Unwrap: it never panics, refuses with an error wrapping kleidi.ErrUnwrap,
// and what it accepts is a key of 1 to gpg.MaxKeySize bytes.
func FuzzUnwrap(f *testing.F) {
	k1, k2 := newTestKey(f, keyOptions{}), newTestKey(f, keyOptions{v6: true})
	p := newProvider(f, gpg.Config{PublicKeyFiles: []string{k1.pub, k2.pub}, PrivateKeyFile: k1.priv})
	v6 := newProvider(f, gpg.Config{PrivateKeyFile: k2.priv})
	key := bytes.Repeat([]byte{0x5a}, kleidi.KeySize)
	for _, w := range []kleidi.Provider{p, v6} {
		wrapped, err := w.Wrap(ctx, key)
		if err != nil {
			f.Fatalf("Wrap(ctx, key) err = %v, want nil", err)
		}
		f.Add(wrapped)
		f.Add(wrapped[:len(wrapped)-1])
		f.Add(append(bytes.Clone(wrapped), 0))
	}
	f.Add([]byte{})
	f.Add([]byte{0xc1, 10, 3, 1, 2, 3, 4, 5, 6, 7, 8, 1, 0xd2, 1, 1})
	f.Fuzz(func(t *testing.T, blob []byte) {
		got, err := p.Unwrap(ctx, blob)
		if err != nil {
			if !errors.Is(err, kleidi.ErrUnwrap) || got != nil {
				t.Fatalf("p.Unwrap(ctx, blob) = %d bytes, %v; want nil and an error wrapping kleidi.ErrUnwrap", len(got), err)
			}
			return
		}
		if len(got) == 0 || len(got) > gpg.MaxKeySize {
			t.Fatalf("p.Unwrap(ctx, blob) = %d bytes, want 1 to %d", len(got), gpg.MaxKeySize)
		}
	})
}

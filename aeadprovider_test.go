package kleidi_test

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

// gcmRoot is an AES-256-GCM key in memory, a stand-in for a KMS key; down makes it answer as an unreachable
// network service does, with a raw error.
type gcmRoot struct {
	aead cipher.AEAD
	down atomic.Bool
}

func newGCMRoot(t testing.TB) *gcmRoot {
	key := make([]byte, 32)
	rand.Read(key)
	block, _ := aes.NewCipher(key)
	aead, _ := cipher.NewGCM(block)
	return &gcmRoot{aead: aead}
}

var errRefused = &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}

func (r *gcmRoot) Encrypt(ctx context.Context, plaintext, ad []byte) ([]byte, error) {
	if r.down.Load() {
		return nil, errRefused
	}
	nonce := make([]byte, r.aead.NonceSize())
	rand.Read(nonce)
	return r.aead.Seal(nonce, nonce, plaintext, ad), nil
}

func (r *gcmRoot) Decrypt(ctx context.Context, ciphertext, ad []byte) ([]byte, error) {
	if r.down.Load() {
		return nil, errRefused
	}
	n := r.aead.NonceSize()
	if len(ciphertext) < n {
		return nil, errors.New("short")
	}
	return r.aead.Open(nil, ciphertext[:n], ciphertext[n:], ad)
}

func TestAEADProviderConformance(t *testing.T) {
	roots := map[kleidi.Provider]*gcmRoot{}
	kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider {
		r := newGCMRoot(t)
		p, err := kleidi.NewAEADProvider("filekey", r)
		if err != nil {
			t.Fatal(err)
		}
		roots[p] = r
		return p
	}, kleiditest.WithOutage(func(t *testing.T, p kleidi.Provider) func() {
		roots[p].down.Store(true)
		return func() { roots[p].down.Store(false) }
	}))
}

// A raw error of the root that is no outage is a refusal; an error of a root that classifies itself is kept.
func TestAEADProviderClassifiesErrors(t *testing.T) {
	r := newGCMRoot(t)
	p, _ := kleidi.NewAEADProvider("filekey", r)
	blob, err := p.Wrap(context.Background(), make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	blob[len(blob)-1] ^= 1
	if _, err := p.Unwrap(context.Background(), blob); !errors.Is(err, kleidi.ErrUnwrap) {
		t.Errorf("Unwrap(altered blob) err = %v, want kleidi.ErrUnwrap", err)
	}
	// Another provider name on the same root: the blob is bound to its name.
	other, _ := kleidi.NewAEADProvider("other", r)
	blob[len(blob)-1] ^= 1
	if _, err := other.Unwrap(context.Background(), blob); !errors.Is(err, kleidi.ErrUnwrap) {
		t.Errorf("Unwrap(blob of provider filekey) by provider other err = %v, want kleidi.ErrUnwrap", err)
	}
	custom, _ := kleidi.NewAEADProvider("filekey", r, kleidi.WithUnavailable(func(err error) bool { return false }))
	r.down.Store(true)
	if _, err := custom.Unwrap(context.Background(), blob); errors.Is(err, kleidi.ErrUnavailable) {
		t.Errorf("with WithUnavailable(never), Unwrap err = %v, want no kleidi.ErrUnavailable", err)
	}
	if err := p.Health(context.Background()); !errors.Is(err, kleidi.ErrUnavailable) || fmt.Sprint(err) == "" {
		t.Errorf("Health with the root away = %v, want kleidi.ErrUnavailable", err)
	}
}

func ExampleNewAEADProvider() {
	// A root that encrypts bytes (here AES-256-GCM in memory; a KMS key or an HSM in real use) becomes a Provider.
	p, err := kleidi.NewAEADProvider("filekey", newGCMRoot(nil))
	if err != nil {
		panic(err)
	}
	defer p.Close()
	env, err := kleidi.NewEnvelope(context.Background(), p, kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		panic(err)
	}
	c, _ := env.Encrypt(context.Background(), []byte("a secret"), nil)
	plaintext, _ := env.Decrypt(context.Background(), c, nil)
	fmt.Println(string(plaintext))
	// Output: a secret
}

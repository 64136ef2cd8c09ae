package kleidi

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestProofKey(t *testing.T) {
	ctx := context.Background()
	var derivations atomic.Int64
	secret := bytes.Repeat([]byte{5}, ProofKeySize)
	k := NewProofKey(func(context.Context) ([]byte, error) {
		derivations.Add(1)
		return bytes.Clone(secret), nil
	})
	var wg sync.WaitGroup
	for range 8 { // concurrent first uses share one derivation
		wg.Go(func() {
			if _, err := k.Prove(ctx, []byte("m")); err != nil {
				t.Errorf("k.Prove(ctx, m) err = %v", err)
			}
		})
	}
	wg.Wait()
	proof, err := k.Prove(ctx, []byte("m"))
	if err != nil || len(proof) != ProofKeySize {
		t.Fatalf("k.Prove(ctx, m) = %d bytes, %v; want %d, nil", len(proof), err, ProofKeySize)
	}
	if err := k.Verify(ctx, []byte("m"), proof); err != nil {
		t.Errorf("k.Verify(ctx, m, k.Prove(m)) = %v, want nil", err)
	}
	for name, c := range map[string]struct{ m, p []byte }{
		"another message": {[]byte("n"), proof},
		"altered proof":   {[]byte("m"), append(bytes.Clone(proof[:ProofKeySize-1]), proof[ProofKeySize-1]^1)},
		"short proof":     {[]byte("m"), proof[:ProofKeySize-1]},
	} {
		if err := k.Verify(ctx, c.m, c.p); !errors.Is(err, ErrUnauthenticated) {
			t.Errorf("k.Verify(%s) = %v, want ErrUnauthenticated", name, err)
		}
	}
	if n := derivations.Load(); n != 1 {
		t.Errorf("%d derivations, want 1", n)
	}
	key := k.key
	k.Close()
	if !bytes.Equal(key, make([]byte, ProofKeySize)) || k.key != nil {
		t.Errorf("the proof key is not zeroed after Close")
	}
	if _, err := k.Prove(ctx, []byte("m")); !errors.Is(err, ErrClosed) {
		t.Errorf("k.Prove after Close err = %v, want ErrClosed", err)
	}
}

func TestProofKeyFailureIsRememberedForASecond(t *testing.T) {
	ctx := context.Background()
	var derivations atomic.Int64
	down := errors.New("root away")
	var fail atomic.Bool
	fail.Store(true)
	k := NewProofKey(func(context.Context) ([]byte, error) {
		derivations.Add(1)
		if fail.Load() {
			return nil, errors.Join(ErrUnavailable, down)
		}
		return make([]byte, ProofKeySize), nil
	})
	for range 100 {
		if err := k.Verify(ctx, []byte("m"), make([]byte, ProofKeySize)); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("k.Verify with the root away err = %v, want ErrUnavailable", err)
		}
	}
	if n := derivations.Load(); n != 1 {
		t.Errorf("100 Verify calls with the root away made %d derivations, want 1", n)
	}
	fail.Store(false)
	time.Sleep(proofKeyRetry + 100*time.Millisecond)
	if _, err := k.Prove(ctx, []byte("m")); err != nil {
		t.Errorf("k.Prove a second after the root came back err = %v, want nil", err)
	}
	bad := NewProofKey(func(context.Context) ([]byte, error) { return make([]byte, 3), nil })
	if _, err := bad.Prove(ctx, []byte("m")); err == nil {
		t.Errorf("a derived key of 3 bytes: Prove err = nil, want an error")
	}
}

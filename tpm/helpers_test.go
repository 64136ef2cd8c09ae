package tpm

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kleidi-kms/kleidi"
)

// withTPM runs f on the provider's connection under its lock; for a provider that connects per operation, on a
// fresh connection of its own.
func withTPM(t testing.TB, p *Provider, f func(t transport.TPM)) {
	t.Helper()
	p.sem <- struct{}{}
	defer func() { <-p.sem }()
	if p.perOp {
		tp, err := p.open()
		if err != nil {
			t.Fatalf("connecting to the TPM: %v", err)
		}
		defer tp.Close()
		f(tp)
		return
	}
	if p.tpm == nil {
		t.Fatalf("provider has no TPM connection")
	}
	f(p.tpm)
}

func randomKey(t testing.TB) []byte {
	t.Helper()
	key := make([]byte, kleidi.KeySize)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	return key
}

func wrapUnwrap(t *testing.T, p *Provider) (key, wrapped []byte) {
	t.Helper()
	ctx := context.Background()
	key = randomKey(t)
	wrapped, err := p.Wrap(ctx, key)
	if err != nil {
		t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
	}
	got, err := p.Unwrap(ctx, wrapped)
	if err != nil {
		t.Fatalf("p.Unwrap(ctx, wrapped) err = %v, want nil", err)
	}
	if !bytes.Equal(got, key) {
		t.Fatalf("p.Unwrap(ctx, p.Wrap(ctx, key)) differs from key")
	}
	return key, wrapped
}

func writeAuthFile(t *testing.T, content string) string {
	t.Helper()
	name := filepath.Join(t.TempDir(), "auth")
	if err := os.WriteFile(name, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return name
}

// countHandles returns the transient objects and loaded sessions in the TPM.
func countHandles(t testing.TB, tp transport.TPM) (objects, sessions []tpm2.TPMHandle) {
	t.Helper()
	get := func(first uint32) []tpm2.TPMHandle {
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: first, PropertyCount: 64}.Execute(tp)
		if err != nil {
			t.Fatalf("GetCapability(handles %#x) err = %v, want nil", first, err)
		}
		hs, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			t.Fatalf("GetCapability(handles %#x).Handles() err = %v", first, err)
		}
		var out []tpm2.TPMHandle
		for _, h := range hs.Handle {
			if uint32(h)>>24 == first>>24 {
				out = append(out, h)
			}
		}
		return out
	}
	return get(0x80000000), append(get(0x02000000), get(0x03000000)...)
}

// assertNoHandles fails unless the only objects loaded are the SRKs of p and the other open providers sharing
// its simulator, and no session is loaded.
func assertNoHandles(t testing.TB, p *Provider, others ...*Provider) {
	t.Helper()
	withTPM(t, p, func(tp transport.TPM) {
		objects, sessions := countHandles(t, tp)
		srks := 0
		for _, q := range append(others, p) {
			if q.srk != nil && !q.srk.persistent {
				srks++
			}
		}
		if len(objects) != srks {
			t.Errorf("transient handles = %#x, want only the %d SRKs", objects, srks)
		}
		if len(sessions) != 0 {
			t.Errorf("session handles = %#x, want none", sessions)
		}
	})
}

// commandLog records the commands sent through a provider's connection: their codes, and their bytes.
type commandLog struct {
	mu    sync.Mutex
	codes []tpm2.TPMCC
	raw   [][]byte
}

func (l *commandLog) count(cc tpm2.TPMCC) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, c := range l.codes {
		if c == cc {
			n++
		}
	}
	return n
}

func (l *commandLog) total() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.codes)
}

// loggingTPM records each command's code, then sends it.
type loggingTPM struct {
	transport.TPMCloser
	log *commandLog
}

func (c loggingTPM) Send(cmd []byte) ([]byte, error) {
	if len(cmd) >= 10 {
		c.log.mu.Lock()
		c.log.codes = append(c.log.codes, tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:10])))
		c.log.raw = append(c.log.raw, bytes.Clone(cmd))
		c.log.mu.Unlock()
	}
	return c.TPMCloser.Send(cmd)
}

// recordCommands makes p record the commands it sends from now on, on its current connection and on any later
// one.
func recordCommands(t testing.TB, p *Provider) *commandLog {
	t.Helper()
	l := &commandLog{}
	p.sem <- struct{}{}
	defer func() { <-p.sem }()
	open := p.open
	p.open = func() (transport.TPMCloser, error) {
		tp, err := open()
		if err != nil {
			return nil, err
		}
		return loggingTPM{tp, l}, nil
	}
	if p.tpm != nil {
		p.tpm = loggingTPM{p.tpm, l}
	}
	return l
}

package kleiditest

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/kleidi-kms/kleidi"
)

// TestNode is the conformance suite of a provider that shares a keyring with other nodes: a [kleidi.Node], with
// the [kleidi.RecipientOpener] open of its identities. Run it beside [TestProvider]:
//
//	func TestNodeConformance(t *testing.T) {
//		kleiditest.TestNode(t, func(t *testing.T) kleidi.Provider { return newTestProvider(t) }, mypkg.OpenRecipient)
//	}
//
// newNode is called once per subtest; two calls may return the same root of trust, or two different ones, as
// long as a root is a kleidi.Node. The suite checks that the identity is well formed, stable, and survives its
// identity file; that Sign's signatures verify with the identity and that another message's, an altered one or an
// empty one does not; that what a recipient opened from the identity wraps, the node unwraps, without the key in
// clear in the blob; that a blob wrapped for another root (a [NewInsecureNode]) is refused with an error wrapping
// [kleidi.ErrUnwrap]; and that open refuses an identity of another provider.
func TestNode(t *testing.T, newNode func(t *testing.T) kleidi.Provider, open kleidi.RecipientOpener) {
	t.Helper()
	ctx := context.Background()
	run := func(name string, f func(t *testing.T, p kleidi.Provider, node kleidi.Node, id *kleidi.Identity)) {
		t.Run(name, func(t *testing.T) {
			p := newNode(t)
			defer p.Close()
			node, ok := p.(kleidi.Node)
			if !ok {
				t.Fatalf("%T is not a kleidi.Node", p)
			}
			id, err := node.Identity(ctx)
			if err != nil {
				t.Fatalf("Identity() err = %v", err)
			}
			f(t, p, node, id)
		})
	}

	run("Identity", func(t *testing.T, p kleidi.Provider, node kleidi.Node, id *kleidi.Identity) {
		if err := id.Check(); err != nil {
			t.Fatalf("Identity().Check() = %v", err)
		}
		if id.Provider != p.Name() {
			t.Errorf("Identity().Provider = %q, want the provider's name %q", id.Provider, p.Name())
		}
		if len(id.VerifyKey) == 0 {
			t.Errorf("Identity() has no verify key: a node must sign the copies it makes for others")
		}
		again, err := node.Identity(ctx)
		if err != nil || again.ID() != id.ID() {
			t.Errorf("a second Identity() = %v, %v; want the same ID %s", again, err, id.ID())
		}
		file, err := kleidi.MarshalIdentity(id)
		if err != nil {
			t.Fatal(err)
		}
		back, err := kleidi.ParseIdentity(file)
		if err != nil || back.ID() != id.ID() {
			t.Errorf("ParseIdentity(MarshalIdentity(id)) = %v, %v", back, err)
		}
	})

	run("Sign", func(t *testing.T, p kleidi.Provider, node kleidi.Node, id *kleidi.Identity) {
		msg := []byte("a message to sign")
		sig, err := node.Sign(ctx, msg)
		if err != nil {
			t.Fatalf("Sign() err = %v", err)
		}
		if len(sig) == 0 || len(sig) > kleidi.MaxSignatureSize {
			t.Fatalf("len(Sign()) = %d, want 1 to %d", len(sig), kleidi.MaxSignatureSize)
		}
		if err := id.Verify(msg, sig); err != nil {
			t.Errorf("Identity().Verify(Sign(msg)) = %v, want nil", err)
		}
		altered := bytes.Clone(sig)
		altered[len(altered)/2] ^= 1
		for name, tc := range map[string]struct{ msg, sig []byte }{
			"another message": {[]byte("another message"), sig},
			"altered":         {msg, altered},
			"empty":           {msg, nil},
		} {
			if err := id.Verify(tc.msg, tc.sig); !errors.Is(err, kleidi.ErrUnauthenticated) {
				t.Errorf("Verify(%s) = %v, want kleidi.ErrUnauthenticated", name, err)
			}
		}
		other, _ := NewInsecureNode().Identity(ctx)
		if err := other.Verify(msg, sig); !errors.Is(err, kleidi.ErrUnauthenticated) {
			t.Errorf("another node's identity verifies this node's signature: %v", err)
		}
	})

	run("Recipient", func(t *testing.T, p kleidi.Provider, node kleidi.Node, id *kleidi.Identity) {
		r, err := open(id)
		if err != nil {
			t.Fatalf("open(Identity()) err = %v", err)
		}
		if r.Identity().ID() != id.ID() {
			t.Errorf("Recipient.Identity() = %s, want %s", r.Identity().ID(), id.ID())
		}
		key := randomKey(t)
		blob, err := r.Wrap(ctx, key)
		if err != nil {
			t.Fatalf("Recipient.Wrap() err = %v", err)
		}
		if len(blob) == 0 || len(blob) > kleidi.MaxWrappedKeySize || bytes.Contains(blob, key) {
			t.Fatalf("Recipient.Wrap() = %d bytes, or holds the key in clear", len(blob))
		}
		got, err := p.Unwrap(ctx, blob)
		if err != nil || !bytes.Equal(got, key) {
			t.Fatalf("Unwrap(Recipient.Wrap(key)) err = %v (equal: %v)", err, bytes.Equal(got, key))
		}
		if _, err := p.Unwrap(ctx, flip(blob, len(blob)-1)); !errors.Is(err, kleidi.ErrUnwrap) {
			t.Errorf("Unwrap(altered recipient blob) err = %v, want kleidi.ErrUnwrap", err)
		}
	})

	run("ForeignRecipient", func(t *testing.T, p kleidi.Provider, node kleidi.Node, id *kleidi.Identity) {
		stranger := &kleidi.Identity{Provider: "foreign", PublicKey: id.PublicKey, VerifyKey: id.VerifyKey}
		if _, err := open(stranger); err == nil {
			t.Errorf("open(an identity of provider %q) err = nil", stranger.Provider)
		}
		other, _ := NewInsecureNode().Identity(ctx)
		r, _ := OpenInsecureRecipient(other)
		blob, _ := r.Wrap(ctx, randomKey(t))
		if _, err := p.Unwrap(ctx, blob); !errors.Is(err, kleidi.ErrUnwrap) {
			t.Errorf("Unwrap(blob wrapped for another root) err = %v, want kleidi.ErrUnwrap", err)
		}
	})
}

package kleiditest

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/kleidi-kms/kleidi"
)

// Node is an insecure in-memory root of trust that can share a keyring with others (a [kleidi.Node]): a
// [Provider] that also holds an X25519 key, which other nodes wrap KEKs to through [OpenInsecureRecipient], and an
// ECDSA P-256 key that signs for it. Like Provider, its keys live only in this process.
type Node struct {
	*Provider
	dh   *ecdh.PrivateKey
	sign *ecdsa.PrivateKey
	id   *kleidi.Identity
}

var _ kleidi.Node = (*Node)(nil)

// NewInsecureNode returns a Node named "insecure" with fresh random keys.
func NewInsecureNode() *Node {
	dh, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	sk, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	vk, err := x509.MarshalPKIXPublicKey(&sk.PublicKey)
	if err != nil {
		panic(err)
	}
	p := NewInsecureProvider()
	return &Node{Provider: p, dh: dh, sign: sk,
		id: &kleidi.Identity{Provider: p.Name(), PublicKey: dh.PublicKey().Bytes(), VerifyKey: vk}}
}

// Identity returns the node's identity.
func (n *Node) Identity(ctx context.Context) (*kleidi.Identity, error) {
	id := *n.id
	return &id, nil
}

// Sign signs message with the node's ECDSA key.
func (n *Node) Sign(ctx context.Context, message []byte) ([]byte, error) {
	if err := n.enter(ctx, OpProve); err != nil {
		return nil, err
	}
	digest := sha256.Sum256(message)
	return ecdsa.SignASN1(rand.Reader, n.sign, digest[:])
}

// recipientMagic starts a blob wrapped by a recipient of [OpenInsecureRecipient]: X25519 public key of the
// sender's ephemeral key (32 bytes), then AES-256-GCM (random nonce) under HKDF of the shared secret.
const recipientMagic = "kleiditest-x25519\x00"

// Unwrap opens a blob sealed by Wrap of this node, or by a recipient opened from its identity.
func (n *Node) Unwrap(ctx context.Context, wrapped []byte) ([]byte, error) {
	rest, ok := bytes.CutPrefix(wrapped, []byte(recipientMagic))
	if !ok {
		return n.Provider.Unwrap(ctx, wrapped)
	}
	if err := n.enter(ctx, OpUnwrap); err != nil {
		return nil, err
	}
	if len(rest) < 32 {
		return nil, fmt.Errorf("kleiditest: unwrap: short blob: %w", kleidi.ErrUnwrap)
	}
	eph, err := ecdh.X25519().NewPublicKey(rest[:32])
	if err != nil {
		return nil, fmt.Errorf("kleiditest: unwrap: %w", kleidi.ErrUnwrap)
	}
	shared, err := n.dh.ECDH(eph)
	if err != nil {
		return nil, fmt.Errorf("kleiditest: unwrap: %w", kleidi.ErrUnwrap)
	}
	aead, err := recipientAEAD(shared, rest[:32], n.dh.PublicKey().Bytes())
	if err != nil {
		return nil, err
	}
	sealed := rest[32:]
	if len(sealed) < aead.NonceSize()+aead.Overhead() {
		return nil, fmt.Errorf("kleiditest: unwrap: short blob: %w", kleidi.ErrUnwrap)
	}
	key, err := aead.Open(nil, sealed[:aead.NonceSize()], sealed[aead.NonceSize():], nil)
	if err != nil {
		return nil, fmt.Errorf("kleiditest: unwrap: authentication failed: %w", kleidi.ErrUnwrap)
	}
	return key, nil
}

func recipientAEAD(shared, eph, to []byte) (cipher.AEAD, error) {
	k, err := hkdf.Key(sha256.New, shared, append(bytes.Clone(eph), to...), recipientMagic, 32)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

type recipient struct {
	id *kleidi.Identity
	to *ecdh.PublicKey
}

// OpenInsecureRecipient is the [kleidi.RecipientOpener] of [Node] identities: its Wrap needs only the public key.
func OpenInsecureRecipient(id *kleidi.Identity) (kleidi.Recipient, error) {
	if id == nil || id.Provider != "insecure" {
		return nil, errors.New("kleiditest: not an identity of an insecure node")
	}
	to, err := ecdh.X25519().NewPublicKey(id.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("kleiditest: identity: %w", err)
	}
	return &recipient{id: id, to: to}, nil
}

func (r *recipient) Identity() *kleidi.Identity { return r.id }

func (r *recipient) Wrap(ctx context.Context, key []byte) ([]byte, error) {
	eph, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	shared, err := eph.ECDH(r.to)
	if err != nil {
		return nil, err
	}
	aead, err := recipientAEAD(shared, eph.PublicKey().Bytes(), r.to.Bytes())
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	out := append([]byte(recipientMagic), eph.PublicKey().Bytes()...)
	out = append(out, nonce...)
	return aead.Seal(out, nonce, key, nil), nil
}

package kleidi

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Identity is the public identity of a root of trust: what another node needs to wrap KEKs for it (a
// [Recipient]) and to check what it signs. It holds nothing secret, and is handed from node to node as a file
// (see [ParseIdentity]).
type Identity struct {
	// Provider is the [Provider.Name] of the root: it says which [RecipientOpener] understands PublicKey.
	Provider string `json:"provider"`
	// PublicKey is what a Recipient wraps to, in the provider's encoding: a TPM's endorsement key and sealing
	// policy, an OpenPGP public key.
	PublicKey []byte `json:"publicKey"`
	// Certificate optionally vouches for PublicKey: a TPM's endorsement key certificate.
	Certificate []byte `json:"certificate,omitempty"`
	// VerifyKey is the PKIX-encoded ECDSA P-256 public key that checks the member's signatures ([Node.Sign]).
	// It is empty for a recipient that only receives KEKs and never sends them, such as an offline recovery key.
	VerifyKey []byte `json:"verifyKey,omitempty"`
}

// Limits of an identity.
const (
	// MaxIdentitySize is the largest identity file [ParseIdentity] reads.
	MaxIdentitySize = 64 << 10
	// MaxSignatureSize is the largest signature [Node.Sign] may return.
	MaxSignatureSize = 256
	// identityFormat names the identity file format.
	identityFormat  = "kleidi-identity"
	identityIDLabel = "kleidi identity v1\x00"
	// identityFingerprintSize is how many bytes of SHA-256 an identity's ID keeps: 128 bits.
	identityFingerprintSize = 16
)

// ID names the identity in keyrings and commands: "<provider>-<fingerprint>", where the fingerprint is
// SHA-256 over the provider, PublicKey and VerifyKey, cut to 128 bits. Another key gives another ID, so a
// pinned ID pins the keys too.
func (id *Identity) ID() string {
	h := sha256.New()
	h.Write([]byte(identityIDLabel))
	for _, part := range [][]byte{[]byte(id.Provider), id.PublicKey, id.VerifyKey} {
		h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(part))))
		h.Write(part)
	}
	return id.Provider + "-" + fingerprintEncoding.EncodeToString(h.Sum(nil)[:identityFingerprintSize])
}

// Check returns an error unless id is well formed: a valid provider name, a public key, and a verify key that is
// an ECDSA P-256 public key when present.
func (id *Identity) Check() error {
	if err := CheckProviderName(id.Provider); err != nil {
		return fmt.Errorf("kleidi: identity: %w", err)
	}
	if len(id.PublicKey) == 0 {
		return errors.New("kleidi: identity: no public key")
	}
	if len(id.PublicKey)+len(id.Certificate)+len(id.VerifyKey) > MaxIdentitySize/2 {
		return fmt.Errorf("kleidi: identity: larger than %d bytes", MaxIdentitySize/2)
	}
	if len(id.VerifyKey) > 0 {
		if _, err := id.verifyKey(); err != nil {
			return err
		}
	}
	return nil
}

func (id *Identity) verifyKey() (*ecdsa.PublicKey, error) {
	pub, err := x509.ParsePKIXPublicKey(id.VerifyKey)
	if err != nil {
		return nil, fmt.Errorf("kleidi: identity %s: verify key: %v", id.Provider, err)
	}
	ec, ok := pub.(*ecdsa.PublicKey)
	if !ok || ec.Curve != elliptic.P256() {
		return nil, fmt.Errorf("kleidi: identity %s: verify key is not ECDSA P-256", id.Provider)
	}
	return ec, nil
}

// Verify returns nil if sig is a signature over message by the holder of id's verify key (ECDSA P-256 over
// SHA-256, ASN.1 DER, as [Node.Sign] makes), and otherwise an error wrapping [ErrUnauthenticated].
func (id *Identity) Verify(message, sig []byte) error {
	if len(id.VerifyKey) == 0 {
		return fmt.Errorf("%w: %s signs nothing (it has no verify key)", ErrUnauthenticated, id.ID())
	}
	pub, err := id.verifyKey()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUnauthenticated, err)
	}
	digest := sha256.Sum256(message)
	if len(sig) > MaxSignatureSize || !ecdsa.VerifyASN1(pub, digest[:], sig) {
		return fmt.Errorf("%w: not a signature of %s", ErrUnauthenticated, id.ID())
	}
	return nil
}

type identityFile struct {
	Format string `json:"format"`
	ID     string `json:"id"`
	Identity
}

// MarshalIdentity returns the identity file of id: JSON that names its format and, for people comparing
// fingerprints, its ID.
func MarshalIdentity(id *Identity) ([]byte, error) {
	if err := id.Check(); err != nil {
		return nil, err
	}
	b, err := json.MarshalIndent(identityFile{Format: identityFormat, ID: id.ID(), Identity: *id}, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// ParseIdentity parses an identity file made by [MarshalIdentity]. It checks the identity's form and that the
// ID it states is its own; it cannot tell whose it is: compare the ID with the one the node printed.
func ParseIdentity(b []byte) (*Identity, error) {
	if len(b) > MaxIdentitySize {
		return nil, fmt.Errorf("kleidi: identity file of %d bytes is larger than %d", len(b), MaxIdentitySize)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var f identityFile
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("kleidi: identity file: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("kleidi: identity file: data after the identity")
	}
	if f.Format != identityFormat {
		return nil, fmt.Errorf("kleidi: identity file: format %q, want %q", f.Format, identityFormat)
	}
	id := f.Identity
	if err := id.Check(); err != nil {
		return nil, err
	}
	if f.ID != id.ID() {
		return nil, fmt.Errorf("kleidi: identity file: states ID %q, but its keys give %q", f.ID, id.ID())
	}
	return &id, nil
}

// Node is the capability of a [Provider] to be one of several roots of trust that share a keyring: one per
// control-plane node, each a member of the keyring. Every KEK is wrapped for every member, so any node unwraps
// every KEK with the root it holds. A Node's Unwrap accepts, beside its own Wrap's blobs, the blobs that a
// [Recipient] opened from its Identity makes on another node.
type Node interface {
	// Identity returns the root's public identity, the same at every call while the root and its configuration
	// stay the same. Its VerifyKey checks Sign's signatures.
	Identity(ctx context.Context) (*Identity, error)
	// Sign signs message with the private key of the identity's VerifyKey: ECDSA P-256 over SHA-256, ASN.1 DER.
	// Only a legitimate holder of the root (the TPM under its policy) can sign.
	Sign(ctx context.Context, message []byte) ([]byte, error)
}

// Recipient wraps KEKs for a root of trust whose private part is elsewhere: another node's TPM, an offline
// recovery key. It can wrap, never unwrap. A provider that supports several nodes offers a [RecipientOpener].
type Recipient interface {
	// Identity returns the identity the recipient was opened from.
	Identity() *Identity
	// Wrap protects key so that only the holder of the identity's private part can recover it, with its
	// provider's Unwrap.
	Wrap(ctx context.Context, key []byte) ([]byte, error)
}

// RecipientOpener returns the [Recipient] of an identity of its provider, after checking what it can of it (a
// TPM's endorsement key certificate). It is how an [Envelope] wraps for the members of its keyring.
type RecipientOpener func(*Identity) (Recipient, error)

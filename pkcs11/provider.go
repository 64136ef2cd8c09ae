package pkcs11

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"sync/atomic"

	"github.com/kleidi-kms/kleidi"
)

// Name is the provider's [kleidi.Provider.Name].
const Name = "pkcs11"

// ProofSize is the size of a proof made by [Provider.Prove]: an HMAC-SHA256.
const ProofSize = kleidi.ProofKeySize

// Errors of this package, beside the kleidi sentinels they are wrapped with.
var (
	// ErrPIN means the token refused the PIN (or the PIN is locked). A refused PIN is not tried again by the same
	// provider, so that retries do not lock the token.
	ErrPIN = errors.New("PIN refused")
	// ErrKey means the token holds no key of the configured label or ID, several, or one unfit to be a root of
	// trust (extractable, not sensitive, of another type or size, or without the needed usage).
	ErrKey = errors.New("no usable key")
)

// Config selects the token and its keys.
type Config struct {
	// Module is the path of the PKCS#11 library (for SoftHSM 2: /usr/lib/softhsm/libsofthsm2.so).
	Module string
	// Token is the label of the token. Slots are found by the label of the token they hold, since slot IDs
	// change (SoftHSM numbers them at random).
	Token string
	// KeyLabel and KeyID select the keys (CKA_LABEL, CKA_ID): the AES-256 wrapping key and, beside it under the
	// same label or ID, the generic secret key of the proofs. At least one is set; with both, a key must match
	// both.
	KeyLabel string
	KeyID    []byte
	// PINFile holds the user PIN of the token; one trailing newline is ignored.
	PINFile string
	// CreateKeys creates the keys the token lacks, on the token (CKA_TOKEN), sensitive and non-extractable:
	// kleidi-server init sets it. Without it a missing key is an error wrapping [ErrKey].
	CreateKeys bool
}

// String names the token and the key, for errors: never the PIN.
func (c Config) String() string {
	s := fmt.Sprintf("token %q key", c.Token)
	if c.KeyLabel != "" {
		s += fmt.Sprintf(" %q", c.KeyLabel)
	}
	if c.KeyID != nil {
		s += fmt.Sprintf(" id %x", c.KeyID)
	}
	return s
}

// Provider is a [kleidi.Provider] and [kleidi.Authenticator] whose root of trust is a key on a PKCS#11 token. It
// is safe for concurrent use. See the package documentation.
type Provider struct {
	cfg    Config
	tok    *token
	closed atomic.Bool
	proof  *kleidi.ProofKey
}

var (
	_ kleidi.Provider      = (*Provider)(nil)
	_ kleidi.Authenticator = (*Provider)(nil)
)

// New loads the module, finds the token by its label, logs in with the PIN of [Config.PINFile], finds (or, with
// [Config.CreateKeys], creates) the keys and checks that they are fit: non-extractable, sensitive, of the right
// type and usage. A binary built without cgo returns an error saying that pkcs11 needs a cgo build.
func New(ctx context.Context, cfg Config) (*Provider, error) {
	if cfg.Module == "" || cfg.Token == "" || (cfg.KeyLabel == "" && cfg.KeyID == nil) || cfg.PINFile == "" {
		return nil, errors.New("pkcs11: the module, the token label, the key (a label or an ID) and the PIN file are required")
	}
	pin, err := readPIN(cfg.PINFile)
	if err != nil {
		return nil, err
	}
	cfg.KeyID = bytes.Clone(cfg.KeyID)
	tok, err := openToken(ctx, cfg, pin)
	clear(pin)
	if err != nil {
		return nil, err
	}
	p := &Provider{cfg: cfg, tok: tok}
	p.proof = kleidi.NewProofKey(p.deriveProofKey)
	return p, nil
}

// readPIN reads a PIN file: 1 to 256 bytes after one trailing newline (or CRLF) is removed.
func readPIN(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("pkcs11: PIN file: %w", err)
	}
	pin := bytes.TrimSuffix(bytes.TrimSuffix(b, []byte("\n")), []byte("\r"))
	if len(pin) == 0 || len(pin) > 256 {
		clear(b)
		return nil, fmt.Errorf("pkcs11: PIN file %s: want 1 to 256 bytes", path)
	}
	return pin, nil
}

// Name implements [kleidi.Provider]: "pkcs11".
func (p *Provider) Name() string { return Name }

// Wrap implements [kleidi.Provider]: the token encrypts key with its AES-256 key in CKM_AES_GCM, under a fresh
// 12-byte IV (the one the token reports, should it choose its own) and a 128-bit tag, with associated data that
// binds the blob to its purpose and format version. Keys of 1 to [MaxKeySize] bytes are accepted.
func (p *Provider) Wrap(ctx context.Context, key []byte) ([]byte, error) {
	if p.closed.Load() {
		return nil, fmt.Errorf("pkcs11: wrap: %w", kleidi.ErrClosed)
	}
	if len(key) == 0 || len(key) > MaxKeySize {
		return nil, fmt.Errorf("pkcs11: wrap: a key of %d bytes, want 1 to %d", len(key), MaxKeySize)
	}
	iv, ciphertext, err := p.tok.encrypt(ctx, associatedData(blobHeader()), key)
	if err != nil {
		return nil, fmt.Errorf("pkcs11: wrap with %s: %w", p.cfg, err)
	}
	if len(iv) != ivSize || len(ciphertext) != len(key)+tagSize {
		return nil, fmt.Errorf("pkcs11: wrap with %s: %w: the token returned a %d-byte IV and %d bytes of ciphertext, want %d and %d",
			p.cfg, kleidi.ErrUnavailable, len(iv), len(ciphertext), ivSize, len(key)+tagSize)
	}
	return encodeBlob(iv, ciphertext), nil
}

// Unwrap implements [kleidi.Provider]. A blob that is not of this format is refused without a token call; one the
// token cannot authenticate (another key's, altered) gives an error wrapping [kleidi.ErrUnwrap]; a token that
// cannot be reached one wrapping [kleidi.ErrUnavailable].
func (p *Provider) Unwrap(ctx context.Context, wrapped []byte) ([]byte, error) {
	if p.closed.Load() {
		return nil, fmt.Errorf("pkcs11: unwrap: %w", kleidi.ErrClosed)
	}
	header, iv, ciphertext, err := parseBlob(wrapped)
	if err != nil {
		return nil, fmt.Errorf("pkcs11: unwrap: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("pkcs11: unwrap: %w", err)
	}
	key, err := p.tok.decrypt(ctx, iv, associatedData(header), ciphertext)
	if err != nil {
		return nil, fmt.Errorf("pkcs11: unwrap with %s: %w", p.cfg, err)
	}
	if len(key) != len(ciphertext)-tagSize {
		clear(key)
		return nil, fmt.Errorf("pkcs11: unwrap with %s: %w: the token returned a key of the wrong size", p.cfg, kleidi.ErrUnwrap)
	}
	return key, nil
}

// Health implements [kleidi.Provider]: it asks the token for its information and the wrapping key for its class,
// reconnecting (and re-initialising the module) first if an earlier call found the token gone. It returns nil once
// the token is back.
func (p *Provider) Health(ctx context.Context) error {
	if p.closed.Load() {
		return fmt.Errorf("pkcs11: health: %w", kleidi.ErrClosed)
	}
	if err := p.tok.health(ctx); err != nil {
		return fmt.Errorf("pkcs11: %s: %w", p.cfg, err)
	}
	return nil
}

// Close implements [kleidi.Provider]: it waits for calls in flight, closes the provider's sessions, zeroes the
// proof key and releases the module (finalised when no other provider of the process uses it).
func (p *Provider) Close() error {
	if p.closed.Swap(true) {
		return nil
	}
	p.proof.Close()
	p.tok.close()
	return nil
}

// proofLabel is the message the token's proof key signs (CKM_SHA256_HMAC) to give the proof key.
const proofLabel = "kleidi pkcs11 proof key v1"

// Prove implements [kleidi.Authenticator]: it returns HMAC-SHA256(proof key, message), [ProofSize] bytes. The
// proof key is the token's HMAC-SHA256, with its non-extractable generic secret key, of a fixed label: derived at
// the first Prove or Verify, then kept in memory.
func (p *Provider) Prove(ctx context.Context, message []byte) ([]byte, error) {
	mac, err := p.proof.Prove(ctx, message)
	if err != nil {
		return nil, fmt.Errorf("pkcs11: prove with %s: %w", p.cfg, err)
	}
	return mac, nil
}

// Verify implements [kleidi.Authenticator]: it returns nil if proof is the proof [Provider.Prove] gives for
// message, and otherwise an error wrapping [kleidi.ErrUnauthenticated]. A proof of the wrong size is refused at
// once; after the proof key is derived Verify never calls the token. When the proof key cannot be derived, errors
// wrap [kleidi.ErrUnavailable] (returned again for a second before the token is asked again).
func (p *Provider) Verify(ctx context.Context, message, proof []byte) error {
	if err := p.proof.Verify(ctx, message, proof); err != nil {
		return fmt.Errorf("pkcs11: verify with %s: %w", p.cfg, err)
	}
	return nil
}

// deriveProofKey has the token compute the proof key: its HMAC-SHA256, with the generic secret key, of proofLabel.
func (p *Provider) deriveProofKey(ctx context.Context) ([]byte, error) {
	return p.tok.sign(ctx, []byte(proofLabel))
}

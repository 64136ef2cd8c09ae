package gpg

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	pgperrors "github.com/ProtonMail/go-crypto/openpgp/errors"
	"github.com/ProtonMail/go-crypto/openpgp/packet"
	v2 "github.com/ProtonMail/go-crypto/openpgp/v2"

	"github.com/kleidi-kms/kleidi"
)

// MaxKeySize is the largest key Wrap accepts, in bytes. A KEK is [kleidi.KeySize] bytes.
const MaxKeySize = 1024

// Config names the keys of an OpenPGP [Provider] and where its passphrase comes from. Each is read once, by
// [New]. Keys come from files or from memory, not both: at most one of PublicKeyFiles and PublicKeys, at most
// one of PrivateKeyFile and PrivateKey, and at most one of PassphraseFile and Passphrase is set. Keys are what
// gpg exports, binary or ASCII-armored. New keeps no reference to the slices of Config.
type Config struct {
	// PublicKeyFiles are the recipients: Wrap encrypts to every key in every file, any one of their private
	// keys unwraps, and Verify accepts the proofs of any of them. A file may hold several keys. If neither
	// PublicKeyFiles nor PublicKeys is set, the keys of the private key are the recipients.
	PublicKeyFiles []string
	// PublicKeys are the recipients as bytes (gpg --export), as PublicKeyFiles are files; each may hold
	// several keys.
	PublicKeys [][]byte
	// PrivateKeyFile holds the private key Unwrap decrypts with (gpg --export-secret-keys). Optional: without a
	// private key the provider only wraps, and Unwrap and Health fail with an error wrapping [ErrNoPrivateKey].
	// If recipients are set, the private key must be one of them.
	PrivateKeyFile string
	// PrivateKey is the private key as bytes, as PrivateKeyFile is a file. The caller may zero it once New
	// returns.
	PrivateKey []byte
	// PassphraseFile is a file whose content (without one trailing newline) is the passphrase of a protected
	// private key.
	PassphraseFile string
	// Passphrase returns the passphrase of a protected private key. New calls it once and then overwrites the
	// bytes it returned with zeros, so it returns a copy that New may own. An error it returns is wrapped in
	// New's; it must not hold the passphrase.
	Passphrase func() ([]byte, error)
}

// check returns an error wrapping [ErrInvalidKey] if c names no key, or two sources of one thing.
func (c Config) check() error {
	var err error
	switch {
	case len(c.PublicKeyFiles) == 0 && len(c.PublicKeys) == 0 && c.PrivateKeyFile == "" && c.PrivateKey == nil:
		err = errors.New("names no key: set PublicKeyFiles or PublicKeys, PrivateKeyFile or PrivateKey, or both")
	case len(c.PublicKeyFiles) > 0 && len(c.PublicKeys) > 0:
		err = errors.New("sets both PublicKeyFiles and PublicKeys; set one")
	case c.PrivateKeyFile != "" && c.PrivateKey != nil:
		err = errors.New("sets both PrivateKeyFile and PrivateKey; set one")
	case c.PassphraseFile != "" && c.Passphrase != nil:
		err = errors.New("sets both PassphraseFile and Passphrase; set one")
	case (c.PassphraseFile != "" || c.Passphrase != nil) && c.PrivateKeyFile == "" && c.PrivateKey == nil:
		err = errors.New("sets a passphrase but no private key")
	default:
		return nil
	}
	return fmt.Errorf("gpg: Config %w: %w", err, ErrInvalidKey)
}

// privateKey returns where the private key of c comes from, if c names one.
func (c Config) privateKey() (keySource, bool) {
	switch {
	case c.PrivateKeyFile != "":
		return keySource{name: "key file " + c.PrivateKeyFile, path: c.PrivateKeyFile}, true
	case c.PrivateKey != nil:
		return keySource{name: "Config.PrivateKey", data: c.PrivateKey}, true
	}
	return keySource{}, false
}

// publicKeys returns where the recipients of c come from.
func (c Config) publicKeys() []keySource {
	var sources []keySource
	for _, path := range c.PublicKeyFiles {
		sources = append(sources, keySource{name: "key file " + path, path: path})
	}
	for i, data := range c.PublicKeys {
		sources = append(sources, keySource{name: fmt.Sprintf("Config.PublicKeys[%d]", i), data: data})
	}
	return sources
}

// Provider is a [kleidi.Provider] whose root of trust is an OpenPGP key: Wrap encrypts a key to one or more
// OpenPGP public keys, Unwrap decrypts it with a private key. It is also a [kleidi.Authenticator]: Prove signs
// with the private key, and Verify accepts signatures of the private key and of every recipient. It is safe
// for concurrent use.
type Provider struct {
	recipients  []*v2.Entity
	fingerprint []string

	// Fixed by New and never changed, so that Verify and CheckRecipients need no lock.
	verifiers    []verifier        // the keys that may sign a proof: every valid signing key of every recipient
	recipientIDs map[string]string // every key ID and fingerprint of every recipient, as parseMessage names them -> its primary fingerprint

	mu      sync.Mutex // serialises go-crypto calls, which cache signature checks in the keys, and Close
	private v2.EntityList
	closed  atomic.Bool // set under mu; read without it by Verify and CheckRecipients
}

var (
	_ kleidi.Provider      = (*Provider)(nil)
	_ kleidi.Authenticator = (*Provider)(nil)
)

// maxDecompressed bounds what a compressed message (gpg compresses by default) may expand to.
var maxDecompressed int64 = MaxKeySize + 1

// pgpConfig is the go-crypto configuration of every operation: AES-256, no compression, and the defaults of
// go-crypto for the rest (SEIPDv2 with AEAD only when every recipient announces it, as RFC 9580 keys do; the
// integrity-protected SEIPDv1 that every GnuPG decrypts otherwise).
var pgpConfig = &packet.Config{
	DefaultCipher:              packet.CipherAES256,
	DefaultCompressionAlgo:     packet.CompressionNone,
	MaxDecompressedMessageSize: &maxDecompressed,
}

// New loads the keys c names and checks them now: every recipient must be valid (not expired, not revoked,
// with a key that may encrypt), and the private key, if any, must be a private key that the passphrase
// unlocks. Errors name the source (the file or the Config field) and the key, and wrap [ErrInvalidKey],
// [ErrKeyExpired], [ErrKeyRevoked], [ErrNoEncryptionKey], [ErrNotPrivateKey], [ErrPassphraseRequired] or
// [ErrWrongPassphrase]; they never contain a passphrase or key material.
func New(c Config) (*Provider, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	now := time.Now()
	p := &Provider{}
	ok := false
	defer func() {
		if !ok {
			p.forget()
		}
	}()

	private, hasPrivate := c.privateKey()
	if hasPrivate {
		passphrase, err := readPassphrase(c)
		if err != nil {
			return nil, err
		}
		defer clear(passphrase)
		keys, err := readKeys(private)
		if err != nil {
			return nil, err
		}
		p.private = keys
		for _, e := range keys {
			if err := checkEncryptionKey(private.name, e, now, pgpConfig); err != nil {
				return nil, err
			}
			if err := unlockPrivateKey(private.name, e, passphrase, pgpConfig); err != nil {
				return nil, err
			}
		}
	}

	seen := make(map[string]bool)
	add := func(e *v2.Entity) {
		if fp := fingerprint(e); !seen[fp] {
			seen[fp] = true
			p.recipients = append(p.recipients, e)
			p.fingerprint = append(p.fingerprint, fp)
		}
	}
	public := c.publicKeys()
	if len(public) == 0 {
		for _, e := range p.private {
			add(e)
		}
	}
	for _, source := range public {
		keys, err := readKeys(source)
		if err != nil {
			return nil, err
		}
		for _, e := range keys {
			dropPrivateKeys(e) // a recipient needs only its public key
			if err := checkEncryptionKey(source.name, e, now, pgpConfig); err != nil {
				return nil, err
			}
			add(e)
		}
	}
	if len(p.private) > 0 && len(public) > 0 {
		held := false
		for _, e := range p.private {
			held = held || seen[fingerprint(e)]
		}
		if !held {
			return nil, &keyError{source: private.name, key: describe(p.private), err: ErrInvalidKey,
				reason: fmt.Sprintf("is not among the recipients (%s): this provider could not unwrap what it wraps", describe(p.recipients))}
		}
	}

	p.verifiers = signingKeys(append(append([]*v2.Entity(nil), p.private...), p.recipients...), now)
	p.recipientIDs = recipientIDs(p.recipients)

	// Wrap a key once, so that a recipient go-crypto cannot encrypt to, or too many recipients for
	// kleidi.MaxWrappedKeySize, fail here rather than at the first rotation.
	probe := make([]byte, kleidi.KeySize)
	rand.Read(probe)
	if _, err := p.Wrap(context.Background(), probe); err != nil {
		return nil, fmt.Errorf("gpg: recipients %s: %w: %w", describe(p.recipients), ErrInvalidKey, err)
	}
	ok = true
	return p, nil
}

// Name returns "gpg".
func (p *Provider) Name() string { return "gpg" }

// Recipients returns the fingerprints of the primary keys Wrap encrypts to, in upper-case hex as gpg prints
// them. They are public; a program may log them.
func (p *Provider) Recipients() []string { return append([]string(nil), p.fingerprint...) }

// Wrap encrypts key (1 to [MaxKeySize] bytes) to every recipient as a binary OpenPGP message, which
// gpg --decrypt also decrypts.
func (p *Provider) Wrap(ctx context.Context, key []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("gpg: wrap: %w", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed.Load() {
		return nil, fmt.Errorf("gpg: wrap: %w", kleidi.ErrClosed)
	}
	return wrapKey(p.recipients, key)
}

// wrapKey encrypts key to recipients as a binary OpenPGP message: the format of every wrapped key of this
// package. Callers hold the lock that guards the recipients' keys.
func wrapKey(recipients []*v2.Entity, key []byte) ([]byte, error) {
	if len(key) == 0 {
		return nil, errors.New("gpg: wrap: empty key")
	}
	if len(key) > MaxKeySize {
		return nil, fmt.Errorf("gpg: wrap: key of %d bytes, want at most %d: %w", len(key), MaxKeySize, kleidi.ErrTooLarge)
	}
	var buf bytes.Buffer
	w, err := v2.EncryptWithParams(&buf, recipients, nil, &v2.EncryptParams{Config: pgpConfig})
	if err != nil {
		return nil, fmt.Errorf("gpg: wrap: %w", err)
	}
	if _, err := w.Write(key); err != nil {
		return nil, fmt.Errorf("gpg: wrap: %w", err)
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("gpg: wrap: %w", err)
	}
	if buf.Len() > kleidi.MaxWrappedKeySize {
		return nil, fmt.Errorf("gpg: wrap: %d bytes wrapped to %d recipients, more than %d: %w",
			buf.Len(), len(recipients), kleidi.MaxWrappedKeySize, kleidi.ErrTooLarge)
	}
	return buf.Bytes(), nil
}

// Unwrap decrypts a key wrapped by Wrap, or by gpg --encrypt to one of the provider's keys. The blob must be
// a binary OpenPGP message of public-key encrypted session keys and integrity-protected data, and nothing
// after it. Every refusal wraps [kleidi.ErrUnwrap].
func (p *Provider) Unwrap(ctx context.Context, wrapped []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("gpg: unwrap: %w", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.closed.Load():
		return nil, fmt.Errorf("gpg: unwrap: %w", kleidi.ErrClosed)
	case p.private == nil:
		return nil, fmt.Errorf("gpg: unwrap: %w: %w", ErrNoPrivateKey, kleidi.ErrUnwrap)
	case len(wrapped) == 0:
		return nil, fmt.Errorf("gpg: unwrap: empty blob: %w", kleidi.ErrUnwrap)
	case len(wrapped) > kleidi.MaxWrappedKeySize:
		return nil, fmt.Errorf("gpg: unwrap: blob of %d bytes, more than %d: %w: %w",
			len(wrapped), kleidi.MaxWrappedKeySize, kleidi.ErrTooLarge, kleidi.ErrUnwrap)
	}
	recipients, err := parseMessage(wrapped)
	if err != nil {
		return nil, fmt.Errorf("gpg: unwrap: not a wrapped key: %v: %w", err, kleidi.ErrUnwrap)
	}
	md, err := v2.ReadMessage(bytes.NewReader(wrapped), p.private, nil, pgpConfig)
	if errors.Is(err, pgperrors.ErrKeyIncorrect) {
		return nil, fmt.Errorf("gpg: unwrap: encrypted to %s; no private key here decrypts it: %w",
			p.describeRecipients(recipients), kleidi.ErrUnwrap)
	}
	if err != nil {
		return nil, fmt.Errorf("gpg: unwrap: %v: %w", err, kleidi.ErrUnwrap)
	}
	if !md.IsEncrypted || md.DecryptedWith.Entity == nil {
		return nil, fmt.Errorf("gpg: unwrap: message not decrypted with a private key: %w", kleidi.ErrUnwrap)
	}
	// Reading to the end checks the integrity tag; a longer body is no key of ours.
	key, err := io.ReadAll(io.LimitReader(md.UnverifiedBody, MaxKeySize+1))
	switch {
	case err != nil:
		clear(key)
		return nil, fmt.Errorf("gpg: unwrap: %v: %w", err, kleidi.ErrUnwrap)
	case len(key) == 0:
		return nil, fmt.Errorf("gpg: unwrap: empty key: %w", kleidi.ErrUnwrap)
	case len(key) > MaxKeySize:
		clear(key)
		return nil, fmt.Errorf("gpg: unwrap: key longer than %d bytes: %w", MaxKeySize, kleidi.ErrUnwrap)
	}
	return key, nil
}

// Health returns nil when the private key is loaded, so that Unwrap works. It returns an error wrapping
// [ErrNoPrivateKey] for a provider that only wraps, and one wrapping [kleidi.ErrClosed] after Close.
func (p *Provider) Health(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("gpg: health: %w", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.closed.Load():
		return fmt.Errorf("gpg: health: %w", kleidi.ErrClosed)
	case p.private == nil:
		return fmt.Errorf("gpg: health: %w: this provider only wraps", ErrNoPrivateKey)
	}
	return nil
}

// Close zeroes the private key material go-crypto exposes and forgets the keys. Later calls fail with an error
// wrapping [kleidi.ErrClosed]. Close is idempotent.
func (p *Provider) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.closed.Load() {
		p.closed.Store(true)
		p.forget()
	}
	return nil
}

func (p *Provider) forget() {
	for _, e := range p.private {
		dropPrivateKeys(e)
	}
	p.private = nil
	p.recipients = nil
}

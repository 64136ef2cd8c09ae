package main

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/kleidi-kms/kleidi"
)

// rootKeySize is the size of the root key: AES-256.
const rootKeySize = 32

// fileKey is the root of trust: AES-256-GCM under a key read from a file. It is a [kleidi.AEADRoot]; an HSM or a
// cloud KMS would call its own encrypt and decrypt here.
type fileKey struct{ aead cipher.AEAD }

var _ kleidi.AEADRoot = (*fileKey)(nil)

// Encrypt returns a random nonce followed by the AES-256-GCM ciphertext of plaintext.
func (k *fileKey) Encrypt(_ context.Context, plaintext, associatedData []byte) ([]byte, error) {
	nonce := make([]byte, k.aead.NonceSize())
	rand.Read(nonce)
	return k.aead.Seal(nonce, nonce, plaintext, associatedData), nil
}

// Decrypt opens what Encrypt returned.
func (k *fileKey) Decrypt(_ context.Context, ciphertext, associatedData []byte) ([]byte, error) {
	n := k.aead.NonceSize()
	if len(ciphertext) < n {
		return nil, errors.New("filekey: ciphertext too short")
	}
	return k.aead.Open(nil, ciphertext[:n], ciphertext[n:], associatedData)
}

// provider is the file key as a [kleidi.Provider] (through [kleidi.NewAEADProvider], which does the contract), and
// an [kleidi.Authenticator] whose proofs are HMACs under a key derived from the root key: so every ciphertext
// carries its KEK, and a plugin that lost its keyring still decrypts with the root key alone.
type provider struct {
	kleidi.Provider
	*kleidi.ProofKey
	proofSecret []byte
}

var _ kleidi.Authenticator = (*provider)(nil)

// Close closes the provider and forgets the proof key.
func (p *provider) Close() error {
	p.ProofKey.Close()
	clear(p.proofSecret)
	return p.Provider.Close()
}

// openFileKey returns the provider of the root key in path, creating the file with a random key if it does not
// exist.
func openFileKey(path string) (*provider, error) {
	key, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		key = make([]byte, rootKeySize)
		rand.Read(key)
		err = os.WriteFile(path, key, 0o600)
	}
	if err != nil {
		return nil, fmt.Errorf("root key: %w", err)
	}
	defer clear(key)
	if len(key) != rootKeySize {
		return nil, fmt.Errorf("root key %s: %d bytes, want %d", path, len(key), rootKeySize)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	proofSecret, err := hkdf.Key(sha256.New, key, nil, "custom-plugin proof key", kleidi.ProofKeySize)
	if err != nil {
		return nil, err
	}
	base, err := kleidi.NewAEADProvider("filekey", &fileKey{aead: aead})
	if err != nil {
		return nil, err
	}
	derive := func(context.Context) ([]byte, error) { return append([]byte(nil), proofSecret...), nil }
	return &provider{Provider: base, ProofKey: kleidi.NewProofKey(derive), proofSecret: proofSecret}, nil
}

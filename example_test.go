package kleidi_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

// A program embeds an Envelope over a root of trust and a keyring. The insecure provider stands in for
// gpg.New or tpm.New here.
func Example() {
	ctx := context.Background()
	provider := kleiditest.NewInsecureProvider()
	defer provider.Close()

	envelope, err := kleidi.NewEnvelope(ctx, provider, kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		log.Fatal(err)
	}
	ciphertext, err := envelope.Encrypt(ctx, []byte("my database password"), []byte("namespace/name"))
	if err != nil {
		log.Fatal(err)
	}
	plaintext, err := envelope.Decrypt(ctx, ciphertext, []byte("namespace/name"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(plaintext))
	// Output: my database password
}

// Rotation makes a new KEK active; data encrypted under older KEKs still decrypts, even in another process that
// reads the same keyring file.
func ExampleEnvelope_Rotate() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "kleidi")
	defer os.RemoveAll(dir)
	provider := kleiditest.NewInsecureProvider()
	ring := kleidi.NewFileKeyring(filepath.Join(dir, "keyring.json"))

	envelope, err := kleidi.NewEnvelope(ctx, provider, ring, kleidi.WithCreateIfEmpty())
	if err != nil {
		log.Fatal(err)
	}
	old, _ := envelope.Encrypt(ctx, []byte("written before the rotation"), nil)
	before := envelope.KeyID()
	if _, err := envelope.Rotate(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println("key changed:", envelope.KeyID() != before)

	restarted, err := kleidi.NewEnvelope(ctx, provider, kleidi.NewFileKeyring(ring.Path()))
	if err != nil {
		log.Fatal(err)
	}
	stored, _ := kleidi.ParseCiphertext(old.Bytes())
	plaintext, err := restarted.Decrypt(ctx, stored, nil)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(plaintext))
	// Output:
	// key changed: true
	// written before the rotation
}

// A ciphertext carries its wrapped KEK, so a process that lost its keyring still decrypts with the same root.
func ExampleCiphertext_AttachedKey() {
	ctx := context.Background()
	provider := kleiditest.NewInsecureProvider()
	writer, _ := kleidi.NewEnvelope(ctx, provider, kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	c, _ := writer.Encrypt(ctx, []byte("self-contained"), nil)
	data, wrapped := c.Bytes(), c.AttachedKey // store both

	reader, _ := kleidi.NewEnvelope(ctx, provider, kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty()) // an empty keyring
	stored, _ := kleidi.ParseCiphertext(data)
	stored.AttachedKey = wrapped
	plaintext, err := reader.Decrypt(ctx, stored, nil)
	fmt.Println(string(plaintext), err)
	// Output: self-contained <nil>
}

package gpg_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/gpg"
)

func Example() {
	dir, err := os.MkdirTemp("", "kleidi-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	// For development only: an unprotected key pair in dir. In production, Config names key files
	// exported by gpg and a passphrase file.
	config, err := gpg.GenerateDevelopmentKey(filepath.Join(dir, "dev"))
	if err != nil {
		log.Fatal(err)
	}
	p, err := gpg.New(config)
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()

	ctx := context.Background()
	kek := make([]byte, kleidi.KeySize)
	rand.Read(kek)
	wrapped, err := p.Wrap(ctx, kek)
	if err != nil {
		log.Fatal(err)
	}
	unwrapped, err := p.Unwrap(ctx, wrapped)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(p.Name(), bytes.Equal(unwrapped, kek), p.Health(ctx))
	// Output: gpg true <nil>
}

func ExampleNew_multipleRecipients() {
	// Every control-plane node lists every node's public key and holds only its own private key:
	// a key wrapped on one node unwraps on any node.
	p, err := gpg.New(gpg.Config{
		PublicKeyFiles: []string{"/etc/kleidi/node-a.pub.asc", "/etc/kleidi/node-b.pub.asc", "/etc/kleidi/node-c.pub.asc"},
		PrivateKeyFile: "/etc/kleidi/node-a.key",
		PassphraseFile: "/run/secrets/kleidi/passphrase",
	})
	if err != nil {
		log.Fatal(err) // names the file and the problem: expired, revoked, wrong passphrase, ...
	}
	defer p.Close()
	log.Printf("wrapping to %v", p.Recipients())
}

func ExampleGenerateKey() {
	// A key pair made in memory, its private half protected by a passphrase the program keeps elsewhere (here
	// a constant; in production, a secret store).
	passphrase := func() ([]byte, error) { return []byte("correct horse battery staple"), nil }
	pass, _ := passphrase()
	private, public, err := gpg.GenerateKey("kleidi example", pass)
	if err != nil {
		log.Fatal(err)
	}
	// A node that only wraps needs the public half; the node that unwraps, the private half and its passphrase.
	wrapper, err := gpg.New(gpg.Config{PublicKeys: [][]byte{public}})
	if err != nil {
		log.Fatal(err)
	}
	defer wrapper.Close()
	p, err := gpg.New(gpg.Config{PrivateKey: private, Passphrase: passphrase})
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()

	ctx := context.Background()
	kek := make([]byte, kleidi.KeySize)
	rand.Read(kek)
	wrapped, err := wrapper.Wrap(ctx, kek)
	if err != nil {
		log.Fatal(err)
	}
	unwrapped, err := p.Unwrap(ctx, wrapped)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(bytes.Equal(unwrapped, kek), p.Recipients()[0] == wrapper.Recipients()[0])
	// Output: true true
}

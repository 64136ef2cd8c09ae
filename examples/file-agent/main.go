// Command file-agent encrypts and decrypts files of any size under an OpenPGP root of trust: a security agent
// built on kleidi in a few dozen lines.
//
//	file-agent encrypt -in report.pdf -out report.pdf.kleidi
//	file-agent decrypt -in report.pdf.kleidi -out report.pdf
//	file-agent rotate
//
// Files are streams of kleidi's stream format ([kleidi.Envelope.EncryptStream]): segments of 64 KiB, each
// authenticated, so memory stays bounded whatever the size and an altered, truncated, reordered or extended file is
// refused. Each file carries its key, wrapped by the root of trust and proved, so it decrypts after a rotation, a
// restart or the loss of the keyring, wherever the same OpenPGP private key is. The output is written to a
// temporary file and renamed into place only once it is whole: a failed decryption leaves no plaintext behind.
//
// The keyring is keyring.json in the state directory (-state-dir). Without key flags, the agent makes an INSECURE
// development key in the state directory (gpg.GenerateDevelopmentKey) and says so.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/gpg"
)

// associatedData binds every file to this agent: a stream of another program does not decrypt here by mistake.
var associatedData = []byte("kleidi file-agent v1")

const usage = `usage: file-agent encrypt|decrypt -in FILE -out FILE [flags]
       file-agent rotate [flags]
flags: -state-dir DIR, -gpg-private-key FILE, -gpg-public-key FILE (repeatable), -gpg-passphrase-file FILE`

type fileList []string

func (l *fileList) String() string     { return strings.Join(*l, ",") }
func (l *fileList) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	if err := run(context.Background(), os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "file-agent:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New(usage)
	}
	command := args[0]
	fs := flag.NewFlagSet(command, flag.ContinueOnError)
	stateDir := fs.String("state-dir", defaultStateDir(), "directory of the keyring (and of a development key)")
	in := fs.String("in", "", "file to read")
	out := fs.String("out", "", "file to write, atomically")
	var c gpg.Config
	fs.StringVar(&c.PrivateKeyFile, "gpg-private-key", "", "OpenPGP private key file")
	fs.Var((*fileList)(&c.PublicKeyFiles), "gpg-public-key", "OpenPGP public key file of a recipient (repeatable)")
	fs.StringVar(&c.PassphraseFile, "gpg-passphrase-file", "", "file holding the private key's passphrase")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if err := os.MkdirAll(*stateDir, 0o700); err != nil {
		return err
	}
	if c.PrivateKeyFile == "" && len(c.PublicKeyFiles) == 0 {
		var err error
		if c, err = gpg.GenerateDevelopmentKey(filepath.Join(*stateDir, "gpg")); err != nil {
			return err
		}
		fmt.Fprintln(os.Stderr, "file-agent: WARNING: using the INSECURE development key of", *stateDir, "(pass -gpg-private-key for real use)")
	}
	p, err := gpg.New(c)
	if err != nil {
		return err
	}
	defer p.Close()
	// Files carry their key, so a new keyring is harmless: what older keys encrypted still decrypts.
	e, err := kleidi.NewEnvelope(ctx, p, kleidi.NewFileKeyring(filepath.Join(*stateDir, "keyring.json")), kleidi.WithCreateIfEmpty())
	if err != nil {
		return err
	}
	defer e.Close()

	switch command {
	case "rotate":
		id, err := e.Rotate(ctx)
		if err == nil {
			fmt.Println(id)
		}
		return err
	case "encrypt", "decrypt":
		if *in == "" || *out == "" {
			return errors.New(usage)
		}
		return transform(*in, *out, func(dst io.Writer, src io.Reader) error {
			if command == "decrypt" {
				r, err := e.DecryptStream(ctx, src, associatedData)
				if err == nil {
					_, err = io.Copy(dst, r)
				}
				return err
			}
			w, err := e.EncryptStream(ctx, dst, associatedData)
			if err == nil {
				_, err = io.Copy(w, src)
			}
			if err == nil {
				err = w.Close()
			}
			return err
		})
	}
	return fmt.Errorf("unknown command %q\n%s", command, usage)
}

// transform streams the file in through f into a temporary file beside out, and renames it to out once f
// succeeded and the data is on disk.
func transform(in, out string, f func(dst io.Writer, src io.Reader) error) (err error) {
	src, err := os.Open(in)
	if err != nil {
		return err
	}
	defer src.Close()
	dir := filepath.Dir(out)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(out)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err := f(tmp, src); err != nil {
		return fmt.Errorf("%s: %w", in, err)
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// defaultStateDir is $XDG_STATE_HOME/kleidi-file-agent, or ~/.local/state/kleidi-file-agent.
func defaultStateDir() string {
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "kleidi-file-agent")
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".local", "state", "kleidi-file-agent")
}

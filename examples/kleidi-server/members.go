package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/gpg"
	"github.com/kleidi-kms/kleidi/tpm"
)

// trustedMembersFile, in the state directory, lists the keyring members this node trusts, one ID per line. A
// node writes it when it first finds itself a member of the keyring (it trusts the members that endorsed it:
// the keyring was handed to it at enrollment), and adds every member it comes to trust through their
// endorsements; a keyring edited later cannot move that trust.
const trustedMembersFile = "trusted-members"

// recipientOpeners are the members a node can wrap KEKs for: other nodes' TPMs, OpenPGP recovery keys.
func recipientOpeners() []kleidi.Option {
	return []kleidi.Option{kleidi.WithRecipientOpener("tpm", tpm.OpenRecipient), kleidi.WithRecipientOpener("gpg", gpg.OpenRecipient)}
}

// pinnedMembers returns the members this node trusts from its state directory, or, on its first start as a
// member, the members that endorsed it in the keyring.
func (o *options) pinnedMembers(ctx context.Context, p kleidi.Provider) ([]string, error) {
	b, err := os.ReadFile(filepath.Join(o.stateDir, trustedMembersFile))
	if err == nil {
		return strings.Fields(string(b)), nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	node, ok := p.(kleidi.Node)
	if !ok {
		return nil, nil
	}
	id, err := node.Identity(ctx)
	if err != nil {
		return nil, err
	}
	ring, err := kleidi.NewFileKeyring(o.keyringPath()).Load(ctx)
	if err != nil {
		return nil, err
	}
	return ring.Endorsers(id.ID()), nil
}

// savePinnedMembers adds the members env trusts now to the state directory's list, once env's node is a member.
func (o *options) savePinnedMembers(env *kleidi.Envelope, pinned []string) error {
	trusted := env.TrustedMembers()
	if !slices.Contains(trusted, env.MemberID()) {
		return nil // not a member yet: nothing to pin
	}
	all := slices.Compact(slices.Sorted(slices.Values(append(slices.Clone(pinned), trusted...))))
	if slices.Equal(all, slices.Compact(slices.Sorted(slices.Values(slices.Clone(pinned))))) {
		if _, err := os.Stat(filepath.Join(o.stateDir, trustedMembersFile)); err == nil {
			return nil
		}
	}
	path := filepath.Join(o.stateDir, trustedMembersFile)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(strings.Join(all, "\n")+"\n"), 0o600); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	if err := o.giveToStateOwner(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	return nil
}

// enrollRecoveryKey makes the OpenPGP public key of --recovery-key a member of the keyring, if it is not one.
func (o *options) enrollRecoveryKey(ctx context.Context, env *kleidi.Envelope) error {
	if o.recoveryKey == "" {
		return nil
	}
	id, err := recoveryIdentity(o.recoveryKey)
	if err != nil {
		return err
	}
	for _, m := range env.TrustedMembers() {
		if m == id.ID() {
			return nil
		}
	}
	if _, err := env.Enroll(ctx, id); err != nil {
		return fmt.Errorf("--recovery-key: %w", err)
	}
	o.log.Info("enrolled the recovery key: every KEK is wrapped for it", "member", id.ID())
	return nil
}

func recoveryIdentity(file string) (*kleidi.Identity, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("--recovery-key: %w", err)
	}
	id, err := gpg.RecipientIdentity(b)
	if err != nil {
		return nil, fmt.Errorf("--recovery-key %s: %w", file, err)
	}
	return id, nil
}

func runIdentity(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var o options
	flags := newFlagSet("identity", stderr)
	o.register(flags)
	if err := parse(flags, args); err != nil {
		return err
	}
	if err := o.setup(stderr); err != nil {
		return err
	}
	p, err := o.openProvider(ctx)
	if err != nil {
		return err
	}
	defer p.Close()
	node, ok := p.(kleidi.Node)
	if !ok {
		return fmt.Errorf("provider %s has no identity: only a tpm root can share a keyring with other nodes", p.Name())
	}
	id, err := node.Identity(ctx)
	if err != nil {
		return err
	}
	b, err := kleidi.MarshalIdentity(id)
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "member ID: %s\n", id.ID())
	_, err = stdout.Write(b)
	return err
}

func runEnroll(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return keyringCommand(ctx, "enroll", args, stderr, func(args []string, _ kleidi.Provider, env *kleidi.Envelope) error {
		if len(args) != 1 {
			return fmt.Errorf("%w: enroll takes one identity file", errUsage)
		}
		b, err := os.ReadFile(args[0])
		if err != nil {
			return err
		}
		id, err := kleidi.ParseIdentity(b)
		if err != nil {
			return err
		}
		member, err := env.Enroll(ctx, id)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "member: %s\nkey_id: %s\n", member, env.KeyID())
		return nil
	})
}

func runUnenroll(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return keyringCommand(ctx, "unenroll", args, stderr, func(args []string, _ kleidi.Provider, env *kleidi.Envelope) error {
		if len(args) != 1 {
			return fmt.Errorf("%w: unenroll takes one member ID", errUsage)
		}
		id, err := env.Unenroll(ctx, args[0])
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "unenrolled: %s\nkey_id: %s\n", args[0], id)
		return nil
	})
}

func runActivate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return keyringCommand(ctx, "activate", args, stderr, func(args []string, _ kleidi.Provider, env *kleidi.Envelope) error {
		if len(args) != 1 {
			return fmt.Errorf("%w: activate takes one key ID", errUsage)
		}
		if err := env.Activate(ctx, args[0]); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "key_id: %s\n", env.KeyID())
		return nil
	})
}

func runRecipients(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var o options
	flags := newFlagSet("recipients", stderr)
	o.register(flags)
	if err := parse(flags, args); err != nil {
		return err
	}
	ring, err := kleidi.NewFileKeyring(filepath.Join(o.stateDir, keyringFile)).Load(ctx)
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "MEMBER\tENDORSED BY\tADDED")
	for _, m := range ring.Members {
		by := m.Endorser
		if by == m.ID {
			by = "itself"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\n", m.ID, by, m.Added.Format("2006-01-02T15:04:05Z"))
	}
	fmt.Fprintln(w, "\nKEY_ID\tSTATE\tWRAPPED FOR")
	for _, r := range ring.Keys {
		var to []string
		for _, c := range r.Wrapped {
			name := c.Recipient
			if name == "" {
				name = c.Root
			}
			if c.Sender != "" {
				name += " (from " + c.Sender + ")"
			}
			to = append(to, name)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\n", r.ID, r.State, strings.Join(to, ", "))
	}
	return w.Flush()
}

func runRecover(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var o options
	flags := newFlagSet("recover", stderr)
	o.register(flags)
	privateKey := flags.String("recovery-private-key", "", "the recovery key's OpenPGP private key `file` (kept offline)")
	passphrase := flags.String("recovery-passphrase-file", "", "`file` holding the recovery key's passphrase")
	if err := parse(flags, args); err != nil {
		return err
	}
	if err := o.setup(stderr); err != nil {
		return err
	}
	if *privateKey == "" {
		return fmt.Errorf("%w: recover needs --recovery-private-key", errUsage)
	}
	if o.recoveryKey == "" {
		return fmt.Errorf("%w: recover needs --recovery-key, the recovery key's public key", errUsage)
	}
	recoveryID, err := recoveryIdentity(o.recoveryKey)
	if err != nil {
		return err
	}
	rec, err := gpg.New(gpg.Config{PrivateKeyFile: *privateKey, PassphraseFile: *passphrase, PublicKeyFiles: []string{o.recoveryKey}})
	if err != nil {
		return fmt.Errorf("recovery key: %w", err)
	}
	defer rec.Close()
	// A new or cleared TPM has a new storage root key: the pins of the old one go.
	for _, f := range []string{srkNameFile, trustedMembersFile} {
		if err := os.Remove(filepath.Join(o.stateDir, f)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("state directory: %w", err)
		}
	}
	to, err := o.openProvider(ctx)
	if err != nil {
		return err
	}
	err = kleidi.Recover(ctx, kleidi.NewFileKeyring(o.keyringPath()), rec, recoveryID, gpg.OpenRecipient, to)
	if err == nil {
		err = o.pinSRK(to)
	}
	to.Close()
	if err != nil {
		return err
	}
	p, env, _, err := o.open(ctx)
	if err != nil {
		return err
	}
	defer p.Close()
	fmt.Fprintf(stdout, "recovered %s for member %s\nkey_id: %s\n", o.keyringPath(), env.MemberID(), env.KeyID())
	return nil
}

// Command kleidi-server is the reference kleidi KMS v2 plugin: it serves kube-apiserver's KMS v2 API on a unix
// socket, with an OpenPGP key or a TPM 2.0 as the root of trust.
//
// Usage:
//
//	kleidi-server serve     run the plugin (with the development key, initialises an empty state directory first)
//	kleidi-server init      initialise a state directory
//	kleidi-server rotate    make a new KEK active; a running plugin switches within 10 s
//	kleidi-server status    ask a running plugin for its Status; exit 0 only when healthy
//	kleidi-server version   print the version
//
// Every flag can also be set with an environment variable: --state-dir is KLEIDI_STATE_DIR. A flag on the
// command line wins. With no flags at all, serve runs as any user with an OpenPGP development key it generates
// in the state directory.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"

	"github.com/kleidi-kms/kleidi"
)

type command struct {
	name, summary, usage, example string
	run                           func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

var commands = []*command{
	{
		name:    "serve",
		summary: "run the KMS v2 plugin",
		usage: `Serve kube-apiserver's KMS v2 API on a unix socket until SIGTERM or SIGINT, then stop gracefully
(finish calls in flight, remove the socket, exit 0). With the development key (--provider gpg with no key
flags: generated in the state directory, insecure, for trying kleidi) or --tpm simulator, an empty state
directory is initialised first; otherwise run init first, or pass --init on a deployment's first start. A state
directory that held a keyring before is never given a new one.
Health endpoints /livez, /readyz and /healthz are served over HTTP on --http-addr.`,
		example: `kleidi-server serve
  kleidi-server serve --listen unix:///run/kleidi/kms.sock --state-dir /var/lib/kleidi \
      --provider tpm --tpm /dev/tpmrm0 --tpm-pcrs 7`,
		run: runServe,
	},
	{
		name:    "init",
		summary: "initialise a state directory",
		usage: `Create the state directory (mode 0700) and its keyring with a first KEK wrapped by the root of trust.
Refuses to touch a state directory that already has a keyring.`,
		example: `kleidi-server init --state-dir /var/lib/kleidi --provider gpg \
      --gpg-public-key ops.pub.asc --gpg-private-key node.asc --gpg-passphrase-file /etc/kleidi/passphrase`,
		// init is the explicit way to create a keyring: with any provider, also where one was before.
		run: func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
			return runInit(withExplicitInit(ctx), args, stdout, stderr)
		},
	},
	{
		name:    "rotate",
		summary: "add a new active KEK to the keyring",
		usage: `Generate a new KEK, wrap it with the root of trust and make it the active key of the keyring. A running
plugin that shares the state directory reports the new key_id within 10 s; data under older KEKs still
decrypts. Then re-encrypt: kubectl get secrets -A -o json | kubectl replace -f -`,
		example: `kleidi-server rotate --state-dir /var/lib/kleidi`,
		run:     runRotate,
	},
	{
		name:    "rewrap",
		summary: "wrap every KEK again for the current root of trust",
		usage: `Unwrap every KEK of the keyring and wrap it again with the root of trust the flags describe, keeping every
key_id: after adding or removing an OpenPGP recipient (--gpg-public-key), run it on a node whose private key
unwraps the keyring. Existing ciphertexts stay readable; a running plugin needs no restart.`,
		example: `kleidi-server rewrap --state-dir /var/lib/kleidi --gpg-private-key node-a.asc \
      --gpg-public-key node-a.pub.asc --gpg-public-key node-b.pub.asc --gpg-public-key node-c.pub.asc`,
		run: runRewrap,
	},
	{
		name:    "identity",
		summary: "print this node's identity, to enroll it from another node",
		usage: `Print the identity of this node's root of trust (a TPM: its endorsement key, the policy KEKs are sealed
under, its signing key) as a file to hand to a node that holds the keyring, which enrolls it. The member ID is
printed on standard error: compare it on both nodes.`,
		example: `kleidi-server identity --provider tpm --tpm /dev/tpmrm0 --tpm-pcrs 7 > node-b.identity`,
		run:     runIdentity,
	},
	{
		name:    "enroll",
		summary: "make another node a member: every KEK is wrapped for it",
		usage: `Endorse the node of an identity file (from kleidi-server identity) as a member of the keyring, and wrap
every KEK for it, and every later one. Then copy the keyring to the new node's state directory and start it: it
imports its copies and trusts the members that endorsed it.`,
		example: `kleidi-server enroll --state-dir /var/lib/kleidi --provider tpm node-b.identity`,
		run:     runEnroll,
	},
	{
		name:    "unenroll",
		summary: "remove a member, and rotate",
		usage: `Remove a member and its copies from the keyring, then rotate: the new active KEK is not wrapped for it.
Its root can still unwrap the KEKs it had, so re-encrypt every Secret afterwards:
kubectl get secrets -A -o json | kubectl replace -f -`,
		example: `kleidi-server unenroll --state-dir /var/lib/kleidi --provider tpm tpm-abcdefghijklmnopqrstuvwxyz`,
		run:     runUnenroll,
	},
	{
		name:    "recipients",
		summary: "list the members and whom each KEK is wrapped for",
		usage:   `Print the members of the keyring, who endorsed each, and for every KEK its state and its copies.`,
		example: `kleidi-server recipients --state-dir /var/lib/kleidi`,
		run:     runRecipients,
	},
	{
		name:    "activate",
		summary: "make a staged KEK active on this node",
		usage: `Make a KEK staged with rotate --stage the active key of this node's keyring. Refuses a key this node cannot
unwrap. Run it on every node once every node holds the staged key.`,
		example: `kleidi-server activate --state-dir /var/lib/kleidi --provider tpm kleidi-tpm-...`,
		run:     runActivate,
	},
	{
		name:    "recover",
		summary: "rebuild the keyring for a new or cleared TPM with the recovery key",
		usage: `Unwrap every KEK with the offline recovery key and wrap it again for this node's TPM and for the recovery
key. The members become this node and the recovery key: enroll the other nodes again. Give it a keyring you trust
(a backup): recovery believes the endorsements it finds there.`,
		example: `kleidi-server recover --state-dir /var/lib/kleidi --provider tpm --recovery-key recovery.pub.asc \
      --recovery-private-key recovery.asc --recovery-passphrase-file recovery.pass`,
		run: runRecover,
	},
	{
		name:    "status",
		summary: "query a running plugin's Status",
		usage: `Call Status on the plugin's socket, as kube-apiserver does, and print version, healthz and key_id.
Exit status 0 only when healthz is "ok".`,
		example: `kleidi-server status --listen unix:///run/kleidi/kms.sock --wait 30s`,
		run:     runStatus,
	},
	{
		name:    "verify-audit",
		summary: "check the hash chain of an audit log",
		usage: `Check that no record of an audit log written by serve --audit-log was changed, removed or inserted: each
record carries the SHA-256 of the line before it; every file begins with an audit.open record and ends with an
audit.checkpoint record, so records cut from its start or end are seen. Give rotated files oldest first; --live
for a file a running plugin still writes. Exit status 0 only when the chain is intact (a crash that a restart
continued is a note).`,
		example: `kleidi-server verify-audit /var/log/kleidi/audit.log.1 /var/log/kleidi/audit.log`,
		run:     runVerifyAudit,
	},
	{
		name:    "version",
		summary: "print the version",
		usage:   `Print the version of kleidi-server.`,
		example: `kleidi-server version`,
		run: func(_ context.Context, args []string, stdout, stderr io.Writer) error {
			fs := newFlagSet("version", stderr)
			if err := parse(fs, args); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "kleidi-server %s (KMS API %s, %s, %s/%s)\n", kleidi.Version, "v2", runtime.Version(), runtime.GOOS, runtime.GOARCH)
			return nil
		},
	},
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// errUsage is a command line error, already reported with the usage.
var errUsage = errors.New("usage")

// unhealthy is status's exit for a plugin that answers but is not healthy; it prints nothing more.
var errUnhealthy = errors.New("unhealthy")

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" || args[0] == "-help" {
		if len(args) > 1 {
			return run(ctx, []string{args[1], "--help"}, stdout, stderr)
		}
		w := stdout
		if len(args) == 0 {
			w = stderr
		}
		mainUsage(w)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands {
		if c.name != args[0] {
			continue
		}
		err := c.run(ctx, args[1:], stdout, stderr)
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.Is(err, errUsage):
			if err != errUsage { // a usage error with a message of its own: the flags parsed, the command refused
				fmt.Fprintf(stderr, "kleidi-server %s: %s\n", c.name, strings.TrimPrefix(oneLine(err), "usage: "))
			}
			return 2
		case errors.Is(err, errUnhealthy):
			return 1
		}
		fmt.Fprintf(stderr, "kleidi-server %s: %s\n", c.name, oneLine(err))
		return 1
	}
	fmt.Fprintf(stderr, "kleidi-server: unknown command %q; run kleidi-server --help\n", args[0])
	return 2
}

func mainUsage(w io.Writer) {
	fmt.Fprintf(w, "kleidi-server is the kleidi Kubernetes KMS v2 plugin.\n\nUsage: kleidi-server <command> [flags]\n\nCommands:\n")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-13s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nEvery flag can also be set with an environment variable: --state-dir is KLEIDI_STATE_DIR.\n")
	fmt.Fprintf(w, "Run kleidi-server <command> --help for its flags.\n\nExample, as any user:\n  kleidi-server serve &\n  kleidi-server status --wait 30s\n")
}

// oneLine makes an error a single line.
func oneLine(err error) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(err.Error(), "\n", "; ")), " ")
}

// byName indexes commands for the usage of their flag sets (filled by init: commands refer to it).
var byName = map[string]*command{}

func init() {
	for _, c := range commands {
		byName[c.name] = c
	}
}

// newFlagSet returns the flag set of a command, whose usage explains the command with an example.
func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		c := byName[name]
		w := fs.Output()
		fmt.Fprintf(w, "Usage: kleidi-server %s [flags]\n\n%s\n\nExample:\n  %s\n", name, c.usage, c.example)
		n := 0
		fs.VisitAll(func(*flag.Flag) { n++ })
		if n > 0 {
			fmt.Fprintf(w, "\nFlags (each also read from KLEIDI_<FLAG>, e.g. --state-dir from KLEIDI_STATE_DIR):\n")
			fs.PrintDefaults()
		}
	}
	return fs
}

// parse parses args, then sets each flag not given on the command line from its environment variable
// KLEIDI_<NAME>, with '-' as '_'.
// positionalArgs is how many arguments after the flags each command takes.
var positionalArgs = map[string]int{"enroll": 1, "unenroll": 1, "activate": 1}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > positionalArgs[fs.Name()] {
		fmt.Fprintf(fs.Output(), "kleidi-server %s: unexpected argument %q\n", fs.Name(), fs.Arg(positionalArgs[fs.Name()]))
		return errUsage
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		env := envName(f.Name)
		v, ok := os.LookupEnv(env)
		if set[f.Name] || !ok || err != nil {
			return
		}
		if e := f.Value.Set(v); e != nil {
			err = fmt.Errorf("environment variable %s: %v", env, e)
		}
	})
	return err
}

func envName(flagName string) string {
	return "KLEIDI_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

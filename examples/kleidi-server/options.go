package main

import (
	"context"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/audit"
	"github.com/kleidi-kms/kleidi/awskms"
	"github.com/kleidi-kms/kleidi/gpg"
	"github.com/kleidi-kms/kleidi/internal/trustedpath"
	"github.com/kleidi-kms/kleidi/pkcs11"
	"github.com/kleidi-kms/kleidi/tpm"
	"github.com/kleidi-kms/kleidi/tpm/tpmsim"
)

// keyringFile is the keyring's name in the state directory.
const keyringFile = kleidi.KeyringFileName

// options are the flags every command that opens the keyring shares.
type options struct {
	stateDir  string
	provider  string
	logFormat string
	logLevel  string

	gpgPublicKeys stringList
	gpgPrivateKey string
	gpgPassphrase string
	tpmPath       string
	tpmPCRs       string
	tpmAuthFile   string
	pkcs11Module  string
	pkcs11Token   string
	pkcs11Key     string
	pkcs11PINFile string
	awsKey        string
	awsSigningKey string
	awsRegion     string
	awsEndpoint   string
	awsContext    stringList
	awsTimeout    time.Duration
	recoveryKey   string
	log           *slog.Logger
	devKeyAllowed bool
	createKeyring bool
	// firstStart lets serve create the keyring with any provider in a state directory never initialised before
	// (a deployment's first start); a state directory that shows an earlier keyring is still refused.
	firstStart bool

	// trustedMembers are the members --trusted-member names: trusted beside those of the node state.
	trustedMembers stringList

	// newEnvelope builds the Envelope open returns: serve's builds the server, which wires metrics and audit in.
	// Default: kleidi.NewEnvelope.
	newEnvelope func(ctx context.Context, p kleidi.Provider, ring kleidi.Keyring, opts ...kleidi.Option) (*kleidi.Envelope, error)
}

func (o *options) register(fs *flag.FlagSet) {
	fs.StringVar(&o.stateDir, "state-dir", defaultStateDir(), "`directory` of the keyring (keyring.json) and of a development key; created with mode 0700")
	fs.StringVar(&o.provider, "provider", "gpg", "root of trust: gpg (an OpenPGP key), tpm (a TPM 2.0), pkcs11 (a key on a PKCS#11 token or HSM; needs a cgo build) or awskms (an AWS KMS key)")
	fs.Var(&o.gpgPublicKeys, "gpg-public-key", "OpenPGP public key `file` to wrap KEKs to (repeatable; in the environment, comma-separated)")
	fs.StringVar(&o.gpgPrivateKey, "gpg-private-key", "", "OpenPGP private key `file` that unwraps KEKs; with no gpg key flag, a development key in the state directory")
	fs.StringVar(&o.gpgPassphrase, "gpg-passphrase-file", "", "`file` holding the passphrase of the private key")
	fs.StringVar(&o.tpmPath, "tpm", tpm.DefaultPath, "the `TPM`: a device (/dev/tpmrm0), tcp://host:port or unix:///path (swtpm), or simulator (in-process, for tests)")
	fs.StringVar(&o.tpmPCRs, "tpm-pcrs", "", "comma-separated `PCRs` new KEKs are sealed to, such as 7 or 0,2,7 (default: none)")
	fs.StringVar(&o.tpmAuthFile, "tpm-auth-file", "", "`file` holding the auth value of sealed KEKs (optional)")
	fs.StringVar(&o.pkcs11Module, "pkcs11-module", "", "`path` of the PKCS#11 library, such as /usr/lib/softhsm/libsofthsm2.so")
	fs.StringVar(&o.pkcs11Token, "pkcs11-token", "", "`label` of the PKCS#11 token")
	fs.StringVar(&o.pkcs11Key, "pkcs11-key", "", "`label` of the keys on the token, or id:HEX for their CKA_ID; init creates them if the token lacks them")
	fs.StringVar(&o.pkcs11PINFile, "pkcs11-pin-file", "", "`file` holding the token's user PIN")
	fs.StringVar(&o.awsKey, "awskms-key", "", "AWS KMS symmetric `key` that wraps KEKs: key ID, ARN or alias/NAME")
	fs.StringVar(&o.awsSigningKey, "awskms-signing-key", "", "AWS KMS ECC signing `key` that proves wrapped KEKs: key ID, ARN or alias/NAME")
	fs.StringVar(&o.awsRegion, "awskms-region", "", "AWS `region` (default: the SDK's, from AWS_REGION or the shared configuration)")
	fs.StringVar(&o.awsEndpoint, "awskms-endpoint", "", "AWS KMS endpoint `URL` (a VPC or FIPS endpoint, or a compatible server); default: the region's")
	fs.Var(&o.awsContext, "awskms-context", "`key=value` bound to every wrapped KEK as encryption context (repeatable; in the environment, comma-separated)")
	fs.DurationVar(&o.awsTimeout, "awskms-timeout", awskms.DefaultTimeout, "`duration` each call to AWS KMS may take, retries included")
	fs.Var(&o.trustedMembers, "trusted-member", "member `ID` this node trusts, and the members it endorses: on a joining node, the ID of the node that "+
		"enrolled it, as enroll printed it (default: the members that endorsed it in the keyring, on its first start); repeatable")
	fs.StringVar(&o.recoveryKey, "recovery-key", "", "OpenPGP public key `file` of an offline recovery key: every KEK is also wrapped for it (tpm root)")
	fs.StringVar(&o.logFormat, "log-format", "auto", "log `format`: text, json, or auto (text on a terminal, else json)")
	fs.StringVar(&o.logLevel, "log-level", "info", "log `level`: debug, info, warn or error")
}

// setup makes the logger once the flags are parsed.
func (o *options) setup(stderr io.Writer) error {
	l, err := newLogger(o.logFormat, o.logLevel, stderr)
	if err != nil {
		return err
	}
	o.log = l
	return nil
}

func newLogger(format, level string, w io.Writer) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	h, err := audit.NewLogHandler(w, format, lv)
	if err != nil {
		return nil, fmt.Errorf("--log-format: %w", err)
	}
	return slog.New(h), nil
}

func (o *options) keyringPath() string { return filepath.Join(o.stateDir, keyringFile) }

// keyringExists reports whether the state directory holds a keyring.
func (o *options) keyringExists() (bool, error) {
	_, err := os.Stat(o.keyringPath())
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

// open opens the root of trust and the Envelope over the state directory's keyring. With createKeyring, an
// empty state directory is initialised (a first KEK is generated); with devKeyAllowed, a development key is
// generated for a gpg provider given no key. Outside init (see [withExplicitInit]), a keyring is created only for
// the development key in a state directory never initialised before; see [options.refuseNewKeyring].
//
// The state directory, every directory above it and the keyring must be safe from other users: owned by root or
// by this user (for root, also by the state directory's owner, the plugin's user) and not writable by others.
func (o *options) open(ctx context.Context) (kleidi.Provider, *kleidi.Envelope, bool, error) {
	if !filepath.IsAbs(o.stateDir) {
		abs, err := filepath.Abs(o.stateDir)
		if err != nil {
			return nil, nil, false, err
		}
		o.stateDir = abs
	}
	exists, err := o.keyringExists()
	if err != nil {
		return nil, nil, false, fmt.Errorf("state directory: %w", err)
	}
	if !exists && !o.createKeyring {
		return nil, nil, false, fmt.Errorf("no keyring in %s: run kleidi-server init (or serve) first", o.stateDir)
	}
	if !exists && !isExplicitInit(ctx) {
		if err := o.refuseNewKeyring(ctx); err != nil {
			return nil, nil, false, err
		}
	}
	if err := trustedpath.MkdirAll(o.stateDir, o.stateOwner()...); err != nil {
		return nil, nil, false, fmt.Errorf("state directory: %w", err)
	}
	p, err := o.openProvider(ctx)
	if err != nil {
		return nil, nil, false, err
	}
	root := p
	var opts []kleidi.Option
	if o.createKeyring {
		opts = append(opts, kleidi.WithCreateIfEmpty())
	}
	state, err := o.loadNodeState()
	if err != nil {
		p.Close()
		return nil, nil, false, err
	}
	opts = append(append(opts, recipientOpeners()...), kleidi.WithNodeState(state))
	build := o.newEnvelope
	if build == nil {
		build = kleidi.NewEnvelope
	}
	env, err := build(ctx, p, kleidi.NewFileKeyring(o.keyringPath()), opts...)
	if err != nil {
		p.Close()
		return nil, nil, false, err
	}
	if err := o.enrollRecoveryKey(ctx, env); err != nil {
		p.Close()
		return nil, nil, false, err
	}
	if err := o.saveNodeState(env); err != nil {
		p.Close()
		return nil, nil, false, err
	}
	if name, err := o.pinnedSRK(); err == nil && name == "" && exists {
		if err := o.pinSRK(root); err != nil { // a node that joined with a keyring copied from another
			p.Close()
			return nil, nil, false, err
		}
	}
	if !exists {
		if err := o.markInitialised(env.KeyID()); err != nil {
			p.Close()
			return nil, nil, false, err
		}
		if err := o.pinSRK(root); err != nil {
			p.Close()
			return nil, nil, false, err
		}
	}
	return p, env, !exists, nil
}

// srkNameFile, in the state directory, holds the name of the TPM storage root key the keyring was created under,
// written at init: every later process pins it, so a TPM that presents another SRK gets no key.
const srkNameFile = "tpm-srk-name"

// pinSRK records the storage root key of a tpm provider p in the state directory.
func (o *options) pinSRK(p kleidi.Provider) error {
	tp, ok := p.(*tpm.Provider)
	if !ok || o.tpmPath == "simulator" {
		return nil
	}
	path := filepath.Join(o.stateDir, srkNameFile)
	if err := os.WriteFile(path, []byte(tp.SRKName()+"\n"), 0o600); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	return o.giveToStateOwner(path)
}

// pinnedSRK returns the storage root key name recorded at init, or "" for a state directory that has none.
func (o *options) pinnedSRK() (string, error) {
	b, err := os.ReadFile(filepath.Join(o.stateDir, srkNameFile))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("state directory: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// initialisedFile is written in the state directory beside the first keyring, so that a state directory whose
// keyring went missing is told from one never initialised.
const initialisedFile = "initialised"

// explicitInitKey marks the context of the init command.
type explicitInitKey struct{}

// withExplicitInit marks ctx as the init command's: the explicit way to create a keyring, which may create one
// with any provider and in a state directory initialised before.
func withExplicitInit(ctx context.Context) context.Context {
	return context.WithValue(ctx, explicitInitKey{}, true)
}

func isExplicitInit(ctx context.Context) bool {
	v, _ := ctx.Value(explicitInitKey{}).(bool)
	return v
}

// isDevelopmentDefault reports whether the root of trust is one for development, whose keyring serve may create:
// the zero-flag default (the development OpenPGP key), or the in-process TPM simulator, whose keys die with the
// process anyway.
func (o *options) isDevelopmentDefault() bool {
	switch o.provider {
	case "gpg":
		return len(o.gpgPublicKeys) == 0 && o.gpgPrivateKey == ""
	case "tpm":
		return o.tpmPath == "simulator"
	}
	return false
}

// refuseNewKeyring returns an error unless serve may create a keyring in a state directory that has none: only
// with the development default, in a state directory that shows no sign of an earlier keyring (its volume may be
// unmounted, or the keyring lost); with firstStart, with any provider in such a state directory. Any other provider's configuration is checked first, so that its errors come
// before the refusal; nothing is created.
func (o *options) refuseNewKeyring(ctx context.Context) error {
	if !o.isDevelopmentDefault() && !o.firstStart {
		p, err := o.openProvider(ctx)
		if err != nil {
			return err
		}
		p.Close()
		return fmt.Errorf("no keyring in %s: serve creates a keyring only for development (--provider gpg with no "+
			"key flags, or --tpm simulator); run kleidi-server init with the same flags first, or, if %s should hold a keyring, "+
			"check that its volume is mounted", o.stateDir, o.stateDir)
	}
	for _, name := range []string{initialisedFile, keyringFile + ".lock", "gpg"} {
		if _, err := os.Lstat(filepath.Join(o.stateDir, name)); err == nil {
			return fmt.Errorf("%s was initialised before (it holds %s) but has no %s: is its volume mounted? serve "+
				"never replaces a missing keyring; restore %s, or run kleidi-server init to start a new one",
				o.stateDir, name, keyringFile, keyringFile)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("state directory: %w", err)
		}
	}
	return nil
}

// stateOwner returns, for root, the owner of the state directory (the plugin's user), whom root then trusts
// with the state directory and the directories above it.
func (o *options) stateOwner() []uint32 {
	if os.Geteuid() != 0 {
		return nil
	}
	uid, _, err := trustedpath.Owner(o.stateDir)
	if err != nil || uid == 0 {
		return nil
	}
	return []uint32{uid}
}

// markInitialised writes the state directory's initialised file.
func (o *options) markInitialised(keyID string) error {
	path := filepath.Join(o.stateDir, initialisedFile)
	text := fmt.Sprintf("kleidi state directory, initialised %s with key_id %s. Its keyring is %s: if that file "+
		"is missing, kleidi-server serve refuses to start rather than create a new one.\n",
		time.Now().UTC().Format(time.RFC3339), keyID, keyringFile)
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	return o.giveToStateOwner(path)
}

// giveToStateOwner gives path, and everything under it, to the state directory's owner when root made them in
// another user's state directory, so that user (the plugin's) can read them.
func (o *options) giveToStateOwner(path string) error {
	if os.Geteuid() != 0 {
		return nil
	}
	uid, gid, err := trustedpath.Owner(o.stateDir)
	if err != nil || uid == 0 {
		return err
	}
	return filepath.WalkDir(path, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := os.Lchown(p, int(uid), int(gid)); err != nil {
			return fmt.Errorf("state directory: %w", err)
		}
		return nil
	})
}

func (o *options) openProvider(ctx context.Context) (kleidi.Provider, error) {
	switch o.provider {
	case "gpg":
		c := gpg.Config{PublicKeyFiles: o.gpgPublicKeys, PrivateKeyFile: o.gpgPrivateKey, PassphraseFile: o.gpgPassphrase}
		if len(c.PublicKeyFiles) == 0 && c.PrivateKeyFile == "" {
			dir := filepath.Join(o.stateDir, "gpg")
			var err error
			if o.devKeyAllowed {
				if c, err = gpg.GenerateDevelopmentKey(dir); err != nil {
					return nil, err
				}
				if err := o.giveToStateOwner(dir); err != nil {
					return nil, err
				}
			} else {
				c = gpg.Config{PrivateKeyFile: filepath.Join(dir, gpg.DevelopmentPrivateKeyFile)}
			}
			o.log.Warn("using the INSECURE development OpenPGP key of the state directory: it has no passphrase and "+
				"protects nothing from whoever can read the state directory; pass --gpg-private-key for real use",
				"key", c.PrivateKeyFile)
		}
		return gpg.New(c)
	case "tpm":
		pcrs, err := tpm.ParsePCRs(o.tpmPCRs)
		if err != nil {
			return nil, err
		}
		srk, err := o.pinnedSRK()
		if err != nil {
			return nil, err
		}
		cfg := tpm.Config{Path: o.tpmPath, PCRs: pcrs, AuthFile: o.tpmAuthFile, SRKName: srk}
		if o.tpmPath == "simulator" {
			cfg.Open = tpmsim.Open // the in-process simulator, for tests and demos
		}
		return tpm.New(ctx, cfg)
	case "pkcs11":
		c := pkcs11.Config{Module: o.pkcs11Module, Token: o.pkcs11Token, PINFile: o.pkcs11PINFile, CreateKeys: isExplicitInit(ctx)}
		if v, ok := strings.CutPrefix(o.pkcs11Key, "id:"); ok {
			id, err := hex.DecodeString(v)
			if err != nil || len(id) == 0 {
				return nil, fmt.Errorf("--pkcs11-key %q: want a label, or id: and the key's CKA_ID in hex", o.pkcs11Key)
			}
			c.KeyID = id
		} else {
			c.KeyLabel = o.pkcs11Key
		}
		if c.Module == "" || c.Token == "" || o.pkcs11Key == "" || c.PINFile == "" {
			return nil, errors.New("--provider pkcs11 needs --pkcs11-module, --pkcs11-token, --pkcs11-key and --pkcs11-pin-file")
		}
		return pkcs11.New(ctx, c)
	case "awskms":
		if o.awsKey == "" || o.awsSigningKey == "" {
			return nil, errors.New("--provider awskms needs --awskms-key and --awskms-signing-key")
		}
		c := awskms.Config{KeyID: o.awsKey, SigningKeyID: o.awsSigningKey, Region: o.awsRegion, Endpoint: o.awsEndpoint,
			Timeout: o.awsTimeout}
		for _, kv := range o.awsContext {
			k, v, ok := strings.Cut(kv, "=")
			if !ok || k == "" {
				return nil, fmt.Errorf("--awskms-context %q: want key=value", kv)
			}
			if c.EncryptionContext == nil {
				c.EncryptionContext = map[string]string{}
			}
			c.EncryptionContext[k] = v
		}
		return awskms.New(ctx, c)
	}
	return nil, fmt.Errorf("--provider %q: want gpg, tpm, pkcs11 or awskms", o.provider)
}

// defaultStateDir is /var/lib/kleidi for root, else $XDG_STATE_HOME/kleidi or ~/.local/state/kleidi.
func defaultStateDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/kleidi"
	}
	if d := os.Getenv("XDG_STATE_HOME"); filepath.IsAbs(d) {
		return filepath.Join(d, "kleidi")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "state", "kleidi")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("kleidi-%d", os.Geteuid()), "state")
}

// defaultListen is unix:///run/kleidi/kms.sock for root, else $XDG_RUNTIME_DIR/kleidi/kms.sock or
// /tmp/kleidi-<uid>/kms.sock.
func defaultListen() string {
	if os.Geteuid() == 0 {
		return "unix:///run/kleidi/kms.sock"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); filepath.IsAbs(d) {
		return "unix://" + filepath.Join(d, "kleidi", "kms.sock")
	}
	return "unix://" + filepath.Join(os.TempDir(), fmt.Sprintf("kleidi-%d", os.Geteuid()), "kms.sock")
}

// stringList is a repeatable flag; from the environment it takes a comma-separated list.
type stringList []string

func (l *stringList) String() string { return strings.Join(*l, ",") }

func (l *stringList) Set(v string) error {
	for s := range strings.SplitSeq(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

// modeValue is a file mode in octal.
type modeValue fs.FileMode

func (m *modeValue) String() string { return fmt.Sprintf("%#o", fs.FileMode(*m)) }

func (m *modeValue) Set(v string) error {
	n, err := strconv.ParseUint(v, 8, 32)
	if err != nil || n&^0o777 != 0 || n&0o600 != 0o600 {
		return fmt.Errorf("want an octal mode from 0600 to 0777, such as 0600 or 0660")
	}
	*m = modeValue(n)
	return nil
}

// uidList is a comma-separated list of user IDs.
type uidList []uint32

func (l *uidList) String() string {
	s := make([]string, len(*l))
	for i, u := range *l {
		s[i] = strconv.FormatUint(uint64(u), 10)
	}
	return strings.Join(s, ",")
}

func (l *uidList) Set(v string) error {
	*l = nil
	for s := range strings.SplitSeq(v, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		n, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			return fmt.Errorf("%q is not a numeric uid", s)
		}
		*l = append(*l, uint32(n))
	}
	return nil
}

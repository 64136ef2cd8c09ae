package tpm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/kleidi-kms/kleidi"
)

// MaxKeySize is the largest key [Provider.Wrap] seals: the TPM's limit on sealed data.
const MaxKeySize = 128

// MaxAuthSize is the longest auth value: the size of a SHA-256 digest, the sealed object's name algorithm.
const MaxAuthSize = 32

// srkHandle is the persistent handle the TCG provisioning guidance reserves for the storage root key.
const srkHandle tpm2.TPMHandle = 0x81000001

// Errors of this package, besides the kleidi sentinels they come with.
var (
	// ErrPolicy means the key's policy is not the one this provider is configured for: it is bound to other PCRs
	// (or to none), or the bound PCR values changed since it was sealed (a different boot chain, firmware or
	// Secure Boot state). It comes with [kleidi.ErrUnwrap].
	ErrPolicy = errors.New("PCR policy not satisfied: the key's PCR policy is not the configured one, or the bound PCR values changed since it was sealed")
	// ErrStorageKeyChanged means the storage root key is not the one expected. From Unwrap (with
	// [kleidi.ErrUnwrap]): the key was sealed under another storage root key, because the TPM was cleared (its
	// owner seed replaced) or the key was sealed by another TPM; no retry will unwrap it. From Wrap, Prove and
	// Health: the TPM presents a storage root key other than the one the provider pinned (see [Config.SRKName]),
	// because the TPM was cleared or replaced, or something between this process and the TPM answers in its place.
	ErrStorageKeyChanged = errors.New("the storage root key is not the expected one: the TPM was cleared, or it is another TPM")
)

// Config selects the TPM and how keys are sealed.
type Config struct {
	// Path is the TPM to use:
	//   - a character device: "/dev/tpmrm0" (the default, the kernel's resource manager) or "/dev/tpm0";
	//   - "tcp://127.0.0.1:2321": swtpm or the TCG reference simulator (its platform port is the next port);
	//   - "unix:///run/swtpm/sock": swtpm's unixio server.
	Path string
	// Open, when set, connects to the TPM instead of Path: tpmsim.Open for the in-process simulator (package
	// tpm/tpmsim, for tests and demos; its state dies with the provider), or any transport of go-tpm. The
	// provider keeps the connection, and opens it again after a failure.
	Open func() (transport.TPMCloser, error)
	// PCRs are the SHA-256 PCRs (0 to 23) new keys are bound to: they unseal only while these PCRs hold the
	// values they had when Wrap ran. Empty: no binding. Unwrap accepts only keys bound to exactly these PCRs
	// (none when empty), with the values they hold now, and the proof key of [Provider.Prove] depends on them too.
	PCRs []int
	// AuthFile names a file whose content (1 to 32 bytes; one trailing newline is ignored) is the auth value
	// of new sealed objects, and is needed to unseal them. Empty: no auth value. Unwrap accepts only keys sealed
	// with an auth value when one is configured, and only keys sealed without one otherwise.
	AuthFile string
	// SRKName pins the storage root key: the hex TPM name (68 hex digits, "000b" and a SHA-256 digest) of the
	// SRK that every operation must find, as [Provider.SRKName] returns it and tpm2_readpublic prints it as
	// "name". Empty: the provider trusts the SRK it finds when it starts (trust on first use) and refuses any
	// other afterwards.
	SRKName string
}

// Provider is a [kleidi.Provider] whose root of trust is a TPM 2.0. It seals each key as a TPM object under the
// storage root key (SRK), so only the same TPM, with the same owner seed, can unseal it.
//
// On a device or the in-process simulator, a Provider holds one connection to the TPM and serialises commands on
// it. On a socket (swtpm, the TCG reference simulator), which serves one client at a time, it connects for each
// operation and flushes what it loaded before it disconnects, so other processes can use the TPM in between. When
// the connection fails (a TPM emulator restarted, a device that went away), calls return errors wrapping
// [kleidi.ErrUnavailable] and the next call reconnects.
type Provider struct {
	open  opener
	perOp bool // connect for each operation rather than once
	pcrs  uint32
	auth  []byte // nil: no auth value

	sem    chan struct{} // held while using the fields below
	closed bool
	tpm    transport.TPMCloser // nil when disconnected
	srk    *storageKey         // nil when not set up on this connection
	pin    []byte              // the SRK name every operation must find; nil until the first SRK is set up

	proof *kleidi.ProofKey // the proof key of [Provider.Prove] and [Provider.Verify], derived by deriveProofKey
}

var (
	_ kleidi.Provider      = (*Provider)(nil)
	_ kleidi.Authenticator = (*Provider)(nil)
)

// storageKey is the SRK as loaded on the current connection. Its name is computed from its public area, never
// taken from the TPM's answer, so the public area a session is salted to is the one the name pins.
type storageKey struct {
	handle     tpm2.TPMHandle
	name       tpm2.TPM2BName
	public     tpm2.TPMTPublic
	persistent bool
}

// New connects to the TPM that cfg names and sets up its storage root key. It fails if the TPM cannot be reached,
// if a PCR is out of range, or if the auth file is unreadable or of a bad size.
func New(ctx context.Context, cfg Config) (*Provider, error) {
	if cfg.Open != nil {
		return newProvider(ctx, cfg, cfg.Open, false)
	}
	path := cfg.Path
	if path == "" {
		path = DefaultPath
	}
	open, perOp, err := newOpener(path)
	if err != nil {
		return nil, err
	}
	return newProvider(ctx, cfg, open, perOp)
}

// newProvider returns a provider on the TPM that open reaches. With perOp it connects for each operation.
func newProvider(ctx context.Context, cfg Config, open opener, perOp bool) (*Provider, error) {
	p := &Provider{open: open, perOp: perOp, sem: make(chan struct{}, 1)}
	p.proof = kleidi.NewProofKey(p.deriveProofKey)
	if cfg.SRKName != "" {
		pin, err := parseSRKName(cfg.SRKName)
		if err != nil {
			return nil, err
		}
		p.pin = pin
	}
	for _, i := range cfg.PCRs {
		if i < 0 || i >= numPCRs {
			return nil, fmt.Errorf("tpm: PCR %d out of range 0 to %d", i, numPCRs-1)
		}
		p.pcrs |= 1 << i
	}
	if cfg.AuthFile != "" {
		auth, err := readAuthFile(cfg.AuthFile)
		if err != nil {
			return nil, err
		}
		p.auth = auth
	}
	if err := p.checkSRK(ctx, "new"); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// parseSRKName parses the hex TPM name of a storage root key: a SHA-256 name, as the SRK template has.
func parseSRKName(s string) ([]byte, error) {
	name, err := hex.DecodeString(strings.TrimSpace(s))
	if err != nil || len(name) != 2+sha256.Size || binary.BigEndian.Uint16(name) != uint16(tpm2.TPMAlgSHA256) {
		return nil, fmt.Errorf("tpm: SRK name %q: want 68 hex digits, 000b and a SHA-256 digest", s)
	}
	return name, nil
}

// SRKName returns the hex TPM name of the storage root key this provider is pinned to: the one of
// [Config.SRKName], or else the one it found when it started. Record it (at init) and pass it as
// [Config.SRKName] to every later provider on this TPM, so that none of them trusts another SRK even at start.
func (p *Provider) SRKName() string {
	p.sem <- struct{}{}
	defer func() { <-p.sem }()
	return hex.EncodeToString(p.pin)
}

// checkPin pins the storage root key the first time one is set up, and afterwards returns an error wrapping
// [ErrStorageKeyChanged] when srk is another key. A session salted to another key would hand what it protects
// to whoever holds that key.
func (p *Provider) checkPin(srk *storageKey) error {
	if p.pin == nil {
		p.pin = bytes.Clone(srk.name.Buffer)
		return nil
	}
	if !bytes.Equal(p.pin, srk.name.Buffer) {
		return fmt.Errorf("%w: it presents storage root key %x, not the pinned %x (if the TPM was cleared on purpose, initialise a new keyring)",
			ErrStorageKeyChanged, srk.name.Buffer, p.pin)
	}
	return nil
}

// readAuthFile reads an auth value. The TPM drops trailing zero bytes of an auth value, so they are dropped here.
func readAuthFile(name string) ([]byte, error) {
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, fmt.Errorf("tpm: auth file: %w", err)
	}
	auth := bytes.TrimSuffix(b, []byte("\n"))
	auth = bytes.TrimSuffix(auth, []byte("\r"))
	auth = bytes.TrimRight(auth, "\x00")
	if len(auth) == 0 || len(auth) > MaxAuthSize {
		clear(b)
		return nil, fmt.Errorf("tpm: auth file %s: %d bytes, want 1 to %d", name, len(auth), MaxAuthSize)
	}
	out := bytes.Clone(auth)
	clear(b)
	return out, nil
}

// ParsePCRs parses a comma-separated list of PCR indexes such as "7" or "0,2,7", as a command line takes them.
// The empty string is no PCR.
func ParsePCRs(s string) ([]int, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var pcrs []int
	for f := range strings.SplitSeq(s, ",") {
		i, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || i < 0 || i >= numPCRs {
			return nil, fmt.Errorf("tpm: PCR %q: want an integer from 0 to %d", f, numPCRs-1)
		}
		if !slices.Contains(pcrs, i) {
			pcrs = append(pcrs, i)
		}
	}
	slices.Sort(pcrs)
	return pcrs, nil
}

// Name implements [kleidi.Provider]. It is "tpm".
func (p *Provider) Name() string { return "tpm" }

// Wrap seals key (1 to [MaxKeySize] bytes) under the TPM's storage root key, bound to the configured PCRs and
// auth value. The key travels to the TPM encrypted by a session salted with the SRK, and only with the pinned SRK
// (see [Config.SRKName]): another gives an error wrapping [ErrStorageKeyChanged].
func (p *Provider) Wrap(ctx context.Context, key []byte) ([]byte, error) {
	if len(key) == 0 {
		return nil, errors.New("tpm: wrap: empty key")
	}
	if len(key) > MaxKeySize {
		return nil, fmt.Errorf("tpm: wrap: %w: key of %d bytes, the TPM seals at most %d", kleidi.ErrTooLarge, len(key), MaxKeySize)
	}
	var out []byte
	err := p.do(ctx, "wrap", true, func(t transport.TPM, srk *storageKey) error {
		if err := p.checkPin(srk); err != nil {
			return err
		}
		policy, err := p.policyDigest(t)
		if err != nil {
			return err
		}
		sess := tpm2.HMAC(tpm2.TPMAlgSHA256, 16,
			tpm2.Salted(srk.handle, srk.public), tpm2.AESEncryption(128, tpm2.EncryptIn))
		defer flushSession(t, sess)
		rsp, err := tpm2.Create{
			ParentHandle: tpm2.AuthHandle{Handle: srk.handle, Name: srk.name, Auth: sess},
			InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
				UserAuth: tpm2.TPM2BAuth{Buffer: p.auth},
				Data:     tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: key}),
			}},
			InPublic: tpm2.New2B(sealedTemplate(policy, p.auth != nil)),
		}.Execute(t)
		if err != nil {
			return err
		}
		b := blob{
			auth:    p.auth != nil,
			pcrs:    p.pcrs,
			parent:  srk.name.Buffer,
			public:  rsp.OutPublic.Bytes(),
			private: rsp.OutPrivate.Buffer,
		}
		out = b.marshal()
		if len(out) > kleidi.MaxWrappedKeySize {
			return fmt.Errorf("tpm: wrap: %w: wrapped key of %d bytes", kleidi.ErrTooLarge, len(out))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// policyDigest computes the policy of a new sealed object: PolicyPCR over the configured PCRs' current values
// (when any), then PolicyAuthValue.
func (p *Provider) policyDigest(t transport.TPM) ([]byte, error) {
	calc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		return nil, err
	}
	if p.pcrs != 0 {
		digest, err := readPCRDigest(t, p.pcrs)
		if err != nil {
			return nil, err
		}
		if err := (tpm2.PolicyPCR{PcrDigest: tpm2.TPM2BDigest{Buffer: digest}, Pcrs: pcrSelection(p.pcrs)}).Update(calc); err != nil {
			return nil, err
		}
	}
	if err := (tpm2.PolicyAuthValue{}).Update(calc); err != nil {
		return nil, err
	}
	return calc.Hash().Digest, nil
}

// policySession returns a policy session that satisfies the configured policy (PolicyPCR over the configured
// PCRs, then PolicyAuthValue with the configured auth value), salted with srk, that encrypts the command's response.
func (p *Provider) policySession(srk *storageKey) tpm2.Session {
	return tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(t transport.TPM, h tpm2.TPMISHPolicy, _ tpm2.TPM2BNonce) error {
		if p.pcrs != 0 {
			if _, err := (tpm2.PolicyPCR{PolicySession: h, Pcrs: pcrSelection(p.pcrs)}).Execute(t); err != nil {
				return err
			}
		}
		_, err := tpm2.PolicyAuthValue{PolicySession: h}.Execute(t)
		return err
	}, tpm2.Auth(p.auth), tpm2.Salted(srk.handle, srk.public), tpm2.AESEncryption(128, tpm2.EncryptOut))
}

// pcrSelection is the TPML_PCR_SELECTION of the SHA-256 bank for the PCR bitmap pcrs.
func pcrSelection(pcrs uint32) tpm2.TPMLPCRSelection {
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash:      tpm2.TPMAlgSHA256,
		PCRSelect: []byte{byte(pcrs), byte(pcrs >> 8), byte(pcrs >> 16)},
	}}}
}

// readPCRDigest returns SHA-256 over the values of the PCRs in pcrs, in increasing order, as PolicyPCR computes
// it. A TPM returns at most eight values per PCR_Read, so it reads until all are in.
func readPCRDigest(t transport.TPM, pcrs uint32) ([]byte, error) {
	h := sha256.New()
	for left := pcrs; left != 0; {
		rsp, err := tpm2.PCRRead{PCRSelectionIn: pcrSelection(left)}.Execute(t)
		if err != nil {
			return nil, err
		}
		var got uint32
		for _, s := range rsp.PCRSelectionOut.PCRSelections {
			if s.Hash != tpm2.TPMAlgSHA256 {
				continue
			}
			for i, b := range s.PCRSelect {
				got |= uint32(b) << (8 * i)
			}
		}
		if got == 0 || got&^left != 0 || bits.OnesCount32(got) != len(rsp.PCRValues.Digests) {
			return nil, fmt.Errorf("tpm: reading PCRs %v of the SHA-256 bank: is that bank active?", pcrList(left))
		}
		for _, d := range rsp.PCRValues.Digests {
			h.Write(d.Buffer)
		}
		left &^= got
		if left != 0 && left&(got-1) != 0 {
			// The TPM skipped a lower PCR: the digest order would be wrong.
			return nil, fmt.Errorf("tpm: reading PCRs %v: out of order answer", pcrList(pcrs))
		}
	}
	return h.Sum(nil), nil
}

func pcrList(pcrs uint32) []int {
	var l []int
	for i := range numPCRs {
		if pcrs&(1<<i) != 0 {
			l = append(l, i)
		}
	}
	return l
}

// Unwrap loads a sealed key under the storage root key and unseals it through its policy (PCR values, auth
// value). It unseals only keys sealed under the pinned SRK with the policy this provider's configuration gives
// now: the same PCR selection, the same PCR values (the sealed object's policy digest, which the TPM binds to it,
// must be the one the current values give) and an auth value exactly when one is configured. A key sealed by a
// provider configured otherwise (no PCRs, other PCRs) is refused, whatever the TPM would accept. The key travels
// back encrypted by a session salted with the SRK. Unwrap also accepts the keys that a [kleidi.Recipient] of this
// provider's [Provider.Identity] duplicated to this TPM (see [OpenRecipient]), under the same rule: only with the
// policy this configuration gives now. Errors wrap [kleidi.ErrUnwrap] for a blob this provider
// refuses (and [ErrPolicy] or [ErrStorageKeyChanged] when that is why), [kleidi.ErrUnavailable] when the TPM
// cannot be reached.
func (p *Provider) Unwrap(ctx context.Context, wrapped []byte) ([]byte, error) {
	if isDuplicate(wrapped) {
		return p.unwrapDuplicate(ctx, wrapped)
	}
	b, err := parseBlob(wrapped)
	if err != nil {
		return nil, fmt.Errorf("tpm: unwrap: %w: %w", kleidi.ErrUnwrap, err)
	}
	var key []byte
	err = p.do(ctx, "unwrap", true, func(t transport.TPM, srk *storageKey) error {
		if b.auth && p.auth == nil {
			return fmt.Errorf("%w: the key was sealed with an auth value and none is configured", kleidi.ErrUnwrap)
		}
		if !b.auth && p.auth != nil {
			return fmt.Errorf("%w: the key was sealed without an auth value and one is configured", kleidi.ErrUnwrap)
		}
		if err := p.checkPin(srk); err != nil {
			return fmt.Errorf("%w: %w", kleidi.ErrUnwrap, err)
		}
		if !bytes.Equal(b.parent, srk.name.Buffer) {
			return fmt.Errorf("%w: %w", ErrStorageKeyChanged, kleidi.ErrUnwrap)
		}
		if b.pcrs != p.pcrs {
			return fmt.Errorf("%w: %w: the key is bound to PCRs %v, this provider to %v", ErrPolicy, kleidi.ErrUnwrap,
				pcrList(b.pcrs), pcrList(p.pcrs))
		}
		want, err := p.policyDigest(t)
		if err != nil {
			return err
		}
		if !bytes.Equal(b.policy, want) {
			return fmt.Errorf("%w: %w: the key's policy digest is not the one PCRs %v give now", ErrPolicy, kleidi.ErrUnwrap,
				pcrList(p.pcrs))
		}
		loaded, err := tpm2.Load{
			ParentHandle: tpm2.AuthHandle{Handle: srk.handle, Name: srk.name, Auth: tpm2.PasswordAuth(nil)},
			InPrivate:    tpm2.TPM2BPrivate{Buffer: b.private},
			InPublic:     tpm2.BytesAs2B[tpm2.TPMTPublic](b.public),
		}.Execute(t)
		if err != nil {
			if isSRKGone(err) || isTransient(err) {
				return err
			}
			return fmt.Errorf("%w: the TPM refused the sealed object (damaged, or not sealed by this TPM): %w", kleidi.ErrUnwrap, err)
		}
		defer flushContext(t, loaded.ObjectHandle)
		sess := p.policySession(srk)
		defer flushSession(t, sess)
		key, err = unseal(t, loaded.ObjectHandle, loaded.Name, sess, "sealed object")
		return err
	})
	if err != nil {
		return nil, err
	}
	return key, nil
}

// unseal unseals the loaded object handle (of name name) in session sess and classifies the TPM's refusal: a
// policy that fails is ErrPolicy, a wrong auth value and any other refusal kleidi.ErrUnwrap; a storage key that
// went away or a transient failure is returned as it is, for the caller to reconnect. what names the object.
func unseal(t transport.TPM, handle tpm2.TPMHandle, name tpm2.TPM2BName, sess tpm2.Session, what string) ([]byte, error) {
	rsp, err := tpm2.Unseal{ItemHandle: tpm2.AuthHandle{Handle: handle, Name: name, Auth: sess}}.Execute(t)
	switch {
	case err == nil:
	case errors.Is(err, tpm2.TPMRCPolicyFail):
		return nil, fmt.Errorf("%w: %w", ErrPolicy, kleidi.ErrUnwrap)
	case errors.Is(err, tpm2.TPMRCAuthFail) || errors.Is(err, tpm2.TPMRCBadAuth):
		return nil, fmt.Errorf("%w: wrong auth value: %w", kleidi.ErrUnwrap, err)
	case isSRKGone(err) || isTransient(err):
		return nil, err
	default:
		return nil, fmt.Errorf("%w: %w", kleidi.ErrUnwrap, err)
	}
	if len(rsp.OutData.Buffer) == 0 {
		return nil, fmt.Errorf("%w: the %s holds no key", kleidi.ErrUnwrap, what)
	}
	return rsp.OutData.Buffer, nil
}

// Health implements [kleidi.Provider]: it connects (or reconnects) to the TPM, sets up the storage root key if
// needed and checks it against the pinned one (on a socket, then disconnects), so a cleared or replaced TPM
// reports [ErrStorageKeyChanged].
func (p *Provider) Health(ctx context.Context) error {
	// Also on a socket, where it costs a CreatePrimary: a TPM cleared behind the plugin's back must show, or its
	// node keeps encrypting with the KEKs it holds while no new start could unwrap them.
	return p.checkSRK(ctx, "health")
}

// checkSRK connects (or reconnects) to the TPM, sets up the storage root key if needed and reads its public area.
func (p *Provider) checkSRK(ctx context.Context, op string) error {
	return p.do(ctx, op, true, func(t transport.TPM, srk *storageKey) error {
		if err := p.checkPin(srk); err != nil {
			return err
		}
		rsp, err := tpm2.ReadPublic{ObjectHandle: srk.handle}.Execute(t)
		if err != nil {
			return err
		}
		if !bytes.Equal(rsp.Name.Buffer, srk.name.Buffer) {
			// Another object took the handle (the TPM was reset): set up the SRK again.
			return tpm2.TPMRCHandle
		}
		return nil
	})
}

// Close implements [kleidi.Provider]: it flushes the storage root key, closes the connection and zeroes the auth
// value and the proof key. It is idempotent.
func (p *Provider) Close() error {
	p.sem <- struct{}{}
	if p.closed {
		<-p.sem
		return nil
	}
	p.closed = true
	clear(p.auth)
	p.auth = nil
	err := p.disconnect()
	<-p.sem
	p.proof.Close()
	return err
}

// do runs f with the TPM connection and, with needSRK, the storage root key (else srk is nil) under the provider's
// lock. It checks ctx before it starts, reconnects when there is no connection, and retries f once after the
// connection broke or the SRK vanished (a TPM reset), so a TPM that came back works on the first call. A provider
// that connects per operation disconnects at the end, after flushing a transient SRK.
func (p *Provider) do(ctx context.Context, op string, needSRK bool, f func(t transport.TPM, srk *storageKey) error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("tpm: %s: %w", op, err)
	}
	select {
	case p.sem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("tpm: %s: %w", op, ctx.Err())
	}
	defer func() { <-p.sem }()
	if p.closed {
		return fmt.Errorf("tpm: %s: %w", op, kleidi.ErrClosed)
	}
	if p.perOp {
		defer p.disconnect() //nolint:errcheck // the operation's outcome is known; closing a socket cannot change it
	}
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("tpm: %s: %w", op, err)
		}
		err := p.connect(needSRK)
		if err == nil {
			err = f(&ctxTPM{ctx: ctx, tpm: p.tpm}, p.srk)
		}
		if err == nil {
			return nil
		}
		var te *transportError
		switch {
		case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
			return fmt.Errorf("tpm: %s: %w", op, err)
		case errors.As(err, &te):
			p.disconnect()
			if attempt == 0 {
				continue
			}
			return fmt.Errorf("tpm: %s: %w: %w", op, kleidi.ErrUnavailable, err)
		case isSRKGone(err):
			p.dropSRK()
			if attempt == 0 {
				continue
			}
			return fmt.Errorf("tpm: %s: %w: storage root key: %w", op, kleidi.ErrUnavailable, err)
		case isTransient(err):
			return fmt.Errorf("tpm: %s: %w: %w", op, kleidi.ErrUnavailable, err)
		}
		return fmt.Errorf("tpm: %s: %w", op, err)
	}
}

// ctxTPM checks the context before each command, and marks transport failures.
type ctxTPM struct {
	ctx context.Context
	tpm transport.TPM
}

func (c *ctxTPM) Send(cmd []byte) ([]byte, error) {
	if err := c.ctx.Err(); err != nil {
		return nil, err
	}
	return send(c.tpm, cmd)
}

// send sends one command and marks a failure to talk to the TPM as a transportError. It resends the command while
// the TPM answers that it could not start it yet (TPM_RC_RETRY, TPM_RC_YIELDED, TPM_RC_TESTING), as the kernel
// driver does, for up to about two seconds.
func send(t transport.TPM, cmd []byte) ([]byte, error) {
	for attempt := 1; ; attempt++ {
		rsp, err := t.Send(cmd)
		if err != nil {
			return nil, &transportError{err}
		}
		if attempt > 20 || len(rsp) < 10 {
			return rsp, nil
		}
		switch tpm2.TPMRC(binary.BigEndian.Uint32(rsp[6:10])) {
		case tpm2.TPMRCRetry, tpm2.TPMRCYielded, tpm2.TPMRCTesting:
			time.Sleep(time.Duration(attempt) * 10 * time.Millisecond)
		default:
			return rsp, nil
		}
	}
}

// rawTPM marks transport failures but ignores the context: cleanup commands run even after a cancellation.
type rawTPM struct{ tpm transport.TPM }

func (r rawTPM) Send(cmd []byte) ([]byte, error) { return send(r.tpm, cmd) }

// flushContext flushes a transient handle. It ignores the context, so a cancelled call leaks nothing.
func flushContext(t transport.TPM, h tpm2.TPMHandle) {
	if c, ok := t.(*ctxTPM); ok {
		t = rawTPM{c.tpm}
	}
	tpm2.FlushContext{FlushHandle: h}.Execute(t) //nolint:errcheck // best effort; a dead connection frees it anyway
}

// flushSession flushes a one-shot session that is still loaded: the TPM flushes it itself after a successful
// command, and go-tpm after a failed one, but not when the policy commands inside its start failed.
func flushSession(t transport.TPM, s tpm2.Session) {
	if h := s.Handle(); h != tpm2.TPMRHNull {
		flushContext(t, h)
	}
}

// connect opens the connection when it is missing and, with needSRK, sets up the storage root key if missing.
func (p *Provider) connect(needSRK bool) error {
	if p.tpm == nil {
		t, err := p.open()
		if err != nil {
			return &transportError{err}
		}
		p.tpm = t
	}
	if !needSRK || p.srk != nil {
		return nil
	}
	srk, err := p.setupSRK(rawTPM{p.tpm})
	if err != nil {
		return err
	}
	p.srk = srk
	return nil
}

// setupSRK takes the storage root key from the TCG's persistent handle if it has the ECC P-256 SRK template, or
// else creates it from that template. Both give the same key for the same owner seed, so keys sealed under one
// unseal under the other.
func (p *Provider) setupSRK(t transport.TPM) (*storageKey, error) {
	k, err := p.createSRK(t)
	if errors.Is(err, errPoweredOff) {
		// A TCG reference simulator that is switched off: switch it on, start it, try again.
		if s, ok := p.tpm.(*socketTPM); ok && s.framed {
			if err := s.powerOn(); err != nil {
				return nil, &transportError{err}
			}
			return p.createSRK(t)
		}
	}
	return k, err
}

func (p *Provider) createSRK(t transport.TPM) (*storageKey, error) {
	rp, err := tpm2.ReadPublic{ObjectHandle: srkHandle}.Execute(t)
	if errors.Is(err, tpm2.TPMRCInitialize) {
		// A TPM emulator started without TPM2_Startup.
		if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(t); err != nil {
			return nil, fmt.Errorf("startup: %w", err)
		}
		rp, err = tpm2.ReadPublic{ObjectHandle: srkHandle}.Execute(t)
	}
	if err == nil {
		pub, perr := rp.OutPublic.Contents()
		if perr == nil && isSRKTemplate(pub) {
			if name, nerr := tpm2.ObjectName(pub); nerr == nil {
				return &storageKey{handle: srkHandle, name: *name, public: *pub, persistent: true}, nil
			}
		}
	}
	var te *transportError
	if errors.As(err, &te) {
		return nil, err
	}
	cp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate),
	}.Execute(t)
	if err != nil {
		if errors.As(err, &te) || isTransient(err) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: creating the storage root key (is an owner password set?): %w", kleidi.ErrUnavailable, err)
	}
	pub, err := cp.OutPublic.Contents()
	if err != nil {
		flushContext(t, cp.ObjectHandle)
		return nil, err
	}
	name, err := tpm2.ObjectName(pub)
	if err != nil {
		flushContext(t, cp.ObjectHandle)
		return nil, err
	}
	return &storageKey{handle: cp.ObjectHandle, name: *name, public: *pub}, nil
}

// isSRKTemplate reports whether pub is the TCG ECC P-256 SRK template, ignoring its unique field.
func isSRKTemplate(pub *tpm2.TPMTPublic) bool {
	c := *pub
	c.Unique = tpm2.ECCSRKTemplate.Unique
	return bytes.Equal(tpm2.Marshal(c), tpm2.Marshal(tpm2.ECCSRKTemplate))
}

// dropSRK forgets the storage root key after a TPM reset unloaded it.
func (p *Provider) dropSRK() { p.srk = nil }

// disconnect flushes a transient storage root key (a TPM without a resource manager keeps it loaded across
// connections) and closes the connection.
func (p *Provider) disconnect() error {
	if p.tpm == nil {
		return nil
	}
	if p.srk != nil && !p.srk.persistent {
		flushContext(rawTPM{p.tpm}, p.srk.handle)
	}
	p.srk = nil
	err := p.tpm.Close()
	p.tpm = nil
	return err
}

// isSRKGone reports whether err means a handle no longer names a loaded object, as after a TPM reset.
func isSRKGone(err error) bool {
	return errors.Is(err, tpm2.TPMRCHandle) || errors.Is(err, tpm2.TPMRCReferenceH0) || errors.Is(err, tpm2.TPMRCInitialize)
}

// isTransient reports whether err is a TPM warning (retry, lockout, testing, out of memory): the TPM may accept
// the command later.
func isTransient(err error) bool {
	var rc tpm2.TPMRC
	return errors.As(err, &rc) && rc.IsWarning()
}

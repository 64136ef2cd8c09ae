package kleidi

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/singleflight"
)

// Envelope encrypts and decrypts data under the KEKs of a [Keyring], whose root of trust is a [Provider].
// It unwraps each KEK at most once per process (concurrent first uses share one [Provider.Unwrap]) and keeps
// it in memory; after that Encrypt and Decrypt never call the provider. An Envelope is safe for concurrent use.
//
// # Authenticity
//
// Every wrapped copy of a KEK the Envelope makes carries a proof from the provider's [Authenticator]: only a
// legitimate holder of the root of trust can make one (the OpenPGP private key, the TPM under its policy), while
// wrapping needs only public parts. Before the Envelope asks its root to unwrap a copy that did not come from its
// own keyring file (a ciphertext's attached key, stored by the KMS v2 server in etcd), it checks the copy's proof
// locally, so a party that can write etcd and knows every public key can neither make the Envelope use a KEK it
// chose nor make it call the root of trust: forged copies cost one proof check. Keyring copies are checked too
// when they carry a proof; a copy without one (a keyring written before proofs, or by a root that is not an
// Authenticator) is trusted as local state, protected by the file's owner and mode.
//
// # Bounded work
//
// Unwrapped KEKs of the keyring stay in memory; KEKs recovered from attached keys are kept up to the bound of a
// keyring (4096), oldest dropped first. A failed unwrap is remembered for a few seconds, so repeating it costs no call to the
// root. A panic of the provider during an unwrap fails that call only.
type Envelope struct {
	provider      Provider
	auth          Authenticator // nil: the provider is not one, and attached keys are never unwrapped
	ring          Keyring
	unwrapTimeout time.Duration
	createIfEmpty bool
	usageLimit    uint64
	// reloadEvery is the least time between two reloads a Decrypt of an unknown key makes (0: none); lastReload
	// is when the last one started, in Unix nanoseconds.
	reloadEvery time.Duration
	lastReload  atomic.Int64

	// Members of a keyring shared by several roots (see [Member]); node is nil unless the provider is a [Node].
	node    Node
	selfID  string                     // the node's member ID, or ""
	openers map[string]RecipientOpener // by provider name ([WithRecipientOpener])
	trust   atomic.Pointer[trust]      // what this node trusts of the keyring as last applied

	// stateMu guards state: what this node remembers of its keyring (see [NodeState]).
	stateMu sync.Mutex
	state   nodeState

	active   atomic.Pointer[activeKey]
	keys     atomic.Pointer[map[string]*kek]      // unwrapped KEKs, copy on write
	records  atomic.Pointer[map[string]KeyRecord] // the keyring as last loaded
	writeMu  sync.Mutex                           // serialises copy-on-write updates of keys, and attached
	attached []string                             // IDs of cached KEKs recovered from attached keys, oldest first
	failures failureCache
	flight   singleflight.Group
	closed   atomic.Bool

	hits, misses atomic.Uint64
	onKeyEvent   func(KeyEvent)

	// ringMu serialises what reads the keyring and switches keys (Rotate, Reload), so an older keyring never
	// replaces a newer one: the active key ID never goes back.
	ringMu sync.Mutex
}

// Bounds of the KEK cache.
const (
	// maxAttachedKeys bounds the KEKs kept in memory that are not in the keyring (recovered from attached keys).
	// Only legitimate holders make attached keys that pass the proof, so there are few: the bound is that of a
	// keyring, and cycling through more genuine keys than it holds is the only way to make a KEK unwrap twice.
	maxAttachedKeys = maxKeyRecords
	// failureTTL is how long a refused unwrap is remembered; outageTTL, one that failed because the root of
	// trust was unavailable or slow, so that its return is seen soon.
	failureTTL = 5 * time.Second
	outageTTL  = time.Second
	// maxFailures bounds the failed unwraps remembered.
	maxFailures = 1024
)

// MaxEncryptionsPerKey is the number of messages AES-256-GCM with random 96-bit nonces may encrypt under one
// key: beyond it, the chance of a repeated nonce, which would reveal the key's authentication subkey, exceeds
// 2^-32 (NIST SP 800-38D, 8.3). By default an Envelope refuses to encrypt more than half of it under one KEK in
// one process (see [WithKeyUsageLimit]), leaving the rest for other processes and restarts.
const MaxEncryptionsPerKey = 1 << 32

// activeKey is the KEK new data is encrypted with, and its attached form for [Ciphertext.AttachedKey].
type activeKey struct {
	kek      *kek
	attached []byte // nil when the provider is not an Authenticator
}

// Option configures an [Envelope].
type Option func(*Envelope) error

// WithUnwrapTimeout bounds each [Provider.Unwrap] call the Envelope makes (default 30 s). The call runs
// detached from the context of the request that caused it, because other requests may be waiting on it.
func WithUnwrapTimeout(d time.Duration) Option {
	return func(e *Envelope) error {
		if d <= 0 {
			return fmt.Errorf("kleidi: unwrap timeout %v must be positive", d)
		}
		e.unwrapTimeout = d
		return nil
	}
}

// WithCreateIfEmpty lets [NewEnvelope] start a keyring that holds no key: it generates a first KEK, wraps it and
// stores it. Without it, an empty keyring is an error wrapping [ErrInvalidKeyring], so that a keyring that was
// expected but is missing (a state volume that did not mount) is never silently replaced by a new one.
func WithCreateIfEmpty() Option {
	return func(e *Envelope) error {
		e.createIfEmpty = true
		return nil
	}
}

// WithKeyUsageLimit makes Encrypt refuse, with an error wrapping [ErrKeyExhausted], to encrypt more than n
// messages under one KEK in this process (default [MaxEncryptionsPerKey]/2). [Envelope.Stats] reports the count
// of the active KEK, so a server can rotate well before the limit.
func WithKeyUsageLimit(n uint64) Option {
	return func(e *Envelope) error {
		if n == 0 || n > MaxEncryptionsPerKey {
			return fmt.Errorf("kleidi: key usage limit %d must be 1 to %d", n, uint64(MaxEncryptionsPerKey))
		}
		e.usageLimit = n
		return nil
	}
}

// WithReloadOnUnknownKey makes Decrypt read the keyring again when a ciphertext names a key the Envelope does not
// know, at most once per minInterval, so a process sees the keys another process added (a rotation by a command
// or by another node) without calling [Envelope.Reload] itself. Without it, such a ciphertext decrypts only from its
// attached key, or fails with [ErrUnknownKey] until the next Reload.
func WithReloadOnUnknownKey(minInterval time.Duration) Option {
	return func(e *Envelope) error {
		if minInterval <= 0 {
			return fmt.Errorf("kleidi: reload interval %v must be positive", minInterval)
		}
		e.reloadEvery = minInterval
		return nil
	}
}

// WithRecipientOpener lets the Envelope wrap KEKs for members of provider's kind: tpm.OpenRecipient for other
// nodes' TPMs, gpg.OpenRecipient for an OpenPGP recovery key. A member whose provider has no opener makes
// [Envelope.Stage] and [Envelope.Enroll] fail.
func WithRecipientOpener(provider string, open RecipientOpener) Option {
	return func(e *Envelope) error {
		if err := CheckProviderName(provider); err != nil {
			return err
		}
		if open == nil {
			return errors.New("kleidi: WithRecipientOpener: nil opener")
		}
		if e.openers == nil {
			e.openers = make(map[string]RecipientOpener)
		}
		e.openers[provider] = open
		return nil
	}
}

// WithNodeState starts the Envelope with what its node remembered of the keyring at its last run ([NodeState],
// from [Envelope.NodeState]): the members it trusts, the members and keys it saw removed and retired, the
// keyring version it read. A program whose keyring others can write keeps it in its own state and passes it at
// every start; without it, the Envelope learns these from the keyring it first reads (trust on first use).
func WithNodeState(s NodeState) Option {
	return func(e *Envelope) error {
		e.state = s.toSet()
		return nil
	}
}

// KeyEvent describes a key operation of an [Envelope], for audit logs. It holds no key material.
type KeyEvent struct {
	// Op is "unwrap" (a KEK unwrapped through the provider), "rotate" (a new active KEK created by this
	// process), "activate" (a staged KEK made active), "import" (a KEK another member wrapped for this one,
	// wrapped again by this root) or "reload" (the keyring read again).
	Op string
	// KeyID is the KEK unwrapped or created, or the active KEK after a reload.
	KeyID string
	// Changed reports, for a reload, that the active KEK changed.
	Changed bool
	// Err is the error of the operation, or nil.
	Err error
	// Duration is how long the operation took.
	Duration time.Duration
}

// WithKeyEvents makes the Envelope call f after every key operation: unwrap, rotate and reload. These are
// rare; f is never called on the Encrypt or Decrypt hot path of a KEK already in memory. f must be quick and safe
// for concurrent use.
func WithKeyEvents(f func(KeyEvent)) Option {
	return func(e *Envelope) error {
		e.onKeyEvent = f
		return nil
	}
}

func (e *Envelope) keyEvent(op, id string, changed bool, err error, start time.Time) {
	if e.onKeyEvent != nil {
		e.onKeyEvent(KeyEvent{Op: op, KeyID: id, Changed: changed, Err: err, Duration: time.Since(start)})
	}
}

// NewEnvelope loads ring and unwraps its active KEK through p. An empty ring is an error unless the option
// [WithCreateIfEmpty] is given; then a first KEK is generated, wrapped with p and stored. If p is an
// [Authenticator], the Envelope proves the copies it makes and accepts attached keys with a valid proof; if not,
// it decrypts only with the KEKs of its keyring. NewEnvelope does not close p; the caller does, after
// [Envelope.Close].
func NewEnvelope(ctx context.Context, p Provider, ring Keyring, opts ...Option) (*Envelope, error) {
	if p == nil || ring == nil {
		return nil, errors.New("kleidi: NewEnvelope needs a provider and a keyring")
	}
	if err := CheckProviderName(p.Name()); err != nil {
		return nil, err
	}
	e := &Envelope{provider: p, ring: ring, unwrapTimeout: 30 * time.Second, usageLimit: MaxEncryptionsPerKey / 2, state: NodeState{}.toSet()}
	e.auth, _ = p.(Authenticator)
	for _, opt := range opts {
		if err := opt(e); err != nil {
			return nil, err
		}
	}
	e.keys.Store(&map[string]*kek{})
	e.records.Store(&map[string]KeyRecord{})
	e.trust.Store(&trust{members: map[string]*Member{}, removed: map[string]bool{}})
	if node, ok := p.(Node); ok {
		id, err := node.Identity(ctx)
		if err != nil {
			return nil, fmt.Errorf("kleidi: identity of %s: %w", p.Name(), err)
		}
		if err := id.Check(); err != nil {
			return nil, err
		}
		e.node, e.selfID = node, id.ID()
	}
	records, err := ring.Load(ctx)
	if err != nil {
		return nil, fmt.Errorf("kleidi: load keyring: %w", err)
	}
	if len(records.Keys) == 0 {
		if !e.createIfEmpty {
			return nil, fmt.Errorf("kleidi: %w: it holds no key (pass WithCreateIfEmpty to start a new one)", ErrInvalidKeyring)
		}
		if _, err := e.Rotate(ctx); err != nil {
			return nil, err
		}
		return e, nil
	}
	if err := e.apply(ctx, records); err != nil {
		return nil, err
	}
	return e, nil
}

// String describes e without any key material.
func (e *Envelope) String() string {
	return fmt.Sprintf("kleidi.Envelope{provider: %s, active: %s}", e.provider.Name(), e.KeyID())
}

// GoString is String, so %#v prints no more than %v.
func (e *Envelope) GoString() string { return e.String() }

// KeyID returns the ID of the active KEK: the key [Envelope.Encrypt] uses now.
func (e *Envelope) KeyID() string { return e.active.Load().kek.id }

// Stats counts what an Envelope did since it was created, for metrics.
type Stats struct {
	// CacheHits counts decryptions whose KEK was already in memory: the hot path.
	CacheHits uint64
	// CacheMisses counts decryptions whose KEK was not in memory, and so needed the provider (or failed).
	CacheMisses uint64
	// ActiveKeyEncryptions counts the messages the active KEK encrypted in this process.
	ActiveKeyEncryptions uint64
	// KeyUsageLimit is the most messages one KEK encrypts in this process (see [WithKeyUsageLimit]).
	KeyUsageLimit uint64
}

// Stats returns the counters of e.
func (e *Envelope) Stats() Stats {
	return Stats{CacheHits: e.hits.Load(), CacheMisses: e.misses.Load(),
		ActiveKeyEncryptions: e.active.Load().kek.uses.Load(), KeyUsageLimit: e.usageLimit}
}

// Encrypt encrypts plaintext with the active KEK (AES-256-GCM, random nonce). associatedData is authenticated
// but not encrypted; Decrypt needs the same. The result carries the attached key (the wrapped KEK and its proof)
// in [Ciphertext.AttachedKey] when the provider is an [Authenticator]. Encrypt never calls the provider.
//
// One KEK encrypts at most [MaxEncryptionsPerKey] messages safely; past the Envelope's limit (see
// [WithKeyUsageLimit]) Encrypt fails with an error wrapping [ErrKeyExhausted] until [Envelope.Rotate].
func (e *Envelope) Encrypt(ctx context.Context, plaintext, associatedData []byte) (*Ciphertext, error) {
	if len(plaintext) > MaxPlaintextSize {
		return nil, fmt.Errorf("kleidi: encrypt: plaintext of %d bytes: %w (max %d)", len(plaintext), ErrTooLarge, MaxPlaintextSize)
	}
	act := e.active.Load()
	if e.closed.Load() {
		return nil, fmt.Errorf("kleidi: encrypt: %w", ErrClosed)
	}
	if n := act.kek.uses.Add(1); n > e.usageLimit {
		act.kek.uses.Add(^uint64(0))
		return nil, fmt.Errorf("kleidi: encrypt: key %s: %w after %d messages: rotate", act.kek.id, ErrKeyExhausted, e.usageLimit)
	}
	return &Ciphertext{raw: act.kek.seal(plaintext, associatedData), keyIDLen: len(act.kek.id), AttachedKey: act.attached}, nil
}

// Decrypt authenticates and decrypts c with the KEK it names. A KEK not yet used in this process is unwrapped
// through the provider once: from the keyring, or else from c.AttachedKey, the attached key, whose proof must
// verify (else [ErrUnauthenticated], and the provider is not called) and which must unwrap to the key c names
// (else [ErrKeyMismatch]). Attached keys of format version 1, which carried no proof, are never unwrapped: a
// ciphertext that has one decrypts only while its KEK is in the keyring. A key found in neither gives
// [ErrUnknownKey]; altered data or associated data gives [ErrDecrypt]. An Envelope reads its keyring only at
// NewEnvelope and [Envelope.Reload], so a key another process added since is unknown to it until then: pass
// [WithReloadOnUnknownKey] to have Decrypt reload by itself.
func (e *Envelope) Decrypt(ctx context.Context, c *Ciphertext, associatedData []byte) ([]byte, error) {
	if c == nil || len(c.raw) == 0 {
		return nil, fmt.Errorf("kleidi: decrypt: %w: empty", ErrInvalidCiphertext)
	}
	if e.closed.Load() {
		return nil, fmt.Errorf("kleidi: decrypt: %w", ErrClosed)
	}
	k := (*e.keys.Load())[string(c.keyIDBytes())]
	if k != nil {
		e.hits.Add(1)
	} else {
		e.misses.Add(1)
		var err error
		if k, err = e.findKEK(ctx, c.KeyID(), c.AttachedKey); err != nil {
			return nil, fmt.Errorf("kleidi: decrypt: %w", err)
		}
	}
	plaintext, err := k.open(c.raw, associatedData)
	if err != nil {
		return nil, fmt.Errorf("kleidi: decrypt with key %s: %w", c.KeyID(), ErrDecrypt)
	}
	return plaintext, nil
}

// findKEK unwraps KEK id, not yet in memory, from the keyring's copies or else from the attached key.
func (e *Envelope) findKEK(ctx context.Context, id string, attached []byte) (*kek, error) {
	if e.wasForgotten(id) {
		return nil, fmt.Errorf("%w: %s was forgotten", ErrUnknownKey, id)
	}
	if _, ok := (*e.records.Load())[id]; !ok && e.mayReload() {
		if err := e.Reload(ctx); err == nil {
			if k := (*e.keys.Load())[id]; k != nil {
				return k, nil
			}
		}
	}
	if r, ok := (*e.records.Load())[id]; ok {
		own, shared, err := e.copiesFor(ctx, r, e.trust.Load().members)
		if err != nil {
			return nil, err
		}
		return e.unwrapShared(ctx, id, append(own, shared...), false)
	}
	if len(attached) == 0 {
		return nil, fmt.Errorf("%w: %s", ErrUnknownKey, id)
	}
	if e.auth == nil {
		return nil, fmt.Errorf("%w: %s is not in the keyring, and provider %s cannot authenticate the attached key",
			ErrUnknownKey, id, e.provider.Name())
	}
	blob, proof, err := parseAttachedKey(attached)
	if err != nil {
		return nil, fmt.Errorf("key %s: %w", id, err)
	}
	if err := e.auth.Verify(ctx, proofMessage(id, e.provider.Name(), blob), proof); err != nil {
		return nil, fmt.Errorf("key %s: attached key: %w", id, err)
	}
	return e.unwrapShared(ctx, id, [][]byte{blob}, true)
}

// mayReload reports whether a Decrypt of an unknown key may read the keyring now (see [WithReloadOnUnknownKey]),
// and if so takes the turn.
func (e *Envelope) mayReload() bool {
	if e.reloadEvery <= 0 {
		return false
	}
	now, last := time.Now().UnixNano(), e.lastReload.Load()
	return now-last >= int64(e.reloadEvery) && e.lastReload.CompareAndSwap(last, now)
}

// copiesFor returns the blobs of r's copies that this Envelope's root may unwrap, its own first: own, the copies
// its root made and proved (checked by [checkCopy]); shared, the copies another member made for it, whose sender
// is a trusted member and whose signature verifies. A copy that fails is skipped; with no copy left, the error
// says why.
func (e *Envelope) copiesFor(ctx context.Context, r KeyRecord, trusted map[string]*Member) (own, shared [][]byte, err error) {
	return copiesFor(ctx, r, e.provider.Name(), e.auth, e.legacyAllowed(), e.selfID, trusted)
}

// copiesFor is [Envelope.copiesFor] for root, whose Authenticator is auth and whose member ID is self; legacy
// says whether copies read from a keyring of version 1 are accepted without a proof.
func copiesFor(ctx context.Context, r KeyRecord, root string, auth Authenticator, legacy bool, self string, trusted map[string]*Member) (own, shared [][]byte, err error) {
	var errs []error
	for _, w := range r.Wrapped {
		switch {
		case w.Root != root || w.Recipient != self && w.Recipient != "":
			continue
		case w.Sender == "":
			if err := checkCopy(ctx, auth, legacy, r.ID, w); err != nil {
				errs = append(errs, err)
				continue
			}
			own = append(own, w.Blob)
		default:
			sender := trusted[w.Sender]
			if sender == nil {
				errs = append(errs, fmt.Errorf("%w: copy from %s, who is not a trusted member", ErrUnauthenticated, w.Sender))
				continue
			}
			if err := sender.Identity.Verify(sharedCopyMessage(r.ID, w.Sender, w.Recipient, w.Blob), w.Proof); err != nil {
				errs = append(errs, err)
				continue
			}
			shared = append(shared, w.Blob)
		}
	}
	if len(own)+len(shared) == 0 {
		if len(errs) > 0 {
			return nil, nil, fmt.Errorf("key %s: keyring copy: %w", r.ID, errors.Join(errs...))
		}
		return nil, nil, fmt.Errorf("key %s: %w: the keyring holds no copy for root %s", r.ID, ErrUnwrap, root)
	}
	return own, shared, nil
}

// checkCopy returns nil if w, a keyring copy of KEK id, may be unwrapped: its proof verifies with auth, or auth is
// nil (the root cannot prove), or it was read from a keyring of version 1 and legacy allows such copies.
func checkCopy(ctx context.Context, auth Authenticator, legacy bool, id string, w WrappedKey) error {
	switch {
	case auth == nil:
		return nil
	case w.Proof != nil:
		return auth.Verify(ctx, proofMessage(id, w.Root, w.Blob), w.Proof)
	case w.legacy && legacy:
		return nil
	case w.legacy:
		return fmt.Errorf("%w: a copy without a proof in a keyring of version 1, after this node read a later version", ErrUnauthenticated)
	}
	return fmt.Errorf("%w: a copy without a proof in a keyring of version %d", ErrUnauthenticated, keyringVersion)
}

// unwrapShared unwraps KEK id from blobs, unless the same unwrap failed a moment ago; concurrent calls for the
// same id share one unwrap. attached says the blobs came from an attached key, not the keyring.
func (e *Envelope) unwrapShared(ctx context.Context, id string, blobs [][]byte, attached bool) (*kek, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	key := failureKey(id, blobs)
	if err := e.failures.get(key); err != nil {
		return nil, err
	}
	ch := e.flight.DoChan(id, func() (any, error) { return e.unwrap(ctx, id, blobs, attached, key) })
	select {
	case res := <-ch:
		if res.Err != nil {
			return nil, res.Err
		}
		return res.Val.(*kek), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// unwrap recovers KEK id from the first of blobs that unwraps to it, and caches it. It runs in a flight of
// e.flight, on a goroutine no caller's recover covers: a panic of the provider becomes this unwrap's error.
func (e *Envelope) unwrap(ctx context.Context, id string, blobs [][]byte, attached bool, failure [32]byte) (k *kek, err error) {
	if k := (*e.keys.Load())[id]; k != nil {
		return k, nil // another flight finished between the caller's lookup and this one
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), e.unwrapTimeout)
	defer cancel()
	start := time.Now()
	defer func() {
		if r := recover(); r != nil {
			k, err = nil, fmt.Errorf("unwrap key %s: %w", id, providerPanic(e.provider.Name()))
		}
		if err != nil {
			e.failures.put(failure, err)
		}
		e.keyEvent("unwrap", id, false, err, start)
	}()
	raw, err := unwrapKey(ctx, e.provider, id, blobs)
	if err != nil {
		return nil, err
	}
	defer clear(raw)
	if k, err = newKEK(id, raw); err != nil {
		return nil, fmt.Errorf("key %s: %w", id, err)
	}
	e.cache(k, attached)
	return k, nil
}

// unwrapKey returns KEK id from the first of blobs that p unwraps to it. The caller zeroes the key.
func unwrapKey(ctx context.Context, p Provider, id string, blobs [][]byte) ([]byte, error) {
	var errs []error
	for _, blob := range blobs {
		key, err := p.Unwrap(ctx, blob)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !matchesKeyID(id, key) {
			clear(key)
			errs = append(errs, fmt.Errorf("%w: %s", ErrKeyMismatch, id))
			continue
		}
		return key, nil
	}
	if len(errs) == 0 {
		return nil, fmt.Errorf("unwrap key %s: %w: no copy to unwrap", id, ErrUnwrap)
	}
	return nil, fmt.Errorf("unwrap key %s: %w", id, errors.Join(errs...))
}

// cache keeps k in memory. A KEK recovered from an attached key joins the bounded set of such keys, whose oldest
// is dropped unless the keyring or the active key has it.
func (e *Envelope) cache(k *kek, attached bool) {
	e.writeMu.Lock()
	defer e.writeMu.Unlock()
	if e.closed.Load() {
		return
	}
	keys := maps.Clone(*e.keys.Load())
	keys[k.id] = k
	if attached {
		e.attached = append(e.attached, k.id)
		records := *e.records.Load()
		for len(e.attached) > maxAttachedKeys {
			old := e.attached[0]
			e.attached = e.attached[1:]
			if _, inRing := records[old]; !inRing { // the active key is always in the keyring
				delete(keys, old)
			}
		}
	}
	e.keys.Store(&keys)
}

// wrapCopy wraps key, KEK id, with p and proves the copy with p if p is an [Authenticator]. self is p's member
// ID, or "" when p is not a [Node].
func wrapCopy(ctx context.Context, p Provider, self, id string, key []byte) (WrappedKey, error) {
	blob, err := p.Wrap(ctx, key)
	if err != nil {
		return WrappedKey{}, fmt.Errorf("wrap: %w", err)
	}
	if len(blob) == 0 || len(blob) > MaxWrappedKeySize {
		return WrappedKey{}, fmt.Errorf("provider %s returned a wrapped key of %d bytes", p.Name(), len(blob))
	}
	w := WrappedKey{Root: p.Name(), Recipient: self, Blob: blob}
	if auth, ok := p.(Authenticator); ok {
		if w.Proof, err = prove(ctx, auth, p.Name(), id, blob); err != nil {
			return WrappedKey{}, err
		}
	}
	return w, nil
}

// prove returns auth's proof of a copy of KEK id wrapped by root.
func prove(ctx context.Context, auth Authenticator, root, id string, blob []byte) ([]byte, error) {
	proof, err := auth.Prove(ctx, proofMessage(id, root, blob))
	if err != nil {
		return nil, fmt.Errorf("prove: %w", err)
	}
	if len(proof) == 0 || len(proof) > MaxProofSize {
		return nil, fmt.Errorf("provider %s returned a proof of %d bytes", root, len(proof))
	}
	return proof, nil
}

// Rotate generates a new random KEK, wraps it for the provider and every trusted member of the keyring, stores it
// as the active key and starts encrypting with it: [Envelope.Stage] and [Envelope.Activate] in one step, for a
// keyring that one node uses. Older KEKs stay in the keyring, retired, and keep decrypting. It returns the new
// key ID.
func (e *Envelope) Rotate(ctx context.Context) (id string, err error) {
	e.ringMu.Lock()
	defer e.ringMu.Unlock()
	start := time.Now()
	defer func() { e.keyEvent("rotate", id, true, err, start) }()
	if id, err = e.stage(ctx); err != nil {
		return "", fmt.Errorf("kleidi: rotate: %w", err)
	}
	if err := e.activate(ctx, id); err != nil {
		return "", fmt.Errorf("kleidi: rotate: %w", err)
	}
	return id, nil
}

// proveLegacyCopies adds proofs to the copies of e's root that were read from a keyring of version 1, so that the
// keyring written next is of version 2, where every copy of an Authenticator root carries a proof.
func (e *Envelope) proveLegacyCopies(ctx context.Context, records []KeyRecord) error {
	if e.auth == nil {
		return nil
	}
	for i, r := range records {
		for j, w := range r.Wrapped {
			if w.legacy && w.Proof == nil && w.Root == e.provider.Name() {
				proof, err := prove(ctx, e.auth, w.Root, r.ID, w.Blob)
				if err != nil {
					return fmt.Errorf("key %s: %w", r.ID, err)
				}
				records[i].Wrapped[j].Proof = proof
			}
		}
	}
	return nil
}

// Reload reads the keyring again and switches to its active KEK, for a keyring that another process (a rotate
// command) changed. The new active KEK is unwrapped before the switch, so [Envelope.KeyID] and
// [Envelope.Encrypt] change together, and on error nothing changes. A KEK that another member wrapped for this
// one is imported: unwrapped, then wrapped and proved by this root, whose copy replaces it in the keyring. An
// Envelope never reloads by itself: a program whose keyring other processes change calls Reload (the KMS v2
// server does so every few seconds).
func (e *Envelope) Reload(ctx context.Context) (err error) {
	e.ringMu.Lock()
	defer e.ringMu.Unlock()
	if e.closed.Load() {
		return fmt.Errorf("kleidi: reload keyring: %w", ErrClosed)
	}
	start, before := time.Now(), e.KeyID()
	defer func() { e.keyEvent("reload", e.KeyID(), e.KeyID() != before, err, start) }()
	ring, err := e.ring.Load(ctx)
	if err != nil {
		return fmt.Errorf("kleidi: reload keyring: %w", err)
	}
	if len(ring.Keys) == 0 {
		return fmt.Errorf("kleidi: reload keyring: %w: no keys", ErrInvalidKeyring)
	}
	return e.apply(ctx, ring)
}

// apply makes ring the Envelope's keyring: it imports the KEKs other members wrapped for this one, unwraps the
// active KEK, then switches to it and to the records together. It refuses to make active a key this node saw
// retired: a keyring written back with an older key active would hand new data to the members that had it. The
// caller holds ringMu.
func (e *Envelope) apply(ctx context.Context, ring Ring) error {
	e.noteVersion(ring.Version)
	e.pinOnFirstJoin(ring)
	tr := e.trustOf(ring)
	if e.node != nil {
		var wrote bool
		var err error
		if ring, wrote, err = e.importShared(ctx, ring, tr.members); err != nil {
			return err
		}
		if wrote { // another process may have changed the members meanwhile
			tr = e.trustOf(ring)
		}
	}
	byID := make(map[string]KeyRecord, len(ring.Keys))
	var active KeyRecord
	for _, r := range ring.Keys {
		byID[r.ID] = r
		if r.State == KeyActive {
			active = r
		}
	}
	if e.wasRetired(active.ID) {
		return fmt.Errorf("kleidi: active key: %w: %s was retired: a key is never made active again", ErrInvalidKeyring, active.ID)
	}
	root := e.provider.Name()
	own, shared, err := e.copiesFor(ctx, active, tr.members)
	if err != nil {
		return fmt.Errorf("kleidi: active key: %w", err)
	}
	blobs := append(own, shared...)
	k := (*e.keys.Load())[active.ID]
	if k == nil {
		if k, err = e.unwrapShared(ctx, active.ID, blobs, false); err != nil {
			return fmt.Errorf("kleidi: active key: %w", err)
		}
	}
	var attached []byte
	if e.auth != nil && len(own) > 0 {
		proof := ownProof(active, root, own[0])
		if proof == nil { // a copy read from a keyring of version 1 (copiesFor accepts no other without a proof)
			if proof, err = prove(ctx, e.auth, root, active.ID, own[0]); err != nil {
				return fmt.Errorf("kleidi: active key %s: %w", active.ID, err)
			}
		}
		attached = encodeAttachedKey(own[0], proof)
	}
	e.remember(ring, active.ID, tr)
	e.trust.Store(&tr)
	e.records.Store(&byID)
	e.active.Store(&activeKey{kek: k, attached: attached})
	return nil
}

// ownProof returns the proof of r's copy of root whose blob is blob, or nil.
func ownProof(r KeyRecord, root string, blob []byte) []byte {
	for _, w := range r.Wrapped {
		if w.Root == root && w.Sender == "" && bytes.Equal(w.Blob, blob) {
			return w.Proof
		}
	}
	return nil
}

// Close forgets every KEK of e: later calls fail with an error wrapping [ErrClosed]. The Envelope never keeps a
// KEK's bytes (they are zeroed once its cipher is made); Close drops the ciphers, whose AES key schedules Go's
// crypto/cipher gives no way to zero, to the garbage collector. Close does not close the provider. It is
// idempotent.
func (e *Envelope) Close() error {
	e.ringMu.Lock()
	defer e.ringMu.Unlock()
	e.writeMu.Lock()
	defer e.writeMu.Unlock()
	if e.closed.Swap(true) {
		return nil
	}
	// The active key keeps its ID, for KeyID and Stats, and loses its cipher. Encrypt loads the active key before
	// it checks closed, so a call that finds this one returns ErrClosed.
	act := e.active.Load()
	e.active.Store(&activeKey{kek: &kek{id: act.kek.id, header: act.kek.header}})
	e.keys.Store(&map[string]*kek{})
	e.attached = nil
	e.failures.reset()
	return nil
}

// Rewrap wraps every KEK of ring again, for a change of root or of its configuration that keeps every key ID:
// each KEK is unwrapped through from (from a copy of root from.Name(), whose proof, if it has one, must verify
// with from) and wrapped and proved by to, whose copy replaces any copy of root to.Name(). Uses:
//   - an OpenPGP recipient added: from and to may be the same provider, configured with the new recipients;
//   - a TPM policy change (PCRs before a firmware update): from with the old policy, to with the new one;
//   - a new root beside the old one (from a gpg provider to a tpm provider): the old copies stay.
//
// Removing a recipient this way revokes nothing: every ciphertext stored before still carries a copy for it.
// Rotate instead, and re-encrypt the data. A running Envelope sees the new copies at its next [Envelope.Reload].
func Rewrap(ctx context.Context, ring Keyring, from, to Provider) error {
	if from == nil || to == nil || ring == nil {
		return errors.New("kleidi: Rewrap needs a keyring and two providers")
	}
	fromSelf, err := memberID(ctx, from)
	if err != nil {
		return fmt.Errorf("kleidi: rewrap: %w", err)
	}
	toSelf, err := memberID(ctx, to)
	if err != nil {
		return fmt.Errorf("kleidi: rewrap: %w", err)
	}
	fromAuth, _ := from.(Authenticator)
	loaded, err := ring.Load(ctx)
	if err != nil {
		return fmt.Errorf("kleidi: rewrap: %w", err)
	}
	trusted := trustedMembers(loaded, nil, fromSelf)
	rewrapped := make(map[string]WrappedKey, len(loaded.Keys))
	for _, r := range loaded.Keys {
		own, shared, err := copiesFor(ctx, r, from.Name(), fromAuth, loaded.Version == 1, fromSelf, trusted)
		if err != nil {
			return fmt.Errorf("kleidi: rewrap: %w", err)
		}
		key, err := unwrapKey(ctx, from, r.ID, append(own, shared...))
		if err != nil {
			return fmt.Errorf("kleidi: rewrap: %w", err)
		}
		w, err := wrapCopy(ctx, to, toSelf, r.ID, key)
		clear(key)
		if err != nil {
			return fmt.Errorf("kleidi: rewrap key %s: %w", r.ID, err)
		}
		rewrapped[r.ID] = w
	}
	_, err = ring.Update(ctx, func(ring *Ring) error {
		for i, r := range ring.Keys {
			w, ok := rewrapped[r.ID]
			if !ok {
				continue // added by another process meanwhile: already wrapped by its root
			}
			copies := slices.DeleteFunc(slices.Clone(r.Wrapped), func(c WrappedKey) bool {
				// to's copy replaces its earlier one, and the copy of from when both are this node's root (a policy
				// change), never another member's.
				return c.Root == w.Root && (c.Recipient == w.Recipient || c.Recipient == "" || c.Recipient == fromSelf && c.Sender == "")
			})
			ring.Keys[i].Wrapped = append([]WrappedKey{w}, copies...)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("kleidi: rewrap: %w", err)
	}
	return nil
}

// memberID returns p's member ID if p is a [Node], else "".
func memberID(ctx context.Context, p Provider) (string, error) {
	node, ok := p.(Node)
	if !ok {
		return "", nil
	}
	id, err := node.Identity(ctx)
	if err != nil {
		return "", fmt.Errorf("identity of %s: %w", p.Name(), err)
	}
	return id.ID(), nil
}

// providerPanic is the error of an unwrap whose provider panicked. The panic value is not part of it: it may hold
// what the provider was parsing.
type providerPanic string

func (p providerPanic) Error() string { return "provider " + string(p) + " panicked" }

// failureCache remembers failed unwraps for [failureTTL] ([outageTTL] for an outage or a panic), at most [maxFailures] of them, so that a request
// repeated in a flood costs no call to the root of trust.
type failureCache struct {
	mu sync.Mutex
	m  map[[32]byte]failure
}

type failure struct {
	err   error
	until time.Time
}

// failureKey identifies an unwrap: the key ID and every blob tried.
func failureKey(id string, blobs [][]byte) [32]byte {
	h := sha256.New()
	h.Write([]byte(id))
	for _, b := range blobs {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	return [32]byte(h.Sum(nil))
}

func (c *failureCache) get(key [32]byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	f, ok := c.m[key]
	if !ok {
		return nil
	}
	if time.Now().After(f.until) {
		delete(c.m, key)
		return nil
	}
	return f.err
}

func (c *failureCache) put(key [32]byte, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = make(map[[32]byte]failure)
	}
	now := time.Now()
	if len(c.m) >= maxFailures {
		for k, f := range c.m {
			if now.After(f.until) || len(c.m) >= maxFailures {
				delete(c.m, k) // expired ones first; then any, as the map's order gives them
			}
		}
	}
	ttl := failureTTL
	var panicked providerPanic
	if errors.Is(err, ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) ||
		errors.As(err, &panicked) {
		ttl = outageTTL
	}
	c.m[key] = failure{err: err, until: now.Add(ttl)}
}

func (c *failureCache) reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m = nil
}

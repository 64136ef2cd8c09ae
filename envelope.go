package kleidi

import (
	"context"
	"crypto/rand"
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
type Envelope struct {
	provider      Provider
	ring          Keyring
	unwrapTimeout time.Duration
	createIfEmpty bool

	active  atomic.Pointer[activeKey]
	keys    atomic.Pointer[map[string]*kek]      // unwrapped KEKs, copy on write
	records atomic.Pointer[map[string]KeyRecord] // the keyring as last loaded
	writeMu sync.Mutex                           // serialises copy-on-write updates of keys
	flight  singleflight.Group

	hits, misses atomic.Uint64
	onKeyEvent   func(KeyEvent)

	// ringMu serialises what reads the keyring and switches keys (Rotate, Reload, Rewrap), so an older
	// keyring never replaces a newer one: the active key ID never goes back.
	ringMu sync.Mutex
}

// activeKey is the KEK new data is encrypted with, and its wrapped form for [Ciphertext.WrappedKey].
type activeKey struct {
	kek     *kek
	wrapped []byte
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

// KeyEvent describes a key operation of an [Envelope], for audit logs. It holds no key material.
type KeyEvent struct {
	// Op is "unwrap" (a KEK unwrapped through the provider), "rotate" (a new active KEK created by this
	// process), "reload" (the keyring read again) or "rewrap".
	Op string
	// KeyID is the KEK unwrapped or created, or the active KEK after a reload or rewrap.
	KeyID string
	// Changed reports, for a reload, that the active KEK changed.
	Changed bool
	// Err is the error of the operation, or nil.
	Err error
	// Duration is how long the operation took.
	Duration time.Duration
}

// WithKeyEvents makes the Envelope call f after every key operation: unwrap, rotate, reload and rewrap. These are
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
// [WithCreateIfEmpty] is given; then a first KEK is generated, wrapped with p and stored. NewEnvelope does not
// close p; the caller does, after it is done with the Envelope.
func NewEnvelope(ctx context.Context, p Provider, ring Keyring, opts ...Option) (*Envelope, error) {
	if p == nil || ring == nil {
		return nil, errors.New("kleidi: NewEnvelope needs a provider and a keyring")
	}
	if err := CheckProviderName(p.Name()); err != nil {
		return nil, err
	}
	e := &Envelope{provider: p, ring: ring, unwrapTimeout: 30 * time.Second}
	for _, opt := range opts {
		if err := opt(e); err != nil {
			return nil, err
		}
	}
	e.keys.Store(&map[string]*kek{})
	e.records.Store(&map[string]KeyRecord{})
	records, err := ring.Load(ctx)
	if err != nil {
		return nil, fmt.Errorf("kleidi: load keyring: %w", err)
	}
	if len(records) == 0 {
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
}

// Stats returns the counters of e.
func (e *Envelope) Stats() Stats {
	return Stats{CacheHits: e.hits.Load(), CacheMisses: e.misses.Load()}
}

// Encrypt encrypts plaintext with the active KEK (AES-256-GCM, random nonce). associatedData is authenticated
// but not encrypted; Decrypt needs the same. The result carries the wrapped KEK in [Ciphertext.WrappedKey].
// Encrypt never calls the provider.
func (e *Envelope) Encrypt(ctx context.Context, plaintext, associatedData []byte) (*Ciphertext, error) {
	if len(plaintext) > MaxPlaintextSize {
		return nil, fmt.Errorf("kleidi: encrypt: plaintext of %d bytes: %w (max %d)", len(plaintext), ErrTooLarge, MaxPlaintextSize)
	}
	act := e.active.Load()
	return &Ciphertext{raw: act.kek.seal(plaintext, associatedData), keyIDLen: len(act.kek.id), WrappedKey: act.wrapped}, nil
}

// Decrypt authenticates and decrypts c with the KEK it names. A KEK not yet used in this process is unwrapped
// through the provider once: from the keyring, or else from c.WrappedKey, which is refused with [ErrKeyMismatch]
// unless it unwraps to the key c names. A key found in neither gives [ErrUnknownKey]; altered data or
// associated data gives [ErrDecrypt].
func (e *Envelope) Decrypt(ctx context.Context, c *Ciphertext, associatedData []byte) ([]byte, error) {
	if c == nil || len(c.raw) == 0 {
		return nil, fmt.Errorf("kleidi: decrypt: %w: empty", ErrInvalidCiphertext)
	}
	k := (*e.keys.Load())[string(c.keyIDBytes())]
	if k != nil {
		e.hits.Add(1)
	} else {
		e.misses.Add(1)
		var err error
		if k, err = e.kek(ctx, c.KeyID(), c.WrappedKey); err != nil {
			return nil, fmt.Errorf("kleidi: decrypt: %w", err)
		}
	}
	plaintext, err := k.open(c.raw, associatedData)
	if err != nil {
		return nil, fmt.Errorf("kleidi: decrypt with key %s: %w", c.KeyID(), ErrDecrypt)
	}
	return plaintext, nil
}

// kek unwraps KEK id, not yet in use in this process, from the keyring's copies or else the attached one.
func (e *Envelope) kek(ctx context.Context, id string, attached []byte) (*kek, error) {
	var blobs [][]byte
	if r, ok := (*e.records.Load())[id]; ok {
		blobs = wrappedBlobs(r, e.provider.Name())
	}
	if len(attached) > 0 {
		blobs = append(blobs, attached)
	}
	if len(blobs) == 0 {
		return nil, fmt.Errorf("%w: %s", ErrUnknownKey, id)
	}
	return e.unwrapShared(ctx, id, blobs)
}

// unwrapShared unwraps KEK id from blobs; concurrent calls for the same id share one unwrap.
func (e *Envelope) unwrapShared(ctx context.Context, id string, blobs [][]byte) (*kek, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ch := e.flight.DoChan(id, func() (any, error) { return e.unwrap(ctx, id, blobs) })
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

// wrappedBlobs returns the wrapped copies of r, those of the root named first first.
func wrappedBlobs(r KeyRecord, first string) [][]byte {
	blobs := make([][]byte, 0, len(r.Wrapped))
	for _, w := range r.Wrapped {
		if w.Root == first {
			blobs = append([][]byte{w.Blob}, blobs...)
		} else {
			blobs = append(blobs, w.Blob)
		}
	}
	return blobs
}

// unwrap recovers KEK id from the first of blobs that unwraps to it, and caches it.
func (e *Envelope) unwrap(ctx context.Context, id string, blobs [][]byte) (*kek, error) {
	if k := (*e.keys.Load())[id]; k != nil {
		return k, nil // another flight finished between the caller's lookup and this one
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), e.unwrapTimeout)
	defer cancel()
	start := time.Now()
	k, err := e.unwrapFirst(ctx, id, blobs)
	e.keyEvent("unwrap", id, false, err, start)
	return k, err
}

// unwrapFirst recovers KEK id from the first of blobs that unwraps to it, and caches it.
func (e *Envelope) unwrapFirst(ctx context.Context, id string, blobs [][]byte) (*kek, error) {
	var errs []error
	for _, blob := range blobs {
		key, err := e.provider.Unwrap(ctx, blob)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !matchesKeyID(id, key) {
			clear(key)
			errs = append(errs, fmt.Errorf("%w: %s", ErrKeyMismatch, id))
			continue
		}
		k, err := newKEK(id, key)
		clear(key)
		if err != nil {
			return nil, fmt.Errorf("key %s: %w", id, err)
		}
		e.cache(k)
		return k, nil
	}
	return nil, fmt.Errorf("unwrap key %s: %w", id, errors.Join(errs...))
}

func (e *Envelope) cache(k *kek) {
	e.writeMu.Lock()
	defer e.writeMu.Unlock()
	keys := maps.Clone(*e.keys.Load())
	keys[k.id] = k
	e.keys.Store(&keys)
}

// Rotate generates a new random KEK, wraps it with the provider, stores it in the keyring as the active key
// and starts encrypting with it. Older KEKs stay in the keyring, retired, and keep decrypting.
// It returns the new key ID.
func (e *Envelope) Rotate(ctx context.Context) (id string, err error) {
	e.ringMu.Lock()
	defer e.ringMu.Unlock()
	start := time.Now()
	defer func() { e.keyEvent("rotate", id, true, err, start) }()
	key := make([]byte, KeySize)
	defer clear(key)
	if _, err := rand.Read(key); err != nil {
		return "", fmt.Errorf("kleidi: rotate: %w", err)
	}
	id = keyIDFor(e.provider.Name(), key)
	k, err := newKEK(id, key)
	if err != nil {
		return "", fmt.Errorf("kleidi: rotate: %w", err)
	}
	blob, err := e.provider.Wrap(ctx, key)
	if err != nil {
		return "", fmt.Errorf("kleidi: rotate: wrap: %w", err)
	}
	if len(blob) == 0 || len(blob) > MaxWrappedKeySize {
		return "", fmt.Errorf("kleidi: rotate: provider %s returned a wrapped key of %d bytes", e.provider.Name(), len(blob))
	}
	records, err := e.ring.Update(ctx, func(records []KeyRecord) ([]KeyRecord, error) {
		for i := range records {
			if records[i].ID == id {
				return nil, fmt.Errorf("key %s exists already", id) // 2^-160: a broken random source
			}
			records[i].State = KeyRetired
		}
		return append(records, KeyRecord{
			ID:      id,
			Created: time.Now().UTC().Truncate(time.Second),
			State:   KeyActive,
			Wrapped: []WrappedKey{{Root: e.provider.Name(), Blob: blob}},
		}), nil
	})
	if err != nil {
		return "", fmt.Errorf("kleidi: rotate: %w", err)
	}
	e.cache(k)
	if err := e.apply(ctx, records); err != nil {
		return "", fmt.Errorf("kleidi: rotate: %w", err)
	}
	return id, nil
}

// Reload reads the keyring again and switches to its active KEK, for a keyring that another process (a rotate
// command) changed. The new active KEK is unwrapped before the switch, so [Envelope.KeyID] and
// [Envelope.Encrypt] change together, and on error nothing changes.
func (e *Envelope) Reload(ctx context.Context) (err error) {
	e.ringMu.Lock()
	defer e.ringMu.Unlock()
	start, before := time.Now(), e.KeyID()
	defer func() { e.keyEvent("reload", e.KeyID(), e.KeyID() != before, err, start) }()
	records, err := e.ring.Load(ctx)
	if err != nil {
		return fmt.Errorf("kleidi: reload keyring: %w", err)
	}
	if len(records) == 0 {
		return fmt.Errorf("kleidi: reload keyring: %w: no keys", ErrInvalidKeyring)
	}
	return e.apply(ctx, records)
}

// apply makes records the Envelope's keyring: it unwraps their active KEK, then switches to it and to the
// records together. The caller holds ringMu.
func (e *Envelope) apply(ctx context.Context, records []KeyRecord) error {
	byID := make(map[string]KeyRecord, len(records))
	var active KeyRecord
	for _, r := range records {
		byID[r.ID] = r
		if r.State == KeyActive {
			active = r
		}
	}
	blobs := wrappedBlobs(active, e.provider.Name())
	k := (*e.keys.Load())[active.ID]
	if k == nil {
		var err error
		if k, err = e.unwrapShared(ctx, active.ID, blobs); err != nil {
			return fmt.Errorf("kleidi: active key: %w", err)
		}
	}
	e.records.Store(&byID)
	e.active.Store(&activeKey{kek: k, wrapped: blobs[0]})
	return nil
}

// Rewrap wraps every KEK of the keyring again with the provider and replaces the copy of the provider's root,
// keeping every key ID. Use it after a change of the root of trust that keeps its name, such as adding an
// OpenPGP recipient: each KEK is unwrapped with the old configuration's copy and wrapped for the new one.
func (e *Envelope) Rewrap(ctx context.Context) (err error) {
	e.ringMu.Lock()
	defer e.ringMu.Unlock()
	start := time.Now()
	defer func() { e.keyEvent("rewrap", e.KeyID(), false, err, start) }()
	records, err := e.ring.Load(ctx)
	if err != nil {
		return fmt.Errorf("kleidi: rewrap: %w", err)
	}
	root := e.provider.Name()
	rewrapped := make(map[string][]byte, len(records))
	for _, r := range records {
		blob, err := e.rewrapOne(ctx, r)
		if err != nil {
			return fmt.Errorf("kleidi: rewrap key %s: %w", r.ID, err)
		}
		rewrapped[r.ID] = blob
	}
	records, err = e.ring.Update(ctx, func(records []KeyRecord) ([]KeyRecord, error) {
		for i, r := range records {
			blob, ok := rewrapped[r.ID]
			if !ok {
				continue // added by another process meanwhile: already wrapped by its root
			}
			copies := slices.DeleteFunc(slices.Clone(r.Wrapped), func(w WrappedKey) bool { return w.Root == root })
			records[i].Wrapped = append([]WrappedKey{{Root: root, Blob: blob}}, copies...)
		}
		return records, nil
	})
	if err != nil {
		return fmt.Errorf("kleidi: rewrap: %w", err)
	}
	return e.apply(ctx, records)
}

// rewrapOne unwraps one KEK through the provider and wraps it again.
func (e *Envelope) rewrapOne(ctx context.Context, r KeyRecord) ([]byte, error) {
	var errs []error
	for _, blob := range wrappedBlobs(r, e.provider.Name()) {
		key, err := e.provider.Unwrap(ctx, blob)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		defer clear(key)
		if !matchesKeyID(r.ID, key) {
			return nil, ErrKeyMismatch
		}
		return e.provider.Wrap(ctx, key)
	}
	return nil, errors.Join(errs...)
}

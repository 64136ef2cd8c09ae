package kleidi

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"
)

// Stage generates a new random KEK, wraps it for the provider and for every trusted member of the keyring, and
// stores it as a staged key: every member can unwrap it, none encrypts with it yet. It returns the new key ID.
// With several nodes, distribute the keyring, then [Envelope.Activate] the key on each node: a node never
// encrypts with a key that the others cannot read yet.
func (e *Envelope) Stage(ctx context.Context) (string, error) {
	e.ringMu.Lock()
	defer e.ringMu.Unlock()
	id, err := e.stage(ctx)
	if err != nil {
		return "", fmt.Errorf("kleidi: stage: %w", err)
	}
	return id, nil
}

// stage is Stage; the caller holds ringMu.
func (e *Envelope) stage(ctx context.Context) (string, error) {
	if e.closed.Load() {
		return "", ErrClosed
	}
	key := make([]byte, KeySize)
	defer clear(key)
	if _, err := rand.Read(key); err != nil {
		return "", err
	}
	id := keyIDFor(e.provider.Name(), key)
	k, err := newKEK(id, key)
	if err != nil {
		return "", err
	}
	ring, err := e.ring.Load(ctx)
	if err != nil {
		return "", err
	}
	copies, err := e.wrapForMembers(ctx, ring, id, key)
	if err != nil {
		return "", err
	}
	_, err = e.ring.Update(ctx, func(now *Ring) error {
		for _, r := range now.Keys {
			if r.ID == id {
				return fmt.Errorf("key %s exists already", id) // 2^-160: a broken random source
			}
		}
		for _, m := range now.Members {
			if !slices.ContainsFunc(ring.Members, func(x Member) bool { return x.ID == m.ID }) {
				return fmt.Errorf("member %s joined while the key was wrapped: run it again", m.ID)
			}
		}
		ring := now
		if err := e.proveLegacyCopies(ctx, ring.Keys); err != nil {
			return err
		}
		state := KeyStaged
		if len(ring.Keys) == 0 {
			state = KeyActive // a keyring's first key: nothing reads it yet, and a keyring has an active key
		}
		ring.Keys = append(ring.Keys, KeyRecord{ID: id, Created: time.Now().UTC().Truncate(time.Second), State: state, Wrapped: copies})
		return nil
	})
	if err != nil {
		return "", err
	}
	e.cache(k, false)
	return id, nil
}

// wrapForMembers wraps key, KEK id, for the provider and for every member of ring that this node trusts. Each
// copy for another member is signed by this node.
func (e *Envelope) wrapForMembers(ctx context.Context, ring Ring, id string, key []byte) ([]WrappedKey, error) {
	own, err := wrapCopy(ctx, e.provider, e.selfID, id, key)
	if err != nil {
		return nil, err
	}
	copies := []WrappedKey{own}
	trusted := e.trustOf(ring).members
	for _, m := range ring.Members {
		if m.ID == e.selfID || trusted[m.ID] == nil {
			continue // an untrusted member gets nothing: only a trusted member's endorsement makes a member
		}
		w, err := e.wrapFor(ctx, &m.Identity, id, key)
		if err != nil {
			return nil, err
		}
		copies = append(copies, w)
	}
	return copies, nil
}

// wrapFor wraps key, KEK id, for the member of identity to, and signs the copy.
func (e *Envelope) wrapFor(ctx context.Context, to *Identity, id string, key []byte) (WrappedKey, error) {
	if e.node == nil {
		return WrappedKey{}, fmt.Errorf("provider %s cannot wrap for other members: it is not a kleidi.Node", e.provider.Name())
	}
	open := e.openers[to.Provider]
	if open == nil {
		return WrappedKey{}, fmt.Errorf("no recipient opener for provider %s (member %s)", to.Provider, to.ID())
	}
	rcpt, err := open(to)
	if err != nil {
		return WrappedKey{}, fmt.Errorf("member %s: %w", to.ID(), err)
	}
	blob, err := rcpt.Wrap(ctx, key)
	if err != nil {
		return WrappedKey{}, fmt.Errorf("wrap for member %s: %w", to.ID(), err)
	}
	if len(blob) == 0 || len(blob) > MaxWrappedKeySize {
		return WrappedKey{}, fmt.Errorf("recipient %s returned a wrapped key of %d bytes", to.ID(), len(blob))
	}
	sig, err := e.sign(ctx, sharedCopyMessage(id, e.selfID, to.ID(), blob))
	if err != nil {
		return WrappedKey{}, err
	}
	return WrappedKey{Root: to.Provider, Recipient: to.ID(), Sender: e.selfID, Blob: blob, Proof: sig}, nil
}

func (e *Envelope) sign(ctx context.Context, message []byte) ([]byte, error) {
	sig, err := e.node.Sign(ctx, message)
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	if len(sig) == 0 || len(sig) > MaxSignatureSize {
		return nil, fmt.Errorf("provider %s returned a signature of %d bytes", e.provider.Name(), len(sig))
	}
	return sig, nil
}

// Activate makes the staged KEK id the active key of the keyring and starts encrypting with it. It refuses a key
// this node cannot unwrap, and a retired key: key IDs are never reused. A key that is active already is kept.
func (e *Envelope) Activate(ctx context.Context, id string) (err error) {
	e.ringMu.Lock()
	defer e.ringMu.Unlock()
	start := time.Now()
	defer func() { e.keyEvent("activate", id, err == nil, err, start) }()
	if err := e.activate(ctx, id); err != nil {
		return fmt.Errorf("kleidi: activate %s: %w", id, err)
	}
	return nil
}

// activate is Activate; the caller holds ringMu.
func (e *Envelope) activate(ctx context.Context, id string) error {
	if e.closed.Load() {
		return ErrClosed
	}
	ring, err := e.ring.Load(ctx)
	if err != nil {
		return err
	}
	i := slices.IndexFunc(ring.Keys, func(r KeyRecord) bool { return r.ID == id })
	if i < 0 {
		return fmt.Errorf("%w: %s is not in the keyring", ErrUnknownKey, id)
	}
	if ring.Keys[i].State == KeyRetired || e.wasRetired(id) {
		return fmt.Errorf("key %s is retired: key IDs are never reused; stage a new key", id)
	}
	for _, m := range sortedIDs(e.trustOf(ring).members) {
		if !slices.ContainsFunc(ring.Keys[i].Wrapped, func(w WrappedKey) bool { return w.Recipient == m }) {
			return fmt.Errorf("key %s is not wrapped for member %s: every member must hold a key before any encrypts with it; stage it again", id, m)
		}
	}
	if (*e.keys.Load())[id] == nil {
		own, shared, err := e.copiesFor(ctx, ring.Keys[i], e.trustOf(ring).members)
		if err != nil {
			return fmt.Errorf("this node cannot unwrap it: %w", err)
		}
		if _, err := e.unwrapShared(ctx, id, append(own, shared...), false); err != nil {
			return fmt.Errorf("this node cannot unwrap it: %w", err)
		}
	}
	ring, err = e.ring.Update(ctx, func(ring *Ring) error {
		found := false
		for i := range ring.Keys {
			switch {
			case ring.Keys[i].ID == id && ring.Keys[i].State == KeyRetired:
				return fmt.Errorf("key %s was retired meanwhile", id)
			case ring.Keys[i].ID == id:
				ring.Keys[i].State, found = KeyActive, true
			case ring.Keys[i].State == KeyActive:
				ring.Keys[i].State = KeyRetired
			}
		}
		if !found {
			return fmt.Errorf("%w: %s left the keyring meanwhile", ErrUnknownKey, id)
		}
		return e.proveLegacyCopies(ctx, ring.Keys)
	})
	if err != nil {
		return err
	}
	return e.apply(ctx, ring)
}

// importShared makes this node's own copy of every KEK of ring that another member wrapped for it and that it
// has no own copy of: it unwraps the shared copy (whose sender's signature copiesFor checked), wraps the key with
// its root and proves it, and stores that copy in place of the shared one, so later starts unwrap from a copy
// of the node's own making (a TPM's own storage key and policy). A key it cannot import is left as it is; the
// error of the active key's import is the caller's to see. It reports whether it wrote the keyring. The caller
// holds ringMu.
func (e *Envelope) importShared(ctx context.Context, ring Ring, trusted map[string]*Member) (Ring, bool, error) {
	imported := make(map[string]WrappedKey)
	for _, r := range ring.Keys {
		own, shared, err := e.copiesFor(ctx, r, trusted)
		if err != nil || len(own) > 0 || len(shared) == 0 {
			continue
		}
		w, err := e.importKey(ctx, r.ID, shared)
		if err != nil {
			continue // importKey reported it
		}
		imported[r.ID] = w
	}
	if len(imported) == 0 {
		return ring, false, nil
	}
	ring, err := e.ring.Update(ctx, func(ring *Ring) error {
		for i, r := range ring.Keys {
			w, ok := imported[r.ID]
			if !ok {
				continue
			}
			copies := slices.DeleteFunc(slices.Clone(r.Wrapped), func(c WrappedKey) bool { return c.Recipient == e.selfID })
			ring.Keys[i].Wrapped = append([]WrappedKey{w}, copies...)
		}
		return nil
	})
	return ring, err == nil, err
}

// importKey unwraps KEK id from shared copies, keeps it in memory, and returns this node's own copy of it.
func (e *Envelope) importKey(ctx context.Context, id string, shared [][]byte) (w WrappedKey, err error) {
	start := time.Now()
	defer func() { e.keyEvent("import", id, true, err, start) }()
	key, err := unwrapKey(ctx, e.provider, id, shared)
	if err != nil {
		return WrappedKey{}, err
	}
	defer clear(key)
	k, err := newKEK(id, key)
	if err != nil {
		return WrappedKey{}, err
	}
	if w, err = wrapCopy(ctx, e.provider, e.selfID, id, key); err != nil {
		return WrappedKey{}, err
	}
	e.cache(k, false)
	return w, nil
}

// Enroll makes the root of identity a member of the keyring: this node endorses it, wraps every KEK of the
// keyring for it, and every later [Envelope.Stage] does too. The new member's node starts with a copy of the
// keyring and imports its copies ([Envelope.Reload]); it trusts the members that endorsed it
// ([Ring.Endorsers]). This node becomes a member too if it was not. Enrolling a member again wraps any KEK it
// lacks. It returns the member ID.
func (e *Envelope) Enroll(ctx context.Context, identity *Identity) (string, error) {
	e.ringMu.Lock()
	defer e.ringMu.Unlock()
	id, err := e.enroll(ctx, identity)
	if err != nil {
		return "", fmt.Errorf("kleidi: enroll: %w", err)
	}
	return id, nil
}

func (e *Envelope) enroll(ctx context.Context, identity *Identity) (string, error) {
	if e.closed.Load() {
		return "", ErrClosed
	}
	if e.node == nil {
		return "", fmt.Errorf("provider %s cannot have other members: it is not a kleidi.Node", e.provider.Name())
	}
	if err := identity.Check(); err != nil {
		return "", err
	}
	memberID := identity.ID()
	ring, err := e.ring.Load(ctx)
	if err != nil {
		return "", err
	}
	self, err := e.node.Identity(ctx)
	if err != nil {
		return "", err
	}
	now := time.Now().UTC().Truncate(time.Second)
	endorse := func(id *Identity) (Member, error) {
		sig, err := e.sign(ctx, endorsementMessage(e.selfID, id.ID()))
		if err != nil {
			return Member{}, err
		}
		return Member{ID: id.ID(), Identity: *id, Added: now, Endorser: e.selfID, Endorsement: sig}, nil
	}
	// An entry this node does not trust (planted, or endorsed by someone it does not know) is replaced by its own
	// endorsement, so the new node pins this node, not whoever wrote the entry.
	trusted := e.trustOf(ring).members
	var add []Member
	for _, id := range []*Identity{self, identity} {
		if trusted[id.ID()] == nil {
			m, err := endorse(id)
			if err != nil {
				return "", err
			}
			add = append(add, m)
		}
	}
	// Every KEK, retired ones too (they decrypt stored data), gets a copy for the new member.
	copies := make(map[string]WrappedKey)
	for _, r := range ring.Keys {
		if memberID == e.selfID || slices.ContainsFunc(r.Wrapped, func(w WrappedKey) bool { return w.Recipient == memberID }) {
			continue
		}
		own, shared, err := e.copiesFor(ctx, r, trusted)
		if err != nil {
			return "", err
		}
		key, err := unwrapKey(ctx, e.provider, r.ID, append(own, shared...))
		if err != nil {
			return "", err
		}
		w, err := e.wrapFor(ctx, identity, r.ID, key)
		clear(key)
		if err != nil {
			return "", err
		}
		copies[r.ID] = w
	}
	ring, err = e.ring.Update(ctx, func(ring *Ring) error {
		for _, m := range add {
			ring.Members = slices.DeleteFunc(ring.Members, func(x Member) bool { return x.ID == m.ID })
			ring.Members = append(ring.Members, m)
		}
		for i, r := range ring.Keys {
			if w, ok := copies[r.ID]; ok && !slices.ContainsFunc(r.Wrapped, func(x WrappedKey) bool { return x.Recipient == memberID }) {
				ring.Keys[i].Wrapped = append(ring.Keys[i].Wrapped, w)
			}
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	return memberID, e.apply(ctx, ring)
}

// Unenroll removes member id from the keyring: its copies and its membership, and the endorsements it made pass
// to this node. Its root could still unwrap the copies it had, so Unenroll then rotates (a new active KEK that
// it never receives): re-encrypt the stored data afterwards. It returns the new key ID. A node cannot unenroll
// itself.
func (e *Envelope) Unenroll(ctx context.Context, id string) (string, error) {
	e.ringMu.Lock()
	defer e.ringMu.Unlock()
	if e.closed.Load() {
		return "", fmt.Errorf("kleidi: unenroll: %w", ErrClosed)
	}
	if id == e.selfID {
		return "", errors.New("kleidi: unenroll: a node cannot unenroll itself: run unenroll on another member")
	}
	ring, err := e.ring.Load(ctx)
	if err != nil {
		return "", fmt.Errorf("kleidi: unenroll: %w", err)
	}
	if !slices.ContainsFunc(ring.Members, func(m Member) bool { return m.ID == id }) {
		return "", fmt.Errorf("kleidi: unenroll: %s is not a member", id)
	}
	// The trusted members it endorsed are endorsed again by this node, so that other nodes keep trusting them;
	// an entry that only claims to be endorsed by it gets nothing.
	trusted := e.trustOf(ring).members
	reendorse := make(map[string][]byte)
	for _, m := range ring.Members {
		if m.Endorser == id && m.ID != id && trusted[m.ID] != nil {
			sig, err := e.sign(ctx, endorsementMessage(e.selfID, m.ID))
			if err != nil {
				return "", fmt.Errorf("kleidi: unenroll: %w", err)
			}
			reendorse[m.ID] = sig
		}
	}
	removal, err := e.sign(ctx, removalMessage(e.selfID, id))
	if err != nil {
		return "", fmt.Errorf("kleidi: unenroll: %w", err)
	}
	_, err = e.ring.Update(ctx, func(ring *Ring) error {
		ring.Members = slices.DeleteFunc(ring.Members, func(m Member) bool { return m.ID == id })
		ring.Removed = append(ring.Removed, Removal{ID: id, Removed: time.Now().UTC().Truncate(time.Second), By: e.selfID, Signature: removal})
		for i := range ring.Members {
			if sig, ok := reendorse[ring.Members[i].ID]; ok {
				ring.Members[i].Endorser, ring.Members[i].Endorsement = e.selfID, sig
			}
		}
		for i := range ring.Keys {
			ring.Keys[i].Wrapped = slices.DeleteFunc(ring.Keys[i].Wrapped, func(w WrappedKey) bool { return w.Recipient == id })
			if len(ring.Keys[i].Wrapped) == 0 {
				return fmt.Errorf("key %s would keep no copy", ring.Keys[i].ID)
			}
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("kleidi: unenroll: %w", err)
	}
	newID, err := e.stage(ctx)
	if err != nil {
		return "", fmt.Errorf("kleidi: unenroll: rotate: %w", err)
	}
	if err := e.activate(ctx, newID); err != nil {
		return "", fmt.Errorf("kleidi: unenroll: rotate: %w", err)
	}
	return newID, nil
}

// MemberID returns this node's member ID ([Identity.ID] of its provider), or "" when the provider is not a
// [Node].
func (e *Envelope) MemberID() string { return e.selfID }

// Endorsers returns the IDs of the members that endorsed member id, in turn, nearest first, up to the first
// member that endorsed itself, following only endorsements whose signatures verify: the members a new node
// trusts when it first starts with the keyring handed to it (trust on first use; see [NodeState]).
func (r Ring) Endorsers(id string) []string {
	byID := make(map[string]*Member, len(r.Members))
	for i := range r.Members {
		byID[r.Members[i].ID] = &r.Members[i]
	}
	var chain []string
	for m := byID[id]; m != nil && m.Endorser != m.ID && !slices.Contains(chain, m.Endorser); {
		by := byID[m.Endorser]
		if by == nil || by.Identity.Verify(endorsementMessage(by.ID, m.ID), m.Endorsement) != nil {
			return chain
		}
		chain = append(chain, by.ID)
		m = by
	}
	return chain
}

// Recover rebuilds ring for the root of trust to, a node's new or cleared TPM, from the copies the keyring holds
// for the recovery member whose identity is recoveryID and whose private part recovery holds (an OpenPGP
// provider opened with the offline recovery key). It believes only copies signed by a member that trusted (member
// IDs: what a lost node trusted, from a backup of its [NodeState], or the IDs its operators recorded) reach through
// endorsements: a keyring file carries whatever anyone wrote into it. Every KEK is unwrapped through recovery,
// checked against its key ID, and wrapped again for to and for the recovery member; the members become to and the
// recovery member, key states stay as they were. A retired KEK with no such copy is left out and named in the
// error, after the rest is recovered; the active one must have one. Enroll the other nodes again afterwards. open
// is the recovery member's [RecipientOpener].
func Recover(ctx context.Context, ring Keyring, recovery Provider, recoveryID *Identity, open RecipientOpener, to Provider, trusted ...string) error {
	if recoveryID == nil || open == nil || recovery == nil || ring == nil {
		return errors.New("kleidi: Recover needs a keyring, the recovery provider, its identity and opener")
	}
	if len(trusted) == 0 {
		return errors.New("kleidi: recover: no trusted member given: name the members whose copies to believe")
	}
	node, ok := to.(Node)
	if !ok {
		return fmt.Errorf("kleidi: recover: provider %s is not a kleidi.Node", to.Name())
	}
	self, err := node.Identity(ctx)
	if err != nil {
		return fmt.Errorf("kleidi: recover: %w", err)
	}
	e := &Envelope{provider: to, node: node, selfID: self.ID(), openers: map[string]RecipientOpener{recoveryID.Provider: open}}
	loaded, err := ring.Load(ctx)
	if err != nil {
		return fmt.Errorf("kleidi: recover: %w", err)
	}
	members := trustOf(loaded, trusted, nil).members
	recID := recoveryID.ID()
	keys := make([]KeyRecord, 0, len(loaded.Keys))
	var skipped []error
	for _, r := range loaded.Keys {
		_, shared, err := copiesFor(ctx, r, recovery.Name(), nil, false, recID, members)
		if err == nil && len(shared) == 0 {
			err = fmt.Errorf("key %s: %w: no copy for the recovery key signed by a trusted member", r.ID, ErrUnauthenticated)
		}
		var key []byte
		if err == nil {
			key, err = unwrapKey(ctx, recovery, r.ID, shared)
		}
		if err != nil {
			if r.State == KeyActive {
				return fmt.Errorf("kleidi: recover: active %w", err)
			}
			skipped = append(skipped, err)
			continue
		}
		own, err := wrapCopy(ctx, to, e.selfID, r.ID, key)
		if err != nil {
			clear(key)
			return fmt.Errorf("kleidi: recover: key %s: %w", r.ID, err)
		}
		rc, err := e.wrapFor(ctx, recoveryID, r.ID, key)
		clear(key)
		if err != nil {
			return fmt.Errorf("kleidi: recover: key %s: %w", r.ID, err)
		}
		keys = append(keys, KeyRecord{ID: r.ID, Created: r.Created, State: r.State, Wrapped: []WrappedKey{own, rc}})
	}
	now := time.Now().UTC().Truncate(time.Second)
	var newMembers []Member
	for _, id := range []*Identity{self, recoveryID} {
		sig, err := e.sign(ctx, endorsementMessage(e.selfID, id.ID()))
		if err != nil {
			return fmt.Errorf("kleidi: recover: %w", err)
		}
		newMembers = append(newMembers, Member{ID: id.ID(), Identity: *id, Added: now, Endorser: e.selfID, Endorsement: sig})
	}
	if _, err := ring.Update(ctx, func(r *Ring) error { *r = Ring{Keys: keys, Members: newMembers}; return nil }); err != nil {
		return fmt.Errorf("kleidi: recover: %w", err)
	}
	if len(skipped) > 0 {
		return fmt.Errorf("kleidi: recover: recovered %d keys, left out %d: %w", len(keys), len(skipped), errors.Join(skipped...))
	}
	return nil
}

// sortedIDs returns the keys of members in order, so that errors name the same member every time.
func sortedIDs(members map[string]*Member) []string { return slices.Sorted(maps.Keys(members)) }

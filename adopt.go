package kleidi

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// ParseKeyring parses a keyring file's bytes, as [FileKeyring] reads them, checking its form only: whether its
// copies and members are to be believed is decided by the [Envelope] that loads it.
func ParseKeyring(b []byte) (Ring, error) { return parseKeyring(b) }

// Adopt makes keyring, the bytes of a keyring file that another member published, this Envelope's keyring, and
// switches to its active key (see [Envelope.Reload]). Nothing in it is believed on its word: copies signed by
// members this node does not trust are ignored, a removed member stays removed, a retired key never becomes active
// again, and the active key must unwrap. Where keyring holds a copy for this node that another member made and
// this node's keyring holds a copy of its own making, its own is kept. A keyring that lacks a key this node's
// keyring holds is refused ([Envelope.Forget] removes a key on purpose, on each node). On error, this node's
// keyring is left as it was.
func (e *Envelope) Adopt(ctx context.Context, keyring []byte) (err error) {
	e.ringMu.Lock()
	defer e.ringMu.Unlock()
	if e.closed.Load() {
		return fmt.Errorf("kleidi: adopt keyring: %w", ErrClosed)
	}
	start, before := time.Now(), e.KeyID()
	defer func() { e.keyEvent("adopt", e.KeyID(), e.KeyID() != before, err, start) }()
	in, err := parseKeyring(keyring)
	if err != nil {
		return fmt.Errorf("kleidi: adopt keyring: %w", err)
	}
	if len(in.Keys) == 0 {
		return fmt.Errorf("kleidi: adopt keyring: %w: no keys", ErrInvalidKeyring)
	}
	old, err := e.ring.Load(ctx)
	if err != nil {
		return fmt.Errorf("kleidi: adopt keyring: %w", err)
	}
	merged, err := e.merge(old, in)
	if err != nil {
		return fmt.Errorf("kleidi: adopt keyring: %w", err)
	}
	replace := func(with Ring) func(*Ring) error {
		return func(r *Ring) error {
			r.Keys, r.Members, r.Removed = with.Keys, with.Members, with.Removed
			return nil
		}
	}
	if _, err := e.ring.Update(ctx, replace(merged)); err != nil {
		return fmt.Errorf("kleidi: adopt keyring: %w", err)
	}
	if err := e.apply(ctx, merged); err != nil {
		if _, rerr := e.ring.Update(ctx, replace(old)); rerr != nil {
			return fmt.Errorf("kleidi: adopt keyring: %w (and restoring the keyring failed: %v)", err, rerr)
		}
		return fmt.Errorf("kleidi: adopt keyring: %w", err)
	}
	return nil
}

// merge returns in with this node's own copies from old in place of the copies other members made for it, or an
// error if in lacks a key of old.
func (e *Envelope) merge(old, in Ring) (Ring, error) {
	byID := make(map[string]KeyRecord, len(old.Keys))
	for _, r := range old.Keys {
		byID[r.ID] = r
	}
	out := in
	out.Keys = slices.DeleteFunc(slices.Clone(in.Keys), func(r KeyRecord) bool { return e.wasForgotten(r.ID) })
	for _, r := range old.Keys {
		if !slices.ContainsFunc(in.Keys, func(x KeyRecord) bool { return x.ID == r.ID }) {
			return Ring{}, fmt.Errorf("%w: it drops key %s, which this node holds: forget a key on each node instead", ErrInvalidKeyring, r.ID)
		}
	}
	if e.selfID == "" {
		return out, nil
	}
	isOwn := func(w WrappedKey) bool { return w.Recipient == e.selfID && w.Sender == "" }
	for i, r := range out.Keys {
		prev, ok := byID[r.ID]
		if !ok || slices.ContainsFunc(r.Wrapped, isOwn) {
			continue
		}
		j := slices.IndexFunc(prev.Wrapped, isOwn)
		if j < 0 {
			continue
		}
		copies := slices.DeleteFunc(slices.Clone(r.Wrapped), func(w WrappedKey) bool { return w.Recipient == e.selfID })
		out.Keys[i].Wrapped = append([]WrappedKey{prev.Wrapped[j]}, copies...)
	}
	return out, nil
}

// Forget removes the retired KEK id from the keyring and from memory: data still encrypted under it can no longer be
// decrypted. Do it once every object was re-encrypted under a later key and no backup needs it any more. An active
// or staged key is refused; a key never becomes active again after it (see [NodeState]).
func (e *Envelope) Forget(ctx context.Context, id string) (err error) {
	e.ringMu.Lock()
	defer e.ringMu.Unlock()
	if e.closed.Load() {
		return fmt.Errorf("kleidi: forget %s: %w", id, ErrClosed)
	}
	start := time.Now()
	defer func() { e.keyEvent("forget", id, err == nil, err, start) }()
	ring, err := e.ring.Update(ctx, func(r *Ring) error {
		i := slices.IndexFunc(r.Keys, func(k KeyRecord) bool { return k.ID == id })
		switch {
		case i < 0:
			return fmt.Errorf("%w: %s is not in the keyring", ErrUnknownKey, id)
		case r.Keys[i].State != KeyRetired:
			return fmt.Errorf("key %s is %s: only a retired key is forgotten", id, r.Keys[i].State)
		}
		r.Keys = slices.Delete(r.Keys, i, i+1)
		return nil
	})
	if err != nil {
		return fmt.Errorf("kleidi: forget %s: %w", id, err)
	}
	e.stateMu.Lock()
	e.state.retired[id], e.state.forgotten[id] = true, true
	e.stateMu.Unlock()
	keys := make(map[string]*kek, len(*e.keys.Load()))
	for k, v := range *e.keys.Load() {
		if k != id {
			keys[k] = v
		}
	}
	e.keys.Store(&keys)
	byID := make(map[string]KeyRecord, len(ring.Keys))
	for _, r := range ring.Keys {
		byID[r.ID] = r
	}
	e.records.Store(&byID)
	return nil
}

// Holds reports whether this node can unwrap KEK id now: it is in memory, or the keyring as last loaded holds a
// copy this node's root made.
func (e *Envelope) Holds(id string) bool {
	if (*e.keys.Load())[id] != nil {
		return true
	}
	r, ok := (*e.records.Load())[id]
	if !ok {
		return false
	}
	root := e.provider.Name()
	return slices.ContainsFunc(r.Wrapped, func(w WrappedKey) bool {
		return w.Sender == "" && (w.Recipient == e.selfID || (w.Recipient == "" && w.Root == root))
	})
}

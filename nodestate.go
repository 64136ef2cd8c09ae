package kleidi

import (
	"maps"
	"slices"
)

// NodeState is what a node remembers of its keyring between runs, because the keyring (which other nodes, and
// whoever distributes it, can write) cannot be believed about it. A program keeps it in its own state (the
// reference binary: node-state.json in its state directory), passes it with [WithNodeState] at every start and
// saves [Envelope.NodeState] after every change. It holds IDs only, nothing secret.
type NodeState struct {
	// Trusted are the members this node trusts: itself once a member, the members that endorsed it when it first
	// joined ([Ring.Endorsers]), and every member it came to trust since through their endorsements.
	Trusted []string `json:"trusted,omitempty"`
	// Removed are the members this node saw removed ([Removal]): never trusted again.
	Removed []string `json:"removed,omitempty"`
	// Retired are the KEKs this node saw retired: never made active again.
	Retired []string `json:"retired,omitempty"`
	// Forgotten are the KEKs this node forgot ([Envelope.Forget]): never unwrapped again, from the keyring or from
	// a key attached to a ciphertext.
	Forgotten []string `json:"forgotten,omitempty"`
	// KeyringVersion is the highest keyring format version this node read. From 2 on, copies of a keyring of
	// version 1, which carry no proof, are refused: a version 1 file can no longer be told from a forgery.
	KeyringVersion int `json:"keyringVersion,omitempty"`
}

// nodeState is NodeState as sets.
type nodeState struct {
	trusted, removed, retired, forgotten map[string]bool
	version                              int
}

func (s NodeState) toSet() nodeState {
	set := func(ids []string) map[string]bool {
		m := make(map[string]bool, len(ids))
		for _, id := range ids {
			m[id] = true
		}
		return m
	}
	return nodeState{trusted: set(s.Trusted), removed: set(s.Removed), retired: set(s.Retired), forgotten: set(s.Forgotten), version: s.KeyringVersion}
}

// NodeState returns what this node knows now of its keyring, to keep for its next start (see [NodeState]).
func (e *Envelope) NodeState() NodeState {
	e.stateMu.Lock()
	defer e.stateMu.Unlock()
	return NodeState{
		Trusted:        slices.Sorted(maps.Keys(e.state.trusted)),
		Removed:        slices.Sorted(maps.Keys(e.state.removed)),
		Retired:        slices.Sorted(maps.Keys(e.state.retired)),
		Forgotten:      slices.Sorted(maps.Keys(e.state.forgotten)),
		KeyringVersion: e.state.version,
	}
}

// trustOf returns what this node trusts of ring: the members itself and its trusted members reach through
// endorsements, less the removed ones.
func (e *Envelope) trustOf(ring Ring) trust {
	e.stateMu.Lock()
	anchors := append([]string{e.selfID}, slices.Collect(maps.Keys(e.state.trusted))...)
	removed := maps.Clone(e.state.removed)
	e.stateMu.Unlock()
	return trustOf(ring, anchors, removed)
}

// noteVersion records that a keyring of version v was read.
func (e *Envelope) noteVersion(v int) {
	e.stateMu.Lock()
	defer e.stateMu.Unlock()
	e.state.version = max(e.state.version, v)
}

// legacyAllowed reports whether copies read from a keyring of version 1 are accepted: only until this node has
// read a later version.
func (e *Envelope) legacyAllowed() bool {
	e.stateMu.Lock()
	defer e.stateMu.Unlock()
	return e.state.version < 2
}

func (e *Envelope) wasForgotten(id string) bool {
	e.stateMu.Lock()
	defer e.stateMu.Unlock()
	return e.state.forgotten[id]
}

func (e *Envelope) wasRetired(id string) bool {
	e.stateMu.Lock()
	defer e.stateMu.Unlock()
	return e.state.retired[id]
}

// remember records what applying ring taught this node: the members it trusts and saw removed, and the keys it
// saw retired, the previous active key among them when active replaced it.
func (e *Envelope) remember(ring Ring, active string, tr trust) {
	e.stateMu.Lock()
	defer e.stateMu.Unlock()
	if e.state.trusted == nil {
		e.state = NodeState{}.toSet()
	}
	for id := range tr.removed {
		e.state.removed[id] = true
		delete(e.state.trusted, id)
	}
	for id := range tr.members {
		e.state.trusted[id] = true // itself too: a recovery after its root is lost believes what it signed
	}
	for _, r := range ring.Keys {
		if r.State == KeyRetired {
			e.state.retired[r.ID] = true
		}
	}
	if prev := e.active.Load(); prev != nil && prev.kek.id != active {
		e.state.retired[prev.kek.id] = true
	}
}

// pinOnFirstJoin makes a joining node (one that trusts no member yet and holds no copy of its own making: every
// copy for it came from others) trust the members that endorsed it: trust on first use, as the keyring was
// handed to it when it joined. A node that made copies of its own is no newcomer and trusts no one this way.
func (e *Envelope) pinOnFirstJoin(ring Ring) {
	if e.selfID == "" {
		return
	}
	for _, r := range ring.Keys {
		for _, w := range r.Wrapped {
			if w.Recipient == e.selfID && w.Sender == "" {
				return
			}
		}
	}
	e.stateMu.Lock()
	defer e.stateMu.Unlock()
	for id := range e.state.trusted {
		if id != e.selfID {
			return // it trusts another member already
		}
	}
	for _, id := range ring.Endorsers(e.selfID) {
		if !e.state.removed[id] {
			e.state.trusted[id] = true
		}
	}
}

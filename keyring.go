package kleidi

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"time"
)

// KeyState says what a KEK is used for.
type KeyState string

// The states of a KEK. Exactly one KEK of a non-empty keyring is active.
const (
	// KeyActive is the KEK new data is encrypted with.
	KeyActive KeyState = "active"
	// KeyRetired is a KEK kept to decrypt data encrypted before a rotation.
	KeyRetired KeyState = "retired"
	// KeyStaged is a KEK wrapped for every member but not yet used to encrypt: the first half of a rotation
	// across nodes (see [Envelope.Stage]). It decrypts, and becomes active with [Envelope.Activate].
	KeyStaged KeyState = "staged"
)

// KeyRecord is one KEK as a keyring stores it: never the key itself, only wrapped copies of it.
type KeyRecord struct {
	// ID is the key ID: "kleidi-<provider>-<fingerprint>".
	ID string `json:"id"`
	// Created is when the KEK was generated.
	Created time.Time `json:"created"`
	// State is [KeyActive] or [KeyRetired].
	State KeyState `json:"state"`
	// Wrapped holds one or more wrapped copies of the KEK, one per root of trust.
	Wrapped []WrappedKey `json:"wrapped"`
}

// WrappedKey is a KEK wrapped by one root of trust.
type WrappedKey struct {
	// Root names the root of trust that wrapped it: the [Provider.Name].
	Root string `json:"root"`
	// Blob is what [Provider.Wrap] returned.
	Blob []byte `json:"blob"`
	// Recipient is the ID of the member the copy is wrapped for (see [Identity.ID]); empty for the copy of a root
	// that is the keyring's only one, as before members.
	Recipient string `json:"recipient,omitempty"`
	// Sender is the ID of the member that wrapped the copy for another member, and signed it: Proof is then its
	// signature ([Node.Sign]). Empty for a copy its own root made and proved.
	Sender string `json:"sender,omitempty"`
	// Proof is what [Authenticator.Prove] of the root returned over the copy (see [Envelope]), or the sender's
	// signature, or nil for a copy made by a root that is not an Authenticator or by a version of kleidi before
	// proofs (keyring version 1).
	Proof []byte `json:"proof,omitempty"`

	// legacy marks a copy read from a keyring of version 1, written before proofs: the only copies without a proof
	// that an Authenticator root accepts, as local state. A keyring stays version 1 while it holds such a copy.
	legacy bool
}

// Ring is what a [Keyring] stores: the wrapped KEKs, and the members they are wrapped for.
type Ring struct {
	// Keys are the KEKs, oldest first.
	Keys []KeyRecord
	// Members are the roots of trust every KEK is wrapped for, when several share the keyring (see [Member]);
	// empty for a keyring of one root.
	Members []Member
	// Removed records the members that were unenrolled, each signed by the member that removed it, so that a
	// node that sees it never trusts the removed member again, even if its old entry comes back.
	Removed []Removal
	// Version is the format version the keyring was read from (0 for a keyring never written). Writing ignores
	// it: a keyring is written in the oldest version that holds what it has.
	Version int
}

// Keyring stores a [Ring]. It holds nothing secret. Implementations are safe for concurrent use, and Update
// excludes every other Update of the same keyring, in this process and in others.
type Keyring interface {
	// Load returns the ring; a keyring never written has no keys. A corrupt keyring gives an error wrapping
	// [ErrInvalidKeyring].
	Load(ctx context.Context) (Ring, error)
	// Update loads the ring, passes it to change and stores what change leaves in it, atomically. If loading
	// or change fails, nothing is written. It returns the stored ring.
	Update(ctx context.Context, change func(*Ring) error) (Ring, error)
}

// Keyring file format.
const (
	keyringFormat = "kleidi-keyring"
	// keyringVersion is the version written: 2 added WrappedKey.Proof, 3 members (written only by a keyring that
	// has them, so that a keyring of one root stays readable by the versions before). Versions 1 and 2 are read.
	keyringVersion = 3
	// maxKeyringSize bounds what is read from a keyring file.
	maxKeyringSize = 16 << 20
	// maxKeyRecords bounds the number of KEKs in a keyring: daily rotation for ten years.
	maxKeyRecords = 4096
	// maxWrappedCopies bounds the wrapped copies of one KEK, and so the members of a keyring.
	maxWrappedCopies = 64
)

type keyringFile struct {
	Format  string      `json:"format"`
	Version int         `json:"version"`
	Keys    []KeyRecord `json:"keys"`
	Members []Member    `json:"members,omitempty"`
	Removed []Removal   `json:"removed,omitempty"`
}

// encodeKeyring checks ring and returns the keyring file that holds it.
func encodeKeyring(ring Ring) ([]byte, error) {
	records := ring.Keys
	if err := checkRing(ring); err != nil {
		return nil, err
	}
	version := 2
	if len(ring.Members) > 0 || len(ring.Removed) > 0 {
		version = keyringVersion
	}
	for _, r := range records {
		for _, w := range r.Wrapped {
			if w.legacy && w.Proof == nil {
				version = 1 // until every copy read from version 1 is proved, or replaced
			}
		}
	}
	b, err := json.MarshalIndent(keyringFile{Format: keyringFormat, Version: version, Keys: records, Members: ring.Members,
		Removed: ring.Removed}, "", "  ")
	if err != nil {
		return nil, err
	}
	if len(b)+1 > maxKeyringSize {
		// Refused here, so the keyring on disk stays one every node can read.
		return nil, fmt.Errorf("%w: %d bytes would be larger than %d: remove retired keys no data uses", ErrTooLarge, len(b)+1, maxKeyringSize)
	}
	return append(b, '\n'), nil
}

// parseKeyring parses a keyring file. Errors wrap [ErrInvalidKeyring].
func parseKeyring(b []byte) (Ring, error) {
	if len(b) == 0 {
		return Ring{}, fmt.Errorf("%w: empty file", ErrInvalidKeyring)
	}
	if len(b) > maxKeyringSize {
		return Ring{}, fmt.Errorf("%w: %d bytes is larger than %d", ErrInvalidKeyring, len(b), maxKeyringSize)
	}
	// The version is read first, so a newer format gets a clear message rather than a field error.
	var head struct {
		Format  string `json:"format"`
		Version int    `json:"version"`
	}
	if err := json.Unmarshal(b, &head); err != nil {
		return Ring{}, fmt.Errorf("%w: %v", ErrInvalidKeyring, err)
	}
	if head.Format != keyringFormat {
		return Ring{}, fmt.Errorf("%w: format %q, want %q", ErrInvalidKeyring, head.Format, keyringFormat)
	}
	if head.Version < 1 || head.Version > keyringVersion {
		return Ring{}, fmt.Errorf("%w: unsupported version %d, want %d", ErrInvalidKeyring, head.Version, keyringVersion)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var f keyringFile
	if err := dec.Decode(&f); err != nil {
		return Ring{}, fmt.Errorf("%w: %v", ErrInvalidKeyring, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return Ring{}, fmt.Errorf("%w: data after the keyring", ErrInvalidKeyring)
	}
	ring := Ring{Keys: f.Keys, Members: f.Members, Removed: f.Removed, Version: f.Version}
	if f.Version < 3 && (len(f.Members) > 0 || len(f.Removed) > 0) {
		return Ring{}, fmt.Errorf("%w: members in a keyring of version %d", ErrInvalidKeyring, f.Version)
	}
	if err := checkRing(ring); err != nil {
		return Ring{}, err
	}
	if f.Version == 1 {
		for i := range f.Keys {
			for j := range f.Keys[i].Wrapped {
				f.Keys[i].Wrapped[j].legacy = true
			}
		}
	}
	return ring, nil
}

// checkRing returns an error wrapping [ErrInvalidKeyring] unless ring is a valid keyring.
func checkRing(ring Ring) error {
	if err := checkRecords(ring.Keys); err != nil {
		return err
	}
	if err := checkMembers(ring.Members); err != nil {
		return err
	}
	return checkRemovals(ring.Removed)
}

// checkRecords returns an error wrapping [ErrInvalidKeyring] unless records form a valid list of keys.
func checkRecords(records []KeyRecord) error {
	invalid := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalidKeyring}, args...)...)
	}
	if len(records) > maxKeyRecords {
		return invalid("%d keys, at most %d allowed", len(records), maxKeyRecords)
	}
	seen := make(map[string]bool, len(records))
	active := 0
	for i, r := range records {
		if err := checkKeyID(r.ID); err != nil {
			return invalid("key %d: %v", i, err)
		}
		if seen[r.ID] {
			return invalid("key %s appears twice", r.ID)
		}
		seen[r.ID] = true
		switch r.State {
		case KeyActive:
			active++
		case KeyRetired, KeyStaged:
		default:
			return invalid("key %s: unknown state %q", r.ID, r.State)
		}
		if len(r.Wrapped) == 0 || len(r.Wrapped) > maxWrappedCopies {
			return invalid("key %s: %d wrapped copies, want 1 to %d", r.ID, len(r.Wrapped), maxWrappedCopies)
		}
		recipients := make(map[string]bool, len(r.Wrapped))
		for _, w := range r.Wrapped {
			if err := CheckProviderName(w.Root); err != nil {
				return invalid("key %s: %v", r.ID, err)
			}
			for _, m := range []string{w.Recipient, w.Sender} {
				if len(m) > maxMemberIDSize {
					return invalid("key %s: member ID of %d bytes", r.ID, len(m))
				}
			}
			if w.Sender != "" && (w.Recipient == "" || len(w.Proof) == 0) {
				return invalid("key %s: a copy with a sender needs a recipient and a signature", r.ID)
			}
			to := w.Recipient
			if to == "" {
				to = w.Root // a keyring of one root: one copy per root
			}
			if recipients[to] {
				return invalid("key %s: two copies for %s", r.ID, to)
			}
			recipients[to] = true
			if len(w.Blob) == 0 || len(w.Blob) > MaxWrappedKeySize {
				return invalid("key %s: wrapped copy of %d bytes, want 1 to %d", r.ID, len(w.Blob), MaxWrappedKeySize)
			}
			if len(w.Proof) > MaxProofSize {
				return invalid("key %s: proof of %d bytes, want at most %d", r.ID, len(w.Proof), MaxProofSize)
			}
		}
	}
	if len(records) > 0 && active != 1 {
		return invalid("%d active keys, want exactly 1", active)
	}
	return nil
}

// MemoryKeyring is a [Keyring] in memory, for tests, examples and programs that keep their keyring elsewhere.
// It stores the same encoding as [FileKeyring] and checks it the same way.
type MemoryKeyring struct {
	mu   sync.Mutex
	data []byte
}

var _ Keyring = (*MemoryKeyring)(nil)

// NewMemoryKeyring returns an empty keyring in memory.
func NewMemoryKeyring() *MemoryKeyring { return &MemoryKeyring{} }

// Load returns the ring.
func (k *MemoryKeyring) Load(ctx context.Context) (Ring, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.read()
}

func (k *MemoryKeyring) read() (Ring, error) {
	if k.data == nil {
		return Ring{}, nil
	}
	return parseKeyring(k.data)
}

// Update changes the ring.
func (k *MemoryKeyring) Update(ctx context.Context, change func(*Ring) error) (Ring, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	ring, err := k.read()
	if err != nil {
		return Ring{}, err
	}
	if err := change(&ring); err != nil {
		return Ring{}, err
	}
	b, err := encodeKeyring(ring)
	if err != nil {
		return Ring{}, err
	}
	k.data = b
	return ring, nil
}

package kleidi

import (
	"fmt"
	"time"
)

// Member is a root of trust that every KEK of a keyring is wrapped for: a control-plane node's TPM, an offline
// recovery key. A node unwraps every KEK with the root it holds, so nodes share one keyring.
//
// A member is trusted only through a chain of endorsements: each member is endorsed (signed for) by the member
// that enrolled it, and a node trusts itself, the members it remembers trusting ([NodeState], [WithNodeState]) and, in
// turn, every member a trusted member endorsed. Nothing else in a keyring file is believed, so a party that can
// write the keyring can remove members (and so deny service) but never add one: it cannot make a node wrap a
// KEK for a key of its choosing, nor make it accept a KEK it chose.
type Member struct {
	// ID is the member's [Identity.ID], stored for people reading the keyring and checked against the identity.
	ID string `json:"id"`
	Identity
	// Added is when the member was enrolled.
	Added time.Time `json:"added"`
	// Endorser is the ID of the member that enrolled this one (its own ID for the first member of a keyring).
	Endorser string `json:"endorser"`
	// Endorsement is the endorser's signature ([Node.Sign]) over the member's ID.
	Endorsement []byte `json:"endorsement"`
}

// maxMemberIDSize bounds a member ID: a provider name, a dash and a 26-character fingerprint.
const maxMemberIDSize = MaxProviderNameSize + 1 + 26

// Removal records that a member was unenrolled ([Envelope.Unenroll]): signed by the member that removed it, it
// makes every node that sees it stop trusting the removed member for good (see [WithNodeState]), even if the
// member's old, validly endorsed entry is written back into the keyring.
type Removal struct {
	// ID is the removed member's ID.
	ID string `json:"id"`
	// Removed is when it was removed.
	Removed time.Time `json:"removed"`
	// By is the ID of the member that removed it; Signature its signature over the removal.
	By        string `json:"by"`
	Signature []byte `json:"signature"`
}

// Labels of the messages members sign, so that a signature made for one purpose never passes for another.
const (
	endorsementLabel = "kleidi member v1\x00"
	sharedCopyLabel  = "kleidi shared key v1\x00"
	removalLabel     = "kleidi removed member v1\x00"
)

// removalMessage is what by signs to remove member.
func removalMessage(by, member string) []byte {
	return []byte(removalLabel + by + "\x00" + member)
}

// checkRemovals returns an error wrapping [ErrInvalidKeyring] unless removals are well formed.
func checkRemovals(removals []Removal) error {
	if len(removals) > maxKeyRecords {
		return fmt.Errorf("%w: %d removed members, at most %d allowed", ErrInvalidKeyring, len(removals), maxKeyRecords)
	}
	for i, r := range removals {
		if len(r.ID) == 0 || len(r.ID) > maxMemberIDSize || len(r.By) == 0 || len(r.By) > maxMemberIDSize ||
			len(r.Signature) == 0 || len(r.Signature) > MaxSignatureSize {
			return fmt.Errorf("%w: removal %d is not well formed", ErrInvalidKeyring, i)
		}
	}
	return nil
}

// endorsementMessage is what endorser signs to make member a member.
func endorsementMessage(endorser, member string) []byte {
	return []byte(endorsementLabel + endorser + "\x00" + member)
}

// sharedCopyMessage is what sender signs for a copy of KEK id it wrapped for recipient: "sender made blob for
// recipient, and blob wraps KEK id".
func sharedCopyMessage(id, sender, recipient string, blob []byte) []byte {
	m := make([]byte, 0, len(sharedCopyLabel)+len(id)+len(sender)+len(recipient)+3+len(blob))
	m = append(m, sharedCopyLabel...)
	m = append(append(m, id...), 0)
	m = append(append(m, sender...), 0)
	m = append(append(m, recipient...), 0)
	return append(m, blob...)
}

// checkMembers returns an error wrapping [ErrInvalidKeyring] unless members are well formed. It checks their
// form only: who trusts whom is [trustedMembers]'s business.
func checkMembers(members []Member) error {
	if len(members) > maxWrappedCopies {
		return fmt.Errorf("%w: %d members, at most %d allowed", ErrInvalidKeyring, len(members), maxWrappedCopies)
	}
	seen := make(map[string]bool, len(members))
	for i := range members {
		m := &members[i]
		if err := m.Identity.Check(); err != nil {
			return fmt.Errorf("%w: member %d: %v", ErrInvalidKeyring, i, err)
		}
		if m.ID != m.Identity.ID() {
			return fmt.Errorf("%w: member %d: states ID %q, but its keys give %q", ErrInvalidKeyring, i, m.ID, m.Identity.ID())
		}
		if seen[m.ID] {
			return fmt.Errorf("%w: member %s appears twice", ErrInvalidKeyring, m.ID)
		}
		seen[m.ID] = true
		if len(m.Endorser) == 0 || len(m.Endorser) > maxMemberIDSize || len(m.Endorsement) == 0 || len(m.Endorsement) > MaxSignatureSize {
			return fmt.Errorf("%w: member %s: no valid endorsement", ErrInvalidKeyring, m.ID)
		}
	}
	return nil
}

// trust is what a node trusts of a keyring: its members, and the removed members it will never trust again.
type trust struct {
	members map[string]*Member
	removed map[string]bool
}

// trustOf returns what a node whose anchors (itself, the members it pinned) are anchors, and who knows removed
// as removed, trusts of ring: the members the anchors reach through endorsements, less every member removed by a
// trusted member's signed [Removal] or known as removed.
func trustOf(ring Ring, anchors []string, removed map[string]bool) trust {
	gone := make(map[string]bool, len(removed))
	for id := range removed {
		gone[id] = true
	}
	members := trustedMembers(ring, gone, anchors...)
	for _, r := range ring.Removed {
		if by := members[r.By]; by != nil && !gone[r.ID] && by.Identity.Verify(removalMessage(r.By, r.ID), r.Signature) == nil {
			gone[r.ID] = true
		}
	}
	if len(gone) > len(removed) {
		members = trustedMembers(ring, gone, anchors...)
	}
	return trust{members: members, removed: gone}
}

// trustedMembers returns the members of ring that anchors (member IDs this node trusts of itself) reach
// through endorsements: an anchor that is a member, and every member whose endorsement by a trusted member
// verifies. A member in removed is never trusted.
func trustedMembers(ring Ring, removed map[string]bool, anchors ...string) map[string]*Member {
	trusted := make(map[string]*Member, len(ring.Members))
	for i := range ring.Members {
		for _, a := range anchors {
			if ring.Members[i].ID == a && !removed[a] {
				trusted[a] = &ring.Members[i]
			}
		}
	}
	for grew := true; grew; {
		grew = false
		for i := range ring.Members {
			m := &ring.Members[i]
			if trusted[m.ID] != nil || removed[m.ID] {
				continue
			}
			e := trusted[m.Endorser]
			if e == nil || e.Identity.Verify(endorsementMessage(e.ID, m.ID), m.Endorsement) != nil {
				continue
			}
			trusted[m.ID] = m
			grew = true
		}
	}
	return trusted
}

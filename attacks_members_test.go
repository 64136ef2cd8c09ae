package kleidi_test

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

func memberOf(t *testing.T, ring kleidi.Keyring, id string) kleidi.Member {
	t.Helper()
	r, _ := ring.Load(ctx)
	for _, m := range r.Members {
		if m.ID == id {
			return m
		}
	}
	t.Fatalf("no member %s", id)
	return kleidi.Member{}
}

func copyFor(t *testing.T, ring kleidi.Keyring, keyID, recipient string) []byte {
	t.Helper()
	r, _ := ring.Load(ctx)
	for _, k := range r.Keys {
		if k.ID != keyID {
			continue
		}
		for _, w := range k.Wrapped {
			if w.Recipient == recipient {
				return w.Blob
			}
		}
	}
	return nil
}

// Unenroll re-endorses only trusted members it endorsed. It used to re-endorse, with this node's key, every member whose Endorser field names the removed member,
// without checking that endorsement.
func TestUnenrollDoesNotEndorseAPlantedMember(t *testing.T) {
	nodes := newCluster(t, 3)
	x := kleiditest.NewInsecureNode()
	xid, _ := x.Identity(ctx)
	gone := nodes[2].env.MemberID()
	updateRing(t, nodes[0].ring, func(r *kleidi.Ring) {
		r.Members = append(r.Members, kleidi.Member{ID: xid.ID(), Identity: *xid, Endorser: gone, Endorsement: []byte{1}})
	})
	newID, err := nodes[0].env.Unenroll(ctx, gone)
	if err != nil {
		t.Fatal(err)
	}
	if slices.Contains(nodes[0].env.NodeState().Trusted, xid.ID()) {
		t.Errorf("after the unenroll, node 0 trusts a member that only claimed the removed member's endorsement")
	}
	if blob := copyFor(t, nodes[0].ring, newID, xid.ID()); blob != nil {
		if _, err := x.Unwrap(ctx, blob); err == nil {
			t.Errorf("the attacker unwrapped the KEK %s made by the unenroll", newID)
		}
	}
}

// (b)+(a) an unenrolled member's old entry, replayed, is trusted again.
func TestUnenrolledMemberStaysOutWhenReplayed(t *testing.T) {
	nodes := newCluster(t, 3)
	gone := nodes[2]
	old := memberOf(t, nodes[0].ring, gone.env.MemberID())
	if _, err := nodes[0].env.Unenroll(ctx, gone.env.MemberID()); err != nil {
		t.Fatal(err)
	}
	copyRing(t, nodes[0], nodes[1])
	if err := nodes[1].env.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	// attacker writes the shared keyring: the old member entry comes back
	for _, n := range nodes[:2] {
		updateRing(t, n.ring, func(r *kleidi.Ring) { r.Members = append(r.Members, old) })
	}
	if err := nodes[0].env.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	id, err := nodes[0].env.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if blob := copyFor(t, nodes[0].ring, id, gone.env.MemberID()); blob != nil {
		if _, err := gone.p.Unwrap(ctx, blob); err == nil {
			t.Errorf("the unenrolled node unwraps the KEK %s rotated after its unenroll", id)
		}
	}
	// (a): the unenrolled node's root signs a copy of a KEK the attacker chose for node 1
	kek := make([]byte, 32)
	rand.Read(kek)
	kid := kleidi.KeyIDForTest("insecure", kek)
	rc, _ := kleiditest.OpenInsecureRecipient(nodes[1].id(t))
	blob, _ := rc.Wrap(ctx, kek)
	sig, _ := gone.p.Sign(ctx, kleidi.SharedCopyMessageForTest(kid, gone.env.MemberID(), nodes[1].env.MemberID(), blob))
	updateRing(t, nodes[1].ring, func(r *kleidi.Ring) {
		for i := range r.Keys {
			if r.Keys[i].State == kleidi.KeyActive {
				r.Keys[i].State = kleidi.KeyRetired
			}
		}
		r.Keys = append(r.Keys, kleidi.KeyRecord{ID: kid, Created: time.Now().UTC().Truncate(time.Second), State: kleidi.KeyActive,
			Wrapped: []kleidi.WrappedKey{{Root: "insecure", Recipient: nodes[1].env.MemberID(), Sender: gone.env.MemberID(), Blob: blob, Proof: sig}}})
	})
	if err := nodes[1].env.Reload(ctx); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("Reload(keyring with a KEK signed by the removed member) err = %v, want kleidi.ErrUnauthenticated", err)
	}
	if nodes[1].env.KeyID() == kid {
		t.Errorf("node 1 encrypts under the attacker's KEK %s", kid)
	}
}

// Key states are not authenticated: an attacker re-activates a retired KEK (the one the unenrolled node holds).
func TestRetiredKeyIsNeverActiveAgain(t *testing.T) {
	nodes := newCluster(t, 3)
	gone := nodes[2]
	k1 := nodes[0].env.KeyID()
	k2, err := nodes[0].env.Unenroll(ctx, gone.env.MemberID())
	if err != nil {
		t.Fatal(err)
	}
	updateRing(t, nodes[0].ring, func(r *kleidi.Ring) {
		for i := range r.Keys {
			switch r.Keys[i].ID {
			case k1:
				r.Keys[i].State = kleidi.KeyActive
			case k2:
				r.Keys[i].State = kleidi.KeyRetired
			}
		}
	})
	if err := nodes[0].env.Reload(ctx); !errors.Is(err, kleidi.ErrInvalidKeyring) {
		t.Errorf("Reload(keyring with a retired key active again) err = %v, want kleidi.ErrInvalidKeyring", err)
	}
	if nodes[0].env.KeyID() != k2 {
		t.Errorf("KeyID() = %s after the rollback, want %s", nodes[0].env.KeyID(), k2)
	}
	c := encryptOn(t, nodes[0], "secret written after unenroll")
	bare, _ := kleidi.ParseCiphertext(c.Bytes())
	if got, err := gone.env.Decrypt(ctx, bare, nil); err == nil {
		t.Errorf("the unenrolled node reads %q, written after it left", got)
	}
	// A restart with the node's saved state refuses it too.
	if _, err := kleidi.NewEnvelope(ctx, nodes[0].p, nodes[0].ring, kleidi.WithNodeState(nodes[0].env.NodeState()),
		kleidi.WithRecipientOpener("insecure", kleiditest.OpenInsecureRecipient)); !errors.Is(err, kleidi.ErrInvalidKeyring) {
		t.Errorf("NewEnvelope(rolled back keyring, saved node state) err = %v, want kleidi.ErrInvalidKeyring", err)
	}
}

// Keyring version 1 (no members, no proofs) written by the attacker: copies are accepted as legacy local state.
func TestVersion1KeyringAfterALaterOneIsRefused(t *testing.T) {
	dir := t.TempDir()
	n := kleiditest.NewInsecureNode()
	ring := kleidi.NewFileKeyring(filepath.Join(dir, "keyring.json"))
	env, err := kleidi.NewEnvelope(ctx, n, ring, kleidi.WithCreateIfEmpty(), kleidi.WithRecipientOpener("insecure", kleiditest.OpenInsecureRecipient))
	if err != nil {
		t.Fatal(err)
	}
	defer env.Close()
	id, _ := n.Identity(ctx)
	kek := make([]byte, 32)
	rand.Read(kek)
	kid := kleidi.KeyIDForTest("insecure", kek)
	rc, _ := kleiditest.OpenInsecureRecipient(id)
	blob, _ := rc.Wrap(context.Background(), kek) // public identity only
	f := map[string]any{"format": "kleidi-keyring", "version": 1, "keys": []any{map[string]any{
		"id": kid, "created": time.Now().UTC().Truncate(time.Second), "state": "active",
		"wrapped": []any{map[string]any{"root": "insecure", "blob": blob}}}}}
	b, _ := json.Marshal(f)
	if err := os.WriteFile(ring.Path(), b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := env.Reload(ctx); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("Reload(version 1 keyring after version 2) err = %v, want kleidi.ErrUnauthenticated", err)
	}
	if env.KeyID() == kid {
		t.Errorf("after a version 1 keyring written by the attacker, the node encrypts under its KEK %s", kid)
	}
	if _, err := kleidi.NewEnvelope(ctx, n, ring, kleidi.WithNodeState(env.NodeState())); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("NewEnvelope(version 1 keyring, saved node state) err = %v, want kleidi.ErrUnauthenticated", err)
	}
}

// enroll keeps an existing (attacker-planted) entry for the member it enrolls, so the new node pins the attacker.
func TestEnrollReplacesAPlantedEntry(t *testing.T) {
	nodes := newCluster(t, 1)
	newNode := newTestNode()
	nid := newNode.id(t)
	x := kleiditest.NewInsecureNode()
	xid, _ := x.Identity(ctx)
	selfSig, _ := x.Sign(ctx, kleidi.EndorsementMessageForTest(xid.ID(), xid.ID()))
	nSig, _ := x.Sign(ctx, kleidi.EndorsementMessageForTest(xid.ID(), nid.ID()))
	updateRing(t, nodes[0].ring, func(r *kleidi.Ring) {
		r.Members = append(r.Members,
			kleidi.Member{ID: xid.ID(), Identity: *xid, Endorser: xid.ID(), Endorsement: selfSig},
			kleidi.Member{ID: nid.ID(), Identity: *nid, Endorser: xid.ID(), Endorsement: nSig})
	})
	if _, err := nodes[0].env.Enroll(ctx, nid); err != nil {
		t.Fatal(err)
	}
	ring, _ := nodes[0].ring.Load(ctx)
	if got := ring.Endorsers(nid.ID()); !slices.Equal(got, []string{nodes[0].env.MemberID()}) {
		t.Errorf("after the enroll, Endorsers(new node) = %v, want node 0 only (the attacker is %s)", got, xid.ID())
	}
	if !slices.Contains(nodes[0].env.NodeState().Trusted, nid.ID()) {
		t.Errorf("node 0 does not trust the node it enrolled")
	}
}

// Recover trusts any self-endorsed member of the file; a planted member survives honest writes into the backup.
func TestRecoverIgnoresAPlantedMember(t *testing.T) {
	nodes := newCluster(t, 2)
	recoveryNode := kleiditest.NewInsecureNode()
	recoveryID, _ := recoveryNode.Identity(ctx)
	recoveryID.VerifyKey = nil
	if _, err := nodes[0].env.Enroll(ctx, recoveryID); err != nil {
		t.Fatal(err)
	}
	x := kleiditest.NewInsecureNode()
	xid, _ := x.Identity(ctx)
	selfSig, _ := x.Sign(ctx, kleidi.EndorsementMessageForTest(xid.ID(), xid.ID()))
	kek := make([]byte, 32)
	rand.Read(kek)
	kid := kleidi.KeyIDForTest("insecure", kek)
	rc, _ := kleiditest.OpenInsecureRecipient(recoveryID)
	blob, _ := rc.Wrap(ctx, kek)
	sig, _ := x.Sign(ctx, kleidi.SharedCopyMessageForTest(kid, xid.ID(), recoveryID.ID(), blob))
	updateRing(t, nodes[0].ring, func(r *kleidi.Ring) {
		r.Members = append(r.Members, kleidi.Member{ID: xid.ID(), Identity: *xid, Endorser: xid.ID(), Endorsement: selfSig})
		r.Keys = append(r.Keys, kleidi.KeyRecord{ID: kid, Created: time.Now().UTC().Truncate(time.Second), State: kleidi.KeyRetired,
			Wrapped: []kleidi.WrappedKey{{Root: "insecure", Recipient: recoveryID.ID(), Sender: xid.ID(), Blob: blob, Proof: sig}}})
	})
	// honest activity: node 0 keeps running, reloads and rotates; its keyring is the backup
	if err := nodes[0].env.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := nodes[0].env.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	fresh := newTestNode()
	copyRing(t, nodes[0], fresh)
	// The anchors: what the lost nodes trusted (their saved state), never what the file says of itself.
	err := kleidi.Recover(ctx, fresh.ring, recoveryNode, recoveryID, kleiditest.OpenInsecureRecipient, fresh.p, nodes[1].env.NodeState().Trusted...)
	if err == nil || !strings.Contains(err.Error(), kid) {
		t.Errorf("Recover() err = %v, want it to name the key it left out, %s", err, kid)
	}
	if err := fresh.start(t); err != nil {
		t.Fatal(err)
	}
	forged := kleidi.SealForTest(kid, kek, []byte("forged secret"))
	bare, _ := kleidi.ParseCiphertext(forged.Bytes())
	if got, err := fresh.env.Decrypt(ctx, bare, nil); err == nil {
		t.Errorf("the recovered node decrypts a Secret forged under the attacker's KEK: %q", got)
	}
}

// Recover accepts a recovery copy with no sender and no signature at all (copiesFor with auth == nil).
func TestRecoverSkipsAnUnsignedCopy(t *testing.T) {
	nodes := newCluster(t, 1)
	recoveryNode := kleiditest.NewInsecureNode()
	recoveryID, _ := recoveryNode.Identity(ctx)
	recoveryID.VerifyKey = nil
	if _, err := nodes[0].env.Enroll(ctx, recoveryID); err != nil {
		t.Fatal(err)
	}
	kek := make([]byte, 32)
	rand.Read(kek)
	kid := kleidi.KeyIDForTest("insecure", kek)
	rc, _ := kleiditest.OpenInsecureRecipient(recoveryID)
	blob, _ := rc.Wrap(ctx, kek)
	updateRing(t, nodes[0].ring, func(r *kleidi.Ring) {
		r.Keys = append(r.Keys, kleidi.KeyRecord{ID: kid, Created: time.Now().UTC().Truncate(time.Second), State: kleidi.KeyRetired,
			Wrapped: []kleidi.WrappedKey{{Root: "insecure", Recipient: recoveryID.ID(), Blob: blob}}})
	})
	if _, err := nodes[0].env.Rotate(ctx); err != nil { // honest write keeps the planted record
		t.Fatal(err)
	}
	fresh := newTestNode()
	copyRing(t, nodes[0], fresh)
	// One planted record does not stop a recovery: it is left out and named.
	err := kleidi.Recover(ctx, fresh.ring, recoveryNode, recoveryID, kleiditest.OpenInsecureRecipient, fresh.p, nodes[0].env.MemberID())
	if err == nil || !strings.Contains(err.Error(), kid) || strings.Contains(err.Error(), "%!") {
		t.Errorf("Recover() err = %v, want it to name the key it left out, %s", err, kid)
	}
	r, _ := fresh.ring.Load(ctx)
	for _, k := range r.Keys {
		if k.ID == kid {
			t.Errorf("Recover adopted the unsigned KEK %s", kid)
		}
	}
	if err := fresh.start(t); err != nil || fresh.env.KeyID() != nodes[0].env.KeyID() {
		t.Errorf("the recovered node: %v", err)
	}
}

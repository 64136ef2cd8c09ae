package kleidi_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

// A cluster of nodes, each with its own root of trust and its own copy of the keyring, as control-plane nodes
// have: copying the keyring from one to another is all that links them.
type testNode struct {
	p    *kleiditest.Node
	ring *kleidi.MemoryKeyring
	env  *kleidi.Envelope
}

func newTestNode() *testNode {
	return &testNode{p: kleiditest.NewInsecureNode(), ring: kleidi.NewMemoryKeyring()}
}

func (n *testNode) id(t testing.TB) *kleidi.Identity {
	t.Helper()
	id, err := n.p.Identity(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// start opens the node's Envelope on its keyring, trusting the members that endorsed it, as a new node does.
func (n *testNode) start(t testing.TB, opts ...kleidi.Option) error {
	t.Helper()
	opts = append([]kleidi.Option{kleidi.WithRecipientOpener("insecure", kleiditest.OpenInsecureRecipient)}, opts...)
	env, err := kleidi.NewEnvelope(ctx, n.p, n.ring, opts...)
	if err != nil {
		return err
	}
	n.env = env
	t.Cleanup(func() { env.Close() })
	return nil
}

// copyRing makes to's keyring a copy of from's.
func copyRing(t testing.TB, from, to *testNode) {
	t.Helper()
	ring, err := from.ring.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := to.ring.Update(ctx, func(r *kleidi.Ring) error { *r = ring; return nil }); err != nil {
		t.Fatal(err)
	}
}

func updateRing(t *testing.T, ring kleidi.Keyring, change func(*kleidi.Ring)) {
	t.Helper()
	if _, err := ring.Update(ctx, func(r *kleidi.Ring) error { change(r); return nil }); err != nil {
		t.Fatal(err)
	}
}

// newCluster starts node 0 on a new keyring and enrolls the others from it; every node starts with a copy.
func newCluster(t testing.TB, n int) []*testNode {
	t.Helper()
	nodes := make([]*testNode, n)
	for i := range nodes {
		nodes[i] = newTestNode()
	}
	if err := nodes[0].start(t, kleidi.WithCreateIfEmpty()); err != nil {
		t.Fatal(err)
	}
	for _, m := range nodes[1:] {
		if _, err := nodes[0].env.Enroll(ctx, m.id(t)); err != nil {
			t.Fatalf("Enroll() err = %v", err)
		}
	}
	for _, m := range nodes[1:] {
		copyRing(t, nodes[0], m)
		if err := m.start(t); err != nil {
			t.Fatalf("a node enrolled by node 0 does not start: %v", err)
		}
	}
	return nodes
}

func encryptOn(t *testing.T, n *testNode, plaintext string) *kleidi.Ciphertext {
	t.Helper()
	c, err := n.env.Encrypt(ctx, []byte(plaintext), nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestMembersReadEachOthersData(t *testing.T) {
	nodes := newCluster(t, 3)
	for i, from := range nodes {
		c := encryptOn(t, from, "written on a node")
		// Without the attached key: every node reads through its own copy in the keyring.
		bare, err := kleidi.ParseCiphertext(c.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		for j, to := range nodes {
			got, err := to.env.Decrypt(ctx, bare, nil)
			if err != nil || string(got) != "written on a node" {
				t.Errorf("node %d reads what node %d wrote: %q, %v", j, i, got, err)
			}
		}
		if from.env.KeyID() != nodes[0].env.KeyID() {
			t.Errorf("node %d key ID %s, node 0 %s", i, from.env.KeyID(), nodes[0].env.KeyID())
		}
	}
	// Each node imported its copy: its keyring now holds a copy it made and proved itself, no shared one.
	for i, n := range nodes[1:] {
		ring, _ := n.ring.Load(ctx)
		for _, w := range ring.Keys[0].Wrapped {
			if w.Recipient == n.env.MemberID() && w.Sender != "" {
				t.Errorf("node %d still holds the shared copy after its start", i+1)
			}
		}
	}
}

func TestCoordinatedRotation(t *testing.T) {
	nodes := newCluster(t, 3)
	old := nodes[0].env.KeyID()
	staged, err := nodes[0].env.Stage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if nodes[0].env.KeyID() != old {
		t.Fatalf("Stage() switched the active key")
	}
	// A node that has not received the staged key refuses to activate it.
	if err := nodes[1].env.Activate(ctx, staged); !errors.Is(err, kleidi.ErrUnknownKey) {
		t.Errorf("Activate(key not in this node's keyring) err = %v, want kleidi.ErrUnknownKey", err)
	}
	for _, n := range nodes[1:] {
		copyRing(t, nodes[0], n)
		if err := n.env.Reload(ctx); err != nil {
			t.Fatal(err)
		}
		if n.env.KeyID() != old {
			t.Errorf("a staged key became active on reload")
		}
	}
	// Staged: every node decrypts under it already.
	for _, n := range nodes {
		if err := n.env.Activate(ctx, staged); err != nil {
			t.Fatalf("Activate(staged) err = %v", err)
		}
		if n.env.KeyID() != staged {
			t.Errorf("after Activate, KeyID() = %s, want %s", n.env.KeyID(), staged)
		}
	}
	for _, from := range nodes {
		c := encryptOn(t, from, "after rotation")
		for _, to := range nodes {
			if _, err := to.env.Decrypt(ctx, c, nil); err != nil {
				t.Errorf("Decrypt after coordinated rotation: %v", err)
			}
		}
	}
	if err := nodes[0].env.Activate(ctx, old); err == nil {
		t.Errorf("Activate(retired key) err = nil: key IDs must never be reused")
	}
}

func TestActivateRefusesAKeyThisNodeCannotUnwrap(t *testing.T) {
	nodes := newCluster(t, 2)
	// A staged key made by a node that does not know node 1 (its keyring has no members).
	stranger := newTestNode()
	copyRing(t, nodes[1], stranger)
	updateRing(t, stranger.ring, func(r *kleidi.Ring) { r.Members = nil })
	// The stranger cannot even start: it holds no copy of the keyring's keys.
	if err := stranger.start(t); err == nil {
		t.Fatalf("a root with no copy started on the keyring")
	}
	staged, err := nodes[0].env.Stage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	copyRing(t, nodes[0], nodes[1])
	updateRing(t, nodes[1].ring, func(r *kleidi.Ring) {
		for i := range r.Keys {
			if r.Keys[i].ID == staged {
				r.Keys[i].Wrapped = slices.DeleteFunc(r.Keys[i].Wrapped, func(w kleidi.WrappedKey) bool { return w.Recipient == nodes[1].env.MemberID() })
			}
		}
	})
	if err := nodes[1].env.Activate(ctx, staged); err == nil || nodes[1].env.KeyID() == staged {
		t.Errorf("Activate(key with no copy for this node) err = %v, want an error and no switch", err)
	}
}

// A party that can write the keyring and knows a node's identity (its public keys) makes a KEK of its choosing,
// wraps it for the node and puts it in the keyring as the active key. The node must never use it.
func TestForgedSharedCopyIsRefused(t *testing.T) {
	nodes := newCluster(t, 2)
	victim := nodes[1]
	attacker := kleiditest.NewInsecureNode() // a root of trust the attacker holds
	attackerID, _ := attacker.Identity(ctx)
	kek := bytes.Repeat([]byte{0x42}, kleidi.KeySize)
	id := kleidi.KeyIDForTest("insecure", kek)
	rcpt, err := kleiditest.OpenInsecureRecipient(victim.id(t))
	if err != nil {
		t.Fatal(err)
	}
	blob, err := rcpt.Wrap(ctx, kek)
	if err != nil {
		t.Fatal(err)
	}
	sig, _ := attacker.Sign(ctx, kleidi.SharedCopyMessageForTest(id, attackerID.ID(), victim.env.MemberID(), blob))
	endorsement, _ := attacker.Sign(ctx, kleidi.EndorsementMessageForTest(attackerID.ID(), attackerID.ID()))
	nodeZero := nodes[0].env.MemberID()
	cases := map[string]struct {
		sender string
		proof  []byte
		member bool // the attacker adds itself as a self-endorsed member
	}{
		"signed by a stranger":                  {attackerID.ID(), sig, false},
		"signed by a self-endorsed member":      {attackerID.ID(), sig, true},
		"claimed to come from a trusted member": {nodeZero, sig, false},
		"from a trusted member, with no proof":  {nodeZero, []byte{1}, false},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			copyRing(t, nodes[0], victim)
			if err := victim.env.Reload(ctx); err != nil { // imports the genuine copies again
				t.Fatal(err)
			}
			updateRing(t, victim.ring, func(r *kleidi.Ring) {
				for i := range r.Keys {
					r.Keys[i].State = kleidi.KeyRetired
				}
				r.Keys = append(r.Keys, kleidi.KeyRecord{ID: id, Created: time.Now().UTC().Truncate(time.Second), State: kleidi.KeyActive,
					Wrapped: []kleidi.WrappedKey{{Root: "insecure", Recipient: victim.env.MemberID(), Sender: tc.sender, Blob: blob, Proof: tc.proof}}})
				if tc.member {
					r.Members = append(r.Members, kleidi.Member{ID: attackerID.ID(), Identity: *attackerID, Added: time.Now().UTC().Truncate(time.Second),
						Endorser: attackerID.ID(), Endorsement: endorsement})
				}
			})
			unwraps := victim.p.Calls(kleiditest.OpUnwrap)
			before := victim.env.KeyID()
			if err := victim.env.Reload(ctx); !errors.Is(err, kleidi.ErrUnauthenticated) {
				t.Errorf("Reload(forged active key) err = %v, want kleidi.ErrUnauthenticated", err)
			}
			if victim.env.KeyID() != before {
				t.Errorf("the node switched to the forged key")
			}
			if n := victim.p.Calls(kleiditest.OpUnwrap) - unwraps; n != 0 {
				t.Errorf("the forged copy cost %d unwraps, want 0", n)
			}
			// A fresh start on that keyring fails too, and a ciphertext under the forged key does not decrypt.
			fresh := &testNode{p: victim.p, ring: victim.ring}
			if err := fresh.start(t); !errors.Is(err, kleidi.ErrUnauthenticated) {
				t.Errorf("NewEnvelope(keyring with a forged active key) err = %v, want kleidi.ErrUnauthenticated", err)
			}
			_, forged := kleiditest.ForgeCiphertext("insecure", kek, []byte("the attacker's plaintext"))
			c, _ := kleidi.ParseCiphertext(forged)
			if got, err := victim.env.Decrypt(ctx, c, nil); err == nil {
				t.Errorf("Decrypt(forged ciphertext) = %q, want an error", got)
			}
		})
	}
}

// A member nobody trusted endorsed never receives a KEK, so writing the keyring cannot make a node disclose one.
func TestUnendorsedMemberReceivesNothing(t *testing.T) {
	nodes := newCluster(t, 2)
	attacker := kleiditest.NewInsecureNode()
	attackerID, _ := attacker.Identity(ctx)
	endorsement, _ := attacker.Sign(ctx, kleidi.EndorsementMessageForTest(attackerID.ID(), attackerID.ID()))
	// It also claims to be endorsed by node 0, with node 1's endorsement bytes replayed.
	ring, _ := nodes[0].ring.Load(ctx)
	var replayed []byte
	for _, m := range ring.Members {
		if m.ID == nodes[1].env.MemberID() {
			replayed = m.Endorsement
		}
	}
	for _, m := range []kleidi.Member{
		{ID: attackerID.ID(), Identity: *attackerID, Endorser: attackerID.ID(), Endorsement: endorsement},
	} {
		updateRing(t, nodes[0].ring, func(r *kleidi.Ring) { r.Members = append(r.Members, m) })
	}
	other := kleiditest.NewInsecureNode()
	otherID, _ := other.Identity(ctx)
	updateRing(t, nodes[0].ring, func(r *kleidi.Ring) {
		r.Members = append(r.Members, kleidi.Member{ID: otherID.ID(), Identity: *otherID, Endorser: nodes[0].env.MemberID(), Endorsement: replayed})
	})
	if err := nodes[0].env.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	id, err := nodes[0].env.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ring, _ = nodes[0].ring.Load(ctx)
	for _, r := range ring.Keys {
		if r.ID != id {
			continue
		}
		for _, w := range r.Wrapped {
			if w.Recipient == attackerID.ID() || w.Recipient == otherID.ID() {
				t.Errorf("the new KEK was wrapped for %s, whom no trusted member endorsed", w.Recipient)
			}
			if w.Recipient == nodes[1].env.MemberID() && w.Sender == "" {
				t.Errorf("node 1's copy has no sender")
			}
		}
	}
	if got := nodes[0].env.NodeState().Trusted; slices.Contains(got, attackerID.ID()) || slices.Contains(got, otherID.ID()) {
		t.Errorf("NodeState().Trusted = %v includes an unendorsed member", got)
	}
}

// A node pinned who endorsed it when it joined; rewriting its endorsement in the keyring does not move its trust.
func TestPinnedTrustSurvivesARewrittenEndorsement(t *testing.T) {
	nodes := newCluster(t, 2)
	pinned := nodes[1].env.NodeState()
	attacker := kleiditest.NewInsecureNode()
	attackerID, _ := attacker.Identity(ctx)
	endorsement, _ := attacker.Sign(ctx, kleidi.EndorsementMessageForTest(attackerID.ID(), attackerID.ID()))
	victimEndorsement, _ := attacker.Sign(ctx, kleidi.EndorsementMessageForTest(attackerID.ID(), nodes[1].env.MemberID()))
	updateRing(t, nodes[1].ring, func(r *kleidi.Ring) {
		r.Members = append(r.Members, kleidi.Member{ID: attackerID.ID(), Identity: *attackerID, Endorser: attackerID.ID(), Endorsement: endorsement})
		for i := range r.Members {
			if r.Members[i].ID == nodes[1].env.MemberID() {
				r.Members[i].Endorser, r.Members[i].Endorsement = attackerID.ID(), victimEndorsement
			}
		}
	})
	env, err := kleidi.NewEnvelope(ctx, nodes[1].p, nodes[1].ring, kleidi.WithRecipientOpener("insecure", kleiditest.OpenInsecureRecipient),
		kleidi.WithNodeState(pinned))
	if err != nil {
		t.Fatal(err)
	}
	defer env.Close()
	if slices.Contains(env.NodeState().Trusted, attackerID.ID()) {
		t.Errorf("a node with pinned members trusts a member endorsed by nobody it trusts")
	}
}

func TestUnenroll(t *testing.T) {
	nodes := newCluster(t, 3)
	gone := nodes[2]
	before := encryptOn(t, nodes[0], "before")
	newID, err := nodes[0].env.Unenroll(ctx, gone.env.MemberID())
	if err != nil {
		t.Fatal(err)
	}
	if nodes[0].env.KeyID() != newID {
		t.Errorf("Unenroll did not rotate")
	}
	ring, _ := nodes[0].ring.Load(ctx)
	for _, r := range ring.Keys {
		for _, w := range r.Wrapped {
			if w.Recipient == gone.env.MemberID() {
				t.Errorf("key %s keeps a copy for the unenrolled member", r.ID)
			}
		}
	}
	if slices.ContainsFunc(ring.Members, func(m kleidi.Member) bool { return m.ID == gone.env.MemberID() }) {
		t.Errorf("the unenrolled member is still a member")
	}
	copyRing(t, nodes[0], nodes[1])
	copyRing(t, nodes[0], gone)
	if err := nodes[1].env.Reload(ctx); err != nil || nodes[1].env.KeyID() != newID {
		t.Errorf("a remaining member does not follow: %v", err)
	}
	after := encryptOn(t, nodes[0], "after")
	if _, err := gone.env.Decrypt(ctx, after, nil); err == nil {
		t.Errorf("the unenrolled node decrypts data under the new key")
	}
	if _, err := nodes[1].env.Decrypt(ctx, before, nil); err != nil {
		t.Errorf("data from before the unenroll: %v", err)
	}
	if _, err := nodes[0].env.Unenroll(ctx, nodes[0].env.MemberID()); err == nil {
		t.Errorf("a node unenrolled itself")
	}
}

func TestEndorsersAndTrustedMembers(t *testing.T) {
	nodes := newCluster(t, 3)
	ring, _ := nodes[2].ring.Load(ctx)
	if got, want := ring.Endorsers(nodes[2].env.MemberID()), []string{nodes[0].env.MemberID()}; !slices.Equal(got, want) {
		t.Errorf("Endorsers(node 2) = %v, want %v", got, want)
	}
	for i, n := range nodes {
		if got := n.env.NodeState().Trusted; len(got) != 3 || !slices.Contains(got, n.env.MemberID()) {
			t.Errorf("node %d trusts %v, want the 3 members, itself included", i, got)
		}
	}
}

// Every node's root is lost; the offline recovery key rebuilds a keyring for a new root, and nothing is lost.
func TestRecover(t *testing.T) {
	nodes := newCluster(t, 2)
	recoveryNode := kleiditest.NewInsecureNode() // its private part is "offline"
	recoveryID, _ := recoveryNode.Identity(ctx)
	recoveryID.VerifyKey = nil // a recovery key only receives
	if _, err := nodes[0].env.Enroll(ctx, recoveryID); err != nil {
		t.Fatal(err)
	}
	before := encryptOn(t, nodes[0], "before the rotation")
	if _, err := nodes[0].env.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	after := encryptOn(t, nodes[0], "after the rotation")

	fresh := newTestNode()
	copyRing(t, nodes[0], fresh)
	backup, _ := fresh.ring.Load(ctx)
	if err := kleidi.Recover(ctx, fresh.ring, recoveryNode, recoveryID, kleiditest.OpenInsecureRecipient, fresh.p); err == nil {
		t.Fatalf("Recover() with no trusted member err = nil")
	}
	trusted := nodes[1].env.NodeState().Trusted // what a lost node's state backup holds
	if err := kleidi.Recover(ctx, fresh.ring, recoveryNode, recoveryID, kleiditest.OpenInsecureRecipient, fresh.p, trusted...); err != nil {
		t.Fatalf("Recover() err = %v", err)
	}
	if err := fresh.start(t); err != nil {
		t.Fatalf("the recovered node does not start: %v", err)
	}
	for _, c := range []*kleidi.Ciphertext{before, after} {
		bare, _ := kleidi.ParseCiphertext(c.Bytes())
		if _, err := fresh.env.Decrypt(ctx, bare, nil); err != nil {
			t.Errorf("recovered node: Decrypt: %v", err)
		}
	}
	if fresh.env.KeyID() != nodes[0].env.KeyID() {
		t.Errorf("recovered active key %s, want %s", fresh.env.KeyID(), nodes[0].env.KeyID())
	}
	// The recovered keyring still has the recovery key as a member: a second recovery works too.
	again := newTestNode()
	copyRing(t, fresh, again)
	if err := kleidi.Recover(ctx, again.ring, recoveryNode, recoveryID, kleiditest.OpenInsecureRecipient, again.p, fresh.env.MemberID()); err != nil {
		t.Errorf("second Recover() err = %v", err)
	}

	// A copy for the recovery key that no member signed is refused: recovery never adopts a KEK it cannot trace.
	forged := newTestNode()
	updateRing(t, forged.ring, func(r *kleidi.Ring) { *r = backup })
	updateRing(t, forged.ring, func(r *kleidi.Ring) {
		for i := range r.Keys {
			for j := range r.Keys[i].Wrapped {
				if r.Keys[i].Wrapped[j].Recipient == recoveryID.ID() {
					r.Keys[i].Wrapped[j].Proof = []byte{1, 2, 3}
				}
			}
		}
	})
	if err := kleidi.Recover(ctx, forged.ring, recoveryNode, recoveryID, kleiditest.OpenInsecureRecipient, forged.p, trusted...); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("Recover(unsigned recovery copies) err = %v, want kleidi.ErrUnauthenticated", err)
	}
}

// BenchmarkEncryptMembers encrypts under a keyring shared by 1, 3 and 5 members. The attached key carries only
// the encrypting node's own copy, so what each stored object pays does not grow with the members: stored-bytes
// reports the ciphertext and its attached key, all-copies-bytes what attaching every member's copy would add.
func BenchmarkEncryptMembers(b *testing.B) {
	for _, n := range []int{1, 3, 5} {
		b.Run(fmt.Sprintf("members=%d", n), func(b *testing.B) {
			nodes := newCluster(b, n)
			ring, _ := nodes[0].ring.Load(ctx)
			copies := 0
			for _, w := range ring.Keys[len(ring.Keys)-1].Wrapped {
				copies += len(w.Blob) + len(w.Proof) + len(w.Recipient) + len(w.Sender)
			}
			plaintext := bytes.Repeat([]byte("s"), 1024)
			b.ReportAllocs()
			b.ResetTimer()
			var c *kleidi.Ciphertext
			for b.Loop() {
				c, _ = nodes[0].env.Encrypt(ctx, plaintext, nil)
			}
			b.ReportMetric(float64(len(c.Bytes())+len(c.AttachedKey)), "stored-bytes")
			b.ReportMetric(float64(len(c.Bytes())+copies), "all-copies-bytes")
		})
	}
}

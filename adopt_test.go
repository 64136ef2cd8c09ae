package kleidi_test

import (
	"errors"
	"slices"
	"testing"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

// published returns n's keyring as the bytes it would publish to the other nodes.
func published(t *testing.T, n *testNode) []byte {
	t.Helper()
	ring, err := n.ring.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b, err := kleidi.EncodeKeyringForTest(ring)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestAdoptSwitchesAndKeepsOwnCopies(t *testing.T) {
	nodes := newCluster(t, 3)
	old := nodes[0].env.KeyID()
	staged, err := nodes[0].env.Stage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes[1:] {
		if err := n.env.Adopt(ctx, published(t, nodes[0])); err != nil {
			t.Fatalf("Adopt(staged keyring) err = %v", err)
		}
		if !n.env.Holds(staged) || n.env.KeyID() != old {
			t.Errorf("after adopting a staged key: Holds = %v, KeyID %s; want true, %s", n.env.Holds(staged), n.env.KeyID(), old)
		}
	}
	if err := nodes[0].env.Activate(ctx, staged); err != nil {
		t.Fatal(err)
	}
	for i, n := range nodes[1:] {
		if err := n.env.Adopt(ctx, published(t, nodes[0])); err != nil {
			t.Fatalf("Adopt(activated keyring) err = %v", err)
		}
		if n.env.KeyID() != staged {
			t.Errorf("node %d KeyID %s after adopting, want %s", i+1, n.env.KeyID(), staged)
		}
		// Its own copies, made when it imported, are kept: the published keyring has only node 0's shared ones.
		ring, _ := n.ring.Load(ctx)
		for _, r := range ring.Keys {
			own := slices.ContainsFunc(r.Wrapped, func(w kleidi.WrappedKey) bool { return w.Recipient == n.env.MemberID() && w.Sender == "" })
			if !own {
				t.Errorf("node %d: key %s has no copy of its own after Adopt", i+1, r.ID)
			}
		}
		c := encryptOn(t, n, "after adoption")
		bare, _ := kleidi.ParseCiphertext(c.Bytes())
		if got, err := nodes[0].env.Decrypt(ctx, bare, nil); err != nil || string(got) != "after adoption" {
			t.Errorf("node 0 reads node %d's data: %q, %v", i+1, got, err)
		}
	}
}

func TestAdoptRefusesAKeyringThatDropsAKey(t *testing.T) {
	nodes := newCluster(t, 2)
	if _, err := nodes[0].env.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	if err := nodes[1].env.Adopt(ctx, published(t, nodes[0])); err != nil {
		t.Fatal(err)
	}
	before := published(t, nodes[1])
	updateRing(t, nodes[0].ring, func(r *kleidi.Ring) { r.Keys = r.Keys[1:] })
	if err := nodes[1].env.Adopt(ctx, published(t, nodes[0])); !errors.Is(err, kleidi.ErrInvalidKeyring) {
		t.Errorf("Adopt(keyring without the first key) err = %v, want kleidi.ErrInvalidKeyring", err)
	}
	if string(published(t, nodes[1])) != string(before) {
		t.Error("a refused Adopt changed the keyring")
	}
}

// The attack: whoever writes what nodes adopt (the cluster API) hands a node a keyring whose active KEK is the
// attacker's, wrapped for the node and signed by a member the attacker made up and endorsed itself.
func TestAdoptRefusesAKEKOfAnAttackersChoosing(t *testing.T) {
	nodes := newCluster(t, 2)
	victim := nodes[1]
	before, keyID := published(t, victim), victim.env.KeyID()

	attacker := newTestNode()
	if err := attacker.start(t, kleidi.WithCreateIfEmpty()); err != nil {
		t.Fatal(err)
	}
	if _, err := attacker.env.Enroll(ctx, victim.id(t)); err != nil {
		t.Fatal(err)
	}
	forged, _ := attacker.ring.Load(ctx)
	genuine, _ := victim.ring.Load(ctx)
	// The victim's keys stay (nothing is dropped), now retired; the attacker's key is active, and the attacker and
	// the victim's genuine members are all there.
	for _, r := range genuine.Keys {
		r.State = kleidi.KeyRetired
		forged.Keys = append([]kleidi.KeyRecord{r}, forged.Keys...)
	}
	for _, m := range genuine.Members {
		if !slices.ContainsFunc(forged.Members, func(x kleidi.Member) bool { return x.ID == m.ID }) {
			forged.Members = append(forged.Members, m)
		}
	}
	b, err := kleidi.EncodeKeyringForTest(forged)
	if err != nil {
		t.Fatal(err)
	}
	if err := victim.env.Adopt(ctx, b); !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("Adopt(keyring with the attacker's KEK) err = %v, want kleidi.ErrUnauthenticated", err)
	}
	if victim.env.KeyID() != keyID {
		t.Errorf("KeyID() = %s after the refused keyring, want %s", victim.env.KeyID(), keyID)
	}
	if string(published(t, victim)) != string(before) {
		t.Error("a refused Adopt left the attacker's keyring in place")
	}
	// A node that has just joined trusts only what it was told to: it holds no copy of its own yet.
	joining := newTestNode()
	if _, err := nodes[0].env.Enroll(ctx, joining.id(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := attacker.env.Enroll(ctx, joining.id(t)); err != nil {
		t.Fatal(err)
	}
	copyRing(t, attacker, joining)
	err = joining.start(t, kleidi.WithNodeState(kleidi.NodeState{Trusted: []string{nodes[0].env.MemberID()}}))
	if err == nil {
		t.Errorf("a node told to trust node 0 started on the attacker's keyring with key %s", joining.env.KeyID())
	}
}

func TestForget(t *testing.T) {
	nodes := newCluster(t, 2)
	old := nodes[0].env.KeyID()
	secret := encryptOn(t, nodes[0], "under the old key")
	if err := nodes[0].env.Forget(ctx, old); err == nil {
		t.Error("Forget(active key) succeeded")
	}
	newID, err := nodes[0].env.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := nodes[0].env.Forget(ctx, newID); err == nil {
		t.Error("Forget(the new active key) succeeded")
	}
	if err := nodes[1].env.Adopt(ctx, published(t, nodes[0])); err != nil {
		t.Fatal(err)
	}
	stale := published(t, nodes[0])
	for _, n := range nodes {
		if err := n.env.Forget(ctx, old); err != nil {
			t.Fatalf("Forget(retired key) err = %v", err)
		}
		if n.env.Holds(old) {
			t.Error("Holds(forgotten key) = true")
		}
		// Not from the keyring, and not from the key attached to the ciphertext either.
		if got, err := n.env.Decrypt(ctx, secret, nil); !errors.Is(err, kleidi.ErrUnknownKey) {
			t.Errorf("Decrypt(under a forgotten key) = %q, %v; want kleidi.ErrUnknownKey", got, err)
		}
		if !slices.Contains(n.env.NodeState().Forgotten, old) {
			t.Errorf("NodeState().Forgotten = %v, want %s in it", n.env.NodeState().Forgotten, old)
		}
	}
	// A keyring that still has the key (published by a node before it forgot it) is adopted without it.
	if err := nodes[1].env.Adopt(ctx, stale); err != nil {
		t.Fatalf("Adopt(keyring with a forgotten key) err = %v", err)
	}
	if nodes[1].env.Holds(old) {
		t.Error("Holds(forgotten key) = true after adopting a keyring that has it")
	}
	if got, err := nodes[1].env.Decrypt(ctx, secret, nil); err == nil {
		t.Errorf("Decrypt after adopting a keyring with the forgotten key = %q", got)
	}
	// A restart with the saved node state still refuses the forgotten key.
	env, err := kleidi.NewEnvelope(ctx, nodes[1].p, nodes[1].ring, kleidi.WithNodeState(nodes[1].env.NodeState()),
		kleidi.WithRecipientOpener("insecure", kleiditest.OpenInsecureRecipient))
	if err != nil {
		t.Fatal(err)
	}
	defer env.Close()
	if _, err := env.Decrypt(ctx, secret, nil); !errors.Is(err, kleidi.ErrUnknownKey) {
		t.Errorf("Decrypt after a restart, under a forgotten key: err = %v, want kleidi.ErrUnknownKey", err)
	}
}

func TestActivateRefusesAKeyNotWrappedForEveryMember(t *testing.T) {
	nodes := newCluster(t, 3)
	staged, err := nodes[0].env.Stage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	left := nodes[2].env.MemberID()
	updateRing(t, nodes[0].ring, func(r *kleidi.Ring) {
		for i := range r.Keys {
			if r.Keys[i].ID == staged {
				r.Keys[i].Wrapped = slices.DeleteFunc(r.Keys[i].Wrapped, func(w kleidi.WrappedKey) bool { return w.Recipient == left })
			}
		}
	})
	if err := nodes[0].env.Activate(ctx, staged); err == nil {
		t.Errorf("Activate(key with no copy for member %s) succeeded: that node could not read what this one writes", left)
	}
}

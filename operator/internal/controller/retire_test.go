package controller

import (
	"context"
	"slices"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/events"
	"sigs.k8s.io/controller-runtime/pkg/client"

	kleidiv1 "github.com/kleidi-kms/kleidi/operator/api/v1alpha1"
)

// TestRetireDecidesBeforeAsking plays a rotation whose status write is lost in the middle of Retiring. Which keys
// every node forgets is decided from the coordinator's keyring, and it must be written before any node is asked to
// forget: once the coordinator has forgotten a key, its keyring no longer says the key was retired, and a decision
// made again would be empty, ending the rotation with the other nodes still holding the key.
func TestRetireDecidesBeforeAsking(t *testing.T) {
	_, c := startAPI(t)
	ctx := context.Background()
	now := metav1.Now()
	keys := []kleidiv1.NodeKey{{ID: "kleidi-gpg-k0", State: "retired", Held: true}, {ID: "kleidi-gpg-k1", State: "active", Held: true}}
	for name, member := range map[string]string{"cp-a": "gpg-a", "cp-b": "gpg-b"} {
		kn := &kleidiv1.KleidiNode{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: kleidiv1.KleidiNodeSpec{ApprovedMemberID: member}}
		if err := c.Create(ctx, kn); err != nil {
			t.Fatal(err)
		}
		kn.Status = kleidiv1.KleidiNodeStatus{MemberID: member, Joined: true, Healthy: true, HeartbeatTime: &now,
			Provider: "gpg", ActiveKeyID: "kleidi-gpg-k1", Keys: keys}
		if err := c.Status().Update(ctx, kn); err != nil {
			t.Fatal(err)
		}
	}
	r := &Reconciler{Client: c, Recorder: events.NewFakeRecorder(100), HeartbeatTimeout: time.Minute}
	plugin := &kleidiv1.KleidiPlugin{ObjectMeta: metav1.ObjectMeta{Name: kleidiv1.PluginName},
		Spec:   kleidiv1.KleidiPluginSpec{Provider: "gpg"},
		Status: kleidiv1.KleidiPluginStatus{Members: []string{"gpg-a", "gpg-b"}}}
	persisted := kleidiv1.KeyRotation{ObjectMeta: metav1.ObjectMeta{Name: "r1"}, Status: kleidiv1.KeyRotationStatus{
		Phase: kleidiv1.PhaseRetiring, Coordinator: "cp-a", KeyID: "kleidi-gpg-k1", PreviousKeyID: "kleidi-gpg-k0",
		RetireAfter: &metav1.Time{Time: now.Add(-time.Second)}}}
	// pass runs Retiring once on a copy of the rotation as last written, as the operator does after reading it.
	pass := func() *kleidiv1.KeyRotation {
		t.Helper()
		var nodes []*kleidiv1.KleidiNode
		for _, name := range []string{"cp-a", "cp-b"} {
			kn := &kleidiv1.KleidiNode{}
			if err := c.Get(ctx, client.ObjectKey{Name: name}, kn); err != nil {
				t.Fatal(err)
			}
			nodes = append(nodes, kn)
		}
		rot := persisted.DeepCopy()
		if _, err := r.retire(ctx, plugin, r.observe(plugin, nodes), rot); err != nil {
			t.Fatalf("retire() err = %v, want nil", err)
		}
		return rot
	}
	requests := func() (n int) {
		for _, name := range []string{"cp-a", "cp-b"} {
			kn := &kleidiv1.KleidiNode{}
			if err := c.Get(ctx, client.ObjectKey{Name: name}, kn); err != nil {
				t.Fatal(err)
			}
			if kn.Spec.Request != nil {
				n++
			}
		}
		return n
	}

	// The first pass decides, and asks nobody; its status write is lost. The next pass decides the same.
	for i := range 2 {
		rot := pass()
		if !slices.Equal(rot.Status.Forgotten, []string{"kleidi-gpg-k0"}) || rot.Status.Phase != kleidiv1.PhaseRetiring {
			t.Fatalf("pass %d: forgotten %v, phase %s; want [kleidi-gpg-k0], Retiring", i+1, rot.Status.Forgotten, rot.Status.Phase)
		}
		if n := requests(); n != 0 {
			t.Fatalf("pass %d: %d nodes asked to forget before the decision was written, want 0", i+1, n)
		}
		if i == 1 {
			persisted.Status = rot.Status // this write lands
		}
	}
	// With the decision read back, every node holding the key is asked to forget it.
	if rot := pass(); rot.Status.Phase != kleidiv1.PhaseRetiring || requests() != 2 {
		t.Fatalf("after the decision: phase %s, %d nodes asked; want Retiring, 2", rot.Status.Phase, requests())
	}
}

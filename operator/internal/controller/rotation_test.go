package controller

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	svmv1 "k8s.io/api/storagemigration/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	kleidiv1 "github.com/kleidi-kms/kleidi/operator/api/v1alpha1"
)

const controlPlane = "node-role.kubernetes.io/control-plane"

func getPlugin(t *testing.T, c client.Client) *kleidiv1.KleidiPlugin {
	t.Helper()
	var p kleidiv1.KleidiPlugin
	if err := c.Get(context.Background(), client.ObjectKey{Name: kleidiv1.PluginName}, &p); err != nil {
		t.Fatal(err)
	}
	return &p
}

func getRotation(t *testing.T, c client.Client, name string) *kleidiv1.KeyRotation {
	t.Helper()
	var r kleidiv1.KeyRotation
	if err := c.Get(context.Background(), client.ObjectKey{Name: name}, &r); err != nil {
		t.Fatal(err)
	}
	return &r
}

func getNode(t *testing.T, c client.Client, name string) *kleidiv1.KleidiNode {
	t.Helper()
	var kn kleidiv1.KleidiNode
	if err := c.Get(context.Background(), client.ObjectKey{Name: name}, &kn); err != nil {
		t.Fatal(err)
	}
	return &kn
}

func condition(conds []metav1.Condition, typ string) string {
	c := meta.FindStatusCondition(conds, typ)
	if c == nil {
		return typ + "=<none>"
	}
	return fmt.Sprintf("%s=%s reason=%s message=%q", typ, c.Status, c.Reason, c.Message)
}

func svms(t *testing.T, c client.Client) []svmv1.StorageVersionMigration {
	t.Helper()
	var l svmv1.StorageVersionMigrationList
	if err := c.List(context.Background(), &l); err != nil {
		t.Fatalf("List(StorageVersionMigrations) err = %v, want nil", err)
	}
	return l.Items
}

// TestNodesEnrollmentAndRotation follows a cluster from its first KleidiNodes to a completed rotation: the
// operator makes KleidiNodes for control-plane Nodes only, takes the first approved node's keyring as the record,
// enrolls a joining node, and walks a KeyRotation through every phase, Blocked (naming the node) while a node is
// silent and resuming when it reports again, never migrating while a node or a live kube-apiserver has not
// adopted the new key, and resuming after the operator restarts.
func TestNodesEnrollmentAndRotation(t *testing.T) {
	cfg, c := startAPI(t)
	ctx := context.Background()

	for _, n := range []struct {
		name   string
		labels map[string]string
	}{{"cp-a", map[string]string{controlPlane: ""}}, {"cp-b", map[string]string{controlPlane: ""}},
		{"cp-c", map[string]string{controlPlane: ""}}, {"worker-1", nil}} {
		if err := c.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.name, Labels: n.labels}}); err != nil {
			t.Fatal(err)
		}
	}
	plugin := &kleidiv1.KleidiPlugin{ObjectMeta: metav1.ObjectMeta{Name: kleidiv1.PluginName}, Spec: kleidiv1.KleidiPluginSpec{
		Provider: "gpg",
		Rotation: kleidiv1.RotationPolicy{RetiredKeyRetention: &metav1.Duration{Duration: 2 * time.Second}},
	}}
	if err := c.Create(ctx, plugin); err != nil {
		t.Fatal(err)
	}
	stop := startOperator(t, cfg)

	// KleidiNodes for the control-plane Nodes only, each owned by its Node.
	eventually(t, 20*time.Second, "KleidiNodes for control-plane nodes", func() string {
		var l kleidiv1.KleidiNodeList
		if err := c.List(ctx, &l); err != nil {
			return err.Error()
		}
		var names []string
		for _, kn := range l.Items {
			if len(kn.OwnerReferences) != 1 || kn.OwnerReferences[0].Kind != "Node" || kn.OwnerReferences[0].Name != kn.Name {
				return fmt.Sprintf("KleidiNode %s owners = %v, want its Node", kn.Name, kn.OwnerReferences)
			}
			names = append(names, kn.Name)
		}
		if !slices.Equal(names, []string{"cp-a", "cp-b", "cp-c"}) {
			return fmt.Sprintf("KleidiNodes = %v, want [cp-a cp-b cp-c]", names)
		}
		return ""
	})

	// cp-a and cp-b share an initialised keyring; cp-c joins.
	k0 := kleidiv1.NodeKey{ID: "kleidi-gpg-k0", State: "active", Held: true, Created: &metav1.Time{Time: time.Now()}}
	ring := simRing{Keys: []kleidiv1.NodeKey{k0}, Active: k0.ID, Members: []string{"gpg-a", "gpg-b"}}
	agents := map[string]*simAgent{
		"cp-a": {c: c, name: "cp-a", member: "gpg-a", joined: true, ring: ring},
		"cp-b": {c: c, name: "cp-b", member: "gpg-b", joined: true, ring: ring},
		"cp-c": {c: c, name: "cp-c", member: "gpg-c"},
	}
	for _, a := range agents {
		a.run(t)
	}
	eventually(t, 20*time.Second, "nodes awaiting approval", func() string {
		p := getPlugin(t, c)
		if cond := meta.FindStatusCondition(p.Status.Conditions, kleidiv1.ConditionEnrolling); cond == nil ||
			cond.Reason != kleidiv1.ReasonAwaitingApproval || !strings.Contains(cond.Message, "cp-c") {
			return condition(p.Status.Conditions, kleidiv1.ConditionEnrolling)
		}
		if len(p.Status.Keyring) != 0 {
			return "a keyring of record before any node was approved"
		}
		return ""
	})

	// The administrator approves the three member IDs.
	for name, a := range agents {
		kn := getNode(t, c, name)
		orig := kn.DeepCopy()
		kn.Spec.ApprovedMemberID = a.member
		// A merge patch of the spec alone, as kubectl patch does: the agent writes the status meanwhile.
		if err := c.Patch(ctx, kn, client.MergeFrom(orig)); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 30*time.Second, "bootstrap and enrollment of cp-c", func() string {
		p := getPlugin(t, c)
		if p.Status.KeyringSource != "cp-a" || !slices.Contains(p.Status.Members, "gpg-c") {
			return fmt.Sprintf("record from %q with members %v, want from cp-a with gpg-c", p.Status.KeyringSource, p.Status.Members)
		}
		if !meta.IsStatusConditionTrue(p.Status.Conditions, kleidiv1.ConditionReady) {
			return condition(p.Status.Conditions, kleidiv1.ConditionReady)
		}
		if want := (kleidiv1.NodeCounts{Total: 3, Approved: 3, Enrolled: 3, Healthy: 3, InSync: 3}); p.Status.Nodes != want {
			return fmt.Sprintf("nodes = %+v, want %+v", p.Status.Nodes, want)
		}
		return ""
	})
	if op := getNode(t, c, "cp-a").Status.LastOperation; op == nil || op.Type != kleidiv1.RequestEnroll || !op.Succeeded {
		t.Fatalf("cp-a lastOperation = %+v, want a successful Enroll", op)
	}

	// A rotation waits, Blocked and naming cp-b, while cp-b's agent is silent, and stages nothing.
	agents["cp-b"].set(func(s *simAgent) { s.down = true })
	eventually(t, 20*time.Second, "cp-b unavailable", func() string {
		p := getPlugin(t, c)
		if cond := meta.FindStatusCondition(p.Status.Conditions, kleidiv1.ConditionReady); cond == nil || cond.Status != metav1.ConditionFalse ||
			!strings.Contains(cond.Message, "cp-b (no agent report since") {
			return condition(p.Status.Conditions, kleidiv1.ConditionReady)
		}
		return ""
	})
	if err := c.Create(ctx, &kleidiv1.KeyRotation{ObjectMeta: metav1.ObjectMeta{Name: "r1"}, Spec: kleidiv1.KeyRotationSpec{Reason: "test"}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "r1 Blocked on cp-b", func() string {
		r := getRotation(t, c, "r1")
		b := meta.FindStatusCondition(r.Status.Conditions, kleidiv1.ConditionBlocked)
		if b == nil || b.Status != metav1.ConditionTrue || b.Reason != kleidiv1.ReasonNodeUnavailable || !strings.Contains(b.Message, "cp-b") {
			return condition(r.Status.Conditions, kleidiv1.ConditionBlocked)
		}
		return ""
	})
	if req := getNode(t, c, "cp-a").Spec.Request; req != nil && req.Type == kleidiv1.RequestStage {
		t.Fatalf("cp-a request = %+v while cp-b is unavailable, want no Stage", req)
	}
	if got := testutil.ToFloat64(rotationBlocked); got != 1 {
		t.Errorf("kleidi_operator_rotation_blocked = %v, want 1", got)
	}

	// cp-b comes back: the rotation stages and activates a key, then waits for every kube-apiserver.
	agents["cp-b"].set(func(s *simAgent) { s.down = false })
	var keyID string
	eventually(t, 30*time.Second, "r1 Observing", func() string {
		r := getRotation(t, c, "r1")
		if r.Status.Phase != kleidiv1.PhaseObserving {
			return fmt.Sprintf("phase %s; %s", r.Status.Phase, condition(r.Status.Conditions, kleidiv1.ConditionProgressing))
		}
		keyID = r.Status.KeyID
		p := condition(r.Status.Conditions, kleidiv1.ConditionProgressing)
		for _, n := range []string{"cp-a", "cp-b", "cp-c"} {
			if !strings.Contains(p, n) {
				return "Progressing does not name " + n + ": " + p
			}
		}
		return ""
	})
	r1 := getRotation(t, c, "r1")
	if r1.Status.Coordinator != "cp-a" || r1.Status.PreviousKeyID != k0.ID || r1.Status.ActivatedAt == nil {
		t.Errorf("r1 status = %+v, want coordinator cp-a, previous key %s, activatedAt set", r1.Status, k0.ID)
	}
	if op := getNode(t, c, "cp-a").Status.LastOperation; op == nil || op.ID != "r1-activate" || op.KeyID != keyID {
		t.Errorf("cp-a lastOperation = %+v, want r1-activate of %s", op, keyID)
	}
	if p := getPlugin(t, c); p.Status.ActiveKeyID != keyID || p.Status.KeyringSource != "cp-a" {
		t.Errorf("record active key %s from %s, want %s from cp-a", p.Status.ActiveKeyID, p.Status.KeyringSource, keyID)
	}
	if l := svms(t, c); len(l) != 0 {
		t.Fatalf("StorageVersionMigrations before adoption = %d, want 0", len(l))
	}

	// Every node adopts, but the identity leases say a fourth kube-apiserver is live: still no migration.
	var leases coordinationv1.LeaseList
	if err := c.List(ctx, &leases, client.InNamespace("kube-system"), client.MatchingLabels{"apiserver.kubernetes.io/identity": "kube-apiserver"}); err != nil {
		t.Fatal(err)
	}
	for i := len(leases.Items); i < 4; i++ {
		now := metav1.NewMicroTime(time.Now())
		l := &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("apiserver-extra-%d", i), Namespace: "kube-system",
				Labels: map[string]string{"apiserver.kubernetes.io/identity": "kube-apiserver"}},
			Spec: coordinationv1.LeaseSpec{RenewTime: &now, LeaseDurationSeconds: ptr(int32(3600))},
		}
		if err := c.Create(ctx, l); err != nil {
			t.Fatal(err)
		}
	}
	for _, a := range agents {
		a.set(func(s *simAgent) { s.adopts = true })
	}
	eventually(t, 20*time.Second, "r1 Blocked on the live leases", func() string {
		r := getRotation(t, c, "r1")
		if b := meta.FindStatusCondition(r.Status.Conditions, kleidiv1.ConditionBlocked); b == nil || b.Reason != kleidiv1.ReasonNotAdopted ||
			!strings.Contains(b.Message, "4 kube-apiservers are live") {
			return condition(r.Status.Conditions, kleidiv1.ConditionBlocked)
		}
		return ""
	})
	if l := svms(t, c); len(l) != 0 {
		t.Fatalf("StorageVersionMigrations with a live kube-apiserver that has not adopted = %d, want 0", len(l))
	}

	// The operator stops mid-rotation; the extra leases go; a new operator resumes from the status.
	stop()
	if err := c.DeleteAllOf(ctx, &coordinationv1.Lease{}, client.InNamespace("kube-system"), client.MatchingLabels{"apiserver.kubernetes.io/identity": "kube-apiserver"}); err != nil {
		t.Fatal(err)
	}
	startOperator(t, cfg)
	var svm *svmv1.StorageVersionMigration
	eventually(t, 20*time.Second, "r1 Migrating with a StorageVersionMigration for secrets", func() string {
		r := getRotation(t, c, "r1")
		l := svms(t, c)
		if r.Status.Phase != kleidiv1.PhaseMigrating || len(l) != 1 {
			return fmt.Sprintf("phase %s with %d migrations; %s", r.Status.Phase, len(l), condition(r.Status.Conditions, kleidiv1.ConditionBlocked))
		}
		svm = &l[0]
		return ""
	})
	if svm.Spec.Resource.Resource != "secrets" || svm.Spec.Resource.Group != "" || len(svm.OwnerReferences) != 1 ||
		svm.OwnerReferences[0].Name != "r1" || svm.OwnerReferences[0].Controller == nil {
		t.Errorf("StorageVersionMigration = %+v %+v, want secrets, controlled by r1", svm.Spec, svm.OwnerReferences)
	}
	// A migration that does not start is nudged with a write.
	eventually(t, 10*time.Second, "nudge Secret", func() string {
		var s corev1.Secret
		if err := c.Get(ctx, client.ObjectKey{Namespace: "kleidi-system", Name: NudgeSecret}, &s); err != nil {
			return err.Error()
		}
		return ""
	})

	// kube-controller-manager does not run here: play the migrator's part.
	meta.SetStatusCondition(&svm.Status.Conditions, metav1.Condition{Type: string(svmv1.MigrationSucceeded), Status: metav1.ConditionTrue, Reason: "Done", Message: "migrated"})
	if err := c.Status().Update(ctx, svm); err != nil {
		t.Fatalf("Status().Update(StorageVersionMigration) err = %v, want nil", err)
	}
	eventually(t, 30*time.Second, "r1 Succeeded", func() string {
		r := getRotation(t, c, "r1")
		if r.Status.Phase != kleidiv1.PhaseSucceeded {
			return fmt.Sprintf("phase %s; %s", r.Status.Phase, condition(r.Status.Conditions, kleidiv1.ConditionProgressing))
		}
		return ""
	})
	r1 = getRotation(t, c, "r1")
	if !meta.IsStatusConditionTrue(r1.Status.Conditions, kleidiv1.ConditionComplete) || r1.Status.MigratedAt == nil || r1.Status.RetireAfter == nil ||
		r1.Status.RetireAfter.Sub(r1.Status.MigratedAt.Time) != 2*time.Second {
		t.Errorf("r1 status = %+v, want Complete, retireAfter = migratedAt + 2s", r1.Status)
	}
	if len(r1.Status.Migrations) != 1 || r1.Status.Migrations[0].Phase != "Succeeded" {
		t.Errorf("r1 migrations = %+v, want one Succeeded", r1.Status.Migrations)
	}
	for name := range agents {
		if op := getNode(t, c, name).Status.LastOperation; op == nil || op.ID != "r1-forget-"+shortHash(k0.ID) || op.KeyID != k0.ID {
			t.Errorf("%s lastOperation = %+v, want the Forget of %s", name, op, k0.ID)
		}
	}
	if !slices.Equal(r1.Status.Forgotten, []string{k0.ID}) {
		t.Errorf("r1 forgotten = %v, want [%s]", r1.Status.Forgotten, k0.ID)
	}
	var rec simRing
	if err := json.Unmarshal(getPlugin(t, c).Status.Keyring, &rec); err != nil {
		t.Fatal(err)
	}
	if rec.Active != keyID || slices.ContainsFunc(rec.Keys, func(k kleidiv1.NodeKey) bool { return k.ID == k0.ID }) {
		t.Errorf("record = %+v, want active %s and without %s", rec, keyID, k0.ID)
	}
	if got := testutil.ToFloat64(rotationPhase.WithLabelValues("r1", "Succeeded")); got != 1 {
		t.Errorf("kleidi_operator_rotation_phase{rotation=r1,phase=Succeeded} = %v, want 1", got)
	}
	if err := c.Get(ctx, client.ObjectKey{Name: "worker-1"}, &kleidiv1.KleidiNode{}); !apierrors.IsNotFound(err) {
		t.Errorf("Get(KleidiNode worker-1) err = %v, want not found", err)
	}

	// cp-c's Node is deleted while cp-b is silent: the condition names the member to unenroll and what it waits
	// for; once cp-b reports again, a member unenrolls gpg-c and a KeyRotation re-encrypts.
	agents["cp-b"].set(func(s *simAgent) { s.down = true })
	eventually(t, 20*time.Second, "cp-b silent", func() string {
		p := getPlugin(t, c)
		if cond := meta.FindStatusCondition(p.Status.Conditions, kleidiv1.ConditionReady); cond == nil ||
			!strings.Contains(cond.Message, "cp-b (no agent report") {
			return condition(p.Status.Conditions, kleidiv1.ConditionReady)
		}
		return ""
	})
	if err := c.Delete(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "cp-c"}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "unenrollment waiting for cp-b", func() string {
		p := getPlugin(t, c)
		cond := meta.FindStatusCondition(p.Status.Conditions, kleidiv1.ConditionEnrolling)
		if cond == nil || cond.Reason != kleidiv1.ReasonAwaitingUnenroll || !strings.Contains(cond.Message, "gpg-c") ||
			!strings.Contains(cond.Message, "cp-b (no agent report") {
			return condition(p.Status.Conditions, kleidiv1.ConditionEnrolling)
		}
		if !slices.Contains(p.Status.Members, "gpg-c") {
			return fmt.Sprintf("members %v: gpg-c unenrolled while cp-b was silent", p.Status.Members)
		}
		return ""
	})
	agents["cp-b"].set(func(s *simAgent) { s.down = false })
	eventually(t, 30*time.Second, "gpg-c unenrolled", func() string {
		p := getPlugin(t, c)
		if slices.Contains(p.Status.Members, "gpg-c") || p.Status.ActiveKeyID == keyID {
			return fmt.Sprintf("members %v, active key %s; want gpg-c gone and a new key", p.Status.Members, p.Status.ActiveKeyID)
		}
		if err := c.Get(ctx, client.ObjectKey{Name: "unenroll-" + shortHash("gpg-c")}, &kleidiv1.KeyRotation{}); err != nil {
			return "KeyRotation after unenrolling: " + err.Error()
		}
		return ""
	})
}

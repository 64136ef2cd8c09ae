package controller

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	kleidiv1 "github.com/kleidi-kms/kleidi/operator/api/v1alpha1"
)

// NotAdoptedAfter is how long after activation a node that has not adopted the new key makes the rotation
// Blocked rather than merely waiting.
const NotAdoptedAfter = 2 * time.Minute

// rotate runs the oldest unfinished KeyRotation as far as it can go now and marks the others Queued. It reports
// whether a rotation is under way (enrollment and scheduling wait until none is) and when to look again.
func (r *Reconciler) rotate(ctx context.Context, plugin *kleidiv1.KleidiPlugin, st *state) (bool, time.Duration, error) {
	var list kleidiv1.KeyRotationList
	if err := r.Client.List(ctx, &list); err != nil {
		return false, 0, fmt.Errorf("list KeyRotations: %w", err)
	}
	rots := list.Items
	sort.Slice(rots, func(i, j int) bool {
		a, b := rots[i].CreationTimestamp, rots[j].CreationTimestamp
		if !a.Equal(&b) {
			return a.Before(&b)
		}
		return rots[i].Name < rots[j].Name
	})
	var active *kleidiv1.KeyRotation
	var after time.Duration
	for i := range rots {
		rot := &rots[i]
		before := rot.Status.DeepCopy()
		switch {
		case rot.Status.Phase.Done():
		case active == nil:
			active = rot
			var err error
			if after, err = r.run(ctx, plugin, st, rot); err != nil {
				return true, 0, err
			}
		default:
			rot.Status.Phase = kleidiv1.PhasePending
			setCondition(&rot.Status.Conditions, rot.Generation, kleidiv1.ConditionProgressing, metav1.ConditionFalse,
				kleidiv1.ReasonQueued, "waiting for KeyRotation "+active.Name+": one rotation runs at a time")
		}
		rot.Status.ObservedGeneration = rot.Generation
		recordRotationMetrics(rot)
		if !equality.Semantic.DeepEqual(before, &rot.Status) {
			if err := r.Client.Status().Update(ctx, rot); err != nil && !apierrors.IsConflict(err) {
				return true, 0, fmt.Errorf("update KeyRotation %s status: %w", rot.Name, err)
			}
		}
	}
	return active != nil, after, nil
}

// run moves a rotation through as many phases as it can now. Each phase's step either moves the phase on, or
// sets Blocked or Progressing saying what it waits for.
func (r *Reconciler) run(ctx context.Context, plugin *kleidiv1.KleidiPlugin, st *state, rot *kleidiv1.KeyRotation) (time.Duration, error) {
	if rot.Status.Phase == "" {
		rot.Status.Phase = kleidiv1.PhasePending
	}
	for {
		phase := rot.Status.Phase
		var after time.Duration
		var err error
		switch phase {
		case kleidiv1.PhasePending:
			r.start(plugin, st, rot)
		case kleidiv1.PhaseStaging:
			err = r.stage(ctx, plugin, st, rot)
		case kleidiv1.PhaseActivating:
			err = r.activate(ctx, plugin, st, rot)
		case kleidiv1.PhaseObserving:
			err = r.observeAdoption(ctx, st, rot)
		case kleidiv1.PhaseMigrating:
			after, err = r.migrate(ctx, plugin, rot)
		case kleidiv1.PhaseVerifying:
			r.verify(plugin, st, rot)
		case kleidiv1.PhaseRetiring:
			after, err = r.retire(ctx, plugin, st, rot)
		}
		if err != nil || rot.Status.Phase == phase || rot.Status.Phase.Done() {
			return after, err
		}
		r.Recorder.Eventf(rot, nil, corev1.EventTypeNormal, string(rot.Status.Phase), "Rotate", "phase %s (key %s)",
			rot.Status.Phase, rot.Status.KeyID)
	}
}

// blocked says the rotation waits for something outside the operator.
func (r *Reconciler) blocked(rot *kleidiv1.KeyRotation, reason, msg string) {
	if !meta.IsStatusConditionTrue(rot.Status.Conditions, kleidiv1.ConditionBlocked) {
		r.Recorder.Eventf(rot, nil, corev1.EventTypeWarning, reason, "Rotate", "%s: %s", rot.Status.Phase, msg)
	}
	setCondition(&rot.Status.Conditions, rot.Generation, kleidiv1.ConditionBlocked, metav1.ConditionTrue, reason, msg)
	setCondition(&rot.Status.Conditions, rot.Generation, kleidiv1.ConditionProgressing, metav1.ConditionFalse, reason,
		fmt.Sprintf("%s: %s", rot.Status.Phase, msg))
}

// progress says the rotation is moving and what it does now.
func (r *Reconciler) progress(rot *kleidiv1.KeyRotation, msg string) {
	setCondition(&rot.Status.Conditions, rot.Generation, kleidiv1.ConditionBlocked, metav1.ConditionFalse, kleidiv1.ReasonNotBlocked, "")
	setCondition(&rot.Status.Conditions, rot.Generation, kleidiv1.ConditionProgressing, metav1.ConditionTrue, kleidiv1.ReasonPhase,
		fmt.Sprintf("%s: %s", rot.Status.Phase, msg))
}

// finish ends the rotation.
func (r *Reconciler) finish(rot *kleidiv1.KeyRotation, phase kleidiv1.RotationPhase, reason, msg string) {
	rot.Status.Phase = phase
	status, typ := metav1.ConditionTrue, corev1.EventTypeNormal
	if phase == kleidiv1.PhaseFailed {
		status, typ = metav1.ConditionFalse, corev1.EventTypeWarning
	}
	setCondition(&rot.Status.Conditions, rot.Generation, kleidiv1.ConditionComplete, status, reason, msg)
	setCondition(&rot.Status.Conditions, rot.Generation, kleidiv1.ConditionProgressing, metav1.ConditionFalse, reason, msg)
	setCondition(&rot.Status.Conditions, rot.Generation, kleidiv1.ConditionBlocked, metav1.ConditionFalse, reason, "")
	r.Recorder.Eventf(rot, nil, typ, reason, "Rotate", "%s", msg)
}

// gate blocks the rotation and returns false unless every member node is available and in sync with the record.
func (r *Reconciler) gate(plugin *kleidiv1.KleidiPlugin, st *state, rot *kleidiv1.KeyRotation) bool {
	switch {
	case len(plugin.Status.Keyring) == 0:
		r.blocked(rot, kleidiv1.ReasonNoRecord, "no keyring of record yet")
	case len(st.unavailable) > 0:
		r.blocked(rot, kleidiv1.ReasonNodeUnavailable, "nodes unavailable: "+strings.Join(st.unavailable, ", "))
	case len(st.outOfSync) > 0:
		r.blocked(rot, kleidiv1.ReasonNodeNotInSync, "nodes that have not adopted the keyring of record: "+strings.Join(st.outOfSync, ", "))
	default:
		return true
	}
	return false
}

// waitMembers blocks on unavailable member nodes, and otherwise reports progress naming the member nodes for
// which done is false. It returns true when done holds for every member node.
func (r *Reconciler) waitMembers(st *state, rot *kleidiv1.KeyRotation, what string, done func(*kleidiv1.KleidiNode) bool) bool {
	if len(st.unavailable) > 0 {
		r.blocked(rot, kleidiv1.ReasonNodeUnavailable, "nodes unavailable: "+strings.Join(st.unavailable, ", "))
		return false
	}
	var waiting []string
	for _, kn := range st.members {
		if !done(kn) {
			waiting = append(waiting, kn.Name)
		}
	}
	if len(waiting) > 0 {
		r.progress(rot, fmt.Sprintf("waiting for %s: %s", what, strings.Join(waiting, ", ")))
		return false
	}
	return true
}

// start (Pending) picks the coordinator once every member node is available and in sync.
func (r *Reconciler) start(plugin *kleidiv1.KleidiPlugin, st *state, rot *kleidiv1.KeyRotation) {
	if !r.gate(plugin, st, rot) {
		return
	}
	coord := r.coordinator(plugin, st)
	if coord == nil {
		r.blocked(rot, kleidiv1.ReasonNodeUnavailable, "no member node is ready to coordinate")
		return
	}
	rot.Status.Coordinator = coord.Name
	rot.Status.PreviousKeyID = plugin.Status.ActiveKeyID
	rot.Status.Phase = kleidiv1.PhaseStaging
	r.progress(rot, "staging a new key on "+coord.Name)
}

// coordinatorOf returns the rotation's coordinator, or blocks the rotation and returns nil when it is unavailable.
func (r *Reconciler) coordinatorOf(st *state, rot *kleidiv1.KeyRotation) *kleidiv1.KleidiNode {
	kn := st.node(rot.Status.Coordinator)
	if kn == nil {
		r.blocked(rot, kleidiv1.ReasonNodeUnavailable, "coordinator "+rot.Status.Coordinator+" is gone")
		return nil
	}
	if ok, why := r.available(kn, st.now); !ok {
		r.blocked(rot, kleidiv1.ReasonNodeUnavailable, "coordinator unavailable: "+why)
		return nil
	}
	return kn
}

// operate asks the coordinator to run req and returns its successful outcome once the coordinator's keyring
// after it is the record, or nil while waiting. A refused request fails the rotation.
func (r *Reconciler) operate(ctx context.Context, plugin *kleidiv1.KleidiPlugin, coord *kleidiv1.KleidiNode,
	rot *kleidiv1.KeyRotation, req kleidiv1.NodeRequest) (*kleidiv1.Operation, error) {
	op, err := r.request(ctx, coord, req)
	if err != nil || op == nil {
		r.progress(rot, fmt.Sprintf("waiting for %s to run %s", coord.Name, req.Type))
		return nil, err
	}
	if !op.Succeeded {
		r.finish(rot, kleidiv1.PhaseFailed, kleidiv1.ReasonOperationFailed,
			fmt.Sprintf("%s refused %s: %s", coord.Name, req.Type, op.Message))
		return nil, nil
	}
	if !r.publish(plugin, coord, op) {
		r.progress(rot, fmt.Sprintf("waiting for %s to publish its keyring after %s", coord.Name, req.Type))
		return nil, nil
	}
	return op, nil
}

// stage (Staging) has the coordinator stage a new key, publishes its keyring, and waits until every member node
// holds the new key.
func (r *Reconciler) stage(ctx context.Context, plugin *kleidiv1.KleidiPlugin, st *state, rot *kleidiv1.KeyRotation) error {
	coord := r.coordinatorOf(st, rot)
	if coord == nil {
		return nil
	}
	req := kleidiv1.NodeRequest{ID: rot.Name + "-stage", Type: kleidiv1.RequestStage}
	if op := coord.Status.LastOperation; (op == nil || op.ID != req.ID) && !r.gate(plugin, st, rot) {
		return nil // nothing staged yet: stage only while every member is available and in sync
	}
	op, err := r.operate(ctx, plugin, coord, rot, req)
	if op == nil {
		return err
	}
	rot.Status.KeyID = op.KeyID
	if r.waitMembers(st, rot, "nodes to hold key "+op.KeyID, func(kn *kleidiv1.KleidiNode) bool {
		for _, k := range kn.Status.Keys {
			if k.ID == op.KeyID && k.Held {
				return true
			}
		}
		return false
	}) {
		rot.Status.Phase = kleidiv1.PhaseActivating
		r.progress(rot, "activating key "+op.KeyID)
	}
	return nil
}

// activate (Activating) has the coordinator activate the new key, publishes its keyring, and waits until every
// member node's plugin has it active.
func (r *Reconciler) activate(ctx context.Context, plugin *kleidiv1.KleidiPlugin, st *state, rot *kleidiv1.KeyRotation) error {
	coord := r.coordinatorOf(st, rot)
	if coord == nil {
		return nil
	}
	op, err := r.operate(ctx, plugin, coord, rot,
		kleidiv1.NodeRequest{ID: rot.Name + "-activate", Type: kleidiv1.RequestActivate, KeyID: rot.Status.KeyID})
	if op == nil {
		return err
	}
	if rot.Status.ActivatedAt == nil {
		rot.Status.ActivatedAt = &metav1.Time{Time: op.Time.Time}
	}
	if r.waitMembers(st, rot, "nodes to activate key "+rot.Status.KeyID, func(kn *kleidiv1.KleidiNode) bool {
		return kn.Status.ActiveKeyID == rot.Status.KeyID
	}) {
		rot.Status.Phase = kleidiv1.PhaseObserving
		r.progress(rot, "waiting for every kube-apiserver to adopt key "+rot.Status.KeyID)
	}
	return nil
}

// observeAdoption (Observing) waits until every member node's kube-apiserver has reported the new key as active
// and encrypted with it, and until at least as many nodes adopted as kube-apiserver identity leases are live.
func (r *Reconciler) observeAdoption(ctx context.Context, st *state, rot *kleidiv1.KeyRotation) error {
	if len(st.unavailable) > 0 {
		r.blocked(rot, kleidiv1.ReasonNodeUnavailable, "nodes unavailable: "+strings.Join(st.unavailable, ", "))
		return nil
	}
	since := "activation"
	if rot.Status.ActivatedAt != nil {
		since = rot.Status.ActivatedAt.UTC().Format(time.RFC3339)
	}
	var waiting []string
	for _, kn := range st.members {
		a := kn.Status.Adoption
		if a == nil || a.KeyID != rot.Status.KeyID || a.EncryptAt == nil {
			waiting = append(waiting, kn.Name)
		}
	}
	if len(waiting) > 0 {
		msg := fmt.Sprintf("kube-apiserver has not adopted key %s since %s on: %s", rot.Status.KeyID, since, strings.Join(waiting, ", "))
		if rot.Status.ActivatedAt != nil && st.now.Sub(rot.Status.ActivatedAt.Time) > NotAdoptedAfter {
			r.blocked(rot, kleidiv1.ReasonNotAdopted, msg+"; no migration runs until every kube-apiserver has")
		} else {
			r.progress(rot, msg)
		}
		return nil
	}
	live, err := r.liveAPIServers(ctx)
	if err != nil {
		return err
	}
	if adopted := len(st.members); adopted < live {
		r.blocked(rot, kleidiv1.ReasonNotAdopted, fmt.Sprintf(
			"%d kube-apiservers are live (identity leases in kube-system) but only %d nodes adopted key %s; no migration runs until every kube-apiserver has",
			live, adopted, rot.Status.KeyID))
		return nil
	}
	rot.Status.Phase = kleidiv1.PhaseMigrating
	r.progress(rot, "rewriting every encrypted resource under key "+rot.Status.KeyID)
	return nil
}

// verify (Verifying) checks that every member node still has the new key active, and sets when the previous key
// retires.
func (r *Reconciler) verify(plugin *kleidiv1.KleidiPlugin, st *state, rot *kleidiv1.KeyRotation) {
	if len(st.unavailable) > 0 {
		r.blocked(rot, kleidiv1.ReasonNodeUnavailable, "nodes unavailable: "+strings.Join(st.unavailable, ", "))
		return
	}
	var off []string
	for _, kn := range st.members {
		if kn.Status.ActiveKeyID != rot.Status.KeyID {
			off = append(off, fmt.Sprintf("%s (active key %s)", kn.Name, kn.Status.ActiveKeyID))
		}
	}
	if len(off) > 0 {
		r.blocked(rot, kleidiv1.ReasonKeyNotActive, "key "+rot.Status.KeyID+" is no longer active on: "+strings.Join(off, ", "))
		return
	}
	var retention time.Duration
	if p := plugin.Spec.Rotation.RetiredKeyRetention; p != nil {
		retention = p.Duration
	}
	migrated := st.now
	if rot.Status.MigratedAt != nil {
		migrated = rot.Status.MigratedAt.Time
	}
	rot.Status.RetireAfter = &metav1.Time{Time: migrated.Add(retention)}
	rot.Status.Phase = kleidiv1.PhaseRetiring
	r.progress(rot, "keeping key "+rot.Status.PreviousKeyID+" until "+rot.Status.RetireAfter.UTC().Format(time.RFC3339))
}

// retire (Retiring) waits for the retention to pass, has every member node forget the previous key, and makes the
// coordinator's keyring the record.
func (r *Reconciler) retire(ctx context.Context, plugin *kleidiv1.KleidiPlugin, st *state, rot *kleidiv1.KeyRotation) (time.Duration, error) {
	if wait := rot.Status.RetireAfter.Sub(st.now); wait > 0 {
		setCondition(&rot.Status.Conditions, rot.Generation, kleidiv1.ConditionProgressing, metav1.ConditionTrue,
			kleidiv1.ReasonWaitingRetention, fmt.Sprintf("Retiring: keeping key %s until %s (retiredKeyRetention)",
				rot.Status.PreviousKeyID, rot.Status.RetireAfter.UTC().Format(time.RFC3339)))
		return wait, nil
	}
	coord := r.coordinatorOf(st, rot)
	if coord == nil {
		return 0, nil
	}
	if rot.Status.Forgotten == nil {
		// Decided once, from the coordinator's keyring, and written before any node is asked to forget: once a
		// node has forgotten a key, its keyring no longer says the key was retired, so a decision lost to a
		// failed status write could not be made again.
		rot.Status.Forgotten = []string{}
		for _, k := range coord.Status.Keys {
			if k.State == "retired" {
				rot.Status.Forgotten = append(rot.Status.Forgotten, k.ID)
			}
		}
		if len(rot.Status.Forgotten) > 0 {
			r.progress(rot, "forgetting retired keys: "+strings.Join(rot.Status.Forgotten, ", "))
			return time.Second, nil
		}
	}
	if len(rot.Status.Forgotten) == 0 {
		r.finish(rot, kleidiv1.PhaseSucceeded, kleidiv1.ReasonSucceeded, "key "+rot.Status.KeyID+" is active everywhere")
		return 0, nil
	}
	if len(st.unavailable) > 0 {
		r.blocked(rot, kleidiv1.ReasonNodeUnavailable, "nodes unavailable: "+strings.Join(st.unavailable, ", "))
		return 0, nil
	}
	// One Forget request per key, each run on every member node before the next.
	for _, id := range rot.Status.Forgotten {
		req := kleidiv1.NodeRequest{ID: rot.Name + "-forget-" + shortHash(id), Type: kleidiv1.RequestForget, KeyID: id}
		var waiting []string
		for _, kn := range st.members {
			if !slices.ContainsFunc(kn.Status.Keys, func(k kleidiv1.NodeKey) bool { return k.ID == id }) {
				continue // forgotten already
			}
			op, err := r.request(ctx, kn, req)
			if err != nil {
				return 0, err
			}
			switch {
			case op == nil:
				waiting = append(waiting, kn.Name)
			case !op.Succeeded:
				r.finish(rot, kleidiv1.PhaseFailed, kleidiv1.ReasonOperationFailed,
					fmt.Sprintf("%s refused to forget key %s: %s", kn.Name, id, op.Message))
				return 0, nil
			}
		}
		if len(waiting) > 0 {
			r.progress(rot, fmt.Sprintf("waiting for nodes to forget key %s: %s", id, strings.Join(waiting, ", ")))
			return 0, nil
		}
	}
	if !r.publish(plugin, coord, coord.Status.LastOperation) {
		r.progress(rot, "waiting for "+coord.Name+" to publish its keyring after Forget")
		return 0, nil
	}
	r.finish(rot, kleidiv1.PhaseSucceeded, kleidiv1.ReasonSucceeded,
		fmt.Sprintf("key %s is active everywhere; forgotten: %s", rot.Status.KeyID, strings.Join(rot.Status.Forgotten, ", ")))
	return 0, nil
}

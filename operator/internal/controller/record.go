package controller

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	kleidiv1 "github.com/kleidi-kms/kleidi/operator/api/v1alpha1"
)

// setCondition sets a condition, changing its transition time only when its status changes.
func setCondition(conds *[]metav1.Condition, gen int64, typ string, status metav1.ConditionStatus, reason, msg string) {
	meta.SetStatusCondition(conds, metav1.Condition{Type: typ, Status: status, Reason: reason, Message: msg, ObservedGeneration: gen})
}

// shortHash names something long (a member ID, a key ID) in a request ID or object name.
func shortHash(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:5])
}

// request asks a node's agent to run req, unless the node already holds that request. It returns the outcome
// once the agent has reported it, and nil before.
func (r *Reconciler) request(ctx context.Context, kn *kleidiv1.KleidiNode, req kleidiv1.NodeRequest) (*kleidiv1.Operation, error) {
	if op := kn.Status.LastOperation; op != nil && op.ID == req.ID {
		return op, nil
	}
	if kn.Spec.Request != nil && *kn.Spec.Request == req {
		return nil, nil
	}
	kn.Spec.Request = &req
	if err := r.Client.Update(ctx, kn); err != nil {
		return nil, fmt.Errorf("request %s on %s: %w", req.Type, kn.Name, err)
	}
	r.Recorder.Eventf(kn, nil, corev1.EventTypeNormal, "Requested", string(req.Type), "request %s: %s %s%s",
		req.ID, req.Type, req.KeyID, req.Node)
	return nil, nil
}

// publish makes the keyring a node reported right after operation op the keyring of record. It reports whether
// the record is that keyring now; it is false while the node's status does not show that keyring yet.
func (r *Reconciler) publish(plugin *kleidiv1.KleidiPlugin, kn *kleidiv1.KleidiNode, op *kleidiv1.Operation) bool {
	if plugin.Status.KeyringDigest == op.KeyringDigest {
		return true
	}
	if kn.Status.KeyringDigest != op.KeyringDigest || Digest(kn.Status.Keyring) != op.KeyringDigest {
		return false
	}
	r.setRecord(plugin, kn)
	return true
}

// setRecord makes a node's keyring the keyring of record.
func (r *Reconciler) setRecord(plugin *kleidiv1.KleidiPlugin, kn *kleidiv1.KleidiNode) {
	s := &plugin.Status
	s.Keyring = append([]byte(nil), kn.Status.Keyring...)
	s.KeyringDigest = Digest(s.Keyring)
	s.KeyringSource = kn.Name
	s.Members = append([]string(nil), kn.Status.Members...)
	s.ActiveKeyID = kn.Status.ActiveKeyID
	r.Recorder.Eventf(plugin, nil, corev1.EventTypeNormal, "KeyringOfRecord", "Publish",
		"keyring of record %s from node %s (active key %s)", s.KeyringDigest, kn.Name, s.ActiveKeyID)
}

// verifyRecord checks that the keyring of record is one its source node published: the digest of the record must
// be one that node's agent reported (its keyring, the record it adopted, or the outcome of its last operation),
// which only that agent may write. A record that whoever writes the KleidiPlugin's status changed is replaced by
// its source node's keyring (or, with that node gone, by a ready member's). The plugins would refuse a forged
// record anyway; this keeps it from blocking every node until the next operation.
func (r *Reconciler) verifyRecord(plugin *kleidiv1.KleidiPlugin, st *state) {
	if len(plugin.Status.Keyring) == 0 {
		return
	}
	digest := Digest(plugin.Status.Keyring)
	published := func(kn *kleidiv1.KleidiNode) bool {
		s := kn.Status
		return s.KeyringDigest == digest || s.AdoptedDigest == digest || (s.LastOperation != nil && s.LastOperation.KeyringDigest == digest)
	}
	src := st.node(plugin.Status.KeyringSource)
	if digest == plugin.Status.KeyringDigest && src != nil && published(src) {
		return
	}
	from := src
	if from == nil || len(from.Status.Keyring) == 0 || Digest(from.Status.Keyring) != from.Status.KeyringDigest {
		from = nil
		for _, kn := range st.nodes {
			s := kn.Status
			if kn.Spec.ApprovedMemberID != "" && s.MemberID == kn.Spec.ApprovedMemberID && s.Joined && s.Healthy &&
				len(s.Keyring) > 0 && Digest(s.Keyring) == s.KeyringDigest {
				from = kn
				break
			}
		}
	}
	if from == nil {
		return
	}
	r.Recorder.Eventf(plugin, nil, corev1.EventTypeWarning, "KeyringOfRecordReplaced", "Verify",
		"the keyring of record (%s) is not one node %s published: replaced by node %s's keyring", digest,
		plugin.Status.KeyringSource, from.Name)
	r.setRecord(plugin, from)
}

// bootstrap makes the keyring of the first approved, joined node the keyring of record when there is none.
func (r *Reconciler) bootstrap(_ context.Context, plugin *kleidiv1.KleidiPlugin, st *state) {
	if len(plugin.Status.Keyring) > 0 {
		return
	}
	for _, kn := range st.nodes {
		s := kn.Status
		if kn.Spec.ApprovedMemberID != "" && s.MemberID == kn.Spec.ApprovedMemberID && s.Joined &&
			len(s.Keyring) > 0 && Digest(s.Keyring) == s.KeyringDigest {
			r.setRecord(plugin, kn)
			return
		}
	}
}

// enroll asks a ready member node to enroll the first approved node that is not a member yet, and makes the
// coordinator's keyring the record once it did. The new node adopts that record on its own.
func (r *Reconciler) enroll(ctx context.Context, plugin *kleidiv1.KleidiPlugin, st *state) error {
	if len(plugin.Status.Keyring) == 0 || len(st.awaitingEnrollment) == 0 {
		return nil
	}
	coord := r.coordinator(plugin, st)
	if coord == nil {
		return nil
	}
	for _, name := range st.awaitingEnrollment {
		kn := st.node(name)
		if kn.Status.MemberID != kn.Spec.ApprovedMemberID || len(kn.Status.Identity) == 0 {
			continue // the agent has not reported the approved identity (yet)
		}
		req := kleidiv1.NodeRequest{ID: "enroll-" + kn.Name + "-" + shortHash(kn.Spec.ApprovedMemberID),
			Type: kleidiv1.RequestEnroll, Node: kn.Name}
		op, err := r.request(ctx, coord, req)
		if err != nil || op == nil {
			return err
		}
		if !op.Succeeded {
			r.Recorder.Eventf(kn, nil, corev1.EventTypeWarning, "EnrollFailed", "Enroll",
				"node %s refused to enroll %s: %s", coord.Name, kn.Name, op.Message)
			continue
		}
		if r.publish(plugin, coord, op) {
			r.Recorder.Eventf(kn, nil, corev1.EventTypeNormal, "Enrolled", "Enroll", "member %s enrolled by %s",
				op.MemberID, coord.Name)
		}
		return nil
	}
	return nil
}

// unenroll removes from the keyring a member of the provider's kind that no KleidiNode approves any more: its Node
// was deleted, or the node was approved under a new member ID after its TPM was cleared or replaced. A ready member
// unenrolls it, which rotates to a key the old member never held, and its keyring becomes the record; then a
// KeyRotation re-encrypts every resource and, after its retention, forgets the keys the old member could unwrap.
// Members of another kind (an OpenPGP recovery key) are left alone. It waits until every remaining member node is
// available and in sync, since the new key must reach them all.
func (r *Reconciler) unenroll(ctx context.Context, plugin *kleidiv1.KleidiPlugin, st *state) error {
	// Unenrolling rotates at once: every remaining member must be there to adopt the new key.
	if len(plugin.Status.Keyring) == 0 || len(st.unavailable) > 0 || len(st.outOfSync) > 0 {
		return nil
	}
	for _, m := range st.leaving {
		coord := r.coordinator(plugin, st)
		if coord == nil {
			return nil
		}
		req := kleidiv1.NodeRequest{ID: "unenroll-" + shortHash(m), Type: kleidiv1.RequestUnenroll, MemberID: m}
		op, err := r.request(ctx, coord, req)
		if err != nil || op == nil {
			return err
		}
		if !op.Succeeded {
			r.Recorder.Eventf(plugin, nil, corev1.EventTypeWarning, "UnenrollFailed", "Unenroll",
				"node %s refused to unenroll member %s: %s", coord.Name, m, op.Message)
			continue
		}
		if !r.publish(plugin, coord, op) {
			return nil
		}
		r.Recorder.Eventf(plugin, nil, corev1.EventTypeNormal, "Unenrolled", "Unenroll",
			"member %s unenrolled by %s; key %s is active", m, coord.Name, op.KeyID)
		rot := &kleidiv1.KeyRotation{
			ObjectMeta: metav1.ObjectMeta{Name: "unenroll-" + shortHash(m)},
			Spec:       kleidiv1.KeyRotationSpec{Reason: fmt.Sprintf("member %s was unenrolled: re-encrypt, and retire the keys it held", m)},
		}
		if err := r.Client.Create(ctx, rot); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create KeyRotation after unenrolling %s: %w", m, err)
		}
		return nil
	}
	return nil
}

// schedule creates a KeyRotation when the active key of the record is older than the policy's maxKeyAge. Its
// name derives from the key, so the same key is never scheduled twice.
func (r *Reconciler) schedule(ctx context.Context, plugin *kleidiv1.KleidiPlugin, st *state) error {
	maxAge := plugin.Spec.Rotation.MaxKeyAge
	src := st.node(plugin.Status.KeyringSource)
	if maxAge == nil || maxAge.Duration <= 0 || src == nil || plugin.Status.ActiveKeyID == "" {
		return nil
	}
	for _, k := range src.Status.Keys {
		if k.ID != plugin.Status.ActiveKeyID || k.Created == nil || st.now.Sub(k.Created.Time) < maxAge.Duration {
			continue
		}
		rot := &kleidiv1.KeyRotation{
			ObjectMeta: metav1.ObjectMeta{Name: "scheduled-" + shortHash(k.ID), Labels: map[string]string{kleidiv1.ScheduledLabel: "true"}},
			Spec:       kleidiv1.KeyRotationSpec{Reason: fmt.Sprintf("key %s reached the maximum key age %s", k.ID, maxAge.Duration)},
		}
		if err := r.Client.Create(ctx, rot); err != nil {
			if apierrors.IsAlreadyExists(err) {
				return nil
			}
			return fmt.Errorf("create scheduled KeyRotation: %w", err)
		}
		r.Recorder.Eventf(rot, nil, corev1.EventTypeNormal, "Scheduled", "Schedule", "%s", strings.TrimSpace(rot.Spec.Reason))
	}
	return nil
}

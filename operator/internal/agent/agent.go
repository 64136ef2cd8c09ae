// Package agent is kleidi-agent: it runs on each control-plane node beside the kleidi plugin and drives that
// plugin through its local admin socket (package github.com/kleidi-kms/kleidi/admin), on behalf of the operator.
//
// Every pass ([Agent.Sync], every 5 s and on changes of its KleidiNode's spec or of the KleidiPlugin):
//
//  1. it asks the plugin for its state;
//  2. if its node is approved and the keyring of record (KleidiPlugin.status.keyring) is not the one it last
//     adopted, it first forgets the keys that succeeded rotations retired, then has the plugin adopt the record,
//     trusting only the approved member IDs of the KleidiNodes: the plugin verifies every copy itself;
//  3. if its KleidiNode's spec.request is one it has not run, it runs it (Stage, Activate, Enroll, Unenroll,
//     Forget) and records the outcome with the digest of the keyring right after it;
//  4. it writes its KleidiNode's status: the plugin's state, its keyring, the outcome, and a heartbeat.
//
// The agent writes only its own KleidiNode's status and trusts nothing it reads: a request can make the plugin
// change keys, never accept a key it cannot verify.
package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/go-logr/logr"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/admin"
	kleidiv1 "github.com/kleidi-kms/kleidi/operator/api/v1alpha1"
	"github.com/kleidi-kms/kleidi/operator/internal/controller"
)

// Interval is how often the agent reports without a change to react to.
const Interval = 5 * time.Second

// Agent drives one node's plugin.
type Agent struct {
	// Client reads kleidi.dev objects and writes this node's KleidiNode status.
	Client client.Client
	// Plugin is the plugin's admin API.
	Plugin *admin.Client
	// NodeName is this node's name, the name of its KleidiNode.
	NodeName string
	Log      logr.Logger
	// Reader reads this node's KleidiNode from the API server itself, never from a cache that may lag behind
	// this agent's own last write: a request runs once only if the agent sees its own record of it. Default: the
	// manager's API reader.
	Reader client.Reader
}

// SetupWithManager runs [Agent.Sync] every [Interval] and whenever its KleidiNode's spec or the KleidiPlugin
// changes.
func (a *Agent) SetupWithManager(mgr ctrl.Manager) error {
	if a.Reader == nil {
		a.Reader = mgr.GetAPIReader()
	}
	me := handler.EnqueueRequestsFromMapFunc(func(context.Context, client.Object) []reconcile.Request {
		return []reconcile.Request{{NamespacedName: types.NamespacedName{Name: a.NodeName}}}
	})
	mine := predicate.NewPredicateFuncs(func(o client.Object) bool { return o.GetName() == a.NodeName })
	return ctrl.NewControllerManagedBy(mgr).
		Named("kleidi-agent").
		Watches(&kleidiv1.KleidiNode{}, me, builder.WithPredicates(mine, predicate.GenerationChangedPredicate{})).
		Watches(&kleidiv1.KleidiPlugin{}, me).
		Complete(reconcile.Func(func(ctx context.Context, _ reconcile.Request) (reconcile.Result, error) {
			return reconcile.Result{RequeueAfter: Interval}, a.Sync(ctx)
		}))
}

// Sync runs one pass: see the package documentation.
func (a *Agent) Sync(ctx context.Context) error {
	reader := a.Reader
	if reader == nil {
		reader = a.Client
	}
	var kn kleidiv1.KleidiNode
	if err := reader.Get(ctx, client.ObjectKey{Name: a.NodeName}, &kn); err != nil {
		if apierrors.IsNotFound(err) {
			a.Log.Info("no KleidiNode for this node yet: the operator creates it for a node its KleidiPlugin selects", "node", a.NodeName)
			return nil
		}
		return err
	}
	orig := kn.DeepCopy()
	st, err := a.Plugin.State(ctx)
	if err != nil {
		kn.Status.Healthy = false
		kn.Status.Message = "plugin unavailable: " + err.Error()
		a.report(&kn, metav1.ConditionFalse, kleidiv1.ReasonPluginUnavailable, kn.Status.Message)
		return errors.Join(err, a.patch(ctx, orig, &kn))
	}
	var problems []string
	if err := a.adopt(ctx, &kn, st); err != nil {
		problems = append(problems, "adopt the keyring of record: "+err.Error())
	}
	if err := a.execute(ctx, &kn); err != nil {
		problems = append(problems, err.Error())
	}
	// Read the state again: adopting and requests change it.
	if st, err = a.Plugin.State(ctx); err != nil {
		return err
	}
	var keyring []byte
	if st.Joined {
		if keyring, err = a.Plugin.Keyring(ctx); err != nil {
			return err
		}
	}
	setState(&kn.Status, st, keyring)
	if op := kn.Status.LastOperation; op != nil && op.KeyringDigest == "" && op.Succeeded && keyring != nil {
		op.KeyringDigest = controller.Digest(keyring)
	}
	switch {
	case !st.Joined:
		a.report(&kn, metav1.ConditionFalse, "NotJoined", "the plugin waits for the keyring of record: approve this node's member ID")
	case !st.Healthy:
		a.report(&kn, metav1.ConditionFalse, kleidiv1.ReasonPluginUnavailable, st.Message)
	case len(problems) > 0:
		a.report(&kn, metav1.ConditionFalse, "AgentError", fmt.Sprint(problems))
	default:
		a.report(&kn, metav1.ConditionTrue, kleidiv1.ReasonHeartbeat, "the plugin is joined and healthy")
	}
	if len(problems) > 0 {
		kn.Status.Message = fmt.Sprint(problems)
	}
	return a.patch(ctx, orig, &kn)
}

// setState copies the plugin's state and keyring into a KleidiNode status.
func setState(s *kleidiv1.KleidiNodeStatus, st admin.State, keyring []byte) {
	s.MemberID, s.Identity, s.Provider = st.MemberID, st.Identity, st.Provider
	s.Joined, s.Healthy, s.Message = st.Joined, st.Healthy, st.Message
	s.ActiveKeyID, s.Members = st.ActiveKeyID, st.Members
	s.Keys = nil
	for _, k := range st.Keys {
		nk := kleidiv1.NodeKey{ID: k.ID, State: k.State, Held: k.Held}
		if !k.Created.IsZero() {
			nk.Created = &metav1.Time{Time: k.Created}
		}
		s.Keys = append(s.Keys, nk)
	}
	s.Keyring, s.KeyringDigest = keyring, ""
	if keyring != nil {
		s.KeyringDigest = controller.Digest(keyring)
	}
	s.Adoption = nil
	if st.Adoption.KeyID != "" {
		s.Adoption = &kleidiv1.Adoption{KeyID: st.Adoption.KeyID}
		if !st.Adoption.StatusAt.IsZero() {
			s.Adoption.StatusAt = &metav1.Time{Time: st.Adoption.StatusAt}
		}
		if !st.Adoption.EncryptAt.IsZero() {
			s.Adoption.EncryptAt = &metav1.Time{Time: st.Adoption.EncryptAt}
		}
	}
}

func (a *Agent) report(kn *kleidiv1.KleidiNode, status metav1.ConditionStatus, reason, msg string) {
	now := metav1.Now()
	kn.Status.HeartbeatTime = &now
	meta.SetStatusCondition(&kn.Status.Conditions, metav1.Condition{Type: kleidiv1.ConditionReady, Status: status,
		Reason: reason, Message: msg, ObservedGeneration: kn.Generation})
}

// patch writes the status with a merge patch: the operator may have changed the spec meanwhile.
func (a *Agent) patch(ctx context.Context, orig, kn *kleidiv1.KleidiNode) error {
	// With the resource version of what this pass read: a status another pass changed meanwhile is not
	// overwritten field by field, the write fails and the next pass reads it again.
	if err := a.Client.Status().Patch(ctx, kn, client.MergeFromWithOptions(orig, client.MergeFromWithOptimisticLock{})); err != nil {
		return fmt.Errorf("write KleidiNode %s status: %w", kn.Name, err)
	}
	return nil
}

// adopt has the plugin adopt the keyring of record when this node is approved and has not adopted it yet.
func (a *Agent) adopt(ctx context.Context, kn *kleidiv1.KleidiNode, st admin.State) error {
	var plugin kleidiv1.KleidiPlugin
	if err := a.Client.Get(ctx, client.ObjectKey{Name: kleidiv1.PluginName}, &plugin); err != nil {
		return client.IgnoreNotFound(err)
	}
	record := plugin.Status.Keyring
	if len(record) == 0 || kn.Spec.ApprovedMemberID == "" || kn.Spec.ApprovedMemberID != st.MemberID {
		return nil
	}
	digest := controller.Digest(record)
	if digest == kn.Status.AdoptedDigest {
		return nil
	}
	if st.Joined && digest == st.KeyringDigest {
		kn.Status.AdoptedDigest = digest // the record is this node's own keyring
		return nil
	}
	if st.Joined {
		if err := a.forgetRetired(ctx, st); err != nil {
			return err
		}
	}
	var nodes kleidiv1.KleidiNodeList
	if err := a.Client.List(ctx, &nodes); err != nil {
		return err
	}
	var trusted []string
	for _, n := range nodes.Items {
		if id := n.Spec.ApprovedMemberID; id != "" && !slices.Contains(trusted, id) {
			trusted = append(trusted, id)
		}
	}
	if err := a.Plugin.Adopt(ctx, record, trusted); err != nil {
		return err
	}
	a.Log.Info("adopted the keyring of record", "digest", digest, "source", plugin.Status.KeyringSource)
	kn.Status.AdoptedDigest = digest
	return nil
}

// forgetRetired forgets each key this node still has that a succeeded KeyRotation retired: a node that missed
// its Forget request would otherwise refuse a record without it.
func (a *Agent) forgetRetired(ctx context.Context, st admin.State) error {
	var rots kleidiv1.KeyRotationList
	if err := a.Client.List(ctx, &rots); err != nil {
		return err
	}
	for _, rot := range rots.Items {
		if rot.Status.Phase != kleidiv1.PhaseSucceeded {
			continue
		}
		for _, k := range st.Keys {
			if k.State == "retired" && slices.Contains(rot.Status.Forgotten, k.ID) {
				if err := a.Plugin.Forget(ctx, k.ID); err != nil {
					return fmt.Errorf("forget key %s retired by KeyRotation %s: %w", k.ID, rot.Name, err)
				}
			}
		}
	}
	return nil
}

// execute runs the node's request unless it already ran it. A plugin that is unavailable is asked again on the
// next pass; any other outcome is recorded in lastOperation, and the request is never run again.
func (a *Agent) execute(ctx context.Context, kn *kleidiv1.KleidiNode) error {
	req := kn.Spec.Request
	if req == nil || (kn.Status.LastOperation != nil && kn.Status.LastOperation.ID == req.ID) {
		return nil
	}
	op := &kleidiv1.Operation{ID: req.ID, Type: req.Type, KeyID: req.KeyID, MemberID: req.MemberID}
	var err error
	switch req.Type {
	case kleidiv1.RequestStage:
		op.KeyID, err = a.Plugin.Stage(ctx)
	case kleidiv1.RequestActivate:
		err = a.Plugin.Activate(ctx, req.KeyID)
	case kleidiv1.RequestForget:
		err = a.Plugin.Forget(ctx, req.KeyID)
	case kleidiv1.RequestUnenroll:
		op.KeyID, err = a.Plugin.Unenroll(ctx, req.MemberID)
	case kleidiv1.RequestEnroll:
		op.MemberID, err = a.enroll(ctx, req.Node)
	default:
		err = fmt.Errorf("unknown request type %q", req.Type)
	}
	if admin.IsCode(err, admin.CodeUnavailable) {
		return fmt.Errorf("request %s (%s): %w", req.ID, req.Type, err)
	}
	op.Succeeded = err == nil
	if err != nil {
		op.Message = err.Error()
	}
	op.Time = metav1.Now()
	kn.Status.LastOperation = op
	a.Log.Info("ran request", "id", req.ID, "type", req.Type, "keyID", op.KeyID, "memberID", op.MemberID, "succeeded", op.Succeeded, "message", op.Message)
	return nil
}

// enroll enrolls the identity another node's agent published, only if its member ID is the one approved for
// that node.
func (a *Agent) enroll(ctx context.Context, node string) (string, error) {
	var other kleidiv1.KleidiNode
	if err := a.Client.Get(ctx, client.ObjectKey{Name: node}, &other); err != nil {
		return "", fmt.Errorf("read KleidiNode %s: %w", node, err)
	}
	id, err := kleidi.ParseIdentity(other.Status.Identity)
	if err != nil {
		return "", fmt.Errorf("identity of node %s: %w", node, err)
	}
	if approved := other.Spec.ApprovedMemberID; approved == "" || id.ID() != approved {
		return "", fmt.Errorf("refused: the identity node %s published is member %s, not its approved member %q", node, id.ID(), approved)
	}
	return a.Plugin.Enroll(ctx, other.Status.Identity)
}

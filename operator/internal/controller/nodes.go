package controller

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	"github.com/kleidi-kms/kleidi"
	kleidiv1 "github.com/kleidi-kms/kleidi/operator/api/v1alpha1"
	"github.com/kleidi-kms/kleidi/tpm"
)

// Digest returns "sha256:<hex>" of a keyring, the form of every keyring digest in the API.
func Digest(keyring []byte) string {
	sum := sha256.Sum256(keyring)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// syncNodes creates a KleidiNode, owned by its Node, for every Node the KleidiPlugin selects, and returns the
// KleidiNodes of the selected Nodes, sorted by name.
func (r *Reconciler) syncNodes(ctx context.Context, plugin *kleidiv1.KleidiPlugin) ([]*kleidiv1.KleidiNode, error) {
	var nodes corev1.NodeList
	if err := r.Client.List(ctx, &nodes, client.MatchingLabelsSelector{Selector: labels.SelectorFromSet(plugin.Spec.NodeSelector)}); err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	var out []*kleidiv1.KleidiNode
	for i := range nodes.Items {
		node := &nodes.Items[i]
		kn := &kleidiv1.KleidiNode{}
		err := r.Client.Get(ctx, client.ObjectKey{Name: node.Name}, kn)
		if apierrors.IsNotFound(err) {
			kn = &kleidiv1.KleidiNode{ObjectMeta: metav1.ObjectMeta{Name: node.Name}}
			if err := controllerutil.SetOwnerReference(node, kn, r.Client.Scheme()); err != nil {
				return nil, err
			}
			if err := r.Client.Create(ctx, kn); err != nil && !apierrors.IsAlreadyExists(err) {
				return nil, fmt.Errorf("create KleidiNode %s: %w", node.Name, err)
			}
			r.Recorder.Eventf(kn, nil, corev1.EventTypeNormal, "Created", "Create",
				"KleidiNode created for control-plane node %s; it waits for its agent and for approval", node.Name)
		} else if err != nil {
			return nil, fmt.Errorf("get KleidiNode %s: %w", node.Name, err)
		}
		out = append(out, kn)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// approve approves, when the enrollment policy is Automatic, every unapproved TPM node whose identity carries an
// endorsement key certificate that certifies its endorsement key and chains to the configured CAs.
func (r *Reconciler) approve(ctx context.Context, plugin *kleidiv1.KleidiPlugin, nodes []*kleidiv1.KleidiNode) error {
	if plugin.Spec.Enrollment.Approval != kleidiv1.ApprovalAutomatic {
		return nil
	}
	for _, kn := range nodes {
		if kn.Spec.ApprovedMemberID != "" || len(kn.Status.Identity) == 0 {
			continue
		}
		memberID, err := VerifyEKIdentity(kn.Status.Identity, []byte(plugin.Spec.Enrollment.EKCACertificates))
		if err != nil {
			r.Recorder.Eventf(kn, nil, corev1.EventTypeWarning, "ApprovalRefused", "Approve",
				"automatic approval refused: %v; approve the member ID by hand after comparing it", err)
			continue
		}
		if memberID != kn.Status.MemberID {
			continue // the agent reports another member than its identity says: leave it to an administrator
		}
		kn.Spec.ApprovedMemberID = memberID
		if err := r.Client.Update(ctx, kn); err != nil {
			return fmt.Errorf("approve KleidiNode %s: %w", kn.Name, err)
		}
		r.Recorder.Eventf(kn, nil, corev1.EventTypeNormal, "Approved", "Approve",
			"member %s approved: its endorsement key certificate chains to the configured CAs", memberID)
	}
	return nil
}

// VerifyEKIdentity returns the member ID of a TPM identity file whose endorsement key certificate certifies its
// endorsement key and chains to one of the PEM CA certificates caPEM, and an error otherwise.
func VerifyEKIdentity(identity, caPEM []byte) (string, error) {
	id, err := kleidi.ParseIdentity(identity)
	if err != nil {
		return "", err
	}
	if id.Provider != "tpm" {
		return "", fmt.Errorf("identity of provider %q, not tpm", id.Provider)
	}
	if len(id.Certificate) == 0 {
		return "", errors.New("the identity has no endorsement key certificate")
	}
	// OpenRecipient checks that the certificate certifies this identity's endorsement key.
	if _, err := tpm.OpenRecipient(id); err != nil {
		return "", err
	}
	roots := x509.NewCertPool()
	for rest := caPEM; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		ca, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return "", fmt.Errorf("ekCACertificates: %v", err)
		}
		roots.AddCert(ca)
	}
	cert, err := x509.ParseCertificate(id.Certificate)
	if err != nil {
		return "", fmt.Errorf("endorsement key certificate: %v", err)
	}
	// A TPM's EK certificate carries its identity in a critical subject alternative name that the standard
	// library records as unhandled when it holds only directory names: what matters here is the chain.
	cert.UnhandledCriticalExtensions = slices.DeleteFunc(cert.UnhandledCriticalExtensions,
		func(oid asn1.ObjectIdentifier) bool { return oid.Equal(asn1.ObjectIdentifier{2, 5, 29, 17}) })
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return "", fmt.Errorf("endorsement key certificate: %v", err)
	}
	return id.ID(), nil
}

// state is what one reconcile observed of the nodes, against the keyring of record.
type state struct {
	now   time.Time
	nodes []*kleidiv1.KleidiNode
	// members are the approved nodes whose member is in the keyring of record: the ones a rotation waits for.
	members []*kleidiv1.KleidiNode
	counts  kleidiv1.NodeCounts
	// unavailable names each member node whose agent is silent or whose plugin is unhealthy, with why.
	unavailable []string
	// outOfSync names each member node that has not adopted the keyring of record.
	outOfSync []string
	// awaitingApproval and awaitingEnrollment name nodes on their way in.
	awaitingApproval, awaitingEnrollment []string
	// leaving are the node members of the record that no KleidiNode is approved as any more: their Node is
	// gone. The recovery members (another provider's) stay.
	leaving []string
}

// available reports whether a node's agent reported recently and its plugin is healthy.
func (r *Reconciler) available(kn *kleidiv1.KleidiNode, now time.Time) (bool, string) {
	hb := kn.Status.HeartbeatTime
	switch {
	case hb == nil:
		return false, kn.Name + " (no agent report yet)"
	case now.Sub(hb.Time) > orDefault(r.HeartbeatTimeout, DefaultHeartbeatTimeout):
		return false, fmt.Sprintf("%s (no agent report since %s)", kn.Name, hb.UTC().Format(time.RFC3339))
	case !kn.Status.Healthy:
		return false, fmt.Sprintf("%s (plugin unhealthy: %s)", kn.Name, kn.Status.Message)
	}
	return true, ""
}

func (r *Reconciler) observe(plugin *kleidiv1.KleidiPlugin, nodes []*kleidiv1.KleidiNode) *state {
	st := &state{now: r.now(), nodes: nodes}
	st.counts.Total = int32(len(nodes))
	isApproved := make(map[string]bool, len(nodes))
	for _, kn := range nodes {
		approved := kn.Spec.ApprovedMemberID
		isApproved[approved] = true
		if approved == "" {
			if kn.Status.MemberID != "" {
				st.awaitingApproval = append(st.awaitingApproval, kn.Name)
			}
			continue
		}
		st.counts.Approved++
		ok, why := r.available(kn, st.now)
		if ok {
			st.counts.Healthy++
		}
		if !slices.Contains(plugin.Status.Members, approved) {
			if len(plugin.Status.Keyring) > 0 {
				st.awaitingEnrollment = append(st.awaitingEnrollment, kn.Name)
			}
			continue
		}
		st.counts.Enrolled++
		st.members = append(st.members, kn)
		if !ok {
			st.unavailable = append(st.unavailable, why)
		}
		if kn.Status.AdoptedDigest == plugin.Status.KeyringDigest && kn.Status.MemberID == approved && kn.Status.Joined {
			if ok {
				st.counts.InSync++
			}
		} else {
			st.outOfSync = append(st.outOfSync, kn.Name)
		}
	}
	for _, m := range plugin.Status.Members {
		if !isApproved[m] && strings.HasPrefix(m, string(plugin.Spec.Provider)+"-") {
			st.leaving = append(st.leaving, m)
		}
	}
	return st
}

// ready reports whether a member node is available and in sync with the record.
func (r *Reconciler) ready(plugin *kleidiv1.KleidiPlugin, kn *kleidiv1.KleidiNode, now time.Time) bool {
	ok, _ := r.available(kn, now)
	return ok && kn.Status.Joined && kn.Status.MemberID == kn.Spec.ApprovedMemberID &&
		kn.Status.AdoptedDigest == plugin.Status.KeyringDigest
}

// coordinator returns the first member node that is ready, or nil.
func (r *Reconciler) coordinator(plugin *kleidiv1.KleidiPlugin, st *state) *kleidiv1.KleidiNode {
	for _, kn := range st.members {
		if r.ready(plugin, kn, st.now) {
			return kn
		}
	}
	return nil
}

func (st *state) node(name string) *kleidiv1.KleidiNode {
	for _, kn := range st.nodes {
		if kn.Name == name {
			return kn
		}
	}
	return nil
}

// setPluginStatus writes the node counts and the Ready, NodesInSync and Enrolling conditions.
func (r *Reconciler) setPluginStatus(plugin *kleidiv1.KleidiPlugin, st *state) {
	s := &plugin.Status
	s.ObservedGeneration = plugin.Generation
	s.Nodes = st.counts
	set := func(typ string, ok bool, reason, msg string) {
		status := metav1.ConditionFalse
		if ok {
			status = metav1.ConditionTrue
		}
		setCondition(&s.Conditions, plugin.Generation, typ, status, reason, msg)
	}
	switch {
	case len(s.Keyring) == 0:
		set(kleidiv1.ConditionReady, false, kleidiv1.ReasonNoRecord,
			"no keyring of record yet: approve a node whose plugin was initialised (kleidi-server init)")
	case len(st.unavailable) > 0 || len(st.outOfSync) > 0 || len(st.awaitingEnrollment) > 0:
		set(kleidiv1.ConditionReady, false, kleidiv1.ReasonNodesNotReady, "not ready: "+
			strings.Join(slices.Concat(st.unavailable, prefix("not in sync: ", st.outOfSync), prefix("not enrolled: ", st.awaitingEnrollment)), ", "))
	default:
		set(kleidiv1.ConditionReady, true, kleidiv1.ReasonAllNodesReady,
			fmt.Sprintf("%d nodes enrolled, healthy and in sync", st.counts.InSync))
	}
	if len(st.outOfSync) > 0 || len(s.Keyring) == 0 {
		set(kleidiv1.ConditionNodesInSync, false, kleidiv1.ReasonNotInSync,
			"nodes that have not adopted the keyring of record: "+strings.Join(st.outOfSync, ", "))
	} else {
		set(kleidiv1.ConditionNodesInSync, true, kleidiv1.ReasonInSync, "every enrolled node adopted the keyring of record")
	}
	switch {
	case len(st.awaitingApproval) > 0:
		set(kleidiv1.ConditionEnrolling, true, kleidiv1.ReasonAwaitingApproval,
			"compare the member ID out of band, then set spec.approvedMemberID: "+strings.Join(st.awaitingApproval, ", "))
	case len(st.leaving) > 0:
		why := "waits for no rotation to run and every member node to be available and in sync"
		if blockers := slices.Concat(st.unavailable, prefix("not in sync: ", st.outOfSync)); len(blockers) > 0 {
			why = "waits for: " + strings.Join(blockers, ", ")
		}
		set(kleidiv1.ConditionEnrolling, true, kleidiv1.ReasonAwaitingUnenroll,
			"members whose node is gone, to unenroll: "+strings.Join(st.leaving, ", ")+"; "+why)
	case len(st.awaitingEnrollment) > 0:
		set(kleidiv1.ConditionEnrolling, true, kleidiv1.ReasonAwaitingEnroll,
			"approved, not yet enrolled: "+strings.Join(st.awaitingEnrollment, ", "))
	default:
		set(kleidiv1.ConditionEnrolling, false, kleidiv1.ReasonAllEnrolled, "every approved node is enrolled")
	}
}

func prefix(p string, names []string) []string {
	if len(names) == 0 {
		return nil
	}
	return []string{p + strings.Join(names, ", ")}
}

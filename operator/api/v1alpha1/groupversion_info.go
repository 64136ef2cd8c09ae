// Package v1alpha1 holds the kleidi.dev/v1alpha1 API: KleidiPlugin (the cluster's kleidi configuration and its
// keyring of record), KleidiNode (one control-plane node: its identity, approval, the request the operator
// gives it and what its agent reports) and KeyRotation (one rotation of the key-encryption key, from staging to
// retiring the previous key). Every kind is cluster-scoped.
//
// +kubebuilder:object:generate=true
// +groupName=kleidi.dev
package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

var (
	// GroupVersion is the group and version of this API.
	GroupVersion = schema.GroupVersion{Group: "kleidi.dev", Version: "v1alpha1"}

	// SchemeBuilder registers this API's kinds with a scheme.
	SchemeBuilder = runtime.NewSchemeBuilder(func(s *runtime.Scheme) error {
		s.AddKnownTypes(GroupVersion, &KleidiPlugin{}, &KleidiPluginList{}, &KleidiNode{}, &KleidiNodeList{},
			&KeyRotation{}, &KeyRotationList{})
		metav1.AddToGroupVersion(s, GroupVersion)
		return nil
	})

	// AddToScheme adds this API's kinds to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

// Labels and names the operator and the agents share.
const (
	// PluginName is the name of the one KleidiPlugin of a cluster.
	PluginName = "kleidi"
	// ScheduledLabel marks a KeyRotation the operator created because the active key reached its maximum age.
	ScheduledLabel = "kleidi.dev/scheduled"
)

// Condition types and reasons. docs/operator.md says what each means and what to do.
const (
	// ConditionReady is true on a KleidiPlugin when it has a keyring of record and every node is enrolled,
	// healthy and in sync; on a KleidiNode when its plugin is joined and healthy.
	ConditionReady = "Ready"
	// ConditionNodesInSync is true when every enrolled node adopted the keyring of record.
	ConditionNodesInSync = "NodesInSync"
	// ConditionEnrolling is true while an approved node waits to be enrolled, or a node waits for approval.
	ConditionEnrolling = "Enrolling"
	// ConditionProgressing is true while a KeyRotation moves on.
	ConditionProgressing = "Progressing"
	// ConditionBlocked is true while a KeyRotation waits for something outside the operator (its message says
	// what, and on which node).
	ConditionBlocked = "Blocked"
	// ConditionComplete is true when a KeyRotation succeeded, false when it failed.
	ConditionComplete = "Complete"

	ReasonNoRecord          = "NoKeyringOfRecord"
	ReasonNodesNotReady     = "NodesNotReady"
	ReasonAllNodesReady     = "AllNodesReady"
	ReasonInSync            = "InSync"
	ReasonNotInSync         = "NotInSync"
	ReasonAwaitingApproval  = "AwaitingApproval"
	ReasonAwaitingEnroll    = "AwaitingEnrollment"
	ReasonAwaitingUnenroll  = "AwaitingUnenrollment"
	ReasonAllEnrolled       = "AllEnrolled"
	ReasonQueued            = "Queued"
	ReasonPhase             = "Phase"
	ReasonNodeUnavailable   = "NodeUnavailable"
	ReasonNodeNotInSync     = "NodeNotInSync"
	ReasonKeyNotHeld        = "KeyNotHeld"
	ReasonKeyNotActive      = "KeyNotActive"
	ReasonNotAdopted        = "NotAdopted"
	ReasonMigrationPending  = "MigrationPending"
	ReasonOperationFailed   = "OperationFailed"
	ReasonMigrationFailed   = "MigrationFailed"
	ReasonWaitingRetention  = "RetentionPeriod"
	ReasonSucceeded         = "Succeeded"
	ReasonNotBlocked        = "NotBlocked"
	ReasonHeartbeat         = "Heartbeat"
	ReasonPluginUnavailable = "PluginUnavailable"
)

package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// KeyRotation is one rotation of the key-encryption key: stage a new key on every node, activate it, observe
// every kube-apiserver adopt it, rewrite every encrypted resource under it, verify, and retire the previous key.
// One rotation runs at a time, the oldest first.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Key",type=string,JSONPath=`.status.keyID`
// +kubebuilder:printcolumn:name="Previous",type=string,JSONPath=`.status.previousKeyID`,priority=1
// +kubebuilder:printcolumn:name="Blocked",type=string,JSONPath=`.status.conditions[?(@.type=="Blocked")].status`
// +kubebuilder:printcolumn:name="Reason",type=string,JSONPath=`.status.conditions[?(@.type=="Blocked")].reason`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type KeyRotation struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +kubebuilder:default={}
	Spec   KeyRotationSpec   `json:"spec,omitempty"`
	Status KeyRotationStatus `json:"status,omitempty"`
}

// KeyRotationSpec says why.
// +kubebuilder:validation:XValidation:rule="has(self.reason) == has(oldSelf.reason) && (!has(self.reason) || self.reason == oldSelf.reason)",message="reason is immutable"
type KeyRotationSpec struct {
	// Reason is why the key is rotated, for the record.
	// +kubebuilder:validation:MaxLength=1024
	// +optional
	Reason string `json:"reason,omitempty"`
}

// RotationPhase is where a rotation is.
// +kubebuilder:validation:Enum=Pending;Staging;Activating;Observing;Migrating;Verifying;Retiring;Succeeded;Failed
type RotationPhase string

// Rotation phases, in order.
const (
	PhasePending    RotationPhase = "Pending"
	PhaseStaging    RotationPhase = "Staging"
	PhaseActivating RotationPhase = "Activating"
	PhaseObserving  RotationPhase = "Observing"
	PhaseMigrating  RotationPhase = "Migrating"
	PhaseVerifying  RotationPhase = "Verifying"
	PhaseRetiring   RotationPhase = "Retiring"
	PhaseSucceeded  RotationPhase = "Succeeded"
	PhaseFailed     RotationPhase = "Failed"
)

// Phases lists the phases in order.
var Phases = []RotationPhase{PhasePending, PhaseStaging, PhaseActivating, PhaseObserving, PhaseMigrating,
	PhaseVerifying, PhaseRetiring, PhaseSucceeded, PhaseFailed}

// Done reports whether the rotation ended.
func (p RotationPhase) Done() bool { return p == PhaseSucceeded || p == PhaseFailed }

// KeyRotationStatus is where the rotation is; the operator resumes from it after a restart.
type KeyRotationStatus struct {
	// +optional
	Phase RotationPhase `json:"phase,omitempty"`
	// Coordinator is the node that stages and activates the key.
	// +optional
	Coordinator string `json:"coordinator,omitempty"`
	// PreviousKeyID is the key active before the rotation, retired at the end.
	// +optional
	PreviousKeyID string `json:"previousKeyID,omitempty"`
	// KeyID is the new key.
	// +optional
	KeyID string `json:"keyID,omitempty"`
	// +optional
	ActivatedAt *metav1.Time `json:"activatedAt,omitempty"`
	// Migrations are the StorageVersionMigrations that rewrite each resource under the new key.
	// +optional
	// +listType=atomic
	Migrations []Migration `json:"migrations,omitempty"`
	// +optional
	MigratedAt *metav1.Time `json:"migratedAt,omitempty"`
	// RetireAfter is when the previous key is forgotten: migratedAt plus retiredKeyRetention.
	// +optional
	RetireAfter *metav1.Time `json:"retireAfter,omitempty"`
	// Forgotten are the keys every node forgets at retireAfter: the previous key and every older retired key (such
	// as those an unenrolled member held), all re-encrypted away by the migration.
	// +optional
	Forgotten []string `json:"forgotten,omitempty"`
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions are Progressing, Blocked and Complete.
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// Migration is one StorageVersionMigration.
type Migration struct {
	Resource string `json:"resource"`
	Name     string `json:"name"`
	// Phase is Pending, Running, Succeeded or Failed.
	Phase string `json:"phase"`
}

// KeyRotationList is a list of KeyRotations.
//
// +kubebuilder:object:root=true
type KeyRotationList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []KeyRotation `json:"items"`
}

package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// KleidiPlugin is the kleidi configuration of a cluster: there is exactly one, named "kleidi". Its status holds
// the keyring of record, the keyring every node adopts.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster
// +kubebuilder:validation:XValidation:rule="self.metadata.name == 'kleidi'",message="a cluster has one KleidiPlugin, named kleidi"
// +kubebuilder:printcolumn:name="Provider",type=string,JSONPath=`.spec.provider`
// +kubebuilder:printcolumn:name="Active Key",type=string,JSONPath=`.status.activeKeyID`
// +kubebuilder:printcolumn:name="Nodes",type=integer,JSONPath=`.status.nodes.total`
// +kubebuilder:printcolumn:name="In Sync",type=integer,JSONPath=`.status.nodes.inSync`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type KleidiPlugin struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   KleidiPluginSpec   `json:"spec"`
	Status KleidiPluginStatus `json:"status,omitempty"`
}

// KleidiPluginSpec is what the administrator declares.
type KleidiPluginSpec struct {
	// Provider is the root of trust of every node's plugin.
	// +kubebuilder:validation:Enum=tpm;gpg;pkcs11;awskms
	Provider string `json:"provider"`

	// Resources are the resources kube-apiserver encrypts with kleidi, as in its EncryptionConfiguration: after
	// a rotation each is rewritten under the new key.
	// +kubebuilder:default={{resource:"secrets"}}
	// +kubebuilder:validation:MinItems=1
	// +listType=atomic
	// +optional
	Resources []GroupResource `json:"resources,omitempty"`

	// NodeSelector selects the nodes that run kleidi: the control-plane nodes.
	// +kubebuilder:default={"node-role.kubernetes.io/control-plane":""}
	// +optional
	NodeSelector map[string]string `json:"nodeSelector,omitempty"`

	// Rotation is the rotation policy.
	// +kubebuilder:default={}
	// +optional
	Rotation RotationPolicy `json:"rotation,omitempty"`

	// Enrollment says how new nodes are approved.
	// +kubebuilder:default={}
	// +optional
	Enrollment EnrollmentPolicy `json:"enrollment,omitempty"`
}

// GroupResource names a resource kube-apiserver encrypts.
type GroupResource struct {
	// Group is the API group; empty for the core group.
	// +optional
	Group string `json:"group,omitempty"`
	// Resource is the plural resource name, such as secrets.
	// +kubebuilder:validation:MinLength=1
	Resource string `json:"resource"`
}

// String returns resource.group, or resource for the core group.
func (g GroupResource) String() string {
	if g.Group == "" {
		return g.Resource
	}
	return g.Resource + "." + g.Group
}

// RotationPolicy says when keys are rotated and how long a retired key stays.
// +kubebuilder:validation:XValidation:rule="!has(self.maxKeyAge) || duration(self.maxKeyAge) >= duration('1h')",message="maxKeyAge must be at least 1h"
// +kubebuilder:validation:XValidation:rule="!has(self.retiredKeyRetention) || duration(self.retiredKeyRetention) >= duration('0s')",message="retiredKeyRetention must not be negative"
type RotationPolicy struct {
	// MaxKeyAge is the age at which the operator creates a scheduled KeyRotation.
	// +kubebuilder:default="2160h"
	// +optional
	MaxKeyAge *metav1.Duration `json:"maxKeyAge,omitempty"`
	// RetiredKeyRetention is how long the previous key stays on every node after the migration: it must cover
	// the etcd backup retention, since a restored backup holds data under the previous key.
	// +kubebuilder:default="720h"
	// +optional
	RetiredKeyRetention *metav1.Duration `json:"retiredKeyRetention,omitempty"`
}

// ApprovalMode says who approves a node's member ID.
// +kubebuilder:validation:Enum=Manual;Automatic
type ApprovalMode string

// Approval modes.
const (
	// ApprovalManual: an administrator sets KleidiNode.spec.approvedMemberID after comparing it out of band.
	ApprovalManual ApprovalMode = "Manual"
	// ApprovalAutomatic: the operator approves a TPM node whose endorsement key certificate chains to
	// ekCACertificates.
	ApprovalAutomatic ApprovalMode = "Automatic"
)

// EnrollmentPolicy says how new nodes are approved.
// +kubebuilder:validation:XValidation:rule="!has(self.approval) || self.approval != 'Automatic' || (has(self.ekCACertificates) && size(self.ekCACertificates) > 0)",message="approval Automatic needs ekCACertificates"
type EnrollmentPolicy struct {
	// Approval is Manual or Automatic.
	// +kubebuilder:default=Manual
	// +optional
	Approval ApprovalMode `json:"approval,omitempty"`
	// EKCACertificates are the PEM certificates of the TPM manufacturers' CAs that Automatic approval trusts.
	// +optional
	EKCACertificates string `json:"ekCACertificates,omitempty"`
}

// KleidiPluginStatus is what the operator observes and the keyring of record.
type KleidiPluginStatus struct {
	// ObservedGeneration is the generation this status reflects.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// ActiveKeyID is the active key of the keyring of record.
	// +optional
	ActiveKeyID string `json:"activeKeyID,omitempty"`
	// Keyring is the keyring of record: wrapped keys and public data only. Every approved node adopts it; a
	// plugin accepts from it only what its trusted members signed.
	// +optional
	Keyring []byte `json:"keyring,omitempty"`
	// KeyringDigest is "sha256:<hex>" of Keyring.
	// +optional
	KeyringDigest string `json:"keyringDigest,omitempty"`
	// KeyringSource is the node whose keyring became the record last.
	// +optional
	KeyringSource string `json:"keyringSource,omitempty"`
	// Members are the member IDs of the keyring of record.
	// +optional
	// +listType=atomic
	Members []string `json:"members,omitempty"`
	// Nodes counts the nodes by state.
	// +optional
	Nodes NodeCounts `json:"nodes,omitempty"`
	// Conditions are Ready, NodesInSync and Enrolling.
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// NodeCounts counts the selected nodes by state.
type NodeCounts struct {
	Total    int32 `json:"total"`
	Approved int32 `json:"approved"`
	Enrolled int32 `json:"enrolled"`
	Healthy  int32 `json:"healthy"`
	InSync   int32 `json:"inSync"`
}

// KleidiPluginList is a list of KleidiPlugins.
//
// +kubebuilder:object:root=true
type KleidiPluginList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []KleidiPlugin `json:"items"`
}

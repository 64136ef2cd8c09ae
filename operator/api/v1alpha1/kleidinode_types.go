package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// KleidiNode is one node that runs kleidi. The operator creates it for each selected Node (same name, owned by
// the Node) and writes its spec; only that node's agent writes its status.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster
// +kubebuilder:printcolumn:name="Member",type=string,JSONPath=`.status.memberID`
// +kubebuilder:printcolumn:name="Approved",type=string,JSONPath=`.spec.approvedMemberID`,priority=1
// +kubebuilder:printcolumn:name="Joined",type=boolean,JSONPath=`.status.joined`
// +kubebuilder:printcolumn:name="Active Key",type=string,JSONPath=`.status.activeKeyID`
// +kubebuilder:printcolumn:name="Healthy",type=boolean,JSONPath=`.status.healthy`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type KleidiNode struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   KleidiNodeSpec   `json:"spec,omitempty"`
	Status KleidiNodeStatus `json:"status,omitempty"`
}

// KleidiNodeSpec is the node's approval and the operator's request to its agent.
type KleidiNodeSpec struct {
	// ApprovedMemberID is the member ID an administrator approved for this node after comparing it with the one
	// the node printed (like approving a certificate signing request), or that the operator approved because the
	// node's TPM endorsement key certificate chains to the configured CAs. Only approved members are enrolled
	// and trusted.
	// +optional
	ApprovedMemberID string `json:"approvedMemberID,omitempty"`
	// Request is the operation the operator asks this node's agent to run. The agent runs each request ID once.
	// +optional
	Request *NodeRequest `json:"request,omitempty"`
}

// RequestType is an operation an agent runs on its plugin.
// +kubebuilder:validation:Enum=Stage;Activate;Enroll;Unenroll;Forget
type RequestType string

// Request types.
const (
	RequestStage    RequestType = "Stage"
	RequestActivate RequestType = "Activate"
	RequestEnroll   RequestType = "Enroll"
	RequestUnenroll RequestType = "Unenroll"
	RequestForget   RequestType = "Forget"
)

// NodeRequest is an operation for a node's agent.
// +kubebuilder:validation:XValidation:rule="self.type != 'Activate' && self.type != 'Forget' || has(self.keyID)",message="Activate and Forget need keyID"
// +kubebuilder:validation:XValidation:rule="self.type != 'Enroll' || has(self.node)",message="Enroll needs node"
// +kubebuilder:validation:XValidation:rule="self.type != 'Unenroll' || has(self.memberID)",message="Unenroll needs memberID"
type NodeRequest struct {
	// ID names the request; an agent runs each ID once.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	ID string `json:"id"`
	// Type is the operation.
	Type RequestType `json:"type"`
	// KeyID is the key to activate or forget.
	// +optional
	KeyID string `json:"keyID,omitempty"`
	// Node is, for Enroll, the node whose identity to enroll.
	// +optional
	Node string `json:"node,omitempty"`
	// MemberID is, for Unenroll, the member to remove.
	// +optional
	MemberID string `json:"memberID,omitempty"`
}

// KleidiNodeStatus is what the node's agent reports of its plugin.
type KleidiNodeStatus struct {
	// MemberID is the ID of the plugin's identity: compare it out of band before approving.
	// +optional
	MemberID string `json:"memberID,omitempty"`
	// Identity is the plugin's identity file (public keys and, for a TPM, its endorsement key certificate).
	// +optional
	Identity []byte `json:"identity,omitempty"`
	// Provider is the plugin's root of trust.
	// +optional
	Provider string `json:"provider,omitempty"`
	// Joined is true once the plugin has a keyring and serves kube-apiserver.
	// +optional
	Joined bool `json:"joined,omitempty"`
	// Healthy is the plugin's health.
	// +optional
	Healthy bool `json:"healthy,omitempty"`
	// Message says why the plugin or the agent is not healthy.
	// +optional
	Message string `json:"message,omitempty"`
	// ActiveKeyID is the plugin's active key.
	// +optional
	ActiveKeyID string `json:"activeKeyID,omitempty"`
	// Keys are the keys of the plugin's keyring.
	// +optional
	// +listType=atomic
	Keys []NodeKey `json:"keys,omitempty"`
	// Members are the member IDs of the plugin's keyring.
	// +optional
	// +listType=atomic
	Members []string `json:"members,omitempty"`
	// KeyringDigest is "sha256:<hex>" of Keyring.
	// +optional
	KeyringDigest string `json:"keyringDigest,omitempty"`
	// Keyring is the plugin's keyring (wrapped keys and public data only), published so that the operator can
	// make it the keyring of record after an operation.
	// +optional
	Keyring []byte `json:"keyring,omitempty"`
	// AdoptedDigest is the digest of the keyring of record this node last adopted.
	// +optional
	AdoptedDigest string `json:"adoptedDigest,omitempty"`
	// Adoption is what the node's kube-apiserver adopted.
	// +optional
	Adoption *Adoption `json:"adoption,omitempty"`
	// LastOperation is the last request the agent ran.
	// +optional
	LastOperation *Operation `json:"lastOperation,omitempty"`
	// HeartbeatTime is when the agent last reported.
	// +optional
	HeartbeatTime *metav1.Time `json:"heartbeatTime,omitempty"`
	// Conditions: Ready.
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// NodeKey is one key of a node's keyring. Its ID is a fingerprint of the key: a non-secret check value.
type NodeKey struct {
	ID string `json:"id"`
	// State is active, staged or retired.
	State string `json:"state"`
	// Held is true when the plugin can unwrap the key now.
	Held bool `json:"held"`
	// Created is when the key was made.
	// +optional
	Created *metav1.Time `json:"created,omitempty"`
}

// Adoption is the active key ID the plugin last reported to its kube-apiserver, when it first did, and the
// first Encrypt after that: kube-apiserver encrypts under the key from then on.
type Adoption struct {
	// +optional
	KeyID string `json:"keyID,omitempty"`
	// +optional
	StatusAt *metav1.Time `json:"statusAt,omitempty"`
	// +optional
	EncryptAt *metav1.Time `json:"encryptAt,omitempty"`
}

// Operation is the outcome of a request.
type Operation struct {
	ID   string      `json:"id"`
	Type RequestType `json:"type"`
	// KeyID is the key staged, activated, forgotten or, for Unenroll, made active.
	// +optional
	KeyID string `json:"keyID,omitempty"`
	// MemberID is the member enrolled or removed.
	// +optional
	MemberID  string `json:"memberID,omitempty"`
	Succeeded bool   `json:"succeeded"`
	// +optional
	Message string `json:"message,omitempty"`
	// KeyringDigest is the digest of the node's keyring right after the operation.
	// +optional
	KeyringDigest string      `json:"keyringDigest,omitempty"`
	Time          metav1.Time `json:"time"`
}

// KleidiNodeList is a list of KleidiNodes.
//
// +kubebuilder:object:root=true
type KleidiNodeList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []KleidiNode `json:"items"`
}

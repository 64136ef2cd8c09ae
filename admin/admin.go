// Package admin is the local admin API of a kleidi plugin: what the agent of the kleidi operator, on the same
// node, asks of the plugin. It reads the plugin's state (identity, keys, the key ID kube-apiserver adopted), stages
// and activates KEKs, enrolls and unenrolls members, forgets retired keys, and adopts a keyring another node
// published.
//
// The API is HTTP with JSON bodies over a unix socket of its own, never the KMS socket: kube-apiserver has no
// business on it. [Listen] gives the socket the same hygiene as the KMS socket (a private directory, mode 0600)
// and [Serve] answers only the user IDs it is given, checked with the kernel's peer credentials (SO_PEERCRED) of
// each connection.
//
// Nothing that arrives on this socket is trusted as a key: the keyring given to Adopt is verified like a keyring
// read from disk, copies signed by members this node does not trust are ignored, and no key material crosses the
// socket unwrapped. A caller can make a node change keys, never make it accept a KEK of the caller's choosing.
package admin

import (
	"fmt"
	"time"
)

// State is what the plugin reports of itself.
type State struct {
	// Provider is the name of the plugin's root of trust.
	Provider string `json:"provider"`
	// MemberID is the member ID of the node's root of trust; empty for a root with no identity.
	MemberID string `json:"memberID,omitempty"`
	// Identity is the node's public identity (kleidi.MarshalIdentity), for another node to enroll it.
	Identity []byte `json:"identity,omitempty"`
	// Joined is true once the node has a keyring. A node started without one waits for [Client.Adopt].
	Joined bool `json:"joined"`
	// Healthy says whether the root of trust answers and the active KEK is usable; Message says why not.
	Healthy bool   `json:"healthy"`
	Message string `json:"message,omitempty"`
	// ActiveKeyID is the key ID new data is encrypted under.
	ActiveKeyID string `json:"activeKeyID,omitempty"`
	// Keys are the keyring's KEKs, oldest first. A key ID is a fingerprint of its key: the non-secret check value
	// that tells two nodes hold the same KEK.
	Keys []Key `json:"keys,omitempty"`
	// Members are the member IDs every KEK is wrapped for.
	Members []string `json:"members,omitempty"`
	// KeyringDigest is "sha256:<hex>" of the keyring file.
	KeyringDigest string `json:"keyringDigest,omitempty"`
	// Adoption is what kube-apiserver has taken up of the active key.
	Adoption Adoption `json:"adoption"`
}

// Key is one KEK of the keyring.
type Key struct {
	ID      string    `json:"id"`
	State   string    `json:"state"` // active, staged or retired
	Created time.Time `json:"created"`
	// Held is true when this node can unwrap the key now.
	Held bool `json:"held"`
}

// Adoption tells whether the kube-apiserver that calls this plugin uses the active key: it asks the plugin's
// Status for the key ID every minute or so, and on a new key ID generates a new DEK and has it encrypted.
type Adoption struct {
	// KeyID is the key ID the plugin last reported to Status.
	KeyID string `json:"keyID,omitempty"`
	// StatusAt is when Status first reported KeyID.
	StatusAt time.Time `json:"statusAt,omitzero"`
	// EncryptAt is when the first Encrypt under KeyID after StatusAt was served: kube-apiserver adopted the key.
	EncryptAt time.Time `json:"encryptAt,omitzero"`
}

// Adopted reports whether kube-apiserver adopted key id.
func (a Adoption) Adopted(id string) bool { return a.KeyID == id && !a.EncryptAt.IsZero() }

// The codes of an [Error].
const (
	// CodeInvalid: the request is malformed (an unparsable keyring or identity, a missing argument).
	CodeInvalid = "invalid"
	// CodeRefused: the plugin refuses the change (a key not every member holds, an untrusted keyring, a key that
	// would be dropped, a retired key made active).
	CodeRefused = "refused"
	// CodeNotJoined: the node has no keyring yet; only State and Adopt answer.
	CodeNotJoined = "not_joined"
	// CodeUnavailable: the root of trust or the keyring could not be reached; try again.
	CodeUnavailable = "unavailable"
)

// Error is an error the plugin answered with.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return fmt.Sprintf("admin: %s: %s", e.Code, e.Message) }

// request bodies and answers
type (
	keyIDBody struct {
		KeyID string `json:"keyID"`
	}
	memberBody struct {
		MemberID string `json:"memberID"`
	}
	identityBody struct {
		Identity []byte `json:"identity"`
	}
	adoptBody struct {
		Keyring []byte   `json:"keyring"`
		Trusted []string `json:"trusted,omitempty"`
	}
)

package kleidi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/kleidi-kms/kleidi/internal/atomicfile"
	"github.com/kleidi-kms/kleidi/internal/trustedpath"
)

// Files of a [StateDir].
const (
	// KeyringFileName is the keyring in a state directory.
	KeyringFileName = "keyring.json"
	// NodeStateFileName is what the node remembers of its keyring ([NodeState]).
	NodeStateFileName = "node-state.json"
)

// StateDir is the directory a node keeps its kleidi state in: the keyring ([KeyringFileName]) and what the node
// remembers of it ([NodeStateFileName]). Neither holds a secret, but both decide what the node trusts, so the
// directory and every directory above it must be safe from other users: owned by root or by the user running the
// process, and not writable by group or others ([OpenStateDir] checks it). Files written here get the directory's
// owner, so a directory made for the plugin's user stays its own when root runs a command in it.
type StateDir struct {
	path string
}

// OpenStateDir returns the state directory at path, creating it (mode 0700) if it does not exist, after checking
// that it and the directories above it are safe (see [StateDir]).
func OpenStateDir(path string) (*StateDir, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("kleidi: state directory: %w", err)
	}
	if err := trustedpath.MkdirAll(abs, stateOwners(abs)...); err != nil {
		return nil, fmt.Errorf("kleidi: state directory: %w", err)
	}
	return &StateDir{path: abs}, nil
}

// stateOwners are the owners a state directory may have: this process's user and root, and for root also the
// directory's owner (the plugin's user).
func stateOwners(dir string) []uint32 {
	owners := []uint32{uint32(os.Geteuid())}
	if os.Geteuid() == 0 {
		if uid, _, err := trustedpath.Owner(dir); err == nil {
			owners = append(owners, uid)
		}
	}
	return owners
}

// Path returns the directory's absolute path.
func (d *StateDir) Path() string { return d.path }

// Keyring returns the keyring of the directory.
func (d *StateDir) Keyring() *FileKeyring {
	return NewFileKeyring(filepath.Join(d.path, KeyringFileName))
}

// NodeState returns what the node saved of its keyring; a directory that has none gives the zero NodeState.
func (d *StateDir) NodeState() (NodeState, error) {
	var s NodeState
	b, err := os.ReadFile(filepath.Join(d.path, NodeStateFileName))
	if errors.Is(err, fs.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return s, fmt.Errorf("kleidi: state directory: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return s, fmt.Errorf("kleidi: state directory: %s: %v", NodeStateFileName, err)
	}
	return s, nil
}

// SaveNodeState writes s durably and atomically, when it differs from what the directory holds.
func (d *StateDir) SaveNodeState(s NodeState) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	path := filepath.Join(d.path, NodeStateFileName)
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, b) {
		return nil
	}
	o := atomicfile.Options{UID: -1, GID: -1}
	if os.Geteuid() == 0 {
		if uid, gid, err := trustedpath.Owner(d.path); err == nil && uid != 0 {
			o = atomicfile.Options{UID: int(uid), GID: int(gid), Chown: true}
		}
	}
	if err := atomicfile.Write(path, b, o); err != nil {
		return fmt.Errorf("kleidi: state directory: %w", err)
	}
	return nil
}

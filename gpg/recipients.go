package gpg

import (
	"fmt"
	"strings"

	v2 "github.com/ProtonMail/go-crypto/openpgp/v2"

	"github.com/kleidi-kms/kleidi"
)

// recipientIDs maps every name parseMessage may give a key of entities to the fingerprint of its primary key
// (as [Provider.Recipients] gives it). The names are the long key ID of each primary key and subkey ("0x" and
// 16 upper-case hex digits, as a version 3 session key packet names it) and its fingerprint (as a version 6
// session key packet names it).
func recipientIDs(entities []*v2.Entity) map[string]string {
	ids := make(map[string]string)
	for _, e := range entities {
		primary := fingerprint(e)
		keys := []*v2.Subkey{{PublicKey: e.PrimaryKey}}
		for i := range e.Subkeys {
			keys = append(keys, &e.Subkeys[i])
		}
		for _, k := range keys {
			ids[fmt.Sprintf("0x%016X", k.PublicKey.KeyId)] = primary
			ids[fmt.Sprintf("0x%X", k.PublicKey.Fingerprint)] = primary
		}
	}
	return ids
}

// describeRecipients names the keys a wrapped key is encrypted to, as parseMessage lists them, for an error:
// a recipient of p by the fingerprint of its primary key, any other key by the key ID the message gives.
func (p *Provider) describeRecipients(ids []string) string {
	var names []string
	seen := make(map[string]bool)
	for _, id := range ids {
		name := p.recipientIDs[id]
		switch {
		case name != "":
		case id == "*":
			name = "a hidden recipient"
		default:
			name = "key " + id + " (not a recipient here)"
		}
		if !seen[name] {
			seen[name] = true
			names = append(names, name)
		}
	}
	return strings.Join(names, ", ")
}

// CheckRecipients returns nil if every key blob is encrypted to belongs to a recipient of p, and otherwise an
// error wrapping [ErrRecipientRemoved] that names the keys the configuration no longer names (by key ID or
// fingerprint: no key material). A hidden recipient (gpg --throw-keyids) counts as removed, since no one can
// tell whose it is. A blob that is not a wrapped key gives an error wrapping [kleidi.ErrUnwrap].
//
// Removing a recipient from the configuration and wrapping every KEK again (kleidi.Rewrap) revokes
// nothing: the removed key still unwraps every copy made before, and every ciphertext that carries one.
// A program that re-wraps calls CheckRecipients on each existing copy first and refuses when it fails:
// removing a recipient takes a new KEK wrapped only to the remaining recipients (a rotation) and the
// re-encryption of every ciphertext under it.
func (p *Provider) CheckRecipients(blob []byte) error {
	if p.closed.Load() {
		return fmt.Errorf("gpg: check recipients: %w", kleidi.ErrClosed)
	}
	if len(blob) == 0 || len(blob) > kleidi.MaxWrappedKeySize {
		return fmt.Errorf("gpg: check recipients: blob of %d bytes, want 1 to %d: %w",
			len(blob), kleidi.MaxWrappedKeySize, kleidi.ErrUnwrap)
	}
	ids, err := parseMessage(blob)
	if err != nil {
		return fmt.Errorf("gpg: check recipients: not a wrapped key: %v: %w", err, kleidi.ErrUnwrap)
	}
	var removed []string
	seen := make(map[string]bool)
	for _, id := range ids {
		if p.recipientIDs[id] != "" || seen[id] {
			continue
		}
		seen[id] = true
		if id == "*" {
			id = "a hidden recipient"
		}
		removed = append(removed, id)
	}
	if len(removed) > 0 {
		return fmt.Errorf("gpg: wrapped key is encrypted to %s, which the configuration no longer names: "+
			"a rewrap leaves that key able to unwrap it; removing a recipient takes a rotation and "+
			"re-encryption of the data: %w", strings.Join(removed, ", "), ErrRecipientRemoved)
	}
	return nil
}

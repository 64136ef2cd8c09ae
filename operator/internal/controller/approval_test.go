package controller

import (
	"strings"
	"testing"

	"github.com/kleidi-kms/kleidi"
)

// TestVerifyEKIdentityRefuses proves that automatic approval refuses what it cannot check: an identity that is
// not a TPM's, a TPM identity without an endorsement key certificate, and bytes that are no identity.
func TestVerifyEKIdentityRefuses(t *testing.T) {
	marshal := func(id *kleidi.Identity) []byte {
		b, err := kleidi.MarshalIdentity(id)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, tc := range []struct {
		name     string
		identity []byte
		want     string
	}{
		{"gpg", marshal(&kleidi.Identity{Provider: "gpg", PublicKey: []byte("public")}), "not tpm"},
		{"tpm without certificate", marshal(&kleidi.Identity{Provider: "tpm", PublicKey: []byte("public")}), "no endorsement key certificate"},
		{"garbage", []byte("{"), "identity"},
	} {
		if _, err := VerifyEKIdentity(tc.identity, nil); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: VerifyEKIdentity() err = %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
}

package kleidi

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/json"
	"os"
	"testing"
	"time"
)

// goldenKeyringV3 pins keyring format version 3: keys wrapped for several members, and the members.
const goldenKeyringV3 = "testdata/keyring-v3.json"

// goldenIdentity is an identity with fixed keys: the public key of the P-256 generator (private scalar 1) as its
// verify key, so that its ID, which the golden file and the test pin, never changes.
func goldenIdentity(provider, publicKey string, verify bool) Identity {
	id := Identity{Provider: provider, PublicKey: []byte(publicKey)}
	if verify {
		c := elliptic.P256().Params()
		point := append([]byte{4}, append(c.Gx.FillBytes(make([]byte, 32)), c.Gy.FillBytes(make([]byte, 32))...)...)
		pub, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), point)
		if err != nil {
			panic(err)
		}
		vk, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			panic(err)
		}
		id.VerifyKey = vk
	}
	return id
}

func goldenRing() Ring {
	a := goldenIdentity("tpm", "endorsement key of node a", true)
	b := goldenIdentity("tpm", "endorsement key of node b", true)
	rec := goldenIdentity("gpg", "recovery public key", false)
	at := time.Date(2026, 11, 30, 9, 0, 0, 0, time.UTC)
	return Ring{
		Keys: []KeyRecord{
			{ID: keyIDFor("tpm", bytes.Repeat([]byte{1}, KeySize)), Created: at, State: KeyRetired, Wrapped: []WrappedKey{
				{Root: "tpm", Recipient: a.ID(), Blob: []byte("sealed by node a"), Proof: []byte("proved by node a")},
				{Root: "tpm", Recipient: b.ID(), Blob: []byte("sealed by node b"), Proof: []byte("proved by node b")},
				{Root: "gpg", Recipient: rec.ID(), Sender: a.ID(), Blob: []byte("encrypted to the recovery key"), Proof: []byte("signed by node a")},
			}},
			{ID: keyIDFor("tpm", bytes.Repeat([]byte{2}, KeySize)), Created: at, State: KeyActive, Wrapped: []WrappedKey{
				{Root: "tpm", Recipient: a.ID(), Blob: []byte("sealed by node a"), Proof: []byte("proved by node a")},
				{Root: "tpm", Recipient: b.ID(), Sender: a.ID(), Blob: []byte("duplicated to node b's EK"), Proof: []byte("signed by node a")},
			}},
			{ID: keyIDFor("tpm", bytes.Repeat([]byte{3}, KeySize)), Created: at, State: KeyStaged, Wrapped: []WrappedKey{
				{Root: "tpm", Recipient: b.ID(), Blob: []byte("sealed by node b"), Proof: []byte("proved by node b")},
				{Root: "tpm", Recipient: a.ID(), Sender: b.ID(), Blob: []byte("duplicated to node a's EK"), Proof: []byte("signed by node b")},
			}},
		},
		Members: []Member{
			{ID: a.ID(), Identity: a, Added: at, Endorser: a.ID(), Endorsement: []byte("node a endorses itself")},
			{ID: b.ID(), Identity: b, Added: at, Endorser: a.ID(), Endorsement: []byte("node a endorses node b")},
			{ID: rec.ID(), Identity: rec, Added: at, Endorser: a.ID(), Endorsement: []byte("node a endorses the recovery key")},
		},
	}
}

func TestGoldenKeyringV3(t *testing.T) {
	if got, want := goldenRing().Members[0].ID, "tpm-xyantjqg64gyzuzpuhympgozyu"; got != want {
		t.Errorf("Identity.ID() of the golden identity = %q, want %q: the ID derivation changed", got, want)
	}
	b, err := os.ReadFile(goldenKeyringV3)
	if err != nil {
		t.Fatal(err)
	}
	ring, err := parseKeyring(b)
	if err != nil {
		t.Fatalf("parseKeyring(%s) err = %v", goldenKeyringV3, err)
	}
	wantRing := goldenRing()
	wantRing.Version = 3
	got, _ := json.Marshal(ring)
	want, _ := json.Marshal(wantRing)
	if !bytes.Equal(got, want) {
		t.Errorf("parseKeyring(%s) = %s, want %s", goldenKeyringV3, got, want)
	}
	if enc, err := encodeKeyring(goldenRing()); err != nil || !bytes.Equal(enc, b) {
		t.Errorf("encodeKeyring(golden ring) differs from %s (err %v):\n%s", goldenKeyringV3, err, enc)
	}
	// A keyring of one root stays version 2, readable by the releases before members.
	if enc, _ := encodeKeyring(Ring{Keys: goldenRecords(true)}); !bytes.Contains(enc, []byte(`"version": 2`)) {
		t.Errorf("a keyring without members is not written as version 2")
	}
}

func TestGoldenIdentityFile(t *testing.T) {
	id := goldenIdentity("tpm", "endorsement key of node a", true)
	b, err := MarshalIdentity(&id)
	if err != nil {
		t.Fatal(err)
	}
	const file = "testdata/identity-v1.json"
	want, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, want) {
		t.Errorf("MarshalIdentity(golden identity) differs from %s:\n%s", file, b)
	}
	back, err := ParseIdentity(want)
	if err != nil || back.ID() != id.ID() {
		t.Errorf("ParseIdentity(%s) = %v, %v", file, back, err)
	}
	// An identity file whose stated ID is not its keys' is refused: an ID is what people compare.
	if _, err := ParseIdentity(bytes.Replace(want, []byte(id.ID()), []byte("tpm-aaaaaaaaaaaaaaaaaaaaaaaaaa"), 1)); err == nil {
		t.Errorf("ParseIdentity(file with another ID) err = nil")
	}
}

func FuzzParseIdentity(f *testing.F) {
	if b, err := os.ReadFile("testdata/identity-v1.json"); err == nil {
		f.Add(b)
	}
	f.Add([]byte(`{"format":"kleidi-identity"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		id, err := ParseIdentity(b)
		if err != nil {
			return
		}
		again, err := MarshalIdentity(id)
		if err != nil {
			t.Fatalf("MarshalIdentity(ParseIdentity(b)) err = %v", err)
		}
		if back, err := ParseIdentity(again); err != nil || back.ID() != id.ID() {
			t.Fatalf("identity round trip: %v", err)
		}
	})
}

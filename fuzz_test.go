package kleidi

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"testing"
	"time"
)

// goldenKeyringV1 is a keyring of format version 1 (no proofs), which stays readable; goldenKeyring pins the
// current format, version 2.
const (
	goldenKeyringV1 = "testdata/keyring-v1.json"
	goldenKeyring   = "testdata/keyring-v2.json"
)

// goldenRecords are the records of both golden keyrings; version 2 adds the proofs.
func goldenRecords(withProofs bool) []KeyRecord {
	proof := func(s string) []byte {
		if withProofs {
			return []byte(s)
		}
		return nil
	}
	return []KeyRecord{
		{ID: "kleidi-tpm-msxvg7mdtppselux3dk6numrshf5v5ny", Created: time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC), State: KeyRetired,
			Wrapped: []WrappedKey{{Root: "tpm", Blob: []byte("wrapped by a tpm"), Proof: proof("proved by the tpm")}}},
		{ID: keyIDFor("gpg", bytes.Repeat([]byte{2}, KeySize)), Created: time.Date(2026, 11, 20, 8, 30, 0, 0, time.UTC), State: KeyActive,
			Wrapped: []WrappedKey{{Root: "gpg", Blob: []byte("wrapped by gpg"), Proof: proof("signed by gpg")}, {Root: "tpm", Blob: []byte("and by a tpm")}}},
	}
}

func TestGoldenKeyring(t *testing.T) {
	for file, withProofs := range map[string]bool{goldenKeyringV1: false, goldenKeyring: true} {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		records, err := parseKeyring(b)
		if err != nil {
			t.Fatalf("parseKeyring(%s) err = %v, want nil", file, err)
		}
		got, _ := json.Marshal(records.Keys)
		wantJSON, _ := json.Marshal(goldenRecords(withProofs))
		if !bytes.Equal(got, wantJSON) {
			t.Errorf("parseKeyring(%s) = %s, want %s", file, got, wantJSON)
		}
	}
	b, err := os.ReadFile(goldenKeyring)
	if err != nil {
		t.Fatal(err)
	}
	if enc, err := encodeKeyring(Ring{Keys: goldenRecords(true)}); err != nil || !bytes.Equal(enc, b) {
		t.Errorf("encodeKeyring(golden records) differs from %s (err %v):\n%s", goldenKeyring, err, enc)
	}
}

// TestGoldenAttachedKey pins the attached key format, version 2, and the message its proof covers.
func TestGoldenAttachedKey(t *testing.T) {
	id := keyIDFor("gpg", bytes.Repeat([]byte{2}, KeySize))
	blob, proof := []byte("wrapped by gpg"), []byte("signed by gpg")
	const wantAttached = "7702000d7369676e6564206279206770677772617070656420627920677067" // 'w', 2, 13, proof, blob
	if got := hex.EncodeToString(encodeAttachedKey(blob, proof)); got != wantAttached {
		t.Errorf("encodeAttachedKey(blob, proof) = %s, want %s", got, wantAttached)
	}
	a, _ := hex.DecodeString(wantAttached)
	gotBlob, gotProof, err := parseAttachedKey(a)
	if err != nil || !bytes.Equal(gotBlob, blob) || !bytes.Equal(gotProof, proof) {
		t.Errorf("parseAttachedKey(golden) = %q, %q, %v; want %q, %q, nil", gotBlob, gotProof, err, blob, proof)
	}
	wantMessage := "kleidi wrapped key v2\x00" + id + "\x00gpg\x00wrapped by gpg"
	if got := string(proofMessage(id, "gpg", blob)); got != wantMessage {
		t.Errorf("proofMessage(id, gpg, blob) = %q, want %q", got, wantMessage)
	}
}

func FuzzParseAttachedKey(f *testing.F) {
	f.Add(encodeAttachedKey([]byte("blob"), []byte("proof")))
	f.Add([]byte{'w', 2, 0, 1, 'p'})
	f.Add([]byte{'w', 2, 0xff, 0xff})
	f.Add([]byte("KTPM"))
	f.Fuzz(func(t *testing.T, b []byte) {
		blob, proof, err := parseAttachedKey(b)
		if err != nil {
			if !errors.Is(err, ErrUnauthenticated) {
				t.Errorf("parseAttachedKey(b) err = %v, want an error wrapping ErrUnauthenticated", err)
			}
			return
		}
		if len(proof) == 0 || len(proof) > MaxProofSize || len(blob) == 0 || len(blob) > MaxWrappedKeySize {
			t.Errorf("parseAttachedKey(b) = %d-byte blob, %d-byte proof: out of bounds", len(blob), len(proof))
		}
		if !bytes.Equal(encodeAttachedKey(blob, proof), b) {
			t.Errorf("encodeAttachedKey(parseAttachedKey(b)) != b")
		}
	})
}

func goldenCiphertexts(f *testing.F) [][]byte {
	b, err := os.ReadFile(goldenFile)
	if err != nil {
		f.Fatal(err)
	}
	var vectors []goldenVector
	if err := json.Unmarshal(b, &vectors); err != nil {
		f.Fatal(err)
	}
	var out [][]byte
	for _, v := range vectors {
		c, _ := hex.DecodeString(v.Ciphertext)
		out = append(out, c)
	}
	return out
}

func FuzzParseCiphertext(f *testing.F) {
	for _, c := range goldenCiphertexts(f) {
		f.Add(c)
	}
	f.Add([]byte{'k', 1, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseCiphertext(b)
		if err != nil {
			return
		}
		if !bytes.Equal(c.Bytes(), b) {
			t.Errorf("ParseCiphertext(b).Bytes() != b")
		}
		if checkKeyID(c.KeyID()) != nil {
			t.Errorf("ParseCiphertext accepted key ID %q", c.KeyID())
		}
	})
}

func FuzzParseKeyring(f *testing.F) {
	for _, file := range []string{goldenKeyringV1, goldenKeyring, goldenKeyringV3} {
		b, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"format":"kleidi-keyring","version":1,"keys":[]}`))
	f.Add([]byte(`{"format":"kleidi-keyring","version":2}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		records, err := parseKeyring(b)
		if err != nil {
			return
		}
		// Whatever parses is valid and survives a round trip.
		enc, err := encodeKeyring(records)
		if err != nil {
			t.Fatalf("encodeKeyring(parseKeyring(b)) err = %v", err)
		}
		again, err := parseKeyring(enc)
		if err != nil || len(again.Keys) != len(records.Keys) || len(again.Members) != len(records.Members) {
			t.Fatalf("parseKeyring(encodeKeyring(records)) = %d keys, %d members, %v; want %d, %d, nil",
				len(again.Keys), len(again.Members), err, len(records.Keys), len(records.Members))
		}
	})
}

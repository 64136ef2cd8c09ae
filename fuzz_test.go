package kleidi

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"os"
	"testing"
	"time"
)

// goldenKeyring pins keyring file format version 1.
const goldenKeyring = "testdata/keyring-v1.json"

func TestGoldenKeyring(t *testing.T) {
	b, err := os.ReadFile(goldenKeyring)
	if err != nil {
		t.Fatal(err)
	}
	records, err := parseKeyring(b)
	if err != nil {
		t.Fatalf("parseKeyring(%s) err = %v, want nil", goldenKeyring, err)
	}
	want := []KeyRecord{
		{ID: "kleidi-tpm-msxvg7mdtppselux3dk6numrshf5v5ny", Created: time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC), State: KeyRetired,
			Wrapped: []WrappedKey{{Root: "tpm", Blob: []byte("wrapped by a tpm")}}},
		{ID: keyIDFor("gpg", bytes.Repeat([]byte{2}, KeySize)), Created: time.Date(2026, 11, 20, 8, 30, 0, 0, time.UTC), State: KeyActive,
			Wrapped: []WrappedKey{{Root: "gpg", Blob: []byte("wrapped by gpg")}, {Root: "tpm", Blob: []byte("and by a tpm")}}},
	}
	got, _ := json.Marshal(records)
	wantJSON, _ := json.Marshal(want)
	if !bytes.Equal(got, wantJSON) {
		t.Errorf("parseKeyring(%s) = %s, want %s", goldenKeyring, got, wantJSON)
	}
	if enc, err := encodeKeyring(records); err != nil || !bytes.Equal(enc, b) {
		t.Errorf("encodeKeyring(parseKeyring(golden)) differs from the golden file (err %v):\n%s", err, enc)
	}
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
	b, err := os.ReadFile(goldenKeyring)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
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
		if err != nil || len(again) != len(records) {
			t.Fatalf("parseKeyring(encodeKeyring(records)) = %d records, %v; want %d, nil", len(again), err, len(records))
		}
	})
}

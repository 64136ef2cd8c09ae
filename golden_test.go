package kleidi

import (
	"encoding/hex"
	"encoding/json"
	"flag"
	"os"
	"testing"
)

// goldenFile pins ciphertext format version 1 and the key ID derivation: bytes produced once must decrypt
// forever. The file is written once by `go test -run TestGolden -golden.create` when it does not exist, and never
// rewritten.
const goldenFile = "testdata/ciphertext-v1.json"

var createGolden = flag.Bool("golden.create", false, "write "+goldenFile+" if it does not exist")

type goldenVector struct {
	Comment        string `json:"comment"`
	Provider       string `json:"provider"`
	KEK            string `json:"kek_hex"`
	KeyID          string `json:"key_id"`
	Plaintext      string `json:"plaintext_hex"`
	AssociatedData string `json:"associated_data_hex"`
	Ciphertext     string `json:"ciphertext_hex"`
}

func TestGolden(t *testing.T) {
	if *createGolden {
		writeGolden(t)
	}
	b, err := os.ReadFile(goldenFile)
	if err != nil {
		t.Fatalf("read golden vectors: %v", err)
	}
	var vectors []goldenVector
	if err := json.Unmarshal(b, &vectors); err != nil {
		t.Fatal(err)
	}
	if len(vectors) < 4 {
		t.Fatalf("%s holds %d vectors, want at least 4", goldenFile, len(vectors))
	}
	for _, v := range vectors {
		t.Run(v.Comment, func(t *testing.T) {
			key, pt, ad, ct := unhex(t, v.KEK), unhex(t, v.Plaintext), unhex(t, v.AssociatedData), unhex(t, v.Ciphertext)
			if got := keyIDFor(v.Provider, key); got != v.KeyID {
				t.Errorf("keyIDFor(%q, kek) = %q, want %q", v.Provider, got, v.KeyID)
			}
			c, err := ParseCiphertext(ct)
			if err != nil {
				t.Fatalf("ParseCiphertext() err = %v, want nil", err)
			}
			if c.KeyID() != v.KeyID {
				t.Errorf("c.KeyID() = %q, want %q", c.KeyID(), v.KeyID)
			}
			k, err := newKEK(v.KeyID, key)
			if err != nil {
				t.Fatal(err)
			}
			got, err := k.open(c.Bytes(), ad)
			if err != nil {
				t.Fatalf("open(golden ciphertext) err = %v, want nil", err)
			}
			if hex.EncodeToString(got) != hex.EncodeToString(pt) {
				t.Errorf("open(golden ciphertext) = %x, want %x", got, pt)
			}
		})
	}
}

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeGolden(t *testing.T) {
	if _, err := os.Stat(goldenFile); err == nil {
		t.Fatalf("%s exists: golden vectors are never rewritten", goldenFile)
	}
	var vectors []goldenVector
	for _, v := range []struct {
		comment, provider string
		kek               byte
		plaintext, ad     []byte
	}{
		{"seed, no associated data", "tpm", 0x01, make([]byte, 32), nil},
		{"text with associated data", "gpg", 0x02, []byte("kleidi golden vector"), []byte("default/secret")},
		{"empty plaintext", "insecure", 0x03, nil, nil},
		{"empty plaintext, associated data", "tpm", 0x04, nil, []byte{0, 1, 2}},
		{"4 KiB", "gpg", 0x05, make([]byte, 4096), []byte("ad")},
	} {
		key := make([]byte, KeySize)
		for i := range key {
			key[i] = v.kek + byte(i)
		}
		id := keyIDFor(v.provider, key)
		k, err := newKEK(id, key)
		if err != nil {
			t.Fatal(err)
		}
		vectors = append(vectors, goldenVector{
			Comment: v.comment, Provider: v.provider, KeyID: id,
			KEK: hex.EncodeToString(key), Plaintext: hex.EncodeToString(v.plaintext), AssociatedData: hex.EncodeToString(v.ad),
			Ciphertext: hex.EncodeToString(k.seal(v.plaintext, v.ad)),
		})
	}
	b, err := json.MarshalIndent(vectors, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(goldenFile, append(b, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestParseCiphertextRefuses(t *testing.T) {
	id := keyIDFor("tpm", make([]byte, KeySize))
	good := append([]byte{'k', 1, byte(len(id))}, id...)
	good = append(good, make([]byte, nonceSize+tagSize)...)
	if _, err := ParseCiphertext(good); err != nil {
		t.Fatalf("ParseCiphertext(minimal) err = %v, want nil", err)
	}
	with := func(i int, b byte) []byte { c := append([]byte(nil), good...); c[i] = b; return c }
	for name, b := range map[string][]byte{
		"nil":             nil,
		"two bytes":       {'k', 1},
		"bad magic":       with(0, 'x'),
		"version 0":       with(1, 0),
		"version 2":       with(1, 2),
		"key ID length 0": with(2, 0),
		"key ID too long": with(2, 200),
		"key ID overruns": with(2, byte(len(id)+20)),
		"bad key ID":      with(3, 'K'),
		"no tag":          good[:len(good)-1],
		"too large":       make([]byte, MaxCiphertextSize+1),
	} {
		if _, err := ParseCiphertext(b); err == nil {
			t.Errorf("ParseCiphertext(%s) err = nil, want ErrInvalidCiphertext", name)
		}
	}
}

func TestKeyID(t *testing.T) {
	key := make([]byte, KeySize)
	id := keyIDFor("tpm", key)
	if err := checkKeyID(id); err != nil {
		t.Errorf("checkKeyID(%q) = %v, want nil", id, err)
	}
	if !matchesKeyID(id, key) {
		t.Errorf("matchesKeyID(id, key) = false, want true")
	}
	other := append([]byte(nil), key...)
	other[0] = 1
	if matchesKeyID(id, other) {
		t.Errorf("matchesKeyID(id, other key) = true, want false")
	}
	if keyIDFor("gpg", key) == id {
		t.Errorf("keyIDFor ignores the provider name")
	}
	for _, bad := range []string{"", "kleidi-", "kleidi-tpm", "kleidi-tpm-short", "other-tpm-" + id[len("kleidi-tpm-"):], "kleidi-TPM-" + id[len("kleidi-tpm-"):]} {
		if checkKeyID(bad) == nil {
			t.Errorf("checkKeyID(%q) = nil, want an error", bad)
		}
	}
}

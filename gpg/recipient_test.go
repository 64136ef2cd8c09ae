package gpg_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp/packet"
	v2 "github.com/ProtonMail/go-crypto/openpgp/v2"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/gpg"
)

func readTestFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// recoveryIdentity returns the identity of the public key in the file at path.
func recoveryIdentity(t testing.TB, path string) *kleidi.Identity {
	t.Helper()
	id, err := gpg.RecipientIdentity(readTestFile(t, path))
	if err != nil {
		t.Fatalf("gpg.RecipientIdentity(%s) err = %v, want nil", filepath.Base(path), err)
	}
	return id
}

func openRecipient(t testing.TB, id *kleidi.Identity) kleidi.Recipient {
	t.Helper()
	r, err := gpg.OpenRecipient(id)
	if err != nil {
		t.Fatalf("gpg.OpenRecipient(%s) err = %v, want nil", id.ID(), err)
	}
	return r
}

// publicKey serializes the public part of e, armored or binary.
func publicKey(t testing.TB, e *v2.Entity, armored bool) []byte {
	t.Helper()
	var buf bytes.Buffer
	serialize(t, &buf, v2.PublicKeyType, armored, e.Serialize)
	return buf.Bytes()
}

// TestRecipientRoundTrip wraps a key with the recipient of a public key's identity, and unwraps it with a
// Provider that holds the private key, protected by a passphrase or not, for version 4 and version 6 keys.
func TestRecipientRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    keyOptions
	}{
		{"V4", keyOptions{}},
		{"V4Armored", keyOptions{armored: true}},
		{"V6", keyOptions{v6: true}},
		{"V4Protected", keyOptions{passphrase: gnupgPassphrase, armored: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := newTestKey(t, tc.o)
			id := recoveryIdentity(t, k.pub)
			if id.Provider != "gpg" || len(id.Certificate) != 0 || len(id.VerifyKey) != 0 {
				t.Fatalf("gpg.RecipientIdentity() = provider %q, %d certificate bytes, %d verify key bytes; want \"gpg\", 0, 0",
					id.Provider, len(id.Certificate), len(id.VerifyKey))
			}
			if !strings.HasPrefix(id.ID(), "gpg-") {
				t.Errorf("id.ID() = %q, want the prefix gpg-", id.ID())
			}
			r := openRecipient(t, id)
			key := randomKey(t)
			wrapped, err := r.Wrap(ctx, key)
			if err != nil {
				t.Fatalf("r.Wrap(ctx, key) err = %v, want nil", err)
			}
			c := gpg.Config{PrivateKeyFile: k.priv}
			if tc.o.passphrase != "" {
				c.PassphraseFile = filepath.Join(t.TempDir(), "passphrase")
				writeFile(t, c.PassphraseFile, []byte(tc.o.passphrase))
			}
			got, err := newProvider(t, c).Unwrap(ctx, wrapped)
			if err != nil || !bytes.Equal(got, key) {
				t.Fatalf("p.Unwrap(ctx, r.Wrap(ctx, key)) err = %v, equal = %v; want nil, true", err, bytes.Equal(got, key))
			}
		})
	}
}

// TestRecipientWrapsToThatKeyOnly checks that what a recipient wraps names the recovery key alone: another
// private key cannot unwrap it, not even one whose provider lists the recovery key among its recipients.
func TestRecipientWrapsToThatKeyOnly(t *testing.T) {
	recovery, node := newTestKey(t, keyOptions{}), newTestKey(t, keyOptions{})
	r := openRecipient(t, recoveryIdentity(t, recovery.pub))
	wrapped, err := r.Wrap(ctx, randomKey(t))
	if err != nil {
		t.Fatalf("r.Wrap(ctx, key) err = %v, want nil", err)
	}
	for name, c := range map[string]gpg.Config{
		"OtherKey":                 {PrivateKeyFile: node.priv},
		"NodeListingRecoveryKey":   {PublicKeyFiles: []string{node.pub, recovery.pub}, PrivateKeyFile: node.priv},
		"OtherKeyOfSameParameters": {PrivateKeyFile: newTestKey(t, keyOptions{}).priv},
	} {
		got, err := newProvider(t, c).Unwrap(ctx, wrapped)
		if !errors.Is(err, kleidi.ErrUnwrap) || got != nil {
			t.Errorf("%s: p.Unwrap(ctx, wrapped for the recovery key) = %d bytes, %v; want nil and an error wrapping kleidi.ErrUnwrap", name, len(got), err)
		}
	}
	// The session keys name the recovery key and no other.
	if err := newProvider(t, gpg.Config{PublicKeyFiles: []string{recovery.pub}}).CheckRecipients(wrapped); err != nil {
		t.Errorf("CheckRecipients(wrapped) with the recovery key alone: err = %v, want nil", err)
	}
	if err := newProvider(t, gpg.Config{PublicKeyFiles: []string{node.pub}}).CheckRecipients(wrapped); !errors.Is(err, gpg.ErrRecipientRemoved) {
		t.Errorf("CheckRecipients(wrapped) with the node key alone: err = %v, want gpg.ErrRecipientRemoved", err)
	}
}

// TestRecipientIdentityStable checks that one key gives one identity, however it is exported: binary or
// armored, with a certification by someone else, with a signing subkey, with several user IDs; and that
// another key gives another ID.
func TestRecipientIdentityStable(t *testing.T) {
	k := newTestKey(t, keyOptions{})
	want := recoveryIdentity(t, k.pub)
	config := &packet.Config{Algorithm: packet.PubKeyAlgoEdDSA, Curve: packet.Curve25519,
		Time: func() time.Time { return k.entity.PrimaryKey.CreationTime }}
	same := func(name string, pub []byte) {
		t.Helper()
		got, err := gpg.RecipientIdentity(pub)
		if err != nil {
			t.Fatalf("%s: gpg.RecipientIdentity() err = %v, want nil", name, err)
		}
		if got.ID() != want.ID() || !bytes.Equal(got.PublicKey, want.PublicKey) {
			t.Fatalf("%s: gpg.RecipientIdentity() ID = %s, want %s, the ID of the same key exported plainly", name, got.ID(), want.ID())
		}
	}
	same("Armored", publicKey(t, k.entity, true))
	same("Again", readTestFile(t, k.pub))

	other := newTestKey(t, keyOptions{})
	for _, ident := range k.entity.Identities {
		if err := ident.SignIdentity(other.entity, config); err != nil {
			t.Fatal(err)
		}
	}
	same("ThirdPartyCertification", publicKey(t, k.entity, false))
	if err := k.entity.AddSigningSubkey(config); err != nil {
		t.Fatal(err)
	}
	same("SigningSubkey", publicKey(t, k.entity, false))
	// User IDs made in the same second: the choice must not follow the order of a map.
	for _, name := range []string{"b", "a", "c"} {
		if err := k.entity.AddUserId("kleidi "+name, "", name+"@kleidi.test", config); err != nil {
			t.Fatal(err)
		}
	}
	first := recoveryIdentity(t, writeTemp(t, publicKey(t, k.entity, false)))
	for range 20 {
		if id := recoveryIdentity(t, writeTemp(t, publicKey(t, k.entity, false))); id.ID() != first.ID() {
			t.Fatalf("gpg.RecipientIdentity() of a key with several user IDs gave %s, then %s", first.ID(), id.ID())
		}
	}

	if id := recoveryIdentity(t, other.pub); id.ID() == want.ID() || bytes.Equal(id.PublicKey, want.PublicKey) {
		t.Errorf("gpg.RecipientIdentity() of another key gave the ID %s of the first key", id.ID())
	}
}

func writeTemp(t testing.TB, b []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "key")
	writeFile(t, path, b)
	return path
}

// TestRecipientIdentityRefusesPrivateKey checks that a private key, binary or armored, protected or not, or
// with its primary key a stub, is refused and the error says the private half stays offline.
func TestRecipientIdentityRefusesPrivateKey(t *testing.T) {
	files := map[string]string{
		"Binary":    newTestKey(t, keyOptions{}).priv,
		"Armored":   newTestKey(t, keyOptions{armored: true}).priv,
		"Protected": newTestKey(t, keyOptions{passphrase: gnupgPassphrase}).priv,
		"V6":        newTestKey(t, keyOptions{v6: true}).priv,
	}
	for name, path := range files {
		id, err := gpg.RecipientIdentity(readTestFile(t, path))
		if !errors.Is(err, gpg.ErrNotPublicKey) || id != nil {
			t.Errorf("%s: gpg.RecipientIdentity(private key) err = %v, want gpg.ErrNotPublicKey", name, err)
			continue
		}
		if !strings.Contains(err.Error(), "offline") || strings.Contains(err.Error(), gnupgPassphrase) {
			t.Errorf("%s: gpg.RecipientIdentity(private key) err = %q, want it to say the private half stays offline", name, err)
		}
	}
}

// TestRecipientIdentityRefuses checks the keys a recovery key must not be, and what is no key.
func TestRecipientIdentityRefuses(t *testing.T) {
	two := append(readTestFile(t, newTestKey(t, keyOptions{}).pub), readTestFile(t, newTestKey(t, keyOptions{}).pub)...)
	for _, tc := range []struct {
		name string
		pub  []byte
		want error
	}{
		{"NoEncryptionSubkey", readTestFile(t, newTestKey(t, keyOptions{noEncryption: true}).pub), gpg.ErrNoEncryptionKey},
		{"Expired", readTestFile(t, newTestKey(t, keyOptions{created: time.Now().Add(-2 * time.Hour), lifetime: time.Hour}).pub), gpg.ErrKeyExpired},
		{"Revoked", readTestFile(t, newTestKey(t, keyOptions{revoked: true}).pub), gpg.ErrKeyRevoked},
		{"TwoKeys", two, gpg.ErrInvalidKey},
		{"Empty", nil, gpg.ErrInvalidKey},
		{"Garbage", []byte("not a key"), gpg.ErrInvalidKey},
		{"TooLarge", bytes.Repeat([]byte{0x99}, 9<<20), gpg.ErrInvalidKey},
	} {
		id, err := gpg.RecipientIdentity(tc.pub)
		if !errors.Is(err, tc.want) || id != nil {
			t.Errorf("%s: gpg.RecipientIdentity() err = %v, want %v", tc.name, err, tc.want)
		}
	}
}

// TestOpenRecipientRefuses checks that an identity is trusted in nothing: another provider, a certificate, a
// public key with extra packets or bytes, two keys, a private key, or no key is refused.
func TestOpenRecipientRefuses(t *testing.T) {
	k := newTestKey(t, keyOptions{})
	good := recoveryIdentity(t, k.pub)
	with := func(f func(id *kleidi.Identity)) *kleidi.Identity {
		id := *good
		id.PublicKey = bytes.Clone(good.PublicKey)
		f(&id)
		return &id
	}
	other := recoveryIdentity(t, newTestKey(t, keyOptions{}).pub)
	for _, tc := range []struct {
		name string
		id   *kleidi.Identity
		want error
	}{
		{"Nil", nil, gpg.ErrInvalidKey},
		{"OtherProvider", with(func(id *kleidi.Identity) { id.Provider = "tpm" }), gpg.ErrInvalidKey},
		{"Certificate", with(func(id *kleidi.Identity) { id.Certificate = []byte{1} }), gpg.ErrInvalidKey},
		{"NoPublicKey", with(func(id *kleidi.Identity) { id.PublicKey = nil }), gpg.ErrInvalidKey},
		{"TrailingByte", with(func(id *kleidi.Identity) { id.PublicKey = append(id.PublicKey, 0) }), gpg.ErrInvalidKey},
		{"Truncated", with(func(id *kleidi.Identity) { id.PublicKey = id.PublicKey[:len(id.PublicKey)-1] }), gpg.ErrInvalidKey},
		{"TwoKeys", with(func(id *kleidi.Identity) { id.PublicKey = append(id.PublicKey, other.PublicKey...) }), gpg.ErrInvalidKey},
		{"Certified", with(func(id *kleidi.Identity) {
			// The same key with a certification by another key: readable, but not the canonical form.
			e := newTestKey(t, keyOptions{}).entity
			for _, ident := range e.Identities {
				if err := ident.SignIdentity(newTestKey(t, keyOptions{}).entity, nil); err != nil {
					t.Fatal(err)
				}
			}
			id.PublicKey = publicKey(t, e, false)
		}), gpg.ErrInvalidKey},
		{"Armored", with(func(id *kleidi.Identity) { id.PublicKey = publicKey(t, k.entity, true) }), gpg.ErrInvalidKey},
		{"PrivateKey", with(func(id *kleidi.Identity) { id.PublicKey = readTestFile(t, k.priv) }), gpg.ErrNotPublicKey},
		{"NoEncryptionKey", with(func(id *kleidi.Identity) {
			e := newTestKey(t, keyOptions{noEncryption: true}).entity
			id.PublicKey = publicKey(t, e, false)
		}), gpg.ErrNoEncryptionKey},
	} {
		r, err := gpg.OpenRecipient(tc.id)
		if !errors.Is(err, tc.want) || r != nil {
			t.Errorf("%s: gpg.OpenRecipient() err = %v, want %v", tc.name, err, tc.want)
		}
	}
}

// TestOpenRecipientIdentityCopy checks that a recipient keeps its own copy of its identity: changing the
// identity given or the one returned changes nothing.
func TestOpenRecipientIdentityCopy(t *testing.T) {
	id := recoveryIdentity(t, newTestKey(t, keyOptions{}).pub)
	r := openRecipient(t, id)
	got := r.Identity()
	if got.ID() != id.ID() {
		t.Fatalf("r.Identity().ID() = %s, want %s", got.ID(), id.ID())
	}
	got.PublicKey[0] ^= 1
	id.PublicKey[0] ^= 1
	if r.Identity().ID() == got.ID() {
		t.Fatalf("changing r.Identity() or the identity given changed the recipient's identity")
	}
}

// TestRecipientIdentityFile checks that an identity survives its file: ParseIdentity(MarshalIdentity(id))
// gives the same identity and ID, and its recipient wraps for the private key.
func TestRecipientIdentityFile(t *testing.T) {
	k := newTestKey(t, keyOptions{v6: true})
	id := recoveryIdentity(t, k.pub)
	file, err := kleidi.MarshalIdentity(id)
	if err != nil {
		t.Fatalf("kleidi.MarshalIdentity(id) err = %v, want nil", err)
	}
	parsed, err := kleidi.ParseIdentity(file)
	if err != nil {
		t.Fatalf("kleidi.ParseIdentity(kleidi.MarshalIdentity(id)) err = %v, want nil", err)
	}
	if parsed.ID() != id.ID() || parsed.Provider != id.Provider || !bytes.Equal(parsed.PublicKey, id.PublicKey) ||
		len(parsed.Certificate) != 0 || len(parsed.VerifyKey) != 0 {
		t.Fatalf("kleidi.ParseIdentity(kleidi.MarshalIdentity(id)) = %s, want %s with the same fields", parsed.ID(), id.ID())
	}
	wrapped, err := openRecipient(t, parsed).Wrap(ctx, randomKey(t))
	if err != nil {
		t.Fatalf("r.Wrap(ctx, key) err = %v, want nil", err)
	}
	if _, err := newProvider(t, gpg.Config{PrivateKeyFile: k.priv}).Unwrap(ctx, wrapped); err != nil {
		t.Fatalf("p.Unwrap(ctx, wrapped) err = %v, want nil", err)
	}
}

// TestRecipientExpiresLater checks that a key that expires after its identity was made still opens, but
// Wrap refuses it.
func TestRecipientExpiresLater(t *testing.T) {
	k := newTestKey(t, keyOptions{created: time.Now().Add(-time.Hour + 5*time.Second), lifetime: time.Hour})
	id := recoveryIdentity(t, k.pub)
	time.Sleep(6 * time.Second)
	r := openRecipient(t, id)
	if wrapped, err := r.Wrap(ctx, randomKey(t)); !errors.Is(err, gpg.ErrKeyExpired) || wrapped != nil {
		t.Fatalf("r.Wrap(ctx, key) for an expired key err = %v, want gpg.ErrKeyExpired", err)
	}
}

// TestRecipientWrapRefusesBadKeys checks Wrap's bounds on the key it wraps and a cancelled context.
func TestRecipientWrapRefusesBadKeys(t *testing.T) {
	r := openRecipient(t, recoveryIdentity(t, newTestKey(t, keyOptions{}).pub))
	if _, err := r.Wrap(ctx, nil); err == nil {
		t.Errorf("r.Wrap(ctx, nil) err = nil, want an error")
	}
	if _, err := r.Wrap(ctx, make([]byte, gpg.MaxKeySize+1)); !errors.Is(err, kleidi.ErrTooLarge) {
		t.Errorf("r.Wrap(ctx, %d bytes) err = %v, want kleidi.ErrTooLarge", gpg.MaxKeySize+1, err)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := r.Wrap(cancelled, randomKey(t)); err == nil {
		t.Errorf("r.Wrap(cancelled context, key) err = nil, want an error")
	}
}

// TestRecipientConcurrentWrap wraps from several goroutines at once; run with -race.
func TestRecipientConcurrentWrap(t *testing.T) {
	k := newTestKey(t, keyOptions{})
	r := openRecipient(t, recoveryIdentity(t, k.pub))
	p := newProvider(t, gpg.Config{PrivateKeyFile: k.priv})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			key := randomKey(t)
			wrapped, err := r.Wrap(ctx, key)
			if err != nil {
				t.Errorf("r.Wrap(ctx, key) err = %v, want nil", err)
				return
			}
			if got, err := p.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
				t.Errorf("p.Unwrap(ctx, wrapped) err = %v, want nil and the key", err)
			}
		}()
	}
	wg.Wait()
}

// TestRecipientGnuPG checks that keys made by GnuPG serve as recovery keys: the identity of the binary and the
// armored export is the same; what the recipient wraps, gpg --decrypt decrypts, and so does a Provider with
// the protected private key and its passphrase; GnuPG's private exports are refused.
func TestRecipientGnuPG(t *testing.T) {
	g := gnupg(t)
	for name, k := range map[string]gnupgKey{"RSA3072": g.rsa, "Curve25519": g.cv} {
		t.Run(name, func(t *testing.T) {
			id := recoveryIdentity(t, k.pubArmored)
			if bin := recoveryIdentity(t, k.pubBinary); bin.ID() != id.ID() {
				t.Fatalf("gpg.RecipientIdentity() of the binary export = %s, of the armored export %s; want one ID", bin.ID(), id.ID())
			}
			key := randomKey(t)
			wrapped, err := openRecipient(t, id).Wrap(ctx, key)
			if err != nil {
				t.Fatalf("r.Wrap(ctx, key) err = %v, want nil", err)
			}
			file := writeTemp(t, wrapped)
			got, err := g.run(nil, "--passphrase-file", g.passphrase, "--decrypt", file)
			if err != nil || !bytes.Equal(got, key) {
				t.Fatalf("gpg --decrypt of r.Wrap(ctx, key): err = %v, equal = %v; want nil, true", err, bytes.Equal(got, key))
			}
			if k.privProtectd != "" {
				p := newProvider(t, gpg.Config{PrivateKeyFile: k.privProtectd, PassphraseFile: g.passphrase})
				if got, err := p.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
					t.Fatalf("p.Unwrap(ctx, r.Wrap(ctx, key)) err = %v, equal = %v; want nil, true", err, bytes.Equal(got, key))
				}
			}
			for _, priv := range []string{k.privBinary, k.privArmored} {
				if _, err := gpg.RecipientIdentity(readTestFile(t, priv)); !errors.Is(err, gpg.ErrNotPublicKey) {
					t.Errorf("gpg.RecipientIdentity(gpg --export-secret-keys) err = %v, want gpg.ErrNotPublicKey", err)
				}
			}
		})
	}
	if _, err := gpg.RecipientIdentity(readTestFile(t, g.cvStub)); !errors.Is(err, gpg.ErrNotPublicKey) {
		t.Errorf("gpg.RecipientIdentity(gpg --export-secret-subkeys) err = %v, want gpg.ErrNotPublicKey", err)
	}
	// A certify-only primary key with an encryption subkey: the subkey is what the identity keeps.
	if _, err := gpg.RecipientIdentity(readTestFile(t, g.noSign.pubArmored)); err != nil {
		t.Errorf("gpg.RecipientIdentity(certify-only primary with an encryption subkey) err = %v, want nil", err)
	}
}

// FuzzOpenRecipient feeds arbitrary public keys to OpenRecipient: it never panics, refuses with an error
// wrapping one of this package's key errors, and what it accepts is in canonical form and wraps.
func FuzzOpenRecipient(f *testing.F) {
	for _, o := range []keyOptions{{}, {v6: true}, {signing: true}} {
		k := newTestKey(f, o)
		id := recoveryIdentity(f, k.pub)
		f.Add(id.PublicKey)
		f.Add(id.PublicKey[:len(id.PublicKey)-1])
		f.Add(readTestFile(f, k.pub))
		f.Add(readTestFile(f, k.priv))
	}
	f.Add([]byte{})
	f.Add([]byte{0xc6, 0x01, 0x04})
	f.Fuzz(func(t *testing.T, pub []byte) {
		r, err := gpg.OpenRecipient(&kleidi.Identity{Provider: "gpg", PublicKey: pub})
		if err != nil {
			if r != nil || strings.Contains(err.Error(), "panicked") || !(errors.Is(err, gpg.ErrInvalidKey) ||
				errors.Is(err, gpg.ErrNotPublicKey) || errors.Is(err, gpg.ErrKeyRevoked) || errors.Is(err, gpg.ErrNoEncryptionKey)) {
				t.Fatalf("gpg.OpenRecipient() = %v, %v; want nil and a key error of package gpg, no panic", r, err)
			}
			return
		}
		if _, err := r.Wrap(ctx, bytes.Repeat([]byte{0x5a}, kleidi.KeySize)); err != nil && !errors.Is(err, gpg.ErrKeyExpired) {
			t.Fatalf("r.Wrap(ctx, key) of an opened recipient err = %v, want nil or gpg.ErrKeyExpired", err)
		}
	})
}

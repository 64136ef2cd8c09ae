package gpg_test

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"

	v2 "github.com/ProtonMail/go-crypto/openpgp/v2"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/gpg"
)

// encryptionKeyNames returns the names a wrapped key may give the encryption subkey of e: its long key ID and
// its fingerprint.
func encryptionKeyNames(e *v2.Entity) []string {
	var names []string
	for _, s := range e.Subkeys {
		names = append(names, fmt.Sprintf("0x%016X", s.PublicKey.KeyId), fmt.Sprintf("0x%X", s.PublicKey.Fingerprint))
	}
	return names
}

func containsAny(s string, subs []string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}

// TestCheckRecipients is the removal that a rewrap does not achieve: a KEK wrapped to keys a and b, re-checked
// by a configuration that names only a, is refused, since b still unwraps it; a configuration that names both,
// or more, accepts it.
func TestCheckRecipients(t *testing.T) {
	for _, c := range []struct {
		name string
		a, b keyOptions
	}{
		{"v4", keyOptions{}, keyOptions{}},
		{"v4 and v6", keyOptions{}, keyOptions{v6: true}},
		{"v6", keyOptions{v6: true}, keyOptions{v6: true}}, // session keys name fingerprints
	} {
		t.Run(c.name, func(t *testing.T) {
			ka, kb, kc := newTestKey(t, c.a), newTestKey(t, c.b), newTestKey(t, keyOptions{})
			ab := newProvider(t, gpg.Config{PublicKeyFiles: []string{ka.pub, kb.pub}, PrivateKeyFile: ka.priv})
			kek := randomKey(t)
			blob, err := ab.Wrap(ctx, kek)
			if err != nil {
				t.Fatalf("ab.Wrap(ctx, kek) err = %v, want nil", err)
			}
			if err := ab.CheckRecipients(blob); err != nil {
				t.Errorf("ab.CheckRecipients(its own blob) err = %v, want nil", err)
			}
			abc := newProvider(t, gpg.Config{PublicKeyFiles: []string{ka.pub, kb.pub, kc.pub}, PrivateKeyFile: ka.priv})
			if err := abc.CheckRecipients(blob); err != nil {
				t.Errorf("CheckRecipients(blob) with a recipient added err = %v, want nil", err)
			}

			// b is removed from the configuration, but b's private key still unwraps the blob.
			onlyA := newProvider(t, gpg.Config{PublicKeyFiles: []string{ka.pub}, PrivateKeyFile: ka.priv})
			err = onlyA.CheckRecipients(blob)
			if !errors.Is(err, gpg.ErrRecipientRemoved) {
				t.Fatalf("CheckRecipients(blob) with b removed err = %v, want an error wrapping gpg.ErrRecipientRemoved", err)
			}
			if msg := err.Error(); !containsAny(msg, encryptionKeyNames(kb.entity)) || containsAny(msg, encryptionKeyNames(ka.entity)) {
				t.Errorf("CheckRecipients(blob) with b removed err = %q, want it to name b's encryption key and not a's", msg)
			}
			if !strings.Contains(err.Error(), "rotation") {
				t.Errorf("CheckRecipients(blob) with b removed err = %q, want it to say a rotation is needed", err)
			}
			b := newProvider(t, gpg.Config{PrivateKeyFile: kb.priv})
			if got, err := b.Unwrap(ctx, blob); err != nil || !bytes.Equal(got, kek) {
				t.Errorf("removed b.Unwrap(ctx, blob) err = %v, equal = %v; want nil, true (what CheckRecipients reports)", err, bytes.Equal(got, kek))
			}
			// A wrap-only provider checks too.
			pubA := newProvider(t, gpg.Config{PublicKeyFiles: []string{ka.pub}})
			if err := pubA.CheckRecipients(blob); !errors.Is(err, gpg.ErrRecipientRemoved) {
				t.Errorf("wrap-only CheckRecipients(blob) with b removed err = %v, want an error wrapping gpg.ErrRecipientRemoved", err)
			}
		})
	}
}

func TestCheckRecipientsGnuPG(t *testing.T) {
	g := gnupg(t)
	p := newProvider(t, gpg.Config{PrivateKeyFile: g.cv.privBinary})
	key := randomKey(t)
	own, err := g.run(key, "--encrypt", "--recipient", g.cv.fpr)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.CheckRecipients(own); err != nil {
		t.Errorf("p.CheckRecipients(gpg --encrypt to its key) err = %v, want nil", err)
	}
	both, err := g.run(key, "--encrypt", "--recipient", g.cv.fpr, "--recipient", g.rsa.fpr)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.CheckRecipients(both); !errors.Is(err, gpg.ErrRecipientRemoved) {
		t.Errorf("p.CheckRecipients(gpg --encrypt to its key and another) err = %v, want an error wrapping gpg.ErrRecipientRemoved", err)
	}
	hidden, err := g.run(key, "--throw-keyids", "--encrypt", "--recipient", g.cv.fpr)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.CheckRecipients(hidden); !errors.Is(err, gpg.ErrRecipientRemoved) || !strings.Contains(err.Error(), "hidden") {
		t.Errorf("p.CheckRecipients(gpg --throw-keyids output) err = %v, want an error wrapping gpg.ErrRecipientRemoved that says hidden", err)
	}
	for name, blob := range map[string][]byte{"empty": nil, "garbage": []byte("not OpenPGP"), "too large": make([]byte, kleidi.MaxWrappedKeySize+1)} {
		if err := p.CheckRecipients(blob); !errors.Is(err, kleidi.ErrUnwrap) {
			t.Errorf("p.CheckRecipients(%s) err = %v, want an error wrapping kleidi.ErrUnwrap", name, err)
		}
	}
	p.Close()
	if err := p.CheckRecipients(own); !errors.Is(err, kleidi.ErrClosed) {
		t.Errorf("p.CheckRecipients() after Close err = %v, want an error wrapping kleidi.ErrClosed", err)
	}
}

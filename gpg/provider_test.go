package gpg_test

import (
	"bytes"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/gpg"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

func TestConformance(t *testing.T) {
	t.Run("Curve25519", func(t *testing.T) {
		k := newTestKey(t, keyOptions{})
		kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider { return newProvider(t, gpg.Config{PrivateKeyFile: k.priv}) })
	})
	t.Run("RFC9580", func(t *testing.T) {
		k := newTestKey(t, keyOptions{v6: true})
		kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider { return newProvider(t, gpg.Config{PrivateKeyFile: k.priv}) })
	})
	t.Run("GnuPGRSA3072", func(t *testing.T) {
		g := gnupg(t)
		kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider {
			return newProvider(t, gpg.Config{PrivateKeyFile: g.rsa.privBinary})
		})
	})
	t.Run("TwoRecipients", func(t *testing.T) {
		k1, k2 := newTestKey(t, keyOptions{}), newTestKey(t, keyOptions{v6: true})
		kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider {
			return newProvider(t, gpg.Config{PublicKeyFiles: []string{k1.pub, k2.pub}, PrivateKeyFile: k2.priv})
		})
	})
}

func TestName(t *testing.T) {
	p := newProvider(t, gpg.Config{PrivateKeyFile: newTestKey(t, keyOptions{}).priv})
	if got := p.Name(); got != "gpg" {
		t.Errorf("p.Name() = %q, want %q", got, "gpg")
	}
}

// TestKeyFormats loads every form of key gpg exports and GenerateDevelopmentKey writes.
func TestKeyFormats(t *testing.T) {
	g := gnupg(t)
	for _, k := range []struct {
		name string
		gnupgKey
	}{{"RSA3072", g.rsa}, {"Curve25519", g.cv}} {
		for _, pub := range []string{k.pubBinary, k.pubArmored} {
			for _, priv := range []string{k.privBinary, k.privArmored} {
				c := gpg.Config{PublicKeyFiles: []string{pub}, PrivateKeyFile: priv}
				p := newProvider(t, c)
				if got := p.Recipients(); len(got) != 1 || got[0] != k.fpr {
					t.Errorf("%s: gpg.New(%+v).Recipients() = %v, want [%s]", k.name, c, got, k.fpr)
				}
				roundTrip(t, p, p)
			}
		}
	}
}

func roundTrip(t *testing.T, wrapper, unwrapper kleidi.Provider) {
	t.Helper()
	key := randomKey(t)
	wrapped, err := wrapper.Wrap(ctx, key)
	if err != nil {
		t.Fatalf("wrapper.Wrap(ctx, key) err = %v, want nil", err)
	}
	got, err := unwrapper.Unwrap(ctx, wrapped)
	if err != nil {
		t.Fatalf("unwrapper.Unwrap(ctx, wrapped) err = %v, want nil", err)
	}
	if !bytes.Equal(got, key) {
		t.Fatalf("unwrapper.Unwrap(ctx, wrapper.Wrap(ctx, key)) differs from key")
	}
}

// TestMultiRecipient wraps to three keys, one per control-plane node, and unwraps on each node with only its
// own private key.
func TestMultiRecipient(t *testing.T) {
	g := gnupg(t)
	keys := []testKey{newTestKey(t, keyOptions{}), newTestKey(t, keyOptions{v6: true})}
	pubs := []string{keys[0].pub, keys[1].pub, g.rsa.pubArmored}
	privs := []string{keys[0].priv, keys[1].priv, g.rsa.privBinary}

	wrapOnly := newProvider(t, gpg.Config{PublicKeyFiles: pubs})
	if got := len(wrapOnly.Recipients()); got != 3 {
		t.Fatalf("len(p.Recipients()) = %d, want 3", got)
	}
	key := randomKey(t)
	wrapped, err := wrapOnly.Wrap(ctx, key)
	if err != nil {
		t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
	}
	for _, priv := range privs {
		// Each node holds its own private key and lists every public key.
		node := newProvider(t, gpg.Config{PublicKeyFiles: pubs, PrivateKeyFile: priv})
		got, err := node.Unwrap(ctx, wrapped)
		if err != nil || !bytes.Equal(got, key) {
			t.Errorf("node %s: p.Unwrap(ctx, wrapped) err = %v, equal = %v; want nil, true", priv, err, bytes.Equal(got, key))
		}
		// And a node that knows only its own key unwraps too.
		alone := newProvider(t, gpg.Config{PrivateKeyFile: priv})
		if got, err := alone.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
			t.Errorf("node %s alone: p.Unwrap(ctx, wrapped) err = %v, equal = %v; want nil, true", priv, err, bytes.Equal(got, key))
		}
	}

	// A key that is not a recipient is refused, and the error names the recipients.
	other := newProvider(t, gpg.Config{PrivateKeyFile: newTestKey(t, keyOptions{}).priv})
	_, err = other.Unwrap(ctx, wrapped)
	if !errors.Is(err, kleidi.ErrUnwrap) {
		t.Fatalf("other.Unwrap(ctx, wrapped) err = %v, want an error wrapping kleidi.ErrUnwrap", err)
	}
	if !strings.Contains(err.Error(), "no private key here decrypts it") {
		t.Errorf("other.Unwrap(ctx, wrapped) err = %q, want it to say no private key here decrypts it", err)
	}
}

// TestUnwrapErrorNamesPrimaryKeys checks that a refused unwrap names the keys a blob is encrypted to as
// Recipients names them, by the fingerprint of the primary key, and a key the provider does not know by the key
// ID the message gives: never only the encryption subkey of a configured recipient.
func TestUnwrapErrorNamesPrimaryKeys(t *testing.T) {
	g := gnupg(t)
	a, b := newTestKey(t, keyOptions{}), newTestKey(t, keyOptions{v6: true})
	wrapped, err := newProvider(t, gpg.Config{PublicKeyFiles: []string{b.pub, g.rsa.pubArmored}}).Wrap(ctx, randomKey(t))
	if err != nil {
		t.Fatal(err)
	}
	node := newProvider(t, gpg.Config{PublicKeyFiles: []string{a.pub, b.pub, g.rsa.pubArmored}, PrivateKeyFile: a.priv})
	_, err = node.Unwrap(ctx, wrapped)
	if !errors.Is(err, kleidi.ErrUnwrap) {
		t.Fatalf("node.Unwrap(ctx, blob for b and rsa) err = %v, want an error wrapping kleidi.ErrUnwrap", err)
	}
	msg := err.Error()
	for _, fpr := range []string{b.fpr, g.rsa.fpr} {
		if !strings.Contains(msg, fpr) {
			t.Errorf("node.Unwrap(ctx, blob for b and rsa) err = %q, want it to name the primary fingerprint %s", msg, fpr)
		}
	}
	if strings.Contains(msg, "not a recipient") || strings.Contains(msg, a.fpr) {
		t.Errorf("node.Unwrap(ctx, blob for b and rsa) err = %q, want only the recipients b and rsa, by fingerprint", msg)
	}

	// A node that does not know the recipients names their encryption keys as the message does.
	stranger := newProvider(t, gpg.Config{PrivateKeyFile: a.priv})
	_, err = stranger.Unwrap(ctx, wrapped)
	if msg := err.Error(); !containsAny(msg, encryptionKeyNames(b.entity)) || !strings.Contains(msg, "not a recipient here") ||
		strings.Contains(msg, b.fpr) {
		t.Errorf("stranger.Unwrap(ctx, blob for b and rsa) err = %q, want it to name b's encryption key as not a recipient here", msg)
	}
	if got := node.Recipients(); !slices.Contains(got, b.fpr) || !slices.Contains(got, g.rsa.fpr) {
		t.Errorf("node.Recipients() = %v, want it to hold %s and %s, the names of the unwrap error", got, b.fpr, g.rsa.fpr)
	}
}

func TestWrapOnly(t *testing.T) {
	k := newTestKey(t, keyOptions{})
	wrapOnly := newProvider(t, gpg.Config{PublicKeyFiles: []string{k.pub}})
	key := randomKey(t)
	wrapped, err := wrapOnly.Wrap(ctx, key)
	if err != nil {
		t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
	}
	if _, err := wrapOnly.Unwrap(ctx, wrapped); !errors.Is(err, gpg.ErrNoPrivateKey) || !errors.Is(err, kleidi.ErrUnwrap) {
		t.Errorf("wrap-only p.Unwrap(ctx, wrapped) err = %v, want an error wrapping gpg.ErrNoPrivateKey and kleidi.ErrUnwrap", err)
	}
	if err := wrapOnly.Health(ctx); !errors.Is(err, gpg.ErrNoPrivateKey) {
		t.Errorf("wrap-only p.Health(ctx) = %v, want an error wrapping gpg.ErrNoPrivateKey", err)
	}
	full := newProvider(t, gpg.Config{PrivateKeyFile: k.priv})
	if got, err := full.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
		t.Errorf("p.Unwrap(ctx, wrapOnly.Wrap(ctx, key)) err = %v, equal = %v; want nil, true", err, bytes.Equal(got, key))
	}
}

// TestPassphrase checks every source of a key and of its passphrase: files and memory, and that New zeroes
// the passphrase a callback returned, once.
func TestPassphrase(t *testing.T) {
	k := newTestKey(t, keyOptions{passphrase: gnupgPassphrase, armored: true})
	file := t.TempDir() + "/passphrase"
	writeFile(t, file, []byte(gnupgPassphrase+"\r\n"))
	priv, pub := readTestFile(t, k.priv), readTestFile(t, k.pub)
	var given [][]byte
	callback := func() ([]byte, error) {
		b := []byte(gnupgPassphrase)
		given = append(given, b)
		return b, nil
	}
	for _, c := range []gpg.Config{
		{PrivateKeyFile: k.priv, PassphraseFile: file},
		{PrivateKeyFile: k.priv, Passphrase: callback},
		{PublicKeyFiles: []string{k.pub}, PrivateKeyFile: k.priv, Passphrase: callback},
		{PrivateKey: priv, Passphrase: callback},
		{PublicKeys: [][]byte{pub}, PrivateKey: priv, PassphraseFile: file},
	} {
		p := newProvider(t, c)
		if err := p.Health(ctx); err != nil {
			t.Errorf("gpg.New(%+v).Health(ctx) = %v, want nil", c, err)
		}
		if got := p.Recipients(); len(got) != 1 || got[0] != k.fpr {
			t.Errorf("gpg.New(%+v).Recipients() = %v, want [%s]", c, got, k.fpr)
		}
		roundTrip(t, p, p)
	}
	if len(given) != 3 {
		t.Errorf("Config.Passphrase was called %d times by 3 calls of gpg.New, want 3", len(given))
	}
	for _, b := range given {
		if !bytes.Equal(b, make([]byte, len(gnupgPassphrase))) {
			t.Errorf("gpg.New left the passphrase Config.Passphrase returned in memory, want it zeroed")
		}
	}
	// New keeps no reference to the key bytes: zeroing them after New changes nothing.
	p := newProvider(t, gpg.Config{PrivateKey: priv, Passphrase: callback})
	clear(priv)
	roundTrip(t, p, p)
}

func TestUnwrapRefusesOtherMessages(t *testing.T) {
	g := gnupg(t)
	p := newProvider(t, gpg.Config{PrivateKeyFile: g.cv.privBinary})
	key := randomKey(t)
	for name, args := range map[string][]string{
		"symmetric":        {"--passphrase-file", g.passphrase, "--symmetric"},
		"signed only":      {"--sign", "--local-user", g.cv.fpr},
		"signed":           {"--sign", "--local-user", g.cv.fpr, "--encrypt", "--recipient", g.rsa.fpr},
		"encrypted + pass": {"--passphrase-file", g.passphrase, "--symmetric", "--encrypt", "--recipient", g.cv.fpr},
	} {
		msg, err := g.run(key, args...)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := p.Unwrap(ctx, msg); !errors.Is(err, kleidi.ErrUnwrap) || got != nil {
			t.Errorf("p.Unwrap(ctx, gpg %s message) = %d bytes, %v; want nil, an error wrapping kleidi.ErrUnwrap", name, len(got), err)
		}
	}
	// A message gpg encrypted and signed for this key unwraps: the signature is not checked.
	msg, err := g.run(key, "--sign", "--local-user", g.cv.fpr, "--encrypt", "--recipient", g.cv.fpr)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := p.Unwrap(ctx, msg); err != nil || !bytes.Equal(got, key) {
		t.Errorf("p.Unwrap(ctx, gpg signed and encrypted message) err = %v, equal = %v; want nil, true", err, bytes.Equal(got, key))
	}
}

func TestWrapLimits(t *testing.T) {
	p := newProvider(t, gpg.Config{PrivateKeyFile: newTestKey(t, keyOptions{}).priv})
	if _, err := p.Wrap(ctx, make([]byte, gpg.MaxKeySize+1)); !errors.Is(err, kleidi.ErrTooLarge) {
		t.Errorf("p.Wrap(ctx, %d bytes) err = %v, want an error wrapping kleidi.ErrTooLarge", gpg.MaxKeySize+1, err)
	}
	key := make([]byte, gpg.MaxKeySize)
	wrapped, err := p.Wrap(ctx, key)
	if err != nil {
		t.Fatalf("p.Wrap(ctx, %d bytes) err = %v, want nil", gpg.MaxKeySize, err)
	}
	if got, err := p.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
		t.Errorf("p.Unwrap(ctx, p.Wrap(ctx, %d bytes)) err = %v, equal = %v; want nil, true", gpg.MaxKeySize, err, bytes.Equal(got, key))
	}
	if _, err := p.Unwrap(ctx, make([]byte, kleidi.MaxWrappedKeySize+1)); !errors.Is(err, kleidi.ErrTooLarge) || !errors.Is(err, kleidi.ErrUnwrap) {
		t.Errorf("p.Unwrap(ctx, %d bytes) err = %v, want an error wrapping kleidi.ErrTooLarge and kleidi.ErrUnwrap", kleidi.MaxWrappedKeySize+1, err)
	}
}

//go:build cgo

package pkcs11_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
	"github.com/kleidi-kms/kleidi/pkcs11"
)

func TestConformance(t *testing.T) {
	cfg := newHSM(t).token(t, "conformance")
	kleiditest.TestProvider(t, func(t *testing.T) kleidi.Provider { return open(t, cfg) })
}

// withSession logs in to the token of cfg with the library itself, outside any provider, and runs f.
func withSession(t *testing.T, cfg pkcs11.Config, f func(c *p11.Ctx, s p11.SessionHandle)) {
	t.Helper()
	c := p11.New(cfg.Module)
	if c == nil {
		t.Fatalf("p11.New(%s) = nil", cfg.Module)
	}
	defer c.Destroy()
	if err := c.Initialize(); err != nil {
		t.Fatalf("C_Initialize: %v", err)
	}
	defer c.Finalize()
	slots, err := c.GetSlotList(true)
	if err != nil {
		t.Fatal(err)
	}
	for _, slot := range slots {
		if info, err := c.GetTokenInfo(slot); err != nil || info.Label != cfg.Token {
			continue
		}
		s, err := c.OpenSession(slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseSession(s)
		if err := c.Login(s, p11.CKU_USER, testPIN); err != nil {
			t.Fatal(err)
		}
		f(c, s)
		return
	}
	t.Fatalf("no token labelled %q", cfg.Token)
}

func findKeys(t *testing.T, c *p11.Ctx, s p11.SessionHandle, label string) []p11.ObjectHandle {
	t.Helper()
	if err := c.FindObjectsInit(s, []*p11.Attribute{p11.NewAttribute(p11.CKA_LABEL, label)}); err != nil {
		t.Fatal(err)
	}
	defer c.FindObjectsFinal(s)
	found, _, err := c.FindObjects(s, 10)
	if err != nil {
		t.Fatal(err)
	}
	return found
}

// TestKeysAreNonExtractable creates the keys through a provider, then reads them with the library: the token
// refuses to give the value of either (CKA_VALUE), and they are sensitive, non-extractable token objects.
func TestKeysAreNonExtractable(t *testing.T) {
	cfg := newHSM(t).token(t, "extract")
	p, err := pkcs11.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	withSession(t, cfg, func(c *p11.Ctx, s p11.SessionHandle) {
		keys := findKeys(t, c, s, "kek")
		if len(keys) != 2 {
			t.Fatalf("%d objects labelled kek on the token, want 2 (the wrapping key and the proof key)", len(keys))
		}
		for _, k := range keys {
			if v, err := c.GetAttributeValue(s, k, []*p11.Attribute{p11.NewAttribute(p11.CKA_VALUE, nil)}); !errors.Is(err, p11.Error(p11.CKR_ATTRIBUTE_SENSITIVE)) {
				t.Errorf("C_GetAttributeValue(CKA_VALUE) = %d attributes, %v; want CKR_ATTRIBUTE_SENSITIVE", len(v), err)
			}
			attrs, err := c.GetAttributeValue(s, k, []*p11.Attribute{p11.NewAttribute(p11.CKA_SENSITIVE, nil),
				p11.NewAttribute(p11.CKA_EXTRACTABLE, nil), p11.NewAttribute(p11.CKA_TOKEN, nil), p11.NewAttribute(p11.CKA_WRAP, nil)})
			if err != nil {
				t.Fatal(err)
			}
			want := []byte{1, 0, 1, 0}
			for i, a := range attrs {
				if !bytes.Equal(a.Value, want[i:i+1]) {
					t.Errorf("attribute %#x = %v, want %v", a.Type, a.Value, want[i:i+1])
				}
			}
		}
		// Wrapping the key out of the token fails too, even with a key of one's own.
		if _, err := c.WrapKey(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_KEY_WRAP, nil)}, keys[0], keys[1]); err == nil {
			t.Errorf("C_WrapKey of a provider key succeeded, want an error")
		}
	})
}

// TestExistingKeys checks that a provider uses keys made beforehand (and no others), and refuses an extractable
// one.
func TestExistingKeys(t *testing.T) {
	h := newHSM(t)
	cfg := h.token(t, "existing")
	cfg.CreateKeys = false
	if _, err := pkcs11.New(context.Background(), cfg); !errors.Is(err, pkcs11.ErrKey) || !strings.Contains(err.Error(), "init") {
		t.Fatalf("pkcs11.New(no key on the token, CreateKeys false) err = %v, want an error wrapping ErrKey that says to run init", err)
	}
	withSession(t, cfg, func(c *p11.Ctx, s p11.SessionHandle) {
		for _, m := range []struct {
			mech, keyType uint
			usage         uint
		}{{p11.CKM_AES_KEY_GEN, p11.CKK_AES, p11.CKA_ENCRYPT}, {p11.CKM_GENERIC_SECRET_KEY_GEN, p11.CKK_GENERIC_SECRET, p11.CKA_SIGN}} {
			template := []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY), p11.NewAttribute(p11.CKA_KEY_TYPE, m.keyType),
				p11.NewAttribute(p11.CKA_TOKEN, true), p11.NewAttribute(p11.CKA_SENSITIVE, true), p11.NewAttribute(p11.CKA_EXTRACTABLE, true),
				p11.NewAttribute(m.usage, true), p11.NewAttribute(p11.CKA_DECRYPT, m.keyType == p11.CKK_AES),
				p11.NewAttribute(p11.CKA_VALUE_LEN, 32), p11.NewAttribute(p11.CKA_LABEL, "kek")}
			if _, err := c.GenerateKey(s, []*p11.Mechanism{p11.NewMechanism(m.mech, nil)}, template); err != nil {
				t.Fatal(err)
			}
		}
	})
	_, err := pkcs11.New(context.Background(), cfg)
	if !errors.Is(err, pkcs11.ErrKey) || !strings.Contains(err.Error(), "extractable") {
		t.Fatalf("pkcs11.New(extractable key) err = %v, want an error wrapping ErrKey that says it is extractable", err)
	}
	if !strings.Contains(err.Error(), `"existing"`) || !strings.Contains(err.Error(), `"kek"`) {
		t.Errorf("pkcs11.New(extractable key) err = %q, want the token and key labels in it", err)
	}
	// The same keys, locked down afterwards (CKA_EXTRACTABLE set to false): they were readable once, and may have
	// been copied out then.
	withSession(t, cfg, func(c *p11.Ctx, s p11.SessionHandle) {
		for _, h := range findKeys(t, c, s, "kek") {
			if err := c.SetAttributeValue(s, h, []*p11.Attribute{p11.NewAttribute(p11.CKA_EXTRACTABLE, false)}); err != nil {
				t.Fatalf("C_SetAttributeValue(CKA_EXTRACTABLE false) err = %v", err)
			}
		}
	})
	if _, err := pkcs11.New(context.Background(), cfg); !errors.Is(err, pkcs11.ErrKey) || !strings.Contains(err.Error(), "CKA_NEVER_EXTRACTABLE") {
		t.Fatalf("pkcs11.New(key once extractable) err = %v, want an error wrapping ErrKey that names CKA_NEVER_EXTRACTABLE", err)
	}
	// Keys made beforehand by an administrator, fit: used as they are.
	cfg.KeyLabel = "admin"
	withSession(t, cfg, func(c *p11.Ctx, s p11.SessionHandle) {
		for _, m := range []struct{ mech, keyType, usage uint }{{p11.CKM_AES_KEY_GEN, p11.CKK_AES, p11.CKA_ENCRYPT}, {p11.CKM_GENERIC_SECRET_KEY_GEN, p11.CKK_GENERIC_SECRET, p11.CKA_SIGN}} {
			template := []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY), p11.NewAttribute(p11.CKA_KEY_TYPE, m.keyType),
				p11.NewAttribute(p11.CKA_TOKEN, true), p11.NewAttribute(p11.CKA_SENSITIVE, true), p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
				p11.NewAttribute(m.usage, true), p11.NewAttribute(p11.CKA_DECRYPT, m.keyType == p11.CKK_AES),
				p11.NewAttribute(p11.CKA_VALUE_LEN, 32), p11.NewAttribute(p11.CKA_LABEL, "admin"), p11.NewAttribute(p11.CKA_ID, []byte{0xad})}
			if _, err := c.GenerateKey(s, []*p11.Mechanism{p11.NewMechanism(m.mech, nil)}, template); err != nil {
				t.Fatal(err)
			}
		}
	})
	cfg.KeyLabel, cfg.KeyID = "", []byte{0xad}
	p := open(t, cfg)
	roundTrip(t, p)
	p.Close()
	withSession(t, cfg, func(c *p11.Ctx, s p11.SessionHandle) {
		if n := len(findKeys(t, c, s, "admin")); n != 2 {
			t.Errorf("%d keys labelled admin after the provider ran, want the 2 made beforehand", n)
		}
	})
}

func roundTrip(t *testing.T, p *pkcs11.Provider) {
	t.Helper()
	ctx := context.Background()
	key := make([]byte, kleidi.KeySize)
	rand.Read(key)
	wrapped, err := p.Wrap(ctx, key)
	if err != nil {
		t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
	}
	got, err := p.Unwrap(ctx, wrapped)
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("p.Unwrap(ctx, p.Wrap(ctx, key)) err = %v, equal = %v; want nil, true", err, bytes.Equal(got, key))
	}
}

func TestWrongPIN(t *testing.T) {
	h := newHSM(t)
	cfg := h.token(t, "pin")
	const wrong = "98765432"
	cfg.PINFile = h.pinFile(t, wrong)
	_, err := pkcs11.New(context.Background(), cfg)
	if !errors.Is(err, pkcs11.ErrPIN) || !errors.Is(err, kleidi.ErrUnavailable) {
		t.Fatalf("pkcs11.New(wrong PIN) err = %v, want an error wrapping pkcs11.ErrPIN and kleidi.ErrUnavailable", err)
	}
	if strings.Contains(err.Error(), wrong) || strings.Contains(err.Error(), testPIN) {
		t.Errorf("pkcs11.New(wrong PIN) err = %q holds a PIN", err)
	}
	if !strings.Contains(err.Error(), `"pin"`) {
		t.Errorf("pkcs11.New(wrong PIN) err = %q, want the token's label in it", err)
	}
	// The token counted one failure, not a retry loop: the right PIN still works.
	cfg.PINFile = h.pinFile(t, testPIN)
	roundTrip(t, open(t, cfg))
}

func TestMissingModule(t *testing.T) {
	h := newHSM(t)
	cfg := h.token(t, "module")
	for _, module := range []string{"/nonexistent/libpkcs11.so", h.pinFile(t, "not a library")} {
		cfg.Module = module
		_, err := pkcs11.New(context.Background(), cfg)
		if !errors.Is(err, kleidi.ErrUnavailable) || !strings.Contains(err.Error(), module) {
			t.Errorf("pkcs11.New(module %s) err = %v, want an error wrapping ErrUnavailable that names the module", module, err)
		}
	}
	cfg.Module, cfg.Token = softHSMModule, "absent"
	if _, err := pkcs11.New(context.Background(), cfg); !errors.Is(err, kleidi.ErrUnavailable) || !strings.Contains(err.Error(), `no token labelled "absent"`) {
		t.Errorf("pkcs11.New(token absent) err = %v, want an error wrapping ErrUnavailable that says no token is labelled so", err)
	}
}

// TestTokenRemovedAndRestored moves the token directory away while a provider serves, as a pulled HSM or a
// stopped daemon: calls fail with ErrUnavailable (never ErrUnwrap, which the Envelope would remember as a bad
// key), Health says so, and once the directory is back the same provider works again.
func TestTokenRemovedAndRestored(t *testing.T) {
	h := newHSM(t)
	p := open(t, h.token(t, "removable"))
	ctx := context.Background()
	key := make([]byte, kleidi.KeySize)
	rand.Read(key)
	wrapped, err := p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	proof, err := p.Prove(ctx, []byte("m"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(h.tokens, h.tokens+".away"); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Unwrap(ctx, wrapped); !errors.Is(err, kleidi.ErrUnavailable) || errors.Is(err, kleidi.ErrUnwrap) {
		t.Errorf("p.Unwrap(token away) err = %v, want an error wrapping ErrUnavailable and not ErrUnwrap", err)
	}
	if _, err := p.Wrap(ctx, key); !errors.Is(err, kleidi.ErrUnavailable) {
		t.Errorf("p.Wrap(token away) err = %v, want an error wrapping ErrUnavailable", err)
	}
	if err := p.Health(ctx); !errors.Is(err, kleidi.ErrUnavailable) {
		t.Errorf("p.Health(token away) = %v, want an error wrapping ErrUnavailable", err)
	}
	// The proof key is in memory: proofs still verify while the token is away.
	if err := p.Verify(ctx, []byte("m"), proof); err != nil {
		t.Errorf("p.Verify(token away) = %v, want nil", err)
	}
	if err := os.Rename(h.tokens+".away", h.tokens); err != nil {
		t.Fatal(err)
	}
	if err := p.Health(ctx); err != nil {
		t.Fatalf("p.Health(token back) = %v, want nil", err)
	}
	if got, err := p.Unwrap(ctx, wrapped); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("p.Unwrap(token back) err = %v, equal = %v; want nil, true", err, bytes.Equal(got, key))
	}
	roundTrip(t, p)
}

// TestForgedKEKCarriesNoValidProof plays a party without the token: it wraps a KEK of its choosing with a token of
// its own (same label, same key label, same PIN, same format) and proves with it, or picks proofs at random.
// The victim's provider refuses the proof (ErrUnauthenticated) and the blob (ErrUnwrap), and so does an Envelope.
func TestForgedKEKCarriesNoValidProof(t *testing.T) {
	victimHSM := newHSM(t)
	cfg := victimHSM.token(t, "victim")
	victim := open(t, cfg)
	ctx := context.Background()

	// A proof is the same in every process and after a restart (a node that lost its keyring relies on it).
	message := kleiditest.ProofMessage("kleidi-pkcs11-x", "pkcs11", []byte("blob"))
	genuine, err := victim.Prove(ctx, message)
	if err != nil {
		t.Fatal(err)
	}
	victim.Close()
	victim = open(t, cfg)
	if err := victim.Verify(ctx, message, genuine); err != nil {
		t.Fatalf("Verify(proof made before a restart) = %v, want nil", err)
	}
	victim.Close()

	attackerHSM := newHSM(t)
	attacker := open(t, attackerHSM.token(t, "victim"))
	kek := make([]byte, kleidi.KeySize)
	rand.Read(kek)
	id, ciphertext := kleiditest.ForgeCiphertext("pkcs11", kek, []byte("the attacker's seed"))
	blob, err := attacker.Wrap(ctx, kek)
	if err != nil {
		t.Fatal(err)
	}
	forgedProof, err := attacker.Prove(ctx, kleiditest.ProofMessage(id, "pkcs11", blob))
	if err != nil {
		t.Fatal(err)
	}
	attacker.Close()

	// Back on the victim's token.
	t.Setenv("SOFTHSM2_CONF", victimHSM.dir+"/softhsm2.conf")
	victim = open(t, cfg)
	random := make([]byte, pkcs11.ProofSize)
	rand.Read(random)
	for name, proof := range map[string][]byte{"the attacker's token's proof": forgedProof, "a random proof": random,
		"the victim's proof of another message": genuine} {
		if err := victim.Verify(ctx, kleiditest.ProofMessage(id, "pkcs11", blob), proof); !errors.Is(err, kleidi.ErrUnauthenticated) {
			t.Errorf("victim.Verify(forged KEK, %s) = %v, want an error wrapping ErrUnauthenticated", name, err)
		}
	}
	if got, err := victim.Unwrap(ctx, blob); !errors.Is(err, kleidi.ErrUnwrap) || got != nil {
		t.Errorf("victim.Unwrap(blob of another token) = %d bytes, %v; want nil, an error wrapping ErrUnwrap", len(got), err)
	}

	// Through an Envelope, as the plugin decrypts: refused before any unwrap.
	counted := &countingUnwraps{Provider: victim}
	env, err := kleidi.NewEnvelope(ctx, counted, kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatal(err)
	}
	defer env.Close()
	c, err := kleidi.ParseCiphertext(ciphertext)
	if err != nil {
		t.Fatal(err)
	}
	c.AttachedKey = kleiditest.ForgeAttachedKey(blob, forgedProof)
	before := counted.unwraps.Load()
	if pt, err := env.Decrypt(ctx, c, nil); err == nil || pt != nil {
		t.Errorf("env.Decrypt(forged ciphertext and attached key) = %q, %v; want an error", pt, err)
	} else if !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("env.Decrypt(forged ciphertext and attached key) err = %v, want an error wrapping ErrUnauthenticated", err)
	}
	if n := counted.unwraps.Load() - before; n != 0 {
		t.Errorf("the forged attached key made %d token unwraps, want 0", n)
	}
}

// countingUnwraps counts the Unwrap calls of a provider that stays an Authenticator.
type countingUnwraps struct {
	*pkcs11.Provider
	unwraps atomic.Int64
}

func (c *countingUnwraps) Unwrap(ctx context.Context, blob []byte) ([]byte, error) {
	c.unwraps.Add(1)
	return c.Provider.Unwrap(ctx, blob)
}

func TestCancelledBeforeTheTokenIsAsked(t *testing.T) {
	p := open(t, newHSM(t).token(t, "cancel"))
	ctx, cancel := context.WithTimeout(context.Background(), time.Nanosecond)
	defer cancel()
	<-ctx.Done()
	if err := p.Health(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("p.Health(expired) = %v, want an error wrapping context.DeadlineExceeded", err)
	}
}

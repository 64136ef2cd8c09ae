package gpg_test

import (
	"bytes"
	"crypto"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp/packet"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/gpg"
)

// proofMessage is a message such as the Envelope proves: a label, then the wrapped key.
func proofMessage(blob []byte) []byte {
	return append([]byte("kleidi test proof\x00"), blob...)
}

// signRaw signs message with priv as edit describes the signature, bypassing every check of go-crypto's
// message API: an attacker writes packets as they please.
func signRaw(t *testing.T, priv *packet.PrivateKey, message []byte, edit func(*packet.Signature)) []byte {
	t.Helper()
	sig := &packet.Signature{
		Version:      priv.Version,
		SigType:      packet.SigTypeBinary,
		PubKeyAlgo:   priv.PubKeyAlgo,
		Hash:         crypto.SHA256,
		CreationTime: time.Now(),
		IssuerKeyId:  &priv.KeyId,
	}
	if edit != nil {
		edit(sig)
	}
	h, err := sig.PrepareSign(nil)
	if err != nil {
		t.Fatalf("sig.PrepareSign() err = %v, want nil", err)
	}
	h.Write(message)
	noSalt := false // go-crypto's salt notation has no size for SHA-1
	if err := sig.Sign(h, priv, &packet.Config{NonDeterministicSignaturesViaNotation: &noSalt}); err != nil {
		t.Fatalf("sig.Sign() err = %v, want nil", err)
	}
	var buf bytes.Buffer
	if err := sig.Serialize(&buf); err != nil {
		t.Fatalf("sig.Serialize() err = %v, want nil", err)
	}
	return buf.Bytes()
}

func wantUnauthenticated(t *testing.T, p *gpg.Provider, what string, message, proof []byte) {
	t.Helper()
	err := p.Verify(ctx, message, proof)
	if !errors.Is(err, kleidi.ErrUnauthenticated) {
		t.Errorf("p.Verify(ctx, message, %s) err = %v, want an error wrapping kleidi.ErrUnauthenticated", what, err)
	}
}

func wantVerified(t *testing.T, p *gpg.Provider, what string, message, proof []byte) {
	t.Helper()
	if err := p.Verify(ctx, message, proof); err != nil {
		t.Errorf("p.Verify(ctx, message, %s) err = %v, want nil", what, err)
	}
}

func prove(t *testing.T, p *gpg.Provider, message []byte) []byte {
	t.Helper()
	proof, err := p.Prove(ctx, message)
	if err != nil {
		t.Fatalf("p.Prove(ctx, message) err = %v, want nil", err)
	}
	if len(proof) == 0 || len(proof) > kleidi.MaxProofSize {
		t.Fatalf("p.Prove(ctx, message) = %d bytes, want 1 to %d", len(proof), kleidi.MaxProofSize)
	}
	return proof
}

// TestVerifyRefusesForgedKEK is the attack of a party that knows the public key, as every node does: it wraps
// a KEK of its choice to that key, which needs no secret, and signs the wrapped key with a key of its own, or
// dresses its signature up as one of the victim's. The node refuses every such proof; only its own key's
// signature passes.
func TestVerifyRefusesForgedKEK(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		victim := newTestKey(t, keyOptions{v6: v6})
		node := newProvider(t, gpg.Config{PrivateKeyFile: victim.priv})
		public := newProvider(t, gpg.Config{PublicKeyFiles: []string{victim.pub}}) // what anyone can build
		kek := randomKey(t)
		blob, err := public.Wrap(ctx, kek)
		if err != nil {
			t.Fatalf("public.Wrap(ctx, kek) err = %v, want nil", err)
		}
		// The forged blob is genuine OpenPGP: without a proof to check, the node would unwrap it.
		if got, err := node.Unwrap(ctx, blob); err != nil || !bytes.Equal(got, kek) {
			t.Fatalf("node.Unwrap(ctx, forged blob) err = %v, equal = %v; want nil, true", err, bytes.Equal(got, kek))
		}
		message := proofMessage(blob)

		if _, err := public.Prove(ctx, message); !errors.Is(err, gpg.ErrNoPrivateKey) {
			t.Errorf("public.Prove(ctx, message) err = %v, want an error wrapping gpg.ErrNoPrivateKey", err)
		}
		attackerKey := newTestKey(t, keyOptions{v6: v6})
		attacker := newProvider(t, gpg.Config{PrivateKeyFile: attackerKey.priv})
		forged := prove(t, attacker, message)
		wantUnauthenticated(t, node, "attacker's signature", message, forged)
		wantUnauthenticated(t, public, "attacker's signature", message, forged)

		// The attacker names the victim's key as the issuer of its own signature.
		victimFpr, _ := hex.DecodeString(victim.fpr)
		attackerFpr, _ := hex.DecodeString(attackerKey.fpr)
		impersonated := bytes.ReplaceAll(forged, attackerFpr, victimFpr)
		var victimID, attackerID [8]byte
		binary.BigEndian.PutUint64(victimID[:], victim.entity.PrimaryKey.KeyId)
		binary.BigEndian.PutUint64(attackerID[:], attackerKey.entity.PrimaryKey.KeyId)
		impersonated = bytes.ReplaceAll(impersonated, attackerID[:], victimID[:])
		if bytes.Equal(impersonated, forged) {
			t.Fatalf("the attacker's signature names no issuer to replace")
		}
		wantUnauthenticated(t, node, "attacker's signature naming the victim's key", message, impersonated)

		// The attacker lists the victim's key beside its own: its proofs are still its own key's.
		both := newProvider(t, gpg.Config{PublicKeyFiles: []string{victim.pub, attackerKey.pub}, PrivateKeyFile: attackerKey.priv})
		wantUnauthenticated(t, node, "signature of a provider that lists the victim", message, prove(t, both, message))

		// The victim's own signature passes, on the node and with the public key alone.
		genuine := prove(t, node, message)
		wantVerified(t, node, "the private key's signature", message, genuine)
		wantVerified(t, public, "the private key's signature", message, genuine)
	}
}

// TestVerifyRecipientProof has two nodes, each with its own private key and both public keys: each verifies
// what the other proved, since every recipient holds the root of trust; a node that does not list a key does
// not.
func TestVerifyRecipientProof(t *testing.T) {
	ka, kb := newTestKey(t, keyOptions{}), newTestKey(t, keyOptions{v6: true})
	pubs := []string{ka.pub, kb.pub}
	a := newProvider(t, gpg.Config{PublicKeyFiles: pubs, PrivateKeyFile: ka.priv})
	b := newProvider(t, gpg.Config{PublicKeyFiles: pubs, PrivateKeyFile: kb.priv})
	blob, err := a.Wrap(ctx, randomKey(t))
	if err != nil {
		t.Fatalf("a.Wrap(ctx, key) err = %v, want nil", err)
	}
	message := proofMessage(blob)
	proofA, proofB := prove(t, a, message), prove(t, b, message)
	wantVerified(t, b, "node a's proof", message, proofA)
	wantVerified(t, a, "node b's proof", message, proofB)
	wantVerified(t, a, "its own proof", message, proofA)

	aAlone := newProvider(t, gpg.Config{PrivateKeyFile: ka.priv})
	wantVerified(t, aAlone, "its own proof", message, proofA)
	wantUnauthenticated(t, aAlone, "the proof of a key it does not list", message, proofB)
	stranger := newProvider(t, gpg.Config{PrivateKeyFile: newTestKey(t, keyOptions{}).priv})
	wantUnauthenticated(t, stranger, "node a's proof", message, proofA)
}

// TestVerifyBindsMessage checks that a proof is over one message: another blob, a changed byte, a shorter or
// longer message are refused.
func TestVerifyBindsMessage(t *testing.T) {
	p := newProvider(t, gpg.Config{PrivateKeyFile: newTestKey(t, keyOptions{}).priv})
	blob, err := p.Wrap(ctx, randomKey(t))
	if err != nil {
		t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
	}
	other, err := p.Wrap(ctx, randomKey(t))
	if err != nil {
		t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
	}
	message := proofMessage(blob)
	proof := prove(t, p, message)
	wantVerified(t, p, "its proof", message, proof)
	flipped := bytes.Clone(message)
	flipped[len(flipped)/2] ^= 1
	for name, m := range map[string][]byte{
		"another blob":   proofMessage(other),
		"a changed byte": flipped,
		"a prefix":       message[:len(message)-1],
		"a longer one":   append(bytes.Clone(message), 0),
		"nothing":        nil,
	} {
		if err := p.Verify(ctx, m, proof); !errors.Is(err, kleidi.ErrUnauthenticated) {
			t.Errorf("p.Verify(ctx, %s, proof) err = %v, want an error wrapping kleidi.ErrUnauthenticated", name, err)
		}
	}
}

// TestVerifyRefusesMalformedProofs gives Verify proofs that are not one good signature.
func TestVerifyRefusesMalformedProofs(t *testing.T) {
	k := newTestKey(t, keyOptions{created: time.Now().Add(-48 * time.Hour)})
	p := newProvider(t, gpg.Config{PrivateKeyFile: k.priv})
	priv := k.entity.PrivateKey
	message := proofMessage([]byte("blob"))
	proof := prove(t, p, message)
	blob, err := p.Wrap(ctx, randomKey(t))
	if err != nil {
		t.Fatalf("p.Wrap(ctx, key) err = %v, want nil", err)
	}
	// A partial-length header for the same body: new format, a 1-byte partial chunk, then the rest.
	body := proof[2:] // proof has a two-byte new-format header for a body under 192 bytes
	if proof[0] != 0xc2 || int(proof[1]) != len(body) {
		t.Fatalf("p.Prove() header = % x, want c2 and a one-byte length", proof[:2])
	}
	partial := append([]byte{0xc2, 0xe0, body[0], byte(len(body) - 1)}, body[1:]...)
	now := time.Now()
	hour := uint32(3600)
	for name, bad := range map[string][]byte{
		"empty":                nil,
		"too large":            make([]byte, kleidi.MaxProofSize+1),
		"two signatures":       append(bytes.Clone(proof), prove(t, p, message)...),
		"a trailing byte":      append(bytes.Clone(proof), 0),
		"truncated":            proof[:len(proof)-1],
		"a header only":        proof[:2],
		"a wrapped key":        blob,
		"a partial length":     partial,
		"garbage":              bytes.Repeat([]byte{0xff}, 100),
		"SHA-1":                signRaw(t, priv, message, func(s *packet.Signature) { s.Hash = crypto.SHA1 }),
		"SHA-224":              signRaw(t, priv, message, func(s *packet.Signature) { s.Hash = crypto.SHA224 }),
		"a text signature":     signRaw(t, priv, message, func(s *packet.Signature) { s.SigType = packet.SigTypeText }),
		"a key signature":      signRaw(t, priv, message, func(s *packet.Signature) { s.SigType = packet.SigTypeGenericCert }),
		"made in the future":   signRaw(t, priv, message, func(s *packet.Signature) { s.CreationTime = now.Add(time.Hour) }),
		"made before its key":  signRaw(t, priv, message, func(s *packet.Signature) { s.CreationTime = now.Add(-72 * time.Hour) }),
		"an expired signature": signRaw(t, priv, message, func(s *packet.Signature) { s.CreationTime, s.SigLifetimeSecs = now.Add(-2*time.Hour), &hour }),
		"a critical notation": signRaw(t, priv, message, func(s *packet.Signature) {
			s.Notations = []*packet.Notation{{Name: "unknown@kleidi.test", Value: []byte("x"), IsCritical: true, IsHumanReadable: true}}
		}),
	} {
		wantUnauthenticated(t, p, name, message, bad)
	}
	// What signRaw makes without an edit passes, so each refusal above is the edit's doing; so do a signature
	// made within the allowed clock skew and one whose lifetime has not ended.
	wantVerified(t, p, "a plain signature", message, signRaw(t, priv, message, nil))
	wantVerified(t, p, "a signature made 5 minutes ahead", message,
		signRaw(t, priv, message, func(s *packet.Signature) { s.CreationTime = now.Add(5 * time.Minute) }))
	wantVerified(t, p, "a SHA-512 signature with a lifetime", message,
		signRaw(t, priv, message, func(s *packet.Signature) { s.Hash, s.SigLifetimeSecs = crypto.SHA512, &hour }))
	wantVerified(t, p, "the proof", message, proof)
}

// TestVerifySigningSubkeys checks that a signing subkey's signature passes while the subkey is valid, and that
// a revoked signing subkey's does not (its private part may be what was stolen).
func TestVerifySigningSubkeys(t *testing.T) {
	message := proofMessage([]byte("blob"))
	k := newTestKey(t, keyOptions{signing: true})
	p := newProvider(t, gpg.Config{PrivateKeyFile: k.priv})
	sub := k.entity.Subkeys[len(k.entity.Subkeys)-1].PrivateKey
	wantVerified(t, p, "the signing subkey's signature", message, signRaw(t, sub, message, nil))
	wantVerified(t, p, "its proof", message, prove(t, p, message))

	r := newTestKey(t, keyOptions{revokeSigner: true})
	pr := newProvider(t, gpg.Config{PrivateKeyFile: r.priv})
	revoked := r.entity.Subkeys[len(r.entity.Subkeys)-1].PrivateKey
	wantUnauthenticated(t, pr, "a revoked subkey's signature", message, signRaw(t, revoked, message, nil))
	wantVerified(t, pr, "the primary key's signature", message, signRaw(t, r.entity.PrivateKey, message, nil))
	// Prove signs with the primary key, never with the revoked subkey.
	wantVerified(t, pr, "its proof", message, prove(t, pr, message))
}

// TestVerifyExpiredKey checks that a proof stops passing when the key that made it expires, although New
// accepted the key and the proof passed before.
func TestVerifyExpiredKey(t *testing.T) {
	created := time.Now().Truncate(time.Second)
	k := newTestKey(t, keyOptions{created: created, lifetime: 3 * time.Second})
	p := newProvider(t, gpg.Config{PrivateKeyFile: k.priv})
	message := proofMessage([]byte("blob"))
	proof := prove(t, p, message)
	wantVerified(t, p, "the proof of a key not yet expired", message, proof)
	time.Sleep(time.Until(created.Add(3*time.Second + 100*time.Millisecond)))
	err := p.Verify(ctx, message, proof)
	if !errors.Is(err, kleidi.ErrUnauthenticated) || !strings.Contains(err.Error(), "expired") {
		t.Errorf("p.Verify(ctx, message, proof of an expired key) err = %v, want an error wrapping kleidi.ErrUnauthenticated that says expired", err)
	}
}

func TestProveErrors(t *testing.T) {
	g := gnupg(t)
	message := proofMessage([]byte("blob"))
	for name, c := range map[string]gpg.Config{
		"a certify-only key without a signing subkey": {PrivateKeyFile: g.noSign.privBinary},
		"a signing key exported as a stub":            {PrivateKeyFile: g.cvStub},
	} {
		p := newProvider(t, c)
		if _, err := p.Prove(ctx, message); !errors.Is(err, gpg.ErrNoSigningKey) {
			t.Errorf("%s: p.Prove(ctx, message) err = %v, want an error wrapping gpg.ErrNoSigningKey", name, err)
		}
	}

	p := newProvider(t, gpg.Config{PrivateKeyFile: newTestKey(t, keyOptions{}).priv})
	proof := prove(t, p, message)
	p.Close()
	if _, err := p.Prove(ctx, message); !errors.Is(err, kleidi.ErrClosed) {
		t.Errorf("p.Prove(ctx, message) after Close err = %v, want an error wrapping kleidi.ErrClosed", err)
	}
	if err := p.Verify(ctx, message, proof); !errors.Is(err, kleidi.ErrClosed) {
		t.Errorf("p.Verify(ctx, message, proof) after Close err = %v, want an error wrapping kleidi.ErrClosed", err)
	}
}

// TestGnuPGProof checks proofs against the gpg binary both ways, for an RSA key that signs with a subkey and
// an Ed25519 key that signs with its primary key: a detached signature gpg makes verifies, gpg --verify
// accepts what Prove makes, and the signatures gpg makes that are not a proof (SHA-1, text mode, armored, two
// signers) are refused.
func TestGnuPGProof(t *testing.T) {
	g := gnupg(t)
	dir := t.TempDir()
	message := proofMessage([]byte("blob"))
	msgFile := filepath.Join(dir, "message")
	writeFile(t, msgFile, message)
	for _, k := range []struct {
		name string
		gnupgKey
	}{{"RSA3072", g.rsa}, {"Curve25519", g.cv}} {
		t.Run(k.name, func(t *testing.T) {
			p := newProvider(t, gpg.Config{PrivateKeyFile: k.privBinary})
			public := newProvider(t, gpg.Config{PublicKeyFiles: []string{k.pubArmored}})
			sign := []string{"--passphrase-file", g.passphrase, "--local-user", k.fpr}
			sig, err := g.run(message, append(sign, "--detach-sign")...)
			if err != nil {
				t.Fatal(err)
			}
			wantVerified(t, p, "gpg --detach-sign output", message, sig)
			wantVerified(t, public, "gpg --detach-sign output", message, sig)
			wantUnauthenticated(t, p, "gpg --detach-sign output over another message", append(bytes.Clone(message), 0), sig)

			proofFile := filepath.Join(t.TempDir(), "proof.sig")
			writeFile(t, proofFile, prove(t, p, message))
			if _, err := g.run(nil, "--verify", proofFile, msgFile); err != nil {
				t.Errorf("gpg --verify of p.Prove(ctx, message): %v", err)
			}

			for name, args := range map[string][]string{
				"SHA-1":     append(sign, "--digest-algo", "SHA1", "--detach-sign"),
				"text mode": append(sign, "--textmode", "--detach-sign"),
				"armored":   append(sign, "--armor", "--detach-sign"),
				"two keys":  {"--passphrase-file", g.passphrase, "--local-user", g.rsa.fpr, "--local-user", g.cv.fpr, "--detach-sign"},
			} {
				bad, err := g.run(message, args...)
				if err != nil {
					t.Fatal(err)
				}
				wantUnauthenticated(t, p, "gpg --detach-sign "+name+" output", message, bad)
			}
		})
	}
}

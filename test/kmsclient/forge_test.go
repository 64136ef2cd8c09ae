package kmsclient

import (
	"context"
	"crypto/rand"
	"testing"
	"time"

	"k8s.io/apiserver/pkg/storage/value"
	"k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/kleiditest"
	"github.com/kleidi-kms/kleidi/server"
)

// forger is the threat model's etcd writer acting as a KMS v2 plugin of its own: kube-apiserver's transformer
// hands it a DEK seed, and it encrypts the seed under a KEK it chose, wrapped to the victim's root (as anyone who
// knows the root's public key can: here, root.Wrap), with an annotation of its making.
type forger struct {
	root     *kleiditest.Provider
	kek      []byte
	keyID    string
	annotate func(keyID string, blob []byte) []byte
}

func (f *forger) Status(context.Context) (*kmsservice.StatusResponse, error) {
	return &kmsservice.StatusResponse{Version: "v2", Healthz: "ok", KeyID: f.keyID}, nil
}

func (f *forger) Encrypt(ctx context.Context, _ string, seed []byte) (*kmsservice.EncryptResponse, error) {
	id, ciphertext := kleiditest.ForgeCiphertext(f.root.Name(), f.kek, seed)
	blob, err := f.root.Wrap(ctx, f.kek)
	if err != nil {
		return nil, err
	}
	return &kmsservice.EncryptResponse{Ciphertext: ciphertext, KeyID: id,
		Annotations: map[string][]byte{server.AttachedKeyAnnotation: f.annotate(id, blob)}}, nil
}

func (f *forger) Decrypt(context.Context, string, *kmsservice.DecryptRequest) ([]byte, error) {
	panic("the forger never decrypts")
}

// forgeSecret returns what the forger stores in etcd for a Secret whose value is plaintext: kube-apiserver's own
// envelope transformer, run over the forger's plugin.
func forgeSecret(t *testing.T, f *forger, plaintext []byte, secret value.Context) []byte {
	t.Helper()
	ctx := context.Background()
	f.kek = make([]byte, kleidi.KeySize)
	rand.Read(f.kek)
	f.keyID, _ = kleiditest.ForgeCiphertext(f.root.Name(), f.kek, nil)
	tr, obj, cacheKey, err := kmsv2.GenerateTransformer(ctx, "uid-forged", f, true)
	if err != nil {
		t.Fatalf("kmsv2.GenerateTransformer(forger) err = %v", err)
	}
	state := kmsv2.State{Transformer: tr, EncryptedObjectKeyID: obj.KeyID, EncryptedObjectEncryptedDEKSource: obj.EncryptedDEKSource,
		EncryptedObjectAnnotations: obj.Annotations, EncryptedObjectEncryptedDEKSourceType: obj.EncryptedDEKSourceType,
		UID: "uid-forged", ExpirationTimestamp: time.Now().Add(time.Minute), CacheKey: cacheKey, KMSProviderName: "kleidi"}
	stored, err := kmsv2.NewEnvelopeTransformer(f, "kleidi", func() (kmsv2.State, error) { return state, nil }, "apiserver-forger").
		TransformToStorage(ctx, plaintext, secret)
	if err != nil {
		t.Fatalf("forger TransformToStorage() err = %v", err)
	}
	return stored
}

// TestForgedSecretIsNeverServed plays the attack against kube-apiserver's own read path: a Secret written to etcd
// by someone who knows only the root's public side, read back by an apiserver whose plugin is kleidi. Before
// attached keys carried proofs, the apiserver returned the forged value as authentic.
func TestForgedSecretIsNeverServed(t *testing.T) {
	ctx := context.Background()
	root := kleiditest.NewInsecureProvider()
	pl := startPlugin(t, root, kleidi.NewMemoryKeyring(), server.Config{})
	api := newAPIServer(t, pl.endpoint)
	api.sync(t)
	secret := value.DefaultContext("/registry/secrets/kube-system/bootstrap-token-abcdef")
	genuine, err := api.tr.TransformToStorage(ctx, []byte("the real token"), secret)
	if err != nil {
		t.Fatal(err)
	}
	mallory := kleiditest.NewInsecureProvider()
	for name, annotate := range map[string]func(string, []byte) []byte{
		"a bare wrapped KEK": func(_ string, blob []byte) []byte { return blob },
		"a wrapped KEK with the forger's own proof": func(id string, blob []byte) []byte {
			proof, err := mallory.Prove(ctx, kleiditest.ProofMessage(id, root.Name(), blob))
			if err != nil {
				t.Fatal(err)
			}
			return kleiditest.ForgeAttachedKey(blob, proof)
		},
	} {
		stored := forgeSecret(t, &forger{root: root, annotate: annotate}, []byte("the forger's token"), secret)
		reader := newAPIServer(t, pl.endpoint) // a restarted apiserver: no DEK cache
		reader.sync(t)
		if got, _, err := reader.tr.TransformFromStorage(ctx, stored, secret); err == nil || got != nil {
			t.Errorf("TransformFromStorage(a Secret forged with %s) = %q, %v; want an error and nothing", name, got, err)
		}
		if got, _, err := reader.tr.TransformFromStorage(ctx, genuine, secret); err != nil || string(got) != "the real token" {
			t.Errorf("TransformFromStorage(genuine) after the forgery = %q, %v; want the real token", got, err)
		}
	}
}

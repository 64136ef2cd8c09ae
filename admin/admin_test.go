package admin_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi"
	"github.com/kleidi-kms/kleidi/admin"
	"github.com/kleidi-kms/kleidi/kleiditest"
)

// envelopeBackend serves the admin API from a real Envelope on a real (insecure, in-memory) root: the calls that
// change keys go through kleidi, so the codes the client sees are the ones kleidi's errors map to.
type envelopeBackend struct {
	env *kleidi.Envelope
}

func (b *envelopeBackend) State(context.Context) (admin.State, error) {
	return admin.State{Provider: "insecure", Joined: true, Healthy: true, ActiveKeyID: b.env.KeyID()}, nil
}
func (b *envelopeBackend) Keyring(context.Context) ([]byte, error) {
	return []byte(`{"format":"x"}`), nil
}
func (b *envelopeBackend) Stage(ctx context.Context) (string, error) { return b.env.Stage(ctx) }
func (b *envelopeBackend) Activate(ctx context.Context, id string) error {
	return b.env.Activate(ctx, id)
}
func (b *envelopeBackend) Forget(ctx context.Context, id string) error { return b.env.Forget(ctx, id) }
func (b *envelopeBackend) Enroll(ctx context.Context, identity []byte) (string, error) {
	id, err := kleidi.ParseIdentity(identity)
	if err != nil {
		return "", &admin.Error{Code: admin.CodeInvalid, Message: err.Error()}
	}
	return b.env.Enroll(ctx, id)
}
func (b *envelopeBackend) Unenroll(ctx context.Context, id string) (string, error) {
	return b.env.Unenroll(ctx, id)
}
func (b *envelopeBackend) Adopt(ctx context.Context, keyring []byte, _ []string) error {
	return b.env.Adopt(ctx, keyring)
}

func serve(t *testing.T, b admin.Backend, allowed []uint32) *admin.Client {
	t.Helper()
	dir, err := os.MkdirTemp("", "adm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	endpoint := "unix://" + filepath.Join(dir, "run", "admin.sock")
	l, err := admin.Listen(endpoint)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- admin.Serve(ctx, l, admin.Handler(b, nil), allowed, nil) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve() = %v", err)
		}
	})
	c, err := admin.Dial(endpoint)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func newBackend(t *testing.T) *envelopeBackend {
	t.Helper()
	env, err := kleidi.NewEnvelope(context.Background(), kleiditest.NewInsecureProvider(),
		kleidi.NewMemoryKeyring(), kleidi.WithCreateIfEmpty())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { env.Close() })
	return &envelopeBackend{env: env}
}

func TestCodes(t *testing.T) {
	ctx := context.Background()
	b := newBackend(t)
	c := serve(t, b, []uint32{uint32(os.Getuid())})
	first := b.env.KeyID()
	for _, tc := range []struct {
		name string
		call func() error
		code string
	}{
		{"Activate(no key ID)", func() error { return c.Activate(ctx, "") }, admin.CodeInvalid},
		{"Activate(unknown key)", func() error { return c.Activate(ctx, "kleidi-insecure-nosuchkey") }, admin.CodeRefused},
		{"Activate(key ID over 1 KiB)", func() error { return c.Activate(ctx, strings.Repeat("k", 1025)) }, admin.CodeInvalid},
		{"Forget(active key)", func() error { return c.Forget(ctx, first) }, admin.CodeRefused},
		{"Enroll(garbage)", func() error { _, err := c.Enroll(ctx, []byte("not an identity")); return err }, admin.CodeInvalid},
		{"Enroll(nothing)", func() error { _, err := c.Enroll(ctx, nil); return err }, admin.CodeInvalid},
		{"Unenroll(nothing)", func() error { _, err := c.Unenroll(ctx, ""); return err }, admin.CodeInvalid},
		{"Adopt(garbage)", func() error { return c.Adopt(ctx, []byte("{}"), nil) }, admin.CodeInvalid},
		{"Adopt(nothing)", func() error { return c.Adopt(ctx, nil, nil) }, admin.CodeInvalid},
	} {
		if err := tc.call(); !admin.IsCode(err, tc.code) {
			t.Errorf("%s err = %v, want code %s", tc.name, err, tc.code)
		}
	}
	// A good call after the refusals: the server kept serving, and nothing changed.
	id, err := c.Stage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Activate(ctx, id); err != nil {
		t.Fatal(err)
	}
	st, err := c.State(ctx)
	if err != nil || st.ActiveKeyID != id {
		t.Errorf("State() after stage and activate = %+v, %v; want key %s active", st, err, id)
	}
	if err := c.Forget(ctx, first); err != nil {
		t.Errorf("Forget(retired key) err = %v", err)
	}
}

func TestMalformedRequests(t *testing.T) {
	b := newBackend(t)
	c := serve(t, b, []uint32{uint32(os.Getuid())})
	for _, body := range []string{`{"keyID":`, `{"keyID":"a","extra":1}`, `[]`, strings.Repeat(" ", 9<<20) + `{}`} {
		err := rawPost(t, c, "/v1/activate", body)
		if !admin.IsCode(err, admin.CodeInvalid) {
			t.Errorf("POST /v1/activate %.40q err = %v, want code %s", body, err, admin.CodeInvalid)
		}
	}
}

// rawPost posts body as the client would, through its own transport.
func rawPost(t *testing.T, c *admin.Client, path, body string) error {
	t.Helper()
	return admin.PostRawForTest(context.Background(), c, path, body)
}

func TestServeRefusesOtherUIDs(t *testing.T) {
	c := serve(t, newBackend(t), []uint32{uint32(os.Getuid()) + 4321})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := c.State(ctx)
	if !admin.IsCode(err, admin.CodeUnavailable) {
		t.Errorf("State() from a uid not allowed err = %v, want the connection closed (code %s)", err, admin.CodeUnavailable)
	}
}

func TestListenRefusesAnAbstractSocket(t *testing.T) {
	if _, err := admin.Listen("unix:///@kleidi-admin"); err == nil {
		t.Error("Listen(abstract socket) succeeded: it has no file mode")
	}
}

func TestServeNeedsAllowedUIDs(t *testing.T) {
	l, err := admin.Listen("unix://" + filepath.Join(t.TempDir(), "a.sock"))
	if err != nil {
		t.Fatal(err)
	}
	if err := admin.Serve(context.Background(), l, http.NotFoundHandler(), nil, nil); err == nil {
		t.Error("Serve(no allowed uids) = nil")
	}
}

func TestErrorText(t *testing.T) {
	err := fmt.Errorf("wrapped: %w", &admin.Error{Code: admin.CodeRefused, Message: "no"})
	if !admin.IsCode(err, admin.CodeRefused) || admin.Code(err) != admin.CodeRefused {
		t.Errorf("IsCode/Code of a wrapped Error = %v, %s", admin.IsCode(err, admin.CodeRefused), admin.Code(err))
	}
	if admin.Code(kleidi.ErrUnavailable) != admin.CodeUnavailable || admin.Code(errors.New("x")) != admin.CodeRefused {
		t.Error("Code of kleidi errors is not what the docs say")
	}
}

package main_test

import (
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kleidi-kms/kleidi/admin"
	kmsapi "k8s.io/kms/apis/v2"
)

// adminPlugin is a plugin of one node on its own swtpm, with its admin socket.
type adminPlugin struct {
	s      *sandbox
	tpm    string
	srv    *server
	client *admin.Client
}

func (p *adminPlugin) adminSocket() string { return filepath.Join(p.s.dir, "run", "admin.sock") }

// startAdminPlugin starts serve with an admin socket on a new swtpm; with initialise, on a keyring of its own.
func startAdminPlugin(t *testing.T, initialise bool, extra ...string) *adminPlugin {
	t.Helper()
	p := &adminPlugin{s: newSandbox(t), tpm: startSwtpmUnix(t)}
	tpmFlags := []string{"--provider", "tpm", "--tpm", p.tpm, "--state-dir", filepath.Join(p.s.dir, "state")}
	if initialise {
		if code, out, errOut := p.s.run(t, append([]string{"init"}, tpmFlags...)...); code != 0 {
			t.Fatalf("init = %d, %q, %q", code, out, errOut)
		}
	}
	args := append(append([]string{"serve", "--admin-socket", "unix://" + p.adminSocket(), "--listen", "unix://" + p.s.socket()}, tpmFlags...), extra...)
	p.srv = p.s.serve(t, p.s.command(false, args...))
	c, err := admin.Dial("unix://" + p.adminSocket())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	p.client = c
	if len(extra) > 0 { // a test of refusals: the socket is there, whether it answers or not
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if _, err := os.Stat(p.adminSocket()); err == nil {
				return p
			}
			if time.Now().After(deadline) {
				t.Fatalf("no admin socket after 30 s:\n%s", p.srv.stderr.String())
			}
		}
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := c.State(context.Background()); err == nil {
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("the admin socket does not answer after 30 s:\n%s", p.srv.stderr.String())
		}
	}
}

func (p *adminPlugin) state(t *testing.T) admin.State {
	t.Helper()
	st, err := p.client.State(context.Background())
	if err != nil {
		t.Fatalf("State() err = %v", err)
	}
	return st
}

func (p *adminPlugin) keyring(t *testing.T) []byte {
	t.Helper()
	b, err := p.client.Keyring(context.Background())
	if err != nil {
		t.Fatalf("Keyring() err = %v", err)
	}
	return b
}

func held(st admin.State, id string) bool {
	return slices.ContainsFunc(st.Keys, func(k admin.Key) bool { return k.ID == id && k.Held })
}

// Two nodes on two swtpms, driven only through their admin sockets, as the operator's agents drive them: one
// joins the other's keyring, then both rotate together.
func TestAdminJoinAndRotate(t *testing.T) {
	ctx := context.Background()
	a := startAdminPlugin(t, true)
	b := startAdminPlugin(t, false)

	stA := a.state(t)
	if !stA.Joined || !stA.Healthy || stA.MemberID == "" || stA.ActiveKeyID == "" || len(stA.Identity) == 0 {
		t.Fatalf("State() of an initialised node = %+v", stA)
	}
	stB := b.state(t)
	if stB.Joined || stB.MemberID == "" || stB.MemberID == stA.MemberID {
		t.Fatalf("State() of a joining node = %+v, want not joined, with a member ID of its own", stB)
	}
	if _, err := b.client.Stage(ctx); !admin.IsCode(err, admin.CodeNotJoined) {
		t.Errorf("Stage() on a joining node err = %v, want code %s", err, admin.CodeNotJoined)
	}
	// Nothing listens on the KMS socket until the node joins: kube-apiserver sees no plugin rather than a wrong key.
	if _, err := os.Stat(b.s.socket()); err == nil {
		t.Error("a joining node serves KMS")
	}
	// It is alive (the kubelet leaves it be) and not ready, and says why.
	for path, want := range map[string]int{"/livez": http.StatusOK, "/readyz": http.StatusServiceUnavailable} {
		resp, err := http.Get("http://" + b.srv.httpAddr(t) + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want || (want != http.StatusOK && !strings.Contains(string(body), "joining")) {
			t.Errorf("GET %s on a joining node = %d %q, want %d", path, resp.StatusCode, body, want)
		}
	}

	member, err := a.client.Enroll(ctx, stB.Identity)
	if err != nil || member != stB.MemberID {
		t.Fatalf("Enroll() = %q, %v; want %s", member, err, stB.MemberID)
	}
	ring := a.keyring(t)
	if err := b.client.Adopt(ctx, ring, nil); !admin.IsCode(err, admin.CodeInvalid) {
		t.Errorf("Adopt() on a joining node with no trusted members err = %v, want code %s", err, admin.CodeInvalid)
	}
	if err := b.client.Adopt(ctx, ring, []string{"tpm-notthenodethatenrolledit"}); err == nil {
		t.Error("a joining node adopted a keyring whose endorser it was not told to trust")
	}
	if err := b.client.Adopt(ctx, ring, []string{stA.MemberID}); err != nil {
		t.Fatalf("Adopt() err = %v\n%s", err, b.srv.stderr.String())
	}
	if code, out, errOut := b.s.run(t, "status", "--listen", "unix://"+b.s.socket(), "--wait", "60s"); code != 0 {
		t.Fatalf("status after the join = %d, %q, %q", code, out, errOut)
	}
	stB = b.state(t)
	if !stB.Joined || stB.ActiveKeyID != stA.ActiveKeyID || !held(stB, stA.ActiveKeyID) {
		t.Fatalf("State() after the join = %+v, want joined on %s", stB, stA.ActiveKeyID)
	}
	if !slices.Contains(stB.Members, stA.MemberID) || !slices.Contains(stB.Members, stB.MemberID) {
		t.Errorf("members after the join = %v", stB.Members)
	}

	// A rotation across both: stage on a, b adopts and holds it, activate on a, b adopts it.
	oldKey := stA.ActiveKeyID
	encB := encryptOK(t, kmsClient(t, b.s.socket()), "written on b before the rotation")
	staged, err := a.client.Stage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.client.Adopt(ctx, a.keyring(t), nil); err != nil {
		t.Fatalf("Adopt(staged) err = %v", err)
	}
	if st := b.state(t); !held(st, staged) || st.ActiveKeyID != oldKey {
		t.Errorf("after adopting the staged key: %+v, want it held and %s still active", st.Keys, oldKey)
	}
	if err := a.client.Activate(ctx, staged); err != nil {
		t.Fatal(err)
	}
	if err := b.client.Adopt(ctx, a.keyring(t), nil); err != nil {
		t.Fatalf("Adopt(activated) err = %v", err)
	}
	clientB := kmsClient(t, b.s.socket())
	st, err := clientB.Status(ctx, &kmsapi.StatusRequest{})
	if err != nil || st.KeyId != staged {
		t.Fatalf("b's Status after the rotation = %v, %v; want key_id %s", st, err, staged)
	}
	encryptOK(t, clientB, "written on b after the rotation")
	if ad := b.state(t).Adoption; !ad.Adopted(staged) {
		t.Errorf("Adoption after Status and Encrypt under %s = %+v", staged, ad)
	}
	decryptOK(t, kmsClient(t, a.s.socket()), encB, "written on b before the rotation")

	// Forget the old key on both: a refuses the active one, then data under the old key is gone.
	if err := a.client.Forget(ctx, staged); !admin.IsCode(err, admin.CodeRefused) {
		t.Errorf("Forget(active key) err = %v, want code %s", err, admin.CodeRefused)
	}
	if err := b.client.Adopt(ctx, []byte(`{"format":"kleidi-keyring","version":3,"keys":[]}`), nil); !admin.IsCode(err, admin.CodeInvalid) {
		t.Errorf("Adopt(a keyring with no keys) err = %v, want code %s", err, admin.CodeInvalid)
	}
	for _, p := range []*adminPlugin{a, b} {
		if err := p.client.Forget(ctx, oldKey); err != nil {
			t.Fatalf("Forget(retired key) err = %v", err)
		}
	}
	if _, err := kmsClient(t, a.s.socket()).Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: encB.Ciphertext, KeyId: encB.KeyId, Annotations: encB.Annotations}); err == nil {
		t.Error("Decrypt under a forgotten key succeeded")
	}
	if err := b.client.Adopt(ctx, a.keyring(t), nil); err != nil {
		t.Errorf("Adopt() after both forgot the key err = %v", err)
	}
}

// The admin socket answers only the uids it is told to: root calling a plugin that allows uid 4321 only is refused
// before any request is read.
func TestAdminRefusesOtherUIDs(t *testing.T) {
	p := startAdminPlugin(t, true, "--admin-allowed-uids", "4321")
	if _, err := p.client.State(context.Background()); !admin.IsCode(err, admin.CodeUnavailable) {
		t.Errorf("State() from a uid not allowed err = %v, want the connection closed", err)
	}
	if fi, err := os.Stat(p.adminSocket()); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("admin socket mode = %v, %v; want 0600", fi.Mode().Perm(), err)
	}
}

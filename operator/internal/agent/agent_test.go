package agent

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/go-logr/logr"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/kleidi-kms/kleidi/admin"
	kleidiv1 "github.com/kleidi-kms/kleidi/operator/api/v1alpha1"
	"github.com/kleidi-kms/kleidi/operator/internal/cmdutil"
	"github.com/kleidi-kms/kleidi/operator/internal/controller"
	"github.com/kleidi-kms/kleidi/operator/internal/testenv"
)

var kleidiServer string

// TestMain builds the real plugin, examples/kleidi-server, and points envtest at the cached kube-apiserver.
func TestMain(m *testing.M) {
	if err := testenv.SetAssets(); err != nil {
		fmt.Fprintln(os.Stderr, "agent tests:", err)
		os.Exit(1)
	}
	ctrl.SetLogger(logr.Discard())
	dir, err := os.MkdirTemp("", "kleidi-agent-test")
	if err != nil {
		panic(err)
	}
	kleidiServer = filepath.Join(dir, "kleidi-server")
	_, file, _, _ := runtime.Caller(0)
	build := exec.Command("go", "build", "-o", kleidiServer, ".")
	build.Dir = filepath.Join(filepath.Dir(file), "..", "..", "..", "examples", "kleidi-server")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "agent tests: build kleidi-server: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// startPlugin initialises a keyring with the OpenPGP development key and serves it with an admin socket.
func startPlugin(t *testing.T) *admin.Client {
	t.Helper()
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	if out, err := exec.Command(kleidiServer, "init", "--state-dir", state).CombinedOutput(); err != nil {
		t.Fatalf("kleidi-server init: %v\n%s", err, out)
	}
	sock := "unix://" + filepath.Join(dir, "run", "admin.sock")
	cmd := exec.Command(kleidiServer, "serve", "--state-dir", state, "--listen", "unix://"+filepath.Join(dir, "run", "kms.sock"),
		"--admin-socket", sock, "--http-addr", "off")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		if t.Failed() {
			t.Logf("kleidi-server stderr:\n%s", stderr.String())
		}
	})
	c, err := admin.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := c.State(context.Background()); err == nil {
			return c
		} else if time.Now().After(deadline) {
			t.Fatalf("the admin socket does not answer after 30 s: %v\n%s", err, stderr.String())
		}
	}
}

func eventually(t *testing.T, what string, cond func(*kleidiv1.KleidiNode) string, c client.Client) *kleidiv1.KleidiNode {
	t.Helper()
	last := ""
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		var kn kleidiv1.KleidiNode
		if err := c.Get(context.Background(), client.ObjectKey{Name: "node-1"}, &kn); err != nil {
			t.Fatal(err)
		}
		if last = cond(&kn); last == "" {
			return &kn
		}
	}
	t.Fatalf("%s: not within 30 s: %s", what, last)
	return nil
}

func request(t *testing.T, c client.Client, req kleidiv1.NodeRequest) {
	t.Helper()
	var kn kleidiv1.KleidiNode
	if err := c.Get(context.Background(), client.ObjectKey{Name: "node-1"}, &kn); err != nil {
		t.Fatal(err)
	}
	orig := kn.DeepCopy()
	kn.Spec.Request = &req
	// A merge patch of the spec alone: the agent writes the status meanwhile, which an Update of the whole
	// object read before would conflict with.
	if err := c.Patch(context.Background(), &kn, client.MergeFrom(orig)); err != nil {
		t.Fatal(err)
	}
}

func opDone(id string) func(*kleidiv1.KleidiNode) string {
	return func(kn *kleidiv1.KleidiNode) string {
		if op := kn.Status.LastOperation; op == nil || op.ID != id {
			return fmt.Sprintf("lastOperation = %+v, want %s", kn.Status.LastOperation, id)
		}
		return ""
	}
}

// TestAgentDrivesARealPlugin runs the agent against a real kleidi-server over its admin socket: the agent
// reports the plugin's state and keyring, runs each request once, records refusals, and publishes the keyring
// digest right after each operation.
func TestAgentDrivesARealPlugin(t *testing.T) {
	cfg, c := testenv.Start(t)
	ctx := context.Background()
	plugin := startPlugin(t)
	if err := c.Create(ctx, &kleidiv1.KleidiNode{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}}); err != nil {
		t.Fatal(err)
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{Scheme: cmdutil.Scheme(), Metrics: metricsserver.Options{BindAddress: "0"}})
	if err != nil {
		t.Fatal(err)
	}
	a := &Agent{Client: mgr.GetClient(), Plugin: plugin, NodeName: "node-1", Log: logr.Discard()}
	if err := a.SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	mctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- mgr.Start(mctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("manager Start() err = %v", err)
		}
	})

	kn := eventually(t, "first report", func(kn *kleidiv1.KleidiNode) string {
		s := kn.Status
		if !s.Joined || !s.Healthy || s.ActiveKeyID == "" || len(s.Keyring) == 0 || s.HeartbeatTime == nil {
			return fmt.Sprintf("status joined=%v healthy=%v active=%q keyring=%d bytes heartbeat=%v message=%q",
				s.Joined, s.Healthy, s.ActiveKeyID, len(s.Keyring), s.HeartbeatTime, s.Message)
		}
		return ""
	}, c)
	if kn.Status.KeyringDigest != controller.Digest(kn.Status.Keyring) || kn.Status.Provider != "gpg" || len(kn.Status.Keys) != 1 {
		t.Errorf("status digest %s of %d-byte keyring, provider %q, %d keys; want the keyring's digest, gpg, 1 key",
			kn.Status.KeyringDigest, len(kn.Status.Keyring), kn.Status.Provider, len(kn.Status.Keys))
	}
	first := kn.Status.ActiveKeyID
	st, err := plugin.State(ctx)
	if err != nil || st.ActiveKeyID != first {
		t.Errorf("plugin State() = %q, %v; want the reported active key %s", st.ActiveKeyID, err, first)
	}

	// Stage: run once, with the digest of the keyring it published.
	request(t, c, kleidiv1.NodeRequest{ID: "s1", Type: kleidiv1.RequestStage})
	kn = eventually(t, "Stage", opDone("s1"), c)
	op := kn.Status.LastOperation
	if !op.Succeeded || op.KeyID == "" || op.KeyID == first {
		t.Fatalf("Stage outcome = %+v, want a new key", op)
	}
	eventually(t, "keyring after Stage", func(kn *kleidiv1.KleidiNode) string {
		if kn.Status.KeyringDigest != op.KeyringDigest {
			return fmt.Sprintf("keyring digest %s, want the one after Stage %s", kn.Status.KeyringDigest, op.KeyringDigest)
		}
		return ""
	}, c)
	staged := op.KeyID
	time.Sleep(2 * Interval) // more passes: the request must not run again
	if st, _ := plugin.State(ctx); len(st.Keys) != 2 {
		t.Fatalf("plugin keys after s1 and two more passes = %d, want 2 (Stage ran once)", len(st.Keys))
	}

	// Activate the staged key.
	request(t, c, kleidiv1.NodeRequest{ID: "a1", Type: kleidiv1.RequestActivate, KeyID: staged})
	eventually(t, "Activate", func(kn *kleidiv1.KleidiNode) string {
		if msg := opDone("a1")(kn); msg != "" {
			return msg
		}
		if !kn.Status.LastOperation.Succeeded || kn.Status.ActiveKeyID != staged {
			return fmt.Sprintf("outcome %+v, active key %s; want %s active", kn.Status.LastOperation, kn.Status.ActiveKeyID, staged)
		}
		return ""
	}, c)

	// A refused request is recorded, not retried, and changes nothing.
	request(t, c, kleidiv1.NodeRequest{ID: "bad", Type: kleidiv1.RequestActivate, KeyID: "kleidi-gpg-nosuchkey"})
	kn = eventually(t, "refused Activate", opDone("bad"), c)
	if op := kn.Status.LastOperation; op.Succeeded || op.Message == "" || kn.Status.ActiveKeyID != staged {
		t.Errorf("outcome %+v, active key %s; want a refusal with a message and %s still active", op, kn.Status.ActiveKeyID, staged)
	}

	// Forget the retired first key.
	request(t, c, kleidiv1.NodeRequest{ID: "f1", Type: kleidiv1.RequestForget, KeyID: first})
	kn = eventually(t, "Forget", func(kn *kleidiv1.KleidiNode) string {
		if msg := opDone("f1")(kn); msg != "" {
			return msg
		}
		if !kn.Status.LastOperation.Succeeded || len(kn.Status.Keys) != 1 {
			return fmt.Sprintf("outcome %+v, keys %+v; want only %s", kn.Status.LastOperation, kn.Status.Keys, staged)
		}
		return ""
	}, c)
	if kn.Status.Keys[0].ID != staged {
		t.Errorf("keys = %+v, want only %s", kn.Status.Keys, staged)
	}
}

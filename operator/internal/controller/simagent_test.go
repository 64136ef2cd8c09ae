package controller

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	kleidiv1 "github.com/kleidi-kms/kleidi/operator/api/v1alpha1"
)

// simRing is the keyring of a simulated plugin: the operator treats keyrings as opaque bytes, so any encoding
// serves to follow them.
type simRing struct {
	Keys    []kleidiv1.NodeKey `json:"keys"`
	Active  string             `json:"active"`
	Members []string           `json:"members"`
}

func (r simRing) bytes() []byte {
	b, err := json.Marshal(r)
	if err != nil {
		panic(err)
	}
	return b
}

// simAgent plays a node's agent and plugin: it writes its KleidiNode's status exactly as kleidi-agent does (it
// runs requests once, adopts the record, reports a heartbeat), so that the operator's side can be tested on its
// own. The agent itself is tested against a real plugin in package agent.
type simAgent struct {
	c      client.Client
	name   string
	member string

	mu      sync.Mutex
	joined  bool
	ring    simRing
	adopted string
	// adopts says whether the node's kube-apiserver takes up the active key.
	adopts   bool
	adoption *kleidiv1.Adoption
	lastOp   *kleidiv1.Operation
	// down stops the agent's reports.
	down  bool
	count int
}

func (s *simAgent) set(f func(*simAgent)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(s)
}

// run reports every 100 ms until the test ends.
func (s *simAgent) run(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			if err := s.step(ctx); err != nil && ctx.Err() == nil {
				t.Logf("simulated agent %s: %v", s.name, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
}

func (s *simAgent) step(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		return nil
	}
	var kn kleidiv1.KleidiNode
	if err := s.c.Get(ctx, client.ObjectKey{Name: s.name}, &kn); err != nil {
		return client.IgnoreNotFound(err)
	}
	var plugin kleidiv1.KleidiPlugin
	if err := s.c.Get(ctx, client.ObjectKey{Name: kleidiv1.PluginName}, &plugin); err != nil {
		return err
	}
	now := metav1.Now()
	if rec := plugin.Status.Keyring; len(rec) > 0 && kn.Spec.ApprovedMemberID == s.member && Digest(rec) != s.adopted {
		var r simRing
		if err := json.Unmarshal(rec, &r); err != nil {
			return err
		}
		s.ring, s.joined, s.adopted = r, true, Digest(rec)
	}
	if req := kn.Spec.Request; req != nil && (s.lastOp == nil || s.lastOp.ID != req.ID) {
		op := &kleidiv1.Operation{ID: req.ID, Type: req.Type, KeyID: req.KeyID, Succeeded: true, Time: now}
		switch req.Type {
		case kleidiv1.RequestStage:
			s.count++
			op.KeyID = fmt.Sprintf("kleidi-gpg-%s-%d", s.name, s.count)
			s.ring.Keys = append(s.ring.Keys, kleidiv1.NodeKey{ID: op.KeyID, State: "staged", Held: true, Created: &now})
		case kleidiv1.RequestActivate:
			for i := range s.ring.Keys {
				switch s.ring.Keys[i].ID {
				case req.KeyID:
					s.ring.Keys[i].State = "active"
				case s.ring.Active:
					s.ring.Keys[i].State = "retired"
				}
			}
			s.ring.Active = req.KeyID
		case kleidiv1.RequestForget:
			s.ring.Keys = slices.DeleteFunc(s.ring.Keys, func(k kleidiv1.NodeKey) bool { return k.ID == req.KeyID })
		case kleidiv1.RequestUnenroll: // the member goes, and the keyring rotates at once to a key it never held
			s.ring.Members = slices.DeleteFunc(s.ring.Members, func(m string) bool { return m == req.MemberID })
			s.count++
			op.KeyID = fmt.Sprintf("kleidi-gpg-%s-%d", s.name, s.count)
			for i := range s.ring.Keys {
				if s.ring.Keys[i].ID == s.ring.Active {
					s.ring.Keys[i].State = "retired"
				}
			}
			s.ring.Keys = append(s.ring.Keys, kleidiv1.NodeKey{ID: op.KeyID, State: "active", Held: true, Created: &now})
			s.ring.Active = op.KeyID
		case kleidiv1.RequestEnroll:
			var other kleidiv1.KleidiNode
			if err := s.c.Get(ctx, client.ObjectKey{Name: req.Node}, &other); err != nil {
				return err
			}
			op.MemberID = other.Spec.ApprovedMemberID
			s.ring.Members = append(s.ring.Members, op.MemberID)
		}
		op.KeyringDigest = Digest(s.ring.bytes())
		s.lastOp = op
	}
	if s.adopts && s.joined && (s.adoption == nil || s.adoption.KeyID != s.ring.Active) {
		s.adoption = &kleidiv1.Adoption{KeyID: s.ring.Active, StatusAt: &now, EncryptAt: &now}
	}
	orig := kn.DeepCopy()
	kn.Status = kleidiv1.KleidiNodeStatus{
		MemberID: s.member, Identity: []byte("identity of " + s.member), Provider: "gpg",
		Joined: s.joined, Healthy: true, AdoptedDigest: s.adopted, Adoption: s.adoption,
		LastOperation: s.lastOp, HeartbeatTime: &now,
	}
	if s.joined {
		kn.Status.ActiveKeyID, kn.Status.Keys, kn.Status.Members = s.ring.Active, s.ring.Keys, s.ring.Members
		kn.Status.Keyring = s.ring.bytes()
		kn.Status.KeyringDigest = Digest(kn.Status.Keyring)
	}
	return s.c.Status().Patch(ctx, &kn, client.MergeFrom(orig))
}

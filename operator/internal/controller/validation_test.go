package controller

import (
	"context"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	kleidiv1 "github.com/kleidi-kms/kleidi/operator/api/v1alpha1"
)

// TestCRDValidation proves that the apiserver, through the CRDs' CEL rules and schemas, refuses what the API
// forbids and fills in the defaults.
func TestCRDValidation(t *testing.T) {
	_, c := startAPI(t)
	ctx := context.Background()

	plugin := &kleidiv1.KleidiPlugin{ObjectMeta: metav1.ObjectMeta{Name: "kleidi"}, Spec: kleidiv1.KleidiPluginSpec{Provider: "gpg"}}
	if err := c.Create(ctx, plugin); err != nil {
		t.Fatalf("Create(KleidiPlugin kleidi) err = %v, want nil", err)
	}
	if got := plugin.Spec.Rotation.MaxKeyAge; got == nil || got.Duration.String() != "2160h0m0s" {
		t.Errorf("defaulted maxKeyAge = %v, want 2160h", got)
	}
	if got := plugin.Spec.Rotation.RetiredKeyRetention; got == nil || got.Duration.String() != "720h0m0s" {
		t.Errorf("defaulted retiredKeyRetention = %v, want 720h", got)
	}
	if len(plugin.Spec.Resources) != 1 || plugin.Spec.Resources[0].Resource != "secrets" {
		t.Errorf("defaulted resources = %v, want [secrets]", plugin.Spec.Resources)
	}
	if _, ok := plugin.Spec.NodeSelector["node-role.kubernetes.io/control-plane"]; !ok || len(plugin.Spec.NodeSelector) != 1 {
		t.Errorf("defaulted nodeSelector = %v, want the control-plane role", plugin.Spec.NodeSelector)
	}
	if plugin.Spec.Enrollment.Approval != kleidiv1.ApprovalManual {
		t.Errorf("defaulted approval = %q, want Manual", plugin.Spec.Enrollment.Approval)
	}

	refused := []struct {
		name string
		obj  func() error
		want string
	}{
		{"a second KleidiPlugin", func() error {
			return c.Create(ctx, &kleidiv1.KleidiPlugin{ObjectMeta: metav1.ObjectMeta{Name: "other"}, Spec: kleidiv1.KleidiPluginSpec{Provider: "gpg"}})
		}, "a cluster has one KleidiPlugin, named kleidi"},
		{"Automatic approval without CAs", func() error {
			p := plugin.DeepCopy()
			p.Spec.Enrollment.Approval = kleidiv1.ApprovalAutomatic
			return c.Update(ctx, p)
		}, "approval Automatic needs ekCACertificates"},
		{"an unknown provider", func() error {
			p := plugin.DeepCopy()
			p.Spec.Provider = "rot13"
			return c.Update(ctx, p)
		}, "spec.provider"},
		{"maxKeyAge under an hour", func() error {
			p := plugin.DeepCopy()
			p.Spec.Rotation.MaxKeyAge = &metav1.Duration{Duration: 1e9}
			return c.Update(ctx, p)
		}, "maxKeyAge must be at least 1h"},
		{"an Activate request without a key", func() error {
			return c.Create(ctx, &kleidiv1.KleidiNode{ObjectMeta: metav1.ObjectMeta{Name: "n1"},
				Spec: kleidiv1.KleidiNodeSpec{Request: &kleidiv1.NodeRequest{ID: "x", Type: kleidiv1.RequestActivate}}})
		}, "Activate and Forget need keyID"},
	}
	for _, tc := range refused {
		err := tc.obj()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want an error containing %q", tc.name, err, tc.want)
		}
	}

	// Automatic approval with CAs is accepted.
	p := plugin.DeepCopy()
	p.Spec.Enrollment = kleidiv1.EnrollmentPolicy{Approval: kleidiv1.ApprovalAutomatic, EKCACertificates: "-----BEGIN CERTIFICATE-----\n"}
	if err := c.Update(ctx, p); err != nil {
		t.Errorf("Update(Automatic with ekCACertificates) err = %v, want nil", err)
	}

	// A rotation's reason cannot change, appear or disappear.
	rot := &kleidiv1.KeyRotation{ObjectMeta: metav1.ObjectMeta{Name: "r1"}, Spec: kleidiv1.KeyRotationSpec{Reason: "audit"}}
	if err := c.Create(ctx, rot); err != nil {
		t.Fatalf("Create(KeyRotation) err = %v, want nil", err)
	}
	for _, reason := range []string{"something else", ""} {
		r := rot.DeepCopy()
		r.Spec.Reason = reason
		if err := c.Update(ctx, r); err == nil || !strings.Contains(err.Error(), "reason is immutable") {
			t.Errorf("Update(KeyRotation reason %q) err = %v, want reason is immutable", reason, err)
		}
	}
	bare := &kleidiv1.KeyRotation{ObjectMeta: metav1.ObjectMeta{Name: "r2"}}
	if err := c.Create(ctx, bare); err != nil {
		t.Fatalf("Create(KeyRotation without reason) err = %v, want nil", err)
	}
	bare.Spec.Reason = "added later"
	if err := c.Update(ctx, bare); err == nil || !strings.Contains(err.Error(), "reason is immutable") {
		t.Errorf("Update(KeyRotation adding a reason) err = %v, want reason is immutable", err)
	}
}

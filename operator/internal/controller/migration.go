package controller

import (
	"context"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	svmv1 "k8s.io/api/storagemigration/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	kleidiv1 "github.com/kleidi-kms/kleidi/operator/api/v1alpha1"
)

// NudgeSecret is the Secret in the operator's namespace that the operator rewrites when a migration has not
// started: on some etcd versions the migrator waits for a write to the resource before it begins.
const NudgeSecret = "kleidi-migration-nudge"

// Migration phases, read from a StorageVersionMigration's conditions.
const (
	migrationPending   = "Pending"
	migrationRunning   = "Running"
	migrationSucceeded = "Succeeded"
	migrationFailed    = "Failed"
)

// migrationName names the StorageVersionMigration of a rotation and resource.
func migrationName(rot *kleidiv1.KeyRotation, gr kleidiv1.GroupResource) string {
	name := rot.Name + "-" + strings.ToLower(gr.String())
	if len(name) > 253 {
		name = name[:242] + "-" + shortHash(name)
	}
	return name
}

func migrationPhase(m *svmv1.StorageVersionMigration) string {
	switch {
	case meta.IsStatusConditionTrue(m.Status.Conditions, string(svmv1.MigrationSucceeded)):
		return migrationSucceeded
	case meta.IsStatusConditionTrue(m.Status.Conditions, string(svmv1.MigrationFailed)):
		return migrationFailed
	case meta.IsStatusConditionTrue(m.Status.Conditions, string(svmv1.MigrationRunning)):
		return migrationRunning
	}
	return migrationPending
}

// migrate (Migrating) creates one StorageVersionMigration, owned by the rotation, per encrypted resource, nudges
// those that do not start, and moves on when all succeeded.
func (r *Reconciler) migrate(ctx context.Context, plugin *kleidiv1.KleidiPlugin, rot *kleidiv1.KeyRotation) (time.Duration, error) {
	var migrations []kleidiv1.Migration
	var waiting, failed []string
	nudge := false
	for _, gr := range plugin.Spec.Resources {
		m := &svmv1.StorageVersionMigration{}
		name := migrationName(rot, gr)
		err := r.Client.Get(ctx, client.ObjectKey{Name: name}, m)
		if apierrors.IsNotFound(err) {
			m = &svmv1.StorageVersionMigration{
				ObjectMeta: metav1.ObjectMeta{Name: name},
				Spec:       svmv1.StorageVersionMigrationSpec{Resource: metav1.GroupResource{Group: gr.Group, Resource: gr.Resource}},
			}
			if err := controllerutil.SetControllerReference(rot, m, r.Client.Scheme()); err != nil {
				return 0, err
			}
			if err := r.Client.Create(ctx, m); err != nil && !apierrors.IsAlreadyExists(err) {
				return 0, fmt.Errorf("create StorageVersionMigration %s: %w", name, err)
			}
			r.Recorder.Eventf(rot, nil, corev1.EventTypeNormal, "MigrationCreated", "Migrate",
				"StorageVersionMigration %s rewrites %s under key %s", name, gr, rot.Status.KeyID)
			m.CreationTimestamp = metav1.Time{Time: r.now()}
		} else if err != nil {
			return 0, fmt.Errorf("get StorageVersionMigration %s: %w", name, err)
		}
		phase := migrationPhase(m)
		migrations = append(migrations, kleidiv1.Migration{Resource: gr.String(), Name: name, Phase: phase})
		switch phase {
		case migrationFailed:
			failed = append(failed, name)
		case migrationPending, migrationRunning:
			// The migrator may report Running yet wait for its caches to see a write of the resource (etcd 3.4
			// sends no progress notifications): a migration not done after NudgeAfter gets a write.
			if r.now().Sub(m.CreationTimestamp.Time) > orDefault(r.NudgeAfter, DefaultNudgeAfter) {
				nudge = true
			}
			waiting = append(waiting, name)
		}
	}
	rot.Status.Migrations = migrations
	if len(failed) > 0 {
		r.finish(rot, kleidiv1.PhaseFailed, kleidiv1.ReasonMigrationFailed,
			"StorageVersionMigration failed: "+strings.Join(failed, ", ")+"; see its conditions, then create a new KeyRotation")
		return 0, nil
	}
	if len(waiting) > 0 {
		if nudge {
			if err := r.nudge(ctx); err != nil {
				return 0, err
			}
		}
		r.progress(rot, "waiting for StorageVersionMigrations: "+strings.Join(waiting, ", "))
		return orDefault(r.NudgeAfter, DefaultNudgeAfter), nil
	}
	rot.Status.MigratedAt = &metav1.Time{Time: r.now()}
	rot.Status.Phase = kleidiv1.PhaseVerifying
	r.progress(rot, "verifying that every node still has key "+rot.Status.KeyID+" active")
	return 0, nil
}

// nudge writes the nudge Secret, so that a migrator waiting for a write to start sees one.
func (r *Reconciler) nudge(ctx context.Context) error {
	if r.Namespace == "" {
		return nil
	}
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: NudgeSecret, Namespace: r.Namespace}}
	_, err := controllerutil.CreateOrUpdate(ctx, r.Client, s, func() error {
		if s.Annotations == nil {
			s.Annotations = map[string]string{}
		}
		s.Annotations["kleidi.dev/nudged-at"] = r.now().UTC().Format(time.RFC3339Nano)
		return nil
	})
	if err != nil {
		return fmt.Errorf("nudge: write Secret %s/%s: %w", r.Namespace, NudgeSecret, err)
	}
	return nil
}

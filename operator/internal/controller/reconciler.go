package controller

import (
	"context"
	"fmt"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	svmv1 "k8s.io/api/storagemigration/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	kleidiv1 "github.com/kleidi-kms/kleidi/operator/api/v1alpha1"
)

// Defaults of [Reconciler]'s settings.
const (
	DefaultHeartbeatTimeout = 30 * time.Second
	DefaultResync           = 10 * time.Second
	DefaultNudgeAfter       = 30 * time.Second
)

// Reconciler is the kleidi operator. Its zero settings take the defaults above.
type Reconciler struct {
	Client   client.Client
	Recorder events.EventRecorder
	// Namespace is the operator's namespace: it holds the migration nudge Secret.
	Namespace string
	// HeartbeatTimeout is how old an agent's heartbeat may be before its node counts as unavailable.
	HeartbeatTimeout time.Duration
	// Resync is how often the operator looks again without an event.
	Resync time.Duration
	// NudgeAfter is how long a migration may stay unstarted before the operator writes the nudge Secret.
	NudgeAfter time.Duration
	// Now returns the time; tests leave it nil.
	Now func() time.Time
}

func (r *Reconciler) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// SetupWithManager registers the reconciler: every watched kind maps to the one KleidiPlugin.
func (r *Reconciler) SetupWithManager(mgr ctrl.Manager) error {
	all := handler.EnqueueRequestsFromMapFunc(func(context.Context, client.Object) []reconcile.Request {
		return []reconcile.Request{{NamespacedName: types.NamespacedName{Name: kleidiv1.PluginName}}}
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("kleidi").
		For(&kleidiv1.KleidiPlugin{}).
		Watches(&kleidiv1.KleidiNode{}, all).
		Watches(&kleidiv1.KeyRotation{}, all).
		Watches(&corev1.Node{}, all).
		Watches(&svmv1.StorageVersionMigration{}, all).
		Complete(r)
}

// The operator's cluster role (config/rbac/role.yaml). It also needs, in its own namespace only, get, create and
// update on Secrets (the migration nudge) and the leader election Lease: a Role of the deployment.
//
// +kubebuilder:rbac:groups=kleidi.dev,resources=kleidiplugins;kleidinodes;keyrotations,verbs=get;list;watch;create;update;patch
// +kubebuilder:rbac:groups=kleidi.dev,resources=kleidiplugins/status;keyrotations/status,verbs=get;update;patch
// +kubebuilder:rbac:groups="",resources=nodes,verbs=get;list;watch
// +kubebuilder:rbac:groups=coordination.k8s.io,resources=leases,verbs=get;list;watch,namespace=kube-system
// +kubebuilder:rbac:groups=storagemigration.k8s.io,resources=storageversionmigrations,verbs=get;list;watch;create
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch

// Reconcile runs one pass over the cluster's kleidi state.
func (r *Reconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	if req.Name != kleidiv1.PluginName {
		return ctrl.Result{}, nil
	}
	var plugin kleidiv1.KleidiPlugin
	if err := r.Client.Get(ctx, req.NamespacedName, &plugin); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	before := plugin.Status.DeepCopy()

	nodes, err := r.syncNodes(ctx, &plugin)
	if err != nil {
		return ctrl.Result{}, err
	}
	if err := r.approve(ctx, &plugin, nodes); err != nil {
		return ctrl.Result{}, err
	}
	st := r.observe(&plugin, nodes)
	r.verifyRecord(&plugin, st)
	r.bootstrap(ctx, &plugin, st)

	requeue := orDefault(r.Resync, DefaultResync)
	rotating, after, err := r.rotate(ctx, &plugin, st)
	if err != nil {
		return ctrl.Result{}, err
	}
	if after > 0 && after < requeue {
		requeue = after
	}
	if !rotating {
		if err := r.unenroll(ctx, &plugin, st); err != nil {
			return ctrl.Result{}, err
		}
		if err := r.enroll(ctx, &plugin, st); err != nil {
			return ctrl.Result{}, err
		}
		if err := r.schedule(ctx, &plugin, st); err != nil {
			return ctrl.Result{}, err
		}
	}

	st = r.observe(&plugin, nodes)
	r.setPluginStatus(&plugin, st)
	r.recordNodeMetrics(st)
	if !equality.Semantic.DeepEqual(before, &plugin.Status) {
		if err := r.Client.Status().Update(ctx, &plugin); err != nil {
			if apierrors.IsConflict(err) {
				return ctrl.Result{RequeueAfter: time.Second}, nil
			}
			return ctrl.Result{}, fmt.Errorf("update KleidiPlugin status: %w", err)
		}
	}
	return ctrl.Result{RequeueAfter: requeue}, nil
}

// liveAPIServers counts the kube-apiserver identity Leases in kube-system that have not expired.
func (r *Reconciler) liveAPIServers(ctx context.Context) (int, error) {
	var leases coordinationv1.LeaseList
	if err := r.Client.List(ctx, &leases, client.InNamespace("kube-system"),
		client.MatchingLabels{"apiserver.kubernetes.io/identity": "kube-apiserver"}); err != nil {
		return 0, fmt.Errorf("list apiserver identity leases: %w", err)
	}
	n := 0
	for _, l := range leases.Items {
		if l.Spec.RenewTime == nil || l.Spec.LeaseDurationSeconds == nil {
			continue
		}
		if l.Spec.RenewTime.Add(time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second).After(r.now()) {
			n++
		}
	}
	return n, nil
}

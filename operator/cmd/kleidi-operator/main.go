// Command kleidi-operator runs the kleidi operator: it keeps a KleidiNode for every control-plane node, the
// keyring of record, enrollment and KeyRotations (see package internal/controller). Run one Deployment with
// leader election; it needs a kubeconfig (--kubeconfig, $KUBECONFIG, or the in-cluster service account).
package main

import (
	"flag"
	"fmt"
	"os"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/kleidi-kms/kleidi/operator/internal/cmdutil"
	"github.com/kleidi-kms/kleidi/operator/internal/controller"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kleidi-operator:", err)
		os.Exit(1)
	}
}

func run() error {
	// --kubeconfig is registered by controller-runtime's config package.
	metricsAddr := flag.String("metrics-bind-address", ":8080", "`address` of the Prometheus metrics endpoint; 0 turns it off")
	probeAddr := flag.String("health-probe-bind-address", ":8081", "`address` of /healthz and /readyz")
	leaderElect := flag.Bool("leader-elect", true, "take the leader election Lease in --namespace before reconciling")
	namespace := flag.String("namespace", os.Getenv("POD_NAMESPACE"), "the operator's `namespace` (leader election Lease, migration nudge Secret); default $POD_NAMESPACE")
	heartbeat := flag.Duration("heartbeat-timeout", controller.DefaultHeartbeatTimeout, "how old an agent's report may be before its node counts as unavailable")
	logLevel := flag.String("log-level", "info", "debug, info, warn or error")
	version := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *version {
		fmt.Println(cmdutil.VersionString("kleidi-operator"))
		return nil
	}
	log, err := cmdutil.Logger(*logLevel)
	if err != nil {
		return err
	}
	ctrl.SetLogger(log)
	if *leaderElect && *namespace == "" {
		return fmt.Errorf("--leader-elect needs --namespace (or $POD_NAMESPACE)")
	}
	cfg, err := ctrl.GetConfig()
	if err != nil {
		return err
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                  cmdutil.Scheme(),
		Metrics:                 metricsserver.Options{BindAddress: *metricsAddr},
		HealthProbeBindAddress:  *probeAddr,
		LeaderElection:          *leaderElect,
		LeaderElectionID:        "kleidi-operator",
		LeaderElectionNamespace: *namespace,
		// The nudge Secret is read directly: the operator never watches Secrets.
		Client: client.Options{Cache: &client.CacheOptions{DisableFor: []client.Object{&corev1.Secret{}}}},
		// Of the Leases, only the kube-apiserver identity Leases in kube-system are watched.
		Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{&coordinationv1.Lease{}: {
			Namespaces: map[string]cache.Config{"kube-system": {}},
			Label:      labels.SelectorFromSet(labels.Set{"apiserver.kubernetes.io/identity": "kube-apiserver"}),
		}}},
	})
	if err != nil {
		return err
	}
	r := &controller.Reconciler{
		Client:           mgr.GetClient(),
		Recorder:         mgr.GetEventRecorder("kleidi-operator"),
		Namespace:        *namespace,
		HeartbeatTimeout: *heartbeat,
		Resync:           10 * time.Second,
	}
	if err := r.SetupWithManager(mgr); err != nil {
		return err
	}
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		return err
	}
	if err := mgr.AddReadyzCheck("readyz", healthz.Ping); err != nil {
		return err
	}
	log.Info("starting", "version", cmdutil.VersionString("kleidi-operator"), "namespace", *namespace)
	return mgr.Start(ctrl.SetupSignalHandler())
}

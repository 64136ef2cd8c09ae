package controller

import (
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/apimachinery/pkg/api/meta"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	kleidiv1 "github.com/kleidi-kms/kleidi/operator/api/v1alpha1"
)

// The operator's metrics, on controller-runtime's registry (served on the manager's metrics address).
var (
	rotationPhase = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "kleidi_operator_rotation_phase",
		Help: "1 for the phase each KeyRotation is in, 0 for the others.",
	}, []string{"rotation", "phase"})
	rotationBlocked = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "kleidi_operator_rotation_blocked",
		Help: "1 while the running KeyRotation is Blocked.",
	})
	nodesByState = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "kleidi_operator_nodes",
		Help: "Selected control-plane nodes by state: total, approved, enrolled, healthy, in_sync.",
	}, []string{"state"})
	nodeInSync = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "kleidi_operator_node_in_sync",
		Help: "1 when the node is healthy and adopted the keyring of record, 0 otherwise.",
	}, []string{"node"})
)

func init() {
	metrics.Registry.MustRegister(rotationPhase, rotationBlocked, nodesByState, nodeInSync)
}

func recordRotationMetrics(rot *kleidiv1.KeyRotation) {
	for _, p := range kleidiv1.Phases {
		v := 0.0
		if rot.Status.Phase == p {
			v = 1
		}
		rotationPhase.WithLabelValues(rot.Name, string(p)).Set(v)
	}
	if !rot.Status.Phase.Done() && rot.Status.Phase != kleidiv1.PhasePending ||
		meta.IsStatusConditionTrue(rot.Status.Conditions, kleidiv1.ConditionBlocked) {
		v := 0.0
		if meta.IsStatusConditionTrue(rot.Status.Conditions, kleidiv1.ConditionBlocked) {
			v = 1
		}
		rotationBlocked.Set(v)
	}
}

func (r *Reconciler) recordNodeMetrics(st *state) {
	nodesByState.WithLabelValues("total").Set(float64(st.counts.Total))
	nodesByState.WithLabelValues("approved").Set(float64(st.counts.Approved))
	nodesByState.WithLabelValues("enrolled").Set(float64(st.counts.Enrolled))
	nodesByState.WithLabelValues("healthy").Set(float64(st.counts.Healthy))
	nodesByState.WithLabelValues("in_sync").Set(float64(st.counts.InSync))
	nodeInSync.Reset()
	out := map[string]bool{}
	for _, n := range st.outOfSync {
		out[n] = true
	}
	for _, kn := range st.members {
		ok, _ := r.available(kn, st.now)
		v := 0.0
		if ok && !out[kn.Name] {
			v = 1
		}
		nodeInSync.WithLabelValues(kn.Name).Set(v)
	}
}

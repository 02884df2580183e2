package agent

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/podsock/podsock/kubesource"
	"github.com/podsock/podsock/service"
)

// agentMetrics are the agent's own series, in the registry the service sources register
// theirs in too.
type agentMetrics struct {
	registry *prometheus.Registry
	// sync is podsock_sync_duration_seconds, shared with the Kubernetes source.
	sync *prometheus.HistogramVec
	// leftOut counts, per source, the services of the last apply that the merge left out
	// (a frontend another source claimed first, [limits] reached, invalid).
	leftOut *prometheus.GaugeVec
}

func newAgentMetrics() *agentMetrics {
	m := &agentMetrics{
		registry: prometheus.NewRegistry(),
		sync:     kubesource.NewSyncDurationHistogram(),
		leftOut: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "podsock_services_left_out",
			Help: "Services of the last apply left out, by source: a frontend claimed first by another source, [limits] reached, or not servable.",
		}, []string{"source"}),
	}
	m.registry.MustRegister(m.sync, m.leftOut)
	return m
}

// observeConflicts sets podsock_services_left_out from an apply's conflicts; sources
// with none read 0 rather than keep an old count.
func (m *agentMetrics) observeConflicts(conflicts []service.Conflict) {
	n := map[service.Source]int{service.SourceFile: 0, service.SourceKubernetes: 0}
	for _, c := range conflicts {
		n[c.Dropped.Source]++
	}
	for src, v := range n {
		m.leftOut.WithLabelValues(string(src)).Set(float64(v))
	}
}

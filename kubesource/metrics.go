package kubesource

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// NewSyncDurationHistogram is podsock_sync_duration_seconds, one series per service
// source. The agent observes the file's syncs in the same histogram: whichever of it and
// the Source registers it first, the other finds it registered and uses that one, which
// works only if both made it here.
func NewSyncDurationHistogram() *prometheus.HistogramVec {
	return prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "podsock_sync_duration_seconds",
		Help:    "Time one snapshot of a service source took to translate and apply, by source.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 18), // 0.5 ms to 65 s
	}, []string{"source"})
}

type metrics struct {
	// programming is kube-proxy's network programming latency: from an EndpointSlice's
	// last-change-trigger-time to the apply of the snapshot that carried the change.
	programming prometheus.Histogram
	sync        prometheus.Observer
	skipped     prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		programming: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "podsock_network_programming_duration_seconds",
			Help: "Time from an EndpointSlice change (its endpoints.kubernetes.io/last-change-trigger-time) " +
				"to the apply of the snapshot that carried it, for changes seen after the first sync.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 18), // 1 ms to 131 s
		}),
		skipped: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "podsock_kubernetes_skipped_service_ports",
			Help: "Kubernetes service ports, or frontends of one, left out of the last snapshot (SCTP, or an object podsock cannot serve).",
		}),
	}
	syncVec := NewSyncDurationHistogram()
	if reg != nil {
		var err error
		if syncVec, err = registerShared(reg, syncVec); err != nil {
			return nil, fmt.Errorf("register metrics: %w", err)
		}
	}
	m.sync = syncVec.WithLabelValues(string(sourceName))
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.programming, m.skipped} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register metrics: %w", err)
		}
	}
	return m, nil
}

// registerShared registers vec, or returns the one of the same definition registered
// before it.
func registerShared(reg prometheus.Registerer, vec *prometheus.HistogramVec) (*prometheus.HistogramVec, error) {
	err := reg.Register(vec)
	var already prometheus.AlreadyRegisteredError
	if errors.As(err, &already) {
		if existing, ok := already.ExistingCollector.(*prometheus.HistogramVec); ok {
			return existing, nil
		}
	}
	return vec, err
}

package agent

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/kubesource"
	"github.com/podsock/podsock/service"
)

// Version is the build's version, as `podsock version` prints it; main sets it, and
// podsock_build_info and status carry it.
var Version = "dev"

// agentMetrics are the agent's own series, in the registry the service sources register
// theirs in too.
type agentMetrics struct {
	registry *prometheus.Registry
	// sync is podsock_sync_duration_seconds, shared with the Kubernetes source.
	sync *prometheus.HistogramVec
	// leftOut counts, per source, the services of the last apply that the merge left out
	// (a frontend another source claimed first, [limits] reached, invalid).
	leftOut    *prometheus.GaugeVec
	nriEvent   *prometheus.HistogramVec
	terminated *prometheus.CounterVec
	termPass   prometheus.Histogram
	reloads    *prometheus.CounterVec
}

func newAgentMetrics() *agentMetrics {
	m := &agentMetrics{
		registry: prometheus.NewRegistry(),
		sync:     kubesource.NewSyncDurationHistogram(),
		leftOut: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "podsock_services_left_out",
			Help: "Services of the last apply left out, by source: a frontend claimed first by another source, [limits] reached, or not servable.",
		}, []string{"source"}),
		nriEvent: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "podsock_nri_event_duration_seconds",
			Help: "Time spent in podsock's NRI handlers per event, which the runtime waits for.",
			// Pod events take about 0.1-1 ms; the handler budget is 250 ms.
			Buckets: []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2},
		}, []string{"event"}),
		terminated: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "podsock_terminated_sockets_total",
			Help: "Sockets to removed backends destroyed, by protocol (tcp, and connected udp).",
		}, []string{"proto"}),
		termPass: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "podsock_termination_pass_duration_seconds",
			Help: "Time of each pass that destroys the sockets of removed backends.",
			// One netns costs about 0.5-50 ms, a walk of every netns seconds.
			Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 10),
		}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "podsock_config_reloads_total",
			Help: "Config reloads (SIGHUP), by result: ok, or failed (rejected or not fully applied; the running config stays).",
		}, []string{"result"}),
	}
	// Both results exist from the start, so a rate over them needs no absent() dance.
	m.reloads.WithLabelValues("ok")
	m.reloads.WithLabelValues("failed")
	for _, p := range []uint8{datapath.ProtoTCP, datapath.ProtoUDP} {
		m.terminated.WithLabelValues(datapath.ProtoName(p))
	}
	buildInfo := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "podsock_build_info",
		Help: "Always 1; the version label is the build's.",
	}, []string{"version"})
	buildInfo.WithLabelValues(Version).Set(1)
	m.registry.MustRegister(m.sync, m.leftOut, m.nriEvent, m.terminated, m.termPass, m.reloads, buildInfo,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
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

func (m *agentMetrics) observeNRIEvent(event string, d time.Duration) {
	m.nriEvent.WithLabelValues(event).Observe(d.Seconds())
}

func (m *agentMetrics) observeTermination(destroyed map[uint8]int, d time.Duration) {
	for p, n := range destroyed {
		m.terminated.WithLabelValues(datapath.ProtoName(p)).Add(float64(n))
	}
	m.termPass.Observe(d.Seconds())
}

func (m *agentMetrics) observeReload(ok bool) {
	if ok {
		m.reloads.WithLabelValues("ok").Inc()
	} else {
		m.reloads.WithLabelValues("failed").Inc()
	}
}

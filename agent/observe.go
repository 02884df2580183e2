package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/podsock/podsock/datapath"
)

// snapshotInterval is how often the map entries are read for /metrics. Counting a map's
// entries walks it with one syscall per key (about a second at 100,000 services), so a
// scrape never does it: it reports the latest snapshot, at most this old, and after an
// apply at most the time it takes to read them again.
const snapshotInterval = 10 * time.Second

// snapshot is what /metrics reports of the datapath's contents.
type snapshot struct {
	services, backends int
	maps               []datapath.MapStat
}

// observer serves [metrics] listen: /metrics from the agent's registry, /healthz and
// /readyz. It holds no lock an apply holds while it answers: the datapath's counters are
// read under the lock that only guards their handles against a close.
type observer struct {
	a   *Agent
	ln  net.Listener
	srv *http.Server

	snap    atomic.Pointer[snapshot]
	refresh chan struct{}
	stop    chan struct{}
	done    chan struct{}
}

// readiness is what /readyz waits for besides the first config applied in full (the
// generation): the runtime's and the Kubernetes source's first view of the node applied.
type readiness struct {
	podsSynced atomic.Bool // NRI's first Synchronize applied to the datapath
	kubeSynced atomic.Bool // the Kubernetes source's first synced snapshot applied
}

// listenMetrics binds [metrics] listen before the datapath is touched: a port already
// taken stops the agent with one line and changes nothing. nil when metrics are off.
func listenMetrics(addr string) (net.Listener, error) {
	if addr == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listen %s: %w", addr, err)
	}
	return ln, nil
}

// serveMetrics starts answering on ln once the datapath is attached.
func (a *Agent) serveMetrics(ln net.Listener) {
	if ln == nil {
		return
	}
	o := &observer{a: a, ln: ln, refresh: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	o.snap.Store(&snapshot{})
	a.metrics.registry.MustRegister(newDatapathCollector(a, o))
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.metrics.registry, promhttp.HandlerOpts{
		ErrorHandling: promhttp.ContinueOnError,
		// A scraper that hangs must not pile up goroutines reading the datapath.
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { answer(w, a.health()) })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) { answer(w, a.readiness()) })
	o.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go o.refreshLoop()
	go func() {
		if err := o.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.WithError(err).Error("metrics endpoint stopped")
		}
	}()
	a.obs = o
	a.log.WithField("listen", ln.Addr().String()).Info("serving /metrics, /healthz and /readyz")
}

// answer writes 200 "ok", or 503 and the reason.
func answer(w http.ResponseWriter, err error) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, err)
		return
	}
	fmt.Fprintln(w, "ok")
}

// health is nil while the datapath is attached and its pins are this agent's.
func (a *Agent) health() error {
	dp := a.dp
	if dp == nil {
		return errors.New("datapath not loaded")
	}
	if !dp.Attached() {
		return errors.New("datapath not attached to " + a.cgroupRoot)
	}
	if err := dp.PinsOwned(); err != nil {
		return fmt.Errorf("pins not this agent's: %w", err)
	}
	return nil
}

// readiness is nil once the node's state is applied: the first config in full (a config
// that fails to apply keeps the agent unready until a reload applies), with NRI the
// runtime's first Synchronize, with Kubernetes its first sync.
func (a *Agent) readiness() error {
	var waiting []string
	if a.Generation() == 0 {
		waiting = append(waiting, "the first config apply")
	}
	if a.nri.Enabled && !a.ready.podsSynced.Load() {
		waiting = append(waiting, "the runtime's first NRI Synchronize")
	}
	if a.kubeCfg.Enabled && !a.ready.kubeSynced.Load() {
		waiting = append(waiting, "the first Kubernetes sync")
	}
	if len(waiting) > 0 {
		return errors.New("waiting for " + strings.Join(waiting, ", "))
	}
	return nil
}

// refreshSnapshot asks for the datapath's contents to be read again soon, without
// waiting for it.
func (a *Agent) refreshSnapshot() {
	if a.obs == nil {
		return
	}
	select {
	case a.obs.refresh <- struct{}{}:
	default:
	}
}

func (o *observer) refreshLoop() {
	defer close(o.done)
	t := time.NewTicker(snapshotInterval)
	defer t.Stop()
	for {
		o.take()
		select {
		case <-o.stop:
			return
		case <-t.C:
		case <-o.refresh:
		}
	}
}

func (o *observer) take() {
	dp := o.a.dp
	if dp == nil {
		return
	}
	// The datapath counts an Apply that worked from its plan, without holding its lock.
	s := &snapshot{}
	s.services, s.backends = dp.Counts()
	maps, err := dp.MapStats()
	if err != nil {
		o.a.log.WithError(err).Warn("metrics: read map sizes")
		maps = o.snap.Load().maps
	}
	s.maps = maps
	o.snap.Store(s)
}

// close stops answering; requests in flight finish first, since they read the datapath
// whose handles go next.
func (o *observer) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := o.srv.Shutdown(ctx); err != nil {
		o.a.log.WithError(err).Warn("metrics endpoint shutdown")
	}
	close(o.stop)
	<-o.done
}

// datapathCollector reads, at each scrape, the datapath's counters (one lookup per
// counter) and the tracker's pods, and reports the rest from the latest snapshot.
type datapathCollector struct {
	a *Agent
	o *observer

	ops, events, services, backends, pods, netns, entries, capacity, ready, nriConnected, generation *prometheus.Desc
	// Per-service counters, only while [metrics] per_service is on.
	svcConnects, svcDatagrams *prometheus.Desc
}

func newDatapathCollector(a *Agent, o *observer) *datapathCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labels, nil)
	}
	return &datapathCollector{
		a: a, o: o,
		ops: d("podsock_datapath_operations_total", "Socket operations towards a service VIP, summed over CPUs, by op (connect, sendmsg, connect_sendmsg where the datapath counts both as one, recvmsg_getpeername) and verdict (balanced, refused, denied, skipped, reversed).",
			"op", "verdict"),
		events: d("podsock_datapath_events_total", "Datapath conditions, summed over CPUs: no_storage (a balanced socket got no socket storage), affinity_full, untracked and untracked_released (sockets the socket counts could not hold).",
			"event"),
		services:     d("podsock_services", "Services (frontends: VIP, port, protocol) the datapath serves."),
		backends:     d("podsock_backends", "Distinct backend addresses the served services use."),
		pods:         d("podsock_pods", "Pods known from the runtime."),
		netns:        d("podsock_netns", "Pod network namespaces the agent holds open."),
		entries:      d("podsock_bpf_map_entries", "Entries of each pinned BPF map (the socket storage: balanced connected sockets open), as of the latest snapshot.", "map"),
		capacity:     d("podsock_bpf_map_capacity", "Capacity of each pinned BPF map ([limits]); 0 for the socket storage, which has none.", "map"),
		ready:        d("podsock_ready", "1 when /readyz answers 200."),
		nriConnected: d("podsock_nri_connected", "1 while the NRI connection to the runtime is up."),
		generation:   d("podsock_config_generation", "File configs applied since the agent started."),
		svcConnects: d("podsock_service_connects_total", "Balanced connects (TCP, connected UDP) per service frontend, summed over CPUs; only with [metrics] per_service.",
			"service", "vip", "proto"),
		svcDatagrams: d("podsock_service_datagrams_total", "Balanced unconnected UDP datagrams per service frontend, summed over CPUs; only with [metrics] per_service.",
			"service", "vip", "proto"),
	}
}

func (c *datapathCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.ops, c.events, c.services, c.backends, c.pods, c.netns, c.entries, c.capacity, c.ready, c.nriConnected, c.generation, c.svcConnects, c.svcDatagrams} {
		ch <- d
	}
}

func (c *datapathCollector) Collect(ch chan<- prometheus.Metric) {
	a := c.a
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	if dp := a.dp; dp != nil {
		if st, err := dp.Stats(); err != nil {
			ch <- prometheus.NewInvalidMetric(c.ops, err)
		} else {
			counter := func(d *prometheus.Desc, v uint64, labels ...string) {
				ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
			}
			counter(c.ops, st.Connects, "connect", "balanced")
			counter(c.ops, st.Sendmsgs, "sendmsg", "balanced")
			counter(c.ops, st.NoBackend, "connect_sendmsg", "refused")
			counter(c.ops, st.Denied, "connect_sendmsg", "denied")
			counter(c.ops, st.Skipped, "connect_sendmsg", "skipped")
			counter(c.ops, st.Reversed, "recvmsg_getpeername", "reversed")
			counter(c.events, st.NoStorage, "no_storage")
			counter(c.events, st.AffinityFull, "affinity_full")
			counter(c.events, st.Untracked, "untracked")
			counter(c.events, st.UntrackedReleased, "untracked_released")
		}
		// Read without the datapath's lock but for naming the services: the map is walked
		// (one series per service), which is why per_service is off by default.
		if counts, err := dp.ServiceCounts(); err != nil {
			ch <- prometheus.NewInvalidMetric(c.svcConnects, err)
		} else {
			for _, sc := range counts {
				labels := []string{sc.Name, sc.VIP.String(), datapath.ProtoName(sc.Proto)}
				ch <- prometheus.MustNewConstMetric(c.svcConnects, prometheus.CounterValue, float64(sc.Connects), labels...)
				ch <- prometheus.MustNewConstMetric(c.svcDatagrams, prometheus.CounterValue, float64(sc.Sendmsgs), labels...)
			}
		}
	}
	s := c.o.snap.Load()
	gauge(c.services, float64(s.services))
	gauge(c.backends, float64(s.backends))
	for _, m := range s.maps {
		gauge(c.entries, float64(m.Entries), m.Name)
		gauge(c.capacity, float64(m.Capacity), m.Name)
	}
	if a.tracker != nil {
		pods := a.tracker.Pods()
		netns := 0
		for _, p := range pods {
			if p.NetnsCookie != 0 {
				netns++
			}
		}
		gauge(c.pods, float64(len(pods)))
		gauge(c.netns, float64(netns))
	}
	ready := 0.0
	if a.readiness() == nil {
		ready = 1
	}
	gauge(c.ready, ready)
	connected := 0.0
	if a.plugin != nil && a.plugin.Connected() {
		connected = 1
	}
	gauge(c.nriConnected, connected)
	gauge(c.generation, float64(a.Generation()))
}

package datapath

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
)

// DefaultTraceRing is the trace ring's size in bytes: about 11,900 decisions a reader
// has not taken yet.
const DefaultTraceRing = 1 << 20

// The lease a tracer keeps on the writes (trace_cfg.until): renewed every traceRenew, so a
// dead agent's programs stop writing traceLease after its last renewal.
const (
	traceLease  = 10 * time.Second
	traceRenew  = 2 * time.Second
	tracerQueue = 4096
	// tracePoll bounds how long a decision waits in the ring while it is too empty to wake
	// the reader (trace_wake_bytes).
	tracePoll = 100 * time.Millisecond
)

// ErrTraceUnavailable says the kernel refused the trace ring: balancing works, tracing does
// not.
var ErrTraceUnavailable = errors.New("tracing is unavailable")

// TraceFilter says which decisions a tracer wants. An empty field matches every pod or
// service.
type TraceFilter struct {
	// Pods are sandbox IDs of pods the datapath knows.
	Pods []string
	// Services are service names; a name matches each of its frontends, those added
	// while the tracer runs included.
	Services []string
}

// Decision is one socket-LB decision as the programs saw it.
type Decision struct {
	Time time.Time
	Op   string // connect, sendmsg, recvmsg, getpeername
	// Proto is IPPROTO_TCP or IPPROTO_UDP.
	Proto uint8
	// SandboxID is the pod's, "" for the host or a netns podsock does not know; Host says
	// the socket is in the host netns.
	SandboxID string
	Host      bool
	// CgroupID is the calling task's cgroup: the container, for a container's task.
	CgroupID     uint64
	NetnsCookie  uint64
	SocketCookie uint64
	VIP          netip.AddrPort
	// Backend is the zero AddrPort when none was chosen.
	Backend   netip.AddrPort
	ServiceID uint32
	// Service is "" when the service left before the decision was read.
	Service string
	Verdict string // balanced, skipped, denied, refused, reversed
	Errno   int
}

var traceOps = map[socklbTraceOp]string{
	socklbTraceOpTRACE_OP_CONNECT:     "connect",
	socklbTraceOpTRACE_OP_SENDMSG:     "sendmsg",
	socklbTraceOpTRACE_OP_RECVMSG:     "recvmsg",
	socklbTraceOpTRACE_OP_GETPEERNAME: "getpeername",
}

var traceVerdicts = map[socklbTraceVerdict]string{
	socklbTraceVerdictTRACE_BALANCED: "balanced",
	socklbTraceVerdictTRACE_SKIPPED:  "skipped",
	socklbTraceVerdictTRACE_DENIED:   "denied",
	socklbTraceVerdictTRACE_REFUSED:  "refused",
	socklbTraceVerdictTRACE_REVERSED: "reversed",
}

// tracing is the userspace half of the trace ring: one reader for the datapath's life
// once a tracer has attached, handing each decision to the tracers that want it.
type tracing struct {
	// err is why the kernel has no trace ring; nil when it has one.
	err error
	// mu guards what follows; taken after dp.mu where both are held.
	mu      sync.Mutex
	tracers map[*Tracer]bool
	reader  *ringbuf.Reader
	stop    chan struct{}
	wg      sync.WaitGroup
	// podIDs and svcIDs mirror the filter maps; podFilter and svcFilter say which apply.
	podIDs, svcIDs       map[uint32]bool
	podFilter, svcFilter bool
	// records counts what the ring delivered, before the tracers' own filters.
	records atomic.Uint64
}

// Tracer receives the decisions its filter asks for, until Close.
type Tracer struct {
	dp       *Datapath
	pods     map[string]bool
	services map[string]bool
	podIDs   []uint32
	ch       chan Decision
	lostBase uint64
	overflow atomic.Uint64
	closed   atomic.Bool
}

// Decisions delivers the tracer's decisions; it is closed by Close.
func (t *Tracer) Decisions() <-chan Decision { return t.ch }

// Lost is how many decisions the tracer missed since it attached: those a full ring had no
// room for (every tracer misses those), and those it did not take fast enough.
func (t *Tracer) Lost() (uint64, error) {
	ring, err := t.dp.traceLost()
	if err != nil {
		return 0, err
	}
	return ring - t.lostBase + t.overflow.Load(), nil
}

func (t *Tracer) wants(d *Decision) bool {
	if len(t.pods) > 0 && !t.pods[d.SandboxID] {
		return false
	}
	return len(t.services) == 0 || t.services[d.Service]
}

// TraceFeature says whether the kernel gave the datapath its trace ring.
func (dp *Datapath) TraceFeature() Feature {
	f := Feature{Name: "trace_ringbuf", Present: dp.trace.err == nil}
	if dp.trace.err != nil {
		f.Detail = dp.trace.err.Error()
	}
	return f
}

// probeRing creates the ring the programs would use, so that a kernel that refuses it
// costs only tracing; tests replace it.
var probeRing = func(ms *ebpf.MapSpec) error {
	m, err := ebpf.NewMap(ms)
	if err != nil {
		return err
	}
	return m.Close()
}

// prepareTrace sizes the trace ring in spec. When the kernel refuses the ring, a
// placeholder map takes its place and trace_ready = 0 makes the verifier drop the code that
// would write to it; the error says why.
func prepareTrace(spec *ebpf.CollectionSpec, size int) error {
	ring := spec.Maps["podsock_trace_ring"]
	if size == 0 {
		size = DefaultTraceRing
	}
	page := os.Getpagesize()
	if size < page || size&(size-1) != 0 {
		return fmt.Errorf("trace ring of %d bytes: want a power of two of at least %d", size, page)
	}
	ring.MaxEntries = uint32(size)
	err := probeRing(ring)
	if err == nil {
		if err := spec.Variables["trace_wake_bytes"].Set(uint32(size / 4)); err != nil {
			return fmt.Errorf("set trace_wake_bytes: %w", err)
		}
		return nil
	}
	spec.Maps["podsock_trace_ring"] = &ebpf.MapSpec{Name: ring.Name, Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1}
	if serr := spec.Variables["trace_ready"].Set(uint8(0)); serr != nil {
		return fmt.Errorf("%w: trace ring refused (%w), and clearing trace_ready failed: %w", ErrTraceUnavailable, err, serr)
	}
	return fmt.Errorf("%w: the kernel refused a ring buffer: %w", ErrTraceUnavailable, err)
}

// ProbeTrace says whether the kernel creates the ring buffer tracing needs.
func ProbeTrace() Feature {
	err := probeRing(&ebpf.MapSpec{Type: ebpf.RingBuf, MaxEntries: uint32(os.Getpagesize())})
	f := Feature{Name: "trace_ringbuf", Present: err == nil}
	if err != nil {
		f.Detail = err.Error()
	}
	return f
}

// Trace attaches a tracer: the programs write decisions while at least one is attached.
// Several may run at once; each gets what its filter asks for.
func (dp *Datapath) Trace(f TraceFilter) (*Tracer, error) {
	if dp.trace.err != nil {
		return nil, dp.trace.err
	}
	dp.mu.Lock()
	defer dp.mu.Unlock()
	t := &Tracer{dp: dp, pods: map[string]bool{}, services: map[string]bool{}, ch: make(chan Decision, tracerQueue)}
	for _, sb := range f.Pods {
		p := dp.pods[sb]
		if p == nil {
			return nil, fmt.Errorf("trace pod %s: the datapath does not know it", sb)
		}
		t.pods[sb] = true
		t.podIDs = append(t.podIDs, p.id)
	}
	for _, name := range f.Services {
		t.services[name] = true
	}
	lost, err := dp.traceLost()
	if err != nil {
		return nil, err
	}
	t.lostBase = lost
	tr := &dp.trace
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if tr.reader == nil {
		r, err := ringbuf.NewReader(dp.objs.PodsockTraceRing)
		if err != nil {
			return nil, fmt.Errorf("read the trace ring: %w", err)
		}
		tr.reader, tr.stop = r, make(chan struct{})
		tr.wg.Add(2)
		go dp.readTrace(r)
		go dp.renewTrace(tr.stop)
	}
	if tr.tracers == nil {
		tr.tracers = map[*Tracer]bool{}
	}
	tr.tracers[t] = true
	if err := dp.writeTrace(); err != nil {
		delete(tr.tracers, t)
		return nil, errors.Join(err, dp.writeTrace())
	}
	return t, nil
}

// Close detaches the tracer; the writes stop with the last one.
func (t *Tracer) Close() error {
	if t.closed.Swap(true) {
		return nil
	}
	dp := t.dp
	dp.mu.Lock()
	defer dp.mu.Unlock()
	dp.trace.mu.Lock()
	defer dp.trace.mu.Unlock()
	delete(dp.trace.tracers, t)
	close(t.ch)
	return dp.writeTrace()
}

// writeTrace brings the filter maps, the lease and CFG_TRACE in line with the tracers.
// The filter entries go in before the flags that make them apply, and leave after.
// Callers hold dp.mu and dp.trace.mu.
func (dp *Datapath) writeTrace() error {
	tr := &dp.trace
	pods, svcs := map[uint32]bool{}, map[uint32]bool{}
	podFilter, svcFilter := len(tr.tracers) > 0, len(tr.tracers) > 0
	for t := range tr.tracers {
		podFilter = podFilter && len(t.podIDs) > 0
		svcFilter = svcFilter && len(t.services) > 0
		for _, id := range t.podIDs {
			pods[id] = true
		}
		for _, s := range dp.services {
			if t.services[s.name] {
				svcs[s.id] = true
			}
		}
	}
	if !podFilter {
		clear(pods)
	}
	if !svcFilter {
		clear(svcs)
	}
	var errs []error
	errs = append(errs, syncIDSet(dp.objs.PodsockTracepod, &tr.podIDs, pods, true))
	errs = append(errs, syncIDSet(dp.objs.PodsockTracesvc, &tr.svcIDs, svcs, true))
	tr.podFilter, tr.svcFilter = podFilter, svcFilter
	errs = append(errs, dp.writeLease())
	dp.traceOn = len(tr.tracers) > 0
	errs = append(errs, dp.writeCfg())
	errs = append(errs, syncIDSet(dp.objs.PodsockTracepod, &tr.podIDs, pods, false))
	errs = append(errs, syncIDSet(dp.objs.PodsockTracesvc, &tr.svcIDs, svcs, false))
	return errors.Join(errs...)
}

// syncIDSet adds (add) or removes (!add) the entries of a filter map that differ from want.
func syncIDSet(m *ebpf.Map, have *map[uint32]bool, want map[uint32]bool, add bool) error {
	if *have == nil {
		*have = map[uint32]bool{}
	}
	one := uint8(1)
	for id := range want {
		if add && !(*have)[id] {
			if err := m.Update(id, one, ebpf.UpdateAny); err != nil {
				return fmt.Errorf("write trace filter %d: %w", id, err)
			}
			(*have)[id] = true
		}
	}
	if add {
		return nil
	}
	for id := range *have {
		if !want[id] {
			if err := m.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("delete trace filter %d: %w", id, err)
			}
			delete(*have, id)
		}
	}
	return nil
}

// writeLease renews the lease while tracers are attached and ends it with the last.
// Callers hold dp.trace.mu.
func (dp *Datapath) writeLease() error {
	tr := &dp.trace
	v := socklbTraceCfg{}
	if len(tr.tracers) > 0 {
		now, err := monotonicNow()
		if err != nil {
			return err
		}
		v.Until = now + uint64(traceLease)
		if tr.podFilter {
			v.Flags |= socklbTraceFilterFlagsTRACE_F_PODS
		}
		if tr.svcFilter {
			v.Flags |= socklbTraceFilterFlagsTRACE_F_SERVICES
		}
	}
	if err := dp.objs.PodsockTraceV1.Update(uint32(0), &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write trace lease: %w", err)
	}
	return nil
}

// traceServiceAdded puts a service a tracer filters on by name into the filter. Callers
// hold dp.mu.
func (dp *Datapath) traceServiceAdded(s *installed) {
	tr := &dp.trace
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if !tr.svcFilter {
		return
	}
	for t := range tr.tracers {
		if t.services[s.name] {
			if err := syncIDSet(dp.objs.PodsockTracesvc, &tr.svcIDs, map[uint32]bool{s.id: true}, true); err != nil {
				dp.log.WithError(err).Warnf("trace service %s", s.name)
			}
			return
		}
	}
}

// traceServiceRemoved drops a removed service's ID from the filter: a later service may get
// the ID. Callers hold dp.mu.
func (dp *Datapath) traceServiceRemoved(s *installed) {
	tr := &dp.trace
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if !tr.svcIDs[s.id] {
		return
	}
	if err := dp.objs.PodsockTracesvc.Delete(s.id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		dp.log.WithError(err).Warnf("untrace service %s", s.name)
		return
	}
	delete(tr.svcIDs, s.id)
}

func (dp *Datapath) renewTrace(stop chan struct{}) {
	defer dp.trace.wg.Done()
	tick := time.NewTicker(traceRenew)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		dp.trace.mu.Lock()
		if len(dp.trace.tracers) > 0 {
			if err := dp.writeLease(); err != nil {
				dp.log.WithError(err).Warn("renew the trace lease; tracing stops when it lapses")
			}
		}
		dp.trace.mu.Unlock()
	}
}

// readTrace hands each decision in the ring to the tracers that want it. A tracer that
// does not keep up loses decisions (counted), never holds up the others.
func (dp *Datapath) readTrace(r *ringbuf.Reader) {
	defer dp.trace.wg.Done()
	var rec ringbuf.Record
	for {
		r.SetDeadline(time.Now().Add(tracePoll))
		if err := r.ReadInto(&rec); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue
			}
			if !errors.Is(err, os.ErrClosed) {
				dp.log.WithError(err).Error("trace ring reader stopped")
			}
			return
		}
		dp.trace.records.Add(1)
		var raw socklbLbDecision
		if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &raw); err != nil {
			dp.log.WithError(err).Warn("decode a trace record")
			continue
		}
		d := dp.decision(&raw)
		dp.trace.mu.Lock()
		for t := range dp.trace.tracers {
			if !t.wants(&d) {
				continue
			}
			select {
			case t.ch <- d:
			default:
				t.overflow.Add(1)
			}
		}
		dp.trace.mu.Unlock()
	}
}

// decision names what a raw record holds: the pod by its ID, the service by its VIP, and
// the time on the wall clock.
func (dp *Datapath) decision(raw *socklbLbDecision) Decision {
	vip := backendAddrPort(socklbBackend{Addr: raw.Vip, Port: raw.VipPort})
	d := Decision{
		Op: traceOps[raw.Op], Proto: raw.Proto, Host: raw.Host != 0,
		CgroupID: raw.CgroupId, NetnsCookie: raw.NetnsCookie, SocketCookie: raw.SocketCookie,
		VIP: vip, ServiceID: raw.SvcId, Verdict: traceVerdicts[raw.Verdict], Errno: int(raw.Err),
	}
	if raw.BackendPort != 0 || raw.Backend != [4]uint32{} {
		d.Backend = backendAddrPort(socklbBackend{Addr: raw.Backend, Port: raw.BackendPort})
	}
	if now, err := monotonicNow(); err == nil {
		d.Time = time.Now().Add(-time.Duration(now - raw.TimeNs))
	} else {
		d.Time = time.Now()
	}
	dp.mu.Lock()
	if p := dp.podIDs[raw.PodId]; p != nil && raw.PodId != 0 {
		d.SandboxID = p.sandboxID
	}
	if s := dp.services[svcKey(vip.Addr(), vip.Port(), raw.Proto)]; s != nil && s.id == raw.SvcId {
		d.Service = s.name
	}
	dp.mu.Unlock()
	return d
}

// traceLost sums the ring's drops over CPUs.
func (dp *Datapath) traceLost() (uint64, error) {
	var perCPU []uint64
	if err := dp.objs.PodsockTracelost.Lookup(uint32(0), &perCPU); err != nil {
		return 0, fmt.Errorf("read trace drops: %w", err)
	}
	var n uint64
	for _, v := range perCPU {
		n += v
	}
	return n, nil
}

// stopTracing ends the reader and the renewals; dp.mu must not be held, since the reader
// takes it.
func (dp *Datapath) stopTracing() {
	tr := &dp.trace
	tr.mu.Lock()
	r, stop := tr.reader, tr.stop
	tr.reader, tr.stop = nil, nil
	for t := range tr.tracers {
		t.closed.Store(true)
		close(t.ch)
	}
	clear(tr.tracers)
	tr.mu.Unlock()
	if r == nil {
		return
	}
	close(stop)
	_ = r.Close()
	tr.wg.Wait()
}

// Tracers is how many tracers are attached.
func (dp *Datapath) Tracers() int {
	dp.trace.mu.Lock()
	defer dp.trace.mu.Unlock()
	return len(dp.trace.tracers)
}

// ServiceCount is what the per-service counters hold for one service frontend.
type ServiceCount struct {
	Name     string
	VIP      netip.AddrPort
	Proto    uint8
	Connects uint64
	Sendmsgs uint64
}

// SetServiceCounters turns the per-service counters on or off. Off, they cost the
// programs the test of one settings bit; on, a lookup and an add per balanced connect or
// datagram. Turning them on starts every service from zero.
func (dp *Datapath) SetServiceCounters(on bool) error {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	if on == dp.svcCounts {
		return nil
	}
	if on {
		for _, s := range dp.services {
			if err := dp.addServiceCounter(s.id); err != nil {
				return err
			}
		}
	}
	dp.svcCounts = on
	if err := dp.writeCfg(); err != nil {
		dp.svcCounts = !on
		return err
	}
	if !on {
		for _, s := range dp.services {
			dp.deleteServiceCounter(s.id)
		}
	}
	return nil
}

func (dp *Datapath) addServiceCounter(id uint32) error {
	zero := make([]socklbSvcCounters, dp.possibleCPUs)
	if err := dp.objs.PodsockSvccountV1.Update(id, zero, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("create the counters of service %d: %w", id, err)
	}
	return nil
}

func (dp *Datapath) deleteServiceCounter(id uint32) {
	if err := dp.objs.PodsockSvccountV1.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		dp.log.WithError(err).Warnf("delete the counters of service %d", id)
	}
}

// ServiceCounts reads the per-service counters, summed over CPUs, one per frontend; nil
// while they are off. The map is read without the datapath lock, which is then held only
// to name the services.
func (dp *Datapath) ServiceCounts() ([]ServiceCount, error) {
	dp.mu.Lock()
	on := dp.svcCounts
	dp.mu.Unlock()
	if !on {
		return nil, nil
	}
	sums := map[uint32]socklbSvcCounters{}
	var id uint32
	var perCPU []socklbSvcCounters
	it := dp.objs.PodsockSvccountV1.Iterate()
	for it.Next(&id, &perCPU) {
		var s socklbSvcCounters
		for _, c := range perCPU {
			s.Connects += c.Connects
			s.Sendmsgs += c.Sendmsgs
		}
		sums[id] = s
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read per-service counters: %w", err)
	}
	dp.mu.Lock()
	out := make([]ServiceCount, 0, len(sums))
	for k, s := range dp.services {
		c, ok := sums[s.id]
		if !ok {
			continue
		}
		vip := backendAddrPort(socklbBackend{Addr: k.Addr, Port: k.Port})
		out = append(out, ServiceCount{Name: s.name, VIP: vip, Proto: k.Proto, Connects: c.Connects, Sendmsgs: c.Sendmsgs})
	}
	dp.mu.Unlock()
	slices.SortFunc(out, func(a, b ServiceCount) int {
		if a.Name != b.Name {
			if a.Name < b.Name {
				return -1
			}
			return 1
		}
		return a.VIP.Compare(b.VIP)
	})
	return out, nil
}

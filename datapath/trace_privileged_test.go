package datapath

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/test/testenv"
)

var restrictedVIP = netip.MustParseAddrPort("10.96.0.30:80")

func startTrace(t *testing.T, dp *Datapath, f TraceFilter) *Tracer {
	t.Helper()
	tr, err := dp.Trace(f)
	if err != nil {
		t.Fatalf("trace %+v: %v", f, err)
	}
	t.Cleanup(func() { _ = tr.Close() })
	return tr
}

// collect takes the tracer's decisions until none arrives for a moment.
func collect(t *testing.T, tr *Tracer) []Decision {
	t.Helper()
	var out []Decision
	for {
		select {
		case d, ok := <-tr.Decisions():
			if !ok {
				return out
			}
			out = append(out, d)
		case <-time.After(300 * time.Millisecond):
			return out
		}
	}
}

func only(t *testing.T, ds []Decision, op, verdict string) Decision {
	t.Helper()
	var found []Decision
	for _, d := range ds {
		if d.Op == op && d.Verdict == verdict {
			found = append(found, d)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d %s/%s decisions, want 1; all: %+v", len(found), op, verdict, ds)
	}
	return found[0]
}

func settingsFlags(t *testing.T, dp *Datapath) socklbCfgFlags {
	t.Helper()
	var cfg socklbDatapathCfg
	if err := dp.objs.PodsockCfgV1.Lookup(uint32(0), &cfg); err != nil {
		t.Fatal(err)
	}
	return cfg.Flags
}

// The ring carries each kind of decision with the fields the programs saw: pod, container
// cgroup, netns and socket cookies, VIP, backend, service, verdict and errno.
func TestPrivilegedTraceDecisions(t *testing.T) {
	w := newPodWorld(t)
	restricted := tcpService("default/private", restrictedVIP, be(beA, 1))
	restricted.Policy = ServicePolicy{Restrict: true}
	apply(t, w.dp,
		tcpService("default/web", webVIP, be(beA, 1)),
		tcpService("default/empty", emptyVIP),
		udpService("default/dns", dnsVIP, be(dnsA, 1)),
		restricted)
	testenv.StartUDPBackend(t, w.ns, "A", dnsA)
	w.setPods(t,
		Pod{SandboxID: "pod-a", ContainerCgroups: []uint64{w.ctrA.ID(t)}},
		Pod{SandboxID: "mesh", ContainerCgroups: []uint64{w.ctrB.ID(t)}, SkipLB: true})
	if settingsFlags(t, w.dp)&socklbCfgFlagsCFG_TRACE != 0 {
		t.Fatal("CFG_TRACE is set with no tracer attached")
	}
	if _, err := w.dialFrom(t, w.ctrA, w.ns); err != nil {
		t.Fatalf("connect before tracing: %v", err)
	}
	tr := startTrace(t, w.dp, TraceFilter{})
	if settingsFlags(t, w.dp)&socklbCfgFlagsCFG_TRACE == 0 {
		t.Fatal("CFG_TRACE is clear with a tracer attached")
	}

	// Balanced, with the socket cookie the application's socket has, and reversed by its
	// getpeername.
	var cookie uint64
	w.ctrA.RunIn(t, w.cg, func() {
		fd, err := testenv.Socket(w.ns, unix.AF_INET, unix.SOCK_STREAM)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		if err := testenv.Connect(fd, testenv.Sockaddr(unix.AF_INET, webVIP)); err != nil {
			t.Fatalf("connect: %v", err)
		}
		cookie = sockCookie(t, fd)
		if _, err := unix.Getpeername(fd); err != nil {
			t.Fatal(err)
		}
	})
	if _, err := w.dialTo(t, w.ctrA, w.ns, restrictedVIP); !errors.Is(err, unix.EPERM) {
		t.Fatalf("restricted service: %v, want EPERM", err)
	}
	if _, err := w.dialTo(t, nil, w.ns, emptyVIP); !errors.Is(err, unix.ECONNREFUSED) {
		t.Fatalf("service without backends: %v, want ECONNREFUSED", err)
	}
	if _, err := w.dialFrom(t, w.ctrB, w.ns); !testenv.IsUnreachable(err) {
		t.Fatalf("skip-LB pod: %v, want the VIP left alone", err)
	}
	fd := udpClient(t, w.ns, dnsVIP, false, "A")
	closeClient(fd)
	ds := collect(t, tr)

	nsCookie := w.ns.Cookie(t)
	bal := only(t, ds, "connect", "balanced")
	want := Decision{Op: "connect", Proto: ProtoTCP, SandboxID: "pod-a", CgroupID: w.ctrA.ID(t),
		NetnsCookie: nsCookie, SocketCookie: cookie, VIP: webVIP, Backend: beA, ServiceID: bal.ServiceID,
		Service: "default/web", Verdict: "balanced", Host: true}
	bal.Time, want.Time = time.Time{}, time.Time{}
	if bal != want {
		t.Fatalf("balanced connect:\n got %+v\nwant %+v", bal, want)
	}
	d := only(t, ds, "getpeername", "reversed")
	if d.SocketCookie != cookie || d.VIP != webVIP || d.Backend != beA || d.Service != "default/web" || d.SandboxID != "pod-a" {
		t.Fatalf("getpeername: %+v", d)
	}
	d = only(t, ds, "connect", "denied")
	if d.Errno != int(unix.EPERM) || d.Service != "default/private" || d.VIP != restrictedVIP || d.Backend.IsValid() || d.SandboxID != "pod-a" {
		t.Fatalf("denied connect: %+v", d)
	}
	d = only(t, ds, "connect", "refused")
	if d.Errno != int(unix.ECONNREFUSED) || d.Service != "default/empty" || d.Backend.IsValid() || d.SandboxID != "" || d.CgroupID != w.cg.ID(t) {
		t.Fatalf("refused connect: %+v", d)
	}
	d = only(t, ds, "connect", "skipped")
	if d.SandboxID != "mesh" || d.Errno != 0 || d.Service != "default/web" || d.Backend.IsValid() {
		t.Fatalf("skipped connect: %+v", d)
	}
	d = only(t, ds, "sendmsg", "balanced")
	if d.Proto != ProtoUDP || d.VIP != dnsVIP || d.Backend != dnsA || d.Service != "default/dns" {
		t.Fatalf("sendmsg: %+v", d)
	}
	d = only(t, ds, "recvmsg", "reversed")
	if d.VIP != dnsVIP || d.Backend != dnsA || d.SocketCookie == 0 {
		t.Fatalf("recvmsg: %+v", d)
	}
	for _, d := range ds {
		if age := time.Since(d.Time); age < 0 || age > 10*time.Second {
			t.Fatalf("decision time %s is %v from now", d.Time.Format(time.RFC3339Nano), age)
		}
	}

	// The last tracer to leave turns the writes off, and closes its channel.
	if err := tr.Close(); err != nil {
		t.Fatal(err)
	}
	if _, ok := <-tr.Decisions(); ok {
		t.Fatal("a closed tracer still delivers")
	}
	if settingsFlags(t, w.dp)&socklbCfgFlagsCFG_TRACE != 0 {
		t.Fatal("CFG_TRACE still set after the last tracer left")
	}
	before := w.dp.trace.records.Load()
	if _, err := w.dialFrom(t, w.ctrA, w.ns); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if n := w.dp.trace.records.Load() - before; n != 0 {
		t.Fatalf("the ring carried %d decisions with no tracer", n)
	}
}

// Filters run in BPF: a decision no tracer asked for never reaches the ring. Several
// tracers get what each asked for.
func TestPrivilegedTraceFilters(t *testing.T) {
	w := newPodWorld(t)
	apply(t, w.dp, tcpService("default/web", webVIP, be(beA, 1)), tcpService("default/empty", emptyVIP))
	w.setPods(t,
		Pod{SandboxID: "pod-a", ContainerCgroups: []uint64{w.ctrA.ID(t)}},
		Pod{SandboxID: "pod-b", ContainerCgroups: []uint64{w.ctrB.ID(t)}})

	if _, err := w.dp.Trace(TraceFilter{Pods: []string{"nope"}}); err == nil {
		t.Fatal("trace of an unknown pod: no error")
	}
	podA := startTrace(t, w.dp, TraceFilter{Pods: []string{"pod-a"}})
	before := w.dp.trace.records.Load()
	for range 5 {
		if _, err := w.dialFrom(t, w.ctrB, w.ns); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond)
	if n := w.dp.trace.records.Load() - before; n != 0 {
		t.Fatalf("a pod filter let %d decisions of another pod into the ring", n)
	}
	if _, err := w.dialFrom(t, w.ctrA, w.ns); err != nil {
		t.Fatal(err)
	}
	ds := collect(t, podA)
	if len(ds) != 2 || ds[0].SandboxID != "pod-a" || ds[1].SandboxID != "pod-a" {
		t.Fatalf("pod-a's tracer got %+v, want its connect and getpeername", ds)
	}

	// A second tracer, by service: the BPF filter is the union (no pod filter now, since
	// this tracer has none; no service filter, since pod-a's tracer has none), each tracer
	// keeps its own.
	empty := startTrace(t, w.dp, TraceFilter{Services: []string{"default/empty"}})
	if _, err := w.dialTo(t, w.ctrB, w.ns, emptyVIP); !errors.Is(err, unix.ECONNREFUSED) {
		t.Fatal(err)
	}
	if _, err := w.dialFrom(t, w.ctrA, w.ns); err != nil {
		t.Fatal(err)
	}
	if _, err := w.dialFrom(t, w.ctrB, w.ns); err != nil {
		t.Fatal(err)
	}
	for _, d := range collect(t, podA) {
		if d.SandboxID != "pod-a" {
			t.Fatalf("pod-a's tracer got %+v", d)
		}
	}
	got := collect(t, empty)
	if len(got) != 1 || got[0].Service != "default/empty" || got[0].SandboxID != "pod-b" || got[0].Verdict != "refused" {
		t.Fatalf("the service tracer got %+v, want pod-b's refused connect", got)
	}

	// With only the service tracer left, the BPF filter is by service, and a frontend of that
	// name added later is in it.
	if err := podA.Close(); err != nil {
		t.Fatal(err)
	}
	empty6 := Service{Name: "default/empty", VIP: netip.MustParseAddr("10.96.0.98"), Port: 80, Proto: ProtoTCP}
	apply(t, w.dp, tcpService("default/web", webVIP, be(beA, 1)), tcpService("default/empty", emptyVIP), empty6)
	before = w.dp.trace.records.Load()
	if _, err := w.dialFrom(t, w.ctrA, w.ns); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if n := w.dp.trace.records.Load() - before; n != 0 {
		t.Fatalf("a service filter let %d decisions of another service into the ring", n)
	}
	if _, err := w.dialTo(t, w.ctrA, w.ns, netip.AddrPortFrom(empty6.VIP, 80)); !errors.Is(err, unix.ECONNREFUSED) {
		t.Fatal(err)
	}
	got = collect(t, empty)
	if len(got) != 1 || got[0].VIP != netip.AddrPortFrom(empty6.VIP, 80) {
		t.Fatalf("the service tracer got %+v, want the new frontend's refusal", got)
	}
}

// A full ring counts what it drops, and the tracer reports it.
func TestPrivilegedTraceCountsDrops(t *testing.T) {
	f := newFixture(t)
	testenv.StartTCPBackend(t, f.ns, "A", beA)
	page := unix.Getpagesize()
	dp, err := Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs, TraceRing: page})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })
	apply(t, dp, tcpService("default/web", webVIP, be(beA, 1)))
	tr := startTrace(t, dp, TraceFilter{})
	const n = 200
	// The reader names each decision under the datapath lock: holding it stalls the reader
	// after one record, and the ring fills.
	dp.mu.Lock()
	for i := range n {
		if _, err := testenv.DialTCP(f.ns, 0, webVIP, false); err != nil {
			dp.mu.Unlock()
			t.Fatalf("connect %d: %v", i, err)
		}
	}
	dp.mu.Unlock()
	ds := collect(t, tr)
	lost, err := tr.Lost()
	if err != nil {
		t.Fatal(err)
	}
	// Each connect makes two decisions (connect, getpeername).
	if lost == 0 || uint64(len(ds))+lost != 2*n {
		t.Fatalf("got %d decisions and %d lost, want %d in all with some lost (ring of %d bytes)", len(ds), lost, 2*n, page)
	}
	if cap := page / (binary.Size(socklbLbDecision{}) + 8); len(ds) > cap+1 {
		t.Fatalf("got %d decisions through a ring of %d", len(ds), cap)
	}
}

// A new agent starts with tracing off, whatever the last one left: a crash never leaves
// the programs writing. The lease stops them even before that.
func TestPrivilegedTraceOffAfterRestartAndLease(t *testing.T) {
	f := newFixture(t)
	testenv.StartTCPBackend(t, f.ns, "A", beA)
	dp, err := Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs})
	if err != nil {
		t.Fatal(err)
	}
	apply(t, dp, tcpService("default/web", webVIP, be(beA, 1)))
	tr := startTrace(t, dp, TraceFilter{})
	// As if the agent died with a tracer attached: the pinned settings keep CFG_TRACE.
	tr.closed.Store(true)
	dp.trace.mu.Lock()
	clear(dp.trace.tracers)
	dp.trace.mu.Unlock()
	if settingsFlags(t, dp)&socklbCfgFlagsCFG_TRACE == 0 {
		t.Fatal("CFG_TRACE clear before the crash")
	}
	// An expired lease stops the writes with CFG_TRACE still set.
	if err := dp.objs.PodsockTraceV1.Update(uint32(0), socklbTraceCfg{Until: 1}, ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	before := dp.trace.records.Load()
	if _, err := testenv.DialTCP(f.ns, 0, webVIP, false); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if n := dp.trace.records.Load() - before; n != 0 {
		t.Fatalf("%d decisions written after the lease lapsed", n)
	}
	dp.Close()

	dp2, err := Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp2.Close() })
	if settingsFlags(t, dp2)&(socklbCfgFlagsCFG_TRACE|socklbCfgFlagsCFG_SVC_COUNTS) != 0 {
		t.Fatal("the next agent left CFG_TRACE or CFG_SVC_COUNTS set")
	}
	if _, err := testenv.DialTCP(f.ns, 0, webVIP, false); err != nil {
		t.Fatalf("balancing after the restart: %v", err)
	}
}

// A kernel that refuses the ring loses tracing, and only tracing.
func TestPrivilegedTraceRingRefused(t *testing.T) {
	f := newFixture(t)
	testenv.StartTCPBackend(t, f.ns, "A", beA)
	saved := probeRing
	probeRing = func(*ebpf.MapSpec) error { return unix.EINVAL }
	t.Cleanup(func() { probeRing = saved })
	dp := f.load()
	apply(t, dp, tcpService("default/web", webVIP, be(beA, 1)))
	if feat := dp.TraceFeature(); feat.Present || feat.Detail == "" {
		t.Fatalf("trace feature %+v, want absent with a reason", feat)
	}
	if _, err := dp.Trace(TraceFilter{}); !errors.Is(err, ErrTraceUnavailable) {
		t.Fatalf("trace: %v, want ErrTraceUnavailable", err)
	}
	if res, err := testenv.DialTCP(f.ns, 0, webVIP, false); err != nil || res.Backend != "A" || res.Peer != webVIP {
		t.Fatalf("balancing without the ring: %+v %v", res, err)
	}
	if dp.objs.PodsockTraceRing.Type() == ebpf.RingBuf {
		t.Fatal("the ring was created anyway")
	}
}

// Per-service counters are off by default, hold one entry per service when on, count
// balanced connects and datagrams by service, and go away when turned off.
func TestPrivilegedServiceCounters(t *testing.T) {
	f := newFixture(t)
	testenv.StartTCPBackend(t, f.ns, "A", beA)
	testenv.StartUDPBackend(t, f.ns, "A", dnsA)
	dp := f.load()
	apply(t, dp, tcpService("default/web", webVIP, be(beA, 1)), udpService("default/dns", dnsVIP, be(dnsA, 1)))
	if _, err := testenv.DialTCP(f.ns, 0, webVIP, false); err != nil {
		t.Fatal(err)
	}
	if c, err := dp.ServiceCounts(); err != nil || c != nil {
		t.Fatalf("counts while off: %v %v", c, err)
	}
	if n, _ := countEntries(dp.objs.PodsockSvccountV1); n != 0 {
		t.Fatalf("%d counter entries while off", n)
	}
	if err := dp.SetServiceCounters(true); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := testenv.DialTCP(f.ns, 0, webVIP, false); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 {
		closeClient(udpClient(t, f.ns, dnsVIP, false, "A"))
	}
	// A service added while on is counted from zero.
	apply(t, dp, tcpService("default/web", webVIP, be(beA, 1)), udpService("default/dns", dnsVIP, be(dnsA, 1)),
		tcpService("default/api", apiVIP, be(beA, 1)))
	if _, err := testenv.DialTCP(f.ns, 0, apiVIP, false); err != nil {
		t.Fatal(err)
	}
	got, err := dp.ServiceCounts()
	if err != nil {
		t.Fatal(err)
	}
	want := []ServiceCount{
		{Name: "default/api", VIP: apiVIP, Proto: ProtoTCP, Connects: 1},
		{Name: "default/dns", VIP: dnsVIP, Proto: ProtoUDP, Sendmsgs: 2},
		{Name: "default/web", VIP: webVIP, Proto: ProtoTCP, Connects: 3},
	}
	if len(got) != len(want) {
		t.Fatalf("counts %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("counts %+v, want %+v", got, want)
		}
	}
	if err := dp.SetServiceCounters(false); err != nil {
		t.Fatal(err)
	}
	if n, _ := countEntries(dp.objs.PodsockSvccountV1); n != 0 || settingsFlags(t, dp)&socklbCfgFlagsCFG_SVC_COUNTS != 0 {
		t.Fatalf("%d counter entries after turning them off", n)
	}
}

package datapath

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/test/testenv"
)

// What a Kubernetes service source asks of the datapath: names of namespace/name:port,
// several frontends of one name, terminating backends that keep their sockets, client-IP
// affinity with a timeout, and node ports on the host's loopback.

// k8sName is the longest name a Kubernetes service port has: namespace and service name
// of 63 bytes each, and a port name of 15.
var k8sName = strings.Repeat("n", 63) + "/" + strings.Repeat("s", 63) + ":" + strings.Repeat("p", 15)

func TestPrivilegedLongNameRoundTrips(t *testing.T) {
	if len(k8sName) != 143 {
		t.Fatalf("test name is %d bytes, want 143", len(k8sName))
	}
	f := newFixture(t)
	testenv.StartTCPBackend(t, f.ns, "A", beA)
	dp, err := Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs})
	if err != nil {
		t.Fatal(err)
	}
	apply(t, dp, tcpService(k8sName, webVIP, be(beA, 1)))
	if got, err := dp.Services(); err != nil || len(got) != 1 || got[0].Name != k8sName {
		t.Fatalf("services: %+v %v, want the one of the 143-byte name", got, err)
	}
	// One byte more is refused whole, and the service keeps serving.
	if _, err := dp.Apply([]Service{tcpService(k8sName+"x", webVIP, be(beA, 1))}); err == nil {
		t.Fatal("a 144-byte name was accepted")
	}
	if r, err := testenv.DialTCP(f.ns, 0, webVIP, false); err != nil || r.Backend != "A" {
		t.Fatalf("connect after the refused apply: %+v %v, want A", r, err)
	}
	dp.Close()

	dp2 := f.load()
	if got, err := dp2.Services(); err != nil || len(got) != 1 || got[0].Name != k8sName {
		t.Fatalf("adopted services: %+v %v, want the 143-byte name", got, err)
	}
	if res := apply(t, dp2, tcpService(k8sName, webVIP, be(beA, 1))); res.Unchanged != 1 {
		t.Fatalf("the same service after adoption: %+v, want it unchanged", res)
	}
}

// A Kubernetes service's frontends (here an IPv4 and an IPv6 ClusterIP with an allow-list,
// and an unrestricted one) are datapath services of one name: each is served, and pod
// policy by name reaches every restricted frontend of that name.
func TestPrivilegedFrontendsShareAName(t *testing.T) {
	w := newPodWorld(t)
	testenv.StartTCPBackend(t, w.ns, "A6", be6A)
	const name = "default/web:http"
	v4 := tcpService(name, webVIP, be(beA, 1))
	v6 := tcpService(name, web6VIP, be(be6A, 1))
	for _, s := range []*Service{&v4, &v6} {
		s.Policy = ServicePolicy{Restrict: true, AllowedPods: []string{"pod-a"}}
	}
	open := tcpService(name, apiVIP, be(beB, 1))
	if res := apply(t, w.dp, v4, v6, open); res.Added != 3 {
		t.Fatalf("apply of three frontends of one name: %+v", res)
	}
	got, err := w.dp.Services()
	if err != nil || len(got) != 3 {
		t.Fatalf("services: %+v %v, want the three frontends", got, err)
	}
	for _, s := range got {
		if s.Name != name {
			t.Fatalf("frontend %s named %q, want %q", s.Key(), s.Name, name)
		}
	}
	w.setPods(t,
		Pod{SandboxID: "pod-a", ContainerCgroups: []uint64{w.ctrA.ID(t)}, AllowedServices: []string{name}},
		Pod{SandboxID: "pod-b", ContainerCgroups: []uint64{w.ctrB.ID(t)}},
	)
	expect := func(when string, cg *testenv.Cgroup, vip netip.AddrPort, want string) {
		t.Helper()
		res, err := w.dialTo(t, cg, w.ns, vip)
		if want == "EPERM" {
			if !errors.Is(err, unix.EPERM) {
				t.Fatalf("%s: connect to %s: %+v %v, want EPERM", when, vip, res, err)
			}
			return
		}
		if err != nil || res.Backend != want || res.Peer != vip {
			t.Fatalf("%s: connect to %s: %+v %v, want %s through the VIP", when, vip, res, err, want)
		}
	}
	expect("allowed pod", w.ctrA, webVIP, "A")
	expect("allowed pod", w.ctrA, web6VIP, "A6")
	expect("allowed pod", w.ctrA, apiVIP, "B")
	expect("other pod", w.ctrB, webVIP, "EPERM")
	expect("other pod", w.ctrB, web6VIP, "EPERM")
	expect("other pod", w.ctrB, apiVIP, "B")
	if got := w.dp.AllowedSandboxes(name); !slices.Equal(got, []string{"pod-a"}) {
		t.Fatalf("allowed sandboxes of %s: %v, want pod-a once", name, got)
	}

	// One frontend goes: it reports its backend, and the others keep their policy.
	res := apply(t, w.dp, v4, open)
	if res.Removed != 1 || len(res.RemovedBackends) != 1 || res.RemovedBackends[0].Backend != be6A ||
		res.RemovedBackends[0].VIP != web6VIP || res.RemovedBackends[0].Service != name {
		t.Fatalf("apply without the IPv6 frontend: %+v, want %s of %s removed", res, be6A, web6VIP)
	}
	expect("allowed pod, one frontend fewer", w.ctrA, webVIP, "A")
	if got := w.dp.AllowedSandboxes(name); !slices.Equal(got, []string{"pod-a"}) {
		t.Fatalf("allowed sandboxes after a frontend went: %v, want pod-a", got)
	}
	// Pod events by name, and a frontend that comes back, reach every frontend again.
	w.setPods(t,
		Pod{SandboxID: "pod-a", ContainerCgroups: []uint64{w.ctrA.ID(t)}},
		Pod{SandboxID: "pod-b", ContainerCgroups: []uint64{w.ctrB.ID(t)}, AllowedServices: []string{name}},
	)
	v4.Policy.AllowedPods = []string{"pod-b"}
	v6.Policy.AllowedPods = []string{"pod-b"}
	apply(t, w.dp, v4, v6, open)
	expect("pod allowed later", w.ctrB, webVIP, "A")
	expect("pod allowed later", w.ctrB, web6VIP, "A6")
	expect("pod no longer allowed", w.ctrA, webVIP, "EPERM")
	expect("pod no longer allowed", w.ctrA, web6VIP, "EPERM")
	if got := w.dp.AllowedSandboxes(name); !slices.Equal(got, []string{"pod-b"}) {
		t.Fatalf("allowed sandboxes after the change: %v, want pod-b", got)
	}
}

// heldOn dials the VIP until a socket reaches backend want, and keeps that one.
func heldOn(t *testing.T, ns *testenv.Netns, vip netip.AddrPort, want string) int {
	t.Helper()
	for range 200 {
		r, err := testenv.DialTCP(ns, 0, vip, true)
		if err != nil {
			t.Fatalf("dial %s: %v", vip, err)
		}
		if r.Backend == want {
			keepOpen(t, r.FD)
			return r.FD
		}
		unix.Close(r.FD)
	}
	t.Fatalf("200 connects to %s never reached %s", vip, want)
	return -1
}

// Terminating endpoints: a backend moved to Retained gets no new sockets and keeps those it
// has, whatever passes run; once it leaves Retained too, its sockets, and only those
// balanced to it before, are destroyed.
func TestPrivilegedRetainedBackendsKeepTheirSockets(t *testing.T) {
	_, dp := loadWithIterators(t)
	ns := clientNetns(t)
	set := newTestNetns(t, ns)
	tcp := TerminateOptions{Protocols: []uint8{ProtoTCP}}
	const name = "default/web:http"
	web := func(backends []netip.AddrPort, retained ...netip.AddrPort) ApplyResult {
		t.Helper()
		s := tcpService(name, webVIP)
		for _, b := range backends {
			s.Backends = append(s.Backends, be(b, 1))
		}
		s.Retained = retained
		return apply(t, dp, s)
	}
	onlyA, both := []netip.AddrPort{beA}, []netip.AddrPort{beA, beB}
	web(both)
	sockA, sockB := heldOn(t, ns, webVIP, "A"), heldOn(t, ns, webVIP, "B")

	if res := web(onlyA, beB); len(res.RemovedBackends) != 0 || res.Updated != 1 {
		t.Fatalf("B moved to retained: %+v, want an update that removes nothing", res)
	}
	for i := range 40 {
		if r, err := testenv.DialTCP(ns, 0, webVIP, false); err != nil || r.Backend != "A" {
			t.Fatalf("connect %d with B retained: %+v %v, want A", i, r, err)
		}
	}
	if res := web(onlyA, beB); res.Unchanged != 1 {
		t.Fatalf("the same retained set again: %+v, want unchanged", res)
	}
	// B leaves and is back as retained before the pass: the pass ends nothing.
	gone := web(onlyA).RemovedBackends
	web(onlyA, beB)
	if tr, err := dp.Terminate(set, gone, tcp); err != nil || tr.Destroyed != 0 || tr.Backends != 0 {
		t.Fatalf("pass for B, retained again: %+v %v, want nothing done", tr, err)
	}
	if err := alive(sockB); err != nil {
		t.Fatalf("socket to retained B after a pass: %v", err)
	}

	// B leaves for good while the slots stay [A]: it is reported, for the sockets balanced
	// to it before. Before the pass runs, B comes back, gets a new socket, and leaves again.
	svc := dp.services[svcKey(webVIP.Addr(), webVIP.Port(), ProtoTCP)]
	first := web(onlyA).RemovedBackends
	if len(first) != 1 || first[0].Backend != beB || first[0].Service != name || first[0].VIP != webVIP ||
		first[0].Proto != ProtoTCP || first[0].ServiceID != svc.id {
		t.Fatalf("B leaving retained: removed %+v, want B of %s (service %d)", first, name, svc.id)
	}
	web(both)
	sockB2 := heldOn(t, ns, webVIP, "B")
	second := web(onlyA).RemovedBackends
	if tr, err := dp.Terminate(set, first, tcp); err != nil || tr.Destroyed != 1 {
		t.Fatalf("late pass for B's first removal: %+v %v, want its older socket destroyed", tr, err)
	}
	if err := aborted(sockB); err != nil {
		t.Fatalf("socket to B from before it was retained: %v", err)
	}
	closeClient(sockB)
	for what, fd := range map[string]int{"B, connected after it came back": sockB2, "A": sockA} {
		if err := alive(fd); err != nil {
			t.Fatalf("socket to %s, ended by B's first removal: %v", what, err)
		}
	}
	if tr, err := dp.Terminate(set, second, tcp); err != nil || tr.Destroyed != 1 {
		t.Fatalf("pass for B's second removal: %+v %v, want its newer socket destroyed", tr, err)
	}
	if err := aborted(sockB2); err != nil {
		t.Fatal(err)
	}
	closeClient(sockB2)

	// A service that goes reports its backends and those it retains.
	web(both)
	sockB3 := heldOn(t, ns, webVIP, "B")
	web(onlyA, beB)
	res := apply(t, dp)
	var removed []netip.AddrPort
	for _, b := range res.RemovedBackends {
		removed = append(removed, b.Backend)
	}
	slices.SortFunc(removed, func(a, b netip.AddrPort) int { return a.Compare(b) })
	if res.Removed != 1 || !slices.Equal(removed, both) {
		t.Fatalf("removing the service: %+v, want A and the retained B reported", res)
	}
	if tr, err := dp.Terminate(set, res.RemovedBackends, tcp); err != nil || tr.Destroyed != 2 {
		t.Fatalf("pass for the removed service: %+v %v, want both sockets destroyed", tr, err)
	}
	for _, fd := range []int{sockA, sockB3} {
		if err := aborted(fd); err != nil {
			t.Fatal(err)
		}
	}
}

// affinityEntry reads the affinity choice of a client in the service at vip.
func affinityEntry(t *testing.T, dp *Datapath, vip netip.AddrPort, client uint32) socklbAffValue {
	t.Helper()
	svc := dp.services[svcKey(vip.Addr(), vip.Port(), ProtoTCP)]
	var v socklbAffValue
	if err := dp.objs.PodsockAffV3.Lookup(&socklbPodSvcKey{SvcId: svc.id, PodId: client}, &v); err != nil {
		t.Fatalf("affinity entry of client %#x: %v", client, err)
	}
	return v
}

// sessionAffinity ClientIP with timeoutSeconds: a pod's choice holds for as long as its
// sockets keep using it, across a change of weights; left unused for the timeout, it
// expires, and the next socket picks by weight.
func TestPrivilegedAffinityTimeout(t *testing.T) {
	w := newPodWorld(t)
	const timeout = time.Second
	addrOf := map[string]netip.AddrPort{"A": beA, "B": beB}
	svc := tcpService("default/web:http", webVIP, be(beA, 1), be(beB, 1))
	svc.Policy = ServicePolicy{AffinityPod: true, AffinityTimeout: timeout}
	apply(t, w.dp, svc)
	w.setPods(t, Pod{SandboxID: "pod-a", ContainerCgroups: []uint64{w.ctrA.ID(t)}})
	var last time.Time
	dial := func() string {
		t.Helper()
		res, err := w.dialFrom(t, w.ctrA, w.ns)
		if err != nil {
			t.Fatal(err)
		}
		last = time.Now()
		return res.Backend
	}
	first := dial()
	other := map[string]string{"A": "B", "B": "A"}[first]
	start := time.Now()
	for n := 0; time.Since(start) < 2*timeout; n++ {
		time.Sleep(timeout / 4)
		if got := dial(); got != first {
			t.Fatalf("connect %d, %v after the first, used every %v: went to %s, want %s still", n, time.Since(start), timeout/4, got, first)
		}
	}

	// New weights make a new revision; the choice moves to it with its last use.
	podID := w.dp.pods["pod-a"].id
	before := affinityEntry(t, w.dp, webVIP, podID)
	svc.Backends = []Backend{be(addrOf[first], 1), be(addrOf[other], 4000)}
	apply(t, w.dp, svc)
	after := affinityEntry(t, w.dp, webVIP, podID)
	if after.LastUsed != before.LastUsed || after.Rev != w.dp.services[svcKey(webVIP.Addr(), webVIP.Port(), ProtoTCP)].rev {
		t.Fatalf("choice after the new weights: %+v, want %+v carried to the new revision with its last use", after, before)
	}
	if got := dial(); got != first {
		t.Fatalf("connect right after the new weights went to %s, want %s still", got, first)
	}

	// Unused for longer than the timeout, the choice goes: the next socket picks by
	// weight, 4000 to 1 for the other backend. A pick that lands on the old one again is
	// given another timeout.
	repicked := false
	for range 3 {
		time.Sleep(time.Until(last.Add(timeout + 200*time.Millisecond)))
		if dial() == other {
			repicked = true
			break
		}
	}
	if !repicked {
		t.Fatalf("after %v unused, three times over, the pod still went to %s: the choice never expired", timeout, first)
	}
	for i := range 10 {
		if got := dial(); got != other {
			t.Fatalf("connect %d after the new pick went to %s, want %s: the new choice must stick", i, got, other)
		}
	}
}

// With AffinityHost the host netns is one client: its sockets stick to one backend, its
// choice survives a restart, and it goes when host affinity or the service does.
func TestPrivilegedHostAffinity(t *testing.T) {
	w := newPodWorld(t)
	testenv.StartTCPBackend(t, w.ns, "C", beC)
	svc := tcpService("default/web:http", webVIP, be(beA, 1), be(beB, 1), be(beC, 1))
	svc.Policy = ServicePolicy{AffinityPod: true, AffinityHost: true}
	apply(t, w.dp, svc)
	w.setPods(t, Pod{SandboxID: "pod-a", ContainerCgroups: []uint64{w.ctrA.ID(t)}})
	affinityEntries := func(dp *Datapath) int {
		t.Helper()
		n, err := dp.PodMapEntries()
		if err != nil {
			t.Fatal(err)
		}
		return n["affinity"]
	}
	host := w.stuck(t, nil)
	w.stuck(t, w.ctrA)
	if n := affinityEntries(w.dp); n != 2 {
		t.Fatalf("%d affinity entries, want the pod's and the host's", n)
	}
	if v := affinityEntry(t, w.dp, webVIP, hostClientID); backendAddrPort(v.Be) != map[string]netip.AddrPort{"A": beA, "B": beB, "C": beC}[host] {
		t.Fatalf("host's entry %+v, want %s", v, host)
	}

	w.dp.Close()
	dp, err := Load(Options{CgroupRoot: w.cg.Path, BPFFS: w.bpffs, HostNetns: w.ns.Cookie(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	if got := w.stuck(t, nil); got != host {
		t.Fatalf("after a restart the host went to %s, want its choice %s", got, host)
	}

	svc.Policy.AffinityHost = false
	apply(t, dp, svc)
	if n := affinityEntries(dp); n != 1 {
		t.Fatalf("%d affinity entries without host affinity, want the pod's only", n)
	}
	if seen := w.spread(t); len(seen) < 2 {
		t.Fatalf("without host affinity the host still went only to %v", seen)
	}

	svc.Policy.AffinityHost = true
	apply(t, dp, svc)
	w.stuck(t, nil)
	if n := affinityEntries(dp); n != 2 {
		t.Fatalf("%d affinity entries with host affinity back, want 2", n)
	}
	apply(t, dp)
	if n := affinityEntries(dp); n != 0 {
		t.Fatalf("%d affinity entries after the service went, want none", n)
	}
}

// A node port on 127.0.0.1 is the host's: host sockets are balanced, a pod's connect to
// its own 127.0.0.1 reaches its own listener untouched, and so does one from a netns
// podsock does not know.
func TestPrivilegedHostOnlyFrontend(t *testing.T) {
	w := newPodWorld(t)
	nodePort := netip.MustParseAddrPort("127.0.0.1:30080")
	udpPort := netip.MustParseAddrPort("127.0.0.1:30053")
	testenv.StartUDPBackend(t, w.ns, "dnsA", dnsA)
	testenv.StartTCPBackend(t, w.podNS, "pod-loopback", nodePort)
	testenv.StartUDPBackend(t, w.podNS, "pod-loopback-udp", udpPort)
	stranger := testenv.NewNetns(t, vipRanges)
	testenv.StartTCPBackend(t, stranger, "stranger-loopback", nodePort)
	// Nothing listens on the host's loopback: a host connect that works was balanced.
	if _, err := w.dialTo(t, nil, w.ns, nodePort); !errors.Is(err, unix.ECONNREFUSED) {
		t.Fatalf("host connect to %s before the service: %v, want ECONNREFUSED", nodePort, err)
	}
	tcp := tcpService("default/web:http", nodePort, be(beA, 1))
	tcp.HostOnly = true
	udp := udpService("default/dns:dns", udpPort, be(dnsA, 1))
	udp.HostOnly = true
	apply(t, w.dp, tcp, udp)
	// pod-h is a host-network pod: its netns is the host's, so it is balanced too.
	w.setPods(t,
		Pod{SandboxID: "pod-n", NetnsCookie: w.podNS.Cookie(t)},
		Pod{SandboxID: "pod-h", ContainerCgroups: []uint64{w.ctrA.ID(t)}},
	)
	before, err := w.dp.Stats()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		who  string
		cg   *testenv.Cgroup
		ns   *testenv.Netns
		want string
	}{
		{"host", nil, w.ns, "A"},
		{"host-network pod", w.ctrA, w.ns, "A"},
		{"pod netns", nil, w.podNS, "pod-loopback"},
		{"unknown netns", nil, stranger, "stranger-loopback"},
	} {
		res, err := w.dialTo(t, c.cg, c.ns, nodePort)
		if err != nil || res.Backend != c.want || res.Peer != nodePort {
			t.Errorf("%s: connect to %s: %+v %v, want %s with the peer %s", c.who, nodePort, res, err, c.want, nodePort)
		}
	}
	for _, c := range []struct {
		who  string
		ns   *testenv.Netns
		want string
	}{{"host", w.ns, "dnsA"}, {"pod netns", w.podNS, "pod-loopback-udp"}} {
		fd, err := testenv.Socket(c.ns, unix.AF_INET, unix.SOCK_DGRAM)
		if err != nil {
			t.Fatal(err)
		}
		res, err := testenv.UDPExchange(fd, unix.AF_INET, udpPort)
		unix.Close(fd)
		if err != nil || res.Backend != c.want || res.From != udpPort {
			t.Errorf("%s: UDP to %s: %+v %v, want %s answering from %s", c.who, udpPort, res, err, c.want, udpPort)
		}
	}
	after, err := w.dp.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if n := after.Skipped - before.Skipped; n < 3 {
		t.Errorf("%d operations skipped, want the 3 of other netns at least", n)
	}
	if after.Denied != before.Denied {
		t.Errorf("%d operations denied: a host-only frontend skips other netns, it does not deny them", after.Denied-before.Denied)
	}
}

// pinOldMap creates and pins a map of an older layout, with the given entries.
func pinOldMap(t *testing.T, pin string, keySize, valueSize uint32, entries map[string][]byte) {
	t.Helper()
	m, err := ebpf.NewMap(&ebpf.MapSpec{
		Name: filepath.Base(pin), Type: ebpf.Hash, KeySize: keySize, ValueSize: valueSize,
		MaxEntries: 1024, Flags: unix.BPF_F_NO_PREALLOC,
	})
	if err != nil {
		t.Fatalf("create %s: %v", pin, err)
	}
	defer m.Close()
	for k, v := range entries {
		if err := m.Update([]byte(k), v, ebpf.UpdateNoExist); err != nil {
			t.Fatalf("fill %s: %v", pin, err)
		}
	}
	if err := m.Pin(pin); err != nil {
		t.Fatalf("pin %s: %v", pin, err)
	}
}

func encode(t *testing.T, v any) []byte {
	t.Helper()
	b, err := binary.Append(nil, binary.NativeEndian, v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// oldNames is the names map an agent before names of 143 bytes pinned (podsock_name_v1),
// holding the services dp serves now.
func oldNames(t *testing.T, dp *Datapath) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for _, s := range dp.services {
		v := make([]byte, 128)
		copy(v, s.name)
		out[string(encode(t, s.id))] = v
	}
	return out
}

// replacePins puts maps of an older layout in place of the current ones, as an older
// agent would have left them.
func replacePins(t *testing.T, bpffs string, current []string, old map[string]func(pin string)) {
	t.Helper()
	pinDir := filepath.Join(bpffs, PinDirName)
	for _, name := range current {
		if err := os.Remove(filepath.Join(pinDir, name)); err != nil {
			t.Fatal(err)
		}
	}
	for name, create := range old {
		create(filepath.Join(pinDir, name))
	}
}

// requireGone fails unless the pins are gone.
func requireGone(t *testing.T, bpffs string, names ...string) {
	t.Helper()
	for _, name := range names {
		if _, err := os.Stat(filepath.Join(bpffs, PinDirName, name)); !os.IsNotExist(err) {
			t.Errorf("pin %s of the older agent still there (%v)", name, err)
		}
	}
}

// A new datapath adopting the pins of an older agent carries its names (podsock_name_v1, of
// at most 127 bytes) over and removes the old pin: the services keep their names, and a
// restricted service its allowed pods, which pod events and the agent find by name.
func TestPrivilegedOlderAgentsNamesCarriedOver(t *testing.T) {
	w := newPodWorld(t)
	db := tcpService("default/db", apiVIP, be(beB, 1))
	db.Policy = ServicePolicy{Restrict: true, AllowedPods: []string{"pod-a"}}
	apply(t, w.dp, tcpService("default/web", webVIP, be(beA, 1)), db)
	w.setPods(t, Pod{SandboxID: "pod-a", ContainerCgroups: []uint64{w.ctrA.ID(t)}, AllowedServices: []string{"default/db"}})
	names := oldNames(t, w.dp)
	w.dp.Close()
	replacePins(t, w.bpffs, []string{"podsock_name_v2"}, map[string]func(string){
		"podsock_name_v1": func(pin string) { pinOldMap(t, pin, 4, 128, names) },
	})

	dp, err := Load(Options{CgroupRoot: w.cg.Path, BPFFS: w.bpffs, HostNetns: w.ns.Cookie(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	requireGone(t, w.bpffs, "podsock_name_v1")
	got, err := dp.Services()
	if err != nil || len(got) != 2 || got[0].Name != "default/db" || got[1].Name != "default/web" {
		t.Fatalf("services after the upgrade: %+v %v, want default/db and default/web", got, err)
	}
	if got := dp.AllowedSandboxes("default/db"); !slices.Equal(got, []string{"pod-a"}) {
		t.Fatalf("allowed sandboxes of default/db after the upgrade: %v, want pod-a", got)
	}
	if err := dp.SetPod(Pod{SandboxID: "pod-b", ContainerCgroups: []uint64{w.ctrB.ID(t)}, AllowedServices: []string{"default/db"}}); err != nil {
		t.Fatal(err)
	}
	for _, cg := range []*testenv.Cgroup{w.ctrA, w.ctrB} {
		if res, err := w.dialTo(t, cg, w.ns, apiVIP); err != nil || res.Backend != "B" {
			t.Fatalf("allowed pod to default/db after the upgrade: %+v %v, want B", res, err)
		}
	}
	db.Policy.AllowedPods = []string{"pod-a", "pod-b"}
	if res := apply(t, dp, tcpService("default/web", webVIP, be(beA, 1)), db); res.Unchanged != 2 {
		t.Fatalf("the same services after the upgrade: %+v, want both unchanged", res)
	}
}

// A new datapath adopting the pins of an older agent carries its affinity choices
// (podsock_aff_v2 with revisions, or podsock_aff_v1 without) over and removes the old
// pin. A carried choice counts as used at the upgrade, so a service with a timeout keeps
// it too.
func TestPrivilegedOlderAgentsAffinityCarriedOver(t *testing.T) {
	for _, old := range oldAffinityMaps {
		t.Run(old.name, func(t *testing.T) {
			w := newPodWorld(t)
			testenv.StartTCPBackend(t, w.ns, "C", beC)
			// A fresh pick all but always goes to A: reaching C takes the carried choice.
			web := tcpService("default/web", webVIP, be(beA, 1000), be(beC, 1))
			web.Policy = ServicePolicy{AffinityPod: true, AffinityTimeout: time.Minute}
			apply(t, w.dp, web)
			w.setPods(t, Pod{SandboxID: "pod-a", ContainerCgroups: []uint64{w.ctrA.ID(t)}})
			svc := w.dp.services[svcKey(webVIP.Addr(), webVIP.Port(), ProtoTCP)]
			key := socklbPodSvcKey{SvcId: svc.id, PodId: w.dp.pods["pod-a"].id}
			choice := encode(t, backendValue(beC))
			if old.revisions {
				choice = append(choice, encode(t, svc.rev)...)
			}
			w.dp.Close()
			replacePins(t, w.bpffs, []string{"podsock_aff_v3"}, map[string]func(string){
				old.name: func(pin string) {
					pinOldMap(t, pin, 8, old.valueSize, map[string][]byte{string(encode(t, key)): choice})
				},
			})

			dp, err := Load(Options{CgroupRoot: w.cg.Path, BPFFS: w.bpffs, HostNetns: w.ns.Cookie(t)})
			if err != nil {
				t.Fatal(err)
			}
			defer dp.Close()
			requireGone(t, w.bpffs, old.name)
			now, err := monotonicNow()
			if err != nil {
				t.Fatal(err)
			}
			var v socklbAffValue
			if err := dp.objs.PodsockAffV3.Lookup(&key, &v); err != nil {
				t.Fatalf("carried choice: %v", err)
			}
			if backendAddrPort(v.Be) != beC || v.Rev != svc.rev || now-v.LastUsed > uint64(10*time.Second) {
				t.Fatalf("carried choice %+v, want %s at revision %d used just now (%d)", v, beC, svc.rev, now)
			}
			for i := range 10 {
				if res, err := w.dialFrom(t, w.ctrA, w.ns); err != nil || res.Backend != "C" {
					t.Fatalf("connect %d of the pod after the upgrade: %+v %v, want its carried choice C", i, res, err)
				}
			}
		})
	}
}

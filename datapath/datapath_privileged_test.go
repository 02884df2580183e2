package datapath

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/test/testenv"
)

var (
	vipRanges = []string{"10.96.0.0/12", "fd00:96::/108"}
	webVIP    = netip.MustParseAddrPort("10.96.0.20:80")
	dnsVIP    = netip.MustParseAddrPort("10.96.0.53:53")
	web6VIP   = netip.MustParseAddrPort("[fd00:96::20]:80")
	emptyVIP  = netip.MustParseAddrPort("10.96.0.99:80")
	beA       = netip.MustParseAddrPort("10.88.0.5:8080")
	beB       = netip.MustParseAddrPort("10.88.0.6:8080")
	beC       = netip.MustParseAddrPort("10.88.0.7:8080")
	dnsA      = netip.MustParseAddrPort("10.88.0.5:5353")
	dnsB      = netip.MustParseAddrPort("10.88.0.6:5353")
	be6A      = netip.MustParseAddrPort("[fd00:88::5]:8080")
	be6B      = netip.MustParseAddrPort("[fd00:88::6]:8080")
)

// fixture is one test's world: a child cgroup the test process runs in, a netns holding
// the backends and the clients, and a private bpffs for the pins.
type fixture struct {
	t     *testing.T
	cg    *testenv.Cgroup
	ns    *testenv.Netns
	bpffs string
}

func newFixture(t *testing.T) *fixture {
	testenv.RequirePrivileged(t)
	f := &fixture{t: t}
	f.cg = testenv.NewCgroup(t)
	f.ns = testenv.NewNetns(t, vipRanges,
		"10.88.0.5/32", "10.88.0.6/32", "10.88.0.7/32", "fd00:88::5/128", "fd00:88::6/128")
	f.bpffs = testenv.BPFFS(t)
	// Whatever a test loaded, even if it failed before registering its own cleanup,
	// is detached before the bpffs goes away.
	t.Cleanup(func() {
		if err := Cleanup(f.bpffs); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	f.cg.EnterSelf(t)
	// Without podsock the VIP must not answer: the blackhole route rejects it locally.
	if _, err := testenv.DialTCP(f.ns, 0, webVIP, false); !testenv.IsUnreachable(err) {
		t.Fatalf("VIP %s answered without podsock (err %v): test would prove nothing", webVIP, err)
	}
	return f
}

func (f *fixture) load() *Datapath {
	f.t.Helper()
	dp, err := Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs})
	if err != nil {
		f.t.Fatalf("load datapath: %v", err)
	}
	f.t.Cleanup(func() {
		dp.Close()
		if err := Cleanup(f.bpffs); err != nil {
			f.t.Errorf("cleanup: %v", err)
		}
	})
	return dp
}

func apply(t *testing.T, dp *Datapath, svcs ...Service) ApplyResult {
	t.Helper()
	res, err := dp.Apply(svcs)
	if err != nil {
		t.Fatalf("apply: %v", err)
	}
	return res
}

func tcpService(name string, vip netip.AddrPort, backends ...Backend) Service {
	return Service{Name: name, VIP: vip.Addr(), Port: vip.Port(), Proto: ProtoTCP, Backends: backends}
}

func udpService(name string, vip netip.AddrPort, backends ...Backend) Service {
	s := tcpService(name, vip, backends...)
	s.Proto = ProtoUDP
	return s
}

func be(ap netip.AddrPort, weight uint32) Backend { return Backend{Addr: ap, Weight: weight} }

func TestPrivilegedTCPWeightsAndPeerName(t *testing.T) {
	f := newFixture(t)
	a := testenv.StartTCPBackend(t, f.ns, "A", beA)
	b := testenv.StartTCPBackend(t, f.ns, "B", beB)
	dp := f.load()
	apply(t, dp, tcpService("default/web", webVIP, be(beA, 1), be(beB, 3)))

	const n = 800
	for i := range n {
		res, err := testenv.DialTCP(f.ns, 0, webVIP, false)
		if err != nil {
			t.Fatalf("connect %d through VIP: %v", i, err)
		}
		if res.Peer != webVIP {
			t.Fatalf("getpeername = %s, want the VIP %s", res.Peer, webVIP)
		}
	}
	ha, hb := a.Hits(), b.Hits()
	if ha+hb != n {
		t.Fatalf("backends answered %d+%d connections, want %d", ha, hb, n)
	}
	// Weight 1:3, so A should get 200 of 800; 5 standard deviations is ±61.
	if ha < 139 || ha > 261 {
		t.Fatalf("backend A got %d of %d connections with weight 1:3, want about 200", ha, n)
	}
	st, err := dp.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.Connects < n {
		t.Fatalf("datapath counted %d connects, want >= %d", st.Connects, n)
	}
}

func TestPrivilegedUDPReplySourceIsVIP(t *testing.T) {
	f := newFixture(t)
	testenv.StartUDPBackend(t, f.ns, "A", dnsA)
	testenv.StartUDPBackend(t, f.ns, "B", dnsB)
	dp := f.load()
	apply(t, dp, udpService("kube-system/dns", dnsVIP, be(dnsA, 1), be(dnsB, 1)))

	t.Run("unconnected", func(t *testing.T) {
		seen := map[string]bool{}
		for range 32 {
			fd, err := testenv.Socket(f.ns, unix.AF_INET, unix.SOCK_DGRAM)
			if err != nil {
				t.Fatal(err)
			}
			first := ""
			for range 5 {
				res, err := testenv.UDPExchange(fd, unix.AF_INET, dnsVIP)
				if err != nil {
					unix.Close(fd)
					t.Fatal(err)
				}
				if res.From != dnsVIP {
					t.Fatalf("recvfrom source = %s, want the VIP %s", res.From, dnsVIP)
				}
				if first == "" {
					first = res.Backend
				} else if res.Backend != first {
					t.Fatalf("one unconnected socket reached %s then %s: not sticky", first, res.Backend)
				}
			}
			seen[first] = true
			unix.Close(fd)
		}
		if !seen["A"] || !seen["B"] {
			t.Fatalf("32 sockets reached only %v, want both backends", seen)
		}
	})

	t.Run("connected", func(t *testing.T) {
		fd, err := testenv.Socket(f.ns, unix.AF_INET, unix.SOCK_DGRAM)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		if err := testenv.Connect(fd, testenv.Sockaddr(unix.AF_INET, dnsVIP)); err != nil {
			t.Fatalf("connect UDP to VIP: %v", err)
		}
		peer, err := unix.Getpeername(fd)
		if err != nil {
			t.Fatal(err)
		}
		if got := testenv.AddrPort(peer); got != dnsVIP {
			t.Fatalf("getpeername = %s, want the VIP %s", got, dnsVIP)
		}
		res, err := testenv.UDPExchange(fd, unix.AF_INET, netip.AddrPort{})
		if err != nil {
			t.Fatal(err)
		}
		if res.From != dnsVIP || (res.Backend != "A" && res.Backend != "B") {
			t.Fatalf("connected UDP reply from %s by %q, want the VIP and a backend", res.From, res.Backend)
		}
	})

	t.Run("sendmsg then connect keeps the backend", func(t *testing.T) {
		for range 8 {
			fd, err := testenv.Socket(f.ns, unix.AF_INET, unix.SOCK_DGRAM)
			if err != nil {
				t.Fatal(err)
			}
			first, err := testenv.UDPExchange(fd, unix.AF_INET, dnsVIP)
			if err != nil {
				t.Fatal(err)
			}
			if err := testenv.Connect(fd, testenv.Sockaddr(unix.AF_INET, dnsVIP)); err != nil {
				t.Fatal(err)
			}
			second, err := testenv.UDPExchange(fd, unix.AF_INET, netip.AddrPort{})
			unix.Close(fd)
			if err != nil {
				t.Fatal(err)
			}
			if first.Backend != second.Backend {
				t.Fatalf("socket switched from %s to %s on connect()", first.Backend, second.Backend)
			}
		}
	})
}

func TestPrivilegedIPv6AndV4Mapped(t *testing.T) {
	f := newFixture(t)
	testenv.StartTCPBackend(t, f.ns, "A6", be6A)
	testenv.StartTCPBackend(t, f.ns, "B6", be6B)
	testenv.StartTCPBackend(t, f.ns, "A", beA)
	testenv.StartUDPBackend(t, f.ns, "U6", netip.MustParseAddrPort("[fd00:88::5]:5353"))
	dp := f.load()
	dns6VIP := netip.MustParseAddrPort("[fd00:96::53]:53")
	apply(t, dp,
		tcpService("default/web6", web6VIP, be(be6A, 1), be(be6B, 1)),
		tcpService("default/web", webVIP, be(beA, 1)),
		udpService("default/dns6", dns6VIP, be(netip.MustParseAddrPort("[fd00:88::5]:5353"), 1)))

	seen := map[string]bool{}
	for range 64 {
		res, err := testenv.DialTCP(f.ns, unix.AF_INET6, web6VIP, false)
		if err != nil {
			t.Fatalf("IPv6 connect through VIP: %v", err)
		}
		if res.Peer != web6VIP {
			t.Fatalf("IPv6 getpeername = %s, want %s", res.Peer, web6VIP)
		}
		seen[res.Backend] = true
	}
	if !seen["A6"] || !seen["B6"] {
		t.Fatalf("IPv6 service reached %v, want both backends", seen)
	}

	// An AF_INET6 socket connecting to ::ffff:10.96.0.20 must hit the IPv4 service.
	res, err := testenv.DialTCP(f.ns, unix.AF_INET6, webVIP, false)
	if err != nil {
		t.Fatalf("v4-mapped connect through VIP: %v", err)
	}
	if res.Backend != "A" || res.Peer != webVIP {
		t.Fatalf("v4-mapped connect reached %q, peer %s; want A and the VIP %s", res.Backend, res.Peer, webVIP)
	}

	fd, err := testenv.Socket(f.ns, unix.AF_INET6, unix.SOCK_DGRAM)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	ures, err := testenv.UDPExchange(fd, unix.AF_INET6, dns6VIP)
	if err != nil {
		t.Fatal(err)
	}
	if ures.Backend != "U6" || ures.From != dns6VIP {
		t.Fatalf("IPv6 UDP reply by %q from %s, want U6 from the VIP %s", ures.Backend, ures.From, dns6VIP)
	}
}

func TestPrivilegedNoBackendsFailFast(t *testing.T) {
	f := newFixture(t)
	dp := f.load()
	apply(t, dp, tcpService("default/empty", emptyVIP), udpService("default/empty-udp", emptyVIP))

	start := time.Now()
	_, err := testenv.DialTCP(f.ns, 0, emptyVIP, false)
	if !errors.Is(err, unix.ECONNREFUSED) {
		t.Fatalf("TCP connect to a service without backends: %v, want ECONNREFUSED", err)
	}
	if d := time.Since(start); d > 100*time.Millisecond {
		t.Fatalf("refusal took %v, want immediate", d)
	}

	fd, err := testenv.Socket(f.ns, unix.AF_INET, unix.SOCK_DGRAM)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Sendto(fd, []byte("x"), 0, testenv.Sockaddr(unix.AF_INET, emptyVIP)); !errors.Is(err, unix.ECONNREFUSED) {
		t.Fatalf("UDP sendto a service without backends: %v, want ECONNREFUSED", err)
	}
	if err := testenv.Connect(fd, testenv.Sockaddr(unix.AF_INET, emptyVIP)); !errors.Is(err, unix.ECONNREFUSED) {
		t.Fatalf("UDP connect to a service without backends: %v, want ECONNREFUSED", err)
	}
	st, _ := dp.Stats()
	if st.NoBackend < 3 {
		t.Fatalf("no_backend counter = %d, want >= 3", st.NoBackend)
	}
}

func TestPrivilegedRemovedBackendGetsNoNewConnects(t *testing.T) {
	f := newFixture(t)
	a := testenv.StartTCPBackend(t, f.ns, "A", beA)
	b := testenv.StartTCPBackend(t, f.ns, "B", beB)
	dp := f.load()
	apply(t, dp, tcpService("default/web", webVIP, be(beA, 1), be(beB, 1)))
	for range 50 {
		if _, err := testenv.DialTCP(f.ns, 0, webVIP, false); err != nil {
			t.Fatal(err)
		}
	}
	if b.Hits() == 0 {
		t.Fatal("backend B got no connections before its removal")
	}
	res := apply(t, dp, tcpService("default/web", webVIP, be(beA, 1)))
	if res.Updated != 1 || len(res.RemovedBackends) != 1 || res.RemovedBackends[0].Backend != beB ||
		res.RemovedBackends[0].Service != "default/web" || res.RemovedBackends[0].VIP != webVIP {
		t.Fatalf("apply result %+v, want one update that removed %s", res, beB)
	}
	before := b.Hits()
	for range 200 {
		r, err := testenv.DialTCP(f.ns, 0, webVIP, false)
		if err != nil {
			t.Fatal(err)
		}
		if r.Backend != "A" {
			t.Fatalf("connect after removal reached %s", r.Backend)
		}
	}
	if b.Hits() != before || a.Hits() < 200 {
		t.Fatalf("after removal: A %d, B %d (was %d)", a.Hits(), b.Hits(), before)
	}
}

// Connects racing with updates must always see a whole backend set, old or new.
func TestPrivilegedUpdateIsAtomicForConcurrentConnects(t *testing.T) {
	f := newFixture(t)
	testenv.StartTCPBackend(t, f.ns, "A", beA)
	testenv.StartTCPBackend(t, f.ns, "B", beB)
	testenv.StartTCPBackend(t, f.ns, "C", beC)
	dp := f.load()
	sets := [][]Backend{{be(beA, 1)}, {be(beB, 2), be(beC, 1)}}
	apply(t, dp, tcpService("default/web", webVIP, sets[0]...))

	stop := make(chan struct{})
	var applyErr error
	applied := make(chan struct{})
	go func() {
		defer close(applied)
		for i := 1; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := dp.Apply([]Service{tcpService("default/web", webVIP, sets[i%2]...)}); err != nil {
				applyErr = err
				return
			}
		}
	}()
	// Several clients at once, each checking every answer came from a backend of one of
	// the two sets and that no connect was refused or lost.
	const clients, perClient = 4, 400
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perClient {
				r, err := testenv.DialTCP(f.ns, 0, webVIP, false)
				if err == nil && r.Backend != "A" && r.Backend != "B" && r.Backend != "C" {
					err = fmt.Errorf("answer from %q", r.Backend)
				}
				if err != nil {
					errs <- fmt.Errorf("connect %d during updates: %w", i, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-applied
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if applyErr != nil {
		t.Fatal(applyErr)
	}
}

func attachedCount(t *testing.T, cgroup string, attach ebpf.AttachType) int {
	t.Helper()
	fd, err := os.Open(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(fd.Fd()), Attach: attach})
	if err != nil {
		t.Fatalf("query %s programs: %v", attach, err)
	}
	return len(res.Programs)
}

func TestPrivilegedPinsSurviveAndAreAdopted(t *testing.T) {
	f := newFixture(t)
	testenv.StartTCPBackend(t, f.ns, "A", beA)
	dp, err := Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs})
	if err != nil {
		t.Fatal(err)
	}
	if dp.AdoptedLinks() != 0 {
		t.Fatalf("fresh load adopted %d links", dp.AdoptedLinks())
	}
	apply(t, dp, tcpService("default/web", webVIP, be(beA, 1)))
	dp.Close()

	// The loader is gone; the pinned links keep balancing.
	if r, err := testenv.DialTCP(f.ns, 0, webVIP, false); err != nil || r.Backend != "A" {
		t.Fatalf("connect after the loader closed: %+v %v", r, err)
	}

	dp2 := f.load()
	// The new programs read a port filter of their own, filled from the pins before they
	// attached: the service serves before any Apply.
	if r, err := testenv.DialTCP(f.ns, 0, webVIP, false); err != nil || r.Backend != "A" {
		t.Fatalf("connect after a new loader adopted the pins: %+v %v", r, err)
	}
	if dp2.AdoptedLinks() != len(attachPoints) {
		t.Fatalf("reload adopted %d links, want %d", dp2.AdoptedLinks(), len(attachPoints))
	}
	for _, ap := range attachPoints {
		if n := attachedCount(t, f.cg.Path, ap.attach); n != 1 {
			t.Fatalf("%s: %d programs attached after adoption, want 1", ap.name, n)
		}
	}
	svcs, err := dp2.Services()
	if err != nil {
		t.Fatal(err)
	}
	if len(svcs) != 1 || svcs[0].Name != "default/web" || svcs[0].Backends[0].Addr != beA {
		t.Fatalf("adopted services = %+v", svcs)
	}
	// Before any Apply the counts come from what was adopted.
	if n, backends := dp2.Counts(); n != 1 || backends != 1 {
		t.Fatalf("adopted counts: %d services, %d backends; want 1, 1", n, backends)
	}
	res := apply(t, dp2, tcpService("default/web", webVIP, be(beA, 1)))
	if res.Unchanged != 1 || res.Added+res.Updated+res.Removed != 0 {
		t.Fatalf("re-applying the same config after adoption changed something: %+v", res)
	}
	if !dp2.Attached() {
		t.Fatal("adopted datapath reports not attached")
	}
}

// The port filter lets connects to ports no service uses skip the service lookup: it
// must follow every change of ports, or a service on a new port would be passed by.
func TestPrivilegedPortFilterFollowsServices(t *testing.T) {
	f := newFixture(t)
	testenv.StartTCPBackend(t, f.ns, "A", beA)
	alt := netip.MustParseAddrPort("10.88.0.5:8081")
	testenv.StartTCPBackend(t, f.ns, "alt", alt)
	dp := f.load()
	moved := netip.AddrPortFrom(webVIP.Addr(), 8443)
	apply(t, dp, tcpService("default/web", webVIP, be(beA, 1)), udpService("default/dns", dnsVIP, be(dnsA, 1)))
	wantPorts(t, dp, map[socklbSvcKey]bool{svcKey(webVIP.Addr(), 80, ProtoTCP): true, svcKey(dnsVIP.Addr(), 53, ProtoUDP): true})
	if r, err := testenv.DialTCP(f.ns, 0, webVIP, false); err != nil || r.Backend != "A" {
		t.Fatalf("connect to %s: %+v %v", webVIP, r, err)
	}

	// The service moves to another port: the new one serves at once, the old one is gone.
	apply(t, dp, tcpService("default/web", moved, be(alt, 1)))
	wantPorts(t, dp, map[socklbSvcKey]bool{svcKey(moved.Addr(), moved.Port(), ProtoTCP): true})
	if r, err := testenv.DialTCP(f.ns, 0, moved, false); err != nil || r.Backend != "alt" {
		t.Fatalf("connect to %s after the move: %+v %v", moved, r, err)
	}
	if _, err := testenv.DialTCP(f.ns, 0, webVIP, false); !testenv.IsUnreachable(err) {
		t.Fatalf("connect to the old port %s: %v, want the blackhole's error", webVIP, err)
	}
	apply(t, dp)
	wantPorts(t, dp, nil)
}

// wantPorts checks that the port filter in the kernel holds exactly the ports of want.
func wantPorts(t *testing.T, dp *Datapath, want map[socklbSvcKey]bool) {
	t.Helper()
	exp := portsOf(want)
	for i := range exp {
		var got uint64
		if err := dp.objs.PodsockSvcportV1.Lookup(uint32(i), &got); err != nil {
			t.Fatal(err)
		}
		if got != exp[i] {
			t.Fatalf("port filter word %d = %#x, want %#x", i, got, exp[i])
		}
	}
}

func TestPrivilegedCleanupRemovesEverything(t *testing.T) {
	f := newFixture(t)
	testenv.StartTCPBackend(t, f.ns, "A", beA)
	dp, err := Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs})
	if err != nil {
		t.Fatal(err)
	}
	apply(t, dp, tcpService("default/web", webVIP, be(beA, 1)))
	dp.Close()
	if err := Cleanup(f.bpffs); err != nil {
		t.Fatal(err)
	}
	for _, ap := range attachPoints {
		if n := attachedCount(t, f.cg.Path, ap.attach); n != 0 {
			t.Fatalf("%s: %d programs still attached after cleanup", ap.name, n)
		}
	}
	if _, err := os.Stat(filepath.Join(f.bpffs, PinDirName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pin dir still there after cleanup: %v", err)
	}
	if _, err := testenv.DialTCP(f.ns, 0, webVIP, false); !testenv.IsUnreachable(err) {
		t.Fatalf("VIP still answers after cleanup: %v", err)
	}
}

func TestPrivilegedReattachWhenCgroupRootChanges(t *testing.T) {
	f := newFixture(t)
	dp, err := Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs})
	if err != nil {
		t.Fatal(err)
	}
	dp.Close()
	other := testenv.NewCgroup(t)
	dp3, err := Load(Options{CgroupRoot: other.Path, BPFFS: f.bpffs})
	if err != nil {
		t.Fatal(err)
	}
	defer Cleanup(f.bpffs)
	defer dp3.Close()
	if dp3.AdoptedLinks() != 0 {
		t.Fatalf("adopted %d links of another cgroup", dp3.AdoptedLinks())
	}
	for _, ap := range attachPoints {
		if n := attachedCount(t, f.cg.Path, ap.attach); n != 0 {
			t.Fatalf("%s still attached to the old cgroup root", ap.name)
		}
		if n := attachedCount(t, other.Path, ap.attach); n != 1 {
			t.Fatalf("%s: %d programs on the new cgroup root, want 1", ap.name, n)
		}
	}
}

// linkPrograms is the program each pinned link runs.
func linkPrograms(t *testing.T, bpffs string) map[string]ebpf.ProgramID {
	t.Helper()
	out := map[string]ebpf.ProgramID{}
	for _, ap := range attachPoints {
		l, err := link.LoadPinnedLink(filepath.Join(bpffs, "podsock", "links", ap.name), nil)
		if err != nil {
			t.Fatal(err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			t.Fatal(err)
		}
		out[ap.name] = info.Program
	}
	return out
}

// An agent whose switch of the adopted links fails halfway puts the links it switched
// back: every hook keeps running the previous agent's programs, none this run's.
func TestPrivilegedFailedSwitchOfAdoptedLinksIsUndone(t *testing.T) {
	f := newFixture(t)
	dp, err := Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs})
	if err != nil {
		t.Fatal(err)
	}
	defer Cleanup(f.bpffs)
	dp.Close()
	before := linkPrograms(t, f.bpffs)

	update := updateLink
	defer func() { updateLink = update }()
	n := 0
	updateLink = func(l link.Link, prog *ebpf.Program) error {
		n++
		if n == 3 {
			return errors.New("injected: the kernel refused the update")
		}
		return update(l, prog)
	}
	if _, err := Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs}); err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("load with a failing switch: %v, want the injected error", err)
	}
	if n < 3+2 {
		t.Fatalf("%d link updates, want 2 switched, 1 refused and the 2 switched back", n)
	}
	if after := linkPrograms(t, f.bpffs); !maps.Equal(after, before) {
		t.Fatalf("links run %v after the failed switch, want the previous programs %v", after, before)
	}
	for _, ap := range attachPoints {
		if c := attachedCount(t, f.cg.Path, ap.attach); c != 1 {
			t.Fatalf("%s: %d programs attached, want the one link", ap.name, c)
		}
	}

	updateLink = update
	dp2, err := Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs})
	if err != nil {
		t.Fatal(err)
	}
	defer dp2.Close()
	if dp2.AdoptedLinks() != len(attachPoints) {
		t.Fatalf("adopted %d links, want %d", dp2.AdoptedLinks(), len(attachPoints))
	}
	for name, id := range linkPrograms(t, f.bpffs) {
		if id == before[name] {
			t.Fatalf("%s still runs the previous program after a good switch", name)
		}
	}
}

// A reply still in flight from a backend the service just dropped must show the VIP too.
// A connected UDP socket whose re-connect to another service is denied (EPERM) or
// refused (no backends) stays connected to its backend, and its replies still show the
// VIP: the kernel keeps the old peer, so the LB state must stay too.
func TestPrivilegedUDPRefusedReconnectKeepsState(t *testing.T) {
	f := newFixture(t)
	testenv.StartUDPBackend(t, f.ns, "A", dnsA)
	dp := f.load()
	restricted := udpService("kube-system/private", dns2VIP, be(dnsA, 1))
	restricted.Policy = ServicePolicy{Restrict: true}
	apply(t, dp, udpService("kube-system/dns", dnsVIP, be(dnsA, 1)), restricted,
		udpService("kube-system/empty", emptyVIP))
	fd, err := testenv.Socket(f.ns, unix.AF_INET, unix.SOCK_DGRAM)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, testenv.Sockaddr(unix.AF_INET, dnsVIP)); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		to   netip.AddrPort
		want unix.Errno
	}{{dns2VIP, unix.EPERM}, {emptyVIP, unix.ECONNREFUSED}} {
		if err := unix.Connect(fd, testenv.Sockaddr(unix.AF_INET, c.to)); !errors.Is(err, c.want) {
			t.Fatalf("re-connect to %s: %v, want %v", c.to, err, c.want)
		}
		res, err := testenv.UDPExchange(fd, unix.AF_INET, netip.AddrPort{})
		if err != nil || res.Backend != "A" || res.From != dnsVIP {
			t.Fatalf("after the re-connect to %s was refused: %+v %v, want A answering from the VIP %s", c.to, res, err, dnsVIP)
		}
		sa, err := unix.Getpeername(fd)
		if err != nil || testenv.AddrPort(sa) != dnsVIP {
			t.Fatalf("getpeername after the refused re-connect: %v %v, want the VIP", sa, err)
		}
	}
}

func TestPrivilegedUDPLateReplyAfterServiceChangeShowsVIP(t *testing.T) {
	f := newFixture(t)
	testenv.StartDelayedUDPBackend(t, f.ns, "slow-A", dnsA, 300*time.Millisecond)
	testenv.StartUDPBackend(t, f.ns, "B", dnsB)
	dp := f.load()
	apply(t, dp, udpService("kube-system/dns", dnsVIP, be(dnsA, 1)))

	fd, err := testenv.Socket(f.ns, unix.AF_INET, unix.SOCK_DGRAM)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Sendto(fd, []byte("q1"), 0, testenv.Sockaddr(unix.AF_INET, dnsVIP)); err != nil {
		t.Fatal(err)
	}
	apply(t, dp, udpService("kube-system/dns", dnsVIP, be(dnsB, 1)))
	// The next datagram goes to B and B answers at once; A's late answer follows.
	res, err := testenv.UDPExchange(fd, unix.AF_INET, dnsVIP)
	if err != nil {
		t.Fatal(err)
	}
	if res.Backend != "B" || res.From != dnsVIP {
		t.Fatalf("after the change: reply by %q from %s, want B from the VIP", res.Backend, res.From)
	}
	buf := make([]byte, 64)
	n, from, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		t.Fatalf("late reply: %v", err)
	}
	if got := testenv.AddrPort(from); string(buf[:n]) != "slow-A" || got != dnsVIP {
		t.Fatalf("late reply by %q from %s, want slow-A from the VIP %s", buf[:n], got, dnsVIP)
	}
}

// Two services sharing a backend, used from one unconnected socket: each reply must show
// the VIP the socket just sent to, not the other one.
func TestPrivilegedUDPSharedBackendShowsTheVIPJustUsed(t *testing.T) {
	f := newFixture(t)
	testenv.StartUDPBackend(t, f.ns, "A", dnsA)
	dp := f.load()
	otherVIP := netip.MustParseAddrPort("10.96.0.54:53")
	apply(t, dp, udpService("ns/dns-1", dnsVIP, be(dnsA, 1)), udpService("ns/dns-2", otherVIP, be(dnsA, 1)))

	fd, err := testenv.Socket(f.ns, unix.AF_INET, unix.SOCK_DGRAM)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	for i, vip := range []netip.AddrPort{dnsVIP, otherVIP, dnsVIP, otherVIP, otherVIP, dnsVIP} {
		res, err := testenv.UDPExchange(fd, unix.AF_INET, vip)
		if err != nil {
			t.Fatal(err)
		}
		if res.From != vip || res.Backend != "A" {
			t.Fatalf("exchange %d with %s: reply by %q from %s", i, vip, res.Backend, res.From)
		}
	}
}

// Two agents (or an agent and a cleanup) never work on the same pins at once.
func TestPrivilegedPinDirIsExclusive(t *testing.T) {
	f := newFixture(t)
	f.load()
	other := testenv.NewCgroup(t)
	if _, err := Load(Options{CgroupRoot: other.Path, BPFFS: f.bpffs}); !errors.Is(err, ErrPinDirBusy) {
		t.Fatalf("second Load on held pins: %v, want ErrPinDirBusy", err)
	}
	if err := Cleanup(f.bpffs); !errors.Is(err, ErrPinDirBusy) {
		t.Fatalf("Cleanup under a running datapath: %v, want ErrPinDirBusy", err)
	}
	for _, ap := range attachPoints {
		if n := attachedCount(t, f.cg.Path, ap.attach); n != 1 {
			t.Fatalf("%s: %d programs after the refused attempts, want 1", ap.name, n)
		}
	}
}

// 1,000 backend updates (add, remove, reweight) under concurrent connects: no connect that
// started after the Apply that removed a backend returned reaches that backend, and no
// connect is refused while the service has a backend (it always has one here).
func TestPrivilegedBackendChurnUnderConnects(t *testing.T) {
	f := newFixture(t)
	ids := []string{"A", "B", "C", "D", "E"}
	addr := map[string]netip.AddrPort{}
	ns := testenv.NewNetns(t, vipRanges, "10.88.0.5/32", "10.88.0.6/32", "10.88.0.7/32", "10.88.0.8/32", "10.88.0.9/32")
	for i, id := range ids {
		addr[id] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 88, 0, byte(5 + i)}), 8080)
		testenv.StartTCPBackend(t, ns, id, addr[id])
	}
	dp := f.load()
	type version struct {
		start, done time.Time
		set         map[string]bool
	}
	rng := rand.New(rand.NewPCG(3, 4))
	pick := func() (map[string]bool, []Backend) {
		set := map[string]bool{}
		var bs []Backend
		for _, id := range ids {
			if rng.IntN(2) == 0 {
				set[id] = true
				bs = append(bs, be(addr[id], uint32(1+rng.IntN(5))))
			}
		}
		if len(bs) == 0 {
			id := ids[rng.IntN(len(ids))]
			set[id] = true
			bs = append(bs, be(addr[id], 1))
		}
		return set, bs
	}
	set, bs := pick()
	apply(t, dp, tcpService("default/web", webVIP, bs...))
	versions := []version{{set: set}}

	type dial struct {
		start, end time.Time
		backend    string
		err        error
	}
	var mu sync.Mutex
	var dials []dial
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		testenv.Repeat(stop, &wg, func() {
			d := dial{start: time.Now()}
			r, err := testenv.DialTCP(ns, 0, webVIP, false)
			d.end, d.backend, d.err = time.Now(), r.Backend, err
			mu.Lock()
			dials = append(dials, d)
			mu.Unlock()
		})
	}
	updates := testenv.Rounds(1000)
	for range updates {
		set, bs := pick()
		v := version{start: time.Now(), set: set}
		apply(t, dp, tcpService("default/web", webVIP, bs...))
		v.done = time.Now()
		versions = append(versions, v)
		// Connects land before, during and after each switch.
		time.Sleep(time.Duration(rng.IntN(2000)) * time.Microsecond)
	}
	close(stop)
	wg.Wait()

	stale, refused := 0, 0
	for _, d := range dials {
		if d.err != nil {
			refused++
			t.Logf("connect refused while the service had backends: %v", d.err)
			continue
		}
		// The backends the connect may have seen: the version in force when it started,
		// and every version whose Apply began before it ended.
		allowed := map[string]bool{}
		latest := 0 // the last version whose Apply returned before the connect started
		for i, v := range versions {
			if i > 0 && !v.done.After(d.start) {
				latest = i
			}
		}
		maps.Copy(allowed, versions[latest].set)
		for _, v := range versions[latest+1:] {
			if v.start.Before(d.end) {
				maps.Copy(allowed, v.set)
			}
		}
		if !allowed[d.backend] {
			stale++
		}
	}
	t.Logf("%d backend updates, %d concurrent connects: %d reached a backend removed before they started, %d refused", updates, len(dials), stale, refused)
	if stale != 0 || refused != 0 || len(dials) < updates {
		t.Fatalf("%d stale, %d refused of %d connects, want 0 and 0 (and at least %d connects)", stale, refused, len(dials), updates)
	}
}

// Slots are written in one batch per service where the kernel can, else one by one; both
// must leave the same tables, and a revision's switch must drop the old ones either way.
func TestPrivilegedSlotsWithAndWithoutBatches(t *testing.T) {
	for _, oneByOne := range []bool{false, true} {
		t.Run(fmt.Sprintf("one by one %v", oneByOne), func(t *testing.T) {
			f := newFixture(t)
			dp := f.load()
			dp.slotsOneByOne = oneByOne
			for _, backends := range [][]Backend{{be(beA, 1), be(beB, 3)}, {be(beB, 2)}, {be(beA, 1), be(beB, 1)}} {
				want := tcpService("default/web", webVIP, backends...)
				apply(t, dp, want)
				got, err := dp.Services()
				if err != nil {
					t.Fatal(err)
				}
				if len(got) != 1 || !slices.Equal(got[0].Backends, weightsFromSlots(expandSlots(backends, 4096))) {
					t.Fatalf("services read back %+v, want the backends %v", got, backends)
				}
				if n, err := countEntries(dp.objs.PodsockSlotV1); err != nil || n != len(expandSlots(backends, 4096)) {
					t.Fatalf("%d slots in the map (%v), want only the current revision's %d", n, err, len(expandSlots(backends, 4096)))
				}
			}
		})
	}
}

// The entries status and /metrics report come from the kernel's own counts, and agree with
// a walk of each map, for maps written by the agent and by the programs alike; where the
// kernel keeps no counts, the walk gives the same figures.
func TestPrivilegedMapStatsAgreeWithTheMaps(t *testing.T) {
	f := newFixture(t)
	testenv.StartTCPBackend(t, f.ns, "A", beA)
	testenv.StartTCPBackend(t, f.ns, "B", beB)
	dp := f.load()
	if dp.mapCounts == nil {
		testenv.SkipOrFail(t, "kernel keeps no map entry counts for podsock: "+dp.mapCountsErr.Error())
	}
	webBackends := []Backend{be(beA, 1), be(beB, 3)}
	apply(t, dp, tcpService("default/web", webVIP, webBackends...), udpService("kube-system/dns", dnsVIP, be(beA, 1)))
	// A balanced connect makes the programs write a {service, backend, netns} count.
	r, err := testenv.DialTCP(f.ns, 0, webVIP, true)
	if err != nil {
		t.Fatalf("connect through the VIP: %v", err)
	}
	keepOpen(t, r.FD)

	entries := func() map[string]int {
		t.Helper()
		stats, err := dp.MapStats()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]int{}
		for _, s := range stats {
			out[s.Name] = s.Entries
		}
		return out
	}
	fromKernel := entries()
	for name, want := range map[string]int{
		"podsock_svc_v1":  2,
		"podsock_slot_v1": len(expandSlots(webBackends, 4096)) + len(expandSlots([]Backend{be(beA, 1)}, 4096)),
	} {
		if fromKernel[name] != want {
			t.Errorf("%s: %d entries from the kernel's count, want %d", name, fromKernel[name], want)
		}
	}
	coll := mapsByName(&dp.objs.socklbMaps)
	written := 0
	for name, m := range coll {
		if !isHash(m.Type()) {
			continue
		}
		walked, err := countEntries(m)
		if err != nil {
			t.Fatal(err)
		}
		if fromKernel[name] != walked {
			t.Errorf("%s: %d entries from the kernel's count, %d walked", name, fromKernel[name], walked)
		}
		if name == "podsock_svcnetns_v2" {
			written = walked
		}
	}
	if written == 0 {
		t.Errorf("podsock_svcnetns_v2 holds no count of the balanced connect: the test proves nothing of what the programs write")
	}

	// The fallback, as on a kernel that refuses the iterator: the same figures.
	counter := dp.mapCounts
	dp.mapCounts = nil
	walked := entries()
	dp.mapCounts = counter
	if !maps.Equal(walked, fromKernel) {
		t.Errorf("entries walked %v, from the kernel's counts %v", walked, fromKernel)
	}
}

// New services are written in batches of map writes. A frontend that holds a stray entry
// (one the agent's mirror does not know) gets the service asked for, in the batch as
// one by one, and nothing of the stray is left to claim its ID.
func TestPrivilegedAddReplacesStrayEntries(t *testing.T) {
	f := newFixture(t)
	testenv.StartTCPBackend(t, f.ns, "A", beA)
	dp := f.load()
	stray := svcKey(dnsVIP.Addr(), dnsVIP.Port(), ProtoTCP)
	other := netip.MustParseAddrPort("10.96.0.21:80")
	for _, oneByOne := range []bool{false, true} {
		apply(t, dp)
		if err := dp.objs.PodsockSvcV1.Update(&stray, &socklbSvcValue{Id: 4000, Rev: 1}, ebpf.UpdateNoExist); err != nil {
			t.Fatal(err)
		}
		dp.slotsOneByOne = oneByOne
		apply(t, dp, tcpService("default/web", webVIP, be(beA, 1)), tcpService("default/dns-tcp", dnsVIP, be(beA, 1)),
			tcpService("default/other", other, be(beA, 1)))
		for _, vip := range []netip.AddrPort{webVIP, dnsVIP, other} {
			if r, err := testenv.DialTCP(f.ns, 0, vip, false); err != nil || r.Peer != vip || r.Backend != "A" {
				t.Fatalf("one by one %v: connect to %s: %+v %v, want A through the VIP", oneByOne, vip, r, err)
			}
		}
		var v socklbSvcValue
		if err := dp.objs.PodsockSvcV1.Lookup(&stray, &v); err != nil || v.Id == 4000 || v.Id != dp.services[stray].id {
			t.Errorf("one by one %v: the frontend holds %+v (%v), want default/dns-tcp's entry", oneByOne, v, err)
		}
		for name, want := range map[string]int{"podsock_svc_v1": 3, "podsock_name_v2": 3, "podsock_slot_v1": 3} {
			if n, err := countEntries(mapsByName(&dp.objs.socklbMaps)[name]); err != nil || n != want {
				t.Errorf("one by one %v: %s holds %d entries (%v), want %d", oneByOne, name, n, err, want)
			}
		}
	}
}

// A batch of service entries the kernel stops writing part way: the entries it wrote
// serve, the others are written one by one, and nothing is left twice.
func TestPrivilegedBatchedAddRecoversFromPartialWrite(t *testing.T) {
	f := newFixture(t)
	testenv.StartTCPBackend(t, f.ns, "A", beA)
	dp := f.load()
	stopServiceBatchesAfterOne(t)
	vips := []netip.AddrPort{webVIP, netip.MustParseAddrPort("10.96.0.21:80"), netip.MustParseAddrPort("10.96.0.22:80")}
	var svcs []Service
	for i, vip := range vips {
		svcs = append(svcs, tcpService(fmt.Sprintf("default/svc-%d", i), vip, be(beA, 1)))
	}
	apply(t, dp, svcs...)
	for _, vip := range vips {
		if r, err := testenv.DialTCP(f.ns, 0, vip, false); err != nil || r.Peer != vip || r.Backend != "A" {
			t.Fatalf("connect to %s after a partial batch: %+v %v, want A through the VIP", vip, r, err)
		}
	}
	for name, want := range map[string]int{"podsock_svc_v1": 3, "podsock_name_v2": 3, "podsock_slot_v1": 3} {
		if n, err := countEntries(mapsByName(&dp.objs.socklbMaps)[name]); err != nil || n != want {
			t.Errorf("%s holds %d entries (%v), want %d", name, n, err, want)
		}
	}
	if len(dp.usedIDs) != 3 {
		t.Errorf("%d service IDs in use, want 3: the undone writes kept theirs", len(dp.usedIDs))
	}
}

// Services whose only change is their slots switch in batches; a batch the kernel stops
// part way still switches every service, removes each old backend once, and leaves only
// the new revision's slots.
func TestPrivilegedBatchedUpdateRecoversFromPartialWrite(t *testing.T) {
	f := newFixture(t)
	testenv.StartTCPBackend(t, f.ns, "A", beA)
	testenv.StartTCPBackend(t, f.ns, "B", beB)
	dp := f.load()
	vips := []netip.AddrPort{webVIP, netip.MustParseAddrPort("10.96.0.21:80"), netip.MustParseAddrPort("10.96.0.22:80")}
	services := func(b netip.AddrPort) []Service {
		var out []Service
		for i, vip := range vips {
			out = append(out, tcpService(fmt.Sprintf("default/svc-%d", i), vip, be(b, 1)))
		}
		return out
	}
	apply(t, dp, services(beA)...)
	stopServiceBatchesAfterOne(t)
	res := apply(t, dp, services(beB)...)
	if res.Updated != 3 || len(res.RemovedBackends) != 3 {
		t.Fatalf("apply result %+v, want 3 updated and A removed from each", res)
	}
	for _, vip := range vips {
		if r, err := testenv.DialTCP(f.ns, 0, vip, false); err != nil || r.Peer != vip || r.Backend != "B" {
			t.Fatalf("connect to %s after the switch: %+v %v, want B through the VIP", vip, r, err)
		}
	}
	if n, err := countEntries(dp.objs.PodsockSlotV1); err != nil || n != 3 {
		t.Errorf("%d slots in the map (%v), want only the new revision's 3", n, err)
	}
}

// stopServiceBatchesAfterOne makes every batch of service entries stop after its first,
// as the kernel stops at an entry it cannot write, until the test ends.
func stopServiceBatchesAfterOne(t *testing.T) {
	write := batchUpdateServices
	t.Cleanup(func() { batchUpdateServices = write })
	batchUpdateServices = func(m *ebpf.Map, keys []socklbSvcKey, values []socklbSvcValue, opts *ebpf.BatchOptions) (int, error) {
		n, err := write(m, keys[:1], values[:1], opts)
		if err != nil {
			return n, err
		}
		return n, unix.ENOSPC
	}
}

// ApplyChanges after an Apply that worked in full writes the services it names alone, and
// the datapath serves the result as a full Apply would: connects reach the new backends,
// the others are as they were. Changes it cannot follow are refused with nothing done.
func TestPrivilegedApplyChanges(t *testing.T) {
	f := newFixture(t)
	testenv.StartTCPBackend(t, f.ns, "A", beA)
	testenv.StartTCPBackend(t, f.ns, "B", beB)
	dp := f.load()
	svcs := make([]Service, 200)
	for i := range svcs {
		svcs[i] = tcpService(fmt.Sprintf("bench/svc-%d", i), netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 96, 1, byte(i)}), 80), be(beA, 1))
	}
	refused := func(what string, changes ...Change) {
		t.Helper()
		started := false
		if _, ok, err := dp.ApplyChanges(changes, ApplyOptions{Started: func() { started = true }}); ok || err != nil || started {
			t.Fatalf("%s: applied %v, err %v, started %v; want it refused before starting", what, ok, err, started)
		}
	}
	refused("before any Apply", Change{At: 0, Service: svcs[0]})
	if res, err := dp.Apply(slices.Clone(svcs)); err != nil || res.Added != 200 {
		t.Fatalf("first apply %+v, %v; want 200 added", res, err)
	}
	apply := func(changes ...Change) ApplyResult {
		t.Helper()
		res, ok, err := dp.ApplyChanges(changes, ApplyOptions{})
		if !ok || err != nil {
			t.Fatalf("changes %+v: applied %v, %v", changes, ok, err)
		}
		return res
	}
	if res := apply(); res.Unchanged != 200 || res.Updated != 0 {
		t.Fatalf("no changes: %+v, want 200 unchanged", res)
	}
	next := slices.Clone(svcs)
	next[7].Backends = []Backend{be(beB, 1)}
	next[9].Backends = []Backend{be(beA, 1), be(beB, 3)}
	next[11].Name = "bench/renamed"
	res := apply(Change{7, next[7]}, Change{9, next[9]}, Change{11, next[11]})
	if res.Updated != 3 || res.Unchanged != 197 || len(res.RemovedBackends) != 1 ||
		res.RemovedBackends[0].Service != "bench/svc-7" || res.RemovedBackends[0].Backend != beA {
		t.Fatalf("three changed: %+v, want 3 updated, 197 unchanged, and svc-7's %s removed", res, beA)
	}
	readBack := func(want []Service) {
		t.Helper()
		got, err := dp.Services()
		if err != nil {
			t.Fatal(err)
		}
		byName := map[string]Service{}
		for _, s := range got {
			byName[s.Name] = s
		}
		if len(got) != len(want) {
			t.Fatalf("%d services read back, want %d", len(got), len(want))
		}
		for _, w := range want {
			s, ok := byName[w.Name]
			if !ok || s.VIP != w.VIP || !slices.Equal(s.Backends, weightsFromSlots(expandSlots(w.Backends, 4096))) {
				t.Fatalf("service %s read back as %+v (found %v), want backends %v", w.Name, s, ok, w.Backends)
			}
		}
	}
	readBack(next)
	for range 20 {
		if r, err := testenv.DialTCP(f.ns, 0, netip.AddrPortFrom(next[7].VIP, 80), false); err != nil || r.Backend != "B" {
			t.Fatalf("connect to svc-7 after its change: %+v, %v; want backend B", r, err)
		}
		if r, err := testenv.DialTCP(f.ns, 0, netip.AddrPortFrom(next[8].VIP, 80), false); err != nil || r.Backend != "A" {
			t.Fatalf("connect to svc-8, unchanged: %+v, %v; want backend A", r, err)
		}
	}
	if _, backends := dp.Counts(); backends != 2 {
		t.Errorf("%d backends counted, want 2", backends)
	}
	// The count follows the changes.
	var changes []Change
	for i := range 50 {
		next[i].Backends = []Backend{be(beB, 1)}
		changes = append(changes, Change{i, next[i]})
	}
	apply(changes...)
	if _, backends := dp.Counts(); backends != 2 {
		t.Errorf("%d backends counted after 50 changed to %s, want 2", backends, beB)
	}
	for i := range next {
		next[i].Backends = []Backend{be(beB, 1)}
	}
	apply(changes...)
	for i := 50; i < 200; i += 50 {
		for j := i; j < i+50; j++ {
			changes[j-i] = Change{j, next[j]}
		}
		apply(changes...)
	}
	if _, backends := dp.Counts(); backends != 1 {
		t.Errorf("%d backends counted once every service went to %s, want 1", backends, beB)
	}

	moved := next[4]
	moved.VIP = next[3].VIP
	refused("a frontend moved", Change{4, moved})
	refused("a position out of range", Change{200, next[0]})
	refused("a position twice", Change{5, next[5]}, Change{5, next[5]})
	refused("more than a quarter", slices.Repeat([]Change{{0, next[0]}}, 51)...)
	readBack(next)
	tooMany := next[5]
	tooMany.Backends = slices.Repeat([]Backend{be(beA, 1)}, dp.limits.BackendsPerService+1)
	if _, ok, err := dp.ApplyChanges([]Change{{5, tooMany}}, ApplyOptions{}); !ok || err == nil {
		t.Fatalf("a change over backends_per_service: applied %v, %v; want an error", ok, err)
	}
	// An Apply refused before it wrote anything leaves the last input in force.
	if _, err := dp.Apply([]Service{svcs[0], svcs[0]}); err == nil {
		t.Fatal("an Apply of a duplicate frontend worked")
	}
	next[8].Backends = []Backend{be(beA, 1)}
	if res := apply(Change{8, next[8]}); res.Updated != 1 || res.Unchanged != 199 {
		t.Fatalf("after a refused Apply: %+v, want 1 updated, 199 unchanged", res)
	}
	readBack(next)
	if r, err := testenv.DialTCP(f.ns, 0, netip.AddrPortFrom(next[8].VIP, 80), false); err != nil || r.Backend != "A" {
		t.Fatalf("connect to svc-8 after its change: %+v, %v; want backend A", r, err)
	}
}

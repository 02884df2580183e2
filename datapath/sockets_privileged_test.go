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
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/test/testenv"
)

func newTestNetns(t *testing.T, nss ...*testenv.Netns) *testenv.NetnsSet {
	return testenv.NewNetnsSet(t, ErrUnknownNetns, nss...)
}

// clientNetns is a netns with its own copies of the backends on lo, so that clients in
// several netns reach "the same" backend addresses.
func clientNetns(t *testing.T) *testenv.Netns {
	ns := testenv.NewNetns(t, vipRanges, "10.88.0.5/32", "10.88.0.6/32", "10.88.0.7/32")
	testenv.StartTCPBackend(t, ns, "A", beA)
	testenv.StartTCPBackend(t, ns, "B", beB)
	testenv.StartTCPBackend(t, ns, "C", beC)
	testenv.StartUDPBackend(t, ns, "dnsA", dnsA)
	testenv.StartUDPBackend(t, ns, "dnsB", dnsB)
	return ns
}

// heldTCP connects through the VIP and keeps the socket.
func heldTCP(t *testing.T, ns *testenv.Netns, vip netip.AddrPort, want string) int {
	t.Helper()
	r, err := testenv.DialTCP(ns, 0, vip, true)
	if err != nil || r.Backend != want || r.Peer != vip {
		t.Fatalf("dial %s from %s: backend %q peer %s err %v, want %s and the VIP", vip, ns.Name, r.Backend, r.Peer, err, want)
	}
	keepOpen(t, r.FD)
	return r.FD
}

// openFDs are the test's client sockets still open; the cleanup closes those, and
// closeClient the ones a test closes itself, so no fd number is closed twice.
var openFDs = map[int]bool{}

func keepOpen(t *testing.T, fd int) {
	openFDs[fd] = true
	t.Cleanup(func() { closeClient(fd) })
}

func closeClient(fd int) {
	if openFDs[fd] {
		delete(openFDs, fd)
		unix.Close(fd)
	}
}

// udpClient makes a UDP socket that has exchanged one datagram with vip, connected or not,
// answered by want ("" for any backend).
func udpClient(t *testing.T, ns *testenv.Netns, vip netip.AddrPort, connected bool, want string) int {
	t.Helper()
	fd, err := testenv.Socket(ns, unix.AF_INET, unix.SOCK_DGRAM)
	if err != nil {
		t.Fatal(err)
	}
	keepOpen(t, fd)
	to := vip
	if connected {
		if err := unix.Connect(fd, testenv.Sockaddr(unix.AF_INET, vip)); err != nil {
			t.Fatalf("connect UDP %s: %v", vip, err)
		}
		to = netip.AddrPort{}
	}
	r, err := testenv.UDPExchange(fd, unix.AF_INET, to)
	if err != nil || (want != "" && r.Backend != want) {
		t.Fatalf("UDP %s from %s (connected %v): %+v %v, want %s", vip, ns.Name, connected, r, err, want)
	}
	return fd
}

func localPort(t *testing.T, fd int) uint16 {
	t.Helper()
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return testenv.AddrPort(sa).Port()
}

// aborted says the socket's next read fails with ECONNABORTED, as bpf_sock_destroy leaves it.
func aborted(fd int) error {
	buf := make([]byte, 64)
	_, err := unix.Read(fd, buf)
	if errors.Is(err, unix.ECONNABORTED) {
		return nil
	}
	return fmt.Errorf("read gave %w, want ECONNABORTED", err)
}

// alive says the socket has no pending error and nothing to read: untouched.
func alive(fd int) error {
	soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return err
	}
	if soErr != 0 {
		return fmt.Errorf("SO_ERROR = %w", unix.Errno(soErr))
	}
	buf := make([]byte, 64)
	_, _, err = unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
	if !errors.Is(err, unix.EAGAIN) {
		return fmt.Errorf("non-blocking read gave %w, want EAGAIN", err)
	}
	return nil
}

// loadWithIterators is newFixture and load, for tests that need the socket iterators.
func loadWithIterators(t *testing.T) (*fixture, *Datapath) {
	f := newFixture(t)
	dp := f.load()
	if _, err := dp.iterators(); err != nil {
		testenv.SkipOrFail(t, err.Error())
	}
	return f, dp
}

func listAll(t *testing.T, dp *Datapath, ns NetnsSet, f SocketFilter) []Socket {
	t.Helper()
	var out []Socket
	if _, err := dp.Sockets(ns, f, func(s Socket) error { out = append(out, s); return nil }); err != nil {
		t.Fatalf("list sockets: %v", err)
	}
	return out
}

func byCookie(socks []Socket, cookie uint64) (Socket, bool) {
	for _, s := range socks {
		if s.Cookie == cookie {
			return s, true
		}
	}
	return Socket{}, false
}

func sockCookie(t *testing.T, fd int) uint64 {
	t.Helper()
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var (
	apiVIP  = netip.MustParseAddrPort("10.96.0.21:80")
	dns2VIP = netip.MustParseAddrPort("10.96.0.54:53")
)

func TestPrivilegedSocketsListAndTerminate(t *testing.T) {
	_, dp := loadWithIterators(t)
	n1, n2, n3, n4 := clientNetns(t), clientNetns(t), clientNetns(t), clientNetns(t)
	set := newTestNetns(t, n1, n2, n3, n4)
	c1, c2 := n1.Cookie(t), n2.Cookie(t)

	apply(t, dp,
		tcpService("default/web", webVIP, be(beA, 1)),
		tcpService("default/api", apiVIP, be(beB, 1)),
		udpService("kube-system/dns", dnsVIP, be(dnsA, 1)),
		udpService("kube-system/dns2", dns2VIP, be(dnsB, 1)))

	// Clients of web (backend A, about to go): two in n1, one in n2; a connected UDP
	// client of dns (dnsA) in n2. Clients that must survive: api (B) in n1 and n3, an
	// unconnected UDP socket that talked to dns in n2, a connected UDP client of dns2, and
	// a socket in n1 that dialled A directly, without a VIP.
	web1a, web1b := heldTCP(t, n1, webVIP, "A"), heldTCP(t, n1, webVIP, "A")
	web2 := heldTCP(t, n2, webVIP, "A")
	dnsConn := udpClient(t, n2, dnsVIP, true, "dnsA")
	dnsUnconn := udpClient(t, n2, dnsVIP, false, "dnsA")
	dns2Conn := udpClient(t, n3, dns2VIP, true, "dnsB")
	api1, api3 := heldTCP(t, n1, apiVIP, "B"), heldTCP(t, n3, apiVIP, "B")
	direct, err := testenv.DialTCP(n1, 0, beA, true)
	if err != nil || direct.Backend != "A" {
		t.Fatalf("direct dial of %s: %+v %v", beA, direct, err)
	}
	keepOpen(t, direct.FD)
	unconnPort := localPort(t, dnsUnconn)

	t.Run("list", func(t *testing.T) {
		all := listAll(t, dp, set, SocketFilter{})
		for _, c := range []struct {
			fd       int
			netns    *testenv.Netns
			proto    uint8
			service  string
			vip      netip.AddrPort
			backend  netip.AddrPort
			lbPeer   bool
			balanced bool
		}{
			{web1a, n1, ProtoTCP, "default/web", webVIP, beA, true, true},
			{web2, n2, ProtoTCP, "default/web", webVIP, beA, true, true},
			{api3, n3, ProtoTCP, "default/api", apiVIP, beB, true, true},
			{dnsConn, n2, ProtoUDP, "kube-system/dns", dnsVIP, dnsA, true, true},
			{dnsUnconn, n2, ProtoUDP, "kube-system/dns", dnsVIP, dnsA, false, true},
			{direct.FD, n1, ProtoTCP, "", netip.AddrPort{}, netip.AddrPort{}, false, false},
		} {
			s, ok := byCookie(all, sockCookie(t, c.fd))
			if !ok {
				t.Errorf("socket fd %d of %s not listed", c.fd, c.netns.Name)
				continue
			}
			if s.NetnsCookie != c.netns.Cookie(t) || s.Proto != c.proto || s.Service != c.service ||
				s.VIP != c.vip || s.Backend != c.backend || s.LBConnected != c.lbPeer || s.Balanced != c.balanced {
				t.Errorf("socket fd %d of %s listed as %+v", c.fd, c.netns.Name, s)
			}
			if c.lbPeer && (s.Remote != c.backend || StateName(s.Proto, s.State) != "ESTAB") {
				t.Errorf("connected socket fd %d: remote %s state %s, want %s ESTAB", c.fd, s.Remote, StateName(s.Proto, s.State), c.backend)
			}
			if !c.lbPeer && c.balanced && s.Remote.IsValid() {
				t.Errorf("unconnected UDP socket listed with remote %s", s.Remote)
			}
		}
		// Filters: only UDP; only what reaches backend A (balanced or not), in n1.
		for _, s := range listAll(t, dp, set, SocketFilter{Proto: ProtoUDP}) {
			if s.Proto != ProtoUDP {
				t.Fatalf("proto filter let through %+v", s)
			}
		}
		var got []uint64
		for _, s := range listAll(t, dp, set, SocketFilter{Netns: []uint64{c1}, Backend: beA}) {
			got = append(got, s.Cookie)
		}
		want := []uint64{sockCookie(t, web1a), sockCookie(t, web1b), sockCookie(t, direct.FD)}
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Errorf("backend filter in n1 gave cookies %v, want %v", got, want)
		}
		set.TakeEntered()
	})

	t.Run("terminate", func(t *testing.T) {
		res := apply(t, dp,
			tcpService("default/web", webVIP, be(beC, 1)),
			tcpService("default/api", apiVIP, be(beB, 1)),
			udpService("kube-system/dns", dnsVIP, be(dnsB, 1)),
			udpService("kube-system/dns2", dns2VIP, be(dnsB, 1)))
		tr, err := dp.Terminate(set, res.RemovedBackends, TerminateOptions{Protocols: []uint8{ProtoTCP, ProtoUDP}})
		if err != nil {
			t.Fatalf("terminate: %v", err)
		}
		if tr.Destroyed != 4 || tr.Failed != 0 || tr.FullWalk {
			t.Errorf("terminate destroyed %d, failed %d, full walk %v; want 4, 0, false", tr.Destroyed, tr.Failed, tr.FullWalk)
		}
		wantEntered := []uint64{c1, c2}
		slices.Sort(wantEntered)
		if got := set.TakeEntered(); !slices.Equal(got, wantEntered) || tr.NetnsEntered != 2 {
			t.Errorf("entered netns %v (%d counted), want only n1 and n2 %v", got, tr.NetnsEntered, wantEntered)
		}
		for name, fd := range map[string]int{"web n1 #1": web1a, "web n1 #2": web1b, "web n2": web2, "connected dns": dnsConn} {
			if err := aborted(fd); err != nil {
				t.Errorf("%s: %v", name, err)
			}
			// As an application would on ECONNABORTED: that releases the socket's count.
			closeClient(fd)
		}
		for name, fd := range map[string]int{"api n1": api1, "api n3": api3, "direct to A": direct.FD, "connected dns2": dns2Conn} {
			if err := alive(fd); err != nil {
				t.Errorf("%s was touched: %v", name, err)
			}
		}
		if err := alive(dnsUnconn); err != nil {
			t.Errorf("unconnected UDP was touched: %v", err)
		}
		if p := localPort(t, dnsUnconn); p != unconnPort {
			t.Errorf("unconnected UDP local port changed from %d to %d", unconnPort, p)
		}
		if r, err := testenv.UDPExchange(dnsUnconn, unix.AF_INET, dnsVIP); err != nil || r.Backend != "dnsB" || r.From != dnsVIP {
			t.Errorf("unconnected UDP after the change: %+v %v, want dnsB from the VIP", r, err)
		}
	})

	t.Run("re-added", func(t *testing.T) {
		// A removal undone before its pass ends nothing; a backend back after a pass is
		// counted afresh, so its next removal finds its new clients.
		web := func(b netip.AddrPort) []RemovedBackend {
			return apply(t, dp,
				tcpService("default/web", webVIP, be(b, 1)),
				tcpService("default/api", apiVIP, be(beB, 1)),
				udpService("kube-system/dns", dnsVIP, be(dnsB, 1)),
				udpService("kube-system/dns2", dns2VIP, be(dnsB, 1))).RemovedBackends
		}
		goneC := web(beA) // C leaves, A is back
		fdA := heldTCP(t, n2, webVIP, "A")
		stale := web(beC) // A leaves again...
		web(beA)          // ...and comes back before the pass
		tr, err := dp.Terminate(set, stale, TerminateOptions{Protocols: []uint8{ProtoTCP}})
		if err != nil || tr.Destroyed != 0 || tr.Backends != 0 {
			t.Fatalf("pass for a removal already undone: %+v %v, want nothing done", tr, err)
		}
		if err := alive(fdA); err != nil {
			t.Fatalf("client of a backend that came back was touched: %v", err)
		}
		if _, err := dp.Terminate(set, goneC, TerminateOptions{Protocols: []uint8{ProtoTCP}}); err != nil {
			t.Fatal(err)
		}
		// A leaves, comes back (fdA2 connects), and leaves again; the pass for the first
		// removal, running late, ends only what was chosen before it.
		first := web(beC)
		web(beA)
		fdA2 := heldTCP(t, n2, webVIP, "A")
		second := web(beC)
		tr, err = dp.Terminate(set, first, TerminateOptions{Protocols: []uint8{ProtoTCP}})
		if err != nil || tr.Destroyed != 1 || tr.NetnsEntered != 1 {
			t.Fatalf("late pass for A's first removal: %+v %v, want only the older client destroyed", tr, err)
		}
		if err := aborted(fdA); err != nil {
			t.Fatalf("client of A from before its first removal: %v", err)
		}
		if err := alive(fdA2); err != nil {
			t.Fatalf("client of A from after it came back, ended by the older removal: %v", err)
		}
		tr, err = dp.Terminate(set, second, TerminateOptions{Protocols: []uint8{ProtoTCP}})
		if err != nil || tr.Destroyed != 1 {
			t.Fatalf("pass for A's second removal: %+v %v, want its newer client destroyed", tr, err)
		}
		if err := aborted(fdA2); err != nil {
			t.Fatalf("client of A from after it came back: %v", err)
		}
		// The same in one batch, the newer removal first (the older one's late pass
		// riding along with it): the newer removal decides.
		web(beA)
		first = web(beC)
		web(beA)
		fdA3 := heldTCP(t, n2, webVIP, "A")
		second = web(beC)
		tr, err = dp.Terminate(set, append(second, first...), TerminateOptions{Protocols: []uint8{ProtoTCP}})
		if err != nil || tr.Destroyed != 1 {
			t.Fatalf("one pass for both removals, newer first: %+v %v, want the client from between them destroyed", tr, err)
		}
		if err := aborted(fdA3); err != nil {
			t.Fatalf("client of A from between two removals, both in one pass: %v", err)
		}
		set.TakeEntered()
	})

	t.Run("protocols", func(t *testing.T) {
		// terminate = ["udp"] leaves TCP clients of a removed backend alone.
		api := heldTCP(t, n3, apiVIP, "B")
		res := apply(t, dp,
			tcpService("default/web", webVIP, be(beC, 1)),
			tcpService("default/api", apiVIP, be(beC, 1)),
			udpService("kube-system/dns", dnsVIP, be(dnsB, 1)),
			udpService("kube-system/dns2", dns2VIP, be(dnsB, 1)))
		tr, err := dp.Terminate(set, res.RemovedBackends, TerminateOptions{Protocols: []uint8{ProtoUDP}})
		if err != nil || tr.Destroyed != 0 || tr.NetnsEntered != 0 {
			t.Fatalf("UDP-only terminate of a TCP backend: %+v %v", tr, err)
		}
		if err := alive(api); err != nil {
			t.Errorf("TCP client touched with terminate = [udp]: %v", err)
		}
	})
}

// More sockets than one read of the iterator holds: listing returns each exactly once, and
// termination counts every socket it destroyed (the kernel shows a socket again after a
// full buffer, and skips it then if it is already destroyed).
func TestPrivilegedSocketsManyPerNetns(t *testing.T) {
	_, dp := loadWithIterators(t)
	ns := clientNetns(t)
	set := newTestNetns(t, ns)
	apply(t, dp, tcpService("default/web", webVIP, be(beA, 1)))
	const n = 1500
	want := map[uint64]bool{}
	var fds []int
	t.Cleanup(func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	})
	for range n {
		fd, err := testenv.Socket(ns, unix.AF_INET, unix.SOCK_STREAM)
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, fd)
		if err := testenv.Connect(fd, testenv.Sockaddr(unix.AF_INET, webVIP)); err != nil {
			t.Fatal(err)
		}
		want[sockCookie(t, fd)] = true
	}
	seen := map[uint64]int{}
	for _, s := range listAll(t, dp, set, SocketFilter{Backend: beA}) {
		if s.Balanced {
			seen[s.Cookie]++
		}
	}
	for c := range want {
		if seen[c] != 1 {
			t.Fatalf("socket %d listed %d times, want once (%d balanced sockets listed)", c, seen[c], len(seen))
		}
	}
	res := apply(t, dp, tcpService("default/web", webVIP, be(beB, 1)))
	tr, err := dp.Terminate(set, res.RemovedBackends, TerminateOptions{Protocols: []uint8{ProtoTCP}})
	if err != nil || tr.Destroyed != n || tr.Failed != 0 {
		t.Fatalf("terminate: %+v %v, want %d destroyed", tr, err, n)
	}
	for _, fd := range fds {
		if e, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); unix.Errno(e) != unix.ECONNABORTED {
			t.Fatalf("a client was not aborted: SO_ERROR %v", unix.Errno(e))
		}
	}
}

// socketCounts reads the count map: per service VIP, the counts by backend bucket.
func socketCounts(t *testing.T, dp *Datapath) map[netip.AddrPort][countBuckets]int64 {
	t.Helper()
	out := map[netip.AddrPort][countBuckets]int64{}
	err := dp.readCounts(func(k socklbSvcNetnsKey, c *socklbSvcNetnsCounts) {
		vip := netip.AddrPortFrom(wordsAddr(k.Svc.Addr), ntohs(k.Svc.Port))
		sum := out[vip]
		for b, n := range c.N {
			sum[b] += n
		}
		out[vip] = sum
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// The socket counts go back to zero when sockets close, and entries at zero are dropped
// once nothing can count there: a netns that is gone at once, a service that is gone after
// a full prune interval.
func TestPrivilegedSocketCountsArePruned(t *testing.T) {
	f := newFixture(t)
	dp := f.load()
	ns := clientNetns(t)
	set := newTestNetns(t, ns)
	prune := func(s NetnsSet) {
		if err := dp.PruneSocketCounts(s); err != nil {
			t.Fatal(err)
		}
	}
	apply(t, dp, tcpService("default/web", webVIP, be(beA, 1)))
	fd := heldTCP(t, ns, webVIP, "A")
	if got := socketCounts(t, dp); got[webVIP][backendBucket(beA)] != 1 {
		t.Fatalf("counts with one client of A: %v", got)
	}
	closeClient(fd)
	if got := socketCounts(t, dp); got[webVIP] != ([countBuckets]int64{}) || len(got) != 1 {
		t.Fatalf("counts after the client closed: %v, want web's entry at 0", got)
	}
	prune(set)
	if got := socketCounts(t, dp); len(got) != 1 {
		t.Fatalf("a served service's entry at zero was pruned: %v", got)
	}
	apply(t, dp, tcpService("default/web", webVIP, be(beB, 1)))
	prune(set)
	prune(set)
	if got := socketCounts(t, dp); len(got) != 1 {
		t.Fatalf("the entry of a service still served lost with its backend: %v", got)
	}
	apply(t, dp, tcpService("default/api", apiVIP, be(beB, 1)))
	prune(set)
	if got := socketCounts(t, dp); len(got) != 1 {
		t.Fatalf("a service removed just now lost its entry at once: %v", got)
	}
	prune(set)
	if got := socketCounts(t, dp); len(got) != 0 {
		t.Fatalf("a service gone for a prune interval kept its entry: %v", got)
	}
	closeClient(heldTCP(t, ns, apiVIP, "B"))
	prune(newTestNetns(t))
	if got := socketCounts(t, dp); len(got) != 0 {
		t.Fatalf("an entry of a netns that is gone was kept: %v", got)
	}
}

// A socket balanced by an agent older than the socket counts (connected, not counted) is
// counted when a datapath loads without a count map, so targeted termination still finds
// it: in one pass where the kernel allows the map-element iterator, else one netns at a
// time (the fallback runs here whatever the kernel). A socket its application closed, but
// the kernel keeps, is not counted.
func TestPrivilegedLoadCountsSocketsBalancedBeforeCounts(t *testing.T) {
	f, dp := loadWithIterators(t)
	ns := clientNetns(t)
	set := newTestNetns(t, ns)
	apply(t, dp, tcpService("default/web", webVIP, be(beA, 1)))
	fd := heldTCP(t, ns, webVIP, "A")
	lingering := heldTCP(t, ns, webVIP, "A")
	// What an older agent left: the socket's state says connected, and nothing counts it.
	forget := func(fd int, flags socklbSockStateFlags) {
		t.Helper()
		var st socklbSockState
		if err := dp.objs.PodsockSockV1.Lookup(int32(fd), &st); err != nil {
			t.Fatalf("socket storage: %v", err)
		}
		st.Flags = flags
		if err := dp.objs.PodsockSockV1.Update(int32(fd), &st, 0); err != nil {
			t.Fatal(err)
		}
	}
	forget(fd, socklbSockStateFlagsSOCK_F_CONNECTED)
	forget(lingering, socklbSockStateFlagsSOCK_F_CONNECTED|socklbSockStateFlagsSOCK_F_RELEASED)
	dp.Close()
	if err := os.Remove(filepath.Join(f.bpffs, PinDirName, "podsock_svcnetns_v2")); err != nil {
		t.Fatal(err)
	}

	dp, err := Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	// The flags without the count epoch, which each new count map moves on.
	flags := func(fd int) socklbSockStateFlags {
		t.Helper()
		var st socklbSockState
		if err := dp.objs.PodsockSockV1.Lookup(int32(fd), &st); err != nil {
			t.Fatal(err)
		}
		return st.Flags &^ socklbSockStateFlagsSOCK_F_EPOCH_MASK
	}
	total := func() (n int64) {
		t.Helper()
		for _, c := range socketCounts(t, dp) {
			for _, v := range c {
				n += v
			}
		}
		return n
	}
	countsPin := filepath.Join(f.bpffs, PinDirName, "podsock_svcnetns_v2")
	if dp.BackfillPending() {
		t.Log("the kernel refused the map-element iterator: counting one netns at a time")
		if got := flags(fd); got != socklbSockStateFlagsSOCK_F_CONNECTED {
			t.Fatalf("flags %#x before the fallback ran, want connected only", got)
		}
		// An agent that stops before the backfill ran leaves no count map pinned, so the
		// next one counts again.
		if _, err := os.Stat(countsPin); !os.IsNotExist(err) {
			t.Fatalf("socket counts pinned before the backfill ran (%v)", err)
		}
		dp.Close()
		if dp, err = Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs}); err != nil {
			t.Fatal(err)
		}
		defer dp.Close()
		if !dp.BackfillPending() {
			t.Fatal("a restart after a backfill that never ran did not count again")
		}
	} else if got := flags(fd); got != socklbSockStateFlagsSOCK_F_CONNECTED|socklbSockStateFlagsSOCK_F_TRACKED {
		t.Fatalf("socket flags after load: %#x, want connected and counted", got)
	}
	// The fallback, whatever the kernel: forget the count again and walk the netns.
	forget(fd, socklbSockStateFlagsSOCK_F_CONNECTED)
	var keys []socklbSvcNetnsKey
	if err := dp.readCounts(func(k socklbSvcNetnsKey, _ *socklbSvcNetnsCounts) { keys = append(keys, k) }); err != nil {
		t.Fatal(err)
	}
	dp.deleteCounts(keys)
	dp.backfillPending = true
	n, err := dp.Backfill(set)
	if err != nil || n != 1 || dp.BackfillPending() {
		t.Fatalf("backfill: %d %v (pending %v), want the one open socket counted", n, err, dp.BackfillPending())
	}
	if _, err := os.Stat(countsPin); err != nil {
		t.Fatalf("socket counts not pinned after the backfill: %v", err)
	}
	if got, want := flags(fd), socklbSockStateFlagsSOCK_F_CONNECTED|socklbSockStateFlagsSOCK_F_TRACKED; got != want {
		t.Fatalf("socket flags after backfill: %#x, want %#x", got, want)
	}
	if got := flags(lingering); got&socklbSockStateFlagsSOCK_F_TRACKED != 0 || total() != 1 {
		t.Fatalf("a released socket was counted (flags %#x, total %d)", got, total())
	}
	res := apply(t, dp, tcpService("default/web", webVIP, be(beB, 1)))
	tr, err := dp.Terminate(set, res.RemovedBackends, TerminateOptions{Protocols: []uint8{ProtoTCP}})
	if err != nil || tr.Destroyed != 1 || tr.NetnsEntered != 1 || tr.FullWalk {
		t.Fatalf("terminate: %+v %v, want the old socket found through its count", tr, err)
	}
	if err := aborted(fd); err != nil {
		t.Fatal(err)
	}
}

// The socket counts equal the truth, read from the sockets themselves, after 10,000
// sockets churned through three netns (TCP and connected UDP, closes, UDP re-connects to
// another service) across agent restarts, one of which lost the count map, so the
// backfill had to count the survivors in a new epoch.
func TestPrivilegedSocketCountsEqualTheTruth(t *testing.T) {
	f, dp := loadWithIterators(t)
	nss := []*testenv.Netns{clientNetns(t), clientNetns(t), clientNetns(t)}
	set := newTestNetns(t, nss...)
	svcs := []Service{
		tcpService("default/web", webVIP, be(beA, 1), be(beB, 1), be(beC, 1)),
		udpService("kube-system/dns", dnsVIP, be(dnsA, 1), be(dnsB, 1)),
		udpService("kube-system/dns2", dns2VIP, be(dnsB, 1)),
	}
	apply(t, dp, svcs...)
	// The datapath the restarts leave is closed before the fixture's cleanup.
	t.Cleanup(func() { dp.Close() })
	rng := rand.New(rand.NewPCG(1, 2))
	open := map[int]bool{}
	closeOne := func() {
		for fd := range open {
			delete(open, fd)
			closeClient(fd)
			return
		}
	}
	restart := func(loseCounts bool) {
		t.Helper()
		dp.Close()
		if loseCounts {
			if err := os.Remove(filepath.Join(f.bpffs, PinDirName, "podsock_svcnetns_v2")); err != nil {
				t.Fatal(err)
			}
		}
		var err error
		if dp, err = Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs}); err != nil {
			t.Fatal(err)
		}
		apply(t, dp, svcs...)
		if dp.BackfillPending() {
			if _, err := dp.Backfill(set); err != nil {
				t.Fatal(err)
			}
		}
	}
	check := func(when string) {
		t.Helper()
		truth := map[socklbSvcNetnsKey][countBuckets]int64{}
		_, err := dp.Sockets(set, SocketFilter{}, func(s Socket) error {
			if !s.Balanced || !s.LBConnected || s.Released {
				return nil
			}
			proto := ProtoTCP
			if s.Proto == ProtoUDP {
				proto = ProtoUDP
			}
			k := socklbSvcNetnsKey{Svc: svcKey(s.VIP.Addr(), s.VIP.Port(), proto), NetnsCookie: s.NetnsCookie}
			c := truth[k]
			c[backendBucket(s.Backend)]++
			truth[k] = c
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		got := map[socklbSvcNetnsKey][countBuckets]int64{}
		if err := dp.readCounts(func(k socklbSvcNetnsKey, c *socklbSvcNetnsCounts) {
			if !countsZero(c) {
				got[k] = c.N
			}
		}); err != nil {
			t.Fatal(err)
		}
		if !maps.Equal(got, truth) {
			t.Fatalf("%s: counts %v\nwant the truth %v", when, got, truth)
		}
		var sum int64
		for _, c := range got {
			for _, n := range c {
				sum += n
			}
		}
		t.Logf("%s: %d open sockets counted exactly in %d entries", when, sum, len(got))
	}
	churn := testenv.Rounds(10_000)
	for i := range churn {
		switch i {
		case churn / 4:
			restart(false)
		case churn / 2:
			restart(true)
			check("after a restart that lost the count map")
		case 3 * churn / 4:
			restart(false)
		}
		ns := nss[rng.IntN(len(nss))]
		switch op := rng.IntN(10); {
		case len(open) > 150 || op < 3:
			closeOne()
		case op < 7:
			r, err := testenv.DialTCP(ns, 0, webVIP, true)
			if err != nil {
				t.Fatalf("dial %d: %v", i, err)
			}
			keepOpen(t, r.FD)
			open[r.FD] = true
		case op < 9:
			open[udpClient(t, ns, dnsVIP, true, "")] = true
		default:
			// A connected UDP socket moves to another service.
			fd := udpClient(t, ns, dnsVIP, true, "")
			if err := unix.Connect(fd, testenv.Sockaddr(unix.AF_INET, dns2VIP)); err != nil {
				t.Fatal(err)
			}
			open[fd] = true
		}
	}
	check("after 10,000 churned sockets and three restarts")
	for len(open) > 0 {
		closeOne()
	}
	check("after every socket closed")
}

// A netns holds one count entry per service it uses, however many backends its sockets
// reach: a service of many backends cannot fill the map (it took one entry per backend
// before), and termination still enters only the netns whose bucket holds the backend.
func TestPrivilegedSocketCountsOneEntryPerServiceAndNetns(t *testing.T) {
	_, dp := loadWithIterators(t)
	const nBackends = 64
	var addrs []string
	var backends []Backend
	for i := range nBackends {
		a := netip.AddrFrom4([4]byte{10, 88, 3, byte(i + 1)})
		addrs = append(addrs, a.String()+"/32")
		backends = append(backends, be(netip.AddrPortFrom(a, 9000), 1))
	}
	ns := testenv.NewNetns(t, vipRanges, addrs...)
	other := testenv.NewNetns(t, vipRanges, addrs...)
	testenv.StartTCPBackend(t, ns, "any", netip.MustParseAddrPort("0.0.0.0:9000"))
	testenv.StartTCPBackend(t, other, "any", netip.MustParseAddrPort("0.0.0.0:9000"))
	set := newTestNetns(t, ns, other)
	apply(t, dp, tcpService("default/wide", webVIP, backends...))
	reached := map[netip.AddrPort]int{}
	for range 400 {
		r, err := testenv.DialTCP(ns, 0, webVIP, true)
		if err != nil {
			t.Fatal(err)
		}
		keepOpen(t, r.FD)
	}
	socks := listAll(t, dp, set, SocketFilter{Proto: ProtoTCP})
	for _, s := range socks {
		if s.Balanced && s.LBConnected {
			reached[s.Backend]++
		}
	}
	entries := 0
	if err := dp.readCounts(func(socklbSvcNetnsKey, *socklbSvcNetnsCounts) { entries++ }); err != nil {
		t.Fatal(err)
	}
	if len(reached) < nBackends/2 || entries != 1 {
		t.Fatalf("400 sockets reached %d backends and took %d count entries, want many backends and 1 entry", len(reached), entries)
	}
	// The other netns holds sockets to one backend in another bucket only: a removal of
	// a backend of ns' buckets does not enter it.
	var far netip.AddrPort
	var gone netip.AddrPort
	for b := range reached {
		gone = b
		break
	}
	for _, b := range backends {
		if backendBucket(b.Addr) != backendBucket(gone) {
			far = b.Addr
			break
		}
	}
	apply(t, dp, tcpService("default/wide", webVIP, be(far, 1)))
	r, err := testenv.DialTCP(other, 0, webVIP, true)
	if err != nil {
		t.Fatal(err)
	}
	keepOpen(t, r.FD)
	apply(t, dp, tcpService("default/wide", webVIP, backends...))
	var rest []Backend
	for _, b := range backends {
		if b.Addr != gone {
			rest = append(rest, b)
		}
	}
	set.TakeEntered()
	res := apply(t, dp, tcpService("default/wide", webVIP, rest...))
	tr, err := dp.Terminate(set, res.RemovedBackends, TerminateOptions{Protocols: []uint8{ProtoTCP}})
	if err != nil {
		t.Fatal(err)
	}
	if entered := set.TakeEntered(); len(entered) != 1 || entered[0] != ns.Cookie(t) {
		t.Fatalf("terminate %+v entered %v, want only the netns whose bucket holds %s", tr, entered, gone)
	}
	if tr.Destroyed != reached[gone] {
		t.Fatalf("destroyed %d sockets, want the %d of %s", tr.Destroyed, reached[gone], gone)
	}
}

// A restart with other [limits] migrates the pinned maps to the new sizes without losing
// services, pods or socket state: replies still show the VIP, the counts are rebuilt
// exactly, termination still finds the sockets. A limit below what the pins hold is
// refused in one line naming it, and the node keeps serving as it was.
func TestPrivilegedLimitsResizePinnedMaps(t *testing.T) {
	f := newFixture(t)
	ns := clientNetns(t)
	set := newTestNetns(t, ns)
	small := Limits{Services: 8, Slots: 64, Pods: 4, Containers: 8, PodServices: 16, SocketCounts: 8}
	load := func(l Limits) (*Datapath, error) {
		return Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs, Limits: l})
	}
	dp, err := load(small)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		dp.Close()
		if err := Cleanup(f.bpffs); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	web := tcpService("default/web", webVIP, be(beA, 1), be(beB, 1))
	web.Policy.AffinityPod = true
	svcs := []Service{web, udpService("kube-system/dns", dnsVIP, be(dnsA, 1))}
	apply(t, dp, svcs...)
	if err := dp.SetPod(Pod{SandboxID: "pod-a", NetnsCookie: ns.Cookie(t)}); err != nil {
		t.Fatal(err)
	}
	r, err := testenv.DialTCP(ns, 0, webVIP, true)
	if err != nil {
		t.Fatal(err)
	}
	keepOpen(t, r.FD)
	tcpFD, tcpBackend := r.FD, r.Backend
	udpFD := udpClient(t, ns, dnsVIP, true, "dnsA")
	dp.Close()

	// Below what the pins hold: refused, nothing changed.
	_, err = load(Limits{Services: 1, Slots: 64, Pods: 4, Containers: 8, PodServices: 16, SocketCounts: 8})
	if err == nil || !strings.Contains(err.Error(), "limits.services") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("load with limits.services below the pinned services: %v, want one line naming the limit", err)
	}
	if got, err := testenv.DialTCP(ns, 0, webVIP, false); err != nil || got.Peer != webVIP {
		t.Fatalf("after the refused load the node no longer serves: %+v %v", got, err)
	}

	big := Limits{Services: 4096, Slots: 16384, Pods: 512, Containers: 1024, PodServices: 8192, SocketCounts: 2048}
	if dp, err = load(big); err != nil {
		t.Fatal(err)
	}
	stats, err := dp.MapStats()
	if err != nil {
		t.Fatal(err)
	}
	capacity := map[string]int{}
	for _, s := range stats {
		capacity[s.Name] = s.Capacity
	}
	for name, want := range map[string]int{"podsock_svc_v1": 4096, "podsock_slot_v1": 16384, "podsock_pod_v1": 512,
		"podsock_ctrcg_v1": 1024, "podsock_aff_v3": 8192, "podsock_svcnetns_v2": 2048} {
		if capacity[name] != want {
			t.Errorf("%s holds %d entries after the resize, want %d", name, capacity[name], want)
		}
	}
	if got, err := dp.Services(); err != nil || len(got) != 2 {
		t.Fatalf("services after the resize: %v %v, want both", got, err)
	}
	if dp.PodCount() != 1 {
		t.Fatalf("%d pods after the resize, want pod-a", dp.PodCount())
	}
	if sa, err := unix.Getpeername(tcpFD); err != nil || testenv.AddrPort(sa) != webVIP {
		t.Fatalf("held TCP socket's peer after the resize: %v %v, want the VIP", sa, err)
	}
	if res, err := testenv.UDPExchange(udpFD, unix.AF_INET, netip.AddrPort{}); err != nil || res.From != dnsVIP {
		t.Fatalf("connected UDP after the resize: %+v %v, want a reply from the VIP", res, err)
	}
	// Pod affinity survived: the pod's next connects go where its first one did.
	if r, err := testenv.DialTCP(ns, 0, webVIP, false); err != nil || r.Backend != tcpBackend {
		t.Fatalf("pod affinity after the resize: %+v %v, want %s", r, err, tcpBackend)
	}
	if err := dp.TerminateErr(0); err != nil {
		t.Fatalf("iterators after the resize: %v", err)
	}
	if dp.BackfillPending() {
		if _, err := dp.Backfill(set); err != nil {
			t.Fatal(err)
		}
	}
	if got := socketCounts(t, dp); got[webVIP][backendBucket(map[string]netip.AddrPort{"A": beA, "B": beB}[tcpBackend])] != 1 ||
		got[dnsVIP][backendBucket(dnsA)] != 1 {
		t.Fatalf("socket counts after the resize: %v, want the held TCP and UDP sockets", got)
	}
	// The pins now hold the resized maps, the counts included once the backfill ran.
	for name, want := range map[string]uint32{"podsock_svc_v1": 4096, "podsock_aff_v3": 8192, "podsock_svcnetns_v2": 2048} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(f.bpffs, PinDirName, name), nil)
		if err != nil {
			t.Fatalf("pin %s after the resize: %v", name, err)
		}
		if got := m.MaxEntries(); got != want {
			t.Errorf("pinned %s holds %d entries, want %d", name, got, want)
		}
		m.Close()
	}
	other := map[string]netip.AddrPort{"A": beB, "B": beA}[tcpBackend]
	web.Backends = []Backend{be(other, 1)}
	res := apply(t, dp, web, udpService("kube-system/dns", dnsVIP, be(dnsB, 1)))
	tr, err := dp.Terminate(set, res.RemovedBackends, TerminateOptions{Protocols: []uint8{ProtoTCP, ProtoUDP}})
	if err != nil || tr.Destroyed != 2 || tr.FullWalk {
		t.Fatalf("terminate after the resize: %+v %v, want both held sockets found through their counts", tr, err)
	}
}

// A Service of 5,000 endpoints fits once an operator raises the per-service limits; under
// the defaults it is refused whole, in one line naming the limit.
func TestPrivilegedServiceOf5000Backends(t *testing.T) {
	f := newFixture(t)
	var backends []Backend
	for i := range 5000 {
		backends = append(backends, be(netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 89, byte(i >> 8), byte(i)}), 8080), 1))
	}
	svc := tcpService("default/big", webVIP, backends...)
	dp := f.load()
	if _, err := dp.Apply([]Service{svc}); err == nil || !strings.Contains(err.Error(), "limits.backends_per_service") {
		t.Fatalf("5,000 backends under the default limits: %v, want a refusal naming limits.backends_per_service", err)
	}
	if got, _ := dp.Services(); len(got) != 0 {
		t.Fatalf("a refused config left %d services", len(got))
	}
	dp.Close()
	dp, err := Load(Options{CgroupRoot: f.cg.Path, BPFFS: f.bpffs, Limits: Limits{BackendsPerService: 5000, SlotsPerService: 8192}})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	apply(t, dp, svc)
	got, err := dp.Services()
	if err != nil || len(got) != 1 || len(got[0].Backends) != 5000 {
		t.Fatalf("services: %d (%v), want one of 5,000 backends", len(got), err)
	}
}

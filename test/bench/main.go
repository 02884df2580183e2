// Command bench measures podsock's datapath against baselines measured in the same run,
// interleaving the cases round by round, and prints ratios. Run it as root: `make bench`.
//
// Every client and backend lives in network namespaces and cgroups this program creates
// and removes; VIP ranges are blackholed (or, for the iptables baseline, routed into a
// dummy device in a netns with no uplink), so nothing can leave the machine.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"math/bits"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/internal/cgroupfs"
	"github.com/podsock/podsock/test/cri"
	"github.com/podsock/podsock/test/testenv"
)

var (
	rounds      = flag.Int("rounds", 30, "rounds; each alternates the cases operation by operation")
	perRound    = flag.Int("ops", 500, "operations per case per round")
	manyCount   = flag.Int("many", 100000, "services in the 'many services' datapath")
	iptCount    = flag.Int("iptables", 10000, "rules/services in the kube-proxy comparison")
	podsockBin  = flag.String("podsock", "bin/podsock", "podsock binary for the agent apply benchmark")
	podRounds   = flag.Int("podstart", 20, "pod start rounds, each starting one pod with podsock attached and one without")
	only        = flag.String("only", "", `run one section only: "socklb", "agent" (also part of socklb), "revnat", "trace", "podstart", "sockets" or "kube"`)
	podServices = flag.Int("podstart-services", 10000, "services (one in ten with an allow-list) podsock serves during the pod start bench")
	podRuntimes = flag.String("podstart-runtimes", "containerd,crio", "runtimes the pod start bench runs under, comma-separated")
)

var (
	backendTCP = netip.MustParseAddrPort("10.88.0.5:8080")
	backendUDP = netip.MustParseAddrPort("10.88.0.5:5353")
	vipRange   = "10.96.0.0/12"
)

// vip returns the i-th service address in 10.96.0.0/12.
func vip(i int) netip.AddrPort {
	base := netip.MustParseAddr("10.96.0.1").As4()
	n := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	n += uint32(i)
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}), 80)
}

func services(n int, be netip.AddrPort) []datapath.Service {
	out := make([]datapath.Service, n)
	for i := range out {
		v := vip(i)
		out[i] = datapath.Service{Name: fmt.Sprintf("bench/svc-%d", i), VIP: v.Addr(), Port: v.Port(), Proto: datapath.ProtoTCP,
			Backends: []datapath.Backend{{Addr: be, Weight: 1}}}
	}
	return out
}

// The main thread runs only the main goroutine, so it never enters a netns a helper
// goroutine works in: /proc/self/ns/net stays the host's (the termination bench walks it).
func init() { runtime.LockOSThread() }

func main() {
	flag.Parse()
	if *holderNetns != "" {
		os.Exit(runHolder(*holderNetns))
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench: must run as root")
		os.Exit(1)
	}
	e := &env{}
	e.Main("bench", e.run)
}

func (e *env) run() {
	switch *only {
	case "":
		e.socketLB()
		e.printAgent()
		e.printRevNAT()
		e.traceCost()
		e.printPodStart()
		e.printSockets()
		e.printKube()
	case "socklb":
		e.socketLB()
		e.printAgent()
	case "agent":
		e.printAgent()
	case "revnat":
		e.printRevNAT()
	case "trace":
		e.traceCost()
	case "podstart":
		e.printPodStart()
	case "sockets":
		e.printSockets()
	case "kube":
		e.printKube()
	default:
		e.Fatalf("-only %q: want socklb, agent, revnat, trace, podstart, sockets or kube", *only)
	}
}

func (e *env) printPodStart() {
	for _, k := range strings.Split(*podRuntimes, ",") {
		e.printPodStartUnder(cri.Kind(strings.TrimSpace(k)))
	}
}

func (e *env) printPodStartUnder(kind cri.Kind) {
	fmt.Printf("\npod start under %s (crictl runp + create + start), %d rounds alternating a %s with podsock as its NRI plugin (serving %d services) and one without...\n", kind, *podRounds, kind, *podServices+2)
	r := e.podStart(kind, *podRounds)
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "case\tpodsock\tbaseline\tratio\ttarget\t")
	fmt.Fprintf(w, "pod start under %s: with podsock vs without\t%v\t%v\t%.3fx\t<= 1.05x\t\n", kind,
		median(r.with).Round(time.Millisecond/10), median(r.without).Round(time.Millisecond/10), medianRatio(r.ratios))
	w.Flush()
	fmt.Println("\nNRI handler latency (time inside podsock's handlers), per event:")
	w = tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "event\tcount\tp50\tp99\tmax\t")
	kinds := slices.Sorted(maps.Keys(r.latency))
	for _, k := range kinds {
		l := r.latency[k]
		fmt.Fprintf(w, "%s\t%d\t%v\t%v\t%v\t\n", k, l.Count, l.P50, l.P99, l.Max)
	}
	w.Flush()
	fmt.Println("(target: p99 < 1ms for all_pod_events)")
}

func (e *env) socketLB() {
	ns := testenv.NewNetns(e, []string{vipRange}, "10.88.0.5/32")
	startAcceptor(e, ns, backendTCP)
	startUDPEcho(e, ns, backendUDP)

	// Sibling cgroups: programs attached to one never run for another.
	cgOne, cgMany, cgIPT, cgNone := testenv.NewCgroup(e), testenv.NewCgroup(e), testenv.NewCgroup(e), testenv.NewCgroup(e)
	home, err := testenv.HomeCgroup()
	if err != nil {
		e.Fatal(err)
	}
	e.Cleanup(func() { enter(home) })
	one := e.datapath(cgOne, 2)
	apply(one, append(services(1, backendTCP), datapath.Service{
		Name: "bench/udp", VIP: vip(0).Addr(), Port: 53, Proto: datapath.ProtoUDP,
		Backends: []datapath.Backend{{Addr: backendUDP, Weight: 1}},
	}))
	many := e.datapath(cgMany, *manyCount)
	start := time.Now()
	apply(many, services(*manyCount, backendTCP))
	fmt.Printf("loaded %d services into a datapath in %v\n", *manyCount, time.Since(start).Round(time.Millisecond))
	ipt := e.datapath(cgIPT, *iptCount+1)
	apply(ipt, append(services(*iptCount, backendTCP), datapath.Service{
		Name: "bench/udp", VIP: vip(0).Addr(), Port: 53, Proto: datapath.ProtoUDP,
		Backends: []datapath.Backend{{Addr: backendUDP, Weight: 1}},
	}))
	nsIPT, iptLoad := e.kubeProxyNetns(*iptCount)
	nsNFT, nftLoad := e.nftablesNetns(*iptCount)

	lastIPT := vip(*iptCount - 1)
	fmt.Printf("running %d rounds of %d operations per case, cases alternating op by op...\n\n", *rounds, *perRound)
	res := interleave(*rounds, *perRound, []benchCase{
		{name: "vip", cg: cgOne, ns: ns, addr: vip(0)},
		{name: "direct", cg: cgOne, ns: ns, addr: backendTCP},
		{name: "direct-no-podsock", cg: cgNone, ns: ns, addr: backendTCP},
		{name: "vip-many", cg: cgMany, ns: ns, addr: vip(*manyCount - 1)},
		{name: "direct-many", cg: cgMany, ns: ns, addr: backendTCP},
	})
	maps.Copy(res, interleave(*rounds, *perRound, []benchCase{
		{name: "vip-10k", cg: cgIPT, ns: ns, addr: lastIPT},
		{name: "direct-10k", cg: cgIPT, ns: ns, addr: backendTCP},
		{name: "iptables-10k", cg: cgNone, ns: nsIPT, addr: lastIPT},
		{name: "nftables-10k", cg: cgNone, ns: nsNFT, addr: lastIPT},
	}))
	// UDP round trips wait for the echo server; measured apart so their wake-ups do not
	// land on the connect() timings.
	maps.Copy(res, interleave(*rounds, *perRound, []benchCase{
		{name: "udp-vip", cg: cgOne, ns: ns, udp: true, addr: netip.AddrPortFrom(vip(0).Addr(), 53)},
		{name: "udp-direct", cg: cgOne, ns: ns, udp: true, addr: backendUDP},
		{name: "udp-direct-no-podsock", cg: cgNone, ns: ns, udp: true, addr: backendUDP},
		{name: "udp-vip-10k", cg: cgIPT, ns: ns, udp: true, addr: netip.AddrPortFrom(vip(0).Addr(), 53)},
		{name: "udp-direct-10k", cg: cgIPT, ns: ns, udp: true, addr: backendUDP},
	}))
	enter(home)
	// Apart from the timed rounds: run-time statistics cost every program run two clock
	// reads, which only the podsock side would pay.
	vipCost := e.programCost(many, "connect4", benchCase{name: "vip-many", cg: cgMany, ns: ns, addr: vip(*manyCount - 1)})
	otherCost := e.programCost(many, "connect4", benchCase{name: "direct-many", cg: cgMany, ns: ns, addr: backendTCP})
	enter(home)

	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "case\tpodsock\tbaseline\tratio\ttarget\t")
	row := func(name, a, b, target string, higherIsBetter bool) {
		ratio := res.ratio(a, b)
		label := fmt.Sprintf("%.3fx", ratio)
		if higherIsBetter {
			label = fmt.Sprintf("%.2fx faster", 1/ratio)
		}
		fmt.Fprintf(w, "%s\t%v\t%v\t%s\t%s\t\n", name, median(res[a]), median(res[b]), label, target)
	}
	row("TCP connect: VIP vs direct to backend", "vip", "direct", "<= 1.03x", false)
	row("TCP connect: VIP vs direct, no podsock at all", "vip", "direct-no-podsock", "(info)", false)
	row("TCP connect to no service: podsock attached vs not", "direct", "direct-no-podsock", "<= 1.01x", false)
	row(fmt.Sprintf("TCP connect: VIP with %d services vs 1", *manyCount), "vip-many", "vip", "<= 1.05x", false)
	row(fmt.Sprintf("TCP connect: VIP vs direct, %d services", *iptCount+1), "vip-10k", "direct-10k", "<= 1.05x", false)
	row(fmt.Sprintf("TCP connect: VIP vs direct, %d services", *manyCount), "vip-many", "direct-many", "<= 1.05x", false)
	row(fmt.Sprintf("TCP connect: podsock %d svcs vs iptables DNAT %d rules", *iptCount, *iptCount), "vip-10k", "iptables-10k", ">= 5x faster", true)
	row(fmt.Sprintf("TCP connect: podsock %d svcs vs nftables verdict map %d", *iptCount, *iptCount), "vip-10k", "nftables-10k", ">= 1.3x faster", true)
	fmt.Fprintf(w, "TCP connect: share of the most podsock could gain over iptables, %d svcs\t\t\t%.1f%%\t>= 95%%\t\n",
		*iptCount, 100*(1/res.ratio("vip-10k", "direct-10k")))
	row("UDP sendmsg+recvmsg round trip: VIP vs direct", "udp-vip", "udp-direct", "<= 1.11x (>= 0.9x throughput)", false)
	row("UDP round trip to no service: podsock attached vs not", "udp-direct", "udp-direct-no-podsock", "<= 1.01x", false)
	w.Flush()
	fmt.Printf("\nUDP throughput via VIP: %.3fx of direct with 1 service, %.3fx with %d (target >= 0.97x)\n",
		1/res.ratio("udp-vip", "udp-direct"), 1/res.ratio("udp-vip-10k", "udp-direct-10k"), *iptCount+1)
	fmt.Printf("iptables-restore of %d DNAT rules took %v (%s), nft -f of %d services %v\n", *iptCount, iptLoad.Round(time.Millisecond),
		iptablesVersion(), *iptCount, nftLoad.Round(time.Millisecond))
	fmt.Printf("connect4 program (bpf_stats, in rounds of their own): VIP path %v per connect (%d runs), no-service path %v (%d runs)\n",
		vipCost.PerRun(), vipCost.Runs, otherCost.PerRun(), otherCost.Runs)
	fmt.Println("(podsock/baseline: median per-operation cost; ratio: median of per-round ratios)")
}

// limitsFor sizes the maps as an operator would for this many services of one or two
// backends: the next power of two, never below the defaults.
func limitsFor(services int) datapath.Limits {
	return datapath.Limits{Services: max(1<<bits.Len(uint(services)), 32768), Slots: max(1<<bits.Len(uint(2*services)), 262144)}
}

// env is the bench's world; its cleanups undo everything at exit.
type env struct{ testenv.Standalone }

func (e *env) datapath(cg *testenv.Cgroup, services int) *datapath.Datapath {
	bpffs := testenv.BPFFS(e)
	dp, err := datapath.Load(datapath.Options{CgroupRoot: cg.Path, BPFFS: bpffs, Limits: limitsFor(services)})
	if err != nil {
		e.Fatal(err)
	}
	e.Cleanup(func() {
		dp.Close()
		if err := datapath.Cleanup(bpffs); err != nil {
			e.Errorf("cleanup: %v", err)
		}
	})
	return dp
}

func apply(dp *datapath.Datapath, svcs []datapath.Service) {
	if _, err := dp.Apply(svcs); err != nil {
		panic(err)
	}
}

// kubeProxyNetns builds the iptables baseline: one DNAT rule per service in the OUTPUT
// nat chain, as kube-proxy's iptables mode does.
func (e *env) kubeProxyNetns(n int) (*testenv.Netns, time.Duration) {
	var rules strings.Builder
	rules.WriteString("*nat\n:KUBE-SERVICES - [0:0]\n-A OUTPUT -j KUBE-SERVICES\n")
	for i := range n {
		v := vip(i)
		fmt.Fprintf(&rules, "-A KUBE-SERVICES -d %s/32 -p tcp -m tcp --dport %d -j DNAT --to-destination %s\n",
			v.Addr(), v.Port(), backendTCP)
	}
	rules.WriteString("COMMIT\n")
	return e.natNetns("iptables-restore", rules.String(), "iptables-restore")
}

// nftablesNetns builds the baseline of kube-proxy's nftables mode: one verdict map from
// VIP, protocol and port to the service's chain, which picks an endpoint chain by a
// random number, which DNATs.
func (e *env) nftablesNetns(n int) (*testenv.Netns, time.Duration) {
	var rules strings.Builder
	rules.WriteString("table ip kube-proxy {\n")
	for i := range n {
		fmt.Fprintf(&rules, "chain endpoint-%d {\nmeta l4proto tcp dnat to %s\n}\n", i, backendTCP)
		fmt.Fprintf(&rules, "chain service-%d {\nnumgen random mod 1 vmap { 0 : goto endpoint-%d }\n}\n", i, i)
	}
	rules.WriteString("map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; elements = {\n")
	for i := range n {
		v := vip(i)
		sep := ","
		if i == n-1 {
			sep = ""
		}
		fmt.Fprintf(&rules, "%s . tcp . %d : goto service-%d%s\n", v.Addr(), v.Port(), i, sep)
	}
	rules.WriteString("}\n}\n")
	rules.WriteString("chain services {\nip daddr . meta l4proto . th dport vmap @service-ips\n}\n")
	rules.WriteString("chain nat-output {\ntype nat hook output priority -100; policy accept;\njump services\n}\n}\n")
	return e.natNetns("nft -f", rules.String(), "nft", "-f", "-")
}

// natNetns is a kube-proxy baseline: a netns with no uplink, the backend on its lo, and
// the rules that load (a command reading them on stdin) installs; it returns how long the
// load took. DNAT needs a route for the VIP, and a blackhole would fail connect() before
// netfilter sees it, so the VIP range is routed as local to lo: whatever DNAT misses stays
// inside this netns, which has no other interface at all.
func (e *env) natNetns(what, rules string, load ...string) (*testenv.Netns, time.Duration) {
	ns := testenv.NewNetns(e, nil, "10.88.0.5/32")
	testenv.Run(e, "ip", "-n", ns.Name, "route", "add", "local", vipRange, "dev", "lo")
	links, _ := exec.Command("ip", "-n", ns.Name, "-o", "link", "show").Output()
	if got := strings.Count(strings.TrimSpace(string(links)), "\n") + 1; got != 1 {
		e.Fatalf("%s baseline netns has %d links, want only lo:\n%s", what, got, links)
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns.Name}, load...)...)
	cmd.Stdin = strings.NewReader(rules)
	start := time.Now()
	if out, err := cmd.CombinedOutput(); err != nil {
		e.Fatalf("%s: %v: %s", what, err, out)
	}
	took := time.Since(start)
	// The backend must be reachable in this netns too.
	startAcceptor(e, ns, backendTCP)
	return ns, took
}

// iptablesVersion says which iptables the baseline ran: Debian's default is nf_tables.
func iptablesVersion() string {
	out, err := exec.Command("iptables", "-V").Output()
	if err != nil {
		return "iptables -V: " + err.Error()
	}
	return strings.TrimSpace(string(out))
}

// benchCase is one kind of operation: a TCP connect() or a UDP round trip to addr from a
// socket created in ns while the process sat in cg (a socket keeps its cgroup for life).
type benchCase struct {
	name string
	cg   *testenv.Cgroup
	ns   *testenv.Netns
	udp  bool
	addr netip.AddrPort
	// spread, when set, replaces addr: TCP operation i connects to spread[i%len], so a
	// direct baseline spreads over the backends as the balanced case does (one listener
	// taking every connection wakes its acceptor less often than ten taking a tenth each).
	spread []netip.AddrPort
}

// samples holds each case's per-operation cost, one value per round.
type samples map[string][]time.Duration

func median[T float64 | time.Duration](v []T) T {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// ratio is the median over rounds of a's cost divided by b's cost in the same round.
func (s samples) ratio(a, b string) float64 {
	r := make([]float64, len(s[a]))
	for i := range r {
		r[i] = float64(s[a][i]) / float64(s[b][i])
	}
	return median(r)
}

// interleave alternates the cases operation by operation, in random order: every
// case's i-th operation runs right next to the others', so the machine's drift (large on a
// 2-core VM) hits all cases alike. Sockets are created up front, per case, in the case's cgroup and netns.
func interleave(rounds, ops int, cases []benchCase) samples {
	out := samples{}
	for r := -1; r < rounds; r++ { // round -1 warms up
		fds := make([][]int, len(cases))
		for ci, c := range cases {
			enter(c.cg)
			n := ops
			if c.udp {
				n = 1 // one unconnected socket per round, as a resolver would reuse it
			}
			fds[ci] = makeSockets(c.ns, c.udp, n)
		}
		totals := make([]time.Duration, len(cases))
		for i := range ops {
			// A fresh random order each time: an operation pays for leftovers of the one
			// before it (the iptables path leaves work behind), so no case may always
			// follow the same other.
			for _, ci := range rand.Perm(len(cases)) {
				c := cases[ci]
				if c.udp {
					totals[ci] += udpRoundTrip(fds[ci][0], c.addr)
				} else {
					addr := c.addr
					if len(c.spread) > 0 {
						addr = c.spread[i%len(c.spread)]
					}
					totals[ci] += connectOnce(fds[ci][i], addr)
				}
			}
		}
		for _, f := range fds {
			closeAll(f)
		}
		if r < 0 {
			continue
		}
		for ci, c := range cases {
			out[c.name] = append(out[c.name], totals[ci]/time.Duration(ops))
		}
	}
	return out
}

// programCost runs c for a few rounds with BPF run-time statistics on and returns what
// dp's program prog cost over them.
func (e *env) programCost(dp *datapath.Datapath, prog string, c benchCase) datapath.ProgramCost {
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		e.Fatalf("enable BPF run-time stats: %v", err)
	}
	defer stats.Close()
	before, err := dp.ProgramCosts()
	if err != nil {
		e.Fatal(err)
	}
	interleave(statRounds, *perRound, []benchCase{c})
	after, err := dp.ProgramCosts()
	if err != nil {
		e.Fatal(err)
	}
	cost := after[prog]
	cost.Runs -= before[prog].Runs
	cost.Runtime -= before[prog].Runtime
	return cost
}

// statRounds: enough program runs for a per-run mean; their timings are not used.
const statRounds = 5

func enter(cg *testenv.Cgroup) {
	if err := cg.AddProcess(os.Getpid()); err != nil {
		panic(fmt.Sprintf("enter cgroup %s: %v", cg.Path, err))
	}
}

func makeSockets(ns *testenv.Netns, udp bool, n int) []int {
	typ := unix.SOCK_STREAM
	if udp {
		typ = unix.SOCK_DGRAM
	}
	fds := make([]int, 0, n)
	err := ns.Do(func() error {
		for range n {
			fd, err := unix.Socket(unix.AF_INET, typ|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			fds = append(fds, fd)
		}
		return nil
	})
	if err != nil {
		closeAll(fds)
		panic(err)
	}
	if udp {
		tv := unix.Timeval{Sec: 2}
		unix.SetsockoptTimeval(fds[0], unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	}
	return fds
}

// closeAll resets TCP connections instead of leaving TIME_WAIT behind between rounds.
func closeAll(fds []int) {
	linger := &unix.Linger{Onoff: 1, Linger: 0}
	for _, fd := range fds {
		unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, linger)
		unix.Close(fd)
	}
}

func connectOnce(fd int, addr netip.AddrPort) time.Duration {
	sa := testenv.Sockaddr(unix.AF_INET, addr)
	start := time.Now()
	err := testenv.Connect(fd, sa)
	took := time.Since(start)
	if err != nil {
		panic(fmt.Sprintf("connect %s: %v", addr, err))
	}
	return took
}

// udpRoundTrip sends one datagram and waits for the echo, checking that the reply
// appears to come from the address the datagram was sent to.
func udpRoundTrip(fd int, addr netip.AddrPort) time.Duration {
	var buf [64]byte
	sa := testenv.Sockaddr(unix.AF_INET, addr)
	start := time.Now()
	if err := unix.Sendto(fd, buf[:8], 0, sa); err != nil {
		panic(fmt.Sprintf("sendto %s: %v", addr, err))
	}
	for {
		_, from, err := unix.Recvfrom(fd, buf[:], 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			panic(fmt.Sprintf("recvfrom: %v", err))
		}
		if got := testenv.AddrPort(from); got != addr {
			panic(fmt.Sprintf("reply from %s, want %s", got, addr))
		}
		return time.Since(start)
	}
}

// startAcceptor accepts and drops connections as cheaply as possible, so the server's
// work weighs little in the client's measurement.
func startAcceptor(e *env, ns *testenv.Netns, addr netip.AddrPort) {
	var lfd int
	if err := ns.Do(func() (err error) {
		lfd, err = listenTCP(addr)
		return err
	}); err != nil {
		e.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		acceptEach(lfd, func(fd int, _ unix.Sockaddr) { unix.Close(fd) })
	}()
	e.Cleanup(func() {
		unix.Shutdown(lfd, unix.SHUT_RDWR)
		<-done
		unix.Close(lfd)
	})
}

// listenTCP listens on addr in the calling thread's netns.
func listenTCP(addr netip.AddrPort) (int, error) {
	lfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	unix.SetsockoptInt(lfd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	if err := unix.Bind(lfd, testenv.Sockaddr(unix.AF_INET, addr)); err != nil {
		unix.Close(lfd)
		return -1, fmt.Errorf("bind %s: %w", addr, err)
	}
	if err := unix.Listen(lfd, 4096); err != nil {
		unix.Close(lfd)
		return -1, err
	}
	return lfd, nil
}

// acceptEach hands every accepted connection to fn until the listener fails.
func acceptEach(lfd int, fn func(fd int, peer unix.Sockaddr)) {
	for {
		fd, sa, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ECONNABORTED) {
			continue
		}
		if err != nil {
			return
		}
		fn(fd, sa)
	}
}

func startUDPEcho(e *env, ns *testenv.Netns, addr netip.AddrPort) {
	var pc net.PacketConn
	if err := ns.Do(func() (err error) {
		pc, err = net.ListenPacket("udp", addr.String())
		return err
	}); err != nil {
		e.Fatal(err)
	}
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
	e.Cleanup(func() { pc.Close() })
}

// scrapeUntil scrapes url every 20 ms until stop closes, and returns how long each
// answered scrape took.
func scrapeUntil(url string, stop <-chan struct{}) []time.Duration {
	client := &http.Client{Timeout: 5 * time.Second}
	var out []time.Duration
	for {
		select {
		case <-stop:
			return out
		case <-time.After(20 * time.Millisecond):
		}
		t0 := time.Now()
		resp, err := client.Get(url)
		if err != nil {
			continue
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			out = append(out, time.Since(t0))
		}
	}
}

// freeLoopbackAddr is a 127.0.0.1 address with a port free now, for an agent's metrics.
func freeLoopbackAddr(e *env) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func procMem(pid int) (rss, hwm int64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		var kb int64
		if _, err := fmt.Sscanf(line, "VmRSS: %d kB", &kb); err == nil {
			rss = kb << 10
		}
		if _, err := fmt.Sscanf(line, "VmHWM: %d kB", &kb); err == nil {
			hwm = kb << 10
		}
	}
	return rss, hwm
}

// tempDir makes a directory that is removed at exit.
func (e *env) tempDir(prefix string) string {
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		e.Fatal(err)
	}
	e.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// runAgent starts `podsock run --config cfgPath`, its output to out; at exit it stops
// the agent and runs `podsock cleanup`.
func (e *env) runAgent(cfgPath string, out io.Writer) *exec.Cmd {
	cmd := exec.Command(*podsockBin, "run", "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		e.Fatal(err)
	}
	e.Cleanup(func() {
		cmd.Process.Signal(unix.SIGTERM)
		cmd.Wait()
		exec.Command(*podsockBin, "cleanup", "--config", cfgPath).Run()
	})
	return cmd
}

// runtimeCgroupRoot is rt's pod cgroup parent, created if missing: the agent attaches
// there, never higher.
func (e *env) runtimeCgroupRoot(rt *cri.Runtime) string {
	cgroup2, err := cgroupfs.Mount()
	if err != nil {
		e.Fatal(err)
	}
	root := filepath.Join(cgroup2, rt.CgroupRoot())
	if err := os.MkdirAll(root, 0o755); err != nil {
		e.Fatal(err)
	}
	return root
}

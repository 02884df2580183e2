package main

import (
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/test/cri"
	"github.com/podsock/podsock/test/testenv"
)

var (
	sockNetns   = flag.Int("sockets-netns", 100, "network namespaces in the socket termination and listing benches")
	sockPerNS   = flag.Int("sockets-per-netns", 1000, "client sockets per netns")
	sockRounds  = flag.Int("sockets-rounds", 10, "rounds of the one-netns termination comparison")
	sockRoundsA = flag.Int("sockets-rounds-all", 3, "rounds of the all-netns termination comparison (each rebuilds every socket)")
	e2eRounds   = flag.Int("sockets-e2e", 20, "config change -> ECONNABORTED rounds")
	holderNetns = flag.String("holder", "", "internal: run as a socket holder in the netns at this path")
)

// Two backends present in every netns of the bench: X is the one that goes away.
var (
	backendX = netip.MustParseAddrPort("10.88.0.5:8080")
	backendY = netip.MustParseAddrPort("10.88.0.6:8080")
	vipX     = netip.MustParseAddrPort("10.96.0.20:80")
	vipY     = netip.MustParseAddrPort("10.96.0.21:80")
)

func (e *env) printSockets() {
	fmt.Printf("\nsocket termination: %d netns x %d client sockets each, one datapath; targeted (podsock) vs baselines, alternating...\n", *sockNetns, *sockPerNS)
	t := e.terminationBench()
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "case\tpodsock\tbaseline\tratio\ttarget\t")
	fmt.Fprintf(w, "destroy %d sockets of one backend in 1 of %d netns: targeted vs every netns (Cilium's way)\t%v\t%v\t%.1fx faster\t>= 10x faster\t\n",
		*sockPerNS, *sockNetns+1, median(t.oneTargeted).Round(time.Microsecond), median(t.oneWalkAll).Round(time.Microsecond), medianRatio(t.oneRatios))
	fmt.Fprintf(w, "destroy %d sockets of one backend in all %d netns: podsock vs ss -K per netns\t%v\t%v\t%.1fx faster\t(info)\t\n",
		*sockPerNS**sockNetns, *sockNetns, median(t.allPodsock).Round(time.Millisecond), median(t.allSS).Round(time.Millisecond), medianRatio(t.allRatios))
	w.Flush()
	fmt.Printf("netns entered per pass: targeted %d, Cilium's way %d\n", t.oneEntered, t.walkEntered)

	fmt.Printf("\nsocket listing and end-to-end termination: the agent on a containerd with %d pods x %d client sockets...\n", *sockNetns, *sockPerNS)
	a := e.agentSocketsBench()
	sorted := slices.Clone(a.e2e)
	slices.Sort(sorted)
	fmt.Printf("\nconfig change -> client read fails with ECONNABORTED (agent, SIGHUP, %d rounds): p50 %v, p90 %v, max %v (target < 100ms)\n",
		len(a.e2e), sorted[len(sorted)/2].Round(time.Millisecond/10), sorted[len(sorted)*9/10].Round(time.Millisecond/10),
		sorted[len(sorted)-1].Round(time.Millisecond/10))
	fmt.Printf("listing all sockets through the agent (%d records: %d client sockets, their server ends and the listeners): median %v over %d runs\n",
		a.listed, *sockNetns**sockPerNS, median(a.list).Round(time.Millisecond), len(a.list))
	fmt.Printf("agent memory: RSS %d MiB before listing, peak %d MiB before, peak %d MiB after\n",
		a.rssBefore>>20, a.hwmBefore>>20, a.hwmAfter>>20)
}

type terminationResult struct {
	oneTargeted, oneWalkAll []time.Duration
	oneRatios               []float64
	allPodsock, allSS       []time.Duration
	allRatios               []float64
	oneEntered, walkEntered int
}

// terminationBench compares what one termination pass costs: podsock's, which enters only
// the netns holding sockets of the removed backend, against walking every netns (what
// Cilium does on every backend deletion), and against running `ss -K` in each netns.
func (e *env) terminationBench() terminationResult {
	cg := testenv.NewCgroup(e)
	home, err := testenv.HomeCgroup()
	if err != nil {
		e.Fatal(err)
	}
	dp := e.datapath(cg, 2)
	// Cilium's way walks the host's netns too; main's init keeps the main thread in it.
	nss := []*testenv.Netns{{Name: "host", Path: "/proc/self/ns/net"}}
	for range *sockNetns {
		nss = append(nss, testenv.NewNetns(e, []string{vipRange}, "10.88.0.5/32", "10.88.0.6/32"))
	}
	set := testenv.NewNetnsSet(e, datapath.ErrUnknownNetns, nss...)
	nss = nss[1:]
	svcs := func(xBackends ...netip.AddrPort) []datapath.RemovedBackend {
		s := []datapath.Service{
			{Name: "bench/x", VIP: vipX.Addr(), Port: vipX.Port(), Proto: datapath.ProtoTCP},
			{Name: "bench/y", VIP: vipY.Addr(), Port: vipY.Port(), Proto: datapath.ProtoTCP,
				Backends: []datapath.Backend{{Addr: backendY, Weight: 1}}},
		}
		for _, b := range xBackends {
			s[0].Backends = append(s[0].Backends, datapath.Backend{Addr: b, Weight: 1})
		}
		res, err := dp.Apply(s)
		if err != nil {
			e.Fatal(err)
		}
		return res.RemovedBackends
	}
	svcs(backendX)
	// Holders inherit the cgroup: the programs attached to cg see their sockets.
	enter(cg)
	var holders []*holder
	for _, ns := range nss {
		holders = append(holders, startHolder(e, ns.Path))
	}
	enter(home)

	// Every netns holds its share of sockets to Y, which stays.
	all(holders, fmt.Sprintf("connect bg %s %d", vipY, *sockPerNS))
	terminate := func(walkAll bool, want int) (time.Duration, datapath.TerminateResult) {
		gone := svcs()
		res, err := dp.Terminate(set, gone, datapath.TerminateOptions{Protocols: []uint8{datapath.ProtoTCP}, WalkAllNetns: walkAll})
		if err != nil {
			e.Fatal(err)
		}
		if res.Destroyed != want || res.Failed != 0 {
			e.Fatalf("termination destroyed %d (failed %d), want %d", res.Destroyed, res.Failed, want)
		}
		return res.Duration, res
	}

	var r terminationResult
	for round := range *sockRounds + 1 { // round 0 warms up
		var took [2]time.Duration
		for _, walkAll := range []bool{round%2 == 0, round%2 != 0} {
			svcs(backendX)
			all(holders[:1], fmt.Sprintf("connect x %s %d", vipX, *sockPerNS))
			d, res := terminate(walkAll, *sockPerNS)
			all(holders[:1], "check x")
			all(holders[:1], "close x")
			if walkAll {
				took[1], r.walkEntered = d, res.NetnsEntered
			} else {
				took[0], r.oneEntered = d, res.NetnsEntered
			}
		}
		if round == 0 {
			continue
		}
		r.oneTargeted = append(r.oneTargeted, took[0])
		r.oneWalkAll = append(r.oneWalkAll, took[1])
		r.oneRatios = append(r.oneRatios, float64(took[1])/float64(took[0]))
	}
	all(holders, "close bg")

	// Every netns holds sockets of the removed backend.
	for round := range *sockRoundsA {
		var took [2]time.Duration
		for _, useSS := range []bool{round%2 == 0, round%2 != 0} {
			svcs(backendX)
			all(holders, fmt.Sprintf("connect x %s %d", vipX, *sockPerNS))
			if useSS {
				if gone := svcs(); len(gone) != 1 {
					e.Fatalf("removed %v", gone)
				}
				start := time.Now()
				for _, ns := range nss {
					out, err := exec.Command("ip", "netns", "exec", ns.Name, "ss", "-K", "-t", "-n",
						"dst", backendX.Addr().String(), "dport", "=", fmt.Sprint(backendX.Port())).CombinedOutput()
					if err != nil {
						e.Fatalf("ss -K in %s: %v: %s", ns.Name, err, out)
					}
				}
				took[1] = time.Since(start)
			} else {
				took[0], _ = terminate(false, len(nss)**sockPerNS)
			}
			all(holders, "check x")
			all(holders, "close x")
		}
		r.allPodsock = append(r.allPodsock, took[0])
		r.allSS = append(r.allSS, took[1])
		r.allRatios = append(r.allRatios, float64(took[1])/float64(took[0]))
	}
	return r
}

// connectOne connects one TCP socket from inside ns to addr.
func connectOne(e *env, ns *testenv.Netns, addr netip.AddrPort) int {
	fd := makeSockets(ns, false, 1)[0]
	if err := testenv.Connect(fd, testenv.Sockaddr(unix.AF_INET, addr)); err != nil {
		unix.Close(fd)
		e.Fatalf("connect %s in %s: %v", addr, ns.Name, err)
	}
	return fd
}

type agentSocketsResult struct {
	e2e                            []time.Duration
	list                           []time.Duration
	listed                         int
	rssBefore, hwmBefore, hwmAfter int64
}

// agentSocketsBench runs the real agent as the NRI plugin of a private containerd with
// many pods, each holding client sockets, and measures what users see: how long from a
// config change until a client of the removed backend gets ECONNABORTED, and what listing
// every socket costs the agent.
func (e *env) agentSocketsBench() agentSocketsResult {
	rt := cri.Start(e, cri.Options{})
	root := e.runtimeCgroupRoot(rt)
	dir := e.tempDir("podsock-bench-sockets-")
	cfgPath := filepath.Join(dir, "podsock.toml")
	stateDir := filepath.Join(dir, "state")
	bpffs := testenv.BPFFS(e)
	write := func(webBackend netip.AddrPort) {
		cfg := fmt.Sprintf(`[agent]
cgroup_root = %q
bpffs = %q
state_dir = %q
log_level = "info"
[nri]
socket = %q
[[service]]
name = "bench/web"
vip = %q
port = %d
backends = [%q]
[[service]]
name = "bench/api"
vip = %q
port = %d
backends = [%q]
`, root, bpffs, stateDir, rt.NRISocket(), vipX.Addr(), vipX.Port(), webBackend, vipY.Addr(), vipY.Port(), backendY)
		if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
			e.Fatal(err)
		}
	}
	write(backendX)
	logPath := filepath.Join(dir, "agent.log")
	agentLog, err := os.Create(logPath)
	if err != nil {
		e.Fatal(err)
	}
	e.Cleanup(func() { agentLog.Close() })
	cmd := e.runAgent(cfgPath, agentLog)
	failf := func(format string, a ...any) {
		b, _ := os.ReadFile(logPath)
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		e.Fatalf(format+"\nagent log (tail):\n%s", append(a, strings.Join(lines[max(0, len(lines)-30):], "\n"))...)
	}
	var gen uint64
	waitGeneration := func(want uint64) {
		if !testenv.WaitFor(15*time.Second, func() bool {
			st, err := podsockStatus(cfgPath)
			gen = st.ConfigGeneration
			return err == nil && st.NRI.Connected && st.ConfigGeneration == want
		}) {
			failf("agent did not reach config generation %d (at %d)", want, gen)
		}
	}
	waitGeneration(1)

	// The bench's sockets live in the pods' netns and its process in a cgroup below the
	// runtime's pod parent, where podsock's programs run.
	home, err := testenv.HomeCgroup()
	if err != nil {
		e.Fatal(err)
	}
	clients := &testenv.Cgroup{Path: root}
	clients = clients.NewChild(e, "podsock-bench-clients")
	var nss []*testenv.Netns
	for i := range *sockNetns {
		p := rt.RunPod(e, cri.PodSpec{Name: fmt.Sprintf("sockets-%d", i)})
		for _, a := range []string{"10.88.0.5/32", "10.88.0.6/32"} {
			if out, err := exec.Command("nsenter", "--net="+p.NetnsPath, "ip", "addr", "add", a, "dev", "lo").CombinedOutput(); err != nil {
				e.Fatalf("add %s in pod %s: %v: %s", a, p.Name, err, out)
			}
		}
		nss = append(nss, &testenv.Netns{Name: p.Name, Path: p.NetnsPath})
	}
	enter(clients)
	var holders []*holder
	for _, ns := range nss {
		holders = append(holders, startHolder(e, ns.Path))
	}
	defer enter(home)
	all(holders, fmt.Sprintf("connect bg %s %d", vipY, *sockPerNS))

	var r agentSocketsResult
	// Config change -> ECONNABORTED, with every other socket in place.
	for round := range *e2eRounds {
		write(backendX)
		cmd.Process.Signal(syscall.SIGHUP)
		waitGeneration(uint64(2 + 2*round))
		fd := connectOne(e, nss[round%len(nss)], vipX)
		readErr := make(chan error, 1)
		go func() {
			var buf [16]byte
			_, err := unix.Read(fd, buf[:])
			readErr <- err
		}()
		write(backendY)
		start := time.Now()
		cmd.Process.Signal(syscall.SIGHUP)
		select {
		case err := <-readErr:
			took := time.Since(start)
			if !errors.Is(err, unix.ECONNABORTED) {
				failf("client read gave %v, want ECONNABORTED", err)
			}
			r.e2e = append(r.e2e, took)
		case <-time.After(5 * time.Second):
			failf("round %d: client of the removed backend not aborted 5 s after the config change", round)
		}
		unix.Close(fd)
		waitGeneration(uint64(3 + 2*round))
	}

	r.rssBefore, r.hwmBefore = procMem(cmd.Process.Pid)
	cl := api.NewClient(stateDir)
	for range 3 {
		n := 0
		start := time.Now()
		if err := cl.Sockets(api.SocketQuery{}, func(api.SocketView) error { n++; return nil }); err != nil {
			e.Fatal(err)
		}
		r.list = append(r.list, time.Since(start))
		if n < *sockNetns**sockPerNS {
			e.Fatalf("listing returned %d sockets, want at least %d", n, *sockNetns**sockPerNS)
		}
		r.listed = n
	}
	_, r.hwmAfter = procMem(cmd.Process.Pid)
	st, err := podsockStatus(cfgPath)
	if err != nil {
		e.Fatal(err)
	}
	if !strings.Contains(fmt.Sprint(st.Termination.Protocols), "tcp") || st.Termination.Destroyed != uint64(*e2eRounds) {
		e.Fatalf("agent termination status %+v, want %d sockets destroyed", st.Termination, *e2eRounds)
	}
	return r
}

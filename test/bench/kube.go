package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/podsock/podsock/agent"
	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/config"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/test/kubeenv"
	"github.com/podsock/podsock/test/testenv"
)

var (
	kubeSizes   = flag.String("kube-services", "1000,10000", "Service counts of the kube-proxy comparison, comma-separated, each Service with 10 endpoints")
	kubeSamples = flag.Int("kube-latency", 20, "EndpointSlice updates per agent and size in the programming latency comparison")
	kubeGap     = flag.Duration("kube-latency-gap", 1200*time.Millisecond,
		"pause between latency samples once both agents have programmed the last update: more than kube-proxy's --min-sync-period (1s), so that no sample waits out the sync before")
	kubeAgents  = flag.String("kube-agents", "podsock,kube-proxy", "agents of the kube-proxy comparison, comma-separated")
	kubeTimeout = flag.Duration("kube-sync-timeout", 10*time.Minute, "how long an agent's first sync may take")
	kubeBefore  = flag.String("kube-podsock-before", "",
		"a second podsock binary (a build of an earlier commit) whose cold start and RSS are measured too at each size, just before the others: a before/after in one run")
	kubeProfile = flag.String("kube-profile", "", "directory for each podsock agent's profiles: CPU from exec until synced and idle, heap then ("+
		agent.CPUProfileEnv+", "+agent.HeapProfileEnv+", SIGUSR1)")
)

const (
	agentPodsock   = "podsock"
	agentKubeProxy = "kube-proxy"

	kubeNamespace = "kube-bench"
	kubeNodeName  = "bench-node"
	kubeEndpoints = 10
	// Parallel creates: the API server took 142 s for 10k Services and their slices so.
	kubeWorkers = 16
	kubePort    = 80
	kubeTarget  = 8080
)

// The address plan. Bulk endpoints are in kubePodRange, which nobody serves and every netns
// blackholes: they are there to be programmed, never connected to. Real backends live on
// the loopback of the backend netns, which each client netns reaches over its own veth.
var (
	kubePodRange   = netip.MustParsePrefix("10.112.0.0/12")
	kubeBackendNet = netip.MustParsePrefix("10.89.0.0/24")
	// The connect target's endpoints, and a pool per agent for the latency samples.
	kubeTargetFirst = netip.MustParseAddr("10.89.0.1")
	kubeLatFirst    = map[string]netip.Addr{
		agentPodsock:   netip.MustParseAddr("10.89.0.21"),
		agentKubeProxy: netip.MustParseAddr("10.89.0.31"),
	}
	kubeLatPool = 4
)

// A veth pair from a client netns to the backend netns, both ends created in netns of
// ours, never in the host's.
type vethPair struct{ client, backend, clientAddr, backendAddr string }

var (
	vethPodsock   = vethPair{"ksp0", "ksp1", "10.89.1.1/30", "10.89.1.2/30"}
	vethKubeProxy = vethPair{"ksk0", "ksk1", "10.89.1.5/30", "10.89.1.6/30"}
)

// kubeWorld is one API server and what both agents are measured in: a client netns each,
// a backend netns both reach, podsock's cgroups, and the Services.
type kubeWorld struct {
	e     *env
	srv   *kubeenv.Server
	admin *kubernetes.Clientset
	// podsock's clients sit in client, below the agent's cgroup_root; kube-proxy's clients
	// stay in home, where no podsock program runs.
	home, cgRoot, client *testenv.Cgroup
	// nsP: podsock's clients, ClusterIPs blackholed. nsK: kube-proxy's netns and clients,
	// ClusterIPs routed into nsB. nsB: the backends, ClusterIPs blackholed.
	nsP, nsK, nsB *testenv.Netns
	kubeconfig    string // the shipped service account's
	dir           string

	created int // bulk Services so far
	target  netip.AddrPort
	direct  []netip.AddrPort // target's endpoints
	lat     map[string]*latService
}

// latService is the Service an agent's latency samples update: its one endpoint is
// replaced by the next backend of its pool each time.
type latService struct {
	vip     netip.AddrPort
	pool    []*testenv.Backend
	current *testenv.Backend           // the endpoint it has now
	slice   *discoveryv1.EndpointSlice // as last written, with its resourceVersion
	n       int
}

// kubeSide is one agent as the measurements see it: where its clients run.
type kubeSide struct {
	name string
	ns   *testenv.Netns
	cg   *testenv.Cgroup
	pid  int
	stop func()
	// startup says where the cold start went, in the agent's own terms.
	startup string
	// label and profileDir: a podsock agent's, for its profiles.
	label, profileDir string
}

// kubeResult is what one size measured.
type kubeResult struct {
	services  int
	coldStart map[string]time.Duration
	rss, hwm  map[string]int64
	latency   map[string][]time.Duration
	connect   samples
	// programs is what podsock's programs ran during the connect rounds (VIP and direct).
	programs map[string]datapath.ProgramCost
	// before is the -kube-podsock-before binary's cold start and RSS, when measured.
	before *kubeBeforeResult
}

type kubeBeforeResult struct {
	coldStart time.Duration
	rss, hwm  int64
}

func (e *env) printKube() {
	sizes := parseSizes(e, *kubeSizes)
	agents := parseAgents(e, *kubeAgents)
	fmt.Printf("\npodsock beside kube-proxy %s (nftables mode): %v Services x %d endpoints, one API server; agents %v...\n",
		kubeProxyVersion, sizes, kubeEndpoints, agents)
	w := e.newKubeWorld(sizes[len(sizes)-1])
	var results []kubeResult
	for i, n := range sizes {
		w.createServices(n)
		results = append(results, w.measure(n, i, agents))
	}
	printKubeTable(results, agents)
}

// kubeProxyVersion is the release bin/kube-proxy is built from (scripts/install-kube.sh).
const kubeProxyVersion = "v1.37.2"

func parseSizes(e *env, s string) []int {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || (len(out) > 0 && n <= out[len(out)-1]) {
			e.Fatalf("-kube-services %q: want increasing positive counts, e.g. 1000,10000", s)
		}
		out = append(out, n)
	}
	return out
}

func parseAgents(e *env, s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		a := strings.TrimSpace(f)
		if a != agentPodsock && a != agentKubeProxy || slices.Contains(out, a) {
			e.Fatalf("-kube-agents %q: want podsock and/or kube-proxy", s)
		}
		out = append(out, a)
	}
	return out
}

func (e *env) newKubeWorld(most int) *kubeWorld {
	w := &kubeWorld{e: e, lat: map[string]*latService{}, dir: e.tempDir("podsock-bench-kube-")}
	start := time.Now()
	var opts kubeenv.Options
	if most > 60000 {
		// kubeenv's /16 holds 65k ClusterIPs; /12 is the most the API server takes.
		opts.ServiceCIDR = netip.MustParsePrefix("10.96.0.0/12")
	}
	if most*kubeEndpoints >= 1<<(32-kubePodRange.Bits()) {
		e.Fatalf("-kube-services %d: more endpoints than %v holds", most, kubePodRange)
	}
	w.srv = kubeenv.Start(e, opts)
	cfg := w.srv.AdminConfig()
	cfg.QPS, cfg.Burst = 1000, 2000 // the workers, not client-go, set the pace
	var err error
	if w.admin, err = kubernetes.NewForConfig(cfg); err != nil {
		e.Fatalf("kube bench: client: %v", err)
	}
	fmt.Printf("API server ready in %v\n", time.Since(start).Round(time.Millisecond))
	rbac := w.srv.ApplyAgentRBAC(e)
	w.kubeconfig = w.srv.UserKubeconfig(e, rbac.ServiceAccountUser(), rbac.ServiceAccountGroups()...)

	w.home, err = testenv.HomeCgroup()
	if err != nil {
		e.Fatal(err)
	}
	w.cgRoot = testenv.NewCgroup(e)
	w.client = w.cgRoot.NewChild(e, "client")
	e.Cleanup(func() { enter(w.home) })

	w.network()
	w.createNode()
	w.createFixedServices()
	return w
}

// network builds the three netns. None has a default route or any link but lo and the
// veths between them, so no packet can leave them for the host or the machine's network.
// ClusterIPs are blackholed in nsP and nsB; nsK routes them into nsB instead, because
// kube-proxy's DNAT happens after the route lookup, which a blackhole would fail (as the
// iptables baseline of the socket-LB section routes them to lo): what DNAT misses there is
// dropped in nsB, which blackholes the range and does not forward.
func (w *kubeWorld) network() {
	e := w.e
	vips := w.srv.ServiceCIDR.String()
	pods := kubePodRange.String()
	var backends []string
	for i := range kubeEndpoints {
		backends = append(backends, addrAt(kubeTargetFirst, i).String()+"/32")
	}
	for _, first := range kubeLatFirst {
		for i := range kubeLatPool {
			backends = append(backends, addrAt(first, i).String()+"/32")
		}
	}
	w.nsB = testenv.NewNetns(e, []string{vips, pods}, backends...)
	w.nsP = testenv.NewNetns(e, []string{vips, pods})
	w.nsK = testenv.NewNetns(e, []string{pods})
	testenv.Run(e, "ip", "netns", "exec", w.nsB.Name, "sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0")

	w.veth(w.nsP, vethPodsock)
	w.veth(w.nsK, vethKubeProxy)
	gw := func(p vethPair) string { return strings.Split(p.backendAddr, "/")[0] }
	testenv.Run(e, "ip", "-n", w.nsP.Name, "route", "add", kubeBackendNet.String(), "via", gw(vethPodsock))
	testenv.Run(e, "ip", "-n", w.nsK.Name, "route", "add", kubeBackendNet.String(), "via", gw(vethKubeProxy))
	testenv.Run(e, "ip", "-n", w.nsK.Name, "route", "add", vips, "via", gw(vethKubeProxy))

	w.checkIsolated(w.nsP, "lo", vethPodsock.client)
	w.checkIsolated(w.nsK, "lo", vethKubeProxy.client)
	w.checkIsolated(w.nsB, "lo", vethPodsock.backend, vethKubeProxy.backend)
	if fwd := w.sysctl(w.nsB, "net/ipv4/ip_forward"); fwd != "0" {
		e.Fatalf("kube bench: backend netns forwards IPv4 (%s)", fwd)
	}
	first := w.srv.ServiceCIDR.Addr().Next().String()
	out, err := exec.Command("ip", "-n", w.nsK.Name, "route", "get", first).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "via "+gw(vethKubeProxy)+" dev "+vethKubeProxy.client) {
		e.Fatalf("kube bench: kube-proxy's netns routes %s elsewhere than into the backend netns (%v): %s", first, err, out)
	}
}

func (w *kubeWorld) veth(client *testenv.Netns, p vethPair) {
	e := w.e
	testenv.Run(e, "ip", "-n", client.Name, "link", "add", p.client, "type", "veth", "peer", "name", p.backend, "netns", w.nsB.Name)
	e.Cleanup(func() {
		if out, err := exec.Command("ip", "-n", client.Name, "link", "del", p.client).CombinedOutput(); err != nil {
			e.Errorf("delete veth %s in %s: %v: %s", p.client, client.Name, err, out)
		}
	})
	testenv.Run(e, "ip", "-n", client.Name, "addr", "add", p.clientAddr, "dev", p.client)
	testenv.Run(e, "ip", "-n", w.nsB.Name, "addr", "add", p.backendAddr, "dev", p.backend)
	testenv.Run(e, "ip", "-n", client.Name, "link", "set", p.client, "up")
	testenv.Run(e, "ip", "-n", w.nsB.Name, "link", "set", p.backend, "up")
}

// checkIsolated fails unless ns has exactly the links named and no default route.
func (w *kubeWorld) checkIsolated(ns *testenv.Netns, links ...string) {
	out, err := exec.Command("ip", "-n", ns.Name, "-o", "link", "show").Output()
	if err != nil {
		w.e.Fatalf("kube bench: links of %s: %v", ns.Name, err)
	}
	var got []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			got = append(got, strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0])
		}
	}
	slices.Sort(got)
	want := slices.Sorted(slices.Values(links))
	if !slices.Equal(got, want) {
		w.e.Fatalf("kube bench: netns %s has links %v, want only %v", ns.Name, got, want)
	}
	for _, fam := range []string{"-4", "-6"} {
		def, err := exec.Command("ip", fam, "-n", ns.Name, "route", "show", "default").Output()
		if err != nil || strings.TrimSpace(string(def)) != "" {
			w.e.Fatalf("kube bench: netns %s has a default route (%v): %s", ns.Name, err, def)
		}
	}
}

func (w *kubeWorld) sysctl(ns *testenv.Netns, key string) string {
	out, err := exec.Command("ip", "netns", "exec", ns.Name, "cat", "/proc/sys/"+key).Output()
	if err != nil {
		w.e.Fatalf("kube bench: %s in %s: %v", key, ns.Name, err)
	}
	return strings.TrimSpace(string(out))
}

// createNode creates this node's Node, with the address the kubelet would report (kube-
// proxy waits 30 s for one otherwise): kube-proxy's end of its veth.
func (w *kubeWorld) createNode() {
	ctx := context.Background()
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name: kubeNodeName, Labels: map[string]string{corev1.LabelTopologyZone: "zone-a"},
	}}
	node, err := w.admin.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if err == nil {
		addr := strings.Split(vethKubeProxy.clientAddr, "/")[0]
		node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: addr}}
		_, err = w.admin.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
	}
	if err == nil {
		err = ensureKubeNamespace(ctx, w.admin)
	}
	if err != nil {
		w.e.Fatalf("kube bench: node %s: %v", kubeNodeName, err)
	}
}

func ensureKubeNamespace(ctx context.Context, c kubernetes.Interface) error {
	_, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: kubeNamespace}}, metav1.CreateOptions{})
	return err
}

// createFixedServices creates the connect target (10 real endpoints) and one latency
// Service per agent, with their backends, and checks that no ClusterIP answers yet: a
// measurement that works without the agent proves nothing.
func (w *kubeWorld) createFixedServices() {
	e := w.e
	var eps []netip.Addr
	for i := range kubeEndpoints {
		a := addrAt(kubeTargetFirst, i)
		eps = append(eps, a)
		w.direct = append(w.direct, netip.AddrPortFrom(a, kubeTarget))
		startAcceptor(e, w.nsB, w.direct[i])
	}
	w.target, _ = w.createService("target", eps)
	for name, first := range kubeLatFirst {
		l := &latService{}
		for i := range kubeLatPool {
			a := netip.AddrPortFrom(addrAt(first, i), kubeTarget)
			l.pool = append(l.pool, testenv.StartTCPBackend(e, w.nsB, a.Addr().String(), a))
		}
		l.current = l.pool[0]
		l.vip, l.slice = w.createService("latency-"+name, []netip.Addr{l.current.Addr.Addr()})
		w.lat[name] = l
	}

	enter(w.client)
	_, err := dialID(w.nsP, w.target, time.Second)
	enter(w.home)
	if !testenv.IsUnreachable(err) {
		e.Fatalf("kube bench: ClusterIP %s from podsock's client netns before podsock runs: %v, want the blackhole's error", w.target, err)
	}
	if id, err := dialID(w.nsK, w.target, 300*time.Millisecond); err == nil {
		e.Fatalf("kube bench: ClusterIP %s answered (%s) in kube-proxy's netns before kube-proxy runs", w.target, id)
	}
}

// createServices brings the bulk Services up to n, kubeWorkers at a time, as a
// controller would: each a ClusterIP Service with one TCP port and an EndpointSlice of
// kubeEndpoints addresses in kubePodRange.
func (w *kubeWorld) createServices(n int) {
	if n <= w.created {
		return
	}
	fmt.Printf("creating Services %d..%d with their EndpointSlices (%d in parallel)...\n", w.created, n-1, kubeWorkers)
	start := time.Now()
	next := atomic.Int64{}
	next.Store(int64(w.created))
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	for range kubeWorkers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				eps := make([]netip.Addr, kubeEndpoints)
				for j := range eps {
					eps[j] = addrAt(kubePodRange.Addr(), 1+i*kubeEndpoints+j)
				}
				if _, _, err := w.tryCreateService(fmt.Sprintf("svc-%06d", i), eps); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	if len(errs) > 0 {
		w.e.Fatalf("kube bench: %v", errors.Join(errs...))
	}
	fmt.Printf("created %d Services and EndpointSlices in %v\n", n-w.created, time.Since(start).Round(time.Second))
	w.created = n
}

func (w *kubeWorld) createService(name string, eps []netip.Addr) (netip.AddrPort, *discoveryv1.EndpointSlice) {
	vip, slice, err := w.tryCreateService(name, eps)
	if err != nil {
		w.e.Fatalf("kube bench: %v", err)
	}
	return vip, slice
}

func (w *kubeWorld) tryCreateService(name string, eps []netip.Addr) (netip.AddrPort, *discoveryv1.EndpointSlice, error) {
	ctx := context.Background()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: kubeNamespace},
		Spec: corev1.ServiceSpec{
			Ports: []corev1.ServicePort{{Name: "http", Port: kubePort, TargetPort: intstr.FromInt32(kubeTarget), Protocol: corev1.ProtocolTCP}},
		},
	}
	svc, err := w.admin.CoreV1().Services(kubeNamespace).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		return netip.AddrPort{}, nil, fmt.Errorf("create service %s: %w", name, err)
	}
	ip, err := netip.ParseAddr(svc.Spec.ClusterIP)
	if err != nil || !w.srv.ServiceCIDR.Contains(ip) {
		return netip.AddrPort{}, nil, fmt.Errorf("service %s: ClusterIP %q outside %v", name, svc.Spec.ClusterIP, w.srv.ServiceCIDR)
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name: name, Namespace: kubeNamespace,
			Labels: map[string]string{discoveryv1.LabelServiceName: name, discoveryv1.LabelManagedBy: "podsock-bench"},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](kubeTarget), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	setEndpoints(slice, eps)
	slice, err = w.admin.DiscoveryV1().EndpointSlices(kubeNamespace).Create(ctx, slice, metav1.CreateOptions{})
	if err != nil {
		return netip.AddrPort{}, nil, fmt.Errorf("create endpointslice %s: %w", name, err)
	}
	return netip.AddrPortFrom(ip, kubePort), slice, nil
}

// setEndpoints makes eps the slice's ready endpoints, stamped with the trigger time both
// agents measure their own programming latency from.
func setEndpoints(s *discoveryv1.EndpointSlice, eps []netip.Addr) {
	s.Endpoints = s.Endpoints[:0]
	for _, a := range eps {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{
			Addresses: []string{a.String()}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
		})
	}
	if s.Annotations == nil {
		s.Annotations = map[string]string{}
	}
	s.Annotations[corev1.EndpointsLastChangeTriggerTime] = time.Now().UTC().Format(time.RFC3339Nano)
}

// wantProgrammed is how many Services have endpoints: the bulk ones, the target and the
// latency ones (default/kubernetes has none).
func (w *kubeWorld) wantProgrammed() int { return w.created + 1 + len(w.lat) }

// measure cold-starts each agent against w.created Services (in turns: which goes first
// alternates by size), then, with both running, takes their RSS, the interleaved latency
// samples and the interleaved connect rounds, and stops them.
func (w *kubeWorld) measure(n, index int, agents []string) kubeResult {
	res := kubeResult{services: n, coldStart: map[string]time.Duration{}, rss: map[string]int64{}, hwm: map[string]int64{},
		latency: map[string][]time.Duration{}}
	order := slices.Clone(agents)
	if index%2 == 1 {
		slices.Reverse(order)
	}
	if *kubeBefore != "" {
		s, took := w.startPodsock(*kubeBefore, "podsock-before")
		fmt.Printf("  podsock-before (%s): cold start with %d Services x %d endpoints programmed in %v (%s)\n", *kubeBefore, n, kubeEndpoints, took.Round(time.Millisecond), s.startup)
		time.Sleep(3 * time.Second)
		b := &kubeBeforeResult{coldStart: took}
		b.rss, b.hwm = procMem(s.pid)
		w.profile(s, n)
		s.stop()
		res.before = b
	}
	var sides []*kubeSide
	for _, a := range order {
		var s *kubeSide
		var took time.Duration
		switch a {
		case agentPodsock:
			s, took = w.startPodsock(*podsockBin, agentPodsock)
		case agentKubeProxy:
			s, took = w.startKubeProxy()
		}
		res.coldStart[a] = took
		fmt.Printf("  %s: cold start with %d Services x %d endpoints programmed in %v (%s)\n", a, n, kubeEndpoints, took.Round(time.Millisecond), s.startup)
		sides = append(sides, s)
	}
	defer func() {
		for _, s := range sides {
			s.stop()
		}
	}()

	// Both synced and idle: what each holds for this many Services.
	time.Sleep(3 * time.Second)
	for _, s := range sides {
		res.rss[s.name], res.hwm[s.name] = procMem(s.pid)
		if s.name == agentPodsock {
			w.profile(s, n)
		}
	}

	fmt.Printf("  programming latency: %d EndpointSlice updates per agent, interleaved...\n", *kubeSamples)
	for range *kubeSamples {
		for _, i := range rand.Perm(len(sides)) {
			w.settle(sides)
			s := sides[i]
			res.latency[s.name] = append(res.latency[s.name], w.programmingLatency(s))
		}
	}

	var cases []benchCase
	for _, s := range sides {
		cases = append(cases,
			benchCase{name: s.name + "-vip", cg: s.cg, ns: s.ns, addr: w.target},
			benchCase{name: s.name + "-direct", cg: s.cg, ns: s.ns, spread: w.direct})
	}
	fmt.Printf("  connect: %d rounds of %d per case, ClusterIP and direct for each agent, interleaved...\n", *rounds, *perRound)
	res.connect = interleave(*rounds, *perRound, cases)
	// Run-time statistics cost every program run two clock reads, which only podsock's
	// side would pay: on only for rounds of their own, whose timings are not used.
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		w.e.Fatalf("kube bench: enable BPF run-time stats: %v", err)
	}
	before := w.podsockCosts()
	var podsockCases []benchCase
	for _, c := range cases {
		if strings.HasPrefix(c.name, agentPodsock+"-") {
			podsockCases = append(podsockCases, c)
		}
	}
	interleave(statRounds, *perRound, podsockCases)
	enter(w.home)
	res.programs = costsSince(before, w.podsockCosts())
	stats.Close()
	return res
}

// podsockAttach are the cgroup hooks a TCP connect of podsock's clients runs.
var podsockAttach = []ebpf.AttachType{
	ebpf.AttachCGroupInetSockCreate, ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupSockOps, ebpf.AttachCgroupInetSockRelease,
}

// podsockCosts reads the run-time statistics of the programs attached to podsock's
// cgroup root (the agent's; nothing else attaches there), by program name.
func (w *kubeWorld) podsockCosts() map[string]datapath.ProgramCost {
	out := map[string]datapath.ProgramCost{}
	cg, err := os.Open(w.cgRoot.Path)
	if err != nil {
		w.e.Fatalf("kube bench: %v", err)
	}
	defer cg.Close()
	for _, at := range podsockAttach {
		q, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: at})
		if err != nil {
			w.e.Fatalf("kube bench: programs attached to %s (%v): %v", w.cgRoot.Path, at, err)
		}
		for _, ap := range q.Programs {
			p, err := ebpf.NewProgramFromID(ap.ID)
			if err != nil {
				w.e.Fatalf("kube bench: program %d: %v", ap.ID, err)
			}
			info, err := p.Info()
			var st *ebpf.ProgramStats
			if err == nil {
				st, err = p.Stats()
			}
			p.Close()
			if err != nil {
				w.e.Fatalf("kube bench: program %d: %v", ap.ID, err)
			}
			c := out[info.Name]
			c.Runs += st.RunCount
			c.Runtime += st.Runtime
			out[info.Name] = c
		}
	}
	return out
}

func costsSince(before, after map[string]datapath.ProgramCost) map[string]datapath.ProgramCost {
	out := map[string]datapath.ProgramCost{}
	for name, a := range after {
		b := before[name]
		if a.Runs > b.Runs {
			out[name] = datapath.ProgramCost{Runs: a.Runs - b.Runs, Runtime: a.Runtime - b.Runtime}
		}
	}
	return out
}

// programmingLatency replaces the endpoint of the agent's latency Service by the next
// backend of its pool, and times from the update until a connect from the agent's client
// netns through the ClusterIP reaches that backend.
func (w *kubeWorld) programmingLatency(s *kubeSide) time.Duration {
	l := w.lat[s.name]
	l.n++
	b := l.pool[l.n%len(l.pool)]
	enter(s.cg)
	defer enter(w.home)
	setEndpoints(l.slice, []netip.Addr{b.Addr.Addr()})
	start := time.Now()
	updated, err := w.admin.DiscoveryV1().EndpointSlices(kubeNamespace).Update(context.Background(), l.slice, metav1.UpdateOptions{})
	if err != nil {
		w.e.Fatalf("kube bench: update endpointslice %s: %v", l.slice.Name, err)
	}
	l.slice, l.current = updated, b
	w.reach(s, l)
	return time.Since(start)
}

// reach polls connects from s's client netns through l's ClusterIP until one reaches l's
// current endpoint. The caller is in s's cgroup.
func (w *kubeWorld) reach(s *kubeSide, l *latService) {
	start := time.Now()
	var last error
	for time.Since(start) < *kubeTimeout {
		id, err := dialID(s.ns, l.vip, 2*time.Second)
		if err == nil && id == l.current.ID {
			return
		}
		last = err
		// Every attempt through kube-proxy leaves a conntrack entry for 10 s: polling
		// each millisecond keeps them to a few thousand.
		time.Sleep(time.Millisecond)
	}
	w.e.Fatalf("kube bench: %s never sent %s to %s (last: %v)", s.name, l.vip, l.current.Addr, last)
}

// settle waits until every agent has programmed every latency Service's last update
// (each agent programs the other's too), then kubeGap: a sample then times its own
// update, not the end of a sync another update started.
func (w *kubeWorld) settle(sides []*kubeSide) {
	for _, s := range sides {
		enter(s.cg)
		for _, name := range slices.Sorted(maps.Keys(w.lat)) {
			w.reach(s, w.lat[name])
		}
		enter(w.home)
	}
	time.Sleep(*kubeGap)
}

// dialID connects from ns to addr and reads the backend's ID; the socket is reset on
// close, so it leaves no TIME_WAIT and its conntrack entry goes in 10 s.
func dialID(ns *testenv.Netns, addr netip.AddrPort, timeout time.Duration) (string, error) {
	fd, err := testenv.Socket(ns, unix.AF_INET, unix.SOCK_STREAM)
	if err != nil {
		return "", err
	}
	defer closeAll([]int{fd})
	tv := unix.NsecToTimeval(timeout.Nanoseconds())
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	if err := testenv.Connect(fd, testenv.Sockaddr(unix.AF_INET, addr)); err != nil {
		return "", fmt.Errorf("connect %s: %w", addr, err)
	}
	var buf [64]byte
	var got []byte
	for !slices.Contains(got, '\n') {
		n, err := unix.Read(fd, buf[:])
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || n == 0 {
			return "", fmt.Errorf("read from %s: %d bytes, %w", addr, n, err)
		}
		got = append(got, buf[:n]...)
	}
	return strings.TrimSpace(string(got)), nil
}

// startKubeProxy starts the real kube-proxy in nsK and times it until its service-ips
// map holds every Service with endpoints.
func (w *kubeWorld) startKubeProxy() (*kubeSide, time.Duration) {
	want := w.wantProgrammed()
	start := time.Now()
	k := w.srv.StartKubeProxy(w.e, kubeenv.KubeProxyOptions{
		Netns: w.nsK, NodeName: kubeNodeName, ServiceRouteTo: w.nsB, ReadyTimeout: *kubeTimeout,
	})
	var n int
	var err error
	if !testenv.WaitFor(*kubeTimeout-time.Since(start), func() bool {
		n, err = k.MapElements(context.Background(), "ip", kubeenv.ServiceIPsMap)
		return err == nil && n >= want
	}) {
		w.e.Fatalf("kube bench: kube-proxy's %s has %d elements (%v), want %d", kubeenv.ServiceIPsMap, n, err, want)
	}
	took := time.Since(start)
	first, err := k.Metric(context.Background(), "kubeproxy_sync_proxy_rules_duration_seconds_sum", kubeenv.IPv4Series)
	if err != nil {
		w.e.Fatalf("kube bench: %v", err)
	}
	return &kubeSide{name: agentKubeProxy, ns: w.nsK, cg: w.home, pid: k.Pid(), stop: func() {
		if err := k.Stop(); err != nil {
			w.e.Errorf("kube bench: %v", err)
		}
	}, startup: fmt.Sprintf("its first IPv4 sync took %.3fs", first)}, took
}

// profile has a podsock agent end its CPU profile and write its heap profile, and moves
// them into -kube-profile as <label>-<services>-{cpu,heap}.pprof.
func (w *kubeWorld) profile(s *kubeSide, services int) {
	if *kubeProfile == "" {
		return
	}
	if err := syscall.Kill(s.pid, syscall.SIGUSR1); err != nil {
		w.e.Fatalf("kube bench: ask %s (pid %d) for its profiles: %v", s.label, s.pid, err)
	}
	for _, kind := range []string{"cpu", "heap"} {
		from := filepath.Join(s.profileDir, kind+".pprof")
		to := filepath.Join(*kubeProfile, fmt.Sprintf("%s-%d-%s.pprof", s.label, services, kind))
		if !testenv.WaitFor(30*time.Second, func() bool { return os.Rename(from, to) == nil }) {
			w.e.Fatalf("kube bench: %s wrote no %s profile to %s", s.label, kind, from)
		}
		fmt.Printf("  %s: %s profile in %s\n", s.label, kind, to)
	}
}

// startPodsock starts the agent (bin, label naming its dir) in Kubernetes mode with NRI
// off, as the shipped service account, and times it until its Kubernetes source has
// synced every Service with endpoints. Its stop also runs `podsock cleanup`, so that the
// next start is cold too.
func (w *kubeWorld) startPodsock(bin, label string) (*kubeSide, time.Duration) {
	e := w.e
	dir := filepath.Join(w.dir, label)
	stateDir := filepath.Join(dir, "state")
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		e.Fatal(err)
	}
	bpffs := testenv.BPFFS(e)
	want := w.wantProgrammed()
	cfgPath := filepath.Join(dir, "podsock.toml")
	l := limitsFor(want)
	// Slots for every endpoint with room to spare: the limit must not be what is measured.
	slots := max(l.Slots, 1<<bitsFor(4*want*kubeEndpoints))
	metricsAddr := freeLoopbackAddr(e)
	cfg := fmt.Sprintf("[agent]\ncgroup_root = %q\nbpffs = %q\nstate_dir = %q\nlog_level = \"warn\"\n"+
		"[nri]\nenabled = false\n[limits]\nservices = %d\nslots = %d\n[metrics]\nlisten = %q\n"+
		"[kubernetes]\nenabled = true\nkubeconfig = %q\nnode_name = %q\n",
		w.cgRoot.Path, bpffs, stateDir, l.Services, slots, metricsAddr, w.kubeconfig, kubeNodeName)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		e.Fatal(err)
	}
	logPath := filepath.Join(dir, "agent.log")
	log, err := os.Create(logPath)
	if err != nil {
		e.Fatal(err)
	}
	defer log.Close()

	start := time.Now()
	cmd := exec.Command(bin, "run", "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = log, log
	if *kubeProfile != "" {
		cmd.Env = append(os.Environ(), agent.CPUProfileEnv+"="+filepath.Join(dir, "cpu.pprof"), agent.HeapProfileEnv+"="+filepath.Join(dir, "heap.pprof"))
	}
	// Ends with the bench if it dies before its cleanup (the main thread starts it).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		e.Fatalf("kube bench: start %s: %v", *podsockBin, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cmd.Process.Signal(unix.SIGTERM)
			select {
			case <-exited:
			case <-time.After(30 * time.Second):
				e.Errorf("kube bench: podsock (pid %d) ignored SIGTERM for 30s; killed", cmd.Process.Pid)
				cmd.Process.Kill()
				<-exited
			}
			if out, err := exec.Command(bin, "cleanup", "--config", cfgPath).CombinedOutput(); err != nil {
				e.Errorf("kube bench: podsock cleanup: %v: %s", err, out)
			}
		})
	}
	e.Cleanup(stop)

	client := api.NewClient(stateDir)
	var src api.SourceStatus
	var answered time.Duration // the datapath is loaded by then
	deadline := start.Add(*kubeTimeout)
	// /readyz is what a probe asks, and costs the agent nothing: status counts every map's
	// entries, which at 100 Hz would take CPU from the start it measures.
	readyz := "http://" + metricsAddr + "/readyz"
	httpc := &http.Client{Timeout: time.Second}
	for {
		if answered == 0 {
			if _, err := client.Status(); err == nil {
				answered = time.Since(start)
			}
		}
		if kubeenv.HTTPOK(context.Background(), httpc, readyz) == nil {
			if st, err := client.Status(); err == nil {
				for _, s := range st.Sources {
					if s.Name == "kubernetes" {
						src = s
					}
				}
				if src.Synced && src.Services >= want {
					break
				}
			}
		}
		select {
		case <-exited:
			e.Fatalf("kube bench: podsock exited before it synced; %s:\n%s", logPath, logTail(logPath))
		default:
		}
		if time.Now().After(deadline) {
			e.Fatalf("kube bench: podsock's Kubernetes source %+v, want ready and synced with %d services; %s:\n%s", src, want, logPath, logTail(logPath))
		}
		time.Sleep(5 * time.Millisecond)
	}
	took := time.Since(start)
	return &kubeSide{name: agentPodsock, label: label, profileDir: dir, ns: w.nsP, cg: w.client, pid: cmd.Process.Pid, stop: stop,
		startup: fmt.Sprintf("its control socket answered after %v, its caches synced %.3fs after its source started, its last sync took %.3fs",
			answered.Round(time.Millisecond), src.CachesSyncedSeconds, src.LastSyncSeconds)}, took
}

func bitsFor(n int) int {
	b := 0
	for 1<<b < n {
		b++
	}
	return b
}

// logTail is the end of an agent's log, for a failure message.
func logTail(path string) string {
	const n = 30
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// addrAt is the i-th address after first.
func addrAt(first netip.Addr, i int) netip.Addr {
	a := first.As4()
	n := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	n += uint32(i)
	return netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)})
}

func percentile(v []time.Duration, p float64) time.Duration {
	if len(v) == 0 {
		return 0 // an agent not measured
	}
	s := slices.Clone(v)
	slices.Sort(s)
	i := int(float64(len(s))*p+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func printKubeTable(results []kubeResult, agents []string) {
	both := len(agents) == 2
	fmt.Println()
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "case\tpodsock\tkube-proxy\tratio\ttarget\t")
	cell := func(a string, v func(string) string) string {
		if !slices.Contains(agents, a) {
			return "-"
		}
		return v(a)
	}
	for _, r := range results {
		gated := r.services >= 10000
		target := func(t string) string {
			if !gated || !both {
				return "(info)"
			}
			return t
		}
		ms := func(d time.Duration) string { return d.Round(time.Millisecond).String() }
		row := func(name string, v func(string) string, ratio, tgt string) {
			if !both {
				ratio = "-"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t\n", name, cell(agentPodsock, v), cell(agentKubeProxy, v), ratio, tgt)
		}
		n := r.services
		// ratio says how many times better (or worse) podsock did: kube-proxy's figure a
		// over podsock's b. The target is met from better up (above it, for 1: "below").
		ratio := func(a, b float64, better float64, good, bad string) string {
			if a == 0 || b == 0 {
				return "-"
			}
			verdict := ""
			if gated && both && better > 0 {
				met := a/b >= better
				if better == 1 {
					met = a/b > 1
				}
				verdict = map[bool]string{true: " (met)", false: " (missed)"}[met]
			}
			if a < b {
				return fmt.Sprintf("%.1fx %s%s", b/a, bad, verdict)
			}
			return fmt.Sprintf("%.1fx %s%s", a/b, good, verdict)
		}
		row(fmt.Sprintf("cold start, %d Services x %d endpoints", n, kubeEndpoints),
			func(a string) string { return ms(r.coldStart[a]) },
			ratio(float64(r.coldStart[agentKubeProxy]), float64(r.coldStart[agentPodsock]), 20, "faster", "slower"),
			target(">= 20x faster"))
		row(fmt.Sprintf("agent RSS after sync, %d Services (peak)", n),
			func(a string) string { return fmt.Sprintf("%d MiB (%d)", r.rss[a]>>20, r.hwm[a]>>20) },
			ratio(float64(r.rss[agentKubeProxy]), float64(r.rss[agentPodsock]), 2, "less", "more"),
			target("<= 1/2 (>= 2x less)"))
		for _, p := range []struct {
			name string
			q    float64
		}{{"p50", 0.5}, {"p99", 0.99}} {
			q := func(a string) time.Duration { return percentile(r.latency[a], p.q) }
			tgt, better := "(info)", 0.0
			if p.name == "p99" {
				tgt, better = target("below kube-proxy's"), 1
			}
			row(fmt.Sprintf("programming latency %s, %d Services (%d updates each)", p.name, n, *kubeSamples),
				func(a string) string { return ms(q(a)) },
				ratio(float64(q(agentKubeProxy)), float64(q(agentPodsock)), better, "faster", "slower"), tgt)
		}
		c := r.connect
		med := func(name string) string { return median(c[name]).Round(10 * time.Nanosecond).String() }
		for _, a := range agents {
			vip, direct := med(a+"-vip"), med(a+"-direct")
			other := map[string]string{agentPodsock: "-", agentKubeProxy: "-"}
			other[a] = vip + " vs " + direct
			fmt.Fprintf(tw, "connect via ClusterIP vs direct, %s, %d Services\t%s\t%s\t%.3fx\t(info)\t\n", a, n,
				other[agentPodsock], other[agentKubeProxy], c.ratio(a+"-vip", a+"-direct"))
		}
		if both {
			r := 1 / c.ratio(agentPodsock+"-vip", agentKubeProxy+"-vip")
			verdict := ""
			if gated {
				verdict = map[bool]string{true: " (met)", false: " (missed)"}[r >= 1.3]
			}
			fmt.Fprintf(tw, "connect via ClusterIP, %d Services: podsock vs kube-proxy\t%s\t%s\t%.2fx faster%s\t%s\t\n", n,
				med(agentPodsock+"-vip"), med(agentKubeProxy+"-vip"), r, verdict, target(">= 1.3x faster"))
		}
	}
	tw.Flush()
	for _, r := range results {
		if b := r.before; b != nil {
			fmt.Printf("podsock before/after at %d Services (-kube-podsock-before %s, then %s): cold start %v -> %v, RSS %d MiB (%d) -> %d MiB (%d)\n",
				r.services, *kubeBefore, *podsockBin, b.coldStart.Round(time.Millisecond), r.coldStart[agentPodsock].Round(time.Millisecond),
				b.rss>>20, b.hwm>>20, r.rss[agentPodsock]>>20, r.hwm[agentPodsock]>>20)
		}
	}
	for _, r := range results {
		if len(r.programs) == 0 {
			continue
		}
		var parts []string
		for _, name := range slices.Sorted(maps.Keys(r.programs)) {
			c := r.programs[name]
			parts = append(parts, fmt.Sprintf("%s %v x %d", name, c.PerRun(), c.Runs))
		}
		fmt.Printf("podsock's programs at %d Services (bpf_stats, in %d rounds of their own, ClusterIP and direct; per run x runs): %s\n",
			r.services, statRounds, strings.Join(parts, ", "))
	}
	fmt.Printf("(cold start: from exec until every Service with endpoints is programmed: podsock's status shows its Kubernetes source synced with them, kube-proxy's %s map holds them; latency: from the EndpointSlice update until a connect from the agent's client netns through the ClusterIP reaches the new endpoint, kube-proxy --min-sync-period 1s (its default), podsock min_sync_period %v (its default); connect: median per-operation cost, ratio: median of per-round ratios)\n",
		kubeenv.ServiceIPsMap, config.DefaultMinSyncPeriod)
}

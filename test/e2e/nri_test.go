package e2e

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/agent"
	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/internal/cgroupfs"
	"github.com/podsock/podsock/test/cri"
	"github.com/podsock/podsock/test/testenv"
)

// nriWorld is a private runtime (containerd or CRI-O) with NRI and a podsock agent
// configuration pointed at it: the LB programs attach to the runtime's own pod cgroup
// parent, never higher.
type nriWorld struct {
	t        *testing.T
	rt       *cri.Runtime
	cgroup2  string
	bpffs    string
	stateDir string
	cfgPath  string
}

// eachRuntime runs a scenario once under every runtime the harness has (cri.Kinds), as
// subtests named after the runtime: TestX/containerd, TestX/crio.
func eachRuntime(t *testing.T, scenario func(t *testing.T, kind cri.Kind)) {
	for _, k := range cri.Kinds {
		t.Run(string(k), func(t *testing.T) { scenario(t, k) })
	}
}

func newNRIWorld(t *testing.T, opts cri.Options) *nriWorld {
	testenv.RequirePrivileged(t)
	cri.Require(t, opts.Runtime)
	w := &nriWorld{t: t}
	var err error
	if w.cgroup2, err = cgroupfs.Mount(); err != nil {
		t.Fatal(err)
	}
	w.rt = cri.Start(t, opts)
	w.bpffs = testenv.BPFFS(t)
	dir := t.TempDir()
	w.stateDir = filepath.Join(dir, "state")
	w.cfgPath = filepath.Join(dir, "podsock.toml")
	// The pod cgroup parent must exist before the agent attaches to it; runc would create
	// it with the first pod, and the harness removes it at the end either way.
	if err := os.MkdirAll(w.cgroupRoot(), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { podsockCleanup(t, w.cfgPath) })
	return w
}

func (w *nriWorld) cgroupRoot() string { return filepath.Join(w.cgroup2, w.rt.CgroupRoot()) }

func (w *nriWorld) writeConfig(extra string) {
	w.t.Helper()
	writeAgentConfig(w.t, w.cfgPath, w.cgroupRoot(), w.bpffs, w.stateDir,
		fmt.Sprintf("[nri]\nenabled = true\nsocket = %q\n\n%s", w.rt.NRISocket(), extra))
}

func (w *nriWorld) startAgent() *agentProc {
	w.t.Helper()
	a := startAgent(w.t, w.cfgPath)
	w.waitConnected()
	return a
}

func (w *nriWorld) waitConnected() api.Status {
	w.t.Helper()
	var st api.Status
	var err error
	if !testenv.WaitFor(15*time.Second, func() bool {
		st, err = agentStatus(w.cfgPath)
		return err == nil && st.NRI.Connected
	}) {
		w.t.Fatalf("agent not connected to NRI: %+v %v", st.NRI, err)
	}
	return st
}

func (w *nriWorld) pods() []api.PodView {
	w.t.Helper()
	out, err := exec.Command(podsockBin, "pods", "--json", "--config", w.cfgPath).Output()
	if err != nil {
		w.t.Fatalf("podsock pods: %v: %s", err, out)
	}
	var pods []api.PodView
	if err := json.Unmarshal(out, &pods); err != nil {
		w.t.Fatalf("pods --json: %v: %s", err, out)
	}
	return pods
}

// waitPods waits up to 1 s (SPEC: pod events show within 1 s) until podsock knows exactly
// the given sandboxes, each with the given number of containers.
func (w *nriWorld) waitPods(want map[string]int) []api.PodView {
	w.t.Helper()
	var pods []api.PodView
	ok := testenv.WaitFor(time.Second, func() bool {
		pods = w.pods()
		if len(pods) != len(want) {
			return false
		}
		for _, p := range pods {
			n, known := want[p.SandboxID]
			if !known || len(p.Containers) != n {
				return false
			}
		}
		return true
	})
	if !ok {
		w.t.Fatalf("podsock pods = %s, want sandboxes %v", podSummary(pods), want)
	}
	return pods
}

func podSummary(pods []api.PodView) string {
	var parts []string
	for _, p := range pods {
		parts = append(parts, fmt.Sprintf("%s/%s(%s, %d containers, netns %q cookie %d, cgroup %s)", p.Namespace, p.Name,
			p.SandboxID[:min(12, len(p.SandboxID))], len(p.Containers), p.NetnsPath, p.NetnsCookie, p.CgroupPath))
	}
	return "[" + strings.Join(parts, " ") + "]"
}

// dialVIP runs the workload's client in c against addr and returns one line per connect.
func (w *nriWorld) dial(c *cri.Container, proto string, addr netip.AddrPort, count int) ([]string, error) {
	w.t.Helper()
	out, err := w.rt.Exec(w.t, c, 20*time.Second, "/workload", "dial", proto, addr.String(), fmt.Sprint(count))
	return strings.Split(strings.TrimSpace(out), "\n"), err
}

const e2eVIP = "10.96.0.20"

var e2eWeb = netip.MustParseAddrPort(e2eVIP + ":80")

func webServiceFor(pods ...*cri.Pod) string {
	var bs []string
	for _, p := range pods {
		bs = append(bs, fmt.Sprintf("%q", netip.AddrPortFrom(p.IP, 8080)))
	}
	return fmt.Sprintf(`[[service]]
name = "default/web"
vip = %q
port = 80
backends = [%s]
`, e2eVIP, strings.Join(bs, ", "))
}

// through dials vip count times from c over TCP, asserts every connect got a reply with the
// VIP as its peer, and counts the replies per backend.
func (w *nriWorld) through(c *cri.Container, vip netip.AddrPort, count int) map[string]int {
	t := w.t
	t.Helper()
	lines, err := w.dial(c, "tcp", vip, count)
	if err != nil {
		t.Fatalf("dial through %s: %v\n%s", vip, err, strings.Join(lines, "\n"))
	}
	got := map[string]int{}
	for _, l := range lines {
		var name, peer string
		if _, err := fmt.Sscanf(l, "reply=%s peer=%s", &name, &peer); err != nil || peer != vip.String() {
			t.Fatalf("client line %q: want reply=<backend> peer=%s", l, vip)
		}
		got[name]++
	}
	return got
}

// dbServiceFor is shop/db at vip, served by backend, admitting only shop's pods labelled
// role=api.
func dbServiceFor(vip netip.AddrPort, backend *cri.Pod) string {
	return fmt.Sprintf(`
[[service]]
name = "shop/db"
vip = %q
port = %d
backends = ["%s"]
[[service.allow]]
namespace = "shop"
labels = { role = "api" }
`, vip.Addr(), vip.Port(), netip.AddrPortFrom(backend.IP, 8080))
}

func servePod(t *testing.T, rt *cri.Runtime, name, reply string) (*cri.Pod, *cri.Container) {
	t.Helper()
	p := rt.RunPod(t, cri.PodSpec{Name: name, Labels: map[string]string{"app": "web"}})
	c := rt.StartContainer(t, p, "server", "serve", "tcp", "8080", reply)
	rt.WaitLog(t, c, "listening", 5*time.Second)
	return p, c
}

func clientPod(t *testing.T, rt *cri.Runtime, spec cri.PodSpec) (*cri.Pod, *cri.Container) {
	t.Helper()
	p := rt.RunPod(t, spec)
	return p, rt.StartContainer(t, p, "client", "pause")
}

// requireBlackholed fails unless the client cannot reach the VIP: before podsock runs, or
// for a pod podsock must leave alone.
func requireBlackholed(t *testing.T, w *nriWorld, c *cri.Container, why string) {
	t.Helper()
	lines, err := w.dial(c, "tcp", e2eWeb, 1)
	if err == nil || !strings.Contains(lines[0], "ENETUNREACH") && !strings.Contains(lines[0], "EINVAL") {
		t.Fatalf("%s: dial %s gave %q (%v); want the blackhole's ENETUNREACH/EINVAL", why, e2eWeb, lines, err)
	}
}

// nsGetID is the kernel's netns cookie of the nsfs file at path, by NS_GET_ID.
func nsGetID(t *testing.T, path string) uint64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const nsGetID = 0x8008b70d // _IOR(0xb7, 13, __u64)
	var id uint64
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), nsGetID, uintptr(unsafe.Pointer(&id))); errno != 0 {
		t.Fatalf("NS_GET_ID on %s: %v", path, errno)
	}
	return id
}

// TestPrivilegedNRIPodToVIP: podsock started after the pods exist learns them through
// Synchronize, with the exact cgroup IDs and netns cookies; a client pod reaches both
// backend pods through the VIP; and no connect fails while podsock is down.
func TestPrivilegedNRIPodToVIP(t *testing.T) { eachRuntime(t, testNRIPodToVIP) }

func testNRIPodToVIP(t *testing.T, kind cri.Kind) {
	w := newNRIWorld(t, cri.Options{Runtime: kind})
	a, sa := servePod(t, w.rt, "backend-a", "a")
	b, sb := servePod(t, w.rt, "backend-b", "b")
	client, cc := clientPod(t, w.rt, cri.PodSpec{Name: "client", Namespace: "shop"})
	requireBlackholed(t, w, cc, "before podsock runs")

	w.writeConfig(webServiceFor(a, b))
	agentProc := w.startAgent()
	pods := w.waitPods(map[string]int{a.ID: 1, b.ID: 1, client.ID: 1})

	checkPodFacts(t, w, kind, pods, map[*cri.Pod]*cri.Container{a: sa, b: sb, client: cc})
	// The cookie the agent reports is the one sockets inside the pod carry.
	clientNS := &testenv.Netns{Name: client.Name, Path: client.NetnsPath}
	if c, id := clientNS.Cookie(t), nsGetID(t, client.NetnsPath); c != id {
		t.Fatalf("SO_NETNS_COOKIE in the client pod = %d, NS_GET_ID = %d", c, id)
	}

	got := w.through(cc, e2eWeb, 40)
	if got["a"] == 0 || got["b"] == 0 || got["a"]+got["b"] != 40 {
		t.Fatalf("40 connects through the VIP reached %v; want both backends", got)
	}

	// The client keeps connecting from before podsock is killed until the restarted one has
	// resynced: the pinned datapath serves throughout, and adoption drops nothing.
	stop := make(chan struct{})
	type tally struct {
		ok, failed int
		first      string
	}
	done := make(chan tally)
	go func() {
		var tl tally
		for {
			select {
			case <-stop:
				done <- tl
				return
			default:
			}
			lines, err := w.dial(cc, "tcp", e2eWeb, 5)
			for _, l := range lines {
				if err == nil && strings.HasPrefix(l, "reply=") && strings.HasSuffix(l, "peer="+e2eWeb.String()) {
					tl.ok++
				} else {
					tl.failed++
					if tl.first == "" {
						tl.first = fmt.Sprintf("%q (%v)", l, err)
					}
				}
			}
		}
	}()
	time.Sleep(300 * time.Millisecond)
	agentProc.kill()
	time.Sleep(500 * time.Millisecond)
	w.startAgent()
	w.waitPods(map[string]int{a.ID: 1, b.ID: 1, client.ID: 1})
	time.Sleep(300 * time.Millisecond)
	close(stop)
	if tl := <-done; tl.failed > 0 || tl.ok < 10 {
		t.Fatalf("across podsock's kill and restart: %d connects ok, %d failed (first: %s)", tl.ok, tl.failed, tl.first)
	}
	if got := w.through(cc, e2eWeb, 40); got["a"] == 0 || got["b"] == 0 {
		t.Fatalf("after the restart: %v", got)
	}
	st, err := agentStatus(w.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if st.Pods != 3 || st.Netns != 3 || st.Datapath.AdoptedLinks != 9 {
		t.Fatalf("status after restart: %d pods, %d netns, %d adopted links; want 3, 3 and 9", st.Pods, st.Netns, st.Datapath.AdoptedLinks)
	}
	t.Logf("NRI handler latency: %+v", st.NRI.HandlerLatency["all_pod_events"])
}

// TestPrivilegedNRIPolicy: skip-LB (annotation and selector) and a client allow-list act on
// exactly the pods they select, for pods podsock learns of live from RunPodSandbox.
// checkPodFacts asserts what `pods --json` says of each pod against the runtime's own
// facts: identity, the pod and container cgroups with their inodes, the container's name
// (CRI-O's NRI has it only from the kubelet's label), the netns with its NS_GET_ID, and the
// IPs. Each pod of want has the one container given.
func checkPodFacts(t *testing.T, w *nriWorld, kind cri.Kind, pods []api.PodView, want map[*cri.Pod]*cri.Container) {
	t.Helper()
	byID := map[string]*cri.Pod{}
	for p := range want {
		byID[p.ID] = p
	}
	for _, p := range pods {
		pod, ok := byID[p.SandboxID]
		if !ok {
			continue
		}
		delete(byID, p.SandboxID)
		c := want[pod]
		if p.Namespace != pod.Namespace || p.Name != pod.Name || p.UID != pod.UID {
			t.Errorf("pod %s: identity %s/%s uid %s, want %s/%s uid %s", p.SandboxID, p.Namespace, p.Name, p.UID, pod.Namespace, pod.Name, pod.UID)
		}
		if p.CgroupPath != pod.CgroupParent || p.CgroupID != testenv.Inode(t, filepath.Join(w.cgroup2, pod.CgroupParent)) {
			t.Errorf("pod %s: cgroup %s (%d), want %s with its inode", pod.Name, p.CgroupPath, p.CgroupID, pod.CgroupParent)
		}
		if len(p.Containers) != 1 {
			t.Errorf("pod %s: containers %+v, want only %s", pod.Name, p.Containers, c.ID)
			continue
		}
		got := p.Containers[0]
		if got.ID != c.ID || got.CgroupPath != c.CgroupPath || got.CgroupID != testenv.Inode(t, filepath.Join(w.cgroup2, c.CgroupPath)) {
			t.Errorf("pod %s container: %+v, want id %s cgroup %s (the 0:: line of its process) with its inode", pod.Name, got, c.ID, c.CgroupPath)
		}
		// The runtimes name the container's cgroup differently (CRI-O's cgroupfs manager:
		// crio-<id>), and CRI-O reports no container name in NRI, only the
		// io.kubernetes.container.name label: podsock must show both the same way.
		if leaf := containerCgroupLeaf(kind, c.ID); got.CgroupPath != pod.CgroupParent+"/"+leaf || got.Name != c.Name {
			t.Errorf("pod %s container: cgroup %s name %q, want %s/%s and %q", pod.Name, got.CgroupPath, got.Name, pod.CgroupParent, leaf, c.Name)
		}
		if p.NetnsPath != pod.NetnsPath || p.NetnsCookie == 0 || p.NetnsCookie != nsGetID(t, pod.NetnsPath) {
			t.Errorf("pod %s: netns %s cookie %d, want %s with its NS_GET_ID", pod.Name, p.NetnsPath, p.NetnsCookie, pod.NetnsPath)
		}
		if !slices.Equal(p.IPs, []string{pod.IP.String()}) {
			t.Errorf("pod %s: ips %v, want [%s]", pod.Name, p.IPs, pod.IP)
		}
	}
	for id := range byID {
		t.Errorf("pod %s: not in `pods`", id)
	}
}

// pinnedContainerCgroups are the container cgroup IDs the datapath maps to pods.
func pinnedContainerCgroups(t *testing.T, w *nriWorld) map[uint64]bool {
	return pinnedKeys(t, w.bpffs, "podsock_ctrcg_v1")
}

// containerInodes are the cgroup inodes of the given containers.
func containerInodes(t *testing.T, w *nriWorld, ctrs ...*cri.Container) map[uint64]bool {
	out := map[uint64]bool{}
	for _, c := range ctrs {
		out[testenv.Inode(t, filepath.Join(w.cgroup2, c.CgroupPath))] = true
	}
	return out
}

func TestPrivilegedNRIPolicy(t *testing.T) { eachRuntime(t, testNRIPolicy) }

func testNRIPolicy(t *testing.T, kind cri.Kind) {
	w := newNRIWorld(t, cri.Options{Runtime: kind})
	a, _ := servePod(t, w.rt, "backend-a", "a")
	db := netip.MustParseAddrPort("10.96.0.30:80")
	w.writeConfig(webServiceFor(a) + dbServiceFor(db, a) + `
[lb]
[[lb.skip]]
namespace = "mesh-system"
`)
	w.startAgent()

	api, apiC := clientPod(t, w.rt, cri.PodSpec{Name: "api", Namespace: "shop", Labels: map[string]string{"role": "api"}})
	other, otherC := clientPod(t, w.rt, cri.PodSpec{Name: "frontend", Namespace: "shop", Labels: map[string]string{"role": "frontend"}})
	annotated, annC := clientPod(t, w.rt, cri.PodSpec{Name: "meshed", Namespace: "shop", Labels: map[string]string{"role": "api"},
		Annotations: map[string]string{"podsock.io/skip-lb": "true"}})
	meshNS, meshC := clientPod(t, w.rt, cri.PodSpec{Name: "gateway", Namespace: "mesh-system"})
	pods := w.waitPods(map[string]int{a.ID: 1, api.ID: 1, other.ID: 1, annotated.ID: 1, meshNS.ID: 1})
	// These pods started while podsock ran: their facts came from live events, whose
	// timing differs between the runtimes (CRI-O's container cgroup exists at
	// PostCreateContainer, containerd's only at StartContainer).
	checkPodFacts(t, w, kind, pods, map[*cri.Pod]*cri.Container{api: apiC, other: otherC, annotated: annC, meshNS: meshC})
	for _, p := range pods {
		wantSkip := p.SandboxID == annotated.ID || p.SandboxID == meshNS.ID
		if p.SkipLB != wantSkip {
			t.Errorf("pod %s/%s skip_lb = %v, want %v", p.Namespace, p.Name, p.SkipLB, wantSkip)
		}
	}

	// The allowed pod reaches both services.
	w.through(apiC, e2eWeb, 3)
	w.through(apiC, db, 3)
	// Another pod of the same namespace reaches the open service, and gets EPERM from db.
	w.through(otherC, e2eWeb, 3)
	lines, err := w.dial(otherC, "tcp", db, 1)
	if err == nil || !strings.Contains(lines[0], "EPERM") {
		t.Fatalf("pod not on db's allow-list: %q (%v), want EPERM", lines, err)
	}
	// Skipped pods are left alone: their connects go to the VIP itself, into the blackhole.
	requireBlackholed(t, w, annC, "pod annotated podsock.io/skip-lb")
	requireBlackholed(t, w, meshC, "pod selected by [[lb.skip]]")

	st, err := agentStatus(w.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if st.Datapath.Counters.Denied == 0 || st.Datapath.Counters.Skipped < 2 {
		t.Fatalf("counters %+v: want the denial and the skips counted", st.Datapath.Counters)
	}
}

// TestPrivilegedNRIRuntimeRestart: podsock reconnects to a restarted runtime and its
// resync is exact, including pods created and removed around the restart.
func TestPrivilegedNRIRuntimeRestart(t *testing.T) { eachRuntime(t, testNRIRuntimeRestart) }

func testNRIRuntimeRestart(t *testing.T, kind cri.Kind) {
	w := newNRIWorld(t, cri.Options{Runtime: kind})
	a, sa := servePod(t, w.rt, "backend-a", "a")
	w.writeConfig(webServiceFor(a))
	w.startAgent()
	gone, goneC := clientPod(t, w.rt, cri.PodSpec{Name: "short-lived"})
	before := w.waitPods(map[string]int{a.ID: 1, gone.ID: 1})
	checkPodFacts(t, w, kind, before, map[*cri.Pod]*cri.Container{a: sa, gone: goneC})
	if got, want := pinnedContainerCgroups(t, w), containerInodes(t, w, sa, goneC); !maps.Equal(got, want) {
		t.Fatalf("container cgroups mapped before the restart: %v, want %v", got, want)
	}

	w.rt.Restart(t)
	if !testenv.WaitFor(15*time.Second, func() bool {
		st, err := agentStatus(w.cfgPath)
		return err == nil && st.NRI.Connected && st.NRI.Reconnects >= 1
	}) {
		t.Fatalf("podsock did not reconnect to the restarted %s", kind)
	}
	// The resync right after the reconnect leaves the pods and their map entries as they
	// were.
	wantCgroups := containerInodes(t, w, sa, goneC)
	var gonePod []api.PodView
	if !testenv.WaitFor(2*time.Second, func() bool {
		gonePod = w.pods()
		return len(gonePod) == 2 && maps.Equal(pinnedContainerCgroups(t, w), wantCgroups)
	}) {
		t.Fatalf("after the resync: %d pods, container cgroups %v, want 2 pods and %v", len(gonePod), pinnedContainerCgroups(t, w), wantCgroups)
	}
	checkPodFacts(t, w, kind, gonePod, map[*cri.Pod]*cri.Container{a: sa, gone: goneC})
	// A pod started before the restart is removed now. containerd's restarted NRI no
	// longer knows that podsock knows it and sends no RemovePodSandbox (podsock notices on
	// its own); CRI-O sends one. Either way it must go.
	w.rt.RemovePod(t, gone)
	client, cc := clientPod(t, w.rt, cri.PodSpec{Name: "client"})
	w.waitPods(map[string]int{a.ID: 1, client.ID: 1})
	var goneCookie uint64
	for _, p := range gonePod {
		if p.SandboxID == gone.ID {
			goneCookie = p.NetnsCookie
		}
	}
	netns := pinnedKeys(t, w.bpffs, "podsock_netns_v1")
	if goneCookie == 0 || netns[goneCookie] || len(netns) != 2 {
		t.Fatalf("netns map holds %v; want backend-a's and client's cookies, not the removed pod's %d", netns, goneCookie)
	}
	st, err := agentStatus(w.cfgPath)
	if err != nil || st.Netns != 2 {
		t.Fatalf("status: %d netns held (%v), want 2", st.Netns, err)
	}
	checkPodFacts(t, w, kind, w.pods(), map[*cri.Pod]*cri.Container{a: sa, client: cc})
	if !testenv.WaitFor(2*time.Second, func() bool { return maps.Equal(pinnedContainerCgroups(t, w), containerInodes(t, w, sa, cc)) }) {
		t.Fatalf("container cgroups mapped: %v, want backend-a's and client's %v", pinnedContainerCgroups(t, w), containerInodes(t, w, sa, cc))
	}
	if got := w.through(cc, e2eWeb, 5); got["a"] != 5 {
		t.Fatalf("client after the %s restart: %v", kind, got)
	}
}

// TestPrivilegedNRIKilledWhilePodsChange: with podsock dead, or hung, pods still start and
// stop (the runtime drops a plugin that is gone at once, and one that does not answer after
// its request timeout, instead of failing pods), and the resync when podsock returns is
// exact: new pods in, removed pods and their map entries out.
func TestPrivilegedNRIKilledWhilePodsChange(t *testing.T) {
	eachRuntime(t, testNRIKilledWhilePodsChange)
}

func testNRIKilledWhilePodsChange(t *testing.T, kind cri.Kind) {
	for _, how := range []string{"killed", "hung"} {
		t.Run(how, func(t *testing.T) {
			const timeout = 2 * time.Second
			w := newNRIWorld(t, cri.Options{Runtime: kind, NRITimeout: timeout})
			a, _ := servePod(t, w.rt, "backend-a", "a")
			w.writeConfig(webServiceFor(a))
			agentProc := w.startAgent()
			old, _ := clientPod(t, w.rt, cri.PodSpec{Name: "old"})
			w.waitPods(map[string]int{a.ID: 1, old.ID: 1})

			if how == "killed" {
				agentProc.kill()
			} else {
				// A plugin that stops answering: the runtime waits for it once, up to its
				// request timeout, then drops it.
				agentProc.cmd.Process.Signal(unix.SIGSTOP)
			}
			start := time.Now()
			fresh, fc := clientPod(t, w.rt, cri.PodSpec{Name: "fresh"})
			w.rt.RemovePod(t, old)
			took := time.Since(start)
			t.Logf("pod run + container start + pod removal with podsock %s: %v", how, took.Round(time.Millisecond))
			if took > timeout+10*time.Second {
				t.Fatalf("pods took %v with podsock %s; the runtime should give up on it after %v", took, how, timeout)
			}
			if how == "hung" {
				agentProc.kill()
			}

			w.startAgent()
			w.waitPods(map[string]int{a.ID: 1, fresh.ID: 1})
			netns := pinnedKeys(t, w.bpffs, "podsock_netns_v1")
			if !netns[nsGetID(t, fresh.NetnsPath)] || len(netns) != 2 {
				t.Fatalf("netns map after the resync holds %v; want exactly backend-a's and fresh's cookies", netns)
			}
			ctr := pinnedKeys(t, w.bpffs, "podsock_ctrcg_v1")
			if !ctr[testenv.Inode(t, filepath.Join(w.cgroup2, fc.CgroupPath))] || len(ctr) != 2 {
				t.Fatalf("container cgroup map after the resync holds %v; want exactly backend-a's and fresh's", ctr)
			}
			if got := w.through(fc, e2eWeb, 3); got["a"] != 3 {
				t.Fatalf("pod created while podsock was %s: %v", how, got)
			}
		})
	}
}

// pinnedKeys reads the u64 keys of one of podsock's pinned identity maps.
func pinnedKeys(t *testing.T, bpffs, name string) map[uint64]bool {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(bpffs, "podsock", name), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("open pinned %s: %v", name, err)
	}
	defer m.Close()
	out := map[uint64]bool{}
	var k uint64
	var v []byte
	it := m.Iterate()
	for it.Next(&k, &v) {
		out[k] = true
	}
	if err := it.Err(); err != nil {
		t.Fatalf("iterate %s: %v", name, err)
	}
	return out
}

// TestPrivilegedNRIPodChurn: 200 pod create/remove cycles leave the agent's open fds and
// the pod maps where they started.
func TestPrivilegedNRIPodChurn(t *testing.T) { eachRuntime(t, testNRIPodChurn) }

func testNRIPodChurn(t *testing.T, kind cri.Kind) {
	w := newNRIWorld(t, cri.Options{Runtime: kind})
	a, _ := servePod(t, w.rt, "backend-a", "a")
	w.writeConfig(webServiceFor(a))
	agentProc := w.startAgent()
	w.waitPods(map[string]int{a.ID: 1})
	// One cycle first, so that lazily opened descriptors count in the baseline.
	w.rt.RemovePod(t, w.rt.RunPod(t, cri.PodSpec{Name: "warm-up"}))
	w.waitPods(map[string]int{a.ID: 1})
	fds := func() int {
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", agentProc.cmd.Process.Pid))
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	time.Sleep(200 * time.Millisecond) // let the control connections of waitPods close
	baseFDs, baseMaps := fds(), pinnedEntries(t, w.bpffs)
	base, err := agentStatus(w.cfgPath)
	if err != nil {
		t.Fatal(err)
	}

	cycles := 200
	switch {
	case testenv.Soaking():
		cycles = 1000
	case testing.Short():
		cycles = 20
	}
	start := time.Now()
	for i := range cycles {
		p := w.rt.RunPod(t, cri.PodSpec{Name: fmt.Sprintf("churn-%d", i)})
		if i%20 == 0 {
			c := w.rt.StartContainer(t, p, "c", "pause")
			_ = c
		}
		w.rt.RemovePod(t, p)
	}
	t.Logf("%d pod cycles in %v", cycles, time.Since(start).Round(time.Millisecond))
	w.waitPods(map[string]int{a.ID: 1})
	// The control-socket connection of the last `podsock pods` may still be closing.
	var n int
	if !testenv.WaitFor(2*time.Second, func() bool { n = fds(); return n == baseFDs }) {
		t.Errorf("agent holds %d fds after %d pod cycles, %d before", n, cycles, baseFDs)
	}
	if m := pinnedEntries(t, w.bpffs); !mapsEqual(m, baseMaps) {
		t.Errorf("pod maps after %d cycles: %v, before: %v", cycles, m, baseMaps)
	}
	st, err := agentStatus(w.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	// Goroutines of the control connection that answered may still be on their way out.
	if !testenv.WaitFor(2*time.Second, func() bool {
		st, err = agentStatus(w.cfgPath)
		return err == nil && st.Goroutines <= base.Goroutines
	}) {
		t.Errorf("agent runs %d goroutines after %d pod cycles, %d before", st.Goroutines, cycles, base.Goroutines)
	}
	t.Logf("after %d pod cycles: %d fds, %d goroutines, pod maps %v (as before)", cycles, fds(), st.Goroutines, baseMaps)
	ev := st.NRI.Events
	if ev["RunPodSandbox"].Total < uint64(cycles) || ev["RemovePodSandbox"].Total < uint64(cycles) {
		t.Fatalf("events seen: %+v; want >= %d pod runs and removals", ev, cycles)
	}
	t.Logf("NRI handler latency over the churn: %+v", st.NRI.HandlerLatency["all_pod_events"])
}

func mapsEqual(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// pinnedEntries counts the entries of podsock's pod maps, read straight from the pins.
func pinnedEntries(t *testing.T, bpffs string) map[string]int {
	t.Helper()
	out := map[string]int{}
	for _, name := range []string{"podsock_ctrcg_v1", "podsock_podcg_v1", "podsock_netns_v1", "podsock_pod_v1", "podsock_allow_v1", "podsock_aff_v3"} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(bpffs, "podsock", name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			t.Fatalf("open pinned %s: %v", name, err)
		}
		n := 0
		var k, v []byte
		it := m.Iterate()
		for it.Next(&k, &v) {
			n++
		}
		if err := it.Err(); err != nil {
			t.Fatalf("iterate %s: %v", name, err)
		}
		m.Close()
		out[name] = n
	}
	return out
}

// TestPrivilegedNRIPreRegistered: the runtime itself launches podsock from its plugin dir
// (containerd's plugin_path, CRI-O's nri_plugin_dir) and hands over the config from its
// conf dir; podsock serves pods as in external mode.
func TestPrivilegedNRIPreRegistered(t *testing.T) {
	eachRuntime(t, func(t *testing.T, kind cri.Kind) { testPreRegistered(t, kind, 0) })
}

// preRegisteredServices is about as many services as a config NRI can carry: the runtime
// sends the conf file's text in one ttrpc message, capped at 4 MiB. Applying them takes
// longer than the runtime's 2 s plugin request timeout, so podsock must answer Configure
// before it applies them.
const preRegisteredServices = 40_000

// TestPrivilegedNRIPreRegisteredLargeConfig: with a config too large to apply within the
// runtime's default timeouts, registration still succeeds, every service is served, and
// pods are learned.
func TestPrivilegedNRIPreRegisteredLargeConfig(t *testing.T) {
	eachRuntime(t, func(t *testing.T, kind cri.Kind) { testPreRegistered(t, kind, preRegisteredServices) })
}

func bulkServices(n int) string {
	if n == 0 {
		return ""
	}
	return fmt.Sprintf("[limits]\nservices = %d\n\n", 2*n) + bulkServiceTables(n)
}

func bulkServiceTables(n int) string {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "[[service]]\nname = \"bulk/s%d\"\nvip = \"10.%d.%d.%d\"\nport = 80\nbackends = [\"10.88.1.1:8080\"]\n",
			i, 100+i>>16, (i>>8)&255, i&255)
	}
	return b.String()
}

// TestPrivilegedNRIPreRegistered100kServices: 100,000 services, too many for the config
// NRI carries, come from agent.services_file; registration succeeds under the runtime's
// default timeouts and every service is served after.
func TestPrivilegedNRIPreRegistered100kServices(t *testing.T) {
	eachRuntime(t, func(t *testing.T, kind cri.Kind) { testPreRegisteredWith(t, kind, 100_000, true) })
}

func testPreRegistered(t *testing.T, kind cri.Kind, services int) {
	testPreRegisteredWith(t, kind, services, false)
}

func testPreRegisteredWith(t *testing.T, kind cri.Kind, services int, viaFile bool) {
	testenv.RequirePrivileged(t)
	cri.Require(t, kind)
	cgroup2, err := cgroupfs.Mount()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	pluginDir, confDir := filepath.Join(dir, "plugins"), filepath.Join(dir, "conf.d")
	bpffs := testenv.BPFFS(t)
	cfgPath := filepath.Join(dir, "podsock.toml")
	var cgroupRoot string
	rt := cri.Start(t, cri.Options{Runtime: kind, NRIPluginDir: pluginDir, NRIPluginConfDir: confDir, BeforeStart: func(r *cri.Runtime) error {
		cgroupRoot = filepath.Join(cgroup2, r.CgroupRoot())
		if err := os.MkdirAll(cgroupRoot, 0o755); err != nil {
			return err
		}
		// The runtime hands this file's text over in Configure; the CLI reads the same.
		rest := bulkServices(services)
		if viaFile {
			servicesFile := filepath.Join(dir, "services.toml")
			if err := os.WriteFile(servicesFile, []byte(bulkServiceTables(services)), 0o644); err != nil {
				return err
			}
			rest = fmt.Sprintf("services_file = %q\n\n[limits]\nservices = %d\n", servicesFile, 2*services)
		}
		writeAgentConfig(t, cfgPath, cgroupRoot, bpffs, filepath.Join(dir, "state"), rest)
		cfg, err := os.ReadFile(cfgPath)
		if err != nil {
			return err
		}
		if len(cfg) > 4<<20 {
			return fmt.Errorf("config of %d bytes exceeds NRI's 4 MiB message", len(cfg))
		}
		if err := os.MkdirAll(confDir, 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(confDir, "10-podsock.conf"), cfg, 0o644); err != nil {
			return err
		}
		bin, err := os.ReadFile(podsockBin)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(pluginDir, 0o755); err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(pluginDir, "10-podsock"), bin, 0o755)
	}})
	var st api.Status
	if !testenv.WaitFor(30*time.Second, func() bool {
		st, err = agentStatus(cfgPath)
		return err == nil && st.NRI.Connected && st.Services == services
	}) {
		t.Fatalf("the runtime-launched podsock never answered as connected with %d services: %+v %v", services, st, err)
	}
	if st.NRI.Reconnects != 0 {
		t.Fatalf("registration was retried %d times: the runtime gave up on an earlier one", st.NRI.Reconnects)
	}
	if services > 0 {
		conf, ok := st.NRI.HandlerLatency["Configure"]
		if !ok || conf.Count != 1 || conf.Max >= 2*time.Second {
			t.Fatalf("Configure: %+v, want one, answered within the runtime's 2 s", conf)
		}
		t.Logf("%d services: Configure answered in %s; the services were applied after it", services, conf.Max)
	}
	pid := st.PID
	t.Cleanup(func() {
		// The plugin ends with its runtime connection; make sure of it, by PID.
		rt.Stop(t)
		if !testenv.WaitFor(10*time.Second, func() bool { return unix.Kill(pid, 0) != nil }) {
			unix.Kill(pid, unix.SIGKILL)
			t.Errorf("pre-registered podsock (pid %d) outlived its runtime", pid)
		}
		podsockCleanup(t, cfgPath)
	})
	if st.ConfigPath != agent.PreRegisteredConfigName || st.Datapath.CgroupRoot != cgroupRoot {
		t.Fatalf("status: config %q cgroup root %q; want the runtime-handed config and %s", st.ConfigPath, st.Datapath.CgroupRoot, cgroupRoot)
	}

	a, _ := servePod(t, rt, "backend-a", "a")
	_, cc := clientPod(t, rt, cri.PodSpec{Name: "client"})
	w := &nriWorld{t: t, rt: rt, cgroup2: cgroup2, bpffs: bpffs, cfgPath: cfgPath}
	pods := w.waitPods(map[string]int{a.ID: 1, cc.Pod.ID: 1})
	for _, p := range pods {
		if p.NetnsCookie != nsGetID(t, p.NetnsPath) {
			t.Errorf("pod %s: cookie %d, NS_GET_ID %d", p.Name, p.NetnsCookie, nsGetID(t, p.NetnsPath))
		}
	}
	// A pod-to-pod connect works with podsock in the path (no service configured).
	lines, err := w.dial(cc, "tcp", netip.AddrPortFrom(a.IP, 8080), 1)
	if err != nil || !strings.HasPrefix(lines[0], "reply=a ") {
		t.Fatalf("client to backend with podsock pre-registered: %q %v", lines, err)
	}
}

// containerCgroupLeaf is the last element of a container's cgroup path as each runtime
// names it with the cgroupfs driver: containerd the bare container ID, CRI-O "crio-<id>".
func containerCgroupLeaf(kind cri.Kind, id string) string {
	if kind == cri.CRIO {
		return "crio-" + id
	}
	return id
}

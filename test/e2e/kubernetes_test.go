package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/test/cri"
	"github.com/podsock/podsock/test/kubeenv"
	"github.com/podsock/podsock/test/testenv"
)

// kubeWorld is a private containerd with NRI, a private API server with RBAC on, and a
// podsock agent in Kubernetes mode that acts as the shipped service account: what a node
// of a cluster runs, without kubelet or controllers. The test writes EndpointSlices itself,
// as the EndpointSlice controller would, from the pods containerd runs.
type kubeWorld struct {
	*nriWorld
	srv        *kubeenv.Server
	admin      kubernetes.Interface
	node       string
	kubeconfig string
}

const kubeNamespace = "default"

func newKubeWorld(t *testing.T, srv *kubeenv.Server, node string) *kubeWorld {
	t.Helper()
	w := &kubeWorld{nriWorld: newNRIWorld(t, cri.Options{Runtime: cri.Containerd}), srv: srv, node: node}
	w.admin = srv.AdminClient(t)
	rbac := srv.ApplyAgentRBAC(t)
	w.kubeconfig = srv.UserKubeconfig(t, rbac.ServiceAccountUser(), rbac.ServiceAccountGroups()...)
	w.writeKubeConfig("")
	return w
}

// startKubeServer is the API server the scenarios share within one test, with this
// node's Node object.
func startKubeServer(t *testing.T, nodes ...string) *kubeenv.Server {
	t.Helper()
	testenv.RequirePrivileged(t)
	kubeenv.Require(t)
	cri.Require(t, cri.Containerd)
	srv := kubeenv.Start(t, kubeenv.Options{})
	admin := srv.AdminClient(t)
	for i, n := range nodes {
		node := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: n, Labels: map[string]string{corev1.LabelTopologyZone: fmt.Sprintf("zone-%d", i)}},
		}
		if _, err := admin.CoreV1().Nodes().Create(context.Background(), node, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create node %s: %v", n, err)
		}
	}
	return srv
}

func (w *kubeWorld) writeKubeConfig(extra string) {
	w.t.Helper()
	w.writeConfig(fmt.Sprintf("[kubernetes]\nenabled = true\nkubeconfig = %q\nnode_name = %q\nmin_sync_period = \"50ms\"\n\n%s",
		w.kubeconfig, w.node, extra))
}

// startKubeAgent starts the agent and waits until the Kubernetes source has synced.
func (w *kubeWorld) startKubeAgent() *agentProc {
	w.t.Helper()
	a := w.startAgent()
	w.waitSource(func(s api.SourceStatus) bool { return s.Synced && s.State == "synced" })
	return a
}

func (w *kubeWorld) waitSource(ok func(api.SourceStatus) bool) api.SourceStatus {
	w.t.Helper()
	var src api.SourceStatus
	if !testenv.WaitFor(30*time.Second, func() bool {
		st, err := agentStatus(w.cfgPath)
		if err != nil {
			return false
		}
		for _, s := range st.Sources {
			if s.Name == "kubernetes" {
				src = s
				return ok(s)
			}
		}
		return false
	}) {
		w.t.Fatalf("kubernetes source never got there: %+v", src)
	}
	return src
}

// kubeService creates a ClusterIP Service with one TCP port "http" (80 → 8080).
func (w *kubeWorld) kubeService(name, clusterIP string, edit func(*corev1.Service)) *corev1.Service {
	w.t.Helper()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: kubeNamespace},
		Spec: corev1.ServiceSpec{
			ClusterIP: clusterIP,
			Ports:     []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}},
		},
	}
	if edit != nil {
		edit(svc)
	}
	out, err := w.admin.CoreV1().Services(kubeNamespace).Create(context.Background(), svc, metav1.CreateOptions{})
	if err != nil {
		w.t.Fatalf("create service %s: %v", name, err)
	}
	return out
}

// kubeEndpoint is one endpoint of a slice; nil conditions are left out, as a controller
// may.
type kubeEndpoint struct {
	addr                        netip.Addr
	ready, serving, terminating *bool
	node                        string
	forNodes                    []string
}

func readyOn(p *cri.Pod, node string) kubeEndpoint { return readyAt(p.IP, node) }

func readyAt(addr netip.Addr, node string) kubeEndpoint {
	return kubeEndpoint{addr: addr, ready: ptr.To(true), node: node}
}

func terminatingOn(p *cri.Pod, node string) kubeEndpoint {
	return kubeEndpoint{addr: p.IP, ready: ptr.To(false), serving: ptr.To(true), terminating: ptr.To(true), node: node}
}

func endpointSlice(service, name string, eps ...kubeEndpoint) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name: name, Namespace: kubeNamespace,
			Labels:      map[string]string{discoveryv1.LabelServiceName: service, discoveryv1.LabelManagedBy: "podsock-e2e"},
			Annotations: map[string]string{corev1.EndpointsLastChangeTriggerTime: time.Now().UTC().Format(time.RFC3339Nano)},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.ProtocolTCP)}},
		Endpoints:   []discoveryv1.Endpoint{},
	}
	for _, e := range eps {
		ep := discoveryv1.Endpoint{
			Addresses:  []string{e.addr.String()},
			Conditions: discoveryv1.EndpointConditions{Ready: e.ready, Serving: e.serving, Terminating: e.terminating},
		}
		if e.node != "" {
			ep.NodeName = ptr.To(e.node)
		}
		if len(e.forNodes) > 0 {
			ep.Hints = &discoveryv1.EndpointHints{}
			for _, n := range e.forNodes {
				ep.Hints.ForNodes = append(ep.Hints.ForNodes, discoveryv1.ForNode{Name: n})
			}
		}
		s.Endpoints = append(s.Endpoints, ep)
	}
	return s
}

func (w *kubeWorld) putSlice(s *discoveryv1.EndpointSlice) { w.t.Helper(); putSlice(w.t, w.admin, s) }

// putSlice creates or replaces an EndpointSlice.
func putSlice(t *testing.T, admin kubernetes.Interface, s *discoveryv1.EndpointSlice) {
	t.Helper()
	c := admin.DiscoveryV1().EndpointSlices(s.Namespace)
	ctx := context.Background()
	cur, err := c.Get(ctx, s.Name, metav1.GetOptions{})
	if err == nil {
		s.ResourceVersion = cur.ResourceVersion
		_, err = c.Update(ctx, s, metav1.UpdateOptions{})
	} else {
		_, err = c.Create(ctx, s, metav1.CreateOptions{})
	}
	if err != nil {
		t.Fatalf("write endpoint slice %s: %v", s.Name, err)
	}
}

func (w *kubeWorld) services() []api.ServiceView {
	w.t.Helper()
	out, err := exec.Command(podsockBin, "services", "--json", "--config", w.cfgPath).Output()
	if err != nil {
		w.t.Fatalf("podsock services: %v: %s", err, out)
	}
	var svcs []api.ServiceView
	if err := json.Unmarshal(out, &svcs); err != nil {
		w.t.Fatalf("services --json: %v: %s", err, out)
	}
	return svcs
}

// waitBackends waits until the Kubernetes service with this name serves exactly these
// backends on every frontend it has, and the apply that wrote them has recorded them (the
// maps show the backends a moment before: until then services names the frontend's
// source "file" and lists no endpoints), and returns its views.
func (w *kubeWorld) waitBackends(name string, want ...netip.AddrPort) []api.ServiceView {
	w.t.Helper()
	wantStr := make([]string, 0, len(want))
	for _, b := range want {
		wantStr = append(wantStr, b.String())
	}
	slices.Sort(wantStr)
	var views []api.ServiceView
	if !testenv.WaitFor(10*time.Second, func() bool {
		views = slices.DeleteFunc(w.services(), func(v api.ServiceView) bool { return v.Name != name })
		for _, v := range views {
			got := slices.Sorted(slices.Values(v.Backends))
			if !slices.Equal(got, wantStr) || v.Source != "kubernetes" {
				return false
			}
		}
		return len(views) > 0
	}) {
		w.t.Fatalf("service %s never served %v: %+v", name, wantStr, views)
	}
	return views
}

func backendOf(p *cri.Pod) netip.AddrPort { return netip.AddrPortFrom(p.IP, 8080) }

var kubeWeb = netip.MustParseAddrPort("10.96.0.20:80")

// oneNodeScene is node-a of a private API server, with two backend pods (replying "a" and
// "b") and a client pod whose probe container cannot reach the VIP before podsock runs.
func oneNodeScene(t *testing.T) (w *kubeWorld, a, b *cri.Pod, client *cri.Pod, probe *cri.Container) {
	t.Helper()
	w = newKubeWorld(t, startKubeServer(t, "node-a"), "node-a")
	a, _ = servePod(t, w.rt, "web-a", "a")
	b, _ = servePod(t, w.rt, "web-b", "b")
	client, probe = clientPod(t, w.rt, cri.PodSpec{Name: "client", Namespace: "shop"})
	requireBlackholed(t, w.nriWorld, probe, "before podsock runs")
	return w, a, b, client, probe
}

// TestPrivilegedKubernetesClusterIP: a Service and its EndpointSlice of two backend pods,
// both from the real API server, reach a client pod through the ClusterIP, which is the
// peer the client sees. Services podsock must not serve (another service-proxy-name,
// headless) stay unserved, and a Service without endpoints refuses at once.
func TestPrivilegedKubernetesClusterIP(t *testing.T) {
	w, a, b, _, probe := oneNodeScene(t)
	w.startKubeAgent()

	w.kubeService("web", kubeWeb.Addr().String(), nil)
	w.putSlice(endpointSlice("web", "web-1", readyOn(a, "node-a"), readyOn(b, "node-a")))
	views := w.waitBackends("default/web:http", backendOf(a), backendOf(b))
	if len(views) != 1 || views[0].Source != "kubernetes" || views[0].VIP != kubeWeb.Addr().String() || views[0].Port != 80 {
		t.Fatalf("services shows %+v, want one ClusterIP frontend from kubernetes", views)
	}
	for _, e := range views[0].Endpoints {
		if !e.InUse || !e.Ready || !e.Serving || e.Terminating || e.Node != "node-a" {
			t.Fatalf("endpoint %+v, want ready, serving and in use on node-a", e)
		}
	}
	if got := w.through(probe, kubeWeb, 30); got["a"] == 0 || got["b"] == 0 || got["a"]+got["b"] != 30 {
		t.Fatalf("30 connects through the ClusterIP reached %v, want both backends", got)
	}

	// Neither of these is podsock's to serve; they get slices all the same.
	w.kubeService("other-proxy", "10.96.0.21", func(s *corev1.Service) {
		s.Labels = map[string]string{"service.kubernetes.io/service-proxy-name": "someone-else"}
	})
	w.putSlice(endpointSlice("other-proxy", "other-proxy-1", readyOn(a, "node-a")))
	w.kubeService("headless", corev1.ClusterIPNone, nil)
	w.putSlice(endpointSlice("headless", "headless-1", readyOn(a, "node-a")))
	// No endpoints at all: the connect is refused at once.
	w.kubeService("empty", "10.96.0.22", nil)
	w.waitBackends("default/empty:http")
	start := time.Now()
	lines, err := w.dial(probe, "tcp", netip.MustParseAddrPort("10.96.0.22:80"), 1)
	if err == nil || !strings.Contains(lines[0], "ECONNREFUSED") || time.Since(start) > 2*time.Second {
		t.Fatalf("dial of a service without endpoints: %q (%v) after %v, want ECONNREFUSED at once", lines, err, time.Since(start))
	}
	for _, v := range w.services() {
		if strings.HasPrefix(v.Name, "default/other-proxy") || strings.HasPrefix(v.Name, "default/headless") {
			t.Fatalf("serving %s, which podsock must leave alone", v.Name)
		}
	}
	if lines, err := w.dial(probe, "tcp", netip.MustParseAddrPort("10.96.0.21:80"), 1); err == nil ||
		!strings.Contains(lines[0], "ENETUNREACH") && !strings.Contains(lines[0], "EINVAL") {
		t.Fatalf("dial of another proxy's service: %q (%v), want the blackhole's ENETUNREACH/EINVAL", lines, err)
	}
	src := w.waitSource(func(s api.SourceStatus) bool { return s.Syncs > 0 })
	if src.Warning != "" || src.LastSync == nil {
		t.Fatalf("kubernetes source %+v: want synced, without warning", src)
	}
}

// TestPrivilegedKubernetesTerminatingEndpoint: an endpoint marked terminating gets no new
// connects while a ready one exists, and the connection it holds survives; with no ready
// endpoint left, the serving terminating ones take connects; only when the endpoint leaves
// the slice is its connection aborted.
func TestPrivilegedKubernetesTerminatingEndpoint(t *testing.T) {
	w, a, b, client, probe := oneNodeScene(t)
	w.startKubeAgent()

	w.kubeService("web", kubeWeb.Addr().String(), nil)
	// Only a at first, so that the held connection is a's.
	w.putSlice(endpointSlice("web", "web-1", readyOn(a, "node-a")))
	w.waitBackends("default/web:http", backendOf(a))
	held := w.rt.StartContainer(t, client, "hold", "hold", "tcp", kubeWeb.String())
	w.rt.WaitLog(t, held, fmt.Sprintf("connected peer=%s reply=a", kubeWeb), 5*time.Second)

	w.putSlice(endpointSlice("web", "web-1", terminatingOn(a, "node-a"), readyOn(b, "node-a")))
	views := w.waitBackends("default/web:http", backendOf(b))
	inUse := map[string]bool{}
	for _, e := range views[0].Endpoints {
		inUse[e.Addr] = e.InUse
	}
	if len(inUse) != 2 || inUse[backendOf(a).String()] || !inUse[backendOf(b).String()] {
		t.Fatalf("endpoints %+v: want a listed, terminating and not in use, and b in use", views[0].Endpoints)
	}
	if got := w.through(probe, kubeWeb, 20); got["b"] != 20 {
		t.Fatalf("with a terminating, connects reached %v, want b only", got)
	}
	// Both terminating but serving: they are all there is, so they take connects.
	w.putSlice(endpointSlice("web", "web-1", terminatingOn(a, "node-a"), terminatingOn(b, "node-a")))
	w.waitBackends("default/web:http", backendOf(a), backendOf(b))
	if got := w.through(probe, kubeWeb, 30); got["a"] == 0 || got["b"] == 0 {
		t.Fatalf("with only serving terminating endpoints, connects reached %v, want both", got)
	}
	w.putSlice(endpointSlice("web", "web-1", terminatingOn(a, "node-a"), readyOn(b, "node-a")))
	w.waitBackends("default/web:http", backendOf(b))
	time.Sleep(300 * time.Millisecond)
	if out, _ := w.rt.Logs(held); strings.Contains(out, "read-error") {
		t.Fatalf("the terminating endpoint's connection was ended while it was still in the slice: %s", out)
	}

	// a leaves the slice: its connection is aborted within 1 s.
	w.putSlice(endpointSlice("web", "web-1", readyOn(b, "node-a")))
	var out string
	if !testenv.WaitFor(2*time.Second, func() bool {
		out, _ = w.rt.Logs(held)
		return strings.Contains(out, "read-error=ECONNABORTED")
	}) {
		t.Fatalf("connection to the endpoint that left the slice not aborted: %s", out)
	}
}

// TestPrivilegedKubernetesSessionAffinity: with sessionAffinity ClientIP, every socket of
// the client pod goes to one backend while it keeps connecting; once the timeout passes
// without a connect, it picks again.
func TestPrivilegedKubernetesSessionAffinity(t *testing.T) {
	w, a, b, _, probe := oneNodeScene(t)
	w.startKubeAgent()

	w.kubeService("web", kubeWeb.Addr().String(), func(s *corev1.Service) {
		s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
		s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To[int32](1)}}
	})
	w.putSlice(endpointSlice("web", "web-1", readyOn(a, "node-a"), readyOn(b, "node-a")))
	w.waitBackends("default/web:http", backendOf(a), backendOf(b))
	// The client's connects come far quicker than the timeout: they all stick.
	got := w.through(probe, kubeWeb, 20)
	if len(got) != 1 {
		t.Fatalf("20 quick connects with ClientIP affinity reached %v, want one backend", got)
	}
	first := slices.Collect(maps.Keys(got))[0]
	// Each pause outlasts the timeout, so each connect picks afresh; 12 picks all landing
	// on the first backend has odds of 1 in 4096.
	seen := map[string]bool{first: true}
	for range 12 {
		time.Sleep(1500 * time.Millisecond)
		for name := range w.through(probe, kubeWeb, 1) {
			seen[name] = true
		}
		if len(seen) == 2 {
			return
		}
	}
	t.Fatalf("after the affinity timeout every connect still went to %s", first)
}

// TestPrivilegedKubernetesAPIServerDown: while the API server is down for 30 s, the last
// services keep serving without a failed connect, and status says the source cannot
// reach it; once it is back, the view resyncs exactly. An agent restarted while the API
// server is down keeps serving the pinned services until it is back.
func TestPrivilegedKubernetesAPIServerDown(t *testing.T) {
	w, a, b, _, probe := oneNodeScene(t)
	agentProc := w.startKubeAgent()
	w.kubeService("web", kubeWeb.Addr().String(), nil)
	w.putSlice(endpointSlice("web", "web-1", readyOn(a, "node-a"), readyOn(b, "node-a")))
	w.waitBackends("default/web:http", backendOf(a), backendOf(b))

	w.srv.StopAPIServer(t)
	downUntil := time.Now().Add(30 * time.Second)
	connects, failed := 0, 0
	for time.Now().Before(downUntil) {
		lines, err := w.dial(probe, "tcp", kubeWeb, 5)
		connects += len(lines)
		if err != nil {
			failed++
			t.Errorf("connect while the API server is down: %v: %q", err, lines)
		}
		time.Sleep(200 * time.Millisecond)
	}
	w.waitSource(func(s api.SourceStatus) bool { return s.State == "unreachable" })
	t.Logf("%d connects while the API server was down, %d failed", connects, failed)

	// The agent restarts while the API server is still down: the pinned services stay.
	agentProc.cmd.Process.Signal(syscall.SIGTERM)
	agentProc.cmd.Wait()
	w.startAgent()
	if got := w.through(probe, kubeWeb, 20); got["a"]+got["b"] != 20 {
		t.Fatalf("after an agent restart with the API server down, connects reached %v", got)
	}
	st, err := agentStatus(w.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if st.Services == 0 {
		t.Fatalf("restarted agent serves nothing: %+v", st)
	}

	w.srv.StartAPIServer(t)
	w.waitSource(func(s api.SourceStatus) bool { return s.Synced && s.State == "synced" })
	// The resync is exact: a change made after it is the whole truth.
	w.putSlice(endpointSlice("web", "web-1", readyOn(b, "node-a")))
	w.waitBackends("default/web:http", backendOf(b))
	if got := w.through(probe, kubeWeb, 10); got["b"] != 10 {
		t.Fatalf("after the resync, connects reached %v, want b only", got)
	}
}

// TestPrivilegedKubernetesTwoNodes: two agents on one machine act as two nodes (own
// node_name, runtime, cgroup root and pins), against one API server. With
// internalTrafficPolicy Local each sends its own pods to its own node's endpoint only;
// with PreferSameNode hints, likewise.
func TestPrivilegedKubernetesTwoNodes(t *testing.T) {
	srv := startKubeServer(t, "node-a", "node-b")
	wa := newKubeWorld(t, srv, "node-a")
	wb := newKubeWorld(t, srv, "node-b")
	a, _ := servePod(t, wa.rt, "web-a", "a")
	b, _ := servePod(t, wb.rt, "web-b", "b")
	_, probeA := clientPod(t, wa.rt, cri.PodSpec{Name: "client", Namespace: "shop"})
	_, probeB := clientPod(t, wb.rt, cri.PodSpec{Name: "client", Namespace: "shop"})
	requireBlackholed(t, wa.nriWorld, probeA, "before podsock runs")
	requireBlackholed(t, wb.nriWorld, probeB, "before podsock runs")
	wa.startKubeAgent()
	wb.startKubeAgent()

	wa.kubeService("local", kubeWeb.Addr().String(), func(s *corev1.Service) {
		s.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
	})
	wa.putSlice(endpointSlice("local", "local-1", readyOn(a, "node-a"), readyOn(b, "node-b")))
	wa.waitBackends("default/local:http", backendOf(a))
	wb.waitBackends("default/local:http", backendOf(b))

	preferred := netip.MustParseAddrPort("10.96.0.23:80")
	wa.kubeService("near", preferred.Addr().String(), func(s *corev1.Service) {
		s.Spec.TrafficDistribution = ptr.To(corev1.ServiceTrafficDistributionPreferSameNode)
	})
	ea, eb := readyOn(a, "node-a"), readyOn(b, "node-b")
	ea.forNodes, eb.forNodes = []string{"node-a"}, []string{"node-b"}
	wa.putSlice(endpointSlice("near", "near-1", ea, eb))
	wa.waitBackends("default/near:http", backendOf(a))
	wb.waitBackends("default/near:http", backendOf(b))
	// The pods are on separate bridges, so each node's pod reaches the other node's
	// endpoint only if podsock chose wrong: the answer names the backend either way.
	for _, c := range []struct {
		w     *kubeWorld
		probe *cri.Container
		want  string
	}{{wa, probeA, "a"}, {wb, probeB, "b"}} {
		for _, vip := range []netip.AddrPort{kubeWeb, preferred} {
			if got := c.w.through(c.probe, vip, 10); got[c.want] != 10 {
				t.Fatalf("%s: connects through %s reached %v, want %s only", c.w.node, vip, got, c.want)
			}
		}
	}
}

package kubesource

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/sirupsen/logrus"
	logrustest "github.com/sirupsen/logrus/hooks/test"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/podsock/podsock/service"
	"github.com/podsock/podsock/test/kubeenv"
)

func TestNewRefusesWhatCannotWork(t *testing.T) {
	publish := func(service.Snapshot) <-chan error { return nil }
	bad := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(bad, []byte("this: [is not a kubeconfig"), 0o600); err != nil {
		t.Fatal(err)
	}
	for name, opts := range map[string]Options{
		"no node name":         {Kubeconfig: bad, Publish: publish},
		"no publish":           {Kubeconfig: bad, NodeName: "node-a"},
		"kubeconfig missing":   {Kubeconfig: filepath.Join(t.TempDir(), "none"), NodeName: "node-a", Publish: publish},
		"kubeconfig invalid":   {Kubeconfig: bad, NodeName: "node-a", Publish: publish},
		"bad proxy name":       {Kubeconfig: bad, NodeName: "node-a", Publish: publish, ServiceProxyName: "not a label value"},
		"in-cluster elsewhere": {NodeName: "node-a", Publish: publish}, // no service account here
	} {
		if _, err := New(opts); err == nil {
			t.Errorf("%s: New succeeded", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}

// The metrics pass client_golang's lint, and the sync histogram is shared with whoever
// registered it first (the agent, for the file).
func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	agents := NewSyncDurationHistogram()
	reg.MustRegister(agents)
	m, err := newMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.sync.Observe(0.01)
	m.programming.Observe(0.02)
	m.skipped.Set(1)
	agents.WithLabelValues("file").Observe(0.001)
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	if n := testutil.CollectAndCount(agents); n != 2 {
		t.Errorf("podsock_sync_duration_seconds has %d series, want file and kubernetes", n)
	}
	if _, err := newMetrics(reg); err == nil {
		t.Error("a second Source's metrics registered on the same registry")
	}
}

// recorder is the reconciler of these tests: it takes every snapshot, applied at once.
type recorder struct {
	mu    sync.Mutex
	snaps []service.Snapshot
	at    []time.Time
}

func (r *recorder) publish(snap service.Snapshot) <-chan error {
	r.mu.Lock()
	r.snaps = append(r.snaps, snap)
	r.at = append(r.at, time.Now())
	r.mu.Unlock()
	done := make(chan error, 1)
	done <- nil
	return done
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.snaps)
}

// wait returns snapshot n (from 1) once it came.
func (r *recorder) wait(t *testing.T, n int, timeout time.Duration) (service.Snapshot, time.Time) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		r.mu.Lock()
		if len(r.snaps) >= n {
			defer r.mu.Unlock()
			return r.snaps[n-1], r.at[n-1]
		}
		r.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("snapshot %d did not come in %v (%d came)", n, timeout, r.count())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func eventually(t *testing.T, timeout time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

const testNode = "node-a"

var testNodeIP = netip.MustParseAddr("192.0.2.10")

// runSource runs a Source as user until the test ends.
func runSource(t *testing.T, srv *kubeenv.Server, user string, minSync time.Duration) (*Source, *recorder, *prometheus.Registry, *logrustest.Hook) {
	t.Helper()
	rec := &recorder{}
	reg := prometheus.NewRegistry()
	log, hook := logrustest.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	src, err := New(Options{
		Kubeconfig: srv.UserKubeconfig(t, user), NodeName: testNode, MinSyncPeriod: minSync,
		Publish: rec.publish, Log: log, Registerer: reg,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Error("Run did not return after its context ended")
		}
		for _, e := range hook.AllEntries() {
			t.Logf("source log: %s %s", e.Level, e.Message)
		}
	})
	return src, rec, reg, hook
}

// createNode creates this test's Node, in zone-a with one InternalIP, as the kubelet would.
func createNode(t *testing.T, admin kubernetes.Interface) {
	t.Helper()
	ctx := context.Background()
	node, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name: testNode, Labels: map[string]string{corev1.LabelTopologyZone: "zone-a"},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create node: %v", err)
	}
	node.Status.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: testNodeIP.String()},
		{Type: corev1.NodeHostName, Address: testNode},
	}
	if _, err := admin.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("node status: %v", err)
	}
}

// createService creates a Service with one TCP port "http" 80 and, unless addrs is nil,
// its slice <name>-1 with those ready endpoints on port 8080.
func createService(t *testing.T, admin kubernetes.Interface, name string, mod func(*corev1.Service), addrs ...string) *corev1.Service {
	t.Helper()
	ctx := context.Background()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: metav1.NamespaceDefault, Name: name},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": name},
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}},
		},
	}
	if mod != nil {
		mod(svc)
	}
	svc, err := admin.CoreV1().Services(svc.Namespace).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service %s: %v", name, err)
	}
	if addrs == nil {
		return svc
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: svc.Namespace, Name: name + "-1",
			Labels: map[string]string{discoveryv1.LabelServiceName: name},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   readyEndpoints(addrs...),
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	for k, v := range svc.Labels {
		slice.Labels[k] = v // as the EndpointSlice controller copies them
	}
	if _, err := admin.DiscoveryV1().EndpointSlices(svc.Namespace).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create slice of %s: %v", name, err)
	}
	return svc
}

func readyEndpoints(addrs ...string) []discoveryv1.Endpoint {
	eps := make([]discoveryv1.Endpoint, 0, len(addrs))
	for _, a := range addrs {
		eps = append(eps, discoveryv1.Endpoint{
			Addresses:  []string{a},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
			NodeName:   ptr.To(testNode),
		})
	}
	return eps
}

// setEndpoints replaces the endpoints of slice <service>-1, stamped with the time of the
// change as the EndpointSlice controller stamps it.
func setEndpoints(t *testing.T, admin kubernetes.Interface, name string, addrs ...string) {
	t.Helper()
	ctx := context.Background()
	slice, err := admin.DiscoveryV1().EndpointSlices(metav1.NamespaceDefault).Get(ctx, name+"-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if slice.Annotations == nil {
		slice.Annotations = map[string]string{}
	}
	slice.Annotations[corev1.EndpointsLastChangeTriggerTime] = time.Now().Format(time.RFC3339Nano)
	slice.Endpoints = readyEndpoints(addrs...)
	if _, err := admin.DiscoveryV1().EndpointSlices(metav1.NamespaceDefault).Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("update slice of %s: %v", name, err)
	}
}

// wantView is what the API server holds now, translated: what the source must publish.
func wantView(t *testing.T, admin kubernetes.Interface, node NodeInfo) []string {
	t.Helper()
	ctx := context.Background()
	svcs, err := admin.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sls, err := admin.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	in := Input{Node: node}
	for i := range svcs.Items {
		in.Services = append(in.Services, &svcs.Items[i])
	}
	for i := range sls.Items {
		in.EndpointSlices = append(in.EndpointSlices, &sls.Items[i])
	}
	got, _ := Translate(in)
	return summary(got)
}

// viewDiff says how a published view (summary lines) differs from the one wanted.
func viewDiff(what string, got, want []string) string {
	var extra, missing []string
	for _, l := range got {
		if !slices.Contains(want, l) {
			extra = append(extra, l)
		}
	}
	for _, l := range want {
		if !slices.Contains(got, l) {
			missing = append(missing, l)
		}
	}
	return fmt.Sprintf("%s: %d lines, want %d\n not wanted: %s\n missing: %s", what, len(got), len(want),
		strings.Join(extra, "\n             "), strings.Join(missing, "\n          "))
}

// lineOf is the summary line of the ClusterIP frontend of service name's port http.
func lineOf(lines []string, name string) string {
	for _, l := range lines {
		if strings.HasPrefix(l, "default/"+name+":http 10.96.") {
			return l
		}
	}
	return ""
}

func histogramCount(t *testing.T, reg *prometheus.Registry, name string) (uint64, float64) {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == name {
			h := f.GetMetric()[0].GetHistogram()
			return h.GetSampleCount(), h.GetSampleSum()
		}
	}
	return 0, 0
}

// The source against a real API server, as the agent's role: the first snapshot is the
// whole view, a burst of slice changes is one snapshot, the programming latency is
// measured, and while the API server is down nothing is published and the state says so;
// once it is back, the view follows it again, exactly.
func TestSourceAgainstRealAPIServer(t *testing.T) {
	kubeenv.Require(t)
	srv := kubeenv.Start(t, kubeenv.Options{})
	admin := srv.AdminClient(t)
	createNode(t, admin)
	node := NodeInfo{Name: testNode, Zone: "zone-a", Known: true, Addresses: []netip.Addr{testNodeIP}}

	createService(t, admin, "web", nil, "10.88.0.5", "10.88.0.6")
	np := createService(t, admin, "np", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeNodePort }, "10.88.1.5")
	createService(t, admin, "headless", func(s *corev1.Service) { s.Spec.ClusterIP = corev1.ClusterIPNone }, "10.88.2.5")
	createService(t, admin, "others", func(s *corev1.Service) {
		s.Labels = map[string]string{LabelServiceProxyName: "someone-else"}
	}, "10.88.3.5")
	createService(t, admin, "sctp", func(s *corev1.Service) { s.Spec.Ports[0].Protocol = corev1.ProtocolSCTP })
	const bulk = 150 // enough that a partial first view would show
	for i := range bulk {
		createService(t, admin, fmt.Sprintf("bulk-%03d", i), nil, fmt.Sprintf("10.89.%d.%d", i/200, i%200+1))
	}

	const user = "podsock-agent-test"
	srv.GrantAgentRole(t, user)
	const minSync = time.Second
	src, rec, reg, hook := runSource(t, srv, user, minSync)

	first, firstAt := rec.wait(t, 1, time.Minute)
	t.Run("the first snapshot is synced and whole", func(t *testing.T) {
		if !first.Synced || first.Source != service.SourceKubernetes {
			t.Errorf("first snapshot: synced %v, source %q", first.Synced, first.Source)
		}
		got, want := summary(first.Services), wantView(t, admin, node)
		if !slices.Equal(got, want) {
			t.Fatal(viewDiff("first snapshot", got, want))
		}
		// default/kubernetes, web, np, the bulk; not headless, others, sctp.
		if n := len(slices.DeleteFunc(slices.Clone(got), func(l string) bool { return !strings.Contains(l, " 10.96.") })); n != bulk+3 {
			t.Errorf("%d ClusterIP frontends, want %d", n, bulk+3)
		}
		nodePort := fmt.Sprintf("default/np:http %s:%d/tcp -> 10.88.1.5:8080", testNodeIP, np.Spec.Ports[0].NodePort)
		if !slices.Contains(got, nodePort) {
			t.Errorf("no NodePort frontend %q", nodePort)
		}
		st := src.Status()
		if st.State != StateSynced || st.Syncs != 1 || st.Services != bulk+3 || st.Skipped != 1 || !st.NodeAccess || st.Warning != "" {
			t.Errorf("status after the first sync: %+v", st)
		}
		skipLogs := 0
		for _, e := range hook.AllEntries() {
			if strings.Contains(e.Message, "default/sctp:http") {
				skipLogs++
			}
		}
		if skipLogs != 1 {
			t.Errorf("the SCTP port was logged %d times, want once", skipLogs)
		}
	})

	t.Run("a burst of slice changes is one snapshot", func(t *testing.T) {
		// Within MinSyncPeriod of the first sync: all three wait for the same next one.
		setEndpoints(t, admin, "web", "10.88.0.5", "10.88.0.6", "10.88.0.7")
		setEndpoints(t, admin, "web", "10.88.0.5", "10.88.0.7")
		setEndpoints(t, admin, "web", "10.88.0.7", "10.88.0.8")
		snap, at := rec.wait(t, 2, 30*time.Second)
		if got, want := lineOf(summary(snap.Services), "web"), lineOf(wantView(t, admin, node), "web"); got != want || !strings.HasSuffix(got, "-> 10.88.0.7:8080 10.88.0.8:8080") {
			t.Errorf("web after the burst: %q, want %q", got, want)
		}
		if gap := at.Sub(firstAt); gap < minSync-100*time.Millisecond {
			t.Errorf("second snapshot %v after the first, within MinSyncPeriod %v", gap, minSync)
		}
		time.Sleep(2 * minSync)
		if n := rec.count(); n != 2 {
			t.Errorf("%d snapshots after the burst, want 2 (the first, and one for the burst)", n)
		}
		if got, want := summary(snap.Services), wantView(t, admin, node); !slices.Equal(got, want) {
			t.Error(viewDiff("view after the burst", got, want))
		}
	})

	t.Run("network programming latency observed", func(t *testing.T) {
		n, sum := histogramCount(t, reg, "podsock_network_programming_duration_seconds")
		if n != 3 || sum <= 0 || sum > 3*30 {
			t.Errorf("programming latency: %d observations summing to %vs, want the burst's 3", n, sum)
		}
		if n, _ := histogramCount(t, reg, "podsock_sync_duration_seconds"); n != 2 {
			t.Errorf("sync duration: %d observations, want 2", n)
		}
	})

	t.Run("API server down: nothing published, state unreachable; back: the view follows again", func(t *testing.T) {
		before := rec.count()
		lastSync := src.Status().LastSync
		srv.StopAPIServer(t)
		eventually(t, 30*time.Second, "state unreachable", func() bool { return src.Status().State == StateUnreachable })
		time.Sleep(3 * time.Second)
		if n := rec.count(); n != before {
			t.Errorf("%d snapshots published while the API server was down", n-before)
		}
		if st := src.Status(); st.LastSync != lastSync || st.LastError == "" {
			t.Errorf("status while down: %+v", st)
		}
		srv.StartAPIServer(t)
		eventually(t, 30*time.Second, "state synced again", func() bool { return src.Status().State == StateSynced })
		setEndpoints(t, admin, "web", "10.88.0.9")
		want := wantView(t, admin, node)
		var got []string
		eventually(t, time.Minute, "the view after the restart", func() bool {
			snap, _ := rec.wait(t, rec.count(), 0)
			got = summary(snap.Services)
			return slices.Equal(got, want)
		})
		time.Sleep(2 * minSync)
		// The relist after the reconnect changed nothing, so it published nothing.
		if n := rec.count(); n != before+1 {
			t.Errorf("%d snapshots after the restart, want 1 (the change)", n-before)
		}
		if st := src.Status(); !st.NodeAccess || st.Warning != "" {
			t.Errorf("status after the restart: %+v", st)
		}
	})
}

// A role that may not read nodes: the source says so once, does not wait for a node
// cache, and serves without NodePorts.
func TestSourceWithoutNodeAccess(t *testing.T) {
	kubeenv.Require(t)
	srv := kubeenv.Start(t, kubeenv.Options{})
	admin := srv.AdminClient(t)
	createNode(t, admin)
	createService(t, admin, "np", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeNodePort }, "10.88.1.5")

	r, err := kubeenv.LoadAgentRBAC()
	if err != nil {
		t.Fatal(err)
	}
	role := r.ClusterRole.DeepCopy()
	role.Name = "podsock-without-nodes"
	role.Rules = slices.DeleteFunc(role.Rules, func(rule rbacv1.PolicyRule) bool { return slices.Contains(rule.Resources, "nodes") })
	const user = "podsock-no-nodes"
	srv.GrantRole(t, user, role)

	started := time.Now()
	src, rec, _, hook := runSource(t, srv, user, 100*time.Millisecond)
	snap, at := rec.wait(t, 1, time.Minute)
	t.Logf("first snapshot %v after start", at.Sub(started))
	want := wantView(t, admin, NodeInfo{Name: testNode})
	if got := summary(snap.Services); !slices.Equal(got, want) {
		t.Error(viewDiff("snapshot", got, want))
	}
	for _, l := range summary(snap.Services) {
		if strings.Contains(l, ":3") && strings.Contains(l, "default/np") && !strings.Contains(l, " 10.96.") {
			t.Errorf("a NodePort frontend without access to nodes: %s", l)
		}
	}
	time.Sleep(3 * time.Second) // the node watch would have retried by now
	st := src.Status()
	if st.NodeAccess || st.Warning == "" || st.State != StateSynced {
		t.Errorf("status: %+v, want synced without node access, with a warning", st)
	}
	warnings := 0
	for _, e := range hook.AllEntries() {
		if e.Level <= logrus.WarnLevel && strings.Contains(e.Message, "node") {
			warnings++
		}
	}
	if warnings != 1 {
		t.Errorf("%d warnings about nodes, want 1", warnings)
	}
}

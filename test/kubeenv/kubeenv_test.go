package kubeenv

import (
	"context"
	"net/netip"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"

	"github.com/podsock/podsock/test/testenv"
)

// The agent may watch Services and EndpointSlices and read Nodes: exactly this, so a change
// to deploy/rbac.yaml is a change to this test too.
func TestAgentRBACFileGrantsExactlyWhatTheAgentNeeds(t *testing.T) {
	r, err := LoadAgentRBAC()
	if err != nil {
		t.Fatal(err)
	}
	want := []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"services"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"get", "list", "watch"}},
	}
	if !reflect.DeepEqual(r.ClusterRole.Rules, want) {
		t.Errorf("ClusterRole %s rules:\n got %+v\nwant %+v", r.ClusterRole.Name, r.ClusterRole.Rules, want)
	}
	b := r.ClusterRoleBinding
	if b.RoleRef.Kind != "ClusterRole" || b.RoleRef.Name != r.ClusterRole.Name {
		t.Errorf("binding %s refers to %s %s, want ClusterRole %s", b.Name, b.RoleRef.Kind, b.RoleRef.Name, r.ClusterRole.Name)
	}
	wantSubject := []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: r.ServiceAccount.Name, Namespace: r.ServiceAccount.Namespace}}
	if !reflect.DeepEqual(b.Subjects, wantSubject) {
		t.Errorf("binding %s subjects %+v, want %+v", b.Name, b.Subjects, wantSubject)
	}
}

func TestParseAgentRBACRefusesOtherObjects(t *testing.T) {
	for name, doc := range map[string]string{
		"missing binding": "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a, namespace: b}\n",
		"other kind":      "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n",
		"two accounts": "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a}\n---\n" +
			"apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: b}\n",
	} {
		if _, err := ParseAgentRBAC([]byte(doc)); err == nil {
			t.Errorf("%s: parsed", name)
		}
	}
}

func TestParseProcAddr(t *testing.T) {
	for in, want := range map[string]string{
		"0100007F:1F90":                         "127.0.0.1:8080",
		"00000000:0016":                         "0.0.0.0:22",
		"00000000000000000000000001000000:0050": "[::1]:80",
		"0000000000000000FFFF00000100007F:01BB": "127.0.0.1:443", // v4-mapped
		"00000000000000000000000000000000:0035": "[::]:53",
	} {
		got, err := parseProcAddr(in)
		if err != nil || got.String() != want {
			t.Errorf("parseProcAddr(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	for _, in := range []string{"0100007F", "01007F:0050", "0100007F:G", "0100007F:10000"} {
		if _, err := parseProcAddr(in); err == nil {
			t.Errorf("parseProcAddr(%q) succeeded", in)
		}
	}
}

// The real API server: admin creates what the controllers would, and the agent's identity
// (a named user bound to the agent's role, and the service account of deploy/rbac.yaml)
// can watch it and nothing more.
func TestRealAPIServer(t *testing.T) {
	s := Start(t, Options{})
	ctx := context.Background()
	admin := s.AdminClient(t)

	t.Run("listens on 127.0.0.1 only", func(t *testing.T) {
		for name, pid := range s.Pids() {
			addrs, err := ListeningAddrs(pid)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			if len(addrs) == 0 {
				t.Errorf("%s (pid %d) listens nowhere we can see", name, pid)
			}
			for _, a := range addrs {
				if a.Addr() != netip.MustParseAddr("127.0.0.1") {
					t.Errorf("%s (pid %d) listens on %v", name, pid, a)
				}
			}
			t.Logf("%s listens on %v", name, addrs)
		}
	})

	t.Run("reports the release it was built from", func(t *testing.T) {
		v, err := admin.Discovery().ServerVersion()
		if err != nil {
			t.Fatal(err)
		}
		if v.GitVersion != "v1.37.2" || v.Major != "1" || v.Minor != "37" {
			t.Errorf("server version %s (major %q, minor %q), want v1.37.2 (1, 37): see scripts/install-kube.sh",
				v.GitVersion, v.Major, v.Minor)
		}
	})

	web := createService(t, admin, s.ServiceCIDR)

	t.Run("admin kubeconfig works with kubectl", func(t *testing.T) {
		bin, err := binDir()
		if err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(filepath.Join(bin, "kubectl"), "--kubeconfig", s.AdminKubeconfig,
			"get", "service", web.Name, "-o", "jsonpath={.spec.clusterIP}").CombinedOutput()
		if err != nil {
			t.Fatalf("kubectl: %v: %s", err, out)
		}
		if string(out) != web.Spec.ClusterIP {
			t.Errorf("kubectl says ClusterIP %q, want %s", out, web.Spec.ClusterIP)
		}
	})

	t.Run("user granted the agent role", func(t *testing.T) {
		const user = "podsock-agent-test"
		s.GrantAgentRole(t, user)
		checkAgentAccess(t, admin, s.UserClient(t, user), web)

		cfg, err := clientcmd.BuildConfigFromFlags("", s.UserKubeconfig(t, user))
		if err != nil {
			t.Fatal(err)
		}
		fromFile, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fromFile.CoreV1().Services("").List(ctx, metav1.ListOptions{}); err != nil {
			t.Errorf("list services with %s's kubeconfig: %v", user, err)
		}
	})

	t.Run("service account of deploy/rbac.yaml", func(t *testing.T) {
		r := s.ApplyAgentRBAC(t)
		checkAgentAccess(t, admin, s.UserClient(t, r.ServiceAccountUser(), r.ServiceAccountGroups()...), web)
	})

	t.Run("user with no role", func(t *testing.T) {
		c := s.UserClient(t, "nobody")
		if _, err := c.CoreV1().Services("").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
			t.Errorf("list services as nobody: %v, want 403", err)
		}
	})

	// Last: the API server goes away and comes back where it was, with etcd's data.
	t.Run("stops and starts again on the same address", func(t *testing.T) {
		url, etcdPid := s.URL, s.Pids()["etcd"]
		s.StopAPIServer(t)
		if _, err := admin.CoreV1().Services("").List(ctx, metav1.ListOptions{}); err == nil || apierrors.ReasonForError(err) != metav1.StatusReasonUnknown {
			t.Errorf("list services with the API server stopped: %v, want a connection error", err)
		}
		s.StartAPIServer(t)
		if s.URL != url || s.Pids()["etcd"] != etcdPid {
			t.Errorf("after the restart: URL %s (was %s), etcd pid %d (was %d)", s.URL, url, s.Pids()["etcd"], etcdPid)
		}
		got, err := admin.CoreV1().Services(web.Namespace).Get(ctx, web.Name, metav1.GetOptions{})
		if err != nil || got.Spec.ClusterIP != web.Spec.ClusterIP {
			t.Errorf("service %s after the restart: %v, %v", web.Name, got, err)
		}
	})
}

// createService creates a Node, a Service and its EndpointSlice as the controllers would,
// and returns the Service as the API server stored it.
func createService(t *testing.T, admin kubernetes.Interface, serviceCIDR netip.Prefix) *corev1.Service {
	t.Helper()
	ctx := context.Background()
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name: "node-a", Labels: map[string]string{corev1.LabelTopologyZone: "zone-a"},
	}}
	node, err := admin.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create node: %v", err)
	}
	// As the kubelet reports it; kube-proxy waits for a node address.
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "10.88.0.1"}}
	if _, err := admin.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("node status: %v", err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: metav1.NamespaceDefault},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{{
				Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP,
			}},
		},
	}
	svc, err = admin.CoreV1().Services(svc.Namespace).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service: %v", err)
	}
	ip, err := netip.ParseAddr(svc.Spec.ClusterIP)
	if err != nil || !serviceCIDR.Contains(ip) {
		t.Fatalf("service %s has ClusterIP %q, want one in %v", svc.Name, svc.Spec.ClusterIP, serviceCIDR)
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name: "web-1", Namespace: svc.Namespace,
			Labels: map[string]string{discoveryv1.LabelServiceName: svc.Name},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{
			Addresses:  []string{"10.88.0.5"},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
			NodeName:   ptr.To(node.Name),
			Zone:       ptr.To("zone-a"),
		}},
		Ports: []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	if _, err := admin.DiscoveryV1().EndpointSlices(svc.Namespace).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create endpointslice: %v", err)
	}
	return svc
}

// checkAgentAccess checks that agent can do what the agent's role allows (list and watch
// Services and EndpointSlices, get Nodes) and is refused what it does not.
func checkAgentAccess(t *testing.T, admin, agent kubernetes.Interface, web *corev1.Service) {
	t.Helper()
	ctx := context.Background()

	svcs, err := agent.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("list services: %v", err)
	}
	if !hasObject(svcs.Items, web.Namespace, web.Name) {
		t.Errorf("list services: no %s/%s", web.Namespace, web.Name)
	}
	selector := discoveryv1.LabelServiceName + "=" + web.Name
	slices, err := agent.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		t.Fatalf("list endpointslices: %v", err)
	}
	if len(slices.Items) != 1 || slices.Items[0].Endpoints[0].Addresses[0] != "10.88.0.5" {
		t.Errorf("list endpointslices of %s: %+v", web.Name, slices.Items)
	}
	if _, err := agent.CoreV1().Nodes().Get(ctx, "node-a", metav1.GetOptions{}); err != nil {
		t.Errorf("get node: %v", err)
	}

	// Watches see what admin changes after them.
	svcWatch, err := agent.CoreV1().Services("").Watch(ctx, metav1.ListOptions{ResourceVersion: svcs.ResourceVersion})
	if err != nil {
		t.Fatalf("watch services: %v", err)
	}
	defer svcWatch.Stop()
	sliceWatch, err := agent.DiscoveryV1().EndpointSlices("").Watch(ctx,
		metav1.ListOptions{LabelSelector: selector, ResourceVersion: slices.ResourceVersion})
	if err != nil {
		t.Fatalf("watch endpointslices: %v", err)
	}
	defer sliceWatch.Stop()
	mark := []byte(`{"metadata":{"annotations":{"kubeenv-test":"` + t.Name() + `"}}}`)
	if _, err := admin.CoreV1().Services(web.Namespace).Patch(ctx, web.Name, types.MergePatchType, mark, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.DiscoveryV1().EndpointSlices(web.Namespace).Patch(ctx, "web-1", types.MergePatchType, mark, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	expectModified(t, svcWatch, web.Name)
	expectModified(t, sliceWatch, "web-1")

	// And nothing more.
	forbidden := map[string]error{}
	_, forbidden["get service"] = agent.CoreV1().Services(web.Namespace).Get(ctx, web.Name, metav1.GetOptions{})
	_, forbidden["list pods"] = agent.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	_, forbidden["create service"] = agent.CoreV1().Services(web.Namespace).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "not-allowed"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}},
	}, metav1.CreateOptions{})
	_, forbidden["patch endpointslice"] = agent.DiscoveryV1().EndpointSlices(web.Namespace).Patch(ctx, "web-1", types.MergePatchType, mark, metav1.PatchOptions{})
	forbidden["delete node"] = agent.CoreV1().Nodes().Delete(ctx, "node-a", metav1.DeleteOptions{})
	for what, err := range forbidden {
		if !apierrors.IsForbidden(err) {
			t.Errorf("%s: %v, want 403 Forbidden", what, err)
		}
	}
}

func expectModified(t *testing.T, w watch.Interface, name string) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok {
				t.Fatalf("watch closed before %s was modified", name)
			}
			if m, ok := ev.Object.(metav1.Object); ok && ev.Type == watch.Modified && m.GetName() == name {
				return
			}
		case <-timeout:
			t.Fatalf("no watch event for %s in 10s", name)
		}
	}
}

func hasObject(svcs []corev1.Service, namespace, name string) bool {
	for _, s := range svcs {
		if s.Namespace == namespace && s.Name == name {
			return true
		}
	}
	return false
}

// The real kube-proxy in nftables mode programs the netns it was given, and only that one,
// from the API server it reaches through the relay; Stop leaves that netns as it found it.
func TestPrivilegedKubeProxy(t *testing.T) {
	RequireKubeProxy(t)
	s := Start(t, Options{})
	ns := testenv.NewNetns(t, []string{s.ServiceCIDR.String()})
	web := createService(t, s.AdminClient(t), s.ServiceCIDR)
	k := s.StartKubeProxy(t, KubeProxyOptions{Netns: ns, NodeName: "node-a"})
	ctx := context.Background()

	var n int
	var err error
	if !testenv.WaitFor(30*time.Second, func() bool {
		n, err = k.MapElements(ctx, "ip", ServiceIPsMap)
		return err == nil && n == 1
	}) {
		t.Fatalf("map %s has %d elements (%v), want 1: %s", ServiceIPsMap, n, err, k.proc.logTail(20))
	}
	out, err := k.NFT(ctx, "list", "map", "ip", kubeProxyTable, ServiceIPsMap)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, web.Spec.ClusterIP+" ") {
		t.Errorf("map %s lacks ClusterIP %s:\n%s", ServiceIPsMap, web.Spec.ClusterIP, out)
	}
	host, err := exec.Command("nft", "list", "tables").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list tables in the host netns: %v: %s", err, host)
	}
	if strings.Contains(string(host), kubeProxyTable) {
		t.Errorf("the host netns has a %s table:\n%s", kubeProxyTable, host)
	}

	pid := k.Pid()
	if err := k.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, 0); err == nil {
		t.Errorf("kube-proxy (pid %d) still runs after Stop", pid)
	}
	left, err := k.NFT(ctx, "list", "tables")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(left, kubeProxyTable) {
		t.Errorf("after Stop, its netns still has:\n%s", left)
	}
}

func TestMetricValue(t *testing.T) {
	body := `# HELP kubeproxy_sync_proxy_rules_duration_seconds SyncProxyRules latency in seconds
kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="0.001"} 0
kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv6"} 7
kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"} 3
kubeproxy_sync_proxy_rules_duration_seconds_count_total 9
plain 5
`
	for _, c := range []struct {
		name, label string
		want        float64
	}{
		{syncCountMetric, `ip_family="IPv4"`, 3},
		{syncCountMetric, `ip_family="IPv6"`, 7},
		{"plain", `ip_family="IPv4"`, 5},
		{"absent", "", 0},
	} {
		got, err := metricValue(body, c.name, c.label)
		if err != nil || got != c.want {
			t.Errorf("metricValue(%s, %s) = %v, %v; want %v", c.name, c.label, got, err, c.want)
		}
	}
}

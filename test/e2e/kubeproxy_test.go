package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/podsock/podsock/test/kubeenv"
	"github.com/podsock/podsock/test/testenv"
)

// TestPrivilegedKubernetesBesideKubeProxy: the real kube-proxy (nftables) and podsock
// serve one node, from one API server, side by side, as the README's migration describes.
// A client under podsock's cgroup root is balanced at connect(), so kube-proxy's DNAT never
// sees the ClusterIP; a client outside it goes through kube-proxy's rules as before. Each
// reaches the backends with the ClusterIP as its peer, neither changes what the other
// programmed, and both follow an endpoint change.
func TestPrivilegedKubernetesBesideKubeProxy(t *testing.T) {
	testenv.RequirePrivileged(t)
	kubeenv.RequireKubeProxy(t)
	srv := kubeenv.Start(t, kubeenv.Options{})
	admin := srv.AdminClient(t)
	ctx := context.Background()
	if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The node's netns: kube-proxy programs it, the backends listen in it, and both kinds
	// of client connect from it. The service range is blackholed there.
	node := testenv.NewNetns(t, []string{srv.ServiceCIDR.String()}, "10.88.0.5/32", "10.88.0.6/32")
	beA, beB := netip.MustParseAddrPort("10.88.0.5:8080"), netip.MustParseAddrPort("10.88.0.6:8080")
	testenv.StartTCPBackend(t, node, "a", beA)
	testenv.StartTCPBackend(t, node, "b", beB)
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default"},
		Spec: corev1.ServiceSpec{ClusterIP: kubeWeb.Addr().String(),
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
	}
	if _, err := admin.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	slice := func(addrs ...netip.AddrPort) *discoveryv1.EndpointSlice {
		var eps []kubeEndpoint
		for _, a := range addrs {
			eps = append(eps, readyAt(a.Addr(), "node-a"))
		}
		return endpointSlice("web", "web-1", eps...)
	}
	putSlice(t, admin, slice(beA, beB))

	kp := srv.StartKubeProxy(t, kubeenv.KubeProxyOptions{Netns: node, NodeName: "node-a"})
	routeServicesLocally(t, node, srv.ServiceCIDR)
	cg := testenv.NewCgroup(t)
	home, err := testenv.HomeCgroup()
	if err != nil {
		t.Fatal(err)
	}
	// through dials the ClusterIP n times, from podsock's cgroup or from outside it, and
	// counts the backends; every peer must be the ClusterIP.
	through := func(underPodsock bool, n int) (map[string]int, error) {
		got := map[string]int{}
		var err error
		dial := func() {
			for range n {
				var r testenv.TCPResult
				if r, err = testenv.DialTCP(node, 0, kubeWeb, false); err != nil {
					return
				}
				if r.Peer != kubeWeb {
					err = fmt.Errorf("peer %s, want the ClusterIP %s", r.Peer, kubeWeb)
					return
				}
				got[r.Backend]++
			}
		}
		if underPodsock {
			cg.RunIn(t, home, dial)
		} else {
			dial()
		}
		return got, err
	}
	waitBoth := func(underPodsock bool, want string) {
		t.Helper()
		var got map[string]int
		var err error
		if !testenv.WaitFor(30*time.Second, func() bool {
			got, err = through(underPodsock, 20)
			return err == nil && len(got) == len(want) && allIn(got, want)
		}) {
			t.Fatalf("client (under podsock: %v) reached %v (%v), want backends %q", underPodsock, got, err, want)
		}
	}
	waitBoth(false, "ab")
	rulesBefore := nftRules(t, kp)

	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "podsock.toml")
	rbac := srv.ApplyAgentRBAC(t)
	kubeconfig := srv.UserKubeconfig(t, rbac.ServiceAccountUser(), rbac.ServiceAccountGroups()...)
	writeAgentConfig(t, cfgPath, cg.Path, testenv.BPFFS(t), filepath.Join(dir, "state"), fmt.Sprintf(
		"[nri]\nenabled = false\n\n[kubernetes]\nenabled = true\nkubeconfig = %q\nnode_name = \"node-a\"\nmin_sync_period = \"50ms\"\n", kubeconfig))
	t.Cleanup(func() { podsockCleanup(t, cfgPath) })
	startAgent(t, cfgPath)
	if !testenv.WaitFor(30*time.Second, func() bool {
		st, err := agentStatus(cfgPath)
		return err == nil && st.Backends == 2
	}) {
		t.Fatal("podsock never served the service's two backends")
	}
	connects := func() uint64 {
		st, err := agentStatus(cfgPath)
		if err != nil {
			t.Fatal(err)
		}
		return st.Datapath.Counters.Connects
	}

	before := connects()
	waitBoth(true, "ab")
	if n := connects() - before; n < 20 {
		t.Fatalf("podsock balanced %d connects of its clients, want every one", n)
	}
	before = connects()
	waitBoth(false, "ab")
	if n := connects() - before; n != 0 {
		t.Fatalf("podsock balanced %d connects of clients outside its cgroup root, want none", n)
	}
	if after := nftRules(t, kp); after != rulesBefore {
		t.Fatalf("kube-proxy's rules changed with podsock running:\nbefore:\n%s\nafter:\n%s", rulesBefore, after)
	}

	// Both follow the API server: b leaves.
	putSlice(t, admin, slice(beA))
	waitBoth(true, "a")
	waitBoth(false, "a")
	if after := nftRules(t, kp); !strings.Contains(after, beA.Addr().String()) || strings.Contains(after, beB.Addr().String()) {
		t.Fatalf("kube-proxy did not follow the endpoint change:\n%s", after)
	}
}

// routeServicesLocally swaps the node netns' blackhole for the service range for a local
// route to lo. kube-proxy's DNAT runs in the output hook, after the route lookup, which a
// blackhole fails (EINVAL) before netfilter sees the packet. That is safe only because
// the netns has no interface but lo: whatever DNAT misses stays inside it. Checked.
func routeServicesLocally(t *testing.T, ns *testenv.Netns, cidr netip.Prefix) {
	t.Helper()
	links, err := exec.Command("ip", "-n", ns.Name, "-o", "link", "show").Output()
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(strings.TrimSpace(string(links)), "\n") + 1; n != 1 || !strings.Contains(string(links), " lo:") {
		t.Fatalf("the node netns has links other than lo; a route for %s could leave it:\n%s", cidr, links)
	}
	testenv.Run(t, "ip", "-n", ns.Name, "route", "replace", "local", cidr.String(), "dev", "lo")
}

// allIn reports whether every backend in got is one of want's letters.
func allIn(got map[string]int, want string) bool {
	for b := range got {
		if !strings.Contains(want, b) {
			return false
		}
	}
	return true
}

// nftRules is kube-proxy's table as it programmed it, without the counters that traffic
// moves.
func nftRules(t *testing.T, kp *kubeenv.KubeProxy) string {
	t.Helper()
	out, err := kp.NFT(context.Background(), "list", "table", "ip", "kube-proxy")
	if err != nil {
		t.Fatal(err)
	}
	return regexp.MustCompile(`counter packets \d+ bytes \d+`).ReplaceAllString(out, "counter")
}

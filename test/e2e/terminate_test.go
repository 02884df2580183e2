package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/test/cri"
	"github.com/podsock/podsock/test/testenv"
)

var (
	e2eAPI = netip.MustParseAddrPort("10.96.0.21:80")
	e2eDNS = netip.MustParseAddrPort("10.96.0.53:53")
)

// terminateServices is web and dns on webBackend, api on apiBackend.
func terminateServices(webBackend, apiBackend *cri.Pod) string {
	return fmt.Sprintf(`[[service]]
name = "default/web"
vip = %q
port = %d
backends = ["%s:8080"]

[[service]]
name = "default/api"
vip = %q
port = %d
backends = ["%s:8080"]

[[service]]
name = "kube-system/dns"
vip = %q
port = %d
protocol = "udp"
backends = ["%s:5353"]
`, e2eWeb.Addr(), e2eWeb.Port(), webBackend.IP, e2eAPI.Addr(), e2eAPI.Port(), apiBackend.IP,
		e2eDNS.Addr(), e2eDNS.Port(), webBackend.IP)
}

// backendsWithDNS starts backend pods a and b, each serving TCP on 8080 and UDP on 5353
// and answering with its letter.
func backendsWithDNS(t *testing.T, w *nriWorld) (a, b *cri.Pod) {
	t.Helper()
	a, _ = servePod(t, w.rt, "backend-a", "a")
	b, _ = servePod(t, w.rt, "backend-b", "b")
	for _, p := range []*cri.Pod{a, b} {
		dns := w.rt.StartContainer(t, p, "dns", "serve", "udp", "5353", p.Name[len(p.Name)-1:])
		w.rt.WaitLog(t, dns, "listening", 5*time.Second)
	}
	return a, b
}

func (w *nriWorld) sockets(args ...string) []api.SocketView {
	w.t.Helper()
	out, err := exec.Command(podsockBin, append([]string{"sockets", "--json", "--config", w.cfgPath}, args...)...).Output()
	if err != nil {
		w.t.Fatalf("podsock sockets %v: %v: %s", args, err, out)
	}
	var socks []api.SocketView
	if err := json.Unmarshal(out, &socks); err != nil {
		w.t.Fatalf("sockets --json: %v: %s", err, out)
	}
	return socks
}

// TestPrivilegedNRITerminateRemovedBackend: client pods hold TCP and connected UDP sockets
// through VIPs; removing backend pod a from its services aborts exactly the sockets that
// were balanced to it, within 1 s, entering only the client pods' netns, and leaves the
// clients of backend b alone.
func TestPrivilegedNRITerminateRemovedBackend(t *testing.T) {
	eachRuntime(t, testNRITerminateRemovedBackend)
}

func testNRITerminateRemovedBackend(t *testing.T, kind cri.Kind) {
	w := newNRIWorld(t, cri.Options{Runtime: kind})
	a, b := backendsWithDNS(t, w)
	c1, probe := clientPod(t, w.rt, cri.PodSpec{Name: "client-1", Namespace: "shop"})
	c2, _ := clientPod(t, w.rt, cri.PodSpec{Name: "client-2", Namespace: "shop"})
	requireBlackholed(t, w, probe, "before podsock runs")

	w.writeConfig(terminateServices(a, b))
	agentProc := w.startAgent()
	w.waitPods(map[string]int{a.ID: 2, b.ID: 2, c1.ID: 1, c2.ID: 1})

	hold := func(p *cri.Pod, name, proto string, vip netip.AddrPort, backend string) *cri.Container {
		t.Helper()
		c := w.rt.StartContainer(t, p, name, "hold", proto, vip.String())
		w.rt.WaitLog(t, c, fmt.Sprintf("connected peer=%s reply=%s", vip, backend), 5*time.Second)
		return c
	}
	web1 := hold(c1, "hold-web", "tcp", e2eWeb, "a")
	dns1 := hold(c1, "hold-dns", "udp", e2eDNS, "a")
	web2 := hold(c2, "hold-web", "tcp", e2eWeb, "a")
	api2 := hold(c2, "hold-api", "tcp", e2eAPI, "b")

	// Listing: each client socket with its pod, service and backend.
	aWeb := netip.AddrPortFrom(a.IP, 8080)
	var fromPods []string
	for _, s := range w.sockets("--backend", aWeb.String()) {
		if s.Proto != "tcp" || s.State != "ESTAB" || s.Remote != aWeb.String() || s.Service != "default/web" ||
			s.Backend != aWeb.String() || s.VIP != e2eWeb.String() {
			t.Errorf("socket to %s listed as %+v", aWeb, s)
		}
		fromPods = append(fromPods, s.Pod)
	}
	slices.Sort(fromPods)
	if !slices.Equal(fromPods, []string{"shop/client-1", "shop/client-2"}) {
		t.Fatalf("sockets balanced to %s are in pods %v, want one in each client pod", aWeb, fromPods)
	}
	var c1Services []string
	for _, s := range w.sockets("--pod", "shop/client-1") {
		if s.Pod != "shop/client-1" {
			t.Errorf("--pod shop/client-1 listed %+v", s)
		}
		if s.Service != "" {
			c1Services = append(c1Services, s.Proto+" "+s.Service+" "+s.Backend)
		}
	}
	slices.Sort(c1Services)
	want := []string{"tcp default/web " + aWeb.String(), fmt.Sprintf("udp kube-system/dns %s:5353", a.IP)}
	if !slices.Equal(c1Services, want) {
		t.Fatalf("balanced sockets of client-1: %v, want %v", c1Services, want)
	}
	if udp := w.sockets("--proto", "udp", "--pod", "shop/client-2"); len(udp) != 0 {
		t.Fatalf("client-2 has no UDP socket, listed %+v", udp)
	}

	// Backend a leaves web and dns; b takes over.
	w.writeConfig(terminateServices(b, b))
	start := time.Now()
	agentProc.cmd.Process.Signal(syscall.SIGHUP)
	aborted := []*cri.Container{web1, dns1, web2}
	var logs []string
	if !testenv.WaitFor(time.Second, func() bool {
		logs = logs[:0]
		for _, c := range aborted {
			out, _ := w.rt.Logs(c)
			logs = append(logs, out)
			if !strings.Contains(out, "read-error=ECONNABORTED") {
				return false
			}
		}
		return true
	}) {
		t.Fatalf("clients of the removed backend not aborted within 1 s:\n%s\nagent log:\n%s", strings.Join(logs, "\n"), agentProc.logText())
	}
	t.Logf("config reload to the last client aborted: %v", time.Since(start).Round(time.Millisecond))

	// The client of backend b is untouched.
	time.Sleep(300 * time.Millisecond)
	if out, _ := w.rt.Logs(api2); strings.Contains(out, "read-error") {
		t.Fatalf("client of the remaining backend was touched: %s", out)
	}
	st, err := agentStatus(w.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	term := st.Termination
	if !term.Available || term.Destroyed != 3 || term.Failed != 0 || term.NetnsEntered != 2 || term.FullWalks != 0 {
		t.Fatalf("termination status %+v: want 3 sockets destroyed, in the 2 client netns only", term)
	}
	if got := w.through(probe, e2eWeb, 5); got["b"] != 5 {
		t.Fatalf("after the change web answered %v, want b only", got)
	}
}

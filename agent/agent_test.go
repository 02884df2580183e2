package agent

import (
	"encoding/json"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/internal/netns"
	"github.com/podsock/podsock/internal/terminator"
	"github.com/podsock/podsock/runtimehooks"
	"github.com/podsock/podsock/service"
)

// Socket paths must stay short (108 bytes), so not t.TempDir.
func shortDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "ps-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestControlSocketIsPrivateAndExclusive(t *testing.T) {
	dir := shortDir(t)
	ctl, err := listenControl(dir)
	if err != nil {
		t.Fatal(err)
	}
	ln := ctl.ln
	st, err := os.Stat(filepath.Join(dir, api.SocketName))
	if err != nil {
		t.Fatal(err)
	}
	if perm := st.Mode().Perm(); perm != 0o600 {
		t.Fatalf("control socket mode %o, want 600", perm)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if _, err := listenControl(dir); err == nil || !strings.Contains(err.Error(), "another agent") {
		t.Fatalf("second listener on a live socket: %v, want refusal", err)
	}
	ctl.Close()
	// Released: the next agent gets it.
	again, err := listenControl(dir)
	if err != nil {
		t.Fatalf("after release: %v", err)
	}
	again.Close()
}

func TestStaleControlSocketIsReplaced(t *testing.T) {
	dir := shortDir(t)
	path := filepath.Join(dir, api.SocketName)
	// A socket file nobody listens on, as a killed agent leaves it.
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	ctl, err := listenControl(dir)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	ctl.Close()
}

func TestToDatapath(t *testing.T) {
	got := toDatapath([]service.Service{{
		Name: "kube-system/dns", VIP: netip.MustParseAddr("10.96.0.10"), Port: 53, Protocol: service.ProtocolUDP,
		Backends: []service.Backend{{Addr: netip.MustParseAddrPort("10.88.0.5:53"), Weight: 2}},
	}, {
		Name: "default/web", VIP: netip.MustParseAddr("fd00::20"), Port: 80, Protocol: service.ProtocolTCP,
	}}, map[string]datapath.ServicePolicy{"default/web": {AffinityPod: true}})
	want := []datapath.Service{{
		Name: "kube-system/dns", VIP: netip.MustParseAddr("10.96.0.10"), Port: 53, Proto: datapath.ProtoUDP,
		Backends: []datapath.Backend{{Addr: netip.MustParseAddrPort("10.88.0.5:53"), Weight: 2}},
	}, {
		Name: "default/web", VIP: netip.MustParseAddr("fd00::20"), Port: 80, Proto: datapath.ProtoTCP,
		Policy: datapath.ServicePolicy{AffinityPod: true},
	}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
}

// The JSON field names are fixed by SPEC.md.
func TestServicesJSONShape(t *testing.T) {
	views := serviceViews([]datapath.Service{{
		Name: "default/web", VIP: netip.MustParseAddr("fd00::20"), Port: 80, Proto: datapath.ProtoTCP,
		Backends: []datapath.Backend{{Addr: netip.MustParseAddrPort("[fd00::5]:8080"), Weight: 3}},
	}, {Name: "default/empty", VIP: netip.MustParseAddr("10.96.0.9"), Port: 53, Proto: datapath.ProtoUDP}},
		func(key string) (service.Service, bool) {
			if key == "10.96.0.9:53/udp" {
				return service.Service{Source: service.SourceKubernetes, Endpoints: []service.Endpoint{
					{Addr: netip.MustParseAddrPort("10.88.0.7:53"), Serving: true, Terminating: true, Zone: "a", Node: "n1"},
				}}, true
			}
			return service.Service{}, false
		})
	b, err := json.Marshal(views)
	if err != nil {
		t.Fatal(err)
	}
	want := `[{"name":"default/web","vip":"fd00::20","port":80,"protocol":"tcp","source":"file","backends":["[fd00::5]:8080"],"weights":[3],"endpoints":[]},` +
		`{"name":"default/empty","vip":"10.96.0.9","port":53,"protocol":"udp","source":"kubernetes","backends":[],"weights":[],` +
		`"endpoints":[{"addr":"10.88.0.7:53","ready":false,"serving":true,"terminating":true,"zone":"a","node":"n1","in_use":false}]}]`
	if string(b) != want {
		t.Fatalf("services JSON\n got %s\nwant %s", b, want)
	}
}

func TestStatusJSONShape(t *testing.T) {
	b, err := json.Marshal(api.Status{})
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"datapath", "nri", "services", "backends", "pods", "config_generation", "last_reload_error", "sources", "conflicts", "version", "ready", "metrics_listen"} {
		if _, ok := m[k]; !ok {
			t.Errorf("status JSON lacks %q: %s", k, b)
		}
	}
	dp := m["datapath"].(map[string]any)
	nri := m["nri"].(map[string]any)
	for _, k := range []string{"attached", "pin_dir"} {
		if _, ok := dp[k]; !ok {
			t.Errorf("status.datapath lacks %q", k)
		}
	}
	for _, k := range []string{"enabled", "connected"} {
		if _, ok := nri[k]; !ok {
			t.Errorf("status.nri lacks %q", k)
		}
	}
}

func quietLog() logrus.FieldLogger {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return l
}

// testAgent is an agent on dp (the real datapath, or a fake), with a tracker over cgroup2
// and a terminator over ns, as start would wire it (no control socket, no NRI
// connection); it stops at cleanup.
func testAgent(t testing.TB, dp datapathOps, cgroup2 string, host *netns.Handle, ns datapath.NetnsSet) *Agent {
	a := newAgent(quietLog().(*logrus.Logger))
	a.dp = dp
	a.tracker = runtimehooks.NewTracker(cgroup2)
	a.netns = nodeNetns{host: host, tracker: a.tracker}
	if ns == nil {
		ns = a.netns
	}
	a.term = terminator.New(dp, ns, quietLog())
	a.sources = service.NewReconciler(a.apply, a.logConflicts, service.Limits{})
	close(a.reconcilerUp)
	a.podsSynced = true
	t.Cleanup(func() {
		a.sources.Close()
		a.term.Close()
		close(a.sweepStop)
		a.podq.close()
		_ = a.tracker.Close()
	})
	return a
}

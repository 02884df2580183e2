package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/config"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/internal/cgroupfs"
	"github.com/podsock/podsock/runtimehooks"
	"github.com/podsock/podsock/service"
	"github.com/podsock/podsock/test/testenv"
)

// Through the agent's own handlers, on the real kernel: pods whose RunPodSandbox and
// StartContainer arrive while a 100,000-service reload is being applied get their
// identity and policy before the handlers return, so each first connect gets it: a pod the
// allow-list selects reaches the backend, one it does not gets EPERM, a mesh pod
// ([[lb.skip]]) is left alone. No handler outlasts its budget.
func TestPrivilegedAgentPodEventsDuringLargeReload(t *testing.T) {
	testenv.RequirePrivileged(t)
	cgroup2, err := cgroupfs.Mount()
	if err != nil {
		t.Fatal(err)
	}
	vip := netip.MustParseAddrPort("10.96.0.20:80")
	beA := netip.MustParseAddrPort("10.88.0.5:8080")
	cg := testenv.NewCgroup(t)
	ns := testenv.NewNetns(t, []string{"10.96.0.0/12"}, "10.88.0.5/32")
	testenv.StartTCPBackend(t, ns, "A", beA)
	bpffs := testenv.BPFFS(t)
	cg.EnterSelf(t)
	const nServices = 100_000
	dp := loadDatapathWith(t, cg, bpffs, datapath.Limits{Services: 2 * nServices, Slots: 4 * nServices})

	a := testAgent(t, dp, cgroup2, nil, testenv.NewNetnsSet(t, datapath.ErrUnknownNetns, ns))
	cfgWith := func(port uint16) *config.Config {
		cfg := config.Default()
		cfg.Limits.Services, cfg.Limits.Slots = 2*nServices, 4*nServices
		cfg.LB.Skip = []service.Selector{{Namespace: "mesh"}}
		cfg.Services = append(cfg.Services, service.Service{
			Name: "default/web", VIP: vip.Addr(), Port: vip.Port(), Protocol: service.ProtocolTCP,
			Backends: []service.Backend{{Addr: beA, Weight: 1}},
			Allow:    []service.Selector{{Namespace: "allowed"}},
		})
		for i := range nServices {
			cfg.Services = append(cfg.Services, service.Service{
				Name: fmt.Sprintf("bulk/s%d", i), VIP: netip.AddrFrom4([4]byte{10, byte(100 + i>>16), byte(i >> 8), byte(i)}),
				Port: 80, Protocol: service.ProtocolTCP,
				Backends: []service.Backend{{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 88, 1, byte(i)}), port), Weight: 1}},
			})
		}
		return cfg
	}
	if err := <-a.publishConfig(cfgWith(8080)); err != nil {
		t.Fatal(err)
	}

	next := cfgWith(8081)
	applied := make(chan error, 1)
	go func() { applied <- <-a.publishConfig(next) }()
	// Wait until the apply holds the datapath, not just the plan.
	time.Sleep(300 * time.Millisecond)
	during, slowest := 0, time.Duration(0)
	for i, namespace := range []string{"allowed", "other", "mesh", "allowed", "other", "mesh"} {
		pod := cg.NewChild(t, fmt.Sprintf("pod-late-%d", i))
		ctr := pod.NewChild(t, "ctr")
		id := fmt.Sprintf("late-sandbox-%d", i)
		rel := "/" + strings.TrimPrefix(strings.TrimPrefix(pod.Path, cgroup2), "/")
		start := time.Now()
		a.RunPodSandbox(runtimehooks.Sandbox{ID: id, UID: "uid-" + id, Namespace: namespace, Name: id, CgroupParent: rel})
		a.ContainerStarted(runtimehooks.ContainerInfo{ID: "ctr-" + id, SandboxID: id, Name: "c", CgroupsPath: rel + "/ctr"})
		slowest = max(slowest, time.Since(start))
		select {
		case err := <-applied:
			applied <- err
		default:
			during++
		}
		var res testenv.TCPResult
		ctr.RunIn(t, cg, func() { res, err = testenv.DialTCP(ns, 0, vip, false) })
		switch namespace {
		case "allowed":
			if err != nil || res.Backend != "A" || res.Peer != vip {
				t.Fatalf("first connect of allowed pod %s: %+v %v, want A through the VIP", id, res, err)
			}
		case "other":
			if !errors.Is(err, unix.EPERM) {
				t.Fatalf("first connect of pod %s, not on the allow-list: %v, want EPERM", id, err)
			}
		case "mesh":
			if !testenv.IsUnreachable(err) {
				t.Fatalf("first connect of mesh pod %s: %+v %v, want the VIP untranslated (blackholed)", id, res, err)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := <-applied; err != nil {
		t.Fatal(err)
	}
	late := 0
	for _, ev := range a.events.snapshot() {
		late += int(ev.Late)
	}
	t.Logf("%d of 6 pods arrived while the %d-service reload was applied; slowest pair of handlers %v, %d late", during, nServices, slowest, late)
	if during < 3 || late != 0 || slowest > handlerBudget {
		t.Fatalf("%d pods during the apply, %d late events, slowest %v: want most during it, none late", during, late, slowest)
	}
}

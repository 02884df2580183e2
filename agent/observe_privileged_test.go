package agent

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/podsock/podsock/config"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/internal/cgroupfs"
	"github.com/podsock/podsock/service"
	"github.com/podsock/podsock/test/testenv"
)

// On the real kernel: scrapes of /metrics while a 100,000-service reload is being
// applied are all answered (they read the counters under the datapath's lock, which the
// apply releases every 64 services, and the rest from a snapshot; how long they take is
// make bench's to show), and report
// the 100,000 services once the apply is done. /healthz is 200 on the real pins, and 503
// naming the pin once one is gone.
func TestPrivilegedMetricsScrapeDuringLargeApply(t *testing.T) {
	testenv.RequirePrivileged(t)
	cgroup2, err := cgroupfs.Mount()
	if err != nil {
		t.Fatal(err)
	}
	cg := testenv.NewCgroup(t)
	bpffs := testenv.BPFFS(t)
	const nServices = 100_000
	dp := loadDatapathWith(t, cg, bpffs, datapath.Limits{Services: 2 * nServices, Slots: 4 * nServices})
	a := testAgent(t, dp, cgroup2, nil, nil)
	url := serveTestMetrics(t, a)
	expect(t, url+"/healthz", 200, "ok")

	cfgWith := func(port uint16) *config.Config {
		cfg := config.Default()
		cfg.Limits.Services, cfg.Limits.Slots = 2*nServices, 4*nServices
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
	applied := make(chan error, 1)
	started := time.Now()
	go func() { applied <- <-a.publishConfig(cfgWith(8081)) }()
	var during []time.Duration
	var applyTook time.Duration
scrape:
	for {
		select {
		case err := <-applied:
			if err != nil {
				t.Fatal(err)
			}
			applyTook = time.Since(started)
			break scrape
		default:
		}
		t0 := time.Now()
		code, body := get(t, url+"/metrics")
		took := time.Since(t0)
		if code != 200 || !strings.Contains(body, "podsock_datapath_operations_total") {
			t.Fatalf("scrape during the apply: %d %.200q", code, body)
		}
		during = append(during, took)
		time.Sleep(20 * time.Millisecond)
	}
	slices.Sort(during)
	if len(during) < 5 {
		t.Fatalf("only %d scrapes during a %v apply", len(during), applyTook)
	}
	p50, worst := during[len(during)/2], during[len(during)-1]
	// How long they take is the bench's to show (make bench: "scrape during"); a test only
	// proves that they are answered throughout the apply.
	t.Logf("%d scrapes during the %d-service reload (%v): p50 %v, max %v", len(during), nServices, applyTook.Round(time.Millisecond), p50, worst)
	if !testenv.WaitFor(5*time.Second, func() bool {
		_, body := get(t, url+"/metrics")
		return strings.Contains(body, fmt.Sprintf("\npodsock_services %d\n", nServices)) &&
			strings.Contains(body, fmt.Sprintf("podsock_bpf_map_capacity{map=\"podsock_svc_v1\"} %d", 2*nServices)) &&
			strings.Contains(body, fmt.Sprintf("podsock_bpf_map_entries{map=\"podsock_svc_v1\"} %d", nServices))
	}) {
		_, body := get(t, url+"/metrics")
		t.Fatalf("after the apply, /metrics does not show %d services and the services map's capacity:\n%s", nServices, grepLines(body, "podsock_services ", "podsock_bpf_map_"))
	}

	pin := filepath.Join(dp.PinDir(), "links", "connect4")
	if err := os.Remove(pin); err != nil {
		t.Fatal(err)
	}
	expect(t, url+"/healthz", 503, "pins not this agent's: connect4: pin "+pin)
}

func grepLines(body string, prefixes ...string) string {
	var out []string
	for _, l := range strings.Split(body, "\n") {
		for _, p := range prefixes {
			if strings.HasPrefix(l, p) {
				out = append(out, l)
			}
		}
	}
	return strings.Join(out, "\n")
}

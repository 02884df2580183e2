package agent

import (
	"errors"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/podsock/podsock/config"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/service"
)

// serveTestMetrics serves the agent's /metrics, /healthz and /readyz on a loopback port.
func serveTestMetrics(t *testing.T, a *Agent) string {
	t.Helper()
	ln, err := listenMetrics("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a.serveMetrics(ln)
	t.Cleanup(a.obs.close)
	return "http://" + ln.Addr().String()
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func expect(t *testing.T, url string, code int, body string) {
	t.Helper()
	if got, b := get(t, url); got != code || !strings.Contains(b, body) {
		t.Fatalf("GET %s: %d %q, want %d with %q", url, got, b, code, body)
	}
}

// /readyz with NRI on: 503 naming what it waits for until the first config has applied in
// full and the runtime's first Synchronize has been applied, then 200; a reload that is
// rejected later does not make it unready. /healthz is 200 while the pins are the
// agent's, 503 with the reason when not.
func TestReadyzWaitsForConfigAndSynchronize(t *testing.T) {
	a, fake, _ := fakeAgent(t)
	a.nri.Enabled = true
	url := serveTestMetrics(t, a)
	expect(t, url+"/readyz", 503, "waiting for the first config apply, the runtime's first NRI Synchronize")
	expect(t, url+"/healthz", 200, "ok")

	path := filepath.Join(t.TempDir(), "podsock.toml")
	writeConfig(t, path, webAndDNS)
	a.reload(path)
	expect(t, url+"/readyz", 503, "waiting for the runtime's first NRI Synchronize\n")
	a.Synchronize(nil, nil)
	expect(t, url+"/readyz", 200, "ok")
	if st := a.status(); !st.Ready || st.ReadyReason != "" {
		t.Fatalf("status ready %v (%q), want true like /readyz", st.Ready, st.ReadyReason)
	}
	writeConfig(t, path, "[[service]]\nname = 1\n")
	a.reload(path)
	expect(t, url+"/readyz", 200, "ok")

	fake.mu.Lock()
	fake.pinsErr = errors.New("connect4: pin /sys/fs/bpf/podsock/links/connect4 holds link 9, not this agent's link 7")
	fake.mu.Unlock()
	expect(t, url+"/healthz", 503, "pins not this agent's: connect4: pin /sys/fs/bpf/podsock/links/connect4 holds link 9")
}

// With NRI off, ready is the first config applied; with Kubernetes on, also its first
// synced snapshot applied (an unsynced one is not enough).
func TestReadyzWithoutNRIAndWithKubernetes(t *testing.T) {
	a, _, _ := fakeAgent(t)
	a.kubeCfg.Enabled = true
	a.sources.Register(service.SourceKubernetes)
	url := serveTestMetrics(t, a)
	path := filepath.Join(t.TempDir(), "podsock.toml")
	writeConfig(t, path, webAndDNS)
	a.reload(path)
	expect(t, url+"/readyz", 503, "waiting for the first Kubernetes sync\n")
	if err := <-a.publishKubernetes(service.Snapshot{Source: service.SourceKubernetes}); err != nil {
		t.Fatal(err)
	}
	expect(t, url+"/readyz", 503, "waiting for the first Kubernetes sync\n")
	if err := <-a.publishKubernetes(service.Snapshot{Source: service.SourceKubernetes, Synced: true}); err != nil {
		t.Fatal(err)
	}
	expect(t, url+"/readyz", 200, "ok")
}

// /metrics serves SPEC's names from the agent's one registry, passes client_golang's
// lint, and counts what happened: reloads ok and failed, the services of the snapshot
// refreshed after an apply, NRI handler times, terminated sockets per protocol.
func TestMetricsEndpoint(t *testing.T) {
	a, _, _ := fakeAgent(t)
	a.nri.Enabled = true
	url := serveTestMetrics(t, a)
	path := filepath.Join(t.TempDir(), "podsock.toml")
	writeConfig(t, path, webAndDNS)
	a.reload(path)
	writeConfig(t, path, "[agent]\nlog_level = \"loud\"\n")
	a.reload(path)
	a.metrics.observeNRIEvent("RunPodSandbox", 300*time.Microsecond)
	a.metrics.observeTermination(map[uint8]int{datapath.ProtoTCP: 3, datapath.ProtoUDP: 1}, 20*time.Millisecond)

	deadline := time.Now().Add(2 * time.Second)
	var body string
	for {
		_, body = get(t, url+"/metrics")
		if strings.Contains(body, "\npodsock_services 2\n") || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, want := range []string{
		`podsock_datapath_operations_total{op="connect",verdict="balanced"} 0`,
		`podsock_datapath_operations_total{op="recvmsg_getpeername",verdict="reversed"} 0`,
		"\npodsock_services 2\n", "\npodsock_backends 3\n", "\npodsock_pods 0\n", "\npodsock_netns 0\n",
		`podsock_nri_event_duration_seconds_bucket{event="RunPodSandbox",le="0.0005"} 1`,
		`podsock_terminated_sockets_total{proto="tcp"} 3`, `podsock_terminated_sockets_total{proto="udp"} 1`,
		"podsock_termination_pass_duration_seconds_count 1",
		`podsock_sync_duration_seconds_count{source="file"} 1`,
		`podsock_config_reloads_total{result="ok"} 1`, `podsock_config_reloads_total{result="failed"} 1`,
		`podsock_build_info{version="` + Version + `"} 1`,
		`podsock_services_left_out{source="file"} 0`,
		"\npodsock_ready 0\n", "\npodsock_nri_connected 0\n", "\npodsock_config_generation 1\n",
		"\nprocess_resident_memory_bytes ",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	problems, err := testutil.GatherAndLint(a.metrics.registry)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

// A port already taken is one line naming the address, before anything is loaded.
func TestMetricsListenTaken(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, err = listenMetrics(ln.Addr().String())
	if err == nil || !strings.HasPrefix(err.Error(), "metrics listen "+ln.Addr().String()+": ") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("error %v, want one line naming the address", err)
	}
	if ln, err := listenMetrics(config.Default().Metrics.Listen); ln != nil || err != nil {
		t.Fatalf("metrics off by default: %v, %v", ln, err)
	}
}

// [metrics] per_service turns the datapath's per-service counters on, on reload too, and
// /metrics then has one series per service frontend; off, none.
func TestMetricsPerService(t *testing.T) {
	a, fake, _ := fakeAgent(t)
	url := serveTestMetrics(t, a)
	path := filepath.Join(t.TempDir(), "podsock.toml")
	writeConfig(t, path, webAndDNS)
	a.reload(path)
	if _, body := get(t, url+"/metrics"); strings.Contains(body, "podsock_service_connects_total") {
		t.Fatalf("per-service series while per_service is off")
	}
	writeConfig(t, path, "[metrics]\nper_service = true\n"+webAndDNS)
	a.reload(path)
	fake.mu.Lock()
	on := fake.svcCounts
	fake.mu.Unlock()
	_, body := get(t, url+"/metrics")
	for _, want := range []string{
		`podsock_service_connects_total{proto="tcp",service="default/web",vip="10.96.0.20:80"} 1`,
		`podsock_service_datagrams_total{proto="udp",service="kube-system/dns",vip="10.96.0.10:53"} 0`,
	} {
		if !on || !strings.Contains(body, want) {
			t.Errorf("per_service on (datapath counting %v): /metrics lacks %q", on, want)
		}
	}
	problems, err := testutil.GatherAndLint(a.metrics.registry)
	if err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
}

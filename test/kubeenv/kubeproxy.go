package kubeenv

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/podsock/podsock/test/testenv"
)

// KubeProxyOptions configures StartKubeProxy.
type KubeProxyOptions struct {
	// Netns is where kube-proxy runs and the only netns it programs: one the test made
	// with testenv.NewNetns, with a blackhole route for the service range (checked).
	Netns *testenv.Netns
	// NodeName is --hostname-override. The Node object is the test's to create, with an
	// address in its status: without one kube-proxy waits 30 s for it, then assumes
	// loopback.
	NodeName string
	Args     []string // added last, so they override the defaults
	// ServiceRouteTo, when set, is the netns into which Netns routes the service range, in
	// place of a blackhole in Netns: a test that connects through kube-proxy's DNAT needs a
	// route to each ClusterIP (a blackhole fails connect() before netfilter sees the
	// packet). That netns must blackhole the range (checked), so that whatever DNAT misses
	// ends there; the test checks that nothing routes on from it.
	ServiceRouteTo *testenv.Netns
	// ReadyTimeout bounds the wait for the first sync; default 2 minutes. Its first sync
	// of 10k Services took 75 s here, so larger clusters need more.
	ReadyTimeout time.Duration
}

// KubeProxy is the real kube-proxy v1.37 in nftables mode inside one netns of the test's.
//
// A netns has its own loopback, so the API server on the host's 127.0.0.1 is out of its
// reach: a socat relay inside the netns listens on the API server's address there and
// carries each connection to the host netns (entered through the API server's own
// /proc/PID/ns/net). No route, veth or address is added anywhere.
type KubeProxy struct {
	Netns       *testenv.Netns
	MetricsAddr string // inside Netns

	proc, relay *process
	stopOnce    sync.Once
	stopErr     error
}

const (
	kubeProxyMetrics = "127.0.0.1:10249" // inside the netns, so no clash with the host
	kubeProxyHealthz = "127.0.0.1:10256"
	syncCountMetric  = "kubeproxy_sync_proxy_rules_duration_seconds_count"
	kubeProxyTable   = "kube-proxy"
	// ServiceIPsMap is the map of kube-proxy's nftables mode that sends each ClusterIP (of
	// a Service with endpoints) to the Service's chain.
	ServiceIPsMap = "service-ips"
)

// RequireKubeProxy skips a test that needs the real kube-proxy when it cannot run here
// (not root, bin/kube-proxy not built, no socat, nsenter or nft), and fails it instead
// when CI=true.
func RequireKubeProxy(t testing.TB) {
	t.Helper()
	if err := kubeProxyPrerequisites(); err != nil {
		testenv.SkipOrFail(t, "real kube-proxy: "+err.Error())
	}
}

func kubeProxyPrerequisites() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root")
	}
	bin, err := binDir()
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(bin, "kube-proxy")); err != nil {
		return errors.New("bin/kube-proxy not built: run make deps (scripts/install-kube.sh)")
	}
	for _, tool := range []string{"socat", "nsenter", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not in PATH", tool)
		}
	}
	return nil
}

// StartKubeProxy runs kube-proxy (as system:kube-proxy, which the API server's bootstrap
// RBAC binds to system:node-proxier) inside opts.Netns and waits for its first sync of the
// nftables rules. Its cleanup calls Stop, for a test that did not.
//
// Privileged: run under `flock /tmp/podsock-priv.lock`, like every privileged suite here.
func (s *Server) StartKubeProxy(t testenv.TB, opts KubeProxyOptions) *KubeProxy {
	t.Helper()
	if tt, ok := t.(testing.TB); ok {
		RequireKubeProxy(tt)
	} else if err := kubeProxyPrerequisites(); err != nil {
		t.Fatalf("kubeenv: real kube-proxy: %v", err)
	}
	if opts.Netns == nil || opts.NodeName == "" {
		t.Fatal("kubeenv: StartKubeProxy needs a Netns and a NodeName")
	}
	// What kube-proxy programs would send to ClusterIPs: never out of this netns, or of
	// the one it routes them to.
	if opts.ServiceRouteTo != nil {
		opts.ServiceRouteTo.RequireBlackholes(t, []string{s.ServiceCIDR.String()})
	} else {
		opts.Netns.RequireBlackholes(t, []string{s.ServiceCIDR.String()})
	}
	bin, err := binDir()
	if err != nil {
		t.Fatal(err)
	}
	k := &KubeProxy{Netns: opts.Netns, MetricsAddr: kubeProxyMetrics}

	apiAddr := strings.TrimPrefix(s.URL, "https://")
	host := fmt.Sprintf("/proc/%d/ns/net", s.apiserver.pid())
	k.relay, err = startProcess("relay", "nsenter", filepath.Join(s.Dir, "kube-proxy-relay.log"),
		"--net="+opts.Netns.Path, "socat",
		"TCP-LISTEN:"+port(apiAddr)+",bind=127.0.0.1,reuseaddr,fork",
		// Quoted, or socat splits the inner command at its colons.
		`EXEC:"nsenter --net=`+host+` socat STDIO TCP:`+apiAddr+`"`)
	if err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	// Registered before kube-proxy starts: a relay that started must stop even if
	// kube-proxy does not.
	t.Cleanup(func() {
		if err := k.Stop(); err != nil {
			t.Errorf("kubeenv: %v", err)
		}
	})

	args := []string{
		"--net=" + opts.Netns.Path, filepath.Join(bin, "kube-proxy"),
		"--kubeconfig=" + s.UserKubeconfig(t, "system:kube-proxy"),
		"--proxy-mode=nftables",
		"--hostname-override=" + opts.NodeName,
		// Zeros leave the host's global conntrack sysctls alone.
		"--conntrack-max-per-core=0",
		"--conntrack-tcp-timeout-established=0",
		"--conntrack-tcp-timeout-close-wait=0",
		"--metrics-bind-address=" + kubeProxyMetrics,
		"--healthz-bind-address=" + kubeProxyHealthz,
	}
	// nsenter --net execs kube-proxy: the PID is kube-proxy's own.
	k.proc, err = startProcess("kube-proxy", "nsenter", filepath.Join(s.Dir, "kube-proxy.log"),
		append(args, opts.Args...)...)
	if err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	t.Cleanup(func() {
		if f, ok := t.(failureLog); ok && f.Failed() {
			f.Logf("kubeenv: last lines of %s:\n%s", k.proc.logPath, k.proc.logTail(logTailLines))
		}
	})

	timeout := opts.ReadyTimeout
	if timeout == 0 {
		timeout = readyTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := k.proc.waitReady(ctx, func(ctx context.Context) error {
		n, err := k.SyncCount(ctx)
		if err == nil && n == 0 {
			err = errors.New("no sync yet")
		}
		return err
	}); err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	return k
}

// Stop ends kube-proxy, then its relay, by their PIDs, and deletes the nftables tables
// kube-proxy made in its netns, so that the next kube-proxy there starts from nothing, as
// on a fresh node. Calling it again returns the first call's result; the cleanup
// StartKubeProxy registered calls it too.
func (k *KubeProxy) Stop() error {
	k.stopOnce.Do(func() {
		var errs []error
		if k.proc != nil {
			errs = append(errs, k.proc.stop())
		}
		errs = append(errs, k.relay.stop())
		if k.proc != nil {
			errs = append(errs, k.deleteTables())
		}
		k.stopErr = errors.Join(errs...)
	})
	return k.stopErr
}

// deleteTables deletes kube-proxy's own tables (one per IP family it ran) from its netns.
func (k *KubeProxy) deleteTables() error {
	out, err := k.NFT(context.Background(), "list", "tables")
	if err != nil {
		return err
	}
	var errs []error
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line) // "table ip kube-proxy"
		if len(f) == 3 && f[0] == "table" && f[2] == kubeProxyTable {
			if _, err := k.NFT(context.Background(), "delete", "table", f[1], f[2]); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// MapElements counts the elements of the nftables map name in kube-proxy's table of
// family ("ip", "ip6"): ServiceIPsMap holds one per ClusterIP with endpoints, so it says
// how many Services kube-proxy has programmed.
func (k *KubeProxy) MapElements(ctx context.Context, family, name string) (int, error) {
	out, err := k.NFT(ctx, "-j", "list", "map", family, kubeProxyTable, name)
	if err != nil {
		return 0, err
	}
	var doc struct {
		Nftables []struct {
			Map *struct {
				Elem []json.RawMessage `json:"elem"`
			} `json:"map"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		return 0, fmt.Errorf("nft -j list map %s %s %s: %w", family, kubeProxyTable, name, err)
	}
	for _, o := range doc.Nftables {
		if o.Map != nil {
			return len(o.Map.Elem), nil
		}
	}
	return 0, fmt.Errorf("nft -j list map %s %s %s: no map in the output", family, kubeProxyTable, name)
}

// Pid is kube-proxy's PID.
func (k *KubeProxy) Pid() int { return k.proc.pid() }

// SyncCount is how many times kube-proxy has synced its rules so far, from its metrics.
func (k *KubeProxy) SyncCount(ctx context.Context) (int, error) {
	body, err := k.Metrics(ctx)
	if err != nil {
		return 0, err
	}
	n, err := metricValue(body, syncCountMetric, IPv4Series)
	return int(n), err
}

// IPv4Series selects the IPv4 sample of a metric kube-proxy keeps per IP family.
const IPv4Series = `ip_family="IPv4"`

// Metric is the value of one of kube-proxy's metrics: the sample whose labels include
// label, or the unlabelled one; 0 while it is not exported.
func (k *KubeProxy) Metric(ctx context.Context, name, label string) (float64, error) {
	body, err := k.Metrics(ctx)
	if err != nil {
		return 0, err
	}
	return metricValue(body, name, label)
}

// metricValue is the value of metric name in a Prometheus text exposition: the sample
// whose labels include label, or the unlabelled one. Absent is 0: kube-proxy exports a
// histogram only once it has observed something.
func metricValue(body, name, label string) (float64, error) {
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), name)
		if !ok {
			continue
		}
		if labels, after, ok := strings.Cut(rest, "}"); ok && strings.HasPrefix(labels, "{") {
			if !strings.Contains(labels, label) {
				continue
			}
			rest = after
		}
		if !strings.HasPrefix(rest, " ") {
			continue // another metric whose name starts with this one
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
		if err != nil {
			return 0, fmt.Errorf("metric %s: %w", name, err)
		}
		return v, nil
	}
	return 0, sc.Err()
}

// Metrics is kube-proxy's /metrics, fetched over a socket made inside its netns.
func (k *KubeProxy) Metrics(ctx context.Context) (string, error) {
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var conn net.Conn
			err := k.Netns.Do(func() error {
				var err error
				conn, err = (&net.Dialer{}).DialContext(ctx, network, addr)
				return err
			})
			return conn, err
		},
		DisableKeepAlives: true,
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+k.MetricsAddr+"/metrics", nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("kube-proxy metrics: %s", resp.Status)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	return string(b), err
}

// NFT runs nft with args inside kube-proxy's netns (e.g. "list", "map", "ip", "kube-proxy",
// "service-ips") and returns its output.
func (k *KubeProxy) NFT(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + k.Netns.Path, "nft"}, args...)...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("nft %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func port(hostPort string) string {
	_, p, _ := net.SplitHostPort(hostPort)
	return p
}

package kubeenv

import (
	"bufio"
	"context"
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
	"testing"
	"time"

	"github.com/podsock/podsock/test/testenv"
)

// KubeProxyOptions configures StartKubeProxy.
type KubeProxyOptions struct {
	// Netns is where kube-proxy runs and the only netns it programs: one the test made
	// with testenv.NewNetns, with a blackhole route for the service range (checked).
	Netns    *testenv.Netns
	NodeName string   // --hostname-override; the Node object is the test's to create
	Args     []string // added last, so they override the defaults
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
}

const (
	kubeProxyMetrics = "127.0.0.1:10249" // inside the netns, so no clash with the host
	kubeProxyHealthz = "127.0.0.1:10256"
	syncCountMetric  = "kubeproxy_sync_proxy_rules_duration_seconds_count"
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
// nftables rules. Its cleanup stops kube-proxy, then the relay, by their PIDs.
//
// Privileged: run under `flock /tmp/podsock-priv.lock`, like every privileged suite here.
func (s *Server) StartKubeProxy(t testing.TB, opts KubeProxyOptions) *KubeProxy {
	t.Helper()
	RequireKubeProxy(t)
	if opts.Netns == nil || opts.NodeName == "" {
		t.Fatal("kubeenv: StartKubeProxy needs a Netns and a NodeName")
	}
	// What kube-proxy programs would send to ClusterIPs: never out of this netns.
	opts.Netns.RequireBlackholes(t, []string{s.ServiceCIDR.String()})
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
		"EXEC:nsenter --net="+host+" socat STDIO TCP:"+apiAddr)
	if err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	// Registered first, so it runs after kube-proxy's stop and its connections are gone.
	t.Cleanup(func() {
		if err := k.relay.stop(); err != nil {
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
		if t.Failed() {
			t.Logf("kubeenv: last lines of %s:\n%s", k.proc.logPath, k.proc.logTail(logTailLines))
		}
		if err := k.proc.stop(); err != nil {
			t.Errorf("kubeenv: %v", err)
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
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

// Pid is kube-proxy's PID.
func (k *KubeProxy) Pid() int { return k.proc.pid() }

// SyncCount is how many times kube-proxy has synced its rules so far, from its metrics.
func (k *KubeProxy) SyncCount(ctx context.Context) (int, error) {
	body, err := k.Metrics(ctx)
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), syncCountMetric+" "); ok {
			return strconv.Atoi(strings.TrimSpace(v))
		}
	}
	return 0, nil // not exported before the first sync
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

package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/podsock/podsock/test/testenv"
)

// shippedFile reads a file of deploy/ as it is shipped.
func shippedFile(t *testing.T, parts ...string) string {
	t.Helper()
	root, err := testenv.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(append([]string{root, "deploy"}, parts...)...))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// setKey replaces the one line `key = ...` of a shipped TOML file: what a test must change
// (its cgroup root, pins, state dir, a free port), and nothing else.
func setKey(t *testing.T, text, key, value string) string {
	t.Helper()
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(key) + ` = .*$`)
	if n := len(re.FindAllStringIndex(text, -1)); n != 1 {
		t.Fatalf("shipped config has %d lines setting %s, want 1", n, key)
	}
	return re.ReplaceAllLiteralString(text, key+" = "+value)
}

// freeLoopbackPort is a port on 127.0.0.1 nothing listens on right now.
func freeLoopbackPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// httpGet answers the status and body of GET url, or the error.
func httpGet(url string) (int, string, error) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// waitHTTP waits until GET url answers code with a body containing want.
func waitHTTP(t *testing.T, timeout time.Duration, url string, code int, want string) string {
	t.Helper()
	var got int
	var body string
	var err error
	if !testenv.WaitFor(timeout, func() bool {
		got, body, err = httpGet(url)
		return err == nil && got == code && strings.Contains(body, want)
	}) {
		t.Fatalf("GET %s: %d %.300q %v; want %d with %q", url, got, body, err, code, want)
	}
	return body
}

func quoted(s string) string { return fmt.Sprintf("%q", s) }

// The real agent serves /metrics, /healthz and /readyz on loopback. With NRI on and no
// runtime answering, it is healthy (datapath attached, its pins) but not ready, and says
// it waits for the first Synchronize; started again with NRI off, it is ready once its
// config applied. SIGHUP reloads are counted, ok and failed, and a changed listen address
// is not taken live (the old one keeps answering).
func TestPrivilegedAgentMetricsAndHealth(t *testing.T) {
	w := newWorld(t)
	addr := freeLoopbackPort(t)
	metrics := fmt.Sprintf("[metrics]\nlisten = %q\n\n", addr)
	nowhere := filepath.Join(t.TempDir(), "no-runtime.sock")
	writeAgentConfig(t, w.cfgPath, w.cg.Path, w.bpffs, w.stateDir,
		fmt.Sprintf("[nri]\nenabled = true\nsocket = %q\n\n", nowhere)+metrics+webService(`"10.88.0.5:8080"`))
	a := w.startAgent()
	base := "http://" + addr
	waitHTTP(t, 5*time.Second, base+"/healthz", 200, "ok")
	waitHTTP(t, 5*time.Second, base+"/readyz", 503, "waiting for the runtime's first NRI Synchronize\n")
	body := waitHTTP(t, 5*time.Second, base+"/metrics", 200, "\npodsock_services 1\n")
	for _, want := range []string{"\npodsock_ready 0\n", "\npodsock_nri_connected 0\n", "\npodsock_backends 1\n",
		`podsock_bpf_map_capacity{map="podsock_svc_v1"} 32768`, `podsock_datapath_operations_total{op="connect",verdict="balanced"} `,
		`podsock_build_info{version="`, `podsock_sync_duration_seconds_count{source="file"} 1`} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if st, err := w.status(); err != nil || st.Ready || st.ReadyReason != "waiting for the runtime's first NRI Synchronize" || st.MetricsListen != addr {
		t.Errorf("status: ready %v %q, metrics_listen %q, %v", st.Ready, st.ReadyReason, st.MetricsListen, err)
	}
	a.cmd.Process.Signal(syscall.SIGTERM)
	a.cmd.Wait()

	w.writeConfig(metrics + webService(`"10.88.0.5:8080"`))
	a = w.startAgent()
	waitHTTP(t, 5*time.Second, base+"/readyz", 200, "ok")
	w.writeConfig(metrics + webService(`"10.88.0.5:8080"`) + "bogus = 1\n")
	a.cmd.Process.Signal(syscall.SIGHUP)
	waitHTTP(t, 5*time.Second, base+"/metrics", 200, `podsock_config_reloads_total{result="failed"} 1`)
	other := freeLoopbackPort(t)
	w.writeConfig(fmt.Sprintf("[metrics]\nlisten = %q\n\n", other) + webService(`"10.88.0.6:8080"`))
	a.cmd.Process.Signal(syscall.SIGHUP)
	waitHTTP(t, 5*time.Second, base+"/metrics", 200, `podsock_config_reloads_total{result="ok"} 1`)
	if _, _, err := httpGet("http://" + other + "/healthz"); err == nil {
		t.Errorf("a reload moved the metrics endpoint to %s; listen takes a restart", other)
	}
	if !strings.Contains(a.logText(), "metrics.listen changed from") {
		t.Errorf("no warning that metrics.listen takes a restart:\n%s", a.logText())
	}
	// Nothing but loopback: the endpoint is not on the wildcard address.
	if _, port, _ := net.SplitHostPort(addr); port != "" {
		if c, err := net.DialTimeout("tcp", net.JoinHostPort("::1", port), time.Second); err == nil {
			c.Close()
			t.Errorf("metrics answer on [::1]:%s too; listen is 127.0.0.1 only", port)
		}
	}
}

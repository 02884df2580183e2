// Package e2e runs the real podsock binary against the real kernel: an agent subprocess
// serves a child cgroup, clients and backends live in a netns the test creates.
package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/test/testenv"
)

var podsockBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "podsock-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// The not-root test runs the binary as nobody.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	podsockBin = filepath.Join(dir, "podsock")
	out, err := exec.Command("go", "build", "-o", podsockBin, "github.com/podsock/podsock/cmd/podsock").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build podsock: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

var (
	vipRanges = []string{"10.96.0.0/12", "fd00:96::/108"}
	webVIP    = netip.MustParseAddrPort("10.96.0.20:80")
	beA       = netip.MustParseAddrPort("10.88.0.5:8080")
	beB       = netip.MustParseAddrPort("10.88.0.6:8080")
)

// world is one test's cgroup, netns, bpffs, state dir and config file.
type world struct {
	t        *testing.T
	cg       *testenv.Cgroup
	ns       *testenv.Netns
	bpffs    string
	stateDir string
	cfgPath  string
}

func newWorld(t *testing.T) *world {
	testenv.RequirePrivileged(t)
	w := &world{t: t}
	w.cg = testenv.NewCgroup(t)
	w.ns = testenv.NewNetns(t, vipRanges, "10.88.0.5/32", "10.88.0.6/32")
	w.bpffs = testenv.BPFFS(t)
	dir, err := os.MkdirTemp("", "podsock-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	w.stateDir = filepath.Join(dir, "state")
	w.cfgPath = filepath.Join(dir, "podsock.toml")
	w.cg.EnterSelf(t)
	if _, err := testenv.DialTCP(w.ns, 0, webVIP, false); !testenv.IsUnreachable(err) {
		t.Fatalf("VIP %s did not fail locally before podsock runs (%v): the test would prove nothing", webVIP, err)
	}
	t.Cleanup(func() { podsockCleanup(t, w.cfgPath) })
	return w
}

// podsockCleanup runs `podsock cleanup`: whatever a test did, nothing stays attached or
// pinned.
func podsockCleanup(t *testing.T, cfgPath string) {
	out, err := exec.Command(podsockBin, "cleanup", "--config", cfgPath).CombinedOutput()
	if err != nil && !strings.Contains(string(out), "no such file") {
		t.Logf("cleanup: %v: %s", err, out)
	}
}

// writeAgentConfig writes a config with a test's [agent] section, followed by rest.
func writeAgentConfig(t *testing.T, path, cgroupRoot, bpffs, stateDir, rest string) {
	t.Helper()
	cfg := fmt.Sprintf(`[agent]
cgroup_root = %q
bpffs = %q
state_dir = %q
log_level = "debug"

%s`, cgroupRoot, bpffs, stateDir, rest)
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (w *world) writeConfig(services string) {
	w.t.Helper()
	writeAgentConfig(w.t, w.cfgPath, w.cg.Path, w.bpffs, w.stateDir, "[nri]\nenabled = false\n\n"+services)
}

func webService(backends ...string) string {
	return fmt.Sprintf(`[[service]]
name = "default/web"
vip = "10.96.0.20"
port = 80
protocol = "tcp"
backends = [%s]
`, strings.Join(backends, ", "))
}

// agentProc is a running `podsock run`.
type agentProc struct {
	cmd *exec.Cmd
	log *bytes.Buffer
	mu  *sync.Mutex
}

func (w *world) startAgent() *agentProc {
	w.t.Helper()
	return startAgent(w.t, w.cfgPath)
}

// startAgent runs `podsock run --config cfgPath` until the test ends, and waits until its
// datapath is attached.
func startAgent(t *testing.T, cfgPath string) *agentProc {
	t.Helper()
	var log bytes.Buffer
	mu := &sync.Mutex{}
	cmd := exec.Command(podsockBin, "run", "--config", cfgPath)
	cmd.Stdout = &lockedWriter{w: &log, mu: mu}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	a := &agentProc{cmd: cmd, log: &log, mu: mu}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
		}
		if t.Failed() {
			t.Logf("agent log:\n%s", a.logText())
		}
	})
	if !testenv.WaitFor(10*time.Second, func() bool {
		st, err := agentStatus(cfgPath)
		return err == nil && st.Datapath.Attached
	}) {
		t.Fatalf("agent did not come up:\n%s", a.logText())
	}
	return a
}

// kill ends the agent with SIGKILL and waits for it.
func (a *agentProc) kill() {
	a.cmd.Process.Signal(syscall.SIGKILL)
	a.cmd.Wait()
}

func (a *agentProc) logText() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.log.String()
}

type lockedWriter struct {
	w  *bytes.Buffer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func (w *world) status() (api.Status, error) { return agentStatus(w.cfgPath) }

func agentStatus(cfgPath string) (api.Status, error) {
	var st api.Status
	out, err := exec.Command(podsockBin, "status", "--json", "--config", cfgPath).Output()
	if err != nil {
		return st, fmt.Errorf("status: %w: %s", err, out)
	}
	return st, json.Unmarshal(out, &st)
}

func (w *world) connects(n int) map[string]int {
	w.t.Helper()
	got := map[string]int{}
	for i := range n {
		r, err := testenv.DialTCP(w.ns, 0, webVIP, false)
		if err != nil {
			w.t.Fatalf("connect %d through the VIP: %v", i, err)
		}
		if r.Peer != webVIP {
			w.t.Fatalf("getpeername = %s, want the VIP", r.Peer)
		}
		got[r.Backend]++
	}
	return got
}

func TestPrivilegedAgentReloadRemovesBackend(t *testing.T) {
	w := newWorld(t)
	testenv.StartTCPBackend(t, w.ns, "A", beA)
	testenv.StartTCPBackend(t, w.ns, "B", beB)
	w.writeConfig(webService(`"10.88.0.5:8080"`, `"10.88.0.6:8080"`))
	a := w.startAgent()

	if got := w.connects(100); got["A"] == 0 || got["B"] == 0 {
		t.Fatalf("before reload both backends should answer, got %v", got)
	}

	// A broken config is rejected with its line, and the running one stays in force.
	w.writeConfig(webService(`"10.88.0.5:8080"`) + "bogus = 1\n")
	cfgText, _ := os.ReadFile(w.cfgPath)
	badLine := fmt.Sprintf("%s:%d:", w.cfgPath, strings.Count(string(cfgText), "\n"))
	a.cmd.Process.Signal(syscall.SIGHUP)
	if !testenv.WaitFor(5*time.Second, func() bool {
		st, err := w.status()
		return err == nil && st.LastReloadError != ""
	}) {
		t.Fatal("bad reload was not reported in status")
	}
	st, _ := w.status()
	if st.ConfigGeneration != 1 || !strings.Contains(st.LastReloadError, badLine) {
		t.Fatalf("after a bad reload: generation %d, error %q; want 1 and %s", st.ConfigGeneration, st.LastReloadError, badLine)
	}
	if !strings.Contains(a.logText(), badLine) {
		t.Fatalf("agent log does not name the bad file and line:\n%s", a.logText())
	}
	if got := w.connects(50); got["A"] == 0 || got["B"] == 0 {
		t.Fatalf("after a rejected reload both backends should still answer, got %v", got)
	}

	w.writeConfig(webService(`"10.88.0.5:8080"`))
	a.cmd.Process.Signal(syscall.SIGHUP)
	if !testenv.WaitFor(5*time.Second, func() bool {
		st, err := w.status()
		return err == nil && st.ConfigGeneration == 2
	}) {
		t.Fatalf("reload was not applied:\n%s", a.logText())
	}
	if got := w.connects(200); got["B"] != 0 || got["A"] != 200 {
		t.Fatalf("after removing B: %v, want all 200 on A", got)
	}
}

func TestPrivilegedAgentKill9KeepsServingAndRestartAdopts(t *testing.T) {
	w := newWorld(t)
	testenv.StartTCPBackend(t, w.ns, "A", beA)
	w.writeConfig(webService(`"10.88.0.5:8080"`))
	a := w.startAgent()

	// Clients keep connecting through the kill and the restart; none may fail.
	var failures, ok atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			r, err := testenv.DialTCP(w.ns, 0, webVIP, false)
			if err != nil || r.Backend != "A" {
				failures.Add(1)
				firstErr.CompareAndSwap(nil, fmt.Sprintf("%+v %v", r, err))
				continue
			}
			ok.Add(1)
		}
	}()

	a.cmd.Process.Signal(syscall.SIGKILL)
	a.cmd.Wait()
	before := ok.Load()
	if !testenv.WaitFor(5*time.Second, func() bool { return ok.Load() > before+100 }) {
		t.Fatalf("clients made no progress with the agent dead (failures %d, first %v)", failures.Load(), firstErr.Load())
	}
	if _, err := w.status(); err == nil {
		t.Fatal("status answered with the agent dead")
	}
	w.startAgent()
	before = ok.Load()
	if !testenv.WaitFor(5*time.Second, func() bool { return ok.Load() > before+100 }) {
		t.Fatalf("clients made no progress after the restart (failures %d, first %v)", failures.Load(), firstErr.Load())
	}
	close(stop)
	<-done

	if n := failures.Load(); n > 0 {
		t.Fatalf("%d of %d connects failed across kill -9 and restart; first: %v", n, n+ok.Load(), firstErr.Load())
	}
	st, err := w.status()
	if err != nil {
		t.Fatal(err)
	}
	if st.Datapath.AdoptedLinks != 9 {
		t.Fatalf("restarted agent adopted %d links, want 9", st.Datapath.AdoptedLinks)
	}
	out, err := exec.Command("bpftool", "cgroup", "show", w.cg.Path).CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool: %v: %s", err, out)
	}
	if n := strings.Count(string(out), "podsock_"); n != 9 {
		t.Fatalf("%d podsock programs attached to the cgroup after restart, want 9:\n%s", n, out)
	}
}

func TestPrivilegedAgentSigtermLeavesDatapathAndCleanupRemovesIt(t *testing.T) {
	w := newWorld(t)
	testenv.StartTCPBackend(t, w.ns, "A", beA)
	w.writeConfig(webService(`"10.88.0.5:8080"`))
	a := w.startAgent()

	a.cmd.Process.Signal(syscall.SIGTERM)
	if err := a.cmd.Wait(); err != nil {
		t.Fatalf("agent exit on SIGTERM: %v", err)
	}
	if r, err := testenv.DialTCP(w.ns, 0, webVIP, false); err != nil || r.Backend != "A" {
		t.Fatalf("after SIGTERM the pinned datapath should keep serving: %+v %v", r, err)
	}
	if _, err := os.Stat(filepath.Join(w.stateDir, api.SocketName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("control socket left behind after SIGTERM: %v", err)
	}

	out, err := exec.Command(podsockBin, "cleanup", "--config", w.cfgPath).CombinedOutput()
	if err != nil {
		t.Fatalf("cleanup: %v: %s", err, out)
	}
	bt, _ := exec.Command("bpftool", "cgroup", "show", w.cg.Path).CombinedOutput()
	if strings.Contains(string(bt), "podsock_") {
		t.Fatalf("programs still attached after cleanup:\n%s", bt)
	}
	entries, _ := os.ReadDir(w.bpffs)
	for _, e := range entries {
		if e.Name() == "podsock" {
			t.Fatal("pins left under bpffs after cleanup")
		}
	}
	if _, err := testenv.DialTCP(w.ns, 0, webVIP, false); !testenv.IsUnreachable(err) {
		t.Fatalf("VIP after cleanup: %v, want the blackhole's local refusal", err)
	}
}

func TestPrivilegedAgentZeroBackendsRefuses(t *testing.T) {
	w := newWorld(t)
	w.writeConfig(webService())
	w.startAgent()
	start := time.Now()
	_, err := testenv.DialTCP(w.ns, 0, webVIP, false)
	if !errors.Is(err, unix.ECONNREFUSED) || time.Since(start) > 100*time.Millisecond {
		t.Fatalf("connect to a service without backends: %v after %v, want ECONNREFUSED at once", err, time.Since(start))
	}
}

// Fatal start-up problems end the agent with one clear line and a non-zero exit.
func TestPrivilegedAgentFatalErrorsAreOneLine(t *testing.T) {
	w := newWorld(t)
	w.writeConfig(webService(`"10.88.0.5:8080"`))

	run := func(t *testing.T, cfg string, cred *syscall.Credential) string {
		t.Helper()
		cmd := exec.Command(podsockBin, "run", "--config", cfg)
		if cred != nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		}
		out, err := cmd.CombinedOutput()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() == 0 {
			t.Fatalf("agent should fail, got %v: %s", err, out)
		}
		msg := strings.TrimSpace(string(out))
		if strings.Count(msg, "\n") != 0 {
			t.Fatalf("fatal error is not one line:\n%s", msg)
		}
		return msg
	}

	t.Run("not root", func(t *testing.T) {
		if err := os.Chmod(filepath.Dir(w.cfgPath), 0o755); err != nil {
			t.Fatal(err)
		}
		msg := run(t, w.cfgPath, &syscall.Credential{Uid: 65534, Gid: 65534})
		if !strings.Contains(msg, "root") {
			t.Fatalf("got %q, want a line about root", msg)
		}
	})
	t.Run("cgroup root is not cgroup v2", func(t *testing.T) {
		bad := filepath.Join(filepath.Dir(w.cfgPath), "bad.toml")
		cfg, _ := os.ReadFile(w.cfgPath)
		cfg = bytes.Replace(cfg, []byte(w.cg.Path), []byte(os.TempDir()), 1)
		os.WriteFile(bad, cfg, 0o644)
		if msg := run(t, bad, nil); !strings.Contains(msg, "not a cgroup v2 directory") {
			t.Fatalf("got %q", msg)
		}
	})
	t.Run("bad config names file and line", func(t *testing.T) {
		bad := filepath.Join(filepath.Dir(w.cfgPath), "bad.toml")
		os.WriteFile(bad, []byte("[agent]\nlog_level = \"loud\"\n"), 0o644)
		if msg := run(t, bad, nil); !strings.Contains(msg, bad+":2:") {
			t.Fatalf("got %q, want %s:2", msg, bad)
		}
	})
}

// With nothing mounted at agent.bpffs, the agent mounts bpffs there itself.
func TestPrivilegedAgentMountsBPFFSWhenMissing(t *testing.T) {
	w := newWorld(t)
	testenv.StartTCPBackend(t, w.ns, "A", beA)
	plain, err := os.MkdirTemp("", "podsock-e2e-nobpffs-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unix.Unmount(plain, unix.MNT_DETACH)
		os.Remove(plain)
	})
	w.bpffs = plain
	w.writeConfig(webService(`"10.88.0.5:8080"`))
	w.startAgent()
	var fs unix.Statfs_t
	if err := unix.Statfs(plain, &fs); err != nil || fs.Type != unix.BPF_FS_MAGIC {
		t.Fatalf("%s is not bpffs after the agent started (type %x, %v)", plain, fs.Type, err)
	}
	if _, err := os.Stat(filepath.Join(plain, "podsock", "links", "connect4")); err != nil {
		t.Fatalf("links not pinned in the mounted bpffs: %v", err)
	}
	if r, err := testenv.DialTCP(w.ns, 0, webVIP, false); err != nil || r.Backend != "A" {
		t.Fatalf("connect through the VIP: %+v %v", r, err)
	}
}

// The agent killed with SIGKILL 20 times (200 under `make soak`), each time restarted,
// under a steady load of TCP connects, connected-UDP and unconnected-UDP exchanges through
// the VIPs from three netns: no operation fails and no reply shows a wrong source.
func TestPrivilegedAgentKill9RepeatedUnderLoad(t *testing.T) {
	w := newWorld(t)
	dnsVIP := netip.MustParseAddrPort("10.96.0.53:53")
	dnsA := netip.MustParseAddrPort("10.88.0.5:5353")
	nss := []*testenv.Netns{w.ns}
	for range 2 {
		nss = append(nss, testenv.NewNetns(t, vipRanges, "10.88.0.5/32", "10.88.0.6/32"))
	}
	for _, ns := range nss {
		testenv.StartTCPBackend(t, ns, "A", beA)
		testenv.StartUDPBackend(t, ns, "dnsA", dnsA)
	}
	w.writeConfig(webService(`"10.88.0.5:8080"`) + `
[[service]]
name = "kube-system/dns"
vip = "10.96.0.53"
port = 53
protocol = "udp"
backends = ["10.88.0.5:5353"]
`)
	a := w.startAgent()

	var ops, failures atomic.Int64
	var firstErr atomic.Value
	failed := func(what string) {
		failures.Add(1)
		firstErr.CompareAndSwap(nil, what)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	load := func(fn func() error) {
		testenv.Repeat(stop, &wg, func() {
			if err := fn(); err != nil {
				failed(err.Error())
				return
			}
			ops.Add(1)
		})
	}
	for _, ns := range nss {
		load(func() error {
			r, err := testenv.DialTCP(ns, 0, webVIP, false)
			if err != nil || r.Backend != "A" || r.Peer != webVIP {
				return fmt.Errorf("tcp from %s: %+v: %w", ns.Name, r, errOr(err))
			}
			return nil
		})
		for _, connected := range []bool{false, true} {
			load(func() error {
				fd, err := testenv.Socket(ns, unix.AF_INET, unix.SOCK_DGRAM)
				if err != nil {
					return err
				}
				defer unix.Close(fd)
				to := dnsVIP
				if connected {
					if err := unix.Connect(fd, testenv.Sockaddr(unix.AF_INET, dnsVIP)); err != nil {
						return fmt.Errorf("connect udp from %s: %w", ns.Name, err)
					}
					to = netip.AddrPort{}
				}
				r, err := testenv.UDPExchange(fd, unix.AF_INET, to)
				if err != nil || r.Backend != "dnsA" || r.From != dnsVIP {
					return fmt.Errorf("udp (connected %v) from %s: %+v, want dnsA from the VIP: %w", connected, ns.Name, r, errOr(err))
				}
				return nil
			})
		}
	}
	progress := func(what string) {
		t.Helper()
		before := ops.Load()
		if !testenv.WaitFor(5*time.Second, func() bool { return ops.Load() > before+30 }) {
			t.Fatalf("no progress %s (failures %d, first %v)", what, failures.Load(), firstErr.Load())
		}
	}
	kills := testenv.Rounds(20)
	start := time.Now()
	for i := range kills {
		a.kill()
		progress(fmt.Sprintf("with the agent dead (kill %d)", i+1))
		a = w.startAgent()
		progress(fmt.Sprintf("after restart %d", i+1))
	}
	close(stop)
	wg.Wait()
	t.Logf("%d kill -9 and restarts in %v under load: %d operations (TCP, connected and unconnected UDP, 3 netns), %d failed",
		kills, time.Since(start).Round(time.Millisecond), ops.Load(), failures.Load())
	if n := failures.Load(); n > 0 {
		t.Fatalf("%d operations failed or showed a wrong source; first: %v", n, firstErr.Load())
	}
}

// errOr is err, or an error saying there was none: for reports of a wrong answer.
func errOr(err error) error {
	if err == nil {
		return errors.New("no error")
	}
	return err
}

// Package cri runs a real, private container runtime, containerd or CRI-O (with NRI, runc
// and CNI bridge networking), for end-to-end tests, benchmarks and the demo, and drives it
// with crictl like a kubelet would.
//
// Everything it creates is private to one Runtime and removed by its cleanup, even when a
// test fails: state dir, sockets, bridge, pod subnet, pod cgroups, CNI results, mounts.
//
// Safety (see SPEC.md): the CNI network routes only the pod subnet (no default route, no
// masquerade), and every pod netns gets a blackhole route for the VIP range before any
// workload can send; RunPod checks both and fails the test otherwise.
package cri

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/internal/cgroupfs"
	"github.com/podsock/podsock/test/testenv"
)

// Kind names a container runtime the harness can run.
type Kind string

const (
	Containerd Kind = "containerd" // containerd v2 with its runc shim
	CRIO       Kind = "crio"       // CRI-O with conmon and runc
)

// Kinds are the runtimes every real-runtime scenario runs under.
var Kinds = []Kind{Containerd, CRIO}

// engine is what differs between the runtimes: their own configuration, daemon, image
// import, pod and container settings and helper processes. Everything else (CNI, crictl,
// pods, safety checks, cleanup) is the harness's, the same for both.
type engine interface {
	// tools are the binaries it needs in bin/.
	tools() []string
	// socket is the CRI socket the daemon serves.
	socket(r *Runtime) string
	// writeConfig writes the runtime's own configuration into the state dir.
	writeConfig(r *Runtime) error
	// command is the daemon, configured from the state dir only.
	command(r *Runtime) *exec.Cmd
	// loadImage makes the OCI archive usable by CRI. It is called once before the daemon
	// starts and once after; each engine acts in the one it needs.
	loadImage(r *Runtime, archive string, running bool) error
	// podLinux and containerLinux adjust the "linux" section of the CRI pod sandbox and
	// container configs.
	podLinux(linux map[string]any)
	containerLinux(linux map[string]any)
	// helpers are the PIDs of this runtime's per-container helpers still alive (shims,
	// monitors), which a failed teardown may leave behind.
	helpers(r *Runtime) []int
}

func engineFor(k Kind) (engine, error) {
	switch k {
	case Containerd, "":
		return containerd{}, nil
	case CRIO:
		return crio{}, nil
	}
	return nil, fmt.Errorf("unknown runtime %q (want %v)", k, Kinds)
}

// Options configures a Runtime. The zero value is a containerd with NRI on a private socket
// and no pre-registered plugins.
type Options struct {
	Runtime          Kind          // "" is Containerd
	NRISocket        string        // where the runtime's NRI listens; default <state dir>/nri.sock
	NRIPluginDir     string        // plugin_path for pre-registered plugins; "" = an empty private dir
	NRIPluginConfDir string        // plugin_config_path; "" = an empty private dir
	NRITimeout       time.Duration // plugin_request_timeout; default 2s
	VIPRange         netip.Prefix  // blackholed inside every pod netns; default 10.96.0.0/16
	// BeforeStart runs once the runtime's paths are chosen and just before the daemon
	// starts, e.g. to install a pre-registered plugin that needs CgroupRoot.
	BeforeStart func(*Runtime) error
}

// Runtime is one private containerd or CRI-O and everything it set up.
type Runtime struct {
	kind       Kind
	eng        engine
	id         string // 8 hex digits naming the bridge, the CNI network and the cgroup root
	dir        string // state dir; every path below lives under it
	bin        string // <repo>/bin
	opts       Options
	subnet     netip.Prefix
	bridge     string
	cgroupRoot string
	runc       string
	// libcni caches results in /var/lib/cni whatever the runtime is told; remove the
	// (empty) directories at Stop only if this runtime created them.
	cniCacheExisted bool

	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{}
	pods    map[string]*Pod
	stopped bool
}

// PodSpec is what RunPod needs; empty Namespace is "default", empty UID a random one.
type PodSpec struct {
	Name, Namespace, UID string
	Labels, Annotations  map[string]string
}

// Pod is a running pod sandbox.
type Pod struct {
	ID, Name, Namespace, UID string
	NetnsPath                string
	IP                       netip.Addr
	CgroupParent             string // as given to the runtime: absolute within the cgroup2 mount
	SandboxPid               int
	// RunDuration is how long `crictl runp` took: what the runtime (and its NRI plugins)
	// spent creating the sandbox.
	RunDuration time.Duration

	configPath string
	removed    bool
}

// Container is a started container of a pod.
type Container struct {
	ID         string
	Name       string
	Pod        *Pod
	Pid        int
	CgroupPath string // the "0::" line of /proc/PID/cgroup
	// StartDuration is how long `crictl create` and `crictl start` took together.
	StartDuration time.Duration
}

const (
	defaultVIPRange = "10.96.0.0/16"
	stopTimeout     = 10 * time.Second
	readyTimeout    = 30 * time.Second
	cniBinDir       = "/usr/lib/cni"
	cniCacheDir     = "/var/lib/cni"
)

// Require skips a test that needs the real runtime (containerd, or each kind given) when
// it cannot run here (not root, no cgroup v2, runtime not installed), and fails it instead
// when CI=true.
func Require(t testing.TB, kinds ...Kind) {
	t.Helper()
	if len(kinds) == 0 {
		kinds = []Kind{Containerd}
	}
	var err error
	for _, k := range kinds {
		if err = prerequisites(k); err != nil {
			break
		}
	}
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("real-runtime test cannot run in CI: %v", err)
		}
		t.Skipf("skipping real-runtime test: %v", err)
	}
}

func prerequisites(k Kind) error {
	eng, err := engineFor(k)
	if err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root")
	}
	if _, err := cgroupfs.Mount(); err != nil {
		return err
	}
	root, err := testenv.RepoRoot()
	if err != nil {
		return err
	}
	for _, b := range eng.tools() {
		if _, err := os.Stat(filepath.Join(root, "bin", b)); err != nil {
			return fmt.Errorf("bin/%s not built: run make deps", b)
		}
	}
	if _, err := runcPath(); err != nil {
		return fmt.Errorf("runc not installed: run make deps")
	}
	if k == CRIO {
		if _, err := os.Stat(conmonPath); err != nil {
			return fmt.Errorf("conmon not installed: run make deps")
		}
		if _, err := exec.LookPath("unshare"); err != nil {
			return errors.New("unshare not in PATH")
		}
	}
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(cniBinDir, p)); err != nil {
			return fmt.Errorf("CNI plugin %s not in %s: run make deps", p, cniBinDir)
		}
	}
	for _, tool := range []string{"ip", "nsenter", "go"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not in PATH", tool)
		}
	}
	return nil
}

func runcPath() (string, error) {
	if p, err := exec.LookPath("runc"); err == nil {
		return p, nil
	}
	// Debian installs it in /usr/sbin, which a non-login PATH may lack.
	if _, err := os.Stat("/usr/sbin/runc"); err != nil {
		return "", err
	}
	return "/usr/sbin/runc", nil
}

// Start brings up a private runtime of the kind opts names and registers the cleanup of
// everything it and its pods create.
func Start(t testenv.TB, opts Options) *Runtime {
	t.Helper()
	if opts.Runtime == "" {
		opts.Runtime = Containerd
	}
	eng, err := engineFor(opts.Runtime)
	if err != nil {
		t.Fatalf("start runtime: %v", err)
	}
	if err := prerequisites(opts.Runtime); err != nil {
		t.Fatalf("start runtime: %v", err)
	}
	root, err := testenv.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	runc, err := runcPath()
	if err != nil {
		t.Fatal(err)
	}
	if !opts.VIPRange.IsValid() {
		opts.VIPRange = netip.MustParsePrefix(defaultVIPRange)
	}
	if opts.NRITimeout == 0 {
		opts.NRITimeout = 2 * time.Second
	}
	id := randomHex(4)
	// Each kind names its own bridge, dirs and cgroups, so that a containerd and a CRI-O
	// of one test never share one and a leftover says whose it is.
	tag, bridge := "e2e", "psk"
	if opts.Runtime == CRIO {
		tag, bridge = "crio", "psc"
	}
	r := &Runtime{
		kind:       opts.Runtime,
		eng:        eng,
		id:         id,
		dir:        "/run/podsock-" + tag + "-" + id,
		bin:        filepath.Join(root, "bin"),
		opts:       opts,
		bridge:     bridge + id,
		cgroupRoot: "/podsock-" + tag + "-" + id,
		runc:       runc,
		pods:       map[string]*Pod{},
	}
	if _, err := os.Stat(cniCacheDir); err == nil {
		r.cniCacheExisted = true
	}
	if err := os.Mkdir(r.dir, 0o700); err != nil {
		t.Fatalf("start runtime: %v", err)
	}
	t.Cleanup(func() { r.Stop(t) })

	if r.opts.NRISocket == "" {
		r.opts.NRISocket = r.path("nri.sock")
	}
	if r.opts.NRIPluginDir == "" {
		r.opts.NRIPluginDir = r.path("nri-plugins")
	}
	if r.opts.NRIPluginConfDir == "" {
		r.opts.NRIPluginConfDir = r.path("nri-conf")
	}
	for _, d := range []string{r.opts.NRIPluginDir, r.opts.NRIPluginConfDir, r.path("net.d"), r.path("pods"), r.path("logs")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatalf("start runtime: %v", err)
		}
	}
	if r.subnet, err = pickSubnet(opts.Runtime, opts.VIPRange); err != nil {
		t.Fatalf("start runtime: %v", err)
	}
	t.Cleanup(func() { releaseSubnet(r.subnet) })
	if err := r.writeConfigs(); err != nil {
		t.Fatalf("start runtime: %v", err)
	}
	image := r.path("workload-image.tar")
	bin, err := BuildWorkload(r.dir)
	if err == nil {
		err = WriteImage(image, bin)
	}
	if err != nil {
		t.Fatalf("start runtime: %v", err)
	}
	if err := r.eng.loadImage(r, image, false); err != nil {
		t.Fatalf("start runtime: %v", err)
	}
	if r.opts.BeforeStart != nil {
		if err := r.opts.BeforeStart(r); err != nil {
			t.Fatalf("start runtime: %v", err)
		}
	}
	if err := r.startDaemon(); err != nil {
		r.fatalf(t, "start runtime: %v", err)
	}
	if err := r.eng.loadImage(r, image, true); err != nil {
		r.fatalf(t, "start runtime: %v", err)
	}
	// Wait until CRI can use the image (containerd's CRI plugin learns of it from events).
	if err := r.poll(readyTimeout, func() error {
		_, err := r.Crictl("inspecti", ImageName)
		return err
	}); err != nil {
		r.fatalf(t, "workload image not visible to CRI: %v", err)
	}
	return r
}

func (r *Runtime) path(name ...string) string {
	return filepath.Join(append([]string{r.dir}, name...)...)
}

// Kind is which runtime this is.
func (r *Runtime) Kind() Kind { return r.kind }

// NRISocket is where the runtime serves NRI: point the plugin under test here.
func (r *Runtime) NRISocket() string { return r.opts.NRISocket }

// CgroupRoot is the cgroup every pod of this runtime is below, absolute within the cgroup2
// mount: the agent's cgroup_root for tests.
func (r *Runtime) CgroupRoot() string { return r.cgroupRoot }

// Subnet is the pod network; nothing else is reachable from the pods.
func (r *Runtime) Subnet() netip.Prefix { return r.subnet }

// StateDir is the runtime's private directory (the daemon's log at <kind>.log).
func (r *Runtime) StateDir() string { return r.dir }

// claimedSubnets are the pod subnets of this process's runtimes. A runtime's bridge route
// appears only with its first pod, so two runtimes started before either runs a pod (two
// nodes of one test) would otherwise both find the same /24 free.
var claimedSubnets = struct {
	sync.Mutex
	set map[netip.Prefix]bool
}{set: map[netip.Prefix]bool{}}

func releaseSubnet(p netip.Prefix) {
	claimedSubnets.Lock()
	defer claimedSubnets.Unlock()
	delete(claimedSubnets.set, p)
}

// pickSubnet chooses and claims a /24 that no local route overlaps and no runtime of this
// process holds, so that parallel runtimes and the host's own networks never share
// addresses: containerd's in 10.244.64.0–10.244.191.0, CRI-O's in 10.244.192.0–10.244.255.0,
// so that the two kinds never share a range either.
func pickSubnet(k Kind, vips netip.Prefix) (netip.Prefix, error) {
	first, n := int64(64), int64(128)
	if k == CRIO {
		first, n = 192, 64
	}
	out, err := exec.Command("ip", "-4", "-o", "route", "show", "table", "all").Output()
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("list routes: %w", err)
	}
	var used []netip.Prefix
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		for _, s := range f {
			if p, err := netip.ParsePrefix(s); err == nil {
				used = append(used, p)
			} else if a, err := netip.ParseAddr(s); err == nil && a.Is4() {
				used = append(used, netip.PrefixFrom(a, 32))
			}
		}
	}
	used = append(used, vips)
	claimedSubnets.Lock()
	defer claimedSubnets.Unlock()
	for p := range claimedSubnets.set {
		used = append(used, p)
	}
	for range 50 {
		i, err := rand.Int(rand.Reader, big.NewInt(n))
		if err != nil {
			return netip.Prefix{}, err
		}
		cand := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(first + i.Int64()), 0}), 24)
		if !slices.ContainsFunc(used, cand.Overlaps) {
			claimedSubnets.set[cand] = true
			return cand, nil
		}
	}
	return netip.Prefix{}, fmt.Errorf("no free pod /24 in 10.244.%d.0-10.244.%d.255", first, first+n-1)
}

// writeConfigs writes the runtime's own configuration, and the CNI network and crictl
// configuration the harness gives both kinds.
func (r *Runtime) writeConfigs() error {
	if err := r.eng.writeConfig(r); err != nil {
		return err
	}
	// Only the pod subnet is routed: no default route (isDefaultGateway), no masquerade,
	// so nothing a pod sends can leave through the host. No gateway address either: pods
	// talk to each other over the bridge, and a gateway would make the plugin switch on
	// the host's ip_forward, which nothing would switch off again.
	cni := map[string]any{
		"cniVersion": "1.0.0",
		"name":       r.bridge,
		"plugins": []any{map[string]any{
			"type":             "bridge",
			"bridge":           r.bridge,
			"isGateway":        false,
			"isDefaultGateway": false,
			"ipMasq":           false,
			"hairpinMode":      true,
			"ipam": map[string]any{
				"type":    "host-local",
				"dataDir": r.path("ipam"),
				"ranges":  [][]map[string]string{{{"subnet": r.subnet.String()}}},
				"routes":  []any{},
			},
		}},
	}
	cniJSON, err := json.MarshalIndent(cni, "", "  ")
	if err != nil {
		return err
	}
	endpoint := "unix://" + r.eng.socket(r)
	crictl := fmt.Sprintf("runtime-endpoint: %s\nimage-endpoint: %s\ntimeout: 30\npull-image-on-create: false\n", endpoint, endpoint)
	for name, data := range map[string][]byte{
		"net.d/10-" + r.bridge + ".conflist": cniJSON,
		"crictl.yaml":                        []byte(crictl),
	} {
		if err := os.WriteFile(r.path(name), data, 0o600); err != nil {
			return fmt.Errorf("write %s: %w", name, err)
		}
	}
	return nil
}

func (r *Runtime) logPath() string { return r.path(string(r.kind) + ".log") }

func (r *Runtime) startDaemon() error {
	logf, err := os.OpenFile(r.logPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("start %s: %w", r.kind, err)
	}
	defer logf.Close()
	cmd := r.eng.command(r)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group: a ^C to the test must not kill the runtime before the
	// cleanup has removed the pods through it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", r.kind, err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	r.mu.Lock()
	r.cmd, r.exited = cmd, exited
	r.mu.Unlock()
	err = r.poll(readyTimeout, func() error {
		select {
		case <-exited:
			return errStop{fmt.Errorf("%s exited: %v", r.kind, cmd.ProcessState)}
		default:
		}
		_, err := r.Crictl("info")
		return err
	})
	if err != nil {
		return fmt.Errorf("%s not ready: %w", r.kind, err)
	}
	return nil
}

// errStop ends a poll early.
type errStop struct{ error }

func (r *Runtime) poll(timeout time.Duration, fn func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := fn()
		if err == nil {
			return nil
		}
		var stop errStop
		if errors.As(err, &stop) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stopDaemon sends SIGTERM to the runtime we started, and SIGKILL to that PID if it has
// not exited in time. Shims (or conmons) and pods keep running.
func (r *Runtime) stopDaemon() error {
	r.mu.Lock()
	cmd, exited := r.cmd, r.exited
	r.cmd = nil
	r.mu.Unlock()
	if cmd == nil {
		return nil
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("stop %s: %w", r.kind, err)
	}
	select {
	case <-exited:
		return nil
	case <-time.After(stopTimeout):
	}
	// Both are Go programs: SIGQUIT makes the runtime print every goroutine to the log
	// and exit, which says where it hung.
	cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case <-exited:
	case <-time.After(2 * time.Second):
		cmd.Process.Kill()
		<-exited
	}
	return fmt.Errorf("stop %s: pid %d ignored SIGTERM for %v; killed; its goroutines:\n%s: %w", r.kind, cmd.Process.Pid, stopTimeout, r.ownGoroutines(), errKilled)
}

// errKilled says the runtime hung on SIGTERM and was killed. CRI-O does, rarely, at a
// restart; what the tests check of podsock holds as well after a runtime killed outright
// (its pods keep running), so it is reported, not failed.
var errKilled = errors.New("the runtime had to be killed")

// reportKilled prints a hung runtime's goroutines and lets the test go on; any other error
// is returned.
func reportKilled(err error) error {
	if errors.Is(err, errKilled) {
		fmt.Fprintf(os.Stderr, "warning: %v\n", err)
		return nil
	}
	return err
}

// ownGoroutines is the runtime's SIGQUIT dump without the goroutines that run only Go's
// own code (GC workers, timers): what is left says where it hung.
func (r *Runtime) ownGoroutines() string {
	b, err := os.ReadFile(r.logPath())
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	log := string(b)
	if i := strings.LastIndex(log, "SIGQUIT"); i >= 0 {
		log = log[i:]
	}
	var out []string
	for _, g := range strings.Split(log, "\n\n") {
		if strings.HasPrefix(g, "goroutine ") && (strings.Contains(g, "github.com/cri-o/") || strings.Contains(g, "github.com/containerd/")) {
			out = append(out, g)
		}
	}
	if len(out) == 0 {
		return r.logTail(200)
	}
	return strings.Join(out, "\n\n")
}

// Restart stops the runtime and starts it again on the same state, as a runtime upgrade
// would: pods and containers keep running, NRI plugins must reconnect.
func (r *Runtime) Restart(t testenv.TB) {
	t.Helper()
	if err := reportKilled(r.stopDaemon()); err != nil {
		r.fatalf(t, "restart: %v", err)
	}
	if err := r.startDaemon(); err != nil {
		r.fatalf(t, "restart: %v", err)
	}
}

// Crictl runs crictl against this runtime and returns its stdout; the error carries stderr.
func (r *Runtime) Crictl(args ...string) ([]byte, error) {
	return r.crictlContext(context.Background(), args...)
}

func (r *Runtime) crictlContext(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(r.bin, "crictl"), append([]string{"--config", r.path("crictl.yaml")}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("crictl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// RunPod starts a pod sandbox, then makes its netns safe (blackhole for the VIP range) and
// checks it: no default route, the blackhole present, the address in the pod subnet.
func (r *Runtime) RunPod(t testenv.TB, spec PodSpec) *Pod {
	t.Helper()
	if spec.Namespace == "" {
		spec.Namespace = "default"
	}
	if spec.UID == "" {
		spec.UID = randomHex(8)
	}
	p := &Pod{
		Name:         spec.Name,
		Namespace:    spec.Namespace,
		UID:          spec.UID,
		CgroupParent: r.cgroupRoot + "/pod" + spec.UID,
		configPath:   r.path("pods", spec.UID+".json"),
	}
	logDir := r.path("logs", spec.UID)
	if err := os.MkdirAll(logDir, 0o700); err != nil {
		t.Fatalf("run pod %s: %v", spec.Name, err)
	}
	cfg := map[string]any{
		"metadata":      map[string]any{"name": spec.Name, "namespace": spec.Namespace, "uid": spec.UID},
		"hostname":      spec.Name,
		"log_directory": logDir,
		"labels":        spec.Labels,
		"annotations":   spec.Annotations,
		"linux":         map[string]any{"cgroup_parent": p.CgroupParent},
	}
	r.eng.podLinux(cfg["linux"].(map[string]any))
	if err := writeJSON(p.configPath, cfg); err != nil {
		t.Fatalf("run pod %s: %v", spec.Name, err)
	}
	begin := time.Now()
	out, err := r.Crictl("runp", p.configPath)
	p.RunDuration = time.Since(begin)
	if err != nil {
		r.fatalf(t, "run pod %s: %v", spec.Name, err)
	}
	p.ID = strings.TrimSpace(string(out))
	r.mu.Lock()
	r.pods[p.ID] = p
	r.mu.Unlock()
	t.Cleanup(func() {
		if err := r.removePod(p); err != nil {
			t.Errorf("%v", err)
		}
	})

	var info struct {
		Status struct {
			Network struct{ IP string } `json:"network"`
		} `json:"status"`
		Info struct {
			Pid         int `json:"pid"`
			RuntimeSpec struct {
				Linux struct {
					Namespaces []struct{ Type, Path string } `json:"namespaces"`
				} `json:"linux"`
			} `json:"runtimeSpec"`
		} `json:"info"`
	}
	if err := r.inspect("inspectp", p.ID, &info); err != nil {
		r.fatalf(t, "run pod %s: %v", spec.Name, err)
	}
	p.SandboxPid = info.Info.Pid
	for _, ns := range info.Info.RuntimeSpec.Linux.Namespaces {
		if ns.Type == "network" {
			p.NetnsPath = ns.Path
		}
	}
	if p.IP, err = netip.ParseAddr(info.Status.Network.IP); err != nil {
		r.fatalf(t, "run pod %s: no pod IP: %v", spec.Name, err)
	}
	if !r.subnet.Contains(p.IP) {
		r.fatalf(t, "run pod %s: IP %s outside the pod subnet %s", spec.Name, p.IP, r.subnet)
	}
	if p.NetnsPath == "" || !strings.HasPrefix(p.NetnsPath, r.dir+"/") {
		r.fatalf(t, "run pod %s: netns %q is not under the state dir", spec.Name, p.NetnsPath)
	}
	if out, err := r.nsIP(p, "route", "add", "blackhole", r.opts.VIPRange.String()); err != nil {
		r.fatalf(t, "run pod %s: add blackhole %s: %v: %s", spec.Name, r.opts.VIPRange, err, out)
	}
	if err := r.CheckPodNetwork(p); err != nil {
		r.fatalf(t, "run pod %s: %v", spec.Name, err)
	}
	return p
}

// CheckPodNetwork returns an error unless the pod netns has no default route (IPv4 and
// IPv6) and has the blackhole route for the VIP range: the conditions under which no
// packet from the pod can leave the machine.
func (r *Runtime) CheckPodNetwork(p *Pod) error {
	for _, fam := range []string{"-4", "-6"} {
		out, err := r.nsIP(p, fam, "route", "show", "default")
		if err != nil {
			return fmt.Errorf("pod %s routes: %w: %s", p.Name, err, out)
		}
		if len(bytes.TrimSpace(out)) != 0 {
			return fmt.Errorf("pod %s has a default route (%s): refusing to run traffic: %s", p.Name, fam, out)
		}
	}
	fam := "-4"
	if r.opts.VIPRange.Addr().Is6() {
		fam = "-6"
	}
	out, err := r.nsIP(p, fam, "route", "show", "type", "blackhole", "exact", r.opts.VIPRange.String())
	if err != nil {
		return fmt.Errorf("pod %s routes: %w: %s", p.Name, err, out)
	}
	if !strings.Contains(string(out), r.opts.VIPRange.String()) {
		return fmt.Errorf("pod %s has no blackhole route for %s", p.Name, r.opts.VIPRange)
	}
	return nil
}

func (r *Runtime) nsIP(p *Pod, args ...string) ([]byte, error) {
	return exec.Command("nsenter", append([]string{"--net=" + p.NetnsPath, "ip"}, args...)...).CombinedOutput()
}

func (r *Runtime) inspect(verb, id string, v any) error {
	out, err := r.Crictl(verb, "-o", "json", id)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(out, v); err != nil {
		return fmt.Errorf("crictl %s %s: %w", verb, id, err)
	}
	return nil
}

// StartContainer creates and starts a container running /workload with args in the pod.
// It returns once the process runs, not once it serves: see WaitLog.
func (r *Runtime) StartContainer(t testenv.TB, p *Pod, name string, args ...string) *Container {
	t.Helper()
	cfg := map[string]any{
		"metadata": map[string]any{"name": name},
		"image":    map[string]any{"image": ImageName},
		"command":  []string{"/workload"},
		"args":     args,
		"log_path": name + ".log",
		// The labels a kubelet puts on every container. CRI-O's NRI takes the container's
		// name from them (without them it reports none); containerd ignores them.
		"labels": map[string]string{
			"io.kubernetes.container.name": name,
			"io.kubernetes.pod.name":       p.Name,
			"io.kubernetes.pod.namespace":  p.Namespace,
			"io.kubernetes.pod.uid":        p.UID,
		},
		"linux": map[string]any{},
	}
	r.eng.containerLinux(cfg["linux"].(map[string]any))
	cfgPath := r.path("pods", p.UID+"-"+name+".json")
	if err := writeJSON(cfgPath, cfg); err != nil {
		t.Fatalf("container %s: %v", name, err)
	}
	begin := time.Now()
	out, err := r.Crictl("create", p.ID, cfgPath, p.configPath)
	if err != nil {
		r.fatalf(t, "create container %s in %s: %v", name, p.Name, err)
	}
	c := &Container{ID: strings.TrimSpace(string(out)), Name: name, Pod: p}
	if _, err := r.Crictl("start", c.ID); err != nil {
		r.fatalf(t, "start container %s in %s: %v", name, p.Name, err)
	}
	c.StartDuration = time.Since(begin)
	var info struct {
		Info struct {
			Pid int `json:"pid"`
		} `json:"info"`
	}
	if err := r.inspect("inspect", c.ID, &info); err != nil {
		r.fatalf(t, "container %s: %v", name, err)
	}
	c.Pid = info.Info.Pid
	if c.CgroupPath, err = testenv.CgroupOf(c.Pid); err != nil {
		r.fatalf(t, "container %s: %v", name, err)
	}
	return c
}

// Logs returns what the container wrote so far (stdout and stderr).
func (r *Runtime) Logs(c *Container) (string, error) {
	cmd := exec.Command(filepath.Join(r.bin, "crictl"), "--config", r.path("crictl.yaml"), "logs", c.ID)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("logs of %s: %w", c.Name, err)
	}
	return string(out), nil
}

// WaitLog waits until the container's log contains substr (e.g. "listening").
func (r *Runtime) WaitLog(t testenv.TB, c *Container, substr string, timeout time.Duration) {
	t.Helper()
	r.WaitLogAny(t, c, []string{substr}, timeout)
}

// WaitLogAny is WaitLog for a log that may show any one of substrs.
func (r *Runtime) WaitLogAny(t testenv.TB, c *Container, substrs []string, timeout time.Duration) {
	t.Helper()
	var last string
	err := r.poll(timeout, func() error {
		out, err := r.Logs(c)
		last = out
		if err != nil {
			return err
		}
		for _, s := range substrs {
			if strings.Contains(out, s) {
				return nil
			}
		}
		return fmt.Errorf("none of %q in the log yet", substrs)
	})
	if err != nil {
		r.fatalf(t, "container %s: %v; log:\n%s", c.Name, err, last)
	}
}

// Exec runs a command in the container and returns its stdout; err is non-nil when it
// exits non-zero or runs longer than timeout, and carries stderr. It uses the streaming
// exec, not --sync: crictl's ExecSync drops stdout when the exit code is not 0, and that
// stdout ("error=ECONNREFUSED ...") is what tests look at.
func (r *Runtime) Exec(t testenv.TB, c *Container, timeout time.Duration, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := r.crictlContext(ctx, append([]string{"exec", c.ID}, args...)...)
	if ctx.Err() != nil {
		err = fmt.Errorf("exec in %s: timed out after %v: %w", c.Name, timeout, err)
	}
	return string(out), err
}

// RemovePod stops and removes the pod and its containers.
func (r *Runtime) RemovePod(t testenv.TB, p *Pod) {
	t.Helper()
	if err := r.removePod(p); err != nil {
		r.fatalf(t, "%v", err)
	}
}

func (r *Runtime) removePod(p *Pod) error {
	r.mu.Lock()
	// After Stop the pod is gone with the runtime; a late per-pod cleanup has nothing to do.
	if p.removed || r.stopped {
		r.mu.Unlock()
		return nil
	}
	p.removed = true
	delete(r.pods, p.ID)
	r.mu.Unlock()
	if _, err := r.Crictl("stopp", p.ID); err != nil {
		return fmt.Errorf("stop pod %s: %w", p.Name, err)
	}
	if _, err := r.Crictl("rmp", p.ID); err != nil {
		return fmt.Errorf("remove pod %s: %w", p.Name, err)
	}
	return nil
}

// Stop removes every pod, stops the runtime and removes everything it created:
// mounts, bridge, cgroups, CNI results, state dir. It runs at cleanup; calling it earlier
// (e.g. to time the teardown) is fine.
func (r *Runtime) Stop(t testenv.TB) {
	t.Helper()
	r.mu.Lock()
	if r.stopped {
		r.mu.Unlock()
		return
	}
	r.stopped = true
	running := r.cmd != nil
	r.mu.Unlock()

	if f, ok := t.(interface {
		Failed() bool
		Logf(string, ...any)
	}); ok && f.Failed() {
		f.Logf("%s log (tail):\n%s", r.kind, r.logTail(60))
	}
	var errs []error
	if running {
		// Every sandbox, not only the ones RunPod recorded: a failed RunPod may have left one.
		out, err := r.Crictl("pods", "-q")
		if err != nil {
			errs = append(errs, err)
		}
		for _, id := range strings.Fields(string(out)) {
			if _, err := r.Crictl("stopp", id); err != nil {
				errs = append(errs, err)
			}
			if _, err := r.Crictl("rmp", "-f", id); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := reportKilled(r.stopDaemon()); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, r.killLeftovers()...)
	errs = append(errs, r.unmountAll()...)
	if _, err := os.Stat("/sys/class/net/" + r.bridge); err == nil {
		if out, err := exec.Command("ip", "link", "del", r.bridge).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("delete bridge %s: %w: %s", r.bridge, err, out))
		}
	}
	results, _ := filepath.Glob(filepath.Join(cniCacheDir, "results", r.bridge+"-*"))
	for _, f := range results {
		if err := os.Remove(f); err != nil {
			errs = append(errs, err)
		}
	}
	if !r.cniCacheExisted {
		// Fails harmlessly when another runtime has results there.
		os.Remove(filepath.Join(cniCacheDir, "results"))
		os.Remove(cniCacheDir)
	}
	errs = append(errs, r.removeCgroups()...)
	if err := os.RemoveAll(r.dir); err != nil {
		errs = append(errs, fmt.Errorf("remove state dir: %w", err))
	}
	for _, err := range errs {
		t.Errorf("stop runtime: %v", err)
	}
}

// killLeftovers kills, by PID, what a failed teardown could leave running: container
// processes in this runtime's cgroups and this runtime's shims or conmons.
func (r *Runtime) killLeftovers() []error {
	var errs []error
	for _, mnt := range cgroupMounts() {
		if !mnt.v2 {
			continue
		}
		filepath.WalkDir(filepath.Join(mnt.path, r.cgroupRoot), func(p string, d os.DirEntry, err error) error {
			if err != nil || d.Name() != "cgroup.procs" {
				return nil //nolint:nilerr // a vanished cgroup has nothing to kill
			}
			b, _ := os.ReadFile(p)
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					errs = append(errs, fmt.Errorf("container process %d still running; killed", pid))
					unix.Kill(pid, unix.SIGKILL)
				}
			}
			return nil
		})
	}
	for _, pid := range r.eng.helpers(r) {
		errs = append(errs, fmt.Errorf("%s helper %d still running; killed", r.kind, pid))
		unix.Kill(pid, unix.SIGKILL)
	}
	return errs
}

// mountsUnder lists the mount points below the state dir, deepest first.
func (r *Runtime) mountsUnder() []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var mnts []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && strings.HasPrefix(unescapeMount(fields[4]), r.dir+"/") {
			mnts = append(mnts, unescapeMount(fields[4]))
		}
	}
	slices.SortFunc(mnts, func(a, b string) int { return len(b) - len(a) })
	return mnts
}

func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func (r *Runtime) unmountAll() []error {
	var errs []error
	for _, m := range r.mountsUnder() {
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", m, err))
		}
	}
	return errs
}

type cgroupMount struct {
	path string
	v2   bool
}

// cgroupMounts lists the cgroup2 mount and every v1 hierarchy: on a hybrid host runc
// creates the pod cgroups in all of them.
func cgroupMounts() []cgroupMount {
	var mnts []cgroupMount
	if v2, err := cgroupfs.Mount(); err == nil {
		mnts = append(mnts, cgroupMount{path: v2, v2: true})
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return mnts
	}
	for _, line := range strings.Split(string(b), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		if !ok || !strings.HasPrefix(post, "cgroup ") {
			continue
		}
		if f := strings.Fields(pre); len(f) > 4 {
			mnts = append(mnts, cgroupMount{path: f[4]})
		}
	}
	return mnts
}

// removeCgroups removes this runtime's cgroup tree from every hierarchy, leaves first. A
// cgroup whose last process just died can stay busy for a moment, hence the retries.
func (r *Runtime) removeCgroups() []error {
	var errs []error
	for _, mnt := range cgroupMounts() {
		top := filepath.Join(mnt.path, r.cgroupRoot)
		err := r.poll(5*time.Second, func() error {
			var dirs []string
			filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
				if err == nil && d.IsDir() {
					dirs = append(dirs, p)
				}
				return nil
			})
			slices.SortFunc(dirs, func(a, b string) int { return len(b) - len(a) })
			var last error
			for _, d := range dirs {
				if err := unix.Rmdir(d); err != nil && !errors.Is(err, unix.ENOENT) {
					last = fmt.Errorf("remove cgroup %s: %w", d, err)
				}
			}
			return last
		})
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

// Leftovers lists what of this runtime still exists; empty after Stop.
func (r *Runtime) Leftovers() []string {
	var left []string
	left = append(left, r.mountsUnder()...)
	if _, err := os.Stat(r.dir); err == nil {
		left = append(left, r.dir)
	}
	if _, err := os.Stat("/sys/class/net/" + r.bridge); err == nil {
		left = append(left, "bridge "+r.bridge)
	}
	for _, mnt := range cgroupMounts() {
		if _, err := os.Stat(filepath.Join(mnt.path, r.cgroupRoot)); err == nil {
			left = append(left, filepath.Join(mnt.path, r.cgroupRoot))
		}
	}
	for _, pid := range r.eng.helpers(r) {
		left = append(left, fmt.Sprintf("%s helper pid %d", r.kind, pid))
	}
	results, _ := filepath.Glob(filepath.Join(cniCacheDir, "results", r.bridge+"-*"))
	left = append(left, results...)
	r.mu.Lock()
	if r.cmd != nil {
		left = append(left, fmt.Sprintf("%s pid %d", r.kind, r.cmd.Process.Pid))
	}
	r.mu.Unlock()
	return left
}

// fatalf fails the test with the tail of the runtime's log, which usually says why.
func (r *Runtime) fatalf(t testenv.TB, format string, args ...any) {
	t.Helper()
	t.Fatalf(format+"\n%s log (tail):\n%s", append(args, r.kind, r.logTail(30))...)
}

func (r *Runtime) logTail(n int) string {
	b, err := os.ReadFile(r.logPath())
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o600)
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

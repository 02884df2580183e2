// Command demo shows podsock's main job end to end on this machine: a private containerd
// (or, with -runtime crio, CRI-O) with NRI, podsock registered as its NRI plugin, two backend pods and a client pod. The
// client reaches the service VIP, both backends answer, podsock reports the pods with their
// exact cgroups and netns cookies and the client's sockets with their backend; a backend
// leaving the service aborts the connection the client held to it; and everything is torn
// down again. Run it as root: `make demo`.
package main

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/podsock/podsock/internal/cgroupfs"
	"github.com/podsock/podsock/test/cri"
	"github.com/podsock/podsock/test/testenv"
)

var (
	podsockBin  = flag.String("podsock", "bin/podsock", "podsock binary")
	runtimeKind = flag.String("runtime", string(cri.Containerd), "container runtime: containerd or crio")
	kubernetes  = flag.Bool("kubernetes", false, "take the service from a private Kubernetes API server (make demo-kubernetes)")
)

const (
	vipRange = "10.96.0.0/16"
	vip      = "10.96.0.20"
)

type demo struct {
	testenv.Standalone
	rt      *cri.Runtime
	cfgPath string
}

func main() {
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "demo: must run as root")
		os.Exit(1)
	}
	d := &demo{}
	if *kubernetes {
		d.Main("demo-kubernetes", d.runKubernetes)
		fmt.Println("\n==> demo done: API server, etcd, containerd, pods, bridge, cgroups, netns, pins and processes removed")
		return
	}
	d.Main("demo", d.run)
	fmt.Printf("\n==> demo done: %s, pods, bridge, cgroups, netns, pins and processes removed\n", *runtimeKind)
}

func step(format string, a ...any) { fmt.Printf("\n==> "+format+"\n", a...) }

func (d *demo) run() {
	start := time.Now()
	kind := cri.Kind(*runtimeKind)
	name := map[cri.Kind]string{cri.Containerd: "containerd v2", cri.CRIO: "CRI-O"}[kind]
	if name == "" {
		d.Fatalf("-runtime %q: want containerd or crio", kind)
	}
	step("private %s with NRI on; pods get no default route and a blackhole for %s", name, vipRange)
	d.rt = cri.Start(d, cri.Options{Runtime: kind, VIPRange: netip.MustParsePrefix(vipRange)})
	d.Cleanup(func() {
		d.rt.Stop(d)
		if left := d.rt.Leftovers(); len(left) > 0 {
			d.Errorf("left behind: %v", left)
		}
	})
	fmt.Printf("    state %s, NRI socket %s, pod subnet %s, pod cgroups under %s (%v)\n",
		d.rt.StateDir(), d.rt.NRISocket(), d.rt.Subnet(), d.rt.CgroupRoot(), time.Since(start).Round(time.Millisecond))

	step("two backend pods and a client pod (crictl runp / create / start)")
	a, sa := d.pod("backend-a", "web", "serve", "tcp", "8080", "backend-a")
	b, sb := d.pod("backend-b", "web", "serve", "tcp", "8080", "backend-b")
	clientPod, client := d.pod("client", "client", "pause")
	d.rt.WaitLog(d, sa, "listening", 5*time.Second)
	d.rt.WaitLog(d, sb, "listening", 5*time.Second)
	for _, p := range []*cri.Pod{a, b} {
		fmt.Printf("    %s at %s\n", p.Name, p.IP)
	}

	cgroupRoot := d.unreachedBeforePodsock(client)
	bpffs := testenv.BPFFS(d)
	dir, err := os.MkdirTemp("", "podsock-demo-")
	if err != nil {
		d.Fatal(err)
	}
	d.Cleanup(func() { os.RemoveAll(dir) })
	d.cfgPath = filepath.Join(dir, "podsock.toml")
	writeConfig := func(backends ...*cri.Pod) string {
		var bs []string
		for _, p := range backends {
			bs = append(bs, fmt.Sprintf("%q", netip.AddrPortFrom(p.IP, 8080)))
		}
		cfg := fmt.Sprintf(`[agent]
cgroup_root = %q   # the runtime's pod cgroup parent, not the machine's root
bpffs = %q
state_dir = %q

[nri]
enabled = true
socket = %q

[lb]
terminate = ["tcp", "udp"]   # destroy sockets still attached to a removed backend

[[service]]
name = "default/web"
vip = "%s"
port = 80
protocol = "tcp"
backends = [%s]
`, cgroupRoot, bpffs, filepath.Join(dir, "state"), d.rt.NRISocket(), vip, strings.Join(bs, ", "))
		if err := os.WriteFile(d.cfgPath, []byte(cfg), 0o644); err != nil {
			d.Fatal(err)
		}
		return cfg
	}
	cfg := writeConfig(a, b)
	step("podsock run --config %s (an external NRI plugin)", d.cfgPath)
	fmt.Print(indent(cfg))
	agent := d.startAgent()

	step("ten connects from the client pod to %s:80", vip)
	seen := d.dial(client, 10)
	if seen["backend-a"] == 0 || seen["backend-b"] == 0 {
		d.Fatalf("both backends should have answered through the VIP; got %v", seen)
	}

	step("the client holds a connection through %s:80", vip)
	hold := d.rt.StartContainer(d, clientPod, "hold", "hold", "tcp", vip+":80")
	d.rt.WaitLog(d, hold, "connected peer="+vip+":80", 5*time.Second)
	line, _ := d.rt.Logs(hold)
	fmt.Print(indent(lastLine(line)))
	held, stays := a, b
	if strings.Contains(line, "reply=backend-b") {
		held, stays = b, a
	}
	step("podsock sockets --pod default/client (what the datapath knows of each socket)")
	d.podsock("sockets", "--pod", "default/client")

	step("%s leaves the service (config reload, SIGHUP): its client is aborted", held.Name)
	writeConfig(stays)
	begin := time.Now()
	agent.Process.Signal(syscall.SIGHUP)
	d.awaitAborted(hold, time.Second, begin, "the reload (container log polling included)")
	if seen := d.dial(client, 4); seen[stays.Name] != 4 {
		d.Fatalf("after the reload only %s should answer; got %v", stays.Name, seen)
	}

	step("podsock pods")
	d.podsock("pods")
	step("podsock services")
	d.podsock("services")
	step("podsock status")
	d.podsock("status")

	step("stop podsock (SIGTERM) and clean up: the pods keep running, podsock leaves nothing")
	agent.Process.Signal(syscall.SIGTERM)
	agent.Wait()
	d.podsock("cleanup")
	if d.dial(client, 1) != nil {
		d.Errorf("the VIP still answers after podsock cleanup")
	}
}

// unreachedBeforePodsock checks that the client cannot reach the VIP without podsock (a
// demo that passes without it proves nothing), and makes the runtime's pod cgroup parent,
// which podsock attaches to.
func (d *demo) unreachedBeforePodsock(client *cri.Container) (cgroupRoot string) {
	step("without podsock, the client cannot reach %s:80 (the blackhole answers)", vip)
	if d.dial(client, 1) != nil {
		d.Fatalf("the VIP answered before podsock ran: the demo would prove nothing")
	}
	cgroup2, err := cgroupfs.Mount()
	if err != nil {
		d.Fatal(err)
	}
	cgroupRoot = filepath.Join(cgroup2, d.rt.CgroupRoot())
	if err := os.MkdirAll(cgroupRoot, 0o755); err != nil {
		d.Fatal(err)
	}
	return cgroupRoot
}

func (d *demo) pod(name, role string, args ...string) (*cri.Pod, *cri.Container) {
	p := d.rt.RunPod(d, cri.PodSpec{Name: name, Labels: map[string]string{"app": role}})
	return p, d.rt.StartContainer(d, p, name, args...)
}

// dial runs the workload's client inside the client pod and tallies who answered; nil
// when the connects failed.
func (d *demo) dial(c *cri.Container, n int) map[string]int {
	out, err := d.rt.Exec(d, c, 20*time.Second, "/workload", "dial", "tcp", vip+":80", fmt.Sprint(n))
	fmt.Print(indent(out))
	if err != nil {
		fmt.Println("    (the client failed at once: nothing left the pod)")
		return nil
	}
	seen := map[string]int{}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 {
			seen[strings.TrimPrefix(f[0], "reply=")]++
		}
	}
	var names []string
	for k, v := range seen {
		names = append(names, fmt.Sprintf("%s x%d", k, v))
	}
	sort.Strings(names)
	fmt.Printf("    answered by: %s\n", strings.Join(names, ", "))
	return seen
}

// awaitAborted waits up to within for the client in hold to see its connection aborted,
// prints its last line and how long after begin (the change named by after) it came.
func (d *demo) awaitAborted(hold *cri.Container, within time.Duration, begin time.Time, after string) {
	if !testenv.WaitFor(within, func() bool {
		out, _ := d.rt.Logs(hold)
		return strings.Contains(out, "read-error=ECONNABORTED")
	}) {
		out, _ := d.rt.Logs(hold)
		d.Fatalf("the held connection was not aborted within %v of %s:\n%s", within, after, out)
	}
	out, _ := d.rt.Logs(hold)
	fmt.Print(indent(lastLine(out)))
	fmt.Printf("    aborted %v after %s\n", time.Since(begin).Round(time.Millisecond), after)
}

// lastLine is the last line a container printed.
func lastLine(log string) string {
	lines := strings.Split(strings.TrimSpace(log), "\n")
	return lines[len(lines)-1] + "\n"
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ") + "\n"
}

func (d *demo) startAgent() *exec.Cmd {
	log, err := os.Create(filepath.Join(filepath.Dir(d.cfgPath), "agent.log"))
	if err != nil {
		d.Fatal(err)
	}
	cmd := exec.Command(*podsockBin, "run", "--config", d.cfgPath)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		d.Fatal(err)
	}
	d.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
		}
		exec.Command(*podsockBin, "cleanup", "--config", d.cfgPath).Run()
		log.Close()
	})
	if !testenv.WaitFor(15*time.Second, func() bool {
		out, err := exec.Command(*podsockBin, "pods", "--config", d.cfgPath).Output()
		return err == nil && strings.Count(string(out), "\n") >= 4 // header + 3 pods
	}) {
		b, _ := os.ReadFile(log.Name())
		d.Fatalf("agent did not start or learn the pods:\n%s", b)
	}
	return cmd
}

func (d *demo) podsock(args ...string) {
	out, err := exec.Command(*podsockBin, append(args, "--config", d.cfgPath)...).CombinedOutput()
	fmt.Print(indent(string(out)))
	if err != nil {
		d.Fatalf("podsock %s: %v", args[0], err)
	}
}

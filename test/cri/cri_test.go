package cri

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/podsock/podsock/test/testenv"
)

// TestPrivilegedCRI drives a real containerd, and a real CRI-O, the way a kubelet would
// and checks what the workloads see: replies from the right pod, the VIP range unreachable
// (blackholed), pods surviving a runtime restart, and nothing left behind afterwards.
func TestPrivilegedCRI(t *testing.T) {
	for _, k := range Kinds {
		t.Run(string(k), func(t *testing.T) { testCRI(t, k) })
	}
}

func testCRI(t *testing.T, kind Kind) {
	Require(t, kind)
	host := hostState(t)
	begin := time.Now()
	r := Start(t, Options{Runtime: kind})
	t.Logf("%s ready with the image imported in %v (subnet %s, cgroup root %s)",
		kind, time.Since(begin).Round(time.Millisecond), r.Subnet(), r.CgroupRoot())

	podStart := time.Now()
	a := r.RunPod(t, PodSpec{Name: "backend-a", Labels: map[string]string{"app": "web"}})
	sa := r.StartContainer(t, a, "server", "serve", "tcp", "8080", "a")
	t.Logf("first pod running in %v", time.Since(podStart).Round(time.Millisecond))
	b := r.RunPod(t, PodSpec{Name: "backend-b", Labels: map[string]string{"app": "web"}})
	sb := r.StartContainer(t, b, "server", "serve", "tcp", "8080", "b")
	client := r.RunPod(t, PodSpec{Name: "client"})
	cc := r.StartContainer(t, client, "client", "pause")
	r.WaitLog(t, sa, "listening", 5*time.Second)
	r.WaitLog(t, sb, "listening", 5*time.Second)

	for _, p := range []*Pod{a, b, client} {
		if !r.Subnet().Contains(p.IP) {
			t.Errorf("pod %s IP %s outside %s", p.Name, p.IP, r.Subnet())
		}
	}
	for _, c := range []*Container{sa, sb, cc} {
		want := c.Pod.CgroupParent + "/"
		if !strings.HasPrefix(c.CgroupPath, r.CgroupRoot()+"/pod"+c.Pod.UID+"/") || !strings.HasPrefix(c.CgroupPath, want) {
			t.Errorf("container %s/%s cgroup %q, want below %s", c.Pod.Name, c.Name, c.CgroupPath, want)
		}
		// containerd names the container's cgroup by its ID; CRI-O's cgroupfs manager
		// prefixes it with "crio-".
		leaf := c.ID
		if kind == CRIO {
			leaf = "crio-" + c.ID
		}
		if c.CgroupPath != want+leaf {
			t.Errorf("container %s/%s cgroup %q, want %s", c.Pod.Name, c.Name, c.CgroupPath, want+leaf)
		}
	}

	dial := func(target netip.AddrPort, want string) {
		t.Helper()
		begin := time.Now()
		out, err := r.Exec(t, cc, 10*time.Second, "/workload", "dial", "tcp", target.String())
		if err != nil {
			t.Fatalf("dial %s: %v\n%s", target, err, out)
		}
		wantLine := fmt.Sprintf("reply=%s peer=%s", want, target)
		if strings.TrimSpace(out) != wantLine {
			t.Fatalf("dial %s printed %q, want %q", target, out, wantLine)
		}
		t.Logf("exec dial %s: %v", target, time.Since(begin).Round(time.Millisecond))
	}
	dial(netip.AddrPortFrom(a.IP, 8080), "a")
	dial(netip.AddrPortFrom(b.IP, 8080), "b")

	// Without podsock the VIP must not answer: the blackhole turns it into an error at once.
	out, err := r.Exec(t, cc, 10*time.Second, "/workload", "dial", "tcp", "10.96.0.20:80")
	if err == nil || !blackholed(out) {
		t.Fatalf("dial to the VIP without podsock: %v, printed %q; want error=ENETUNREACH or EINVAL", err, out)
	}
	out, err = r.Exec(t, cc, 10*time.Second, "/workload", "dial", "udp", "10.96.0.20:53")
	if err == nil || !blackholed(out) {
		t.Fatalf("udp to the VIP without podsock: %v, printed %q; want error=ENETUNREACH or EINVAL", err, out)
	}

	restart := time.Now()
	r.Restart(t)
	t.Logf("%s restart in %v", kind, time.Since(restart).Round(time.Millisecond))
	for _, c := range []*Container{sa, sb, cc} {
		if err := syscall.Kill(c.Pid, 0); err != nil {
			t.Fatalf("container %s/%s (pid %d) gone after restart: %v", c.Pod.Name, c.Name, c.Pid, err)
		}
	}
	dial(netip.AddrPortFrom(a.IP, 8080), "a")

	remove := time.Now()
	r.RemovePod(t, b)
	t.Logf("remove pod in %v", time.Since(remove).Round(time.Millisecond))
	if err := syscall.Kill(sb.Pid, 0); err == nil {
		t.Errorf("container of removed pod %s still running (pid %d)", b.Name, sb.Pid)
	}
	out, err = r.Exec(t, cc, 10*time.Second, "/workload", "dial", "tcp", netip.AddrPortFrom(b.IP, 8080).String())
	if err == nil {
		t.Errorf("dial to removed pod %s succeeded: %q", b.Name, out)
	}

	stop := time.Now()
	r.Stop(t)
	t.Logf("teardown in %v", time.Since(stop).Round(time.Millisecond))
	if left := r.Leftovers(); len(left) != 0 {
		t.Fatalf("left behind after Stop: %v", left)
	}
	if after := hostState(t); after != host {
		t.Fatalf("the host changed under %s:\nbefore:\n%s\nafter:\n%s", kind, host, after)
	}
}

// hostState is what a runtime must leave as it found it on the host: the firewall rules
// (without counters) and the runtimes' default state dirs, which a private runtime must
// never create.
func hostState(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, cmd := range []string{"iptables-save", "ip6tables-save"} {
		out, err := exec.Command(cmd).Output()
		if err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
		for _, line := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(line, "#") {
				continue // the dump's time stamps
			}
			if i := strings.LastIndex(line, " ["); strings.HasPrefix(line, ":") && i > 0 {
				line = line[:i] // a chain's packet and byte counters
			}
			b.WriteString(line + "\n")
		}
	}
	for _, dir := range []string{"/var/lib/containers", "/run/containers", "/var/run/crio", "/var/lib/crio", "/var/log/crio", "/etc/crio", "/var/lib/containerd", "/run/containerd"} {
		_, err := os.Stat(dir)
		fmt.Fprintf(&b, "%s exists: %v\n", dir, err == nil)
	}
	return b.String()
}

// blackholed tells whether a dial failed the way the pod's blackhole route makes it fail.
func blackholed(out string) bool {
	return strings.HasPrefix(out, "error=ENETUNREACH") || strings.HasPrefix(out, "error=EINVAL")
}

// A program (bench, demo) gets the runtime through testenv.Standalone; when it dies half
// way its cleanups alone, with pods still running, must remove everything.
func TestPrivilegedCRICleanupWithRunningPods(t *testing.T) {
	for _, k := range Kinds {
		t.Run(string(k), func(t *testing.T) { testCleanupWithRunningPods(t, k) })
	}
}

func testCleanupWithRunningPods(t *testing.T, kind Kind) {
	Require(t, kind)
	var s testenv.Standalone
	var r *Runtime
	func() {
		defer func() {
			if p := recover(); p != nil {
				s.RunCleanups()
				t.Fatalf("set-up failed: %v", p)
			}
		}()
		r = Start(&s, Options{Runtime: kind})
		p := r.RunPod(&s, PodSpec{Name: "left-running"})
		c := r.StartContainer(&s, p, "server", "serve", "udp", "5353", "x")
		r.WaitLog(&s, c, "listening", 5*time.Second)
		if err := r.CheckPodNetwork(p); err != nil {
			t.Error(err)
		}
		t.Logf("pod netns %s, container cgroup %s", p.NetnsPath, c.CgroupPath)
	}()
	if len(r.Leftovers()) == 0 {
		t.Fatal("Leftovers reports nothing for a running runtime")
	}
	s.RunCleanups()
	if left := r.Leftovers(); len(left) != 0 {
		t.Fatalf("left behind after cleanup: %v", left)
	}
}

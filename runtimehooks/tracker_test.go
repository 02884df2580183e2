package runtimehooks

import (
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
)

// These tests need no privileges: host-network pods hold no netns and the cgroups do not
// exist under a temporary "mount", so only the bookkeeping is exercised.

func hostPod(id, ns, name string) Sandbox {
	return Sandbox{
		ID: id, UID: "uid-" + id, Namespace: ns, Name: name,
		Labels:       map[string]string{"app": name},
		CgroupParent: "/kubepods/besteffort/pod" + id,
	}
}

func TestTrackerBookkeeping(t *testing.T) {
	tr := NewTracker(t.TempDir())
	defer tr.Close()

	in := hostPod("s2", "default", "web")
	in.IPs = []string{"10.88.0.5", "fd00::5", "10.88.0.6/24"}
	p, err := tr.RunPodSandbox(in)
	if err != nil {
		t.Fatalf("RunPodSandbox: %v", err)
	}
	if !p.HostNetwork || p.NetnsCookie != 0 || p.CgroupID != 0 {
		t.Errorf("host-network pod without a cgroup: got %+v", p)
	}
	if p.CgroupPath != "/kubepods/besteffort/pods2" {
		t.Errorf("CgroupPath = %q", p.CgroupPath)
	}
	wantIPs := []netip.Addr{netip.MustParseAddr("10.88.0.5"), netip.MustParseAddr("fd00::5"), netip.MustParseAddr("10.88.0.6")}
	if !slices.Equal(p.IPs, wantIPs) {
		t.Errorf("IPs = %v, want %v", p.IPs, wantIPs)
	}
	// The tracker keeps its own copy of the input.
	in.Labels["app"] = "changed"
	if _, err := tr.RunPodSandbox(hostPod("s1", "default", "api")); err != nil {
		t.Fatal(err)
	}
	if _, err := tr.RunPodSandbox(hostPod("s3", "alpha", "zz")); err != nil {
		t.Fatal(err)
	}

	var names []string
	for _, p := range tr.Pods() {
		names = append(names, p.Namespace+"/"+p.Name)
	}
	if want := []string{"alpha/zz", "default/api", "default/web"}; !slices.Equal(names, want) {
		t.Errorf("Pods() order = %v, want %v", names, want)
	}

	// Unknown sandbox: an error and nothing recorded.
	if _, err := tr.ContainerCreated(ContainerInfo{ID: "c0", SandboxID: "nope", CgroupsPath: "/x/c0"}); !errors.Is(err, ErrUnknownSandbox) {
		t.Errorf("ContainerCreated on an unknown sandbox: err = %v, want ErrUnknownSandbox", err)
	}
	if _, ok := tr.ContainerRemoved("c0"); ok {
		t.Error("a container of an unknown sandbox was recorded")
	}

	// Both PostCreate and Start report the container; it is recorded once. Its cgroup does
	// not exist here, which is an error (it must by PostCreate) but it is still recorded.
	for range 2 {
		for _, id := range []string{"cb", "ca"} {
			_, err := tr.ContainerCreated(ContainerInfo{ID: id, SandboxID: "s2", Name: "n-" + id, CgroupsPath: "/kubepods/besteffort/pods2/" + id})
			if err == nil || !strings.Contains(err.Error(), "does not exist") {
				t.Errorf("ContainerCreated with a missing cgroup: err = %v", err)
			}
		}
	}
	p, ok := tr.Pod("s2")
	if !ok {
		t.Fatal("Pod(s2) not found")
	}
	if len(p.Containers) != 2 || p.Containers[0].ID != "ca" || p.Containers[1].ID != "cb" {
		t.Fatalf("containers = %+v, want ca, cb", p.Containers)
	}
	if c := p.Containers[0]; c.Name != "n-ca" || c.CgroupPath != "/kubepods/besteffort/pods2/ca" || c.CgroupID != 0 {
		t.Errorf("container = %+v", c)
	}
	if p.Labels["app"] != "web" {
		t.Errorf("labels follow the caller's map: %v", p.Labels)
	}

	// What callers get is theirs to change.
	p.Labels["app"] = "x"
	p.IPs[0] = netip.MustParseAddr("1.1.1.1")
	p.Containers[0].Name = "x"
	again, _ := tr.Pod("s2")
	if again.Labels["app"] != "web" || again.IPs[0] != wantIPs[0] || again.Containers[0].Name != "n-ca" {
		t.Errorf("a returned Pod aliases the tracker's state: %+v", again)
	}

	p, ok = tr.ContainerRemoved("cb")
	if !ok || len(p.Containers) != 1 || p.Containers[0].ID != "ca" {
		t.Errorf("ContainerRemoved(cb) = %+v, %v", p, ok)
	}
	if _, ok := tr.ContainerRemoved("cb"); ok {
		t.Error("ContainerRemoved twice succeeded")
	}

	p, ok = tr.RemovePodSandbox("s2")
	if !ok || p.Name != "web" || len(p.Containers) != 1 {
		t.Errorf("RemovePodSandbox(s2) = %+v, %v", p, ok)
	}
	if _, ok := tr.Pod("s2"); ok {
		t.Error("removed pod still known")
	}
	if _, ok := tr.ContainerRemoved("ca"); ok {
		t.Error("container of a removed pod still known")
	}
	if _, ok := tr.RemovePodSandbox("s2"); ok {
		t.Error("RemovePodSandbox twice succeeded")
	}
}

func TestTrackerPartialFacts(t *testing.T) {
	tr := NewTracker(t.TempDir())
	defer tr.Close()

	s := hostPod("s1", "default", "web")
	s.NetnsPath = "/nonexistent/netns"
	s.IPs = []string{"10.88.0.5", "not-an-ip"}
	s.CgroupParent = "-bad.slice"
	p, err := tr.RunPodSandbox(s)
	if err == nil {
		t.Fatal("RunPodSandbox with an unreadable netns, a bad IP and a bad cgroup: no error")
	}
	for _, want := range []string{"open netns /nonexistent/netns", "not-an-ip", "-bad.slice"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if p.SandboxID != "s1" || p.HostNetwork || p.NetnsPath != s.NetnsPath || p.NetnsCookie != 0 || len(p.IPs) != 1 {
		t.Errorf("partial pod = %+v", p)
	}
	if _, ok := tr.Pod("s1"); !ok {
		t.Error("a pod with unreadable facts was not recorded")
	}
	if err := tr.WithNetns("s1", func(int) error { return nil }); !errors.Is(err, ErrNoNetns) {
		t.Errorf("WithNetns without a netns: err = %v, want ErrNoNetns", err)
	}
	if err := tr.WithNetns("nope", func(int) error { return nil }); !errors.Is(err, ErrUnknownSandbox) {
		t.Errorf("WithNetns on an unknown sandbox: err = %v, want ErrUnknownSandbox", err)
	}
}

func TestTrackerPodCgroupWithoutParent(t *testing.T) {
	tr := NewTracker(t.TempDir())
	defer tr.Close()

	// The sandbox container's cgroup sits in the pod cgroup.
	s := hostPod("s1", "default", "web")
	s.CgroupParent = ""
	s.CgroupsPath = "kubepods-besteffort-pod" + uidUnit + ".slice:cri-containerd:s1"
	p, err := tr.RunPodSandbox(s)
	if err != nil {
		t.Fatalf("RunPodSandbox: %v", err)
	}
	if want := "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidUnit + ".slice"; p.CgroupPath != want {
		t.Errorf("CgroupPath = %q, want %q", p.CgroupPath, want)
	}

	// Nothing at all from the sandbox: the first container tells.
	s = hostPod("s2", "default", "api")
	s.CgroupParent = ""
	if _, err := tr.RunPodSandbox(s); err == nil {
		t.Error("no cgroup reported: no error")
	}
	p, _ = tr.ContainerCreated(ContainerInfo{ID: "c1", SandboxID: "s2", CgroupsPath: "/testpods/pod-2/c1"})
	if p.CgroupPath != "/testpods/pod-2" {
		t.Errorf("CgroupPath from the container = %q", p.CgroupPath)
	}
	// A repeated event that again reports no parent keeps what the container told.
	p, _ = tr.RunPodSandbox(s)
	if p.CgroupPath != "/testpods/pod-2" || len(p.Containers) != 1 {
		t.Errorf("after a repeated RunPodSandbox: %+v", p)
	}
}

func TestTrackerSynchronizeBookkeeping(t *testing.T) {
	tr := NewTracker(t.TempDir())
	defer tr.Close()
	for _, s := range []Sandbox{hostPod("keep", "ns", "keep"), hostPod("stale", "ns", "stale")} {
		if _, err := tr.RunPodSandbox(s); err != nil {
			t.Fatal(err)
		}
	}
	tr.ContainerCreated(ContainerInfo{ID: "k-old", SandboxID: "keep", CgroupsPath: "/k/old"})
	tr.ContainerCreated(ContainerInfo{ID: "s-1", SandboxID: "stale", CgroupsPath: "/s/1"})

	keep := hostPod("keep", "ns", "keep")
	keep.Labels = map[string]string{"app": "relabelled"}
	pods, removed, err := tr.Synchronize(
		[]Sandbox{keep, hostPod("new", "ns", "new")},
		[]ContainerInfo{
			{ID: "k-new", SandboxID: "keep", CgroupsPath: "/k/new"},
			{ID: "n-1", SandboxID: "new", CgroupsPath: "/n/1"},
			{ID: "orphan", SandboxID: "gone", CgroupsPath: "/o"},
		})
	if !errors.Is(err, ErrUnknownSandbox) {
		t.Errorf("Synchronize with an orphan container: err = %v, want ErrUnknownSandbox in it", err)
	}
	if len(removed) != 1 || removed[0].SandboxID != "stale" || len(removed[0].Containers) != 1 {
		t.Errorf("removed = %+v, want the stale pod with its container", removed)
	}
	if len(pods) != 2 || pods[0].SandboxID != "keep" || pods[1].SandboxID != "new" {
		t.Fatalf("pods = %+v", pods)
	}
	if c := pods[0].Containers; len(c) != 1 || c[0].ID != "k-new" {
		t.Errorf("keep's containers = %+v, want only k-new", c)
	}
	if pods[0].Labels["app"] != "relabelled" {
		t.Errorf("keep was not refreshed: %v", pods[0].Labels)
	}
	if _, ok := tr.ContainerRemoved("s-1"); ok {
		t.Error("container of a removed pod still known")
	}
	if _, ok := tr.ContainerRemoved("orphan"); ok {
		t.Error("orphan container recorded")
	}
}

func TestTrackerClosed(t *testing.T) {
	tr := NewTracker(t.TempDir())
	if _, err := tr.RunPodSandbox(hostPod("s1", "ns", "a")); err != nil {
		t.Fatal(err)
	}
	if err := tr.Close(); err != nil {
		t.Fatal(err)
	}
	if len(tr.Pods()) != 0 {
		t.Error("pods survive Close")
	}
	if _, err := tr.RunPodSandbox(hostPod("s2", "ns", "b")); err == nil {
		t.Error("RunPodSandbox after Close succeeded")
	}
}

func TestProcStartTime(t *testing.T) {
	self, err := procStartTime(uint32(os.Getpid()))
	if err != nil || self == 0 {
		t.Fatalf("own start time: %d %v", self, err)
	}
	again, _ := procStartTime(uint32(os.Getpid()))
	if again != self {
		t.Fatalf("start time changed: %d then %d", self, again)
	}
	if _, err := procStartTime(1 << 30); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a pid that does not exist: %v, want not-exist", err)
	}
}

func TestSandboxGoneWithoutNetns(t *testing.T) {
	tr := NewTracker(t.TempDir())
	defer tr.Close()
	for _, s := range []Sandbox{
		{ID: "running", Namespace: "ns", Name: "running", Pid: uint32(os.Getpid())},
		{ID: "unknown-pid", Namespace: "ns", Name: "unknown-pid"},
		{ID: "exited", Namespace: "ns", Name: "exited", Pid: uint32(os.Getpid())},
	} {
		tr.RunPodSandbox(s)
	}
	// Pretend the "exited" sandbox's process was a different one that started earlier.
	tr.mu.Lock()
	tr.pods["exited"].pidStart--
	tr.mu.Unlock()
	for id, want := range map[string]bool{"running": false, "unknown-pid": false, "exited": true, "not-a-pod": false} {
		if got := tr.SandboxGone(id); got != want {
			t.Errorf("SandboxGone(%s) = %v, want %v", id, got, want)
		}
	}
}

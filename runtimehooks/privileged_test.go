package runtimehooks

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/internal/cgroupfs"
	"github.com/podsock/podsock/internal/netns"
	"github.com/podsock/podsock/test/testenv"
)

// Privileged tests: root, a cgroup v2 mount and network namespaces they create and remove
// themselves. No traffic is sent, so the netns need no blackhole routes.

// Keep every other goroutine off the main thread. A goroutine that exits locked ends its
// thread, except on the main thread, which Go wedges instead; the restore-failure tests
// below would then leave the main thread (and so /proc/self/ns/net) in a test netns.
func init() { runtime.LockOSThread() }

func cgroupMount(t *testing.T) string {
	t.Helper()
	mnt, err := cgroupfs.Mount()
	if err != nil {
		t.Fatal(err)
	}
	return mnt
}

// testCgroup is a fresh cgroup and its canonical path (relative to the cgroup2 mount).
func testCgroup(t *testing.T, mnt string) (dir, canonical string) {
	t.Helper()
	cg := testenv.NewCgroup(t)
	return cg.Path, "/" + strings.TrimPrefix(strings.TrimPrefix(cg.Path, mnt), "/")
}

// mkdirCgroup creates a child cgroup, removed at cleanup (registered after the parent's,
// so it runs first).
func mkdirCgroup(t *testing.T, dir string) {
	t.Helper()
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() {
		if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("remove cgroup %s: %v", dir, err)
		}
	})
}

// fdsOnNetns counts this process's fds open on the netns with that inode. (readlink
// would show the bind-mount path for an fd opened through /run/netns, so stat instead.)
func fdsOnNetns(t *testing.T, ino uint64) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		var st unix.Stat_t
		var fs unix.Statfs_t
		p := filepath.Join("/proc/self/fd", e.Name())
		if unix.Stat(p, &st) == nil && unix.Statfs(p, &fs) == nil && fs.Type == unix.NSFS_MAGIC && st.Ino == ino {
			n++
		}
	}
	return n
}

func fdCount(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func TestPrivilegedCgroupID(t *testing.T) {
	testenv.RequirePrivileged(t)
	mnt := cgroupMount(t)
	dir, canon := testCgroup(t, mnt)

	id, err := CgroupID(mnt, canon)
	if err != nil {
		t.Fatalf("CgroupID: %v", err)
	}
	if want := testenv.Inode(t, dir); id != want {
		t.Errorf("CgroupID = %d, directory inode %d", id, want)
	}
	// The kernel's own answer: a cgroup file handle is the 64-bit cgroup ID, the value
	// bpf_get_current_cgroup_id returns.
	h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, dir, 0)
	if err != nil {
		t.Fatalf("name_to_handle_at: %v", err)
	}
	if b := h.Bytes(); len(b) != 8 || binary.NativeEndian.Uint64(b) != id {
		t.Errorf("cgroup file handle %x, CgroupID %d", b, id)
	}

	// A process in the cgroup sees the canonical path in its "0::" line.
	cgfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(cgfd)
	cmd := exec.Command("sleep", "30")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cgfd}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start a process in the cgroup: %v", err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "\n0::"+canon+"\n") && !strings.HasPrefix(string(b), "0::"+canon+"\n") {
		t.Errorf("/proc/PID/cgroup has no 0::%s line:\n%s", canon, b)
	}

	if _, err := CgroupID(mnt, canon+"/missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("CgroupID of a missing cgroup: err = %v, want fs.ErrNotExist", err)
	}
}

func TestPrivilegedTrackerLifecycle(t *testing.T) {
	testenv.RequirePrivileged(t)
	mnt := cgroupMount(t)
	podDir, podCg := testCgroup(t, mnt)
	mkdirCgroup(t, filepath.Join(podDir, "ctr1"))
	ns := testenv.NewNetns(t, nil)
	cookie := ns.Cookie(t)
	nsIno := testenv.Inode(t, ns.Path)

	tr := NewTracker(mnt)
	defer tr.Close()
	sandbox := Sandbox{
		ID: "sb1", UID: "u1", Namespace: "default", Name: "web",
		CgroupParent: podCg, NetnsPath: ns.Path, IPs: []string{"10.88.0.5"},
	}
	p, err := tr.RunPodSandbox(sandbox)
	if err != nil {
		t.Fatalf("RunPodSandbox: %v", err)
	}
	if p.CgroupPath != podCg || p.CgroupID != testenv.Inode(t, podDir) {
		t.Errorf("pod cgroup %q id %d, want %q id %d", p.CgroupPath, p.CgroupID, podCg, testenv.Inode(t, podDir))
	}
	if p.HostNetwork || p.NetnsCookie != cookie {
		t.Errorf("netns cookie %d (host network %v), want %d", p.NetnsCookie, p.HostNetwork, cookie)
	}
	if n := fdsOnNetns(t, nsIno); n != 1 {
		t.Errorf("%d fds held on the pod netns, want 1", n)
	}

	p, err = tr.ContainerCreated(ContainerInfo{ID: "ctr1", SandboxID: "sb1", Name: "app", CgroupsPath: podCg + "/ctr1"})
	if err != nil {
		t.Fatalf("ContainerCreated: %v", err)
	}
	if len(p.Containers) != 1 || p.Containers[0].CgroupID != testenv.Inode(t, filepath.Join(podDir, "ctr1")) {
		t.Errorf("containers = %+v", p.Containers)
	}
	if pods := tr.Pods(); len(pods) != 1 || pods[0].NetnsCookie != cookie || len(pods[0].Containers) != 1 {
		t.Errorf("Pods() = %+v", pods)
	}

	err = tr.WithNetns("sb1", func(fd int) error {
		return netns.Do(fd, func() error {
			if got := testenv.Inode(t, "/proc/thread-self/ns/net"); got != nsIno {
				return fmt.Errorf("in netns inode %d, want %d", got, nsIno)
			}
			return nil
		})
	})
	if err != nil {
		t.Errorf("WithNetns: %v", err)
	}
	// The socket iterators reach a pod's netns by its cookie.
	if got := tr.NetnsCookies(); !slices.Equal(got, []uint64{cookie}) {
		t.Errorf("NetnsCookies() = %v, want [%d]", got, cookie)
	}
	err = tr.WithNetnsCookie(cookie, func(fd int) error {
		if got := testenv.Inode(t, fmt.Sprintf("/proc/self/fd/%d", fd)); got != nsIno {
			return fmt.Errorf("fd for cookie %d is netns inode %d, want %d", cookie, got, nsIno)
		}
		return nil
	})
	if err != nil {
		t.Errorf("WithNetnsCookie: %v", err)
	}
	if err := tr.WithNetnsCookie(cookie+1, func(int) error { return nil }); !errors.Is(err, ErrNoNetns) {
		t.Errorf("WithNetnsCookie of an unknown cookie: %v, want ErrNoNetns", err)
	}

	if _, ok := tr.RemovePodSandbox("sb1"); !ok {
		t.Fatal("RemovePodSandbox: unknown")
	}
	if n := fdsOnNetns(t, nsIno); n != 0 {
		t.Errorf("%d fds still held on the removed pod's netns", n)
	}

	// No fd leaks over many pod lifetimes. One cycle first, so that anything opened once
	// (the runtime's, the first setns's) is in the baseline.
	cycle := func(i int) {
		s := sandbox
		s.ID = fmt.Sprintf("sb-%d", i)
		if _, err := tr.RunPodSandbox(s); err != nil {
			t.Fatalf("cycle %d: RunPodSandbox: %v", i, err)
		}
		if _, err := tr.ContainerCreated(ContainerInfo{ID: fmt.Sprintf("c-%d", i), SandboxID: s.ID, CgroupsPath: podCg + "/ctr1"}); err != nil {
			t.Fatalf("cycle %d: ContainerCreated: %v", i, err)
		}
		if _, ok := tr.RemovePodSandbox(s.ID); !ok {
			t.Fatalf("cycle %d: RemovePodSandbox: unknown", i)
		}
	}
	cycle(-1)
	base := fdCount(t)
	for i := range 200 {
		cycle(i)
	}
	if got := fdCount(t); got != base {
		t.Errorf("%d fds open after 200 pod lifetimes, %d before", got, base)
	}
}

func TestPrivilegedTrackerLatePodCgroup(t *testing.T) {
	testenv.RequirePrivileged(t)
	mnt := cgroupMount(t)
	parentDir, parentCg := testCgroup(t, mnt)
	tr := NewTracker(mnt)
	defer tr.Close()

	// CRI-O without an infra container: no pod cgroup until the first container.
	p, err := tr.RunPodSandbox(Sandbox{ID: "sb", Namespace: "ns", Name: "late", CgroupParent: parentCg + "/pod"})
	if err != nil {
		t.Fatalf("RunPodSandbox before the pod cgroup exists: %v", err)
	}
	if p.CgroupID != 0 {
		t.Errorf("CgroupID = %d before the cgroup exists", p.CgroupID)
	}
	mkdirCgroup(t, filepath.Join(parentDir, "pod"))
	mkdirCgroup(t, filepath.Join(parentDir, "pod", "crio-c1"))
	p, err = tr.ContainerCreated(ContainerInfo{ID: "c1", SandboxID: "sb", CgroupsPath: parentCg + "/pod/crio-c1"})
	if err != nil {
		t.Fatalf("ContainerCreated: %v", err)
	}
	if want := testenv.Inode(t, filepath.Join(parentDir, "pod")); p.CgroupID != want {
		t.Errorf("pod CgroupID = %d after its first container, want %d", p.CgroupID, want)
	}
}

func TestPrivilegedTrackerSynchronize(t *testing.T) {
	testenv.RequirePrivileged(t)
	mnt := cgroupMount(t)
	_, podCg := testCgroup(t, mnt)
	nsA, nsB, nsC := testenv.NewNetns(t, nil), testenv.NewNetns(t, nil), testenv.NewNetns(t, nil)
	inoB := testenv.Inode(t, nsB.Path)
	sandbox := func(id string, ns *testenv.Netns) Sandbox {
		return Sandbox{ID: id, Namespace: "ns", Name: id, CgroupParent: podCg, NetnsPath: ns.Path}
	}

	tr := NewTracker(mnt)
	defer tr.Close()
	for _, s := range []Sandbox{sandbox("a", nsA), sandbox("b", nsB)} {
		if _, err := tr.RunPodSandbox(s); err != nil {
			t.Fatal(err)
		}
	}
	heldFd := func(id string) int {
		fd := -1
		if err := tr.WithNetns(id, func(f int) error { fd = f; return nil }); err != nil {
			t.Fatalf("WithNetns(%s): %v", id, err)
		}
		return fd
	}
	fdA := heldFd("a")

	pods, removed, err := tr.Synchronize([]Sandbox{sandbox("a", nsA), sandbox("c", nsC)}, nil)
	if err != nil {
		t.Fatalf("Synchronize: %v", err)
	}
	if len(removed) != 1 || removed[0].SandboxID != "b" {
		t.Errorf("removed = %+v, want b", removed)
	}
	if len(pods) != 2 || pods[0].SandboxID != "a" || pods[1].SandboxID != "c" {
		t.Fatalf("pods = %+v, want a, c", pods)
	}
	if got := heldFd("a"); got != fdA {
		t.Errorf("a's netns fd went from %d to %d: a known pod was reopened", fdA, got)
	}
	if pods[1].NetnsCookie != nsC.Cookie(t) {
		t.Errorf("c's cookie %d, want %d", pods[1].NetnsCookie, nsC.Cookie(t))
	}
	if n := fdsOnNetns(t, inoB); n != 0 {
		t.Errorf("%d fds still held on removed pod b's netns", n)
	}
	if n := fdsOnNetns(t, testenv.Inode(t, nsA.Path)); n != 1 {
		t.Errorf("%d fds held on a's netns, want 1", n)
	}
}

// A runtime that reports no IPs for a pod (CRI-O, for some pods that started before the
// plugin connected) gets them read from the pod's netns: global addresses, IPv4 first, no
// loopback or link-local; reported IPs are taken as they are.
func TestPrivilegedPodIPsFromTheNetnsWhenNoneReported(t *testing.T) {
	testenv.RequirePrivileged(t)
	mnt := cgroupMount(t)
	_, podCg := testCgroup(t, mnt)
	ns := testenv.NewNetns(t, nil)
	// A veth pair with both ends in the test's netns: nothing reaches the host.
	testenv.Run(t, "ip", "-n", ns.Name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
	testenv.Run(t, "ip", "-n", ns.Name, "link", "set", "eth0", "up")
	testenv.Run(t, "ip", "-n", ns.Name, "addr", "add", "fd00:244::7/64", "dev", "eth0", "nodad")
	testenv.Run(t, "ip", "-n", ns.Name, "addr", "add", "10.244.9.7/24", "dev", "eth0")
	tr := NewTracker(mnt)
	defer tr.Close()
	pod, err := tr.RunPodSandbox(Sandbox{ID: "quiet", Namespace: "ns", Name: "quiet", CgroupParent: podCg, NetnsPath: ns.Path})
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Addr{netip.MustParseAddr("10.244.9.7"), netip.MustParseAddr("fd00:244::7")}
	if !slices.Equal(pod.IPs, want) {
		t.Fatalf("IPs %v, want %v from the netns", pod.IPs, want)
	}
	pod, err = tr.RunPodSandbox(Sandbox{ID: "quiet", Namespace: "ns", Name: "quiet", CgroupParent: podCg, NetnsPath: ns.Path, IPs: []string{"10.244.9.8"}})
	if err != nil || !slices.Equal(pod.IPs, []netip.Addr{netip.MustParseAddr("10.244.9.8")}) {
		t.Fatalf("IPs %v (%v), want the runtime's own", pod.IPs, err)
	}
}

// A pod removed while WithNetns runs keeps its fd until f returns, and removal does not
// wait for f.
func TestPrivilegedWithNetnsOutlivesRemoval(t *testing.T) {
	testenv.RequirePrivileged(t)
	ns := testenv.NewNetns(t, nil)
	ino := testenv.Inode(t, ns.Path)
	tr := NewTracker(t.TempDir())
	defer tr.Close()
	if _, err := tr.RunPodSandbox(Sandbox{ID: "sb", NetnsPath: ns.Path}); err != nil {
		// Only the cgroup is missing here; the netns must have opened.
		if p, _ := tr.Pod("sb"); p.NetnsCookie == 0 {
			t.Fatal(err)
		}
	}

	entered, release, done := make(chan int), make(chan struct{}), make(chan error)
	go func() {
		done <- tr.WithNetns("sb", func(fd int) error {
			entered <- fd
			<-release
			var st unix.Stat_t
			if err := unix.Fstat(fd, &st); err != nil {
				return fmt.Errorf("fd closed under WithNetns: %w", err)
			}
			if st.Ino != ino {
				return fmt.Errorf("fd now refers to inode %d, want netns %d", st.Ino, ino)
			}
			return nil
		})
	}()
	<-entered
	removedAt := time.Now()
	if _, ok := tr.RemovePodSandbox("sb"); !ok {
		t.Fatal("RemovePodSandbox: unknown")
	}
	if d := time.Since(removedAt); d > 100*time.Millisecond {
		t.Errorf("RemovePodSandbox waited %v for WithNetns", d)
	}
	if n := fdsOnNetns(t, ino); n != 1 {
		t.Errorf("%d fds on the netns while WithNetns runs, want 1", n)
	}
	close(release)
	if err := <-done; err != nil {
		t.Error(err)
	}
	if n := fdsOnNetns(t, ino); n != 0 {
		t.Errorf("%d fds on the netns after WithNetns returned, want 0", n)
	}
}

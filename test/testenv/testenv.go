// Package testenv gives privileged tests the kernel objects they need (a child cgroup v2,
// network namespaces, a private bpffs) and removes them again, even when a test fails.
package testenv

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/internal/cgroupfs"
	"github.com/podsock/podsock/internal/netns"
)

// TB is the part of testing.TB the helpers use, so benchmarks outside `go test` can use
// them too.
type TB interface {
	Helper()
	Cleanup(func())
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Errorf(format string, args ...any)
}

// RequirePrivileged skips a test that needs root, cgroup v2 and BTF when they are absent,
// and fails it instead when CI=true: in CI these tests must run.
func RequirePrivileged(t testing.TB) {
	t.Helper()
	reason := ""
	switch {
	case os.Geteuid() != 0:
		reason = "needs root"
	case !fileExists("/sys/kernel/btf/vmlinux"):
		reason = "needs kernel BTF (/sys/kernel/btf/vmlinux)"
	default:
		if _, err := cgroupfs.Mount(); err != nil {
			reason = err.Error()
		}
	}
	if reason == "" {
		return
	}
	SkipOrFail(t, reason)
}

// SkipOrFail skips a test whose kernel feature or privilege is missing, and fails it
// instead when CI=true: in CI every test must run.
func SkipOrFail(t testing.TB, reason string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("test cannot run in CI: %s", reason)
	}
	t.Skipf("skipping: %s", reason)
}

// Soaking says the tests run as `make soak` (PODSOCK_SOAK=1): the reliability tests then
// run ten times longer.
func Soaking() bool { return os.Getenv("PODSOCK_SOAK") == "1" }

// Rounds is n, or ten times n under `make soak`.
func Rounds(n int) int {
	if Soaking() {
		return 10 * n
	}
	return n
}

// Repeat calls fn in a goroutine of wg, over and over, until stop is closed: the steady
// load of the reliability tests.
func Repeat(stop <-chan struct{}, wg *sync.WaitGroup, fn func()) {
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			fn()
		}
	}()
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// Name returns a short unique name for test objects.
func Name(prefix string) string {
	return fmt.Sprintf("%s-%08x", prefix, rand.Uint32())
}

// Cgroup is a cgroup v2 directory created for one test.
type Cgroup struct {
	Path string
}

// NewCgroup creates a child cgroup below the cgroup2 mount and removes it at cleanup.
func NewCgroup(t TB) *Cgroup {
	t.Helper()
	mnt, err := cgroupfs.Mount()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(mnt, Name("podsock-test"))
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() {
		if err := os.Remove(path); err != nil {
			t.Errorf("remove cgroup %s: %v", path, err)
		}
	})
	return &Cgroup{Path: path}
}

// EnterSelf moves the whole test process into the cgroup until the test ends, so that the
// sockets it creates are subject to the programs attached there.
func (c *Cgroup) EnterSelf(t TB) {
	t.Helper()
	home, err := HomeCgroup()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.AddProcess(os.Getpid()); err != nil {
		t.Fatalf("enter cgroup %s: %v", c.Path, err)
	}
	t.Cleanup(func() {
		if err := home.AddProcess(os.Getpid()); err != nil {
			t.Errorf("leave cgroup %s: %v", c.Path, err)
		}
	})
}

// AddProcess moves another process into the cgroup.
func (c *Cgroup) AddProcess(pid int) error {
	return os.WriteFile(filepath.Join(c.Path, "cgroup.procs"), []byte(fmt.Sprint(pid)), 0)
}

func selfCgroup() (string, error) { return CgroupOf(os.Getpid()) }

// CgroupOf is the cgroup v2 path of a process, as the "0::" line of /proc/PID/cgroup has
// it: absolute within the cgroup2 mount.
func CgroupOf(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", fmt.Errorf("cgroup of pid %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			return rest, nil
		}
	}
	return "", fmt.Errorf("pid %d has no cgroup v2 entry", pid)
}

// BPFFS mounts a private bpffs for the test's pins and unmounts it at cleanup.
func BPFFS(t TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "podsock-bpffs-")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		os.Remove(dir)
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
		os.Remove(dir)
	})
	return dir
}

// Run runs a command and fails the test with its output when it fails.
func Run(t TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// Netns is a named network namespace created for one test.
type Netns struct {
	Name string
	Path string
}

// NewNetns creates a named netns with lo up, adds the given local addresses (CIDR form,
// e.g. "10.88.0.5/32") to lo, installs a blackhole route for every VIP range before anything
// can send, verifies those routes, and deletes the netns at cleanup.
func NewNetns(t TB, blackholes []string, localAddrs ...string) *Netns {
	t.Helper()
	name := Name("podsock-test")
	Run(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("delete netns %s: %v: %s", name, err, out)
		}
	})
	ns := &Netns{Name: name, Path: filepath.Join("/run/netns", name)}
	Run(t, "ip", "-n", name, "link", "set", "lo", "up")
	for _, r := range blackholes {
		Run(t, "ip", "-n", name, "route", "add", "blackhole", r)
	}
	ns.RequireBlackholes(t, blackholes)
	for _, a := range localAddrs {
		Run(t, "ip", "-n", name, "addr", "add", a, "dev", "lo")
	}
	return ns
}

// RequireBlackholes fails the test unless every range has a blackhole route in the netns.
func (ns *Netns) RequireBlackholes(t TB, ranges []string) {
	t.Helper()
	for _, r := range ranges {
		family := "-4"
		if strings.Contains(r, ":") {
			family = "-6"
		}
		out, err := exec.Command("ip", family, "-n", ns.Name, "route", "show", "type", "blackhole", r).CombinedOutput()
		if err != nil || !strings.Contains(string(out), strings.SplitN(r, "/", 2)[0]) {
			t.Fatalf("netns %s: no blackhole route for %s (%v): %s", ns.Name, r, err, out)
		}
	}
}

// Do runs fn on an OS thread that has entered the netns. Sockets created inside fn belong
// to the netns for their whole life. A thread whose netns cannot be restored is never
// handed back to the Go scheduler: its goroutine exits still locked, which ends the thread.
func (ns *Netns) Do(fn func() error) error {
	target, err := os.Open(ns.Path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", ns.Path, err)
	}
	defer target.Close()
	return netns.Do(int(target.Fd()), fn)
}

// NewChild creates a cgroup below c and removes it at cleanup; programs attached to c
// apply to its children too.
func (c *Cgroup) NewChild(t TB, name string) *Cgroup {
	t.Helper()
	path := filepath.Join(c.Path, name)
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatalf("create cgroup %s: %v", path, err)
	}
	t.Cleanup(func() {
		if err := os.Remove(path); err != nil {
			t.Errorf("remove cgroup %s: %v", path, err)
		}
	})
	return &Cgroup{Path: path}
}

// ID is the cgroup's ID: its directory's inode, as bpf_get_current_cgroup_id() sees it.
func (c *Cgroup) ID(t TB) uint64 {
	t.Helper()
	id, err := cgroupfs.ID(c.Path)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// RunIn runs fn with the whole process moved into c, and moves it back to back afterwards.
func (c *Cgroup) RunIn(t TB, back *Cgroup, fn func()) {
	t.Helper()
	if err := c.AddProcess(os.Getpid()); err != nil {
		t.Fatalf("enter cgroup %s: %v", c.Path, err)
	}
	defer func() {
		if err := back.AddProcess(os.Getpid()); err != nil {
			t.Errorf("return to cgroup %s: %v", back.Path, err)
		}
	}()
	fn()
}

// Cookie is the netns cookie, read with SO_NETNS_COOKIE from a socket inside it.
func (ns *Netns) Cookie(t TB) uint64 {
	t.Helper()
	var cookie uint64
	err := ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		return err
	})
	if err != nil {
		t.Fatalf("netns cookie of %s: %v", ns.Name, err)
	}
	return cookie
}

// Inode is the inode number of path: a cgroup's ID, or a namespace's identity.
func Inode(t TB, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

package netns_test

import (
	"errors"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/internal/netns"
	"github.com/podsock/podsock/test/testenv"
)

// Keep every other goroutine off the main thread. A goroutine that exits locked ends its
// thread, except on the main thread, which Go wedges instead; the restore-failure tests
// below would then leave the main thread (and so /proc/self/ns/net) in a test netns.
func init() { runtime.LockOSThread() }

func TestPrivilegedOpenNetnsCookie(t *testing.T) {
	testenv.RequirePrivileged(t)
	ns := testenv.NewNetns(t, nil)
	want := ns.Cookie(t)

	n, err := netns.Open(ns.Path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer n.Close()
	if n.Cookie() != want {
		t.Errorf("Cookie() = %d, SO_NETNS_COOKIE inside the netns = %d", n.Cookie(), want)
	}
	if n.Path() != ns.Path {
		t.Errorf("Path() = %q", n.Path())
	}
	host, err := netns.Open("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	if host.Cookie() == want {
		t.Error("the test netns and the host netns have the same cookie")
	}

	// A kernel without NS_GET_ID: the socket fallback gives the same cookie.
	orig := *netns.NsGetID
	*netns.NsGetID = func(int) (uint64, error) { return 0, unix.ENOTTY }
	defer func() { *netns.NsGetID = orig }()
	got, err := netns.Cookie(n.Fd())
	if err != nil {
		t.Fatalf("Cookie fallback: %v", err)
	}
	if got != want {
		t.Errorf("fallback cookie = %d, want %d", got, want)
	}
	*netns.NsGetID = func(int) (uint64, error) { return 0, unix.EPERM }
	if _, err := netns.Cookie(n.Fd()); !errors.Is(err, unix.EPERM) {
		t.Errorf("NS_GET_ID failing otherwise: err = %v, want EPERM and no fallback", err)
	}
	*netns.NsGetID = orig

	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}

	// Only network namespaces are accepted.
	for _, p := range []string{"/proc/self/ns/pid", "/proc/self/status"} {
		if n, err := netns.Open(p); err == nil {
			n.Close()
			t.Errorf("netns.Open(%s) succeeded", p)
		}
	}
}

func TestPrivilegedInNetns(t *testing.T) {
	testenv.RequirePrivileged(t)
	host := testenv.Inode(t, "/proc/thread-self/ns/net")
	ns := testenv.NewNetns(t, nil)
	target := testenv.Inode(t, ns.Path)
	fd, err := unix.Open(ns.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)

	t.Run("restores the thread", func(t *testing.T) {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		before := testenv.Inode(t, "/proc/thread-self/ns/net")
		var inside uint64
		restored, err := netns.RunIn(fd, func() error {
			inside = testenv.Inode(t, "/proc/thread-self/ns/net")
			return nil
		})
		if err != nil || !restored {
			t.Fatalf("runIn: restored=%v err=%v", restored, err)
		}
		if inside != target {
			t.Errorf("inside: netns inode %d, want %d", inside, target)
		}
		if after := testenv.Inode(t, "/proc/thread-self/ns/net"); after != before {
			t.Errorf("after: netns inode %d, before %d", after, before)
		}
	})

	t.Run("returns f's error and re-raises its panic", func(t *testing.T) {
		sentinel := errors.New("sentinel")
		if err := netns.Do(fd, func() error { return sentinel }); !errors.Is(err, sentinel) {
			t.Errorf("err = %v, want sentinel", err)
		}
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recovered %v, want boom", r)
			}
		}()
		netns.Do(fd, func() error { panic("boom") })
	})

	// setns back fails, or claims success without moving the thread: InNetns must notice
	// and report it. The thread is really left in the test netns here, so this also runs
	// the "never unlock" path: the goroutine ends locked and the runtime drops the thread.
	fakes := map[string]func(int, int) error{
		"restore fails":         func(int, int) error { return unix.EPERM },
		"restore silently lies": func(int, int) error { return nil },
	}
	for name, fake := range fakes {
		t.Run(name, func(t *testing.T) {
			orig := *netns.Setns
			defer func() { *netns.Setns = orig }()
			calls := 0
			*netns.Setns = func(fd, typ int) error {
				calls++
				if calls == 1 {
					return orig(fd, typ)
				}
				return fake(fd, typ)
			}
			err := netns.Do(fd, func() error { return nil })
			if err == nil || !strings.Contains(err.Error(), "restore netns") {
				t.Errorf("err = %v, want a restore error", err)
			}
		})
	}

	// Whatever happened above, the threads the scheduler hands out are in the host netns.
	// (Not /proc/self/ns/net: that is the main thread's, and when a locked goroutine on the
	// main thread exits, Go wedges that thread instead of ending it, netns and all.)
	if got := testenv.Inode(t, "/proc/self/ns/net"); got != host {
		t.Errorf("main thread left in netns %d, host is %d", got, host)
	}
	for range 20 {
		func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			if got := testenv.Inode(t, "/proc/thread-self/ns/net"); got != host {
				t.Fatalf("a scheduler thread is in netns %d, host is %d", got, host)
			}
		}()
		runtime.Gosched()
	}
}

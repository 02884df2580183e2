// Package netns holds network namespaces by handle and runs code inside them: the pod
// tracker, the agent's host netns and the test helpers all use it.
package netns

import (
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Handle is an open nsfs handle on a network namespace. Holding it keeps the namespace
// alive after the runtime unmounts it, so its sockets can still be iterated.
type Handle struct {
	fd     int
	path   string
	cookie uint64
}

// Open opens and checks a network namespace and reads its cookie once: the cookie
// never changes for the life of the namespace.
func Open(path string) (*Handle, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	if err := checkNetns(fd); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	cookie, err := Cookie(fd)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	return &Handle{fd: fd, path: path, cookie: cookie}, nil
}

// checkNetns refuses anything but a network namespace: a wrong path (a plain file, a
// pid namespace) would otherwise yield a cookie that matches no socket.
func checkNetns(fd int) error {
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return fmt.Errorf("fstatfs: %w", err)
	}
	if st.Type != unix.NSFS_MAGIC {
		return errors.New("not a namespace file (nsfs)")
	}
	typ, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.NS_GET_NSTYPE, 0)
	if errno != 0 {
		return fmt.Errorf("NS_GET_NSTYPE: %w", errno)
	}
	if typ != unix.CLONE_NEWNET {
		return fmt.Errorf("namespace type %#x is not a network namespace", typ)
	}
	return nil
}

func (n *Handle) Fd() int        { return n.fd }
func (n *Handle) Path() string   { return n.path }
func (n *Handle) Cookie() uint64 { return n.cookie }

// Close releases the handle; closing twice is harmless.
func (n *Handle) Close() error {
	if n == nil || n.fd < 0 {
		return nil
	}
	fd := n.fd
	n.fd = -1
	if err := unix.Close(fd); err != nil {
		return fmt.Errorf("close netns %s: %w", n.path, err)
	}
	return nil
}

// Seams for tests: they simulate a kernel without NS_GET_ID and a setns that fails or
// silently does nothing.
var (
	nsGetID = ioctlNsGetID
	setns   = unix.Setns
)

func ioctlNsGetID(fd int) (uint64, error) {
	var id uint64
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.NS_GET_ID, uintptr(unsafe.Pointer(&id)))
	if errno != 0 {
		return 0, errno
	}
	return id, nil
}

// Cookie is the kernel's cookie of the network namespace fd refers to, the value
// bpf_get_netns_cookie returns for its sockets. NS_GET_ID gives it directly on recent
// kernels (6.18 here); older ones (5.14+) answer through SO_NETNS_COOKIE on a socket
// created inside the namespace.
func Cookie(fd int) (uint64, error) {
	id, err := nsGetID(fd)
	if err == nil {
		return id, nil
	}
	if !errors.Is(err, unix.ENOTTY) && !errors.Is(err, unix.EINVAL) {
		return 0, fmt.Errorf("netns cookie: NS_GET_ID: %w", err)
	}
	var cookie uint64
	err = Do(fd, func() error {
		s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			// A kernel built without IPv4 still has IPv6 sockets.
			s, err = unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		}
		if err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		defer unix.Close(s)
		cookie, err = unix.GetsockoptUint64(s, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		if err != nil {
			return fmt.Errorf("SO_NETNS_COOKIE: %w", err)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("netns cookie (NS_GET_ID unsupported): %w", err)
	}
	return cookie, nil
}

// Do runs f on an OS thread that has entered the network namespace fd, then moves
// the thread back and checks that it really is back before handing it to the scheduler.
// A thread that cannot be restored stays locked when its goroutine ends, so the Go
// runtime terminates it instead of reusing it in the wrong namespace. (If that thread is
// the main thread, Go wedges it rather than ending it, and /proc/self/ns/net then names
// the wrong netns: a program can lock its main goroutine in init to rule that out, and
// should not take /proc/self/ns/net to mean "the host netns" in any case.)
//
// Sockets f creates belong to the namespace for their whole life; goroutines f starts do
// not run in it. A panic in f is re-raised in the caller after the thread is dealt with.
func Do(fd int, f func() error) error {
	type result struct {
		err      error
		panicked any
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		var res result
		guarded := func() (err error) {
			defer func() {
				if r := recover(); r != nil {
					res.panicked = r
					err = errors.New("panic in netns function")
				}
			}()
			return f()
		}
		restored, err := runIn(fd, guarded)
		res.err = err
		if restored {
			runtime.UnlockOSThread()
		}
		done <- res
	}()
	res := <-done
	if res.panicked != nil {
		panic(res.panicked)
	}
	return res.err
}

// runIn does Do's work on the current, already locked thread. restored reports
// whether the thread is in its original network namespace again.
func runIn(fd int, f func() error) (restored bool, err error) {
	const self = "/proc/thread-self/ns/net"
	orig, err := unix.Open(self, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return true, fmt.Errorf("open %s: %w", self, err)
	}
	defer unix.Close(orig)
	origID, err := nsIdentity(orig)
	if err != nil {
		return true, err
	}
	targetID, err := nsIdentity(fd)
	if err != nil {
		return true, err
	}
	if err := setns(fd, unix.CLONE_NEWNET); err != nil {
		// setns fails as a whole, but whether the thread may be reused is checked, not assumed.
		return threadIn(origID) == nil, fmt.Errorf("enter netns: %w", err)
	}
	defer func() {
		restoreErr := setns(orig, unix.CLONE_NEWNET)
		if restoreErr == nil {
			restoreErr = threadIn(origID)
		}
		if restoreErr != nil {
			restored = false
			err = errors.Join(err, fmt.Errorf("restore netns: %w", restoreErr))
			return
		}
		restored = true
	}()
	if err := threadIn(targetID); err != nil {
		return false, fmt.Errorf("enter netns: %w", err)
	}
	return false, f()
}

type nsID struct{ dev, ino uint64 }

func nsIdentity(fd int) (nsID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nsID{}, fmt.Errorf("fstat netns: %w", err)
	}
	return nsID{dev: st.Dev, ino: st.Ino}, nil
}

// threadIn checks which network namespace the calling thread is in now.
func threadIn(want nsID) error {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return fmt.Errorf("stat /proc/thread-self/ns/net: %w", err)
	}
	if got := (nsID{dev: st.Dev, ino: st.Ino}); got != want {
		return fmt.Errorf("thread is in netns inode %d, want %d", got.ino, want.ino)
	}
	return nil
}

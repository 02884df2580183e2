package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/test/testenv"
)

// A holder is a child process of the bench that lives in one netns and holds sockets
// there: the listeners of both bench backends, the client sockets the bench asks for (in
// named groups), and their server ends. Spreading 100,000 connections over processes keeps
// each under the open file limit, which this machine does not let root raise.
//
// It reads one command per line on stdin and answers one line on stdout:
//
//	connect GROUP VIP:PORT N -> "ok"          N more client sockets, through the VIP
//	check GROUP              -> "aborted N"   every socket of the group has ECONNABORTED
//	close GROUP              -> "ok"          close the group's sockets and their server ends
//
// Failures answer "error ...". EOF on stdin ends it.
func runHolder(nsPath string) int {
	// This thread enters the netns for good, and every socket is made on it.
	runtime.LockOSThread()
	fail := func(err error) int {
		fmt.Printf("error %v\n", err)
		return 1
	}
	nsfd, err := unix.Open(nsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fail(err)
	}
	if err := unix.Setns(nsfd, unix.CLONE_NEWNET); err != nil {
		return fail(fmt.Errorf("setns %s: %w", nsPath, err))
	}
	h := &heldSockets{groups: map[string][]int{}, locals: map[string][]netip.AddrPort{}, servers: map[netip.AddrPort]int{}}
	for _, b := range []netip.AddrPort{backendX, backendY} {
		if err := h.listen(b); err != nil {
			return fail(err)
		}
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		fmt.Println(h.do(strings.Fields(in.Text())))
	}
	return 0
}

func (h *heldSockets) do(f []string) string {
	switch {
	case len(f) == 4 && f[0] == "connect":
		addr, err1 := netip.ParseAddrPort(f[2])
		n, err2 := strconv.Atoi(f[3])
		if err := errors.Join(err1, err2); err != nil {
			return "error " + err.Error()
		}
		if err := h.connect(f[1], addr, n); err != nil {
			return "error " + err.Error()
		}
		return "ok"
	case len(f) == 2 && f[0] == "check":
		if err := h.checkAborted(f[1]); err != nil {
			return "error " + err.Error()
		}
		return fmt.Sprintf("aborted %d", len(h.groups[f[1]]))
	case len(f) == 2 && f[0] == "close":
		if err := h.closeGroup(f[1]); err != nil {
			return "error " + err.Error()
		}
		return "ok"
	}
	return fmt.Sprintf("error unknown command %q", strings.Join(f, " "))
}

type heldSockets struct {
	groups map[string][]int // client sockets by group
	// locals are the local addresses of each group's clients, read at connect: a destroyed
	// socket no longer reports its port.
	locals map[string][]netip.AddrPort
	mu     sync.Mutex
	// servers are the accepted ends, by the client's address.
	servers map[netip.AddrPort]int
}

func (h *heldSockets) listen(addr netip.AddrPort) error {
	lfd, err := listenTCP(addr)
	if err != nil {
		return err
	}
	go acceptEach(lfd, func(fd int, peer unix.Sockaddr) {
		h.mu.Lock()
		h.servers[testenv.AddrPort(peer)] = fd
		h.mu.Unlock()
	})
	return nil
}

func (h *heldSockets) connect(group string, addr netip.AddrPort, n int) error {
	sa := testenv.Sockaddr(unix.AF_INET, addr)
	for range n {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		h.groups[group] = append(h.groups[group], fd)
		if err := testenv.Connect(fd, sa); err != nil {
			return fmt.Errorf("connect %s: %w", addr, err)
		}
		local, err := unix.Getsockname(fd)
		if err != nil {
			return err
		}
		h.locals[group] = append(h.locals[group], testenv.AddrPort(local))
	}
	return nil
}

func (h *heldSockets) checkAborted(group string) error {
	for _, fd := range h.groups[group] {
		soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			return fmt.Errorf("SO_ERROR: %w", err)
		}
		if unix.Errno(soErr) != unix.ECONNABORTED {
			return fmt.Errorf("a client socket was not aborted: SO_ERROR %w", unix.Errno(soErr))
		}
	}
	return nil
}

func (h *heldSockets) closeGroup(group string) error {
	clients := h.locals[group]
	closeAll(h.groups[group])
	delete(h.groups, group)
	delete(h.locals, group)
	// A server end may still sit in the accept queue: wait for it, briefly.
	if !testenv.WaitFor(5*time.Second, func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		for len(clients) > 0 {
			fd, ok := h.servers[clients[0]]
			if !ok {
				return false
			}
			unix.Close(fd)
			delete(h.servers, clients[0])
			clients = clients[1:]
		}
		return true
	}) {
		h.mu.Lock()
		held := len(h.servers)
		h.mu.Unlock()
		return fmt.Errorf("%d server ends never accepted (first of %s; %d other server ends held)", len(clients), clients[0], held)
	}
	return nil
}

// holder is the bench's end of a holder process.
type holder struct {
	e   *env
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

// startHolder runs a holder in the netns at nsPath. It inherits this process's cgroup, so
// start it while in the cgroup whose programs must see its sockets.
func startHolder(e *env, nsPath string) *holder {
	self, err := os.Executable()
	if err != nil {
		e.Fatal(err)
	}
	cmd := exec.Command(self, "-holder", nsPath)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		e.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		e.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		e.Fatal(err)
	}
	h := &holder{e: e, cmd: cmd, in: in, out: bufio.NewScanner(out)}
	e.Cleanup(func() {
		in.Close()
		cmd.Wait()
	})
	return h
}

func (h *holder) send(cmd string) {
	if _, err := fmt.Fprintln(h.in, cmd); err != nil {
		// The holder is gone; what it said last says why.
		h.reply()
		h.e.Fatalf("holder: %v", err)
	}
}

// reply waits for the holder's answer and fails the bench on an error.
func (h *holder) reply() {
	if !h.out.Scan() {
		h.e.Fatalf("holder ended: %v", h.out.Err())
	}
	if r := h.out.Text(); strings.HasPrefix(r, "error") {
		h.e.Fatalf("holder: %s", r)
	}
}

// all sends one command to every holder, then collects the replies, so they work at once.
func all(hs []*holder, cmd string) {
	for _, h := range hs {
		h.send(cmd)
	}
	for _, h := range hs {
		h.reply()
	}
}

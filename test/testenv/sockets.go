package testenv

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Backend is a test server that answers every TCP connection or UDP datagram with its ID,
// so a client knows exactly which backend it reached.
type Backend struct {
	ID   string
	Addr netip.AddrPort

	mu   sync.Mutex
	hits int
}

// Hits is how many connections or datagrams the backend answered.
func (b *Backend) Hits() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.hits
}

func (b *Backend) hit() {
	b.mu.Lock()
	b.hits++
	b.mu.Unlock()
}

// StartTCPBackend listens in the netns and writes the backend ID to every connection.
func StartTCPBackend(t TB, ns *Netns, id string, addr netip.AddrPort) *Backend {
	t.Helper()
	var ln net.Listener
	err := ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", addr.String())
		return err
	})
	if err != nil {
		t.Fatalf("backend %s: %v", id, err)
	}
	b := &Backend{ID: id, Addr: addr}
	done := make(chan struct{})
	var connMu sync.Mutex
	var conns []net.Conn
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.hit()
			connMu.Lock()
			conns = append(conns, c)
			connMu.Unlock()
			go func() {
				defer c.Close()
				c.Write([]byte(id + "\n"))
				// Keep the connection until the client closes it.
				buf := make([]byte, 64)
				for {
					if _, err := c.Read(buf); err != nil {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		// Connections a client kept open would otherwise keep the netns alive.
		connMu.Lock()
		for _, c := range conns {
			c.Close()
		}
		connMu.Unlock()
	})
	return b
}

// StartUDPBackend answers every datagram with the backend ID, to the datagram's source.
func StartUDPBackend(t TB, ns *Netns, id string, addr netip.AddrPort) *Backend {
	t.Helper()
	return StartDelayedUDPBackend(t, ns, id, addr, 0)
}

// StartDelayedUDPBackend answers like StartUDPBackend, after the given delay: a reply that
// is still in flight while the test changes the service.
func StartDelayedUDPBackend(t TB, ns *Netns, id string, addr netip.AddrPort, delay time.Duration) *Backend {
	t.Helper()
	var pc net.PacketConn
	err := ns.Do(func() (err error) {
		pc, err = net.ListenPacket("udp", addr.String())
		return err
	})
	if err != nil {
		t.Fatalf("backend %s: %v", id, err)
	}
	b := &Backend{ID: id, Addr: addr}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			b.hit()
			if delay > 0 {
				go func() {
					time.Sleep(delay)
					pc.WriteTo([]byte(id), from)
				}()
				continue
			}
			pc.WriteTo([]byte(id), from)
		}
	}()
	t.Cleanup(func() { pc.Close(); <-done })
	return b
}

// Socket creates a socket inside the netns. family is unix.AF_INET or unix.AF_INET6.
func Socket(ns *Netns, family, typ int) (int, error) {
	fd := -1
	err := ns.Do(func() (err error) {
		fd, err = unix.Socket(family, typ|unix.SOCK_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	// Bounded waits: a datapath bug must fail the test, not hang it.
	tv := unix.Timeval{Sec: 2}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	return fd, nil
}

// Sockaddr converts an address to the sockaddr of the given family; an IPv4 address for
// an AF_INET6 socket becomes v4-mapped.
func Sockaddr(family int, ap netip.AddrPort) unix.Sockaddr {
	if family == unix.AF_INET6 {
		return &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
	}
	return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
}

// AddrPort converts a sockaddr back, unmapping v4-mapped addresses.
func AddrPort(sa unix.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr).Unmap(), uint16(a.Port))
	}
	return netip.AddrPort{}
}

func family(ap netip.AddrPort) int {
	if ap.Addr().Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// TCPResult is what a client learned from one connection through a VIP.
type TCPResult struct {
	Backend string         // the ID the server sent
	Peer    netip.AddrPort // what getpeername() returned
	FD      int            // still open when Keep was asked for
}

// DialTCP connects from the netns to addr (family: unix.AF_INET/AF_INET6; 0 = addr's own),
// reads the backend's ID and returns it with getpeername()'s answer. The socket is closed
// unless keep is set.
func DialTCP(ns *Netns, fam int, addr netip.AddrPort, keep bool) (TCPResult, error) {
	if fam == 0 {
		fam = family(addr)
	}
	fd, err := Socket(ns, fam, unix.SOCK_STREAM)
	if err != nil {
		return TCPResult{}, err
	}
	res := TCPResult{FD: -1}
	defer func() {
		if !keep || res.FD < 0 {
			unix.Close(fd)
		}
	}()
	if err := Connect(fd, Sockaddr(fam, addr)); err != nil {
		return res, fmt.Errorf("connect %s: %w", addr, err)
	}
	peer, err := unix.Getpeername(fd)
	if err != nil {
		return res, fmt.Errorf("getpeername: %w", err)
	}
	res.Peer = AddrPort(peer)
	id, err := readLine(fd)
	if err != nil {
		return res, err
	}
	res.Backend = id
	if keep {
		res.FD = fd
	}
	return res, nil
}

func readLine(fd int) (string, error) {
	var sb strings.Builder
	buf := make([]byte, 64)
	for !strings.Contains(sb.String(), "\n") {
		n, err := ignoringEINTR(func() (int, error) { return unix.Read(fd, buf) })
		if err != nil {
			return sb.String(), fmt.Errorf("read: %w", err)
		}
		if n == 0 {
			return sb.String(), errors.New("read: connection closed before the backend's ID")
		}
		sb.Write(buf[:n])
	}
	return strings.TrimSpace(sb.String()), nil
}

// UDPResult is what a client learned from one datagram exchange.
type UDPResult struct {
	Backend string         // the ID the server sent back
	From    netip.AddrPort // the reply's source as recvfrom() reported it
}

// UDPExchange sends one datagram on fd (to addr, or on the connected peer if addr is not
// valid) and reads one reply.
func UDPExchange(fd, fam int, addr netip.AddrPort) (UDPResult, error) {
	var err error
	if addr.IsValid() {
		err = unix.Sendto(fd, []byte("ping"), 0, Sockaddr(fam, addr))
	} else {
		_, err = unix.Write(fd, []byte("ping"))
	}
	if err != nil {
		return UDPResult{}, fmt.Errorf("send: %w", err)
	}
	buf := make([]byte, 1500)
	var from unix.Sockaddr
	n, err := ignoringEINTR(func() (n int, err error) {
		n, from, err = unix.Recvfrom(fd, buf, 0)
		return n, err
	})
	if err != nil {
		return UDPResult{}, fmt.Errorf("recvfrom: %w", err)
	}
	res := UDPResult{Backend: string(buf[:n])}
	if from != nil {
		res.From = AddrPort(from)
	}
	return res, nil
}

// Connect is a blocking connect(2) that survives the Go runtime's preemption signals: an
// interrupted connect goes on in the kernel, so wait for it instead of failing.
func Connect(fd int, sa unix.Sockaddr) error {
	err := unix.Connect(fd, sa)
	for errors.Is(err, unix.EINTR) || errors.Is(err, unix.EALREADY) {
		time.Sleep(time.Millisecond)
		err = unix.Connect(fd, sa)
		if errors.Is(err, unix.EISCONN) {
			return nil
		}
	}
	return err
}

func ignoringEINTR(fn func() (int, error)) (int, error) {
	for {
		n, err := fn()
		if !errors.Is(err, unix.EINTR) {
			return n, err
		}
	}
}

// IsUnreachable says the kernel refused to route the address locally (the blackhole
// route at work), as opposed to anything that could have sent a packet.
func IsUnreachable(err error) bool {
	return errors.Is(err, unix.ENETUNREACH) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EHOSTUNREACH)
}

// WaitFor polls cond every 10 ms until it holds or the timeout passes.
func WaitFor(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

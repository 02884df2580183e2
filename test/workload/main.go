// Command workload is the only binary in the e2e test image: the pause process, the
// backends and the clients. Its output is one line per event so that tests can assert on
// what the application saw (which backend answered, which peer getpeername reported, which
// errno a failure had).
//
//	workload pause
//	workload serve tcp|udp PORT NAME
//	workload dial tcp|udp ADDR [COUNT]
//	workload hold tcp|udp ADDR
//	workload ping tcp|udp ADDR
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const timeout = 2 * time.Second

func main() {
	os.Exit(run(os.Args[1:], os.Stdout))
}

func run(args []string, out io.Writer) int {
	cmd, err := parseArgs(args)
	if err != nil {
		fmt.Fprintf(os.Stderr, "workload: %v\n", err)
		return 2
	}
	switch cmd.name {
	case "pause":
		waitForSignal()
		return 0
	case "serve":
		return serve(cmd, out)
	case "dial":
		return dial(cmd, out)
	case "hold":
		return hold(cmd, out)
	case "ping":
		return ping(cmd, out)
	}
	return 2
}

type command struct {
	name  string
	proto string
	addr  string // host:port for dial/hold, :port for serve
	label string // the NAME a server replies with
	count int
}

func parseArgs(args []string) (command, error) {
	if len(args) == 0 {
		return command{}, errors.New("usage: workload pause | serve tcp|udp PORT NAME | dial tcp|udp ADDR [COUNT] | hold tcp|udp ADDR | ping tcp|udp ADDR")
	}
	c := command{name: args[0], count: 1}
	rest := args[1:]
	wantProto := func(allowed ...string) error {
		if len(rest) == 0 {
			return fmt.Errorf("%s: missing protocol", c.name)
		}
		for _, a := range allowed {
			if rest[0] == a {
				c.proto = a
				return nil
			}
		}
		return fmt.Errorf("%s: protocol %q not one of %v", c.name, rest[0], allowed)
	}
	switch c.name {
	case "pause":
		if len(rest) != 0 {
			return c, errors.New("pause: takes no arguments")
		}
	case "serve":
		if len(rest) != 3 {
			return c, errors.New("serve: want tcp|udp PORT NAME")
		}
		if err := wantProto("tcp", "udp"); err != nil {
			return c, err
		}
		port, err := strconv.ParseUint(rest[1], 10, 16)
		if err != nil || port == 0 {
			return c, fmt.Errorf("serve: bad port %q", rest[1])
		}
		c.addr = ":" + rest[1]
		c.label = rest[2]
	case "dial", "hold", "ping":
		if c.name == "dial" && (len(rest) < 2 || len(rest) > 3) {
			return c, errors.New("dial: want tcp|udp ADDR [COUNT]")
		}
		if c.name != "dial" && len(rest) != 2 {
			return c, fmt.Errorf("%s: want tcp|udp ADDR", c.name)
		}
		if err := wantProto("tcp", "udp"); err != nil {
			return c, err
		}
		if _, _, err := net.SplitHostPort(rest[1]); err != nil {
			return c, fmt.Errorf("%s: bad address %q: %w", c.name, rest[1], err)
		}
		c.addr = rest[1]
		if len(rest) == 3 {
			n, err := strconv.Atoi(rest[2])
			if err != nil || n < 1 {
				return c, fmt.Errorf("dial: bad count %q", rest[2])
			}
			c.count = n
		}
	default:
		return c, fmt.Errorf("unknown subcommand %q", c.name)
	}
	return c, nil
}

// waitForSignal blocks until SIGTERM or SIGINT. As PID 1 of a container the process gets
// no default signal handling, so without a handler a stop would wait for SIGKILL.
func waitForSignal() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	<-sigs
}

func serve(c command, out io.Writer) int {
	closer, err := startServer(c)
	if err != nil {
		return fail(out, err)
	}
	defer closer.Close()
	fmt.Fprintf(out, "listening proto=%s addr=%s name=%s\n", c.proto, closer.addr, c.label)
	waitForSignal()
	return 0
}

type server struct {
	io.Closer
	addr string
}

func startServer(c command) (server, error) {
	reply := []byte(c.label + "\n")
	if c.proto == "udp" {
		pc, err := net.ListenPacket("udp", c.addr)
		if err != nil {
			return server{}, err
		}
		go func() {
			buf := make([]byte, 64<<10)
			for {
				_, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo(reply, from)
			}
		}()
		return server{pc, pc.LocalAddr().String()}, nil
	}
	ln, err := net.Listen("tcp", c.addr)
	if err != nil {
		return server{}, err
	}
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				if _, err := conn.Write(reply); err != nil {
					return
				}
				io.Copy(conn, conn)
			}()
		}
	}()
	return server{ln, ln.Addr().String()}, nil
}

func dial(c command, out io.Writer) int {
	for range c.count {
		name, peer, err := dialOnce(c.proto, c.addr)
		if err != nil {
			return fail(out, err)
		}
		fmt.Fprintf(out, "reply=%s peer=%s\n", name, peer)
	}
	return 0
}

func dialOnce(proto, addr string) (name, peer string, err error) {
	conn, err := net.DialTimeout(proto, addr, timeout)
	if err != nil {
		return "", "", err
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		return "", "", err
	}
	if proto == "udp" {
		if _, err := conn.Write([]byte("x")); err != nil {
			return "", "", err
		}
	}
	name, err = readLine(conn, proto)
	if err != nil {
		return "", "", err
	}
	peer, err = peerName(conn)
	if err != nil {
		return "", "", err
	}
	return name, peer, nil
}

// hold connects (a connected UDP socket for udp), reads one reply and then blocks reading
// until the socket fails: that moment is what the socket-destroy tests wait for.
func hold(c command, out io.Writer) int {
	conn, err := net.DialTimeout(c.proto, c.addr, timeout)
	if err != nil {
		return fail(out, err)
	}
	defer conn.Close()
	peer, err := peerName(conn)
	if err != nil {
		return fail(out, err)
	}
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		return fail(out, err)
	}
	var rest io.Reader = conn
	var line string
	if c.proto == "udp" {
		if _, err := conn.Write([]byte("ping")); err != nil {
			return fail(out, err)
		}
		line, err = readLine(conn, "udp")
	} else {
		br := bufio.NewReader(conn)
		rest = br
		line, err = br.ReadString('\n')
	}
	if err != nil {
		return fail(out, err)
	}
	fmt.Fprintf(out, "connected peer=%s reply=%s\n", peer, strings.TrimSuffix(line, "\n"))
	if err := conn.SetDeadline(time.Time{}); err != nil {
		return fail(out, err)
	}
	_, err = io.Copy(io.Discard, rest)
	if err == nil {
		err = io.EOF
	}
	fmt.Fprintf(out, "read-error=%s\n", errnoName(err))
	return 0
}

// pingInterval is how often ping exchanges on its socket.
const pingInterval = 100 * time.Millisecond

// ping keeps one socket (a connected UDP socket for udp) and exchanges on it every
// pingInterval, printing each time what the application sees: the reply, and the peer
// (getpeername) for TCP or the reply's source address (recvfrom) for UDP. It stops at the
// first error, which it prints as read-error: what the upgrade tests watch across an
// agent replaced under live sockets.
func ping(c command, out io.Writer) int {
	conn, err := net.DialTimeout(c.proto, c.addr, timeout)
	if err != nil {
		return fail(out, err)
	}
	defer conn.Close()
	var br *bufio.Reader
	greeting := ""
	if c.proto == "tcp" {
		br = bufio.NewReader(conn)
		if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
			return fail(out, err)
		}
		if greeting, err = br.ReadString('\n'); err != nil {
			return fail(out, err)
		}
	}
	for i := 0; ; i++ {
		if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
			return fail(out, err)
		}
		var reply, from string
		if c.proto == "tcp" {
			if _, err = conn.Write([]byte("p\n")); err == nil {
				if _, err = br.ReadString('\n'); err == nil {
					reply = strings.TrimSuffix(greeting, "\n")
					from, err = peerName(conn)
				}
			}
		} else {
			if _, err = conn.Write([]byte("ping")); err == nil {
				reply, from, err = recvFrom(conn)
			}
		}
		if err != nil {
			fmt.Fprintf(out, "read-error=%s\n", errnoName(err))
			return 0
		}
		fmt.Fprintf(out, "ping=%d reply=%s from=%s\n", i, reply, from)
		time.Sleep(pingInterval)
	}
}

// recvFrom reads one datagram with recvfrom(2), for the source address the kernel (and
// socket-LB's recvmsg program) report.
func recvFrom(conn net.Conn) (reply, from string, err error) {
	raw, err := conn.(syscall.Conn).SyscallConn()
	if err != nil {
		return "", "", err
	}
	buf := make([]byte, 512)
	var n int
	var sa unix.Sockaddr
	var rerr error
	err = raw.Read(func(fd uintptr) bool {
		n, sa, rerr = unix.Recvfrom(int(fd), buf, 0)
		return rerr != unix.EAGAIN
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return "", "", err
	}
	return strings.TrimSuffix(string(buf[:n]), "\n"), sockaddrString(sa), nil
}

// readLine reads the server's greeting. A UDP reply is one datagram, so a buffered reader
// would be wrong there.
func readLine(conn net.Conn, proto string) (string, error) {
	if proto == "udp" {
		buf := make([]byte, 512)
		n, err := conn.Read(buf)
		if err != nil {
			return "", err
		}
		return strings.TrimSuffix(string(buf[:n]), "\n"), nil
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSuffix(line, "\n"), nil
}

// peerName asks the kernel with getpeername(2) instead of trusting net.Conn.RemoteAddr,
// which may be the address the program dialled: the point is what the socket reports.
func peerName(conn net.Conn) (string, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return "", errors.New("connection has no file descriptor")
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return "", err
	}
	var sa unix.Sockaddr
	var serr error
	if err := raw.Control(func(fd uintptr) { sa, serr = unix.Getpeername(int(fd)) }); err != nil {
		return "", err
	}
	if serr != nil {
		return "", fmt.Errorf("getpeername: %w", serr)
	}
	return sockaddrString(sa), nil
}

func sockaddrString(sa unix.Sockaddr) string {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port))
	case *unix.SockaddrInet6:
		return net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port))
	}
	return fmt.Sprintf("%v", sa)
}

func fail(out io.Writer, err error) int {
	fmt.Fprintf(out, "error=%s %v\n", errnoName(err), err)
	return 1
}

// errnoName turns an error into the errno a C program would have seen, so that tests can
// match ECONNREFUSED, ENETUNREACH, ECONNABORTED, ... instead of Go's wording.
func errnoName(err error) string {
	var errno syscall.Errno
	switch {
	case errors.As(err, &errno):
		if name := unix.ErrnoName(errno); name != "" {
			return name
		}
		return fmt.Sprintf("errno%d", int(errno))
	case errors.Is(err, os.ErrDeadlineExceeded):
		return "ETIMEDOUT"
	case errors.Is(err, io.EOF):
		return "EOF"
	}
	var nerr net.Error
	if errors.As(err, &nerr) && nerr.Timeout() {
		return "ETIMEDOUT"
	}
	return "EUNKNOWN"
}

package revnat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/test/testenv"
)

// VIPRange is blackholed in the netns before anything sends: a translation that fails
// shows up as a send error, never as a packet.
const VIPRange = "10.96.0.0/12"

// Two services per socket, as a resolver with two name servers has: each socket holds a
// translation per backend in both datapaths, so a reply can be reversed wrongly to the
// other service's VIP as well as left showing its backend.
var services = []struct{ vip, backend netip.AddrPort }{
	{netip.MustParseAddrPort("10.96.0.53:53"), netip.MustParseAddrPort("10.88.0.5:5353")},
	{netip.MustParseAddrPort("10.96.0.54:53"), netip.MustParseAddrPort("10.88.0.6:5353")},
}

// Config is one churn: Sockets unconnected UDP sockets open at once, each sending
// PerService datagrams to every service per round and reading the replies only once every
// socket has sent, so Sockets × services × PerService replies are in flight together. After
// each round a quarter of the sockets, picked at random, is closed and replaced; the rest
// stay open into the next round.
type Config struct {
	Sockets    int
	LRUSize    int
	Rounds     int
	PerService int
}

// Count is what one datapath did under the churn.
type Count struct {
	Sent    int
	Replies int // received
	Wrong   int // received from an address other than the VIP the datagram went to
	Elapsed time.Duration
}

// Lost are the replies that never came back (none should, over loopback).
func (c Count) Lost() int { return c.Sent - c.Replies }

// Result compares the LRU baseline with podsock under the same churn.
type Result struct {
	LRU, Podsock Count
	// LRUEntries is what the LRU held at the end: its size, when the churn filled it.
	LRUEntries int
}

// InFlight is how many replies wait to be read at once.
func (c Config) InFlight() int { return c.Sockets * len(services) * c.PerService }

// Run builds a netns with the two services' echo backends and two sibling cgroups, one
// with the LRU baseline attached and one with podsock's datapath, and runs the churn from
// each in turn. Everything it creates is removed at cleanup.
func Run(t testenv.TB, cfg Config) Result {
	t.Helper()
	ns := testenv.NewNetns(t, []string{VIPRange}, "10.88.0.5/32", "10.88.0.6/32")
	var echoed atomic.Int64
	for _, s := range services {
		startEcho(t, ns, s.backend, &echoed)
	}
	home, err := testenv.HomeCgroup()
	if err != nil {
		t.Fatal(err)
	}
	cgLRU, cgPodsock := testenv.NewCgroup(t), testenv.NewCgroup(t)
	for _, cg := range []*testenv.Cgroup{cgLRU, cgPodsock} {
		requireUnreachable(t, home, cg, ns)
	}

	bpffs := testenv.BPFFS(t)
	dp, err := datapath.Load(datapath.Options{CgroupRoot: cgPodsock.Path, BPFFS: bpffs})
	if err != nil {
		t.Fatalf("load podsock's datapath at %s: %v", cgPodsock.Path, err)
	}
	t.Cleanup(func() {
		dp.Close()
		if err := datapath.Cleanup(bpffs); err != nil {
			t.Errorf("clean up podsock's datapath: %v", err)
		}
	})
	svcs := make([]datapath.Service, len(services))
	byVIP := map[netip.AddrPort]netip.AddrPort{}
	for i, s := range services {
		svcs[i] = datapath.Service{Name: fmt.Sprintf("bench/dns-%d", i), VIP: s.vip.Addr(), Port: s.vip.Port(),
			Proto: datapath.ProtoUDP, Backends: []datapath.Backend{{Addr: s.backend, Weight: 1}}}
		byVIP[s.vip] = s.backend
	}
	if _, err := dp.Apply(svcs); err != nil {
		t.Fatalf("apply services to podsock's datapath: %v", err)
	}
	lru := LoadLRU(t, cgLRU, cfg.LRUSize, byVIP)

	var res Result
	res.LRU = churn(t, home, cgLRU, ns, cfg, &echoed)
	if res.LRUEntries, err = lru.Entries(); err != nil {
		t.Fatal(err)
	}
	res.Podsock = churn(t, home, cgPodsock, ns, cfg, &echoed)
	return res
}

// requireUnreachable fails unless a datagram to the first VIP from cg is refused before any
// datapath is attached: a churn that passes without one would prove nothing.
func requireUnreachable(t testenv.TB, home, cg *testenv.Cgroup, ns *testenv.Netns) {
	t.Helper()
	fds := openSockets(t, home, cg, ns, 1)
	defer unix.Close(fds[0])
	err := unix.Sendto(fds[0], []byte("probe"), 0, testenv.Sockaddr(unix.AF_INET, services[0].vip))
	if !testenv.IsUnreachable(err) {
		t.Fatalf("datagram to %s from %s with no datapath attached: %v, want the blackhole's refusal", services[0].vip, cg.Path, err)
	}
}

// churn runs cfg's rounds from sockets created in cg and counts every reply by whether
// its source is the VIP its datagram was sent to. The payload names the service, so a
// reply reversed to the other service's VIP counts as wrong too.
func churn(t testenv.TB, home, cg *testenv.Cgroup, ns *testenv.Netns, cfg Config, echoed *atomic.Int64) Count {
	t.Helper()
	pool := openSockets(t, home, cg, ns, cfg.Sockets)
	defer func() {
		for _, fd := range pool {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
	}()
	var c Count
	start := time.Now()
	perSocket := len(services) * cfg.PerService
	var buf [64]byte
	for range cfg.Rounds {
		base := echoed.Load()
		sent := 0
		for n, i := range rand.Perm(len(pool)) {
			for s, svc := range services {
				for seq := range cfg.PerService {
					binary.LittleEndian.PutUint32(buf[0:], uint32(i))
					buf[4], buf[5] = byte(s), byte(seq)
					if err := unix.Sendto(pool[i], buf[:8], 0, testenv.Sockaddr(unix.AF_INET, svc.vip)); err != nil {
						t.Fatalf("sendto %s: %v", svc.vip, err)
					}
					sent++
				}
			}
			// The echo servers' queues stay short; the replies pile up where they should,
			// in the clients' sockets, unread.
			if n%256 == 255 {
				waitEchoed(echoed, base+int64(sent))
			}
		}
		waitEchoed(echoed, base+int64(sent))
		c.Sent += sent

		got := make([]int, len(pool))
		read := func(i int) {
			for got[i] < perSocket {
				n, from, err := unix.Recvfrom(pool[i], buf[:], unix.MSG_DONTWAIT)
				if errors.Is(err, unix.EINTR) {
					continue
				}
				if errors.Is(err, unix.EAGAIN) {
					return
				}
				if err != nil {
					t.Fatalf("recvfrom: %v", err)
				}
				got[i]++
				c.Replies++
				if n != 8 || binary.LittleEndian.Uint32(buf[0:]) != uint32(i) || int(buf[4]) >= len(services) {
					t.Fatalf("socket %d got a reply that is not its own: % x", i, buf[:n])
				}
				if testenv.AddrPort(from) != services[buf[4]].vip {
					c.Wrong++
				}
			}
		}
		for _, i := range rand.Perm(len(pool)) {
			read(i)
		}
		// Echoed replies are queued before the echo's sendto returns over loopback, but
		// a softirq deferred under load may hold a few back for a moment.
		deadline := time.Now().Add(time.Second)
		for short := missing(got, perSocket); len(short) > 0 && time.Now().Before(deadline); short = missing(got, perSocket) {
			time.Sleep(10 * time.Millisecond)
			for _, i := range short {
				read(i)
			}
		}

		// Closed before their replacements open: the open-file limit (20000 on this VM, and
		// root cannot raise it) then bounds the pool, not the pool and a quarter more.
		replace := rand.Perm(len(pool))[:len(pool)/4]
		for _, i := range replace {
			unix.Close(pool[i])
			pool[i] = -1
		}
		fresh := openSockets(t, home, cg, ns, len(replace))
		for k, i := range replace {
			pool[i] = fresh[k]
		}
	}
	c.Elapsed = time.Since(start)
	return c
}

func missing(got []int, want int) []int {
	var out []int
	for i, n := range got {
		if n < want {
			out = append(out, i)
		}
	}
	return out
}

// waitEchoed waits until the echo servers have answered target datagrams in all, or have
// answered nothing more for a second: what never came back is counted as lost.
func waitEchoed(echoed *atomic.Int64, target int64) {
	last, since := echoed.Load(), time.Now()
	for last < target && time.Since(since) < time.Second {
		time.Sleep(100 * time.Microsecond)
		if now := echoed.Load(); now != last {
			last, since = now, time.Now()
		}
	}
}

// openSockets creates n unconnected UDP sockets in ns while the process sits in cg: a
// socket keeps the cgroup it was created in, so cg's programs handle its datagrams.
func openSockets(t testenv.TB, home, cg *testenv.Cgroup, ns *testenv.Netns, n int) []int {
	t.Helper()
	fds := make([]int, 0, n)
	if err := cg.AddProcess(os.Getpid()); err != nil {
		t.Fatalf("enter cgroup %s: %v", cg.Path, err)
	}
	err := ns.Do(func() error {
		for range n {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("socket %d of %d: %w", len(fds)+1, n, err)
			}
			fds = append(fds, fd)
		}
		return nil
	})
	if herr := home.AddProcess(os.Getpid()); herr != nil && err == nil {
		err = fmt.Errorf("return to cgroup %s: %w", home.Path, herr)
	}
	if err != nil {
		for _, fd := range fds {
			unix.Close(fd)
		}
		t.Fatalf("open %d UDP sockets in %s: %v", n, ns.Name, err)
	}
	return fds
}

// echoQueue lets an echo server's socket hold every datagram of a batch even if its
// goroutine is descheduled meanwhile on this 2-vCPU VM.
const echoQueue = 8 << 20

// startEcho answers every datagram to addr with itself and counts the answers in echoed.
func startEcho(t testenv.TB, ns *testenv.Netns, addr netip.AddrPort, echoed *atomic.Int64) {
	t.Helper()
	var pc *net.UDPConn
	if err := ns.Do(func() error {
		c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(addr))
		pc = c
		return err
	}); err != nil {
		t.Fatalf("echo server on %s: %v", addr, err)
	}
	raw, err := pc.SyscallConn()
	if err == nil {
		var serr error
		err = raw.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, echoQueue)
		})
		if err == nil {
			err = serr
		}
	}
	if err != nil {
		pc.Close()
		t.Fatalf("echo server on %s: receive queue: %v", addr, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				if errors.Is(err, syscall.ECONNREFUSED) {
					continue
				}
				return
			}
			if _, err := pc.WriteToUDPAddrPort(buf[:n], from); err == nil {
				echoed.Add(1)
			}
		}
	}()
	t.Cleanup(func() {
		pc.Close()
		<-done
	})
}

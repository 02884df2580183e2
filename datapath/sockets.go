package datapath

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"runtime"
	"sync"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// NetnsSet is how the socket iterators reach network namespaces. iter/tcp and iter/udp see
// only the netns of the thread that opens them, so each walk happens inside the netns it
// covers. The agent implements this with the handles it holds for the host and each pod;
// tests, with the namespaces they create.
type NetnsSet interface {
	// Cookies lists the netns that Enter can reach, the host's included.
	Cookies() []uint64
	// Enter runs f on an OS thread inside the netns with that cookie, and moves the thread
	// back (or retires it) afterwards. It wraps ErrUnknownNetns when it holds no handle.
	Enter(cookie uint64, f func() error) error
}

// ErrUnknownNetns means a NetnsSet holds no handle on a netns.
var ErrUnknownNetns = errors.New("no handle on that netns")

// ErrNoIterators means this kernel cannot run the socket iterators (iter/tcp, iter/udp and
// bpf_sock_destroy need Linux 6.5): socket-LB works, listing and termination do not.
var ErrNoIterators = errors.New("socket iterators unavailable")

// Socket is one TCP or UDP socket as an iterator saw it.
type Socket struct {
	Proto  uint8
	State  uint8 // the kernel's TCP state numbering; UDP is 1 when connected, 7 when not
	Family uint8
	Local  netip.AddrPort
	// Remote is the peer the kernel socket is connected to (the backend, for a balanced
	// socket); invalid when the socket is not connected.
	Remote      netip.AddrPort
	NetnsCookie uint64
	Cookie      uint64
	UID         uint32

	// Balanced says socket-LB translated for this socket; LB is then its connected peer's
	// translation (LBConnected) or, for unconnected UDP, its first one of Translations.
	Balanced    bool
	LBConnected bool
	// Released says the application closed the socket; the kernel has not freed it yet.
	Released     bool
	Translations int
	// Service is the name of the service LB belongs to; "" when that service is gone.
	Service string
	VIP     netip.AddrPort
	Backend netip.AddrPort
}

// StateName names a socket state the way ss does.
func StateName(proto, state uint8) string {
	if proto == ProtoUDP {
		if state == unix.BPF_TCP_ESTABLISHED {
			return "ESTAB"
		}
		return "UNCONN"
	}
	names := [...]string{"", "ESTAB", "SYN-SENT", "SYN-RECV", "FIN-WAIT-1", "FIN-WAIT-2", "TIME-WAIT",
		"UNCONN", "CLOSE-WAIT", "LAST-ACK", "LISTEN", "CLOSING", "NEW-SYN-RECV"}
	if int(state) < len(names) && state != 0 {
		return names[state]
	}
	return fmt.Sprintf("state-%d", state)
}

// SocketFilter narrows a walk. The zero value matches every socket of every netns.
type SocketFilter struct {
	// Netns limits the walk to these netns; nil means every netns of the NetnsSet.
	Netns []uint64
	// Proto is ProtoTCP or ProtoUDP; 0 means both.
	Proto uint8
	// Backend keeps sockets whose remote, or any socket-LB translation, is this address.
	// Checked in BPF, so other sockets are never copied out.
	Backend netip.AddrPort
}

// WalkStats says what a walk cost.
type WalkStats struct {
	NetnsEntered int
	// NetnsSkipped are netns that could not be entered (a pod that went away meanwhile).
	NetnsSkipped int
	Sockets      int
}

// recordSize is the size of one record the iterators write.
const recordSize = int(unsafe.Sizeof(sockiterSockRecord{}))

// readChunk bounds what a walk holds in memory at once, whatever the number of sockets.
const readChunk = 64 << 10

// open opens an iterator inside one netns. The iterator keeps that netns for its whole
// walk, so reading (and the BPF program, which runs during reads) happens after the
// thread is back.
func open(ns NetnsSet, cookie uint64, l *link.Iter) (io.ReadCloser, error) {
	var rc io.ReadCloser
	err := ns.Enter(cookie, func() error {
		var err error
		rc, err = l.Open()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open iterator in netns %d: %w", cookie, err)
	}
	return rc, nil
}

// readRecords streams an iterator's records to fn in bounded chunks. A read may end in
// the middle of a record; the rest comes with the next read.
func readRecords(rc io.Reader, fn func(*sockiterSockRecord) error) error {
	buf := make([]byte, readChunk)
	filled := 0
	eagain := 0
	for {
		n, err := rc.Read(buf[filled:])
		filled += n
		whole := filled - filled%recordSize
		for off := 0; off < whole; off += recordSize {
			var rec sockiterSockRecord
			copy(unsafe.Slice((*byte)(unsafe.Pointer(&rec)), recordSize), buf[off:off+recordSize])
			if ferr := fn(&rec); ferr != nil {
				return ferr
			}
		}
		filled = copy(buf, buf[whole:filled])
		switch {
		case err == nil:
			eagain = 0
		case errors.Is(err, io.EOF):
			if filled != 0 {
				return fmt.Errorf("iterator ended inside a record (%d stray bytes)", filled)
			}
			return nil
		case errors.Is(err, unix.EAGAIN) && eagain < 100:
			// The TCP/UDP iterators give up a batch they could not allocate with EAGAIN;
			// the next read resumes where they stopped.
			eagain++
			time.Sleep(time.Millisecond)
		default:
			return fmt.Errorf("read iterator: %w", err)
		}
	}
}

// Sockets walks the sockets of the netns in ns that match the filter and calls fn for
// each. Several netns are walked at once, so their sockets may come interleaved; fn is
// called from one goroutine at a time, never inside a netns. A netns that can no longer be
// entered is skipped and counted; an error from fn, or from reading an iterator, stops the
// walk and is returned.
func (dp *Datapath) Sockets(ns NetnsSet, f SocketFilter, fn func(Socket) error) (WalkStats, error) {
	var st WalkStats
	links, err := dp.iterLinks(f.Proto, progListTCP, progListUDP)
	if err != nil {
		return st, err
	}
	it := dp.iter
	it.listMu.Lock()
	defer it.listMu.Unlock()
	var filter sockiterListFilter
	if f.Backend.IsValid() {
		filter.Flags = sockiterFilterFlagsFILTER_BACKEND
		filter.Backend = addrWords(f.Backend.Addr())
		filter.BackendPort = htons(f.Backend.Port())
	}
	if err := it.maps.PodsockListFilter.Update(uint32(0), &filter, ebpf.UpdateAny); err != nil {
		return st, fmt.Errorf("set iterator filter: %w", err)
	}
	cookies := f.Netns
	if cookies == nil {
		cookies = ns.Cookies()
	}
	names := serviceNames{m: dp.objs.PodsockNameV2, cache: map[uint32]string{}}
	// Workers walk netns in parallel; records reach fn from this goroutine only.
	out := make(chan recordBatch, walkWorkers)
	stop := make(chan struct{})
	jobs := make(chan uint64)
	var wg sync.WaitGroup
	for range min(walkWorkers, len(cookies)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for cookie := range jobs {
				if !listNetns(ns, cookie, links, out, stop, dp) {
					return
				}
			}
		}()
	}
	go func() {
		defer close(out)
		defer wg.Wait()
		defer close(jobs)
		for _, c := range cookies {
			select {
			case jobs <- c:
			case <-stop:
				return
			}
		}
	}()
	var fnErr error
	for b := range out {
		if fnErr != nil {
			continue // draining after fn failed
		}
		switch {
		case b.err != nil:
			fnErr = b.err
			close(stop)
			continue
		case b.done && b.entered:
			st.NetnsEntered++
		case b.done:
			st.NetnsSkipped++
		}
		for i := range b.records {
			st.Sockets++
			if fnErr = fn(names.socket(&b.records[i])); fnErr != nil {
				close(stop)
				break
			}
		}
	}
	return st, fnErr
}

// walkWorkers is how many netns are walked at once. Every walk of iter/tcp and iter/udp
// traverses the node's whole socket hash tables, whatever the netns, so the walks are
// kernel work worth spreading over CPUs.
var walkWorkers = min(runtime.GOMAXPROCS(0), 4)

// recordBatch carries records of one netns from a walker; done marks the netns' end.
type recordBatch struct {
	records []sockiterSockRecord
	done    bool
	entered bool
	err     error
}

const recordsPerBatch = 512

// listNetns walks one netns with the given iterators and sends its records in batches. It
// reports false when the reader stopped.
func listNetns(ns NetnsSet, cookie uint64, links []*link.Iter, out chan<- recordBatch, stop <-chan struct{}, dp *Datapath) bool {
	send := func(b recordBatch) bool {
		select {
		case out <- b:
			return true
		case <-stop:
			return false
		}
	}
	entered := true
	for _, l := range links {
		rc, err := open(ns, cookie, l)
		if err != nil {
			// A pod that went away meanwhile is counted as skipped, even halfway through.
			entered = false
			if !errors.Is(err, ErrUnknownNetns) {
				dp.log.WithError(err).Warn("skip netns")
			}
			break
		}
		batch := recordBatch{records: make([]sockiterSockRecord, 0, recordsPerBatch)}
		err = readRecords(rc, func(r *sockiterSockRecord) error {
			batch.records = append(batch.records, *r)
			if len(batch.records) == recordsPerBatch {
				if !send(batch) {
					return errReaderStopped
				}
				batch.records = make([]sockiterSockRecord, 0, recordsPerBatch)
			}
			return nil
		})
		rc.Close()
		if errors.Is(err, errReaderStopped) {
			return false
		}
		if len(batch.records) > 0 && !send(batch) {
			return false
		}
		if err != nil {
			return send(recordBatch{err: fmt.Errorf("list sockets of netns %d: %w", cookie, err)})
		}
	}
	return send(recordBatch{done: true, entered: entered})
}

var errReaderStopped = errors.New("reader stopped")

// serviceNames resolves service IDs through the name map, once per walk.
type serviceNames struct {
	m     *ebpf.Map
	cache map[uint32]string
}

func (n *serviceNames) name(id uint32) string {
	if s, ok := n.cache[id]; ok {
		return s
	}
	var v socklbSvcName
	s := ""
	if err := n.m.Lookup(&id, &v); err == nil {
		s = nameString(v)
	}
	n.cache[id] = s
	return s
}

func (n *serviceNames) socket(r *sockiterSockRecord) Socket {
	s := Socket{
		Proto:       r.Proto,
		State:       r.State,
		Family:      r.Family,
		Local:       netip.AddrPortFrom(wordsAddr(r.Local), ntohs(r.LocalPort)),
		NetnsCookie: r.NetnsCookie,
		Cookie:      r.SockCookie,
		UID:         r.Uid,
	}
	// Every connected socket has a peer port; listening and unconnected ones have none.
	if r.RemotePort != 0 {
		s.Remote = netip.AddrPortFrom(wordsAddr(r.Remote), ntohs(r.RemotePort))
	}
	if r.Flags&sockiterRecFlagsREC_F_BALANCED != 0 {
		s.Balanced = true
		s.LBConnected = r.Flags&sockiterRecFlagsREC_F_LB_CONNECTED != 0
		s.Released = r.Flags&sockiterRecFlagsREC_F_RELEASED != 0
		s.Translations = int(r.LbCount)
		s.VIP = netip.AddrPortFrom(wordsAddr(r.Lb.Vip), ntohs(r.Lb.VipPort))
		s.Backend = netip.AddrPortFrom(wordsAddr(r.Lb.Backend), ntohs(r.Lb.BackendPort))
		s.Service = n.name(r.Lb.SvcId)
	}
	return s
}

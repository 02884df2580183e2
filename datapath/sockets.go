package datapath

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sirupsen/logrus"
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
		if state == tcpEstablished {
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

const tcpEstablished = 1

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

// Record flags, as in bpf/sockiter.c.
const (
	recBalanced    = 1
	recLBConnected = 2
	recReleased    = 4
)

// Socket flags, as in bpf/socklb.h.
const (
	sockFlagConnected = 1
	sockFlagTracked   = 2
	sockFlagReleased  = 8
	sockFlagKernel    = 16
	sockFlagEpochMask = 3 << 5
)

// Indexes of podsock_destroy_count, as enum destroy_count in bpf/sockiter.c.
const (
	countDestroyed = iota
	countDestroyFailed
	countBackfilled
	destroyCountMax
)

const filterBackend = 1

// recordSize is the size of one record the iterators write.
const recordSize = int(unsafe.Sizeof(sockiterSockRecord{}))

// readChunk bounds what a walk holds in memory at once, whatever the number of sockets.
const readChunk = 64 << 10

// iterProgram is one iterator program of bpf/sockiter.c. Each is loaded on its own: a
// kernel that refuses one (some refuse every map-element iterator, before verification)
// loses only what that program does.
type iterProgram struct {
	name string // as in bpf/sockiter.c
	// feature is how `version` and `status` name it.
	feature string
	// mapIter programs are attached to the socket storage when they run, not at load.
	mapIter bool
}

const (
	progListTCP     = "podsock_list_tcp"
	progListUDP     = "podsock_list_udp"
	progDestroyTCP  = "podsock_destroy_tcp"
	progDestroyUDP  = "podsock_destroy_udp"
	progBackfillMap = "podsock_backfill_counts"
	progBackfillTCP = "podsock_backfill_tcp"
	progBackfillUDP = "podsock_backfill_udp"
)

var iterPrograms = []iterProgram{
	{name: progListTCP, feature: "iter_list_tcp"},
	{name: progListUDP, feature: "iter_list_udp"},
	{name: progDestroyTCP, feature: "iter_destroy_tcp"},
	{name: progDestroyUDP, feature: "iter_destroy_udp"},
	{name: progBackfillMap, feature: "iter_sk_storage_map", mapIter: true},
	{name: progBackfillTCP, feature: "iter_backfill_tcp"},
	{name: progBackfillUDP, feature: "iter_backfill_udp"},
}

// sockIter holds the iterator programs that loaded, their links, and why the others did
// not. Iterator links are per process: nothing about them is pinned.
type sockIter struct {
	maps    sockiterMaps
	storage *ebpf.Map
	progs   map[string]*ebpf.Program
	links   map[string]*link.Iter
	refused map[string]error
	// One walk of each kind at a time: a listing's filter and a termination's doomed set
	// are single global maps.
	listMu, destroyMu sync.Mutex
}

// loadIterators loads each iterator program against the datapath's socket storage and
// socket counts, counting in the given epoch. Programs the kernel refuses are recorded with its reason; only an error
// that leaves no program usable (the shared maps) is returned.
func loadIterators(storage, counts *ebpf.Map, epoch uint32, log logrus.FieldLogger) (*sockIter, error) {
	spec, err := loadSockiter()
	if err != nil {
		return nil, fmt.Errorf("load iterator spec: %w", err)
	}
	if err := setCountEpoch(spec, epoch); err != nil {
		return nil, err
	}
	it := &sockIter{storage: storage, progs: map[string]*ebpf.Program{}, links: map[string]*link.Iter{}, refused: map[string]error{}}
	shared := map[string]*ebpf.Map{"podsock_sock_v1": storage, "podsock_svcnetns_v2": counts}
	for name, m := range shared {
		// The datapath's maps are sized by [limits], not as this object was built.
		spec.Maps[name].MaxEntries = m.MaxEntries()
	}
	if err := spec.LoadAndAssign(&it.maps, &ebpf.CollectionOptions{MapReplacements: shared}); err != nil {
		return nil, fmt.Errorf("create iterator maps: %w", err)
	}
	all := map[string]*ebpf.Map{
		"podsock_sock_v1": storage, "podsock_svcnetns_v2": counts,
		"podsock_list_filter": it.maps.PodsockListFilter, "podsock_doomed": it.maps.PodsockDoomed,
		"podsock_destroy_count": it.maps.PodsockDestroyCount,
	}
	for _, p := range iterPrograms {
		prog, err := loadOneProgram(spec, p.name, all)
		if err == nil && !p.mapIter {
			var l *link.Iter
			if l, err = link.AttachIter(link.IterOptions{Program: prog}); err == nil {
				it.links[p.name] = l
			} else {
				_ = prog.Close()
				err = fmt.Errorf("attach: %w", err)
			}
		}
		if err != nil {
			var verr *ebpf.VerifierError
			if errors.As(err, &verr) && len(verr.Log) > 1 {
				log.Warnf("verifier rejected %s:\n%+v", p.name, verr)
			}
			it.refused[p.name] = err
			log.WithError(err).Warnf("kernel refused iterator program %s (%s)", p.name, p.feature)
			continue
		}
		it.progs[p.name] = prog
	}
	return it, nil
}

// setCountEpoch sets the count epoch a spec's programs count in (count_epoch_now in
// bpf/counts.h).
func setCountEpoch(spec *ebpf.CollectionSpec, epoch uint32) error {
	v, ok := spec.Variables["count_epoch_now"]
	if !ok {
		return errors.New("the BPF object has no count_epoch_now")
	}
	if err := v.Set(epoch); err != nil {
		return fmt.Errorf("set count epoch: %w", err)
	}
	return nil
}

// loadOneProgram loads one program of spec, with every map it uses taken from maps.
func loadOneProgram(spec *ebpf.CollectionSpec, name string, maps map[string]*ebpf.Map) (*ebpf.Program, error) {
	ps, ok := spec.Programs[name]
	if !ok {
		return nil, fmt.Errorf("program %s is not in the object", name)
	}
	one := spec.Copy()
	one.Programs = map[string]*ebpf.ProgramSpec{name: ps}
	repl := map[string]*ebpf.Map{}
	for m := range one.Maps {
		switch mm, ok := maps[m]; {
		case ok:
			repl[m] = mm
		case strings.HasPrefix(m, "."):
			// The object's own constants (.rodata): each program gets its copy.
		default:
			delete(one.Maps, m)
		}
	}
	coll, err := ebpf.NewCollectionWithOptions(one, ebpf.CollectionOptions{MapReplacements: repl})
	if err != nil {
		return nil, err
	}
	prog := coll.DetachProgram(name)
	coll.Close()
	return prog, nil
}

func (it *sockIter) Close() error {
	var errs []error
	for _, l := range it.links {
		errs = append(errs, l.Close())
	}
	for _, p := range it.progs {
		errs = append(errs, p.Close())
	}
	errs = append(errs, it.maps.Close())
	return errors.Join(errs...)
}

// link returns the attached iterator of a program, or why there is none.
func (it *sockIter) link(name string) (*link.Iter, error) {
	if l, ok := it.links[name]; ok {
		return l, nil
	}
	return nil, fmt.Errorf("%w: %s: %w", ErrNoIterators, name, it.refused[name])
}

// features says, program by program, what the kernel accepted.
func (it *sockIter) features() []Feature {
	var out []Feature
	for _, p := range iterPrograms {
		f := Feature{Name: p.feature, Present: it.refused[p.name] == nil}
		if err := it.refused[p.name]; err != nil {
			f.Detail = err.Error()
		}
		out = append(out, f)
	}
	return out
}

// iterators returns the loaded iterators, or why there are none.
func (dp *Datapath) iterators() (*sockIter, error) {
	if dp.iter == nil {
		return nil, fmt.Errorf("%w: %w", ErrNoIterators, dp.iterErr)
	}
	return dp.iter, nil
}

// iterLinks returns the attached iterators of a pair of per-protocol programs (proto 0:
// both), or why one of them is missing.
func (dp *Datapath) iterLinks(proto uint8, tcp, udp string) ([]*link.Iter, error) {
	it, err := dp.iterators()
	if err != nil {
		return nil, err
	}
	var out []*link.Iter
	for _, p := range []struct {
		proto uint8
		name  string
	}{{ProtoTCP, tcp}, {ProtoUDP, udp}} {
		if proto != 0 && proto != p.proto {
			continue
		}
		l, err := it.link(p.name)
		if err != nil {
			return nil, err
		}
		out = append(out, l)
	}
	return out, nil
}

// ListErr says why sockets of proto (0: both) cannot be listed on this node; nil when
// they can.
func (dp *Datapath) ListErr(proto uint8) error {
	_, err := dp.iterLinks(proto, progListTCP, progListUDP)
	return err
}

// TerminateErr says why sockets of proto (0: both) cannot be terminated on this node;
// nil when they can.
func (dp *Datapath) TerminateErr(proto uint8) error {
	_, err := dp.iterLinks(proto, progDestroyTCP, progDestroyUDP)
	return err
}

// IteratorFeatures says which iterator programs this datapath loaded, and the kernel's
// reason for each it refused.
func (dp *Datapath) IteratorFeatures() []Feature {
	it, err := dp.iterators()
	if err != nil {
		var out []Feature
		for _, p := range iterPrograms {
			out = append(out, Feature{Name: p.feature, Detail: err.Error()})
		}
		return out
	}
	return it.features()
}

// backfillCounts counts the connected sockets that socket-LB balanced before their pair
// counts existed, over every socket's LB state in every netns at once. It returns how
// many it counted, or ErrNoIterators when the kernel refused the map-element iterator.
func (it *sockIter) backfillCounts() (int, error) {
	prog, ok := it.progs[progBackfillMap]
	if !ok {
		return 0, fmt.Errorf("%w: %s: %w", ErrNoIterators, progBackfillMap, it.refused[progBackfillMap])
	}
	it.destroyMu.Lock()
	defer it.destroyMu.Unlock()
	l, err := link.AttachIter(link.IterOptions{Program: prog, Map: it.storage})
	if err != nil {
		return 0, fmt.Errorf("attach backfill iterator: %w", err)
	}
	defer func() { _ = l.Close() }()
	if err := it.resetDestroyCounts(); err != nil {
		return 0, err
	}
	rc, err := l.Open()
	if err != nil {
		return 0, fmt.Errorf("open backfill iterator: %w", err)
	}
	err = readRecords(rc, func(*sockiterSockRecord) error { return nil })
	rc.Close()
	if err != nil {
		return 0, fmt.Errorf("backfill counts: %w", err)
	}
	return it.backfilled()
}

func (it *sockIter) backfilled() (int, error) {
	var n uint64
	if err := it.maps.PodsockDestroyCount.Lookup(uint32(countBackfilled), &n); err != nil {
		return 0, fmt.Errorf("read backfill count: %w", err)
	}
	return int(n), nil
}

// BackfillPending says that sockets balanced before the socket counts existed may still be
// uncounted: termination walks every netns until Backfill has run.
func (dp *Datapath) BackfillPending() bool {
	dp.backfillMu.Lock()
	defer dp.backfillMu.Unlock()
	return dp.backfillPending
}

// Backfill counts, one netns of ns at a time, the sockets balanced before the socket counts
// existed, when the kernel refused the one-pass map iterator at load. It does nothing
// when no backfill is pending, and returns how many sockets it counted.
func (dp *Datapath) Backfill(ns NetnsSet) (int, error) {
	dp.backfillMu.Lock()
	defer dp.backfillMu.Unlock()
	if !dp.backfillPending {
		return 0, nil
	}
	links, err := dp.iterLinks(0, progBackfillTCP, progBackfillUDP)
	if err != nil {
		return 0, err
	}
	it := dp.iter
	it.destroyMu.Lock()
	defer it.destroyMu.Unlock()
	if err := it.resetDestroyCounts(); err != nil {
		return 0, err
	}
	var errs []error
	for _, cookie := range ns.Cookies() {
		for _, l := range links {
			rc, err := open(ns, cookie, l)
			if errors.Is(err, ErrUnknownNetns) {
				break
			}
			if err == nil {
				err = readRecords(rc, func(*sockiterSockRecord) error { return nil })
				rc.Close()
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("backfill netns %d: %w", cookie, err))
			}
		}
	}
	n, err := it.backfilled()
	if err := errors.Join(append(errs, err)...); err != nil {
		return n, err
	}
	dp.backfillPending = false
	dp.pinCounts()
	return n, nil
}

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
		filter.Flags = filterBackend
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
	names := serviceNames{m: dp.objs.PodsockNameV1, cache: map[uint32]string{}}
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
					return errStopped
				}
				batch.records = make([]sockiterSockRecord, 0, recordsPerBatch)
			}
			return nil
		})
		rc.Close()
		if errors.Is(err, errStopped) {
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

var errStopped = errors.New("reader stopped")

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
	if r.Flags&recBalanced != 0 {
		s.Balanced = true
		s.LBConnected = r.Flags&recLBConnected != 0
		s.Released = r.Flags&recReleased != 0
		s.Translations = int(r.LbCount)
		s.VIP = netip.AddrPortFrom(wordsAddr(r.Lb.Vip), ntohs(r.Lb.VipPort))
		s.Backend = netip.AddrPortFrom(wordsAddr(r.Lb.Backend), ntohs(r.Lb.BackendPort))
		s.Service = n.name(r.Lb.SvcId)
	}
	return s
}

// RemovedBackend is a backend that a service (named by its VIP key) no longer has.
type RemovedBackend struct {
	Service string
	VIP     netip.AddrPort
	Proto   uint8
	Backend netip.AddrPort
	// ServiceID and Revision say which choices the removal ends: those the service made
	// before Revision, the first of its revisions without the backend. A socket balanced
	// to the backend after it came back is not affected.
	ServiceID, Revision uint32
}

func (b RemovedBackend) String() string {
	return fmt.Sprintf("%s (%s/%s) -> %s", b.Service, b.VIP, ProtoName(b.Proto), b.Backend)
}

// TerminateResult says what one termination pass did.
type TerminateResult struct {
	Backends  int // removed {service, backend} pairs handled
	Destroyed int // sockets bpf_sock_destroy ended
	Failed    int // sockets it refused to end
	// NetnsEntered is how many netns were walked; only those the socket counts name,
	// unless FullWalk.
	NetnsEntered int
	// NetnsUnreachable counts netns that hold sockets to a removed backend but that the
	// NetnsSet cannot enter (a netns podsock was never told about).
	NetnsUnreachable int
	// FullWalk is set when every netns was walked: asked for, or because some connected
	// socket escaped the socket counts.
	FullWalk bool
	Duration time.Duration
}

// TerminateOptions shape a termination pass.
type TerminateOptions struct {
	// Protocols are the ones whose sockets are destroyed ([lb] terminate).
	Protocols []uint8
	// WalkAllNetns walks every netns of the NetnsSet instead of only those the backend
	// counts name: what Cilium does on every removal. Benchmarks use it as the baseline.
	WalkAllNetns bool
}

// Terminate destroys the connected sockets (TCP, connected UDP; only the protocols asked
// for) whose socket-LB peer is one of the removed {service, backend} pairs. Unconnected
// UDP sockets and sockets socket-LB did not balance are never touched. It enters only the
// netns where the datapath counts sockets of those pairs, so its cost follows the affected
// sockets, not the number of netns on the node.
func (dp *Datapath) Terminate(ns NetnsSet, gone []RemovedBackend, opts TerminateOptions) (TerminateResult, error) {
	start := time.Now()
	var res TerminateResult
	var unable []error
	gone = slices.DeleteFunc(slices.Clone(gone), func(b RemovedBackend) bool {
		if !slices.Contains(opts.Protocols, b.Proto) {
			return true
		}
		if err := dp.TerminateErr(b.Proto); err != nil {
			unable = append(unable, fmt.Errorf("%s: %w", b, err))
			return true
		}
		return false
	})
	gone = dp.stillRemoved(gone)
	if len(gone) == 0 {
		return res, errors.Join(unable...)
	}
	it := dp.iter
	it.destroyMu.Lock()
	defer it.destroyMu.Unlock()

	var errs []error
	for batch := range slices.Chunk(gone, maxDoomed) {
		r, err := dp.terminateBatch(it, ns, batch, opts.WalkAllNetns)
		res.Backends += r.Backends
		res.Destroyed += r.Destroyed
		res.Failed += r.Failed
		res.NetnsEntered += r.NetnsEntered
		res.NetnsUnreachable += r.NetnsUnreachable
		res.FullWalk = res.FullWalk || r.FullWalk
		errs = append(errs, err)
	}
	res.Duration = time.Since(start)
	return res, errors.Join(append(errs, unable...)...)
}

// stillRemoved drops the backends their service has again: a removal undone before its
// pass must not end the sockets connected since.
func (dp *Datapath) stillRemoved(gone []RemovedBackend) []RemovedBackend {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	return slices.DeleteFunc(gone, func(b RemovedBackend) bool {
		svc := dp.services[svcKey(b.VIP.Addr(), b.VIP.Port(), b.Proto)]
		return svc != nil && slices.Contains(svc.slots, b.Backend)
	})
}

// maxDoomed is PODSOCK_MAX_DOOMED in bpf/sockiter.c.
const maxDoomed = 65536

func (dp *Datapath) terminateBatch(it *sockIter, ns NetnsSet, gone []RemovedBackend, walkAll bool) (TerminateResult, error) {
	res := TerminateResult{Backends: len(gone)}
	doomed := make([]sockiterSvcBackendKey, 0, len(gone))
	revs := make([]sockiterDoomedValue, 0, len(gone))
	buckets := map[socklbSvcKey]uint16{}
	at := map[sockiterSvcBackendKey]int{}
	var protos uint8
	for _, b := range gone {
		protos |= protoBit(b.Proto)
		buckets[svcKey(b.VIP.Addr(), b.VIP.Port(), b.Proto)] |= 1 << backendBucket(b.Backend)
		k := sockiterSvcBackendKey{
			Vip: addrWords(b.VIP.Addr()), VipPort: htons(b.VIP.Port()),
			Backend: addrWords(b.Backend.Addr()), BackendPort: htons(b.Backend.Port()),
			Proto: b.Proto,
		}
		v := sockiterDoomedValue{SvcId: b.ServiceID, FirstRevWithout: b.Revision}
		if i, seen := at[k]; seen {
			// Removed, back, and removed again within one batch (a late pass rides along
			// with a new removal): the latest removal covers the sockets of the time in
			// between too, whatever order they came in. Revisions wrap.
			if revs[i].SvcId != v.SvcId || int32(v.FirstRevWithout-revs[i].FirstRevWithout) > 0 {
				revs[i] = v
			}
			continue
		}
		at[k] = len(doomed)
		doomed = append(doomed, k)
		revs = append(revs, v)
	}
	if _, err := it.maps.PodsockDoomed.BatchUpdate(doomed, revs, nil); err != nil {
		return res, fmt.Errorf("write doomed backends: %w", err)
	}
	defer func() {
		if _, err := it.maps.PodsockDoomed.BatchDelete(doomed, nil); err != nil {
			dp.log.WithError(err).Warn("clear doomed backends")
		}
	}()

	targets, err := dp.netnsHolding(buckets, ns)
	if err != nil {
		return res, err
	}
	full, err := dp.untrackedOpen()
	if err != nil {
		return res, err
	}
	full = full || dp.BackfillPending()
	if full || walkAll {
		res.FullWalk = true
		for _, c := range ns.Cookies() {
			targets[c] |= protos
		}
	}
	cookies := make([]uint64, 0, len(targets))
	for c := range targets {
		cookies = append(cookies, c)
	}
	slices.Sort(cookies)
	if err := it.resetDestroyCounts(); err != nil {
		return res, err
	}
	var (
		mu   sync.Mutex
		errs []error
		wg   sync.WaitGroup
	)
	jobs := make(chan uint64)
	for range min(walkWorkers, len(cookies)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for cookie := range jobs {
				entered, unreachable, err := it.destroyIn(ns, cookie, targets[cookie])
				mu.Lock()
				if entered {
					res.NetnsEntered++
				}
				if unreachable {
					res.NetnsUnreachable++
				}
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	for _, c := range cookies {
		jobs <- c
	}
	close(jobs)
	wg.Wait()
	destroyed, failed, err := it.destroyCounts()
	res.Destroyed, res.Failed = destroyed, failed
	errs = append(errs, err)
	// The counts of the removed backends stay: a destroyed socket counts until its
	// application closes it, and the backend may already be back, with new sockets
	// counted under the same keys.
	return res, errors.Join(errs...)
}

// destroyIn runs the destroy iterators of the given protocols in one netns.
func (it *sockIter) destroyIn(ns NetnsSet, cookie uint64, protos uint8) (entered, unreachable bool, err error) {
	for _, p := range []struct {
		bit uint8
		l   *link.Iter
	}{{protoBitTCP, it.links[progDestroyTCP]}, {protoBitUDP, it.links[progDestroyUDP]}} {
		if protos&p.bit == 0 || p.l == nil {
			continue
		}
		rc, err := open(ns, cookie, p.l)
		if errors.Is(err, ErrUnknownNetns) {
			return entered, true, nil
		}
		if err != nil {
			return entered, false, err
		}
		entered = true
		// The programs write nothing: running them to the end is the work.
		err = readRecords(rc, func(*sockiterSockRecord) error { return nil })
		rc.Close()
		if err != nil {
			return entered, false, fmt.Errorf("netns %d: %w", cookie, err)
		}
	}
	return entered, false, nil
}

// The destroy programs count what they did in podsock_destroy_count rather than in their
// output; a pass zeroes the counts first and sums them at the end (passes are serialised
// by destroyMu).
func (it *sockIter) resetDestroyCounts() error {
	for i := range uint32(destroyCountMax) {
		if err := it.maps.PodsockDestroyCount.Update(i, uint64(0), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("reset destroy counts: %w", err)
		}
	}
	return nil
}

func (it *sockIter) destroyCounts() (destroyed, failed int, err error) {
	var n [destroyCountMax]uint64
	for i := range n {
		if err := it.maps.PodsockDestroyCount.Lookup(uint32(i), &n[i]); err != nil {
			return 0, 0, fmt.Errorf("read destroy counts: %w", err)
		}
	}
	return int(n[countDestroyed]), int(n[countDestroyFailed]), nil
}

const (
	protoBitTCP uint8 = 1
	protoBitUDP uint8 = 2
)

func protoBit(p uint8) uint8 {
	if p == ProtoTCP {
		return protoBitTCP
	}
	return protoBitUDP
}

// netnsHolding reads the socket counts: which netns hold connected sockets that these
// services balanced to a backend in one of the given buckets (a bitmask per service), and
// over which protocols. On the way it drops entries at zero whose netns the NetnsSet no
// longer knows: netns cookies are never reused, and a netns without a handle cannot be
// walked anyway.
func (dp *Datapath) netnsHolding(buckets map[socklbSvcKey]uint16, ns NetnsSet) (map[uint64]uint8, error) {
	known := knownNetns(ns)
	out := map[uint64]uint8{}
	var stale []socklbSvcNetnsKey
	err := dp.readCounts(func(k socklbSvcNetnsKey, c *socklbSvcNetnsCounts) {
		switch {
		case countsZero(c) && !known[k.NetnsCookie]:
			stale = append(stale, k)
		case holdsBucket(c, buckets[k.Svc]):
			out[k.NetnsCookie] |= protoBit(k.Svc.Proto)
		}
	})
	if err != nil {
		return nil, err
	}
	dp.deleteCounts(stale)
	return out, nil
}

// backendBucket is backend_bucket in bpf/counts.h, on the same words.
func backendBucket(b netip.AddrPort) uint {
	w := addrWords(b.Addr())
	h := w[0] ^ w[1] ^ w[2] ^ w[3] ^ uint32(htons(b.Port()))
	return uint((h*0x9e3779b1)>>28) & (countBuckets - 1)
}

// countBuckets is COUNT_BUCKETS in bpf/socklb.h.
const countBuckets = 16

func countsZero(c *socklbSvcNetnsCounts) bool {
	for _, n := range c.N {
		if n != 0 {
			return false
		}
	}
	return true
}

func holdsBucket(c *socklbSvcNetnsCounts, mask uint16) bool {
	for b := range countBuckets {
		if mask&(1<<b) != 0 && c.N[b] > 0 {
			return true
		}
	}
	return false
}

func knownNetns(ns NetnsSet) map[uint64]bool {
	known := map[uint64]bool{}
	for _, c := range ns.Cookies() {
		known[c] = true
	}
	return known
}

// readCounts hands every entry of the count map to fn, a batch at a time where the kernel
// can (one syscall per 1,024 entries instead of two per entry).
func (dp *Datapath) readCounts(fn func(socklbSvcNetnsKey, *socklbSvcNetnsCounts)) error {
	m := dp.objs.PodsockSvcnetnsV2
	keys := make([]socklbSvcNetnsKey, 1024)
	vals := make([]socklbSvcNetnsCounts, len(keys))
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			fn(keys[i], &vals[i])
		}
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			return nil
		case errors.Is(err, ebpf.ErrNotSupported) && n == 0:
			var k socklbSvcNetnsKey
			var v socklbSvcNetnsCounts
			iter := m.Iterate()
			for iter.Next(&k, &v) {
				fn(k, &v)
			}
			if err := iter.Err(); err != nil {
				return fmt.Errorf("read socket counts: %w", err)
			}
			return nil
		case err != nil:
			return fmt.Errorf("read socket counts: %w", err)
		}
	}
}

// PruneSocketCounts keeps the count map from filling up. It drops entries at zero of
// netns that the NetnsSet no longer knows (pods that are gone), and entries at zero of
// services the datapath has not served since the previous prune: by then no connect()
// that chose the service before its removal can still be counting, so deleting races no
// increment.
func (dp *Datapath) PruneSocketCounts(ns NetnsSet) error {
	dp.pruneMu.Lock()
	defer dp.pruneMu.Unlock()
	served := dp.servedServices()
	known := knownNetns(ns)
	var drop []socklbSvcNetnsKey
	marked := map[socklbSvcNetnsKey]bool{}
	err := dp.readCounts(func(k socklbSvcNetnsKey, c *socklbSvcNetnsCounts) {
		switch {
		case !countsZero(c):
		case !known[k.NetnsCookie]:
			drop = append(drop, k)
		case served[k.Svc]:
		case dp.unservedAtZero[k]:
			drop = append(drop, k)
		default:
			marked[k] = true
		}
	})
	if err != nil {
		return err
	}
	dp.deleteCounts(drop)
	dp.unservedAtZero = marked
	return nil
}

// servedServices are the services the datapath serves now.
func (dp *Datapath) servedServices() map[socklbSvcKey]bool {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	out := make(map[socklbSvcKey]bool, len(dp.services))
	for k := range dp.services {
		out[k] = true
	}
	return out
}

func (dp *Datapath) deleteCounts(keys []socklbSvcNetnsKey) {
	for _, k := range keys {
		if err := dp.objs.PodsockSvcnetnsV2.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			dp.log.WithError(err).Warn("delete socket count")
		}
	}
}

// untrackedOpen reports whether connected sockets exist that the socket counts missed.
func (dp *Datapath) untrackedOpen() (bool, error) {
	st, err := dp.Stats()
	if err != nil {
		return false, err
	}
	return st.Untracked > st.UntrackedReleased, nil
}

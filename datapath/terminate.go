package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

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
	// A batch is what podsock_doomed holds.
	for batch := range slices.Chunk(gone, int(it.maps.PodsockDoomed.MaxEntries())) {
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

// stillRemoved drops the backends their service has again, among its backends or
// retained: a removal undone before its pass must not end the sockets connected since, nor
// those a retained backend keeps.
func (dp *Datapath) stillRemoved(gone []RemovedBackend) []RemovedBackend {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	return slices.DeleteFunc(gone, func(b RemovedBackend) bool {
		svc := dp.services[svcKey(b.VIP.Addr(), b.VIP.Port(), b.Proto)]
		return svc != nil && svc.serves(b.Backend)
	})
}

func (dp *Datapath) terminateBatch(it *sockIter, ns NetnsSet, gone []RemovedBackend, walkAll bool) (TerminateResult, error) {
	res := TerminateResult{Backends: len(gone)}
	buckets := map[socklbSvcKey]uint16{}
	var protos uint8
	for _, b := range gone {
		protos |= protoBit(b.Proto)
		buckets[svcKey(b.VIP.Addr(), b.VIP.Port(), b.Proto)] |= 1 << backendBucket(b.Backend)
	}
	targets, err := dp.netnsHolding(buckets, ns)
	if err != nil {
		return res, err
	}
	full, err := dp.untrackedOpen()
	if err != nil {
		return res, err
	}
	full = full || dp.BackfillPending()
	if len(targets) == 0 && !full && !walkAll {
		// No netns counts a socket of these services: nothing to walk, and nothing for the
		// destroy programs to know. A reload that removes 100k backends no socket uses
		// costs this pass the counts' read alone, not 100k doomed entries written and
		// deleted.
		return res, nil
	}
	doomed := make([]sockiterSvcBackendKey, 0, len(gone))
	revs := make([]sockiterDoomedValue, 0, len(gone))
	at := make(map[sockiterSvcBackendKey]int, len(gone))
	for _, b := range gone {
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
	for i := range uint32(sockiterDestroyCountDESTROY_COUNT_MAX) {
		if err := it.maps.PodsockDestroyCount.Update(i, uint64(0), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("reset destroy counts: %w", err)
		}
	}
	return nil
}

func (it *sockIter) destroyCounts() (destroyed, failed int, err error) {
	var n [sockiterDestroyCountDESTROY_COUNT_MAX]uint64
	for i := range n {
		if err := it.maps.PodsockDestroyCount.Lookup(uint32(i), &n[i]); err != nil {
			return 0, 0, fmt.Errorf("read destroy counts: %w", err)
		}
	}
	return int(n[sockiterDestroyCountDESTROYED]), int(n[sockiterDestroyCountDESTROY_FAILED]), nil
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

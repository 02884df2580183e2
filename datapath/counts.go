package datapath

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
)

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
	return uint((h*0x9e3779b1)>>28) & uint(countBuckets-1)
}

// countBuckets is COUNT_BUCKETS in bpf/socklb.h: the buckets of one count.
const countBuckets = len(socklbSvcNetnsCounts{}.N)

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

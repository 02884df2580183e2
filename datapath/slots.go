package datapath

import (
	"net/netip"
	"slices"
)

// expandSlots turns weighted backends into the selection table the BPF programs index with
// a random number (TCP) or a socket-cookie hash (UDP). The table is as small as the weights
// allow and interleaved (smooth weighted round robin), so the same input always yields the
// same table and an unchanged service is never rewritten.
//
// maxSlots (limits.slots_per_service) bounds the table: weights whose sum is larger are
// scaled down to it, keeping every backend at least one slot.
func expandSlots(backends []Backend, maxSlots int) []netip.AddrPort {
	if len(backends) == 0 {
		return nil
	}
	weights := make([]uint64, len(backends))
	var g, total uint64
	for i, b := range backends {
		w := uint64(max(b.Weight, 1))
		weights[i] = w
		g = gcd(g, w)
	}
	for i := range weights {
		weights[i] /= g
		total += weights[i]
	}
	if total > uint64(maxSlots) {
		// Every backend keeps one slot; the rest are shared in proportion, rounding down,
		// so the table never exceeds the cap (there are never more backends than slots).
		spare := uint64(maxSlots - len(weights))
		scaled, g2 := uint64(0), uint64(0)
		for i, w := range weights {
			weights[i] = 1 + w*spare/total
			g2 = gcd(g2, weights[i])
		}
		for i := range weights {
			weights[i] /= g2
			scaled += weights[i]
		}
		total = scaled
	}

	slots := make([]netip.AddrPort, 0, total)
	current := make([]int64, len(weights))
	for range total {
		best := 0
		for i, w := range weights {
			current[i] += int64(w)
			if current[i] > current[best] {
				best = i
			}
		}
		current[best] -= int64(total)
		slots = append(slots, backends[best].Addr)
	}
	return slots
}

// weightsFromSlots recovers backends and their (reduced) weights from a selection table,
// sorted by address.
func weightsFromSlots(slots []netip.AddrPort) []Backend {
	var out []Backend
	index := map[netip.AddrPort]int{}
	for _, s := range slots {
		i, ok := index[s]
		if !ok {
			i = len(out)
			index[s] = i
			out = append(out, Backend{Addr: s})
		}
		out[i].Weight++
	}
	var g uint64
	for _, b := range out {
		g = gcd(g, uint64(b.Weight))
	}
	for i := range out {
		out[i].Weight /= uint32(g)
	}
	slices.SortFunc(out, func(a, b Backend) int { return a.Addr.Compare(b.Addr) })
	return out
}

func gcd(a, b uint64) uint64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

package datapath

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/api"
)

// Limits are the capacities of the datapath's maps and the bounds of one service. A zero
// field keeps the size the BPF object was built with (bpf/socklb.h), which is also
// config.DefaultLimits (TestDefaultLimitsMatchTheObject checks that they agree).
type Limits struct {
	Services           int
	BackendsPerService int
	SlotsPerService    int
	Slots              int
	Pods               int
	Containers         int
	PodServices        int
	SocketCounts       int
}

// Defaults for the bounds of one service, which no map holds.
const (
	defaultSlotsPerService    = 4096
	defaultBackendsPerService = 1024
)

// limitMaps says which pinned maps each limit sizes, and how a config names the limit.
var limitMaps = []struct {
	key   string // as in [limits]
	field func(*Limits) *int
	maps  []string
}{
	{"services", func(l *Limits) *int { return &l.Services }, []string{"podsock_svc_v1", "podsock_name_v2", "podsock_afftime_v1", "podsock_svccount_v1", "podsock_tracesvc"}},
	{"slots", func(l *Limits) *int { return &l.Slots }, []string{"podsock_slot_v1"}},
	{"pods", func(l *Limits) *int { return &l.Pods }, []string{"podsock_podcg_v1", "podsock_netns_v1", "podsock_pod_v1", "podsock_tracepod"}},
	{"containers", func(l *Limits) *int { return &l.Containers }, []string{"podsock_ctrcg_v1"}},
	{"pod_services", func(l *Limits) *int { return &l.PodServices }, []string{"podsock_allow_v1", "podsock_aff_v3"}},
	{"socket_counts", func(l *Limits) *int { return &l.SocketCounts }, []string{"podsock_svcnetns_v2"}},
}

// resolve fills the zero fields from the object's sizes and the built-in bounds.
func (l Limits) resolve(spec *ebpf.CollectionSpec) Limits {
	for _, lm := range limitMaps {
		if p := lm.field(&l); *p == 0 {
			*p = int(spec.Maps[lm.maps[0]].MaxEntries)
		}
	}
	if l.SlotsPerService == 0 {
		l.SlotsPerService = defaultSlotsPerService
	}
	if l.BackendsPerService == 0 {
		l.BackendsPerService = defaultBackendsPerService
	}
	return l
}

// size sets each map's capacity in spec to its limit.
func (l Limits) size(spec *ebpf.CollectionSpec) {
	for _, lm := range limitMaps {
		for _, name := range lm.maps {
			spec.Maps[name].MaxEntries = uint32(*lm.field(&l))
		}
	}
}

// limitKey names the limit that sizes a map.
func limitKey(mapName string) string {
	for _, lm := range limitMaps {
		if slices.Contains(lm.maps, mapName) {
			return "limits." + lm.key
		}
	}
	return mapName
}

// resized is a pinned map whose capacity differs from its limit, and the map of the new
// size that takes its pin once the datapath is attached.
type resized struct {
	name string
	pin  string
	m    *ebpf.Map
}

// resizePinned makes, for every pinned map whose capacity differs from what spec asks,
// a map of the new size holding the pinned one's entries. Nothing pinned changes here: an
// error (entries that do not fit, a map that cannot be read) leaves the node as it was.
// The socket counts are not copied, since programs update them all the time: a fresh map
// starts a new count epoch and the backfill counts the live sockets (recount is true).
func resizePinned(spec *ebpf.CollectionSpec, pinDir string) (out []resized, recount bool, err error) {
	defer func() {
		if err != nil {
			for _, r := range out {
				_ = r.m.Close()
			}
			out = nil
		}
	}()
	names := make([]string, 0, len(spec.Maps))
	for name := range spec.Maps {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		ms := spec.Maps[name]
		if ms.Pinning != ebpf.PinByName || ms.MaxEntries == 0 {
			continue
		}
		pin := filepath.Join(pinDir, name)
		old, err := ebpf.LoadPinnedMap(pin, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return out, false, fmt.Errorf("open pinned %s: %w", name, err)
		}
		if old.MaxEntries() == ms.MaxEntries || old.Type() != ms.Type {
			// Same size, or a different map altogether, which the load reports.
			_ = old.Close()
			continue
		}
		m, err := newUnpinned(ms)
		if err != nil {
			_ = old.Close()
			return out, false, fmt.Errorf("create %s with %d entries: %w", name, ms.MaxEntries, err)
		}
		out = append(out, resized{name: name, pin: pin, m: m})
		if name == "podsock_svcnetns_v2" {
			recount = true
			_ = old.Close()
			continue
		}
		n, err := copyEntries(old, m)
		_ = old.Close()
		if err != nil {
			return out, false, fmt.Errorf("resize pinned %s from %d to %d entries (%s): %d entries copied: %w",
				name, old.MaxEntries(), ms.MaxEntries, limitKey(name), n, err)
		}
	}
	return out, recount, nil
}

// newUnpinned creates the map ms describes without pinning it: it takes its pin only once
// the programs that use it are attached.
func newUnpinned(ms *ebpf.MapSpec) (*ebpf.Map, error) {
	fresh := ms.Copy()
	fresh.Pinning = ebpf.PinNone
	return ebpf.NewMap(fresh)
}

// copyEntries copies every entry of src into dst, failing when dst cannot hold them.
func copyEntries(src, dst *ebpf.Map) (int, error) {
	var k, v []byte
	n := 0
	it := src.Iterate()
	for it.Next(&k, &v) {
		if err := dst.Update(k, v, ebpf.UpdateAny); err != nil {
			if errors.Is(err, unix.E2BIG) {
				return n, fmt.Errorf("more entries than the new capacity")
			}
			return n, err
		}
		n++
	}
	return n, it.Err()
}

// pinResized puts the resized maps in their pins, once the programs that use them are
// attached. Entries the previous programs wrote into the old map since it was copied (pod
// affinity choices) are carried over first. The socket counts wait for the backfill
// (pinCounts).
func (dp *Datapath) pinResized(rs []resized) error {
	for _, r := range rs {
		if r.name == "podsock_svcnetns_v2" {
			continue
		}
		if old, err := ebpf.LoadPinnedMap(r.pin, nil); err == nil {
			copyMissing(old, r.m)
			_ = old.Close()
		}
		if err := replacePin(r.m, r.pin); err != nil {
			return fmt.Errorf("pin resized %s: %w", r.name, err)
		}
		dp.log.Infof("resized %s to %d entries (%s)", r.name, r.m.MaxEntries(), limitKey(r.name))
	}
	return nil
}

// copyMissing adds to dst the entries of src it lacks; one that does not fit is left out.
func copyMissing(src, dst *ebpf.Map) {
	var k, v []byte
	it := src.Iterate()
	for it.Next(&k, &v) {
		_ = dst.Update(k, v, ebpf.UpdateNoExist)
	}
}

// replacePin pins m at pin in one step (pinned beside it, then renamed over it), so the
// name never stands for no map.
func replacePin(m *ebpf.Map, pin string) error {
	tmp := pin + "_new" // bpffs refuses names with a dot
	_ = os.Remove(tmp)
	if err := m.Pin(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, pin); err != nil {
		_ = m.Unpin()
		return fmt.Errorf("rename %s: %w", tmp, err)
	}
	return nil
}

// MapStat is one pinned map's use, as status shows it.
type MapStat = api.MapStat

// MapStats reads every pinned map's entries, capacity and kernel memory. The hash maps'
// entries come from the kernel's own counts where it keeps them (mapCounter); without
// them the maps are walked, at a cost in proportion to what they hold.
func (dp *Datapath) MapStats() ([]MapStat, error) {
	dp.handlesMu.RLock()
	defer dp.handlesMu.RUnlock()
	var kernelCounts map[ebpf.MapID]int
	if dp.mapCounts != nil {
		var err error
		if kernelCounts, err = dp.mapCounts.counts(); err != nil {
			return nil, err
		}
	}
	// Every map of socklb.o, the unpinned trace and per-service counters included.
	coll := mapsByName(&dp.objs.socklbMaps)
	var out []MapStat
	for _, name := range slices.Sorted(maps.Keys(coll)) {
		m := coll[name]
		var err error
		st := MapStat{Name: name, Capacity: int(m.MaxEntries())}
		if k := limitKey(name); k != name {
			st.Limit = k
		}
		var id ebpf.MapID
		if info, err := m.Info(); err == nil {
			st.MemoryBytes, _ = info.Memlock()
			id, _ = info.ID()
		}
		counted, haveCount := kernelCounts[id]
		switch {
		case name == "podsock_sock_v1":
			st.Capacity = 0
			err = dp.readCounts(func(_ socklbSvcNetnsKey, c *socklbSvcNetnsCounts) {
				for _, n := range c.N {
					st.Entries += int(n)
				}
			})
		case m.Type() == ebpf.RingBuf:
			// A ring has no entries to count: its capacity is its size in bytes.
		case m.Type() == ebpf.Array || m.Type() == ebpf.PerCPUArray:
			st.Entries = st.Capacity
		case haveCount && isHash(m.Type()):
			st.Entries = counted
		default:
			st.Entries, err = countEntries(m)
		}
		if err != nil {
			return nil, fmt.Errorf("map %s: %w", name, err)
		}
		out = append(out, st)
	}
	return out, nil
}

// isHash says whether the kernel keeps an entry count for maps of type t.
func isHash(t ebpf.MapType) bool {
	switch t {
	case ebpf.Hash, ebpf.PerCPUHash, ebpf.LRUHash, ebpf.LRUCPUHash:
		return true
	}
	return false
}

// mapsByName lists the maps of a bpf2go maps struct by their names in the object.
func mapsByName(maps any) map[string]*ebpf.Map {
	out := map[string]*ebpf.Map{}
	v := reflect.ValueOf(maps).Elem()
	for i := range v.NumField() {
		if m, ok := v.Field(i).Interface().(*ebpf.Map); ok && m != nil {
			out[v.Type().Field(i).Tag.Get("ebpf")] = m
		}
	}
	return out
}

package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
)

// featureMapCounts is how `version` and `status` name the kernel's map entry counts.
const featureMapCounts = "map_elem_count"

// mapCounter reads the entry count the kernel keeps for every hash map (bpf/mapcount.c),
// in one pass over the host's maps instead of a copy of each map's entries.
type mapCounter struct {
	prog *ebpf.Program
	link *link.Iter
}

// mapCountRecordSize is struct map_count of bpf/mapcount.c: u32 id, u32 pad, s64 entries.
const mapCountRecordSize = 16

// loadMapCounter loads and attaches the map count iterator; the error says why the kernel
// refused it (a kernel before 6.6 has no bpf_map_sum_elem_count).
func loadMapCounter(kernelBTF *btf.Cache) (*mapCounter, error) {
	spec, err := loadMapcount()
	if err != nil {
		return nil, fmt.Errorf("load map count spec: %w", err)
	}
	var objs mapcountObjects
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{Cache: kernelBTF}); err != nil {
		return nil, fmt.Errorf("load podsock_map_counts: %w", err)
	}
	l, err := link.AttachIter(link.IterOptions{Program: objs.PodsockMapCounts})
	if err != nil {
		_ = objs.Close()
		return nil, fmt.Errorf("attach podsock_map_counts: %w", err)
	}
	return &mapCounter{prog: objs.PodsockMapCounts, link: l}, nil
}

// counts returns the kernel's entry count of every map of the host, by map ID. Only hash
// maps have one; other types read 0.
func (c *mapCounter) counts() (map[ebpf.MapID]int, error) {
	rd, err := c.link.Open()
	if err != nil {
		return nil, fmt.Errorf("open map count iterator: %w", err)
	}
	defer rd.Close()
	data, err := io.ReadAll(rd)
	if err != nil {
		return nil, fmt.Errorf("read map count iterator: %w", err)
	}
	out := make(map[ebpf.MapID]int, len(data)/mapCountRecordSize)
	for ; len(data) >= mapCountRecordSize; data = data[mapCountRecordSize:] {
		id := ebpf.MapID(binary.NativeEndian.Uint32(data))
		out[id] = int(int64(binary.NativeEndian.Uint64(data[8:])))
	}
	return out, nil
}

func (c *mapCounter) Close() error {
	if c == nil {
		return nil
	}
	return errors.Join(c.link.Close(), c.prog.Close())
}

// MapCountFeature says whether this datapath reads the kernel's map entry counts, and the
// kernel's reason when not.
func (dp *Datapath) MapCountFeature() Feature { return mapCountFeature(dp.mapCountsErr) }

// ProbeMapCounts loads the map count iterator, as Load would, and closes it again.
func ProbeMapCounts() Feature {
	c, err := loadMapCounter(nil)
	if err == nil {
		err = c.Close()
	}
	return mapCountFeature(err)
}

func mapCountFeature(err error) Feature {
	f := Feature{Name: featureMapCounts, Present: err == nil}
	if err != nil {
		f.Detail = err.Error()
	}
	return f
}

package datapath

import (
	"fmt"
	"maps"
	"path/filepath"

	"github.com/cilium/ebpf/link"
)

// PinsOwned checks that every socket-LB link pinned under the pin dir is the one this
// datapath holds, on its cgroup root, running its program. Attached alone cannot tell: a
// second agent, an older release started over these pins, or a hand-run `bpftool link
// pin` can replace a pin or switch its program while this process's handles still look
// attached, and then the node serves another program's view. It reads only the pins and
// the links' info, never the maps, so a health probe costs 3 syscalls per hook.
func (dp *Datapath) PinsOwned() error {
	dp.mu.Lock()
	links := maps.Clone(dp.links)
	dp.mu.Unlock()
	for _, ap := range attachPoints {
		own, ok := links[ap.name]
		if !ok {
			return fmt.Errorf("%s: not attached", ap.name)
		}
		ownInfo, err := own.Info()
		if err != nil {
			return fmt.Errorf("%s: read the link this agent holds: %w", ap.name, err)
		}
		progInfo, err := ap.prog(&dp.objs.socklbPrograms).Info()
		if err != nil {
			return fmt.Errorf("%s: read this agent's program: %w", ap.name, err)
		}
		progID, _ := progInfo.ID()
		pin := filepath.Join(dp.pinDir, "links", ap.name)
		pinned, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			return fmt.Errorf("%s: pin %s: %w", ap.name, pin, err)
		}
		info, err := pinned.Info()
		pinned.Close()
		switch {
		case err != nil:
			return fmt.Errorf("%s: read pinned link: %w", ap.name, err)
		case info.ID != ownInfo.ID:
			return fmt.Errorf("%s: pin %s holds link %d, not this agent's link %d", ap.name, pin, info.ID, ownInfo.ID)
		case info.Program != progID:
			return fmt.Errorf("%s: link %d runs program %d, not this agent's %d (another agent switched it)", ap.name, info.ID, info.Program, progID)
		case info.Cgroup() == nil || info.Cgroup().CgroupId != dp.cgroupID:
			return fmt.Errorf("%s: link %d is not on this agent's cgroup root", ap.name, info.ID)
		}
	}
	return nil
}

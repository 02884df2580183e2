package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/internal/netns"
)

// podIDSpace bounds pod IDs, whatever limits.pods is (which it bounds).
const podIDSpace = 1 << 20

// Pod is what the datapath needs to know of a pod to recognise its sockets: the exact
// cgroup IDs and netns cookie the runtime reported, and the pod's policy.
type Pod struct {
	// SandboxID identifies the pod (the runtime's sandbox ID).
	SandboxID        string
	ContainerCgroups []uint64 // cgroup IDs of the workload containers
	PodCgroup        uint64   // 0 while unknown
	NetnsCookie      uint64   // 0 for a host-network pod: the host netns is not the pod's
	SkipLB           bool
	// AllowedServices names the restricted services that admit this pod.
	AllowedServices []string
}

// installedPod mirrors one pod's entries in the maps.
type installedPod struct {
	id        uint32
	sandboxID string
	flags     socklbPodFlags
	// identity holds the keys this pod owns in the container-cgroup, pod-cgroup and netns
	// maps.
	ctrCgroups []uint64
	podCgroup  uint64
	netns      uint64
	// wantServices are the restricted services the pod asked to be admitted to.
	wantServices []string
	// allowedIn are the restricted services with an allow entry for this pod, by ID.
	allowedIn map[uint32]*installed
}

// PodSyncResult says what SyncPods changed.
type PodSyncResult struct {
	Added, Updated, Removed int
}

// SetPod installs or updates a pod. Allow entries go in before the identity entries that
// make the pod's sockets recognisable, so a newly seen pod is never refused by a service
// that admits it, and a pod marked to skip LB is never balanced.
func (dp *Datapath) SetPod(p Pod) error {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	_, err := dp.setPod(p)
	return err
}

func (dp *Datapath) setPod(p Pod) (added bool, err error) {
	if p.SandboxID == "" {
		return false, errors.New("pod without a sandbox ID")
	}
	var meta socklbPodMeta
	if len(p.SandboxID) > len(meta.SandboxId) {
		return false, fmt.Errorf("pod %s: sandbox ID longer than %d bytes", p.SandboxID, len(meta.SandboxId))
	}
	cur := dp.pods[p.SandboxID]
	if cur == nil {
		if len(dp.pods) >= dp.limits.Pods {
			return false, fmt.Errorf("pod %s: %d pods already, limits.pods = %d", p.SandboxID, len(dp.pods), dp.limits.Pods)
		}
		id, err := dp.allocPodID()
		if err != nil {
			return false, fmt.Errorf("pod %s: %w", p.SandboxID, err)
		}
		cur = &installedPod{id: id, sandboxID: p.SandboxID, allowedIn: map[uint32]*installed{}}
		added = true
	}
	var flags socklbPodFlags
	if p.SkipLB {
		flags |= socklbPodFlagsPOD_F_SKIP_LB
	}
	for i := range len(p.SandboxID) {
		meta.SandboxId[i] = int8(p.SandboxID[i])
	}
	meta.Flags = flags
	if err := dp.objs.PodsockPodV1.Update(&cur.id, &meta, ebpf.UpdateAny); err != nil {
		// A new pod's ID is not taken until it is recorded below.
		return false, fmt.Errorf("pod %s: write pod record: %w", p.SandboxID, err)
	}
	if added {
		dp.pods[p.SandboxID] = cur
		dp.podIDs[cur.id] = cur
	}

	var errs []error
	allowed := map[uint32]bool{}
	for _, name := range p.AllowedServices {
		for _, svc := range dp.restricted[name] {
			allowed[svc.id] = true
			if !svc.allowed[cur.id] {
				errs = append(errs, dp.writeAllow(svc, cur.id))
			}
		}
	}
	// Entries the pod no longer has (or that a reused ID inherited) go before the identity
	// entries are (re)written.
	for id, svc := range cur.allowedIn {
		if !allowed[id] {
			dp.deleteAllow(svc, cur.id)
		}
	}
	if flags&socklbPodFlagsPOD_F_SKIP_LB != 0 {
		dp.skipPods[cur.id] = true
		errs = append(errs, dp.writeCfg())
	}

	ref := socklbPodRef{PodId: cur.id, Flags: flags}
	ctr := slices.Clone(p.ContainerCgroups)
	slices.Sort(ctr)
	ctr = slices.Compact(ctr)
	for _, cg := range ctr {
		errs = append(errs, dp.writeIdentity(dp.objs.PodsockCtrcgV1, "container cgroup", cg, ref))
	}
	for _, cg := range cur.ctrCgroups {
		if !slices.Contains(ctr, cg) {
			dp.deleteIdentity(dp.objs.PodsockCtrcgV1, cg, cur.id)
		}
	}
	if p.PodCgroup != 0 {
		errs = append(errs, dp.writeIdentity(dp.objs.PodsockPodcgV1, "pod cgroup", p.PodCgroup, ref))
	}
	if cur.podCgroup != 0 && cur.podCgroup != p.PodCgroup {
		dp.deleteIdentity(dp.objs.PodsockPodcgV1, cur.podCgroup, cur.id)
	}
	if p.NetnsCookie != 0 {
		errs = append(errs, dp.writeIdentity(dp.objs.PodsockNetnsV1, "netns", p.NetnsCookie, ref))
	}
	if cur.netns != 0 && cur.netns != p.NetnsCookie {
		dp.deleteIdentity(dp.objs.PodsockNetnsV1, cur.netns, cur.id)
	}
	cur.ctrCgroups, cur.podCgroup, cur.netns, cur.flags = ctr, p.PodCgroup, p.NetnsCookie, flags
	cur.wantServices = slices.Clone(p.AllowedServices)
	if dp.latePods != nil {
		dp.latePods[cur.id] = cur
	}

	if flags&socklbPodFlagsPOD_F_SKIP_LB == 0 && dp.skipPods[cur.id] {
		delete(dp.skipPods, cur.id)
		errs = append(errs, dp.writeCfg())
	}
	if err := errors.Join(errs...); err != nil {
		return added, fmt.Errorf("pod %s: %w", p.SandboxID, err)
	}
	return added, nil
}

// RemovePod forgets a pod: its sockets stop being recognised first, then its allow and
// affinity entries and its ID go.
func (dp *Datapath) RemovePod(sandboxID string) error {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	cur := dp.pods[sandboxID]
	if cur == nil {
		return nil
	}
	return dp.removePod(cur)
}

func (dp *Datapath) removePod(cur *installedPod) error {
	for _, cg := range cur.ctrCgroups {
		dp.deleteIdentity(dp.objs.PodsockCtrcgV1, cg, cur.id)
	}
	if cur.podCgroup != 0 {
		dp.deleteIdentity(dp.objs.PodsockPodcgV1, cur.podCgroup, cur.id)
	}
	if cur.netns != 0 {
		dp.deleteIdentity(dp.objs.PodsockNetnsV1, cur.netns, cur.id)
	}
	for _, svc := range cur.allowedIn {
		dp.deleteAllow(svc, cur.id)
	}
	// One delete per service with pod affinity, not a walk of the affinity map: walking a
	// hash map visits every bucket (a million here), which would cost the runtime over a
	// millisecond per pod removal. Services that lose the flag drop all their entries then.
	for svc := range dp.affinitySvcs {
		k := socklbPodSvcKey{SvcId: svc.id, PodId: cur.id}
		if err := dp.objs.PodsockAffV3.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			// Keep the ID reserved: a reuse must not inherit this pod's choice.
			return fmt.Errorf("pod %s: delete affinity entry for service %s: %w", cur.sandboxID, svc.name, err)
		}
	}
	var err error
	if dp.skipPods[cur.id] {
		delete(dp.skipPods, cur.id)
		err = dp.writeCfg()
	}
	if derr := dp.objs.PodsockPodV1.Delete(&cur.id); derr != nil && !errors.Is(derr, ebpf.ErrKeyNotExist) {
		// Keep the ID reserved: its record is still there.
		return errors.Join(err, fmt.Errorf("pod %s: delete pod record: %w", cur.sandboxID, derr))
	}
	delete(dp.pods, cur.sandboxID)
	delete(dp.podIDs, cur.id)
	delete(dp.latePods, cur.id)
	return err
}

// SyncPods makes the pod maps hold exactly these pods: the runtime's Synchronize.
func (dp *Datapath) SyncPods(pods []Pod) (PodSyncResult, error) {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	var res PodSyncResult
	var errs []error
	want := map[string]bool{}
	for _, p := range pods {
		want[p.SandboxID] = true
	}
	for id, cur := range dp.pods {
		if want[id] {
			continue
		}
		if err := dp.removePod(cur); err != nil {
			errs = append(errs, err)
			continue
		}
		res.Removed++
	}
	for _, p := range pods {
		added, err := dp.setPod(p)
		if err != nil {
			errs = append(errs, err)
		}
		if added {
			res.Added++
		} else if err == nil {
			res.Updated++
		}
	}
	return res, errors.Join(errs...)
}

// PodCount is the number of pods the datapath recognises.
func (dp *Datapath) PodCount() int {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	return len(dp.pods)
}

// PodMapEntries counts the entries of each pod-related map, as the kernel holds them;
// churn tests compare it with a baseline.
func (dp *Datapath) PodMapEntries() (map[string]int, error) {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	out := map[string]int{}
	for name, m := range map[string]*ebpf.Map{
		"container_cgroups": dp.objs.PodsockCtrcgV1,
		"pod_cgroups":       dp.objs.PodsockPodcgV1,
		"netns":             dp.objs.PodsockNetnsV1,
		"pods":              dp.objs.PodsockPodV1,
		"allow":             dp.objs.PodsockAllowV1,
		"affinity":          dp.objs.PodsockAffV3,
	} {
		n, err := countEntries(m)
		if err != nil {
			return nil, fmt.Errorf("count %s entries: %w", name, err)
		}
		out[name] = n
	}
	return out, nil
}

func countEntries(m *ebpf.Map) (int, error) {
	if n, err := countEntriesBatched(m); err == nil {
		return n, nil
	}
	n := 0
	var k, v []byte
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

// countEntriesBatched counts with batch lookups, 4,096 entries a syscall instead of two
// syscalls an entry: at 100,000 services the walk of Iterate costs a second of CPU, which
// a metrics snapshot takes from the applies running beside it.
func countEntriesBatched(m *ebpf.Map) (int, error) {
	const batch = 4096
	// Fixed-size elements of the map's own sizes, as the batch calls want them.
	elems := func(size uint32, n int) any {
		return reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(int(size), reflect.TypeFor[byte]())), n, n).Interface()
	}
	perValue := 1
	if m.Type() == ebpf.PerCPUHash || m.Type() == ebpf.LRUCPUHash {
		// A value per possible CPU.
		cpus, err := ebpf.PossibleCPU()
		if err != nil {
			return 0, err
		}
		perValue = cpus
	}
	keys, vals := elems(m.KeySize(), batch), elems(m.ValueSize(), batch*perValue)
	var cursor ebpf.MapBatchCursor
	total := 0
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		total += n
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return total, nil
		}
		if err != nil {
			return 0, err
		}
	}
}

// SetHostnsOnly switches socket-LB to host-netns sockets only, or back to all.
func (dp *Datapath) SetHostnsOnly(on bool) error {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	dp.hostnsOnly = on
	return dp.writeCfg()
}

// writeCfg brings the settings map in line with hostns_only and the skip-LB pods. It
// writes only when that changes what the map says: every event of a skip-LB pod, and every
// apply, calls it.
func (dp *Datapath) writeCfg() error {
	var flags socklbCfgFlags
	if dp.hostnsOnly {
		flags |= socklbCfgFlagsCFG_HOSTNS_ONLY
	}
	if len(dp.skipPods) > 0 {
		flags |= socklbCfgFlagsCFG_ANY_SKIP
	}
	if dp.traceOn {
		flags |= socklbCfgFlagsCFG_TRACE
	}
	if dp.svcCounts {
		flags |= socklbCfgFlagsCFG_SVC_COUNTS
	}
	v := socklbDatapathCfg{HostNetnsCookie: dp.hostNetns, Flags: flags, CountEpoch: dp.countEpoch}
	if dp.cfgWritten != nil && *dp.cfgWritten == v {
		return nil
	}
	if err := dp.objs.PodsockCfgV1.Update(uint32(0), &v, ebpf.UpdateAny); err != nil {
		dp.cfgWritten = nil
		return fmt.Errorf("write datapath settings: %w", err)
	}
	dp.cfgWritten = &v
	return nil
}

func (dp *Datapath) allocPodID() (uint32, error) {
	for range podIDSpace {
		id := dp.nextPodID
		dp.nextPodID++
		if dp.nextPodID >= podIDSpace {
			dp.nextPodID = 1
		}
		if dp.podIDs[id] == nil {
			return id, nil
		}
	}
	return 0, fmt.Errorf("all %d pod IDs in use", podIDSpace-1)
}

func (dp *Datapath) writeIdentity(m *ebpf.Map, what string, key uint64, ref socklbPodRef) error {
	if err := m.Update(&key, &ref, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write %s %d: %w", what, key, err)
	}
	return nil
}

// deleteIdentity removes key only while it still names pod id: two pods can briefly
// claim the same key (a sandbox recreated with the netns of the old one), and the newer
// claim must survive the older pod's removal.
func (dp *Datapath) deleteIdentity(m *ebpf.Map, key uint64, id uint32) {
	var ref socklbPodRef
	if err := m.Lookup(&key, &ref); err != nil || ref.PodId != id {
		return
	}
	if err := m.Delete(&key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		dp.log.WithError(err).Warnf("delete identity %d of pod %d", key, id)
	}
}

func (dp *Datapath) writeAllow(svc *installed, podID uint32) error {
	k := socklbPodSvcKey{SvcId: svc.id, PodId: podID}
	if err := dp.objs.PodsockAllowV1.Update(&k, uint32(1), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("allow pod %d for service %s: %w", podID, svc.name, err)
	}
	svc.allow(podID)
	if p := dp.podIDs[podID]; p != nil {
		p.allowedIn[svc.id] = svc
	}
	return nil
}

func (dp *Datapath) deleteAllow(svc *installed, podID uint32) {
	k := socklbPodSvcKey{SvcId: svc.id, PodId: podID}
	if err := dp.objs.PodsockAllowV1.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		dp.log.WithError(err).Warnf("delete allow entry of pod %d for service %s", podID, svc.name)
		return
	}
	delete(svc.allowed, podID)
	if p := dp.podIDs[podID]; p != nil {
		delete(p.allowedIn, svc.id)
	}
}

// writeAllowed adds the allow entries of want that svc lacks.
func (dp *Datapath) writeAllowed(svc *installed, want map[uint32]bool) error {
	for id := range want {
		if svc.allowed[id] {
			continue
		}
		if err := dp.writeAllow(svc, id); err != nil {
			return err
		}
	}
	return nil
}

// deleteAllowed removes svc's allow entries that keep does not hold (all, for nil).
func (dp *Datapath) deleteAllowed(svc *installed, keep map[uint32]bool) {
	for id := range svc.allowed {
		if !keep[id] {
			dp.deleteAllow(svc, id)
		}
	}
}

// podIDsOf resolves a policy's allowed sandbox IDs to the IDs of pods the datapath knows.
func (dp *Datapath) podIDsOf(p ServicePolicy) map[uint32]bool {
	if !p.Restrict {
		// No map for a service that admits everyone: an Apply asks for one per service.
		return nil
	}
	out := map[uint32]bool{}
	for _, sb := range p.AllowedPods {
		if cur := dp.pods[sb]; cur != nil {
			out[cur.id] = true
		}
	}
	return out
}

// hostClientID is the client ID of the host netns in a service with host affinity.
const hostClientID = uint32(socklbClientIdHOST_CLIENT_ID)

// clientFlag is the affinity flag under which a service keeps the choices of a client.
func clientFlag(clientID uint32) socklbSvcFlags {
	if clientID == hostClientID {
		return socklbSvcFlagsSVC_F_AFFINITY_HOST
	}
	return socklbSvcFlagsSVC_F_AFFINITY_POD
}

// affinityClients are the clients that may have choices under these affinity flags: the
// known pods, and the host.
func (dp *Datapath) affinityClients(flags socklbSvcFlags) []uint32 {
	var out []uint32
	if flags&socklbSvcFlagsSVC_F_AFFINITY_POD != 0 {
		out = make([]uint32, 0, len(dp.podIDs)+1)
		for id := range dp.podIDs {
			out = append(out, id)
		}
	}
	if flags&socklbSvcFlagsSVC_F_AFFINITY_HOST != 0 {
		out = append(out, hostClientID)
	}
	return out
}

// carryAffinity moves the affinity choices of a service (those of the clients the flags
// keep) whose backend is still among slots to revision to, before the service switches to
// it: those clients keep their backend, and every other choice goes stale at the switch.
// A choice keeps its last use, so its timeout runs on. One lookup per client, not a walk
// of the map (a walk visits every bucket).
func (dp *Datapath) carryAffinity(svc *installed, flags socklbSvcFlags, to uint32, slots []netip.AddrPort) (moved []socklbPodSvcKey) {
	for _, client := range dp.affinityClients(flags) {
		k := socklbPodSvcKey{SvcId: svc.id, PodId: client}
		var v socklbAffValue
		if err := dp.objs.PodsockAffV3.Lookup(&k, &v); err != nil {
			continue
		}
		if v.Rev != svc.rev || !slices.Contains(slots, backendAddrPort(v.Be)) {
			continue
		}
		v.Rev = to
		if err := dp.objs.PodsockAffV3.Update(&k, &v, ebpf.UpdateExist); err != nil {
			if !errors.Is(err, ebpf.ErrKeyNotExist) {
				// The client picks again on its next connect: affinity moves once, nothing
				// breaks.
				dp.log.WithError(err).Warnf("carry affinity of client %#x in service %s over", client, svc.name)
			}
			continue
		}
		moved = append(moved, k)
	}
	return moved
}

// uncarryAffinity moves choices carried over to a revision the service never switched to
// back to its own, so the next revision, which will reuse that number, does not find them
// current.
func (dp *Datapath) uncarryAffinity(svc *installed, moved []socklbPodSvcKey) {
	for _, k := range moved {
		var v socklbAffValue
		if err := dp.objs.PodsockAffV3.Lookup(&k, &v); err != nil {
			continue
		}
		v.Rev = svc.rev
		if err := dp.objs.PodsockAffV3.Update(&k, &v, ebpf.UpdateExist); err != nil {
			// Dropped instead: the client picks again, never from a stale choice.
			_ = dp.objs.PodsockAffV3.Delete(&k)
		}
	}
}

// oldAffinityMaps are the affinity maps older agents pinned, oldest first: podsock_aff_v1
// held a bare backend, podsock_aff_v2 a backend and its revision, neither a last use.
var oldAffinityMaps = []struct {
	name      string
	valueSize uint32
	revisions bool
}{
	{"podsock_aff_v1", uint32(binary.Size(socklbBackend{})), false},
	{"podsock_aff_v2", uint32(binary.Size(socklbBackend{})) + 4, true},
}

// migrateAffinity carries the affinity choices an older agent pinned over to the current
// map, and removes the old pins. It runs once the new programs are attached, so the old
// programs, which wrote the old map until then, are done with it; a client that connects
// in between chooses afresh, and its new choice is kept. A carried choice counts as used
// now: its last use was never recorded.
func (dp *Datapath) migrateAffinity() {
	for _, old := range oldAffinityMaps {
		dp.migrateAffinityFrom(old.name, old.valueSize, old.revisions)
	}
}

func (dp *Datapath) migrateAffinityFrom(name string, valueSize uint32, revisions bool) {
	pin := filepath.Join(dp.pinDir, name)
	old, err := ebpf.LoadPinnedMap(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	if err != nil {
		dp.log.WithError(err).Warnf("open the affinity map of an older agent (%s); its clients choose again", name)
		dp.removePin(pin)
		return
	}
	defer func() { _ = old.Close() }()
	if old.ValueSize() != valueSize {
		dp.log.Warnf("the affinity map of an older agent (%s) has values of %d bytes, not %d; its clients choose again", name, old.ValueSize(), valueSize)
		dp.removePin(pin)
		return
	}
	now, err := monotonicNow()
	if err != nil {
		dp.log.WithError(err).Warn("read the clock the datapath stamps choices with; the older agent's clients choose again")
		dp.removePin(pin)
		return
	}
	dp.mu.Lock()
	byID := map[uint32]*installed{}
	for _, svc := range dp.services {
		byID[svc.id] = svc
	}
	var k socklbPodSvcKey
	var raw []byte
	carried := 0
	it := old.Iterate()
	for it.Next(&k, &raw) {
		var v socklbAffValue
		if _, err := binary.Decode(raw, binary.NativeEndian, &v.Be); err != nil {
			continue
		}
		svc := byID[k.SvcId]
		if svc == nil || !dp.keepsChoicesOf(svc, k.PodId) || !slices.Contains(svc.slots, backendAddrPort(v.Be)) {
			continue
		}
		// Without revisions every choice was made for the backend set it is in now.
		v.Rev = svc.rev
		if revisions {
			v.Rev = binary.NativeEndian.Uint32(raw[len(raw)-4:])
			if v.Rev != svc.rev && v.Rev != svc.rev+1 {
				continue // stale: the programs would not use it either
			}
		}
		v.LastUsed = now
		if err := dp.objs.PodsockAffV3.Update(&k, &v, ebpf.UpdateNoExist); err == nil {
			carried++
		}
	}
	dp.mu.Unlock()
	if err := it.Err(); err != nil {
		dp.log.WithError(err).Warnf("read the affinity map of an older agent (%s)", name)
	}
	dp.log.Infof("carried %d affinity choices over from an older agent (%s)", carried, name)
	dp.removePin(pin)
}

// keepsChoicesOf says whether the service keeps affinity choices of this client, and the
// client is one the datapath knows.
func (dp *Datapath) keepsChoicesOf(svc *installed, clientID uint32) bool {
	if svc.flags&clientFlag(clientID) == 0 {
		return false
	}
	return clientID == hostClientID || dp.podIDs[clientID] != nil
}

// monotonicNow is the clock bpf_ktime_get_ns reads, in nanoseconds.
func monotonicNow() (uint64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("clock_gettime(CLOCK_MONOTONIC): %w", err)
	}
	return uint64(ts.Nano()), nil
}

func (dp *Datapath) removePin(pin string) {
	if err := os.Remove(pin); err != nil && !errors.Is(err, os.ErrNotExist) {
		dp.log.WithError(err).Warnf("remove obsolete pin %s", pin)
	}
}

// dropAffinity removes the affinity entries of a service that drop selects (all of them,
// for nil).
func (dp *Datapath) dropAffinity(svcID uint32, drop func(socklbPodSvcKey, *socklbAffValue) bool) {
	var k socklbPodSvcKey
	var v socklbAffValue
	var doomed []socklbPodSvcKey
	it := dp.objs.PodsockAffV3.Iterate()
	for it.Next(&k, &v) {
		if k.SvcId == svcID && (drop == nil || drop(k, &v)) {
			doomed = append(doomed, k)
		}
	}
	if err := it.Err(); err != nil {
		dp.log.WithError(err).Warnf("read affinity entries of service %d", svcID)
	}
	for _, k := range doomed {
		if err := dp.objs.PodsockAffV3.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			dp.log.WithError(err).Warnf("delete affinity entry %+v", k)
		}
	}
}

// AllowedSandboxes lists the pods the datapath currently admits to a restricted service,
// by sandbox ID: to any of its frontends, should several share the name. Before the
// runtime's first Synchronize, it is the only record of them.
func (dp *Datapath) AllowedSandboxes(service string) []string {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	var out []string
	for _, svc := range dp.restricted[service] {
		for id := range svc.allowed {
			if p := dp.podIDs[id]; p != nil {
				out = append(out, p.sandboxID)
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// readPods rebuilds the pod mirror from pinned maps left by a previous agent. Identity,
// allow and affinity entries of pods without a record are dropped; the host's affinity
// entries stay while their service has host affinity.
func (dp *Datapath) readPods() error {
	var id uint32
	var meta socklbPodMeta
	it := dp.objs.PodsockPodV1.Iterate()
	for it.Next(&id, &meta) {
		b := make([]byte, 0, len(meta.SandboxId))
		for _, c := range meta.SandboxId {
			if c == 0 {
				break
			}
			b = append(b, byte(c))
		}
		p := &installedPod{id: id, sandboxID: string(b), flags: meta.Flags, allowedIn: map[uint32]*installed{}}
		dp.pods[p.sandboxID] = p
		dp.podIDs[id] = p
		if p.flags&socklbPodFlagsPOD_F_SKIP_LB != 0 {
			dp.skipPods[id] = true
		}
		dp.nextPodID = max(dp.nextPodID, id+1)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read pinned pods: %w", err)
	}
	if dp.nextPodID >= podIDSpace {
		dp.nextPodID = 1
	}
	for _, m := range []struct {
		m     *ebpf.Map
		claim func(p *installedPod, key uint64)
	}{
		{dp.objs.PodsockCtrcgV1, func(p *installedPod, k uint64) { p.ctrCgroups = append(p.ctrCgroups, k) }},
		{dp.objs.PodsockPodcgV1, func(p *installedPod, k uint64) { p.podCgroup = k }},
		{dp.objs.PodsockNetnsV1, func(p *installedPod, k uint64) { p.netns = k }},
	} {
		var key uint64
		var ref socklbPodRef
		var stale []uint64
		it := m.m.Iterate()
		for it.Next(&key, &ref) {
			if p := dp.podIDs[ref.PodId]; p != nil {
				m.claim(p, key)
			} else {
				stale = append(stale, key)
			}
		}
		if err := it.Err(); err != nil {
			return fmt.Errorf("read pinned %s: %w", m.m, err)
		}
		for _, k := range stale {
			if err := m.m.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				dp.log.WithError(err).Warn("drop stale pod identity")
			}
		}
	}
	for _, p := range dp.pods {
		slices.Sort(p.ctrCgroups)
	}
	byID := map[uint32]*installed{}
	for _, s := range dp.services {
		byID[s.id] = s
	}
	for _, m := range []struct {
		m    *ebpf.Map
		keep func(svc *installed, k socklbPodSvcKey) bool
	}{
		{dp.objs.PodsockAllowV1, func(svc *installed, k socklbPodSvcKey) bool {
			p := dp.podIDs[k.PodId]
			if p == nil || svc.flags&socklbSvcFlagsSVC_F_RESTRICT == 0 {
				return false
			}
			svc.allow(k.PodId)
			p.allowedIn[svc.id] = svc
			return true
		}},
		{dp.objs.PodsockAffV3, func(svc *installed, k socklbPodSvcKey) bool { return dp.keepsChoicesOf(svc, k.PodId) }},
	} {
		var k socklbPodSvcKey
		var v []byte
		var stale []socklbPodSvcKey
		it := m.m.Iterate()
		for it.Next(&k, &v) {
			svc := byID[k.SvcId]
			if svc == nil || !m.keep(svc, k) {
				stale = append(stale, k)
			}
		}
		if err := it.Err(); err != nil {
			return fmt.Errorf("read pinned %s: %w", m.m, err)
		}
		for _, k := range stale {
			if err := m.m.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				dp.log.WithError(err).Warn("drop stale pod entry")
			}
		}
	}
	if len(dp.pods) > 0 {
		dp.log.Infof("adopted %d pods from pinned maps", len(dp.pods))
	}
	return nil
}

// ownNetnsCookie is the cookie of the netns the calling thread runs in: the host netns,
// for a node agent.
func ownNetnsCookie() (uint64, error) {
	h, err := netns.Open("/proc/thread-self/ns/net")
	if err != nil {
		return 0, fmt.Errorf("read the host netns cookie: %w", err)
	}
	defer func() { _ = h.Close() }()
	return h.Cookie(), nil
}

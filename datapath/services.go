package datapath

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Protocol numbers as the kernel knows them.
const (
	ProtoTCP uint8 = unix.IPPROTO_TCP
	ProtoUDP uint8 = unix.IPPROTO_UDP
)

// Service is one frontend (VIP:port/protocol) and its weighted backends, as the datapath
// serves it. Several frontends may share a Name (a Kubernetes service's ClusterIPs, node
// ports, external IPs); the frontend is what identifies a service here.
type Service struct {
	Name     string
	VIP      netip.Addr
	Port     uint16
	Proto    uint8
	Backends []Backend
	// Retained are backends that get no new sockets but whose sockets stay (Kubernetes
	// terminating endpoints): a backend that moves from Backends to Retained is not in
	// ApplyResult.RemovedBackends; it is once it leaves both. Only this process knows
	// them: a restarted agent learns them again from its first Apply.
	Retained []netip.AddrPort
	// HostOnly balances only sockets of the host netns; those of any other netns proceed
	// untouched, to the address they asked for: a frontend on 127.0.0.1 or ::1 (a node
	// port) is the host's loopback, and a pod's loopback is its own.
	HostOnly bool
	Policy   ServicePolicy
}

// ServicePolicy is what a service asks of its clients' identity.
type ServicePolicy struct {
	// AffinityPod sends every socket of one pod to the same backend while it exists.
	AffinityPod bool
	// AffinityHost makes the host netns one client whose sockets all stick to one backend,
	// as AffinityPod does for each pod (Kubernetes sessionAffinity ClientIP, where the
	// node is one client IP). A host-network pod's sockets are the pod's.
	AffinityHost bool
	// AffinityTimeout lets a client's choice expire once no new socket of the client has
	// used it for this long (timeoutSeconds); its next socket picks by weight again. 0
	// keeps a choice for as long as its backend stays.
	AffinityTimeout time.Duration
	// Restrict admits only the pods in AllowedPods, and host-netns clients if AllowHost.
	// Everything else gets EPERM.
	Restrict    bool
	AllowHost   bool
	AllowedPods []string // sandbox IDs; pods the datapath does not know yet are skipped
}

// affinityFlags are the flags that make a service keep clients' choices.
const affinityFlags = socklbSvcFlagsSVC_F_AFFINITY_POD | socklbSvcFlagsSVC_F_AFFINITY_HOST

func (s Service) flags() socklbSvcFlags {
	var f socklbSvcFlags
	p := s.Policy
	if p.AffinityPod {
		f |= socklbSvcFlagsSVC_F_AFFINITY_POD
	}
	if p.AffinityHost {
		f |= socklbSvcFlagsSVC_F_AFFINITY_HOST
	}
	if f&affinityFlags != 0 && p.AffinityTimeout > 0 {
		f |= socklbSvcFlagsSVC_F_AFFINITY_TIMEOUT
	}
	if p.Restrict {
		f |= socklbSvcFlagsSVC_F_RESTRICT
		if p.AllowHost {
			f |= socklbSvcFlagsSVC_F_ALLOW_HOST
		}
	}
	if s.HostOnly {
		f |= socklbSvcFlagsSVC_F_HOST_ONLY
	}
	return f
}

// affinityTimeout is the timeout the datapath keeps for the service: none without affinity.
func (s Service) affinityTimeout() time.Duration {
	if s.flags()&socklbSvcFlagsSVC_F_AFFINITY_TIMEOUT == 0 {
		return 0
	}
	return s.Policy.AffinityTimeout
}

// Backend is a backend address and its relative weight (>= 1).
type Backend struct {
	Addr   netip.AddrPort
	Weight uint32
}

// ProtoName is "tcp" or "udp".
func ProtoName(p uint8) string {
	switch p {
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	}
	return fmt.Sprintf("proto-%d", p)
}

// installed mirrors one service entry in the maps.
type installed struct {
	id    uint32
	rev   uint32
	name  string
	slots []netip.AddrPort
	// retained are the backends kept for the sockets they have, not in slots; sorted.
	// Nothing in the maps holds them.
	retained []netip.AddrPort
	flags    socklbSvcFlags
	// affTimeout is the service's entry in the affinity timeout map; 0 when it has none.
	affTimeout time.Duration
	// allowed are the pod IDs with an entry in the allow map for this service; nil for
	// most, which restrict nothing.
	allowed map[uint32]bool
}

func (s *installed) allow(podID uint32) {
	if s.allowed == nil {
		s.allowed = map[uint32]bool{}
	}
	s.allowed[podID] = true
}

// serving lists what the service has sockets to keep for: its slots' backends and those it
// retains.
func (s *installed) serving() []netip.AddrPort {
	return append(uniqueAddrs(s.slots), s.retained...)
}

// serves says whether the service still has b, in its slots or retained.
func (s *installed) serves(b netip.AddrPort) bool {
	return slices.Contains(s.slots, b) || slices.Contains(s.retained, b)
}

// ApplyResult says what Apply changed.
type ApplyResult struct {
	Added, Updated, Removed, Unchanged int
	// RemovedBackends are backends that served a service before, in its backends or
	// retained, and now do neither (all of a removed service's); sockets still attached to
	// them are stale (see Terminate). A backend that only moved to Retained is not here.
	RemovedBackends []RemovedBackend
}

func svcKey(vip netip.Addr, port uint16, proto uint8) socklbSvcKey {
	return socklbSvcKey{Addr: addrWords(vip), Port: htons(port), Proto: proto}
}

// appendRemoved appends to out the backends the service with this key and ID no longer
// has as of revision rev.
func appendRemoved(out []RemovedBackend, k socklbSvcKey, name string, id, rev uint32, gone []netip.AddrPort) []RemovedBackend {
	vip := netip.AddrPortFrom(wordsAddr(k.Addr), ntohs(k.Port))
	for _, b := range gone {
		out = append(out, RemovedBackend{Service: name, VIP: vip, Proto: k.Proto, Backend: b, ServiceID: id, Revision: rev})
	}
	return out
}

// Key names the service's frontend as the model does ("10.96.0.20:80/tcp",
// service.Service.Key): the name `services` and the agent's records use.
func (s Service) Key() string {
	return netip.AddrPortFrom(s.VIP, s.Port).String() + "/" + ProtoName(s.Proto)
}

func keyString(k socklbSvcKey) string {
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(wordsAddr(k.Addr), ntohs(k.Port)), ProtoName(k.Proto))
}

func nameValue(name string) (socklbSvcName, error) {
	var v socklbSvcName
	if len(name) >= len(v.Name) {
		return v, fmt.Errorf("service name %q longer than %d bytes", name, len(v.Name)-1)
	}
	for i := range len(name) {
		v.Name[i] = int8(name[i])
	}
	return v, nil
}

func nameString(v socklbSvcName) string {
	var b strings.Builder
	for _, c := range v.Name {
		if c == 0 {
			break
		}
		b.WriteByte(byte(c))
	}
	return b.String()
}

// Apply makes the maps serve exactly the given services, writing only what differs.
// Each service changes atomically for a concurrent connect(): the new revision's slots are
// written first, then the service entry is switched to them, then the old slots go.
//
// Pod events do not wait behind a large Apply: it releases the datapath every applyChunk
// services, so a pod's identity and allow entries land within one chunk's time.
func (dp *Datapath) Apply(services []Service) (ApplyResult, error) {
	return dp.ApplyWith(services, ApplyOptions{})
}

// ApplyOptions shape an Apply.
type ApplyOptions struct {
	// Started is called once pods set from then on count as late, before the long work:
	// the caller may then let pod events through that its policies did not know of.
	Started func()
}

// ApplyWith is Apply with options. The datapath keeps services, which the caller must not
// change afterwards: they are what ApplyChanges changes and the backends are counted from.
func (dp *Datapath) ApplyWith(services []Service, opts ApplyOptions) (ApplyResult, error) {
	dp.applyMu.Lock()
	defer dp.applyMu.Unlock()
	defer dp.started(opts)()
	var res ApplyResult
	// Plan without the datapath: expanding the selection tables of a large config takes a
	// while, and needs nothing of it.
	// The wanted services live in one slice, in the order they are written; the map,
	// which the backend tally keeps, points into it.
	plan := make([]wanted, 0, len(services))
	order := make([]plannedKey, 0, len(services))
	desired := make(map[socklbSvcKey]*wanted, len(services))
	for _, s := range services {
		k := svcKey(s.VIP, s.Port, s.Proto)
		if _, dup := desired[k]; dup {
			return res, fmt.Errorf("service %s: duplicate %s", s.Name, keyString(k))
		}
		w, err := dp.plan(s)
		if err != nil {
			return res, err
		}
		plan = append(plan, w)
		desired[k] = &plan[len(plan)-1]
		order = append(order, plannedKey{key: k, w: &plan[len(plan)-1]})
	}
	// Only Apply writes dp.services, and Applies take turns: it can be read without mu,
	// which pod events then need not wait for.
	wantPorts := portsOf(desired)
	during := portsOf(dp.services)
	for i := range during {
		during[i] |= wantPorts[i]
	}
	// A stable order keeps ID assignment reproducible.
	slices.SortFunc(order, func(a, b plannedKey) int { return compareKeys(a.key, b.key) })
	// The writes are about to begin: the last input need not stay live beside this one
	// (15 MB at 100k services). Its count, if made, is what Counts shows until the Apply
	// settles. Dropped before mu, which a count in progress would hold up.
	dp.inputMu.Lock()
	dp.input = nil
	dp.inputMu.Unlock()

	dp.mu.Lock()
	yield := dp.yielder()
	// Only Apply changes services, so the check holds across its yields.
	kept, err := dp.checkCapacity(order, yield)
	if err != nil {
		dp.mu.Unlock()
		return res, err
	}

	// Ports of both the old and the new services while the services change.
	if err := dp.writePorts(during); err != nil {
		dp.mu.Unlock()
		return res, err
	}
	var errs []error
	// Removals first: they free IDs and slots for what comes next. When every installed
	// service is kept there are none, and no need to look each one up.
	for k, cur := range dp.services {
		if kept == len(dp.services) {
			break
		}
		if _, keep := desired[k]; keep {
			continue
		}
		yield()
		if err := dp.removeService(k, cur); err != nil {
			errs = append(errs, err)
			continue
		}
		res.Removed++
		// No revision of this service comes after cur.rev: every choice it made is older.
		res.RemovedBackends = appendRemoved(res.RemovedBackends, k, cur.name, cur.id, cur.rev+1, cur.serving())
	}
	dp.write(order, yield, &res, &errs)
	if len(errs) > 0 {
		wantPorts = portsOf(dp.services)
	}
	if err := dp.writePorts(wantPorts); err != nil {
		errs = append(errs, err)
	}
	dp.mu.Unlock()
	// Outside mu: settling may wait for a count of the last input's backends.
	if len(errs) > 0 {
		dp.settle(nil, 0)
		return res, errors.Join(errs...)
	}
	held := 0
	for i := range plan {
		held += len(plan[i].slots)
	}
	dp.settle(services, held)
	return res, nil
}

// plan is what the datapath is to hold for s.
func (dp *Datapath) plan(s Service) (wanted, error) {
	if _, err := nameValue(s.Name); err != nil {
		return wanted{}, err
	}
	if max := dp.limits.BackendsPerService; len(s.Backends) > max {
		return wanted{}, fmt.Errorf("service %s: %d backends exceed limits.backends_per_service = %d", s.Name, len(s.Backends), max)
	}
	if s.Policy.AffinityTimeout < 0 {
		return wanted{}, fmt.Errorf("service %s: negative affinity timeout %v", s.Name, s.Policy.AffinityTimeout)
	}
	slots := expandSlots(s.Backends, dp.limits.SlotsPerService)
	return wanted{
		name: s.Name, slots: slots, retained: retainedSet(s.Retained, slots),
		flags: s.flags(), affTimeout: s.affinityTimeout(), policy: s.Policy,
	}, nil
}

// yielder returns what Apply calls before each step: every applyChunk steps it lets go of
// mu, which the caller holds, so that pod events get in.
func (dp *Datapath) yielder() func() {
	steps := 0
	return func() {
		if steps++; steps%applyChunk == 0 {
			dp.mu.Unlock()
			if applyYielded != nil {
				applyYielded()
			}
			runtime.Gosched()
			dp.mu.Lock()
		}
	}
}

// write adds or updates the planned services, in order, under mu.
func (dp *Datapath) write(order []plannedKey, yield func(), res *ApplyResult, errs *[]error) {
	// New services that need no allow entries, timeout or counter are written in batches
	// of map writes (batchAdd) rather than 3 syscalls each.
	var batch []pendingAdd
	flush := func() {
		res.Added += dp.batchAdd(batch, errs)
		batch = batch[:0]
	}
	// Likewise services whose only change is their slots (batchUpdate).
	var updates []pendingUpdate
	flushUpdates := func() {
		for _, u := range dp.batchUpdate(updates, errs) {
			res.Updated++
			res.RemovedBackends = appendRemoved(res.RemovedBackends, u.key, u.w.name, u.cur.id, u.firstWithout, u.gone)
		}
		updates = updates[:0]
	}
	for _, p := range order {
		yield()
		k, s := p.key, *p.w
		slots := s.slots
		cur := dp.services[k]
		// Pods are resolved now, not when planned: they may have come and gone since.
		s.allowed = dp.podIDsOf(s.policy)
		if s.flags&socklbSvcFlagsSVC_F_RESTRICT != 0 {
			dp.admitLatePods(s)
		}
		switch {
		case cur == nil && dp.batchable(s):
			if batch = append(batch, pendingAdd{key: k, w: s}); len(batch) == applyChunk {
				flush()
			}
		case cur == nil:
			if err := dp.addService(k, s); err != nil {
				*errs = append(*errs, err)
				continue
			}
			res.Added++
		case cur.name == s.name && slices.Equal(cur.slots, slots) && slices.Equal(cur.retained, s.retained) &&
			cur.flags == s.flags && cur.affTimeout == s.affTimeout && maps.Equal(cur.allowed, s.allowed):
			res.Unchanged++
		default:
			gone := missingFrom(cur.serving(), append(slices.Clone(slots), s.retained...))
			// Every socket balanced to a backend gone now was chosen at this revision or
			// before: since it left the slots, or now, no revision picks it. One that comes
			// back is picked at a later revision, whether the slots change now or not.
			firstWithout := cur.rev + 1
			if dp.batchableUpdate(cur, s) {
				if updates = append(updates, pendingUpdate{key: k, cur: cur, w: s, gone: gone, firstWithout: firstWithout}); len(updates) == applyChunk {
					flushUpdates()
				}
				continue
			}
			if err := dp.updateService(k, cur, s); err != nil {
				*errs = append(*errs, err)
				continue
			}
			res.Updated++
			res.RemovedBackends = appendRemoved(res.RemovedBackends, k, s.name, cur.id, firstWithout, gone)
		}
	}
	flush()
	flushUpdates()
}

// Change is a service for a position of the services the last Apply installed.
type Change struct {
	At      int
	Service Service
}

// ApplyChanges writes changes into the services of the last Apply, each at its position,
// and plans and writes nothing else: for one change among 100k services, the difference
// between a pass over them all and none. Each change must keep the frontend at its
// position. False, with nothing done, when the changes cannot be followed so: the last
// Apply did not work in full, a position is out of range, given twice or its frontend
// differs, or more than a quarter of the services change. The caller then applies the whole set.
func (dp *Datapath) ApplyChanges(changes []Change, opts ApplyOptions) (ApplyResult, bool, error) {
	dp.applyMu.Lock()
	defer dp.applyMu.Unlock()
	// Only an Apply writes input and services, and Applies take turns: both can be read
	// without their locks.
	var res ApplyResult
	if dp.input == nil || len(changes)*4 > len(dp.input) {
		return res, false, nil
	}
	// Each position once: the input's frontends are distinct, so then are the changes'.
	seen := make(map[int]bool, len(changes))
	for _, c := range changes {
		if c.At < 0 || c.At >= len(dp.input) || seen[c.At] {
			return res, false, nil
		}
		seen[c.At] = true
		k, was := svcKey(c.Service.VIP, c.Service.Port, c.Service.Proto), &dp.input[c.At]
		if k != svcKey(was.VIP, was.Port, was.Proto) || dp.services[k] == nil {
			return res, false, nil
		}
	}
	defer dp.started(opts)()
	plan := make([]wanted, 0, len(changes))
	order := make([]plannedKey, 0, len(changes))
	for _, c := range changes {
		w, err := dp.plan(c.Service)
		if err != nil {
			return res, true, err
		}
		plan = append(plan, w)
		order = append(order, plannedKey{key: svcKey(c.Service.VIP, c.Service.Port, c.Service.Proto), w: &plan[len(plan)-1]})
	}
	res.Unchanged = len(dp.input) - len(changes)
	slices.SortFunc(order, func(a, b plannedKey) int { return compareKeys(a.key, b.key) })
	dp.mu.Lock()
	// As checkCapacity, for the changed services alone: the others keep their tables.
	held, peak, overlap := dp.heldSlots, dp.heldSlots, 0
	for _, p := range order {
		old, n := len(dp.services[p.key].slots), len(p.w.slots)
		held += n - old
		peak += max(old, n) - old
		overlap = max(overlap, min(old, n))
	}
	if need := peak + overlap; need > dp.limits.Slots {
		dp.mu.Unlock()
		return res, true, fmt.Errorf("services need %d backend slots, more than limits.slots = %d", need, dp.limits.Slots)
	}
	var errs []error
	dp.write(order, dp.yielder(), &res, &errs)
	dp.mu.Unlock()
	if len(errs) > 0 {
		dp.settle(nil, 0)
		return res, true, errors.Join(errs...)
	}
	dp.inputMu.Lock()
	for _, c := range changes {
		dp.input[c.At] = c.Service
	}
	dp.backendsCounted = false
	dp.inputMu.Unlock()
	dp.heldSlots = held
	return res, true, nil
}

// started marks the pods set from now on as late, for the plan cannot know them, and
// tells the caller; what it returns ends that.
func (dp *Datapath) started(opts ApplyOptions) func() {
	dp.mu.Lock()
	dp.latePods = map[uint32]*installedPod{}
	dp.mu.Unlock()
	if opts.Started != nil {
		opts.Started()
	}
	return func() {
		dp.mu.Lock()
		dp.latePods = nil
		dp.mu.Unlock()
	}
}

// settle records the input of an Apply that worked in full and the slots its services
// hold; nil input: what is installed is not known to be any input.
func (dp *Datapath) settle(input []Service, heldSlots int) {
	dp.inputMu.Lock()
	dp.input, dp.backendsCounted = input, false
	dp.inputMu.Unlock()
	dp.heldSlots = heldSlots
}

// applyChunk is how many services Apply writes before it lets pod events in: a few
// milliseconds of map writes.
const applyChunk = 64

// applyYielded, when set, runs each time Apply lets go of the datapath lock: tests set
// pods and settings there, exactly where a runtime event would come in.
var applyYielded func()

// admitLatePods adds to a restricted service's allowed pods those set during this Apply
// that asked for it: the policy the Apply was planned with did not know them yet.
func (dp *Datapath) admitLatePods(w wanted) {
	for id, p := range dp.latePods {
		if slices.Contains(p.wantServices, w.name) {
			w.allowed[id] = true
		}
	}
}

// reindex rebuilds the lookups pod events use, so that a pod event costs what the pod
// touches, not the number of services.
func (dp *Datapath) reindex() {
	dp.restricted = map[string][]*installed{}
	dp.affinitySvcs = map[*installed]bool{}
	for _, s := range dp.services {
		dp.index(s)
	}
}

// index and unindex keep the lookups current for one service, under its current name and
// flags; a change of either unindexes the service first.
func (dp *Datapath) index(s *installed) {
	dp.unindex(s)
	if s.flags&socklbSvcFlagsSVC_F_RESTRICT != 0 {
		dp.restricted[s.name] = append(dp.restricted[s.name], s)
	}
	if s.flags&socklbSvcFlagsSVC_F_AFFINITY_POD != 0 {
		dp.affinitySvcs[s] = true
	}
}

func (dp *Datapath) unindex(s *installed) {
	if list := dp.restricted[s.name]; slices.Contains(list, s) {
		// A new slice: a caller may be ranging over the old one.
		rest := slices.DeleteFunc(slices.Clone(list), func(o *installed) bool { return o == s })
		if len(rest) == 0 {
			delete(dp.restricted, s.name)
		} else {
			dp.restricted[s.name] = rest
		}
	}
	delete(dp.affinitySvcs, s)
}

// wanted is a service as Apply is asked for it, with its selection table expanded and its
// allowed pods resolved to pod IDs.
type wanted struct {
	name       string
	slots      []netip.AddrPort
	retained   []netip.AddrPort
	flags      socklbSvcFlags
	affTimeout time.Duration
	policy     ServicePolicy
	allowed    map[uint32]bool
}

// retainedSet is what a service retains: the addresses of retained that its slots do not
// have (those still get new sockets), once each, sorted so that equal sets compare equal.
func retainedSet(retained, slots []netip.AddrPort) []netip.AddrPort {
	if len(retained) == 0 {
		return nil
	}
	inSlots := make(map[netip.AddrPort]bool, len(slots))
	for _, b := range slots {
		inSlots[b] = true
	}
	var out []netip.AddrPort
	for _, b := range retained {
		if !inSlots[b] {
			out = append(out, b)
		}
	}
	slices.SortFunc(out, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return slices.Compact(out)
}

func compareKeys(a, b socklbSvcKey) int {
	for i := range a.Addr {
		if c := cmp.Compare(a.Addr[i], b.Addr[i]); c != 0 {
			return c
		}
	}
	if c := cmp.Compare(a.Port, b.Port); c != 0 {
		return c
	}
	return cmp.Compare(a.Proto, b.Proto)
}

// plannedKey is a service of an Apply's plan, by key.
type plannedKey struct {
	key socklbSvcKey
	w   *wanted
}

// checkCapacity says whether the planned services fit the maps, and how many of them are
// installed already.
func (dp *Datapath) checkCapacity(order []plannedKey, yield func()) (kept int, err error) {
	if len(order) > dp.limits.Services {
		return 0, fmt.Errorf("%d services exceed limits.services = %d", len(order), dp.limits.Services)
	}
	// Removals run first. After that, a service keeps the larger of its old and new
	// tables until it is processed, and while it switches revisions its old and new
	// tables coexist: one such overlap at a time. A batch of switches (batchUpdate) holds
	// up to applyChunk at once; one that does not fit fails in the kernel and goes one
	// service at a time, which this bound guarantees.
	slots, overlap := 0, 0
	for _, p := range order {
		yield()
		n := len(p.w.slots)
		old := 0
		if cur := dp.services[p.key]; cur != nil {
			kept++
			old = len(cur.slots)
			overlap = max(overlap, min(old, n))
		}
		slots += max(old, n)
	}
	if slots+overlap > dp.limits.Slots {
		return 0, fmt.Errorf("services need %d backend slots, more than limits.slots = %d", slots+overlap, dp.limits.Slots)
	}
	return kept, nil
}

func (dp *Datapath) allocID() (uint32, error) {
	for range maxServiceIDs + 1 {
		id := dp.nextID
		dp.nextID++
		if dp.nextID == 0 || dp.nextID > maxServiceIDs {
			dp.nextID = 1
		}
		if !dp.usedIDs[id] {
			dp.usedIDs[id] = true
			return id, nil
		}
	}
	return 0, errors.New("no free service id")
}

func (dp *Datapath) writeSlots(id, rev uint32, slots []netip.AddrPort) error {
	if len(slots) == 0 {
		return nil
	}
	if !dp.slotsOneByOne {
		// One syscall for a service's table rather than one per slot: most of a cold
		// start's map writes are slots.
		keys := make([]socklbSlotKey, len(slots))
		values := make([]socklbBackend, len(slots))
		for i, s := range slots {
			keys[i], values[i] = socklbSlotKey{SvcId: id, Rev: rev, Slot: uint32(i)}, backendValue(s)
		}
		_, err := dp.objs.PodsockSlotV1.BatchUpdate(keys, values, &ebpf.BatchOptions{ElemFlags: uint64(ebpf.UpdateAny)})
		switch {
		case err == nil:
			return nil
		case errors.Is(err, ebpf.ErrNotSupported):
			dp.slotsOneByOne = true
			dp.log.Info("the kernel has no batch map updates: writing backend slots one by one")
		default:
			dp.deleteSlots(id, rev, len(slots))
			return fmt.Errorf("write slots: %w", err)
		}
	}
	for i, s := range slots {
		k := socklbSlotKey{SvcId: id, Rev: rev, Slot: uint32(i)}
		v := backendValue(s)
		if err := dp.objs.PodsockSlotV1.Update(&k, &v, ebpf.UpdateAny); err != nil {
			dp.deleteSlots(id, rev, i)
			return fmt.Errorf("write slot %d: %w", i, err)
		}
	}
	return nil
}

func (dp *Datapath) deleteSlots(id, rev uint32, n int) {
	for i := range n {
		k := socklbSlotKey{SvcId: id, Rev: rev, Slot: uint32(i)}
		if err := dp.objs.PodsockSlotV1.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			dp.log.WithError(err).Warnf("delete slot %d of service %d", i, id)
		}
	}
}

func (dp *Datapath) addService(k socklbSvcKey, w wanted) error {
	name, slots := w.name, w.slots
	id, err := dp.allocID()
	if err != nil {
		return fmt.Errorf("service %s: %w", name, err)
	}
	nv, _ := nameValue(name)
	if err := dp.objs.PodsockNameV2.Update(&id, &nv, ebpf.UpdateAny); err != nil {
		delete(dp.usedIDs, id)
		return fmt.Errorf("service %s: write name: %w", name, err)
	}
	// A fresh random revision: a socket that still remembers an earlier service with this
	// ID must not mistake the new one's revision for the one it chose under.
	rev := rand.Uint32()
	if err := dp.writeSlots(id, rev, slots); err != nil {
		dp.deleteName(id)
		return fmt.Errorf("service %s: %w", name, err)
	}
	cur := &installed{id: id, rev: rev, name: name, slots: slots, retained: w.retained}
	undo := func() {
		dp.deleteAffTimeout(cur)
		dp.deleteAllowed(cur, nil)
		dp.deleteSlots(id, rev, len(slots))
		dp.deleteName(id)
	}
	// The allow entries and the timeout go in before the service does, so no allowed pod
	// is ever refused and no choice outlives its timeout.
	if err := dp.writeAllowed(cur, w.allowed); err != nil {
		undo()
		return fmt.Errorf("service %s: %w", name, err)
	}
	if err := dp.writeAffTimeout(cur, w.affTimeout); err != nil {
		undo()
		return fmt.Errorf("service %s: %w", name, err)
	}
	if dp.svcCounts {
		if err := dp.addServiceCounter(id); err != nil {
			undo()
			return fmt.Errorf("service %s: %w", name, err)
		}
	}
	v := socklbSvcValue{Id: id, Rev: rev, SlotCount: uint32(len(slots)), Flags: w.flags}
	// UpdateAny, as batchAdd must (batch writes take no NOEXIST): an entry the mirror
	// does not know is not the agent's to keep, and the service it is asked for replaces it.
	if err := dp.objs.PodsockSvcV1.Update(&k, &v, ebpf.UpdateAny); err != nil {
		undo()
		dp.deleteServiceCounter(id)
		return fmt.Errorf("service %s: write service entry: %w", name, err)
	}
	cur.flags = w.flags
	dp.services[k] = cur
	dp.index(cur)
	dp.traceServiceAdded(cur)
	return nil
}

// batchUpdateServices writes service entries in one batch; tests replace it with one that
// stops part way, as the kernel does at an entry it cannot write.
var batchUpdateServices = func(m *ebpf.Map, keys []socklbSvcKey, values []socklbSvcValue, opts *ebpf.BatchOptions) (int, error) {
	return m.BatchUpdate(keys, values, opts)
}

// pendingAdd is a new service waiting in a batch.
type pendingAdd struct {
	key socklbSvcKey
	w   wanted
}

// batchable says whether adding w takes only a name, slots and a service entry, which
// batchAdd writes for many services at once. A restricted service is never batched, even
// with no pod allowed yet: a pod set while it waits in a batch would find no installed
// service to be allowed into.
func (dp *Datapath) batchable(w wanted) bool {
	return len(w.allowed) == 0 && w.flags&socklbSvcFlagsSVC_F_RESTRICT == 0 && w.affTimeout == 0 &&
		!dp.svcCounts && !dp.slotsOneByOne && len(w.slots) > 0
}

// batchAdd adds the services of batch as addService would, in three map writes for all
// of them: names, then slots, then the service entries that make them reachable, so no
// connect sees a service before its slots. It returns how many it added and appends an
// error for each it could not. A batch write that fails undoes what the batch wrote and
// adds those services one by one, which names each failure.
func (dp *Datapath) batchAdd(batch []pendingAdd, errs *[]error) int {
	if len(batch) == 0 {
		return 0
	}
	if dp.svcCounts {
		// Per-service counters were switched on while the batch waited: it found only the
		// installed services to give counters to, so these get theirs from addService.
		added := 0
		for _, p := range batch {
			if err := dp.addService(p.key, p.w); err != nil {
				*errs = append(*errs, err)
				continue
			}
			added++
		}
		return added
	}
	type written struct {
		key socklbSvcKey
		w   wanted
		id  uint32
		rev uint32
	}
	slots := 0
	for _, p := range batch {
		slots += len(p.w.slots)
	}
	ws := make([]written, 0, len(batch))
	nameKeys, nameValues := make([]uint32, 0, len(batch)), make([]socklbSvcName, 0, len(batch))
	slotKeys, slotValues := make([]socklbSlotKey, 0, slots), make([]socklbBackend, 0, slots)
	for _, p := range batch {
		id, err := dp.allocID()
		if err != nil {
			*errs = append(*errs, fmt.Errorf("service %s: %w", p.w.name, err))
			continue
		}
		nv, _ := nameValue(p.w.name)
		// A fresh random revision, as addService gives.
		rev := rand.Uint32()
		ws = append(ws, written{key: p.key, w: p.w, id: id, rev: rev})
		nameKeys, nameValues = append(nameKeys, id), append(nameValues, nv)
		for i, a := range p.w.slots {
			slotKeys = append(slotKeys, socklbSlotKey{SvcId: id, Rev: rev, Slot: uint32(i)})
			slotValues = append(slotValues, backendValue(a))
		}
	}
	if len(ws) == 0 {
		return 0
	}
	// retry undoes what the batch wrote of these services and adds them one by one.
	retry := func(these []written, cause error) int {
		if len(these) > 0 {
			dp.log.WithError(cause).Debugf("a batch write stopped; adding %d services one by one", len(these))
		}
		added := 0
		for _, x := range these {
			dp.deleteSlots(x.id, x.rev, len(x.w.slots))
			dp.deleteName(x.id)
		}
		for _, x := range these {
			if err := dp.addService(x.key, x.w); err != nil {
				*errs = append(*errs, err)
				continue
			}
			added++
		}
		return added
	}
	opts := &ebpf.BatchOptions{ElemFlags: uint64(ebpf.UpdateAny)}
	if _, err := dp.objs.PodsockNameV2.BatchUpdate(nameKeys, nameValues, opts); err != nil {
		return retry(ws, err)
	}
	if _, err := dp.objs.PodsockSlotV1.BatchUpdate(slotKeys, slotValues, opts); err != nil {
		return retry(ws, err)
	}
	svcKeys := make([]socklbSvcKey, len(ws))
	svcValues := make([]socklbSvcValue, len(ws))
	for i, x := range ws {
		svcKeys[i] = x.key
		svcValues[i] = socklbSvcValue{Id: x.id, Rev: x.rev, SlotCount: uint32(len(x.w.slots)), Flags: x.w.flags}
	}
	// The kernel takes no NOEXIST for a batch; a stray entry at one of these keys is
	// replaced, as addService replaces it.
	_, err := batchUpdateServices(dp.objs.PodsockSvcV1, svcKeys, svcValues, opts)
	var failed []written
	added := 0
	for i, x := range ws {
		if err != nil {
			// The kernel stops at the first entry it cannot write; which ones it wrote is
			// read back rather than trusted from the count. Those serve; the rest are
			// undone and retried one by one.
			var v socklbSvcValue
			if lerr := dp.objs.PodsockSvcV1.Lookup(&svcKeys[i], &v); lerr != nil || v.Id != x.id || v.Rev != x.rev {
				failed = append(failed, x)
				continue
			}
		}
		cur := &installed{id: x.id, rev: x.rev, name: x.w.name, slots: x.w.slots, retained: x.w.retained, flags: x.w.flags}
		dp.services[x.key] = cur
		dp.index(cur)
		dp.traceServiceAdded(cur)
		added++
	}
	return added + retry(failed, err)
}

// pendingUpdate is a service waiting in a batch for its new slots.
type pendingUpdate struct {
	key          socklbSvcKey
	cur          *installed
	w            wanted
	gone         []netip.AddrPort
	firstWithout uint32
}

// batchableUpdate says whether updating cur to w only switches its slots: the same name
// and flags, no affinity to carry, not restricted, no timeout. batchUpdate writes those
// for many services at once. A restricted one is left out because a pod set while it
// waits is allowed into cur, which the wanted allow list, resolved before, would undo.
func (dp *Datapath) batchableUpdate(cur *installed, w wanted) bool {
	return w.name == cur.name && w.flags == cur.flags && w.flags&(affinityFlags|socklbSvcFlagsSVC_F_RESTRICT) == 0 &&
		len(w.allowed) == 0 && len(cur.allowed) == 0 && w.affTimeout == 0 && cur.affTimeout == 0 &&
		len(w.slots) > 0 && !slices.Equal(cur.slots, w.slots) && !dp.slotsOneByOne
}

// batchUpdate switches the services of batch to their new slots as updateService would,
// in three map writes for all of them: the new revision's slots, the service entries
// that switch to it, then the old revision's slots deleted. It returns the updates that
// took; a batch write that fails is undone for what it did not switch, and those
// services are updated one by one, which names each failure.
func (dp *Datapath) batchUpdate(batch []pendingUpdate, errs *[]error) []pendingUpdate {
	if len(batch) == 0 {
		return nil
	}
	// Sized up front, here and in batchAdd: grown by append, a 100k-service apply's
	// batches allocated several times what they hold.
	slots := 0
	for _, u := range batch {
		slots += len(u.w.slots)
	}
	slotKeys := make([]socklbSlotKey, 0, slots)
	slotValues := make([]socklbBackend, 0, slots)
	svcKeys := make([]socklbSvcKey, len(batch))
	svcValues := make([]socklbSvcValue, len(batch))
	for i, u := range batch {
		rev := u.cur.rev + 1
		for j, a := range u.w.slots {
			slotKeys = append(slotKeys, socklbSlotKey{SvcId: u.cur.id, Rev: rev, Slot: uint32(j)})
			slotValues = append(slotValues, backendValue(a))
		}
		svcKeys[i] = u.key
		svcValues[i] = socklbSvcValue{Id: u.cur.id, Rev: rev, SlotCount: uint32(len(u.w.slots)), Flags: u.w.flags}
	}
	// retry drops the new slots of these services and updates them one by one.
	retry := func(these []pendingUpdate, cause error) []pendingUpdate {
		if len(these) > 0 {
			dp.log.WithError(cause).Debugf("a batch write stopped; updating %d services one by one", len(these))
		}
		var done []pendingUpdate
		for _, u := range these {
			dp.deleteSlots(u.cur.id, u.cur.rev+1, len(u.w.slots))
		}
		for _, u := range these {
			if err := dp.updateService(u.key, u.cur, u.w); err != nil {
				*errs = append(*errs, err)
				continue
			}
			done = append(done, u)
		}
		return done
	}
	opts := &ebpf.BatchOptions{ElemFlags: uint64(ebpf.UpdateAny)}
	if _, err := dp.objs.PodsockSlotV1.BatchUpdate(slotKeys, slotValues, opts); err != nil {
		return retry(batch, err)
	}
	_, err := batchUpdateServices(dp.objs.PodsockSvcV1, svcKeys, svcValues, opts)
	switched := make([]pendingUpdate, 0, len(batch))
	var failed []pendingUpdate
	var oldSlots []socklbSlotKey
	for i, u := range batch {
		if err != nil {
			// As in batchAdd: which entries switched is read back.
			var v socklbSvcValue
			if lerr := dp.objs.PodsockSvcV1.Lookup(&svcKeys[i], &v); lerr != nil || v != svcValues[i] {
				failed = append(failed, u)
				continue
			}
		}
		for j := range u.cur.slots {
			oldSlots = append(oldSlots, socklbSlotKey{SvcId: u.cur.id, Rev: u.cur.rev, Slot: uint32(j)})
		}
		switched = append(switched, u)
	}
	// Services that had no backends have no old slots.
	if len(oldSlots) > 0 {
		if _, derr := dp.objs.PodsockSlotV1.BatchDelete(oldSlots, nil); derr != nil {
			// Some were deleted before the error: the rest one by one, missing ones ignored.
			for _, u := range switched {
				dp.deleteSlots(u.cur.id, u.cur.rev, len(u.cur.slots))
			}
		}
	}
	for _, u := range switched {
		u.cur.rev, u.cur.slots, u.cur.retained = u.cur.rev+1, u.w.slots, u.w.retained
		dp.index(u.cur)
	}
	return append(switched, retry(failed, err)...)
}

func (dp *Datapath) updateService(k socklbSvcKey, cur *installed, w wanted) error {
	name, slots := w.name, w.slots
	if name != cur.name {
		nv, _ := nameValue(name)
		if err := dp.objs.PodsockNameV2.Update(&cur.id, &nv, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("service %s: write name: %w", name, err)
		}
		dp.unindex(cur)
		cur.name = name
		dp.index(cur)
	}
	// Newly allowed pods get their entries before the switch, formerly allowed ones lose
	// theirs after it: a pod allowed both before and after is never refused. A timeout,
	// new or changed, holds from the switch on; one that goes, from after it.
	if err := dp.writeAllowed(cur, w.allowed); err != nil {
		return fmt.Errorf("service %s: %w", name, err)
	}
	if w.affTimeout != 0 {
		if err := dp.writeAffTimeout(cur, w.affTimeout); err != nil {
			return fmt.Errorf("service %s: %w", name, err)
		}
	}
	sameSlots := slices.Equal(cur.slots, slots)
	if sameSlots && cur.flags == w.flags {
		dp.deleteAllowed(cur, w.allowed)
		// Retained backends live here only: nothing to switch.
		cur.retained = w.retained
		return nil
	}
	rev := cur.rev
	var carried []socklbPodSvcKey
	if !sameSlots {
		rev = cur.rev + 1
		if err := dp.writeSlots(cur.id, rev, slots); err != nil {
			return fmt.Errorf("service %s: %w", name, err)
		}
		if keep := cur.flags & w.flags & affinityFlags; keep != 0 {
			carried = dp.carryAffinity(cur, keep, rev, slots)
		}
	}
	v := socklbSvcValue{Id: cur.id, Rev: rev, SlotCount: uint32(len(slots)), Flags: w.flags}
	if err := dp.objs.PodsockSvcV1.Update(&k, &v, ebpf.UpdateExist); err != nil {
		dp.uncarryAffinity(cur, carried)
		if !sameSlots {
			dp.deleteSlots(cur.id, rev, len(slots))
		}
		return fmt.Errorf("service %s: switch to revision %d: %w", name, rev, err)
	}
	if !sameSlots {
		dp.deleteSlots(cur.id, cur.rev, len(cur.slots))
	}
	dp.deleteAllowed(cur, w.allowed)
	if w.affTimeout == 0 {
		dp.deleteAffTimeout(cur)
	}
	gone := missingFrom(cur.slots, slots)
	oldFlags := cur.flags
	cur.rev, cur.slots, cur.retained, cur.flags = rev, slots, w.retained, w.flags
	dp.index(cur)
	lost := oldFlags & affinityFlags &^ w.flags
	switch {
	case lost != 0:
		// Choices of the clients the service no longer keeps, and those of the backends
		// gone, which went stale at the switch.
		dp.dropAffinity(cur.id, func(k socklbPodSvcKey, v *socklbAffValue) bool {
			return lost&clientFlag(k.PodId) != 0 || slices.Contains(gone, backendAddrPort(v.Be))
		})
	case w.flags&affinityFlags != 0 && len(gone) > 0:
		// Their choices went stale at the switch, so no client uses them any more; this
		// only frees the entries.
		dp.dropAffinity(cur.id, func(_ socklbPodSvcKey, v *socklbAffValue) bool {
			return slices.Contains(gone, backendAddrPort(v.Be))
		})
	}
	return nil
}

func (dp *Datapath) removeService(k socklbSvcKey, cur *installed) error {
	if err := dp.objs.PodsockSvcV1.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("service %s: delete: %w", cur.name, err)
	}
	dp.deleteSlots(cur.id, cur.rev, len(cur.slots))
	dp.deleteAllowed(cur, nil)
	if cur.flags&affinityFlags != 0 {
		// IDs are reused: a later service must not inherit these choices, the host's
		// included.
		dp.dropAffinity(cur.id, nil)
	}
	dp.deleteAffTimeout(cur)
	// IDs are reused: a later service starts its counts from zero, and traces only when
	// asked for.
	dp.deleteServiceCounter(cur.id)
	dp.traceServiceRemoved(cur)
	dp.deleteName(cur.id)
	delete(dp.services, k)
	dp.unindex(cur)
	return nil
}

// writeAffTimeout sets the service's affinity timeout, which only its connects read.
func (dp *Datapath) writeAffTimeout(svc *installed, d time.Duration) error {
	if svc.affTimeout == d {
		return nil
	}
	ns := uint64(d.Nanoseconds())
	if err := dp.objs.PodsockAfftimeV1.Update(&svc.id, &ns, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write affinity timeout: %w", err)
	}
	svc.affTimeout = d
	return nil
}

// deleteAffTimeout drops the service's affinity timeout. A failure leaves an entry that
// only a service with this ID and the timeout flag would read; the next adoption drops it.
func (dp *Datapath) deleteAffTimeout(svc *installed) {
	if svc.affTimeout == 0 {
		return
	}
	if err := dp.objs.PodsockAfftimeV1.Delete(&svc.id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		dp.log.WithError(err).Warnf("delete affinity timeout of service %s", svc.name)
		return
	}
	svc.affTimeout = 0
}

// deleteName drops a service's name and frees its ID. A failure only leaves an orphan
// name, which the next adoption removes.
func (dp *Datapath) deleteName(id uint32) {
	if err := dp.objs.PodsockNameV2.Delete(&id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		dp.log.WithError(err).Warnf("delete name of service %d", id)
	}
	delete(dp.usedIDs, id)
}

// readServices rebuilds the mirror from pinned maps left by a previous agent, and drops
// what an interrupted Apply may have left half-written (slots of a revision no service
// points at, names and timeouts of services that do not exist). Retained backends are in
// no map: the first Apply sets them.
func (dp *Datapath) readServices() error {
	byID := map[uint32]socklbSvcKey{}
	var k socklbSvcKey
	var v socklbSvcValue
	it := dp.objs.PodsockSvcV1.Iterate()
	for it.Next(&k, &v) {
		dp.services[k] = &installed{id: v.Id, rev: v.Rev, slots: make([]netip.AddrPort, v.SlotCount), flags: v.Flags}
		dp.usedIDs[v.Id] = true
		byID[v.Id] = k
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read pinned services: %w", err)
	}

	var sk socklbSlotKey
	var be socklbBackend
	var stale []socklbSlotKey
	sit := dp.objs.PodsockSlotV1.Iterate()
	for sit.Next(&sk, &be) {
		svc, ok := byID[sk.SvcId]
		cur := dp.services[svc]
		if !ok || cur.rev != sk.Rev || int(sk.Slot) >= len(cur.slots) {
			stale = append(stale, sk)
			continue
		}
		cur.slots[sk.Slot] = backendAddrPort(be)
	}
	if err := sit.Err(); err != nil {
		return fmt.Errorf("read pinned slots: %w", err)
	}
	for _, s := range stale {
		if err := dp.objs.PodsockSlotV1.Delete(&s); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			dp.log.WithError(err).Warnf("drop stale slot %+v", s)
		}
	}

	var id uint32
	var nv socklbSvcName
	var orphans []uint32
	nit := dp.objs.PodsockNameV2.Iterate()
	for nit.Next(&id, &nv) {
		svc, ok := byID[id]
		if !ok {
			orphans = append(orphans, id)
			continue
		}
		dp.services[svc].name = nameString(nv)
	}
	if err := nit.Err(); err != nil {
		return fmt.Errorf("read pinned names: %w", err)
	}
	for _, o := range orphans {
		dp.deleteName(o)
	}

	var timeout uint64
	var staleTimeouts []uint32
	tit := dp.objs.PodsockAfftimeV1.Iterate()
	for tit.Next(&id, &timeout) {
		svc, ok := byID[id]
		if !ok || timeout == 0 || dp.services[svc].flags&socklbSvcFlagsSVC_F_AFFINITY_TIMEOUT == 0 {
			staleTimeouts = append(staleTimeouts, id)
			continue
		}
		dp.services[svc].affTimeout = time.Duration(timeout)
	}
	if err := tit.Err(); err != nil {
		return fmt.Errorf("read pinned affinity timeouts: %w", err)
	}
	for _, id := range staleTimeouts {
		if err := dp.objs.PodsockAfftimeV1.Delete(&id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			dp.log.WithError(err).Warnf("drop stale affinity timeout of service %d", id)
		}
	}
	for id := range dp.usedIDs {
		dp.nextID = max(dp.nextID, id+1)
	}
	dp.reindex()
	if len(dp.services) > 0 {
		dp.log.Infof("adopted %d services from pinned maps (%d stale slots dropped)", len(dp.services), len(stale))
	}
	return nil
}

// Services reads the services back from the maps, as the BPF programs see them. It takes
// no lock: the maps are safe to read while Apply writes them (a service caught mid-update
// shows its old or new revision, or an error to retry), and a walk over 100k services
// must not hold up runtime events waiting to install pods.
func (dp *Datapath) Services() ([]Service, error) {
	var out []Service
	var k socklbSvcKey
	var v socklbSvcValue
	it := dp.objs.PodsockSvcV1.Iterate()
	for it.Next(&k, &v) {
		s := Service{VIP: wordsAddr(k.Addr), Port: ntohs(k.Port), Proto: k.Proto}
		var nv socklbSvcName
		if err := dp.objs.PodsockNameV2.Lookup(&v.Id, &nv); err == nil {
			s.Name = nameString(nv)
		}
		slots := make([]netip.AddrPort, 0, v.SlotCount)
		for i := range v.SlotCount {
			var be socklbBackend
			sk := socklbSlotKey{SvcId: v.Id, Rev: v.Rev, Slot: i}
			if err := dp.objs.PodsockSlotV1.Lookup(&sk, &be); err != nil {
				return nil, fmt.Errorf("service %s: slot %d: %w", s.Name, i, err)
			}
			slots = append(slots, backendAddrPort(be))
		}
		s.Backends = weightsFromSlots(slots)
		s.Policy, s.HostOnly = policyOf(v.Flags), v.Flags&socklbSvcFlagsSVC_F_HOST_ONLY != 0
		out = append(out, s)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read services: %w", err)
	}
	// The timeouts as this process wrote or adopted them; allowed pods are the agent's.
	dp.mu.Lock()
	for i := range out {
		if cur := dp.services[svcKey(out[i].VIP, out[i].Port, out[i].Proto)]; cur != nil {
			out[i].Policy.AffinityTimeout = cur.affTimeout
		}
	}
	dp.mu.Unlock()
	// Frontends of one name in a stable order too.
	slices.SortFunc(out, func(a, b Service) int {
		return cmp.Or(cmp.Compare(a.Name, b.Name), compareKeys(svcKey(a.VIP, a.Port, a.Proto), svcKey(b.VIP, b.Port, b.Proto)))
	})
	return out, nil
}

// policyOf is what a service's flags say of its policy, as Services reports it: all but
// the allowed pods and the affinity timeout.
func policyOf(f socklbSvcFlags) ServicePolicy {
	return ServicePolicy{
		AffinityPod:  f&socklbSvcFlagsSVC_F_AFFINITY_POD != 0,
		AffinityHost: f&socklbSvcFlagsSVC_F_AFFINITY_HOST != 0,
		Restrict:     f&socklbSvcFlagsSVC_F_RESTRICT != 0,
		AllowHost:    f&socklbSvcFlagsSVC_F_ALLOW_HOST != 0,
	}
}

// migrateNamesV1 copies the names an older agent pinned (podsock_name_v1, of shorter
// names) into the current map, before the services are read: only userspace reads names,
// so nothing races the copy. Whatever the current map holds for an ID the old one names
// is the old agent's to decide, as it ran last. The old pin goes with the other obsolete
// ones once the programs are attached, so a failed start leaves it for the older agent.
func (dp *Datapath) migrateNamesV1() error {
	pin := filepath.Join(dp.pinDir, "podsock_name_v1")
	old, err := ebpf.LoadPinnedMap(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open the service names of an older agent (%s): %w", pin, err)
	}
	defer func() { _ = old.Close() }()
	var id uint32
	var raw []byte
	n := 0
	it := old.Iterate()
	for it.Next(&id, &raw) {
		var nv socklbSvcName
		if len(raw) > len(nv.Name) {
			return fmt.Errorf("service names of an older agent: entry of %d bytes, more than %d", len(raw), len(nv.Name))
		}
		for i, c := range raw {
			nv.Name[i] = int8(c)
		}
		if err := dp.objs.PodsockNameV2.Update(&id, &nv, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("carry the name of service %d over from an older agent: %w", id, err)
		}
		n++
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read the service names of an older agent: %w", err)
	}
	dp.log.Infof("carried %d service names over from an older agent", n)
	return nil
}

// Counts returns the number of services and of distinct backend addresses they use.
func (dp *Datapath) Counts() (services, backends int) {
	// Walking 100k services' slots would hold the datapath from pod events and scrapes:
	// a fully applied set is counted from its input, once, by the first who asks.
	dp.inputMu.Lock()
	if dp.input != nil || dp.backendsCounted {
		if !dp.backendsCounted {
			dp.backendCount, dp.backendsCounted = distinctBackends(dp.input), true
		}
		backends = dp.backendCount
		dp.inputMu.Unlock()
		dp.mu.Lock()
		defer dp.mu.Unlock()
		return len(dp.services), backends
	}
	dp.inputMu.Unlock()
	dp.mu.Lock()
	defer dp.mu.Unlock()
	seen := map[netip.AddrPort]bool{}
	for _, s := range dp.services {
		for _, a := range s.slots {
			seen[a] = true
		}
	}
	return len(dp.services), len(seen)
}

// distinctBackends counts the addresses the services balance to: each backend has a slot.
func distinctBackends(services []Service) int {
	seen := map[netip.AddrPort]bool{}
	for _, s := range services {
		for _, b := range s.Backends {
			seen[b.Addr] = true
		}
	}
	return len(seen)
}

func uniqueAddrs(slots []netip.AddrPort) []netip.AddrPort {
	var out []netip.AddrPort
	seen := map[netip.AddrPort]bool{}
	for _, s := range slots {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

// missingFrom lists the addresses of old that next does not contain.
func missingFrom(old, next []netip.AddrPort) []netip.AddrPort {
	keep := map[netip.AddrPort]bool{}
	for _, s := range next {
		keep[s] = true
	}
	var out []netip.AddrPort
	for _, s := range uniqueAddrs(old) {
		if !keep[s] {
			out = append(out, s)
		}
	}
	return out
}

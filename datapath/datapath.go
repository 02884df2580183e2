// Package datapath is the sole owner of podsock's BPF objects: it loads the socket-LB
// programs, pins maps and links under <bpffs>/podsock, adopts what a previous agent left
// pinned, and writes services into the maps.
package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sirupsen/logrus"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/internal/cgroupfs"
)

// PinDirName is the directory under the bpffs mount that holds everything podsock pins.
const PinDirName = "podsock"

// maxServiceIDs bounds service IDs, whatever limits.services is (which it bounds).
const maxServiceIDs = 1 << 20

// ErrIncompatiblePins is returned when pinned maps exist whose layout differs from the one
// this binary was built with; they must be removed with `podsock cleanup` first.
var ErrIncompatiblePins = errors.New("pinned maps are incompatible with this podsock version")

// Options says where the datapath attaches and pins.
type Options struct {
	// CgroupRoot is the cgroup v2 directory the socket-LB programs attach to.
	CgroupRoot string
	// BPFFS is a mounted bpffs; pins go under BPFFS/podsock.
	BPFFS string
	// HostNetns is the cookie of the netns whose sockets count as the host's (hostns_only,
	// allow_host). 0 means the netns this process runs in, which is right for a node agent.
	HostNetns uint64
	// Limits size the maps; pinned maps of another size are migrated at load.
	Limits Limits
	// TraceRing is the trace ring's size in bytes, a power of two of at least a page;
	// 0 means DefaultTraceRing.
	TraceRing int
	Log       logrus.FieldLogger
}

// attachPoint ties a program to its cgroup hook and the name of its pinned link.
type attachPoint struct {
	name   string
	attach ebpf.AttachType
	prog   func(*socklbPrograms) *ebpf.Program
}

var attachPoints = []attachPoint{
	{"connect4", ebpf.AttachCGroupInet4Connect, func(p *socklbPrograms) *ebpf.Program { return p.PodsockConnect4 }},
	{"connect6", ebpf.AttachCGroupInet6Connect, func(p *socklbPrograms) *ebpf.Program { return p.PodsockConnect6 }},
	{"sendmsg4", ebpf.AttachCGroupUDP4Sendmsg, func(p *socklbPrograms) *ebpf.Program { return p.PodsockSendmsg4 }},
	{"sendmsg6", ebpf.AttachCGroupUDP6Sendmsg, func(p *socklbPrograms) *ebpf.Program { return p.PodsockSendmsg6 }},
	{"recvmsg4", ebpf.AttachCGroupUDP4Recvmsg, func(p *socklbPrograms) *ebpf.Program { return p.PodsockRecvmsg4 }},
	{"recvmsg6", ebpf.AttachCGroupUDP6Recvmsg, func(p *socklbPrograms) *ebpf.Program { return p.PodsockRecvmsg6 }},
	{"getpeername4", ebpf.AttachCgroupInet4GetPeername, func(p *socklbPrograms) *ebpf.Program { return p.PodsockGetpeername4 }},
	{"getpeername6", ebpf.AttachCgroupInet6GetPeername, func(p *socklbPrograms) *ebpf.Program { return p.PodsockGetpeername6 }},
	{"sock_release", ebpf.AttachCgroupInetSockRelease, func(p *socklbPrograms) *ebpf.Program { return p.PodsockSockRelease }},
}

// Datapath holds the loaded programs, the pinned maps and links, and a mirror of what the
// maps contain so that Apply writes only differences.
type Datapath struct {
	// lock is the pin dir held with flock: one agent (or cleanup) at a time.
	lock     *os.File
	opts     Options
	pinDir   string
	cgroupID uint64
	log      logrus.FieldLogger

	objs  socklbObjects
	links map[string]link.Link
	// iter lists and destroys sockets; nil (with iterErr saying why) on kernels without
	// iter/tcp, iter/udp or bpf_sock_destroy.
	iter    *sockIter
	iterErr error
	// iterLoaded is closed once iter and iterErr are set. The iterators load while the
	// first services are applied: a third of a start's program loads, which nothing on
	// the connect path needs.
	iterLoaded chan struct{}
	// mapCounts reads the kernel's entry counts of the hash maps; nil (with mapCountsErr
	// saying why) where the kernel refuses it, and MapStats walks the maps instead.
	mapCounts    *mapCounter
	mapCountsErr error
	// backfillPending is set when socket state was adopted without socket counts, and the
	// kernel refused the one-pass backfill: Backfill must walk every netns first.
	backfillMu      sync.Mutex
	backfillPending bool
	// unservedAtZero are count entries at zero, of services gone, seen by the last
	// PruneSocketCounts: the next one deletes those still so.
	pruneMu        sync.Mutex
	unservedAtZero map[socklbSvcNetnsKey]bool
	// AdoptedLinks counts links that a previous agent pinned and this one took over.
	adoptedLinks int

	// handlesMu lets readers of counters and map sizes (scrapes, status) skip mu, which an
	// Apply holds chunk after chunk: they only need the handles to stay open.
	handlesMu sync.RWMutex

	// input is what the last Apply that worked in full was given, as ApplyChanges has
	// changed it since; nil when what is installed is not known to be any input (adopted
	// pins, a failed Apply, or one writing). Applies write it, under inputMu, which Counts
	// takes to count its backends (backendCount, once backendsCounted). A full Apply drops
	// it before it writes and keeps its count, for Counts to show until it settles.
	inputMu         sync.Mutex
	input           []Service
	backendCount    int
	backendsCounted bool

	mu       sync.Mutex
	services map[socklbSvcKey]*installed
	// ports mirrors the port filter (podsock_svcport_v1).
	ports portSet
	// heldSlots are the slots the services of input hold; only Applies use it.
	heldSlots int
	usedIDs   map[uint32]bool
	nextID    uint32
	// slotsOneByOne: the kernel has no batch map updates (before 5.6), so writeSlots
	// writes each slot on its own.
	slotsOneByOne bool
	// restricted (by name) and affinitySvcs (those with pod affinity) index services for
	// pod events. Apply keeps them current service by service, since pod events run
	// between its chunks. Names repeat (one per frontend of a Kubernetes service), so a
	// name indexes every restricted service of that name.
	restricted   map[string][]*installed
	affinitySvcs map[*installed]bool
	// applyMu makes Applies take turns; each holds mu only a chunk at a time. latePods are
	// the pods set while the running Apply had mu released: the services it has yet to
	// write admit them as they asked.
	applyMu  sync.Mutex
	latePods map[uint32]*installedPod // nil while no Apply runs

	pods       map[string]*installedPod // by sandbox ID
	podIDs     map[uint32]*installedPod
	nextPodID  uint32
	skipPods   map[uint32]bool
	hostnsOnly bool
	hostNetns  uint64
	// countEpoch is the epoch the loaded programs count in (see SOCK_F_EPOCH_MASK in
	// bpf/socklb.h), recorded in the settings for the next load.
	countEpoch uint32
	// countsPin is where the socket counts get pinned once the backfill is done; "" when
	// they are pinned.
	countsPin string
	limits    Limits
	// cfgWritten is what the settings map holds, as last written; nil when unknown.
	cfgWritten *socklbDatapathCfg
	// traceOn (a tracer is attached) and svcCounts (per-service counters) are settings
	// flags; a new agent starts with both off, whatever the last one left.
	traceOn   bool
	svcCounts bool
	trace     tracing
	// possibleCPUs is how many values a per-CPU map holds.
	possibleCPUs int
}

// Load loads the programs, reusing the pinned maps when they are compatible, and attaches
// them to the cgroup root. Links pinned by an earlier agent are taken over and switched to
// the new programs, so a restart never attaches twice and never leaves a gap.
func Load(opts Options) (*Datapath, error) {
	if opts.Log == nil {
		opts.Log = logrus.StandardLogger()
	}
	cgroupID, err := cgroupfs.ID(opts.CgroupRoot)
	if err != nil {
		return nil, err
	}
	pinDir := filepath.Join(opts.BPFFS, PinDirName)
	if err := os.MkdirAll(filepath.Join(pinDir, "links"), 0o700); err != nil {
		return nil, fmt.Errorf("create pin dir: %w", err)
	}
	lock, err := lockPinDir(pinDir)
	if err != nil {
		return nil, err
	}
	// Until the programs are loaded nothing else releases the lock; closeAll does after.
	loaded := false
	defer func() {
		if !loaded {
			lock.Close()
		}
	}()
	dp := &Datapath{
		lock:     lock,
		opts:     opts,
		pinDir:   pinDir,
		cgroupID: cgroupID,
		log:      opts.Log,
		links:    map[string]link.Link{},
		services: map[socklbSvcKey]*installed{},
		usedIDs:  map[uint32]bool{},
		nextID:   1,

		pods:      map[string]*installedPod{},
		podIDs:    map[uint32]*installedPod{},
		nextPodID: 1,
		skipPods:  map[uint32]bool{},
	}
	dp.hostNetns = opts.HostNetns
	if dp.hostNetns == 0 {
		if dp.hostNetns, err = ownNetnsCookie(); err != nil {
			return nil, err
		}
	}
	spec, kernelBTF, err := takeWarm()
	if err != nil {
		return nil, fmt.Errorf("load BPF spec: %w", err)
	}
	dp.limits = opts.Limits.resolve(spec)
	dp.limits.size(spec)
	resizedMaps, recount, err := resizePinned(spec, pinDir)
	if err != nil {
		return nil, err
	}
	replacements := map[string]*ebpf.Map{}
	for _, r := range resizedMaps {
		replacements[r.name] = r.m
	}
	defer func() {
		for _, r := range resizedMaps {
			_ = r.m.Close()
		}
	}()
	// Socket state without this count map (an agent with another count layout, a map
	// resized or removed by hand, a backfill that never finished) holds connected sockets
	// it does not count: a new count epoch starts, and the backfill counts them. The new
	// map is pinned only once that is done, so an agent that dies first leaves no pin and
	// the next one counts again.
	needBackfill := pinned(pinDir, "podsock_sock_v1") && (!pinned(pinDir, "podsock_svcnetns_v2") || recount)
	dp.countEpoch = pinnedCountEpoch(pinDir)
	if needBackfill {
		dp.countEpoch = (dp.countEpoch + 1) % countEpochs
		if replacements["podsock_svcnetns_v2"] == nil {
			counts, err := newUnpinned(spec.Maps["podsock_svcnetns_v2"])
			if err != nil {
				return nil, fmt.Errorf("create socket counts: %w", err)
			}
			defer func() { _ = counts.Close() }()
			replacements["podsock_svcnetns_v2"] = counts
		}
		dp.countsPin = filepath.Join(pinDir, "podsock_svcnetns_v2")
	}
	if err := setCountEpoch(spec, dp.countEpoch); err != nil {
		return nil, err
	}
	if dp.possibleCPUs, err = ebpf.PossibleCPU(); err != nil {
		return nil, fmt.Errorf("count possible CPUs: %w", err)
	}
	if dp.trace.err = prepareTrace(spec, opts.TraceRing); dp.trace.err != nil {
		if !errors.Is(dp.trace.err, ErrTraceUnavailable) {
			return nil, dp.trace.err
		}
		opts.Log.WithError(dp.trace.err).Warn("podsock trace is unavailable; balancing is not affected")
	}
	// One decode of the kernel's BTF (tens of milliseconds) serves every object loaded.
	err = spec.LoadAndAssign(&dp.objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: pinDir}, MapReplacements: replacements, Cache: kernelBTF})
	if err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			// The whole log, not the truncated summary: it is what a kernel difference needs.
			opts.Log.Errorf("verifier rejected the socket-LB programs:\n%+v", verr)
			return nil, fmt.Errorf("load socket-LB programs (verifier log above): %w", err)
		}
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("%w in %s (run `podsock cleanup`): %w", ErrIncompatiblePins, pinDir, err)
		}
		return nil, fmt.Errorf("load socket-LB programs: %w", err)
	}
	loaded = true
	if err := dp.migrateNamesV1(); err != nil {
		return nil, errors.Join(err, dp.closeAll())
	}
	if err := dp.readServices(); err != nil {
		return nil, errors.Join(err, dp.closeAll())
	}
	// Before the programs attach: an empty filter would pass every pinned service by.
	if err := dp.writePorts(portsOf(dp.services)); err != nil {
		return nil, errors.Join(err, dp.closeAll())
	}
	if err := dp.readPods(); err != nil {
		return nil, errors.Join(err, dp.closeAll())
	}
	// Keep the pinned hostns_only setting until the agent applies its config: a restart
	// must not change what pods see.
	var cfg socklbDatapathCfg
	if err := dp.objs.PodsockCfgV1.Lookup(uint32(0), &cfg); err == nil {
		dp.hostnsOnly = cfg.Flags&socklbCfgFlagsCFG_HOSTNS_ONLY != 0
	}
	if err := dp.writeCfg(); err != nil {
		return nil, errors.Join(err, dp.closeAll())
	}
	if err := dp.attach(); err != nil {
		return nil, errors.Join(err, dp.closeAll())
	}
	// Only now may what an older agent's programs used go: a failed attach leaves them in
	// place.
	dp.removeObsoletePins()
	if err := dp.pinResized(resizedMaps); err != nil {
		// The programs serve from the resized maps; only a restart would miss them.
		dp.log.WithError(err).Error("resized maps are attached but not pinned; a restart loses what they hold")
	}
	dp.migrateAffinity()
	if dp.mapCounts, dp.mapCountsErr = loadMapCounter(kernelBTF); dp.mapCountsErr != nil {
		opts.Log.WithError(dp.mapCountsErr).Warn("the kernel keeps no map entry counts for podsock; status and metrics count entries by walking the maps")
	}
	dp.iterLoaded = make(chan struct{})
	loadIter := func() {
		defer close(dp.iterLoaded)
		if dp.iter, dp.iterErr = loadIterators(dp.objs.PodsockSockV1, dp.objs.PodsockSvcnetnsV2, dp.countEpoch, opts.Log, kernelBTF); dp.iterErr != nil {
			opts.Log.WithError(dp.iterErr).Warn("socket listing and termination are unavailable")
		} else if needBackfill {
			dp.backfill()
		}
	}
	if needBackfill {
		// Rare (an upgrade, a map resized): the counts are complete before anything is
		// served that terminates by them.
		loadIter()
	} else {
		go loadIter()
	}
	return dp, nil
}

// pinnedCountEpoch is the count epoch the pinned settings record, 0 without them.
func pinnedCountEpoch(pinDir string) uint32 {
	m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, "podsock_cfg_v1"), nil)
	if err != nil {
		return 0
	}
	defer func() { _ = m.Close() }()
	var cfg socklbDatapathCfg
	if err := m.Lookup(uint32(0), &cfg); err != nil || cfg.CountEpoch >= countEpochs {
		return 0
	}
	return cfg.CountEpoch
}

// pinCounts pins the socket counts once the backfill has counted every socket in them.
func (dp *Datapath) pinCounts() {
	if dp.countsPin == "" {
		return
	}
	if err := replacePin(dp.objs.PodsockSvcnetnsV2, dp.countsPin); err != nil {
		dp.log.WithError(err).Warn("pin the socket counts; the next start counts the sockets again")
		return
	}
	dp.countsPin = ""
}

// backfill counts the sockets balanced before the socket counts existed, in one pass when
// the kernel allows the map-element iterator; otherwise Backfill must walk each netns, and
// until it has, termination walks every netns.
func (dp *Datapath) backfill() {
	n, err := dp.iter.backfillCounts()
	if err != nil {
		dp.log.WithError(err).Info("count sockets balanced before their counts existed: one netns at a time, once the pods are known")
		dp.backfillPending = true
		return
	}
	dp.pinCounts()
	dp.log.Infof("counted %d connected sockets balanced before their counts existed", n)
}

func pinned(dir, name string) bool {
	_, err := os.Stat(filepath.Join(dir, name))
	return err == nil
}

// countEpochs is how many count epochs the socket flags tell apart.
const countEpochs = uint32(socklbSockStateFlagsSOCK_F_EPOCH_MASK>>socklbSockStateFlagsSOCK_F_EPOCH_SHIFT) + 1

// obsoletePins are maps earlier versions pinned that this one replaced; those it carries
// entries over from are migrated first (migrateNamesV1, migrateAffinity).
var obsoletePins = []string{"podsock_stat_v1", "podsock_stat_v2", "podsock_pairnetns_v1", "podsock_name_v1"}

func (dp *Datapath) removeObsoletePins() {
	for _, name := range obsoletePins {
		dp.removePin(filepath.Join(dp.pinDir, name))
	}
}

// attach puts one link per hook on the cgroup root. Links already there are taken over
// and switched to this run's programs (same maps, so they keep serving). Missing links are
// attached unpinned first; only when every hook has its link are the adopted ones
// switched, links of a previous cgroup root detached and the new ones pinned. A failure
// before that point leaves the node as it was, never forward translation without its
// reverse, nor one hook on this run's programs and another on the last run's: a switch
// that fails halfway is switched back.
func (dp *Datapath) attach() error {
	fresh := map[string]link.Link{}
	adopted := map[string]adoptedLink{}
	var stale []link.Link
	rollback := func() {
		for _, l := range fresh {
			l.Close() // unpinned: closing detaches it
		}
		for _, l := range stale {
			l.Close() // still pinned: keeps serving the old root
		}
		for _, a := range adopted {
			a.close()
		}
	}
	for _, ap := range attachPoints {
		prog := ap.prog(&dp.objs.socklbPrograms)
		pin := filepath.Join(dp.pinDir, "links", ap.name)
		own, old, err := dp.adoptLink(pin, ap)
		if err != nil {
			rollback()
			return err
		}
		if own.link != nil {
			adopted[ap.name] = own
			continue
		}
		if old != nil {
			stale = append(stale, old)
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: dp.opts.CgroupRoot, Attach: ap.attach, Program: prog})
		if err != nil {
			rollback()
			return fmt.Errorf("attach %s to %s: %w", ap.name, dp.opts.CgroupRoot, err)
		}
		fresh[ap.name] = l
	}
	if err := dp.switchAdopted(adopted); err != nil {
		rollback()
		return err
	}
	for name, a := range adopted {
		a.releaseOld()
		dp.links[name] = a.link
		dp.adoptedLinks++
	}
	for _, old := range stale {
		if err := detachLink(old); err != nil {
			dp.log.WithError(err).Warn("detach link of the previous cgroup root")
		}
	}
	for _, ap := range attachPoints {
		l, ok := fresh[ap.name]
		if !ok {
			continue
		}
		dp.links[ap.name] = l
		if err := l.Pin(filepath.Join(dp.pinDir, "links", ap.name)); err != nil {
			return fmt.Errorf("pin %s link: %w", ap.name, err)
		}
	}
	return nil
}

// adoptedLink is a pinned link on our cgroup root, with the program it ran when adopted.
type adoptedLink struct {
	link link.Link
	old  *ebpf.Program
}

func (a adoptedLink) releaseOld() {
	if a.old != nil {
		_ = a.old.Close() // a handle only: the link keeps its own reference
	}
}

func (a adoptedLink) close() {
	a.releaseOld()
	a.link.Close()
}

// switchAdopted moves every adopted link to this run's program. If one refuses, those
// already switched go back to the program they ran, so every hook stays on one version.
func (dp *Datapath) switchAdopted(adopted map[string]adoptedLink) error {
	var switched []string
	for _, ap := range attachPoints {
		a, ok := adopted[ap.name]
		if !ok {
			continue
		}
		err := updateLink(a.link, ap.prog(&dp.objs.socklbPrograms))
		if err == nil {
			switched = append(switched, ap.name)
			continue
		}
		for _, name := range switched {
			back := adopted[name]
			if back.old == nil {
				dp.log.WithField("hook", name).Error("cannot switch back: the program it ran is unknown")
				continue
			}
			if berr := updateLink(back.link, back.old); berr != nil {
				dp.log.WithError(berr).WithField("hook", name).Error("switch back to the running program")
			}
		}
		return fmt.Errorf("update adopted %s link: %w", ap.name, err)
	}
	return nil
}

// updateLink switches a link's program; tests make it fail.
var updateLink = func(l link.Link, prog *ebpf.Program) error { return l.Update(prog) }

// adoptLink looks at the pinned link of one hook. A link on our cgroup root is returned
// as ours to take over, with the program it runs now. A link on another cgroup
// (cgroup_root changed) is returned as old, for attach to detach once its replacement is
// in place.
func (dp *Datapath) adoptLink(pin string, ap attachPoint) (own adoptedLink, old link.Link, err error) {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return adoptedLink{}, nil, nil
	}
	if err != nil {
		dp.log.WithError(err).Warnf("pinned %s link is unusable; removing it", ap.name)
		return adoptedLink{}, nil, os.Remove(pin)
	}
	info, err := l.Info()
	if err != nil {
		// Detaching a link we cannot inspect could open a gap in service; refuse instead.
		l.Close()
		return adoptedLink{}, nil, fmt.Errorf("inspect pinned %s link: %w", ap.name, err)
	}
	if info.Cgroup() != nil && info.Cgroup().CgroupId == dp.cgroupID {
		own = adoptedLink{link: l}
		// Without the old program a failed switch cannot be undone; it is still adopted.
		if prog, perr := ebpf.NewProgramFromID(info.Program); perr == nil {
			own.old = prog
		} else {
			dp.log.WithError(perr).Warnf("open the program of the pinned %s link", ap.name)
		}
		return own, nil, nil
	}
	dp.log.Infof("pinned %s link belongs to another cgroup; replacing it", ap.name)
	return adoptedLink{}, l, nil
}

// ErrPinDirBusy means another process (an agent, or a cleanup) holds the pin dir.
var ErrPinDirBusy = errors.New("pin dir is in use")

// lockPinDir takes an exclusive flock on the pin dir, so two agents, or an agent and a
// cleanup, never work on the same pins at once, whatever their state dirs.
func lockPinDir(pinDir string) (*os.File, error) {
	f, err := os.Open(pinDir)
	if err != nil {
		return nil, fmt.Errorf("open pin dir: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: another podsock process holds %s", ErrPinDirBusy, pinDir)
		}
		return nil, fmt.Errorf("lock %s: %w", pinDir, err)
	}
	return f, nil
}

// detachLink removes a link from its hook even if other processes still hold it open.
func detachLink(l link.Link) error {
	defer l.Close()
	if err := l.Unpin(); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := l.Detach(); err != nil && !errors.Is(err, link.ErrNotSupported) && !errors.Is(err, unix.ENOLINK) {
		return err
	}
	return nil
}

// Close releases this process's handles. Pinned maps and links stay, and keep serving.
func (dp *Datapath) Close() error {
	dp.stopTracing()
	return dp.closeAll()
}

func (dp *Datapath) closeAll() error {
	dp.handlesMu.Lock()
	defer dp.handlesMu.Unlock()
	dp.mu.Lock()
	defer dp.mu.Unlock()
	defer dp.lock.Close()
	var errs []error
	for name, l := range dp.links {
		if err := l.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s link: %w", name, err))
		}
		delete(dp.links, name)
	}
	dp.WaitLoaded()
	if dp.iter != nil {
		if err := dp.iter.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close socket iterators: %w", err))
		}
		dp.iter = nil
	}
	if err := dp.mapCounts.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close map count iterator: %w", err))
	}
	dp.mapCounts = nil
	if err := dp.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close BPF objects: %w", err))
	}
	return errors.Join(errs...)
}

// PinDir is where the maps and links are pinned.
func (dp *Datapath) PinDir() string { return dp.pinDir }

// AdoptedLinks is how many links this datapath took over from a previous agent.
func (dp *Datapath) AdoptedLinks() int { return dp.adoptedLinks }

// Attached reports whether every socket-LB link is in place on the cgroup root.
func (dp *Datapath) Attached() bool {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	for _, ap := range attachPoints {
		l, ok := dp.links[ap.name]
		if !ok {
			return false
		}
		info, err := l.Info()
		if err != nil || info.Cgroup() == nil || info.Cgroup().CgroupId != dp.cgroupID {
			return false
		}
	}
	return true
}

// Stats are the operation counters, summed over CPUs.
type Stats = api.Counters

// Stats reads the datapath counters.
func (dp *Datapath) Stats() (Stats, error) {
	dp.handlesMu.RLock()
	defer dp.handlesMu.RUnlock()
	var sums [socklbStatIndexSTAT_MAX]uint64
	for i := range sums {
		var perCPU []uint64
		if err := dp.objs.PodsockStatV3.Lookup(uint32(i), &perCPU); err != nil {
			return Stats{}, fmt.Errorf("read stat %d: %w", i, err)
		}
		for _, v := range perCPU {
			sums[i] += v
		}
	}
	return Stats{
		Connects:  sums[socklbStatIndexSTAT_CONNECT],
		Sendmsgs:  sums[socklbStatIndexSTAT_SENDMSG],
		Reversed:  sums[socklbStatIndexSTAT_REVERSE],
		NoBackend: sums[socklbStatIndexSTAT_NO_BACKEND],
		NoStorage: sums[socklbStatIndexSTAT_NO_STORAGE],

		Denied:       sums[socklbStatIndexSTAT_DENIED],
		Skipped:      sums[socklbStatIndexSTAT_SKIPPED],
		AffinityFull: sums[socklbStatIndexSTAT_AFFINITY_FULL],

		Untracked:         sums[socklbStatIndexSTAT_UNTRACKED],
		UntrackedReleased: sums[socklbStatIndexSTAT_UNTRACKED_RELEASED],
	}, nil
}

// Cleanup detaches every link podsock pinned under bpffs and removes all its pins. It
// works from the pins alone, without loading anything.
func Cleanup(bpffs string) error {
	pinDir := filepath.Join(bpffs, PinDirName)
	linkDir := filepath.Join(pinDir, "links")
	lock, err := lockPinDir(pinDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer lock.Close()
	var errs []error
	entries, err := os.ReadDir(linkDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("read %s: %w", linkDir, err)
	}
	for _, e := range entries {
		pin := filepath.Join(linkDir, e.Name())
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			errs = append(errs, os.Remove(pin))
			continue
		}
		if err := detachLink(l); err != nil {
			errs = append(errs, fmt.Errorf("detach %s: %w", pin, err))
		}
	}
	if err := os.RemoveAll(pinDir); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", pinDir, err))
	}
	return errors.Join(errs...)
}

// ProgramCost is how often a program ran and for how long, as the kernel counts it while
// run-time statistics are enabled (ebpf.EnableStats or kernel.bpf_stats_enabled).
type ProgramCost struct {
	Runs    uint64
	Runtime time.Duration
}

// PerRun is the mean time of one run, 0 without runs.
func (c ProgramCost) PerRun() time.Duration {
	if c.Runs == 0 {
		return 0
	}
	return c.Runtime / time.Duration(c.Runs)
}

// ProgramCosts reads the kernel's run-time statistics of each socket-LB program.
func (dp *Datapath) ProgramCosts() (map[string]ProgramCost, error) {
	out := map[string]ProgramCost{}
	for _, ap := range attachPoints {
		st, err := ap.prog(&dp.objs.socklbPrograms).Stats()
		if err != nil {
			return nil, fmt.Errorf("stats of %s: %w", ap.name, err)
		}
		out[ap.name] = ProgramCost{Runs: st.RunCount, Runtime: st.Runtime}
	}
	return out, nil
}

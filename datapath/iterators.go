package datapath

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/sirupsen/logrus"
)

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
// socket counts, counting in the given epoch. Programs the kernel refuses are recorded
// with its reason; only an error that leaves no program usable (the shared maps) is
// returned. Loads sharing kernelBTF decode the kernel's types once.
func loadIterators(storage, counts *ebpf.Map, epoch uint32, log logrus.FieldLogger, kernelBTF *btf.Cache) (*sockIter, error) {
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
	if err := spec.LoadAndAssign(&it.maps, &ebpf.CollectionOptions{MapReplacements: shared, Cache: kernelBTF}); err != nil {
		return nil, fmt.Errorf("create iterator maps: %w", err)
	}
	all := map[string]*ebpf.Map{
		"podsock_sock_v1": storage, "podsock_svcnetns_v2": counts,
		"podsock_list_filter": it.maps.PodsockListFilter, "podsock_doomed": it.maps.PodsockDoomed,
		"podsock_destroy_count": it.maps.PodsockDestroyCount,
	}
	for _, p := range iterPrograms {
		prog, err := loadOneProgram(spec, p.name, all, kernelBTF)
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
func loadOneProgram(spec *ebpf.CollectionSpec, name string, maps map[string]*ebpf.Map, kernelBTF *btf.Cache) (*ebpf.Program, error) {
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
	coll, err := ebpf.NewCollectionWithOptions(one, ebpf.CollectionOptions{MapReplacements: repl, Cache: kernelBTF})
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

// WaitLoaded returns once what Load left loading in the background, the socket iterators,
// has loaded or failed to.
func (dp *Datapath) WaitLoaded() {
	if dp.iterLoaded != nil {
		<-dp.iterLoaded
	}
}

// iterators returns the loaded iterators, or why there are none.
func (dp *Datapath) iterators() (*sockIter, error) {
	dp.WaitLoaded()
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
		return allRefused(err)
	}
	return it.features()
}

// allRefused reports every iterator program as missing, for one reason.
func allRefused(err error) []Feature {
	out := make([]Feature, 0, len(iterPrograms))
	for _, p := range iterPrograms {
		out = append(out, Feature{Name: p.feature, Detail: err.Error()})
	}
	return out
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
	if err := it.maps.PodsockDestroyCount.Lookup(uint32(sockiterDestroyCountBACKFILLED), &n); err != nil {
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

package agent

import (
	"cmp"
	"errors"
	"net/netip"
	"slices"
	"sync"

	"github.com/podsock/podsock/datapath"
)

// fakeDatapath stands in for the kernel in tests of the agent's own logic: it keeps what
// was written, as the maps would, and records every call. It answers what the real one
// does for the same writes: the diff of an apply and its removed backends.
type fakeDatapath struct {
	mu       sync.Mutex
	services map[string]datapath.Service // by frontend key
	pods     map[string]datapath.Pod
	hostns   bool
	// applies are the service lists written, in order; syncs the pod lists of SyncPods.
	applies    [][]datapath.Service
	syncs      [][]datapath.Pod
	terminated [][]datapath.RemovedBackend
	// hold, when set, keeps an apply from finishing until it is closed; applying is told
	// when an apply has planned (ApplyOptions.Started) and holds.
	hold     chan struct{}
	applying chan struct{}
	// lastInput is the last apply's input when it worked, changes followed;
	// incrementalApplies counts the applies of changes alone.
	lastInput          []datapath.Service
	incrementalApplies int
	// applyErr fails the next apply once.
	applyErr error
	// pinsErr is what PinsOwned answers; svcCounts, whether per-service counters are on.
	pinsErr   error
	svcCounts bool
}

func newFakeDatapath() *fakeDatapath {
	return &fakeDatapath{services: map[string]datapath.Service{}, pods: map[string]datapath.Pod{}}
}

func (f *fakeDatapath) ApplyWith(svcs []datapath.Service, opts datapath.ApplyOptions) (datapath.ApplyResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.start(opts)
	if err := f.record(svcs); err != nil {
		return datapath.ApplyResult{}, err
	}
	return f.install(svcs), nil
}

// start tells the caller the apply started and, while a test holds applies, waits, as
// the datapath's long work would; it lets go of mu meanwhile, which the caller holds.
func (f *fakeDatapath) start(opts datapath.ApplyOptions) {
	hold, applying := f.hold, f.applying
	f.mu.Unlock()
	defer f.mu.Lock()
	if opts.Started != nil {
		opts.Started()
	}
	if hold != nil {
		if applying != nil {
			applying <- struct{}{}
		}
		<-hold
	}
}

// record keeps svcs as an apply's input, or fails the apply once if a test asked for
// that, leaving no input to follow changes from; under mu.
func (f *fakeDatapath) record(svcs []datapath.Service) error {
	f.applies = append(f.applies, slices.Clone(svcs))
	if err := f.applyErr; err != nil {
		f.applyErr = nil
		f.lastInput = nil
		return err
	}
	f.lastInput = slices.Clone(svcs)
	return nil
}

// ApplyChanges follows the changes as the datapath does, into the last input, which an
// incremental apply's test compares with what a full apply would have been given.
func (f *fakeDatapath) ApplyChanges(changes []datapath.Change, opts datapath.ApplyOptions) (datapath.ApplyResult, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.lastInput == nil || len(changes)*4 > len(f.lastInput) {
		return datapath.ApplyResult{}, false, nil
	}
	seen := map[int]bool{}
	for _, c := range changes {
		if c.At < 0 || c.At >= len(f.lastInput) || seen[c.At] || c.Service.Key() != f.lastInput[c.At].Key() {
			return datapath.ApplyResult{}, false, nil
		}
		seen[c.At] = true
	}
	f.start(opts)
	next := slices.Clone(f.lastInput)
	for _, c := range changes {
		next[c.At] = c.Service
	}
	if err := f.record(next); err != nil {
		return datapath.ApplyResult{}, true, err
	}
	f.incrementalApplies++
	return f.install(next), true, nil
}

// install makes svcs the services, as an apply does, under mu.
func (f *fakeDatapath) install(svcs []datapath.Service) datapath.ApplyResult {
	var res datapath.ApplyResult
	next := map[string]datapath.Service{}
	for _, s := range svcs {
		k := s.Key()
		next[k] = s
		old, ok := f.services[k]
		switch {
		case !ok:
			res.Added++
		case slices.Equal(old.Backends, s.Backends) && old.Name == s.Name:
			res.Unchanged++
		default:
			res.Updated++
		}
	}
	for k, old := range f.services {
		kept := next[k]
		if _, ok := next[k]; !ok {
			res.Removed++
		}
		for _, b := range old.Backends {
			if !slices.ContainsFunc(kept.Backends, func(n datapath.Backend) bool { return n.Addr == b.Addr }) {
				res.RemovedBackends = append(res.RemovedBackends, datapath.RemovedBackend{
					Service: old.Name, VIP: netip.AddrPortFrom(old.VIP, old.Port), Proto: old.Proto, Backend: b.Addr,
				})
			}
		}
	}
	f.services = next
	return res
}

func (f *fakeDatapath) AllowedSandboxes(string) []string { return nil }

func (f *fakeDatapath) SetHostnsOnly(on bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hostns = on
	return nil
}

func (f *fakeDatapath) SyncPods(pods []datapath.Pod) (datapath.PodSyncResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.syncs = append(f.syncs, slices.Clone(pods))
	var res datapath.PodSyncResult
	next := map[string]datapath.Pod{}
	for _, p := range pods {
		if _, ok := f.pods[p.SandboxID]; ok {
			res.Updated++
		} else {
			res.Added++
		}
		next[p.SandboxID] = p
	}
	res.Removed = len(f.pods) + res.Added - len(next)
	f.pods = next
	return res, nil
}

func (f *fakeDatapath) SetPod(p datapath.Pod) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pods[p.SandboxID] = p
	return nil
}

func (f *fakeDatapath) RemovePod(id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.pods, id)
	return nil
}

func (f *fakeDatapath) Terminate(_ datapath.NetnsSet, gone []datapath.RemovedBackend, _ datapath.TerminateOptions) (datapath.TerminateResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.terminated = append(f.terminated, slices.Clone(gone))
	return datapath.TerminateResult{Backends: len(gone)}, nil
}

func (f *fakeDatapath) TerminateErr(uint8) error                  { return nil }
func (f *fakeDatapath) PruneSocketCounts(datapath.NetnsSet) error { return nil }
func (f *fakeDatapath) BackfillPending() bool                     { return false }
func (f *fakeDatapath) Backfill(datapath.NetnsSet) (int, error)   { return 0, nil }

func (f *fakeDatapath) Services() ([]datapath.Service, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]datapath.Service, 0, len(f.services))
	for _, s := range f.services {
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b datapath.Service) int { return cmp.Compare(a.Key(), b.Key()) })
	return out, nil
}

func (f *fakeDatapath) Counts() (int, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, s := range f.services {
		n += len(s.Backends)
	}
	return len(f.services), n
}

func (f *fakeDatapath) Stats() (datapath.Stats, error) { return datapath.Stats{}, nil }
func (f *fakeDatapath) Attached() bool                 { return true }
func (f *fakeDatapath) PinsOwned() error               { return f.pinsErr }
func (f *fakeDatapath) SetServiceCounters(on bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.svcCounts = on
	return nil
}

// ServiceCounts answers, while on, one connect per service served, as if each was used once.
func (f *fakeDatapath) ServiceCounts() ([]datapath.ServiceCount, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.svcCounts {
		return nil, nil
	}
	var out []datapath.ServiceCount
	for _, s := range f.services {
		out = append(out, datapath.ServiceCount{Name: s.Name, VIP: netip.AddrPortFrom(s.VIP, s.Port), Proto: s.Proto, Connects: 1})
	}
	return out, nil
}
func (f *fakeDatapath) PinDir() string                        { return "/sys/fs/bpf/podsock-fake" }
func (f *fakeDatapath) AdoptedLinks() int                     { return 0 }
func (f *fakeDatapath) IteratorFeatures() []datapath.Feature  { return nil }
func (f *fakeDatapath) WaitLoaded()                           {}
func (f *fakeDatapath) MapStats() ([]datapath.MapStat, error) { return nil, nil }
func (f *fakeDatapath) ListErr(uint8) error                   { return errNoSocketsInFake }
func (f *fakeDatapath) Close() error                          { return nil }
func (f *fakeDatapath) Sockets(datapath.NetnsSet, datapath.SocketFilter, func(datapath.Socket) error) (datapath.WalkStats, error) {
	return datapath.WalkStats{}, errNoSocketsInFake
}

var errNoSocketsInFake = errors.New("the fake datapath has no sockets")

// state returns copies of what the fake holds now.
func (f *fakeDatapath) state() (applies [][]datapath.Service, pods map[string]datapath.Pod, syncs [][]datapath.Pod, terminated [][]datapath.RemovedBackend) {
	f.mu.Lock()
	defer f.mu.Unlock()
	pods = map[string]datapath.Pod{}
	for k, v := range f.pods {
		pods[k] = v
	}
	return slices.Clone(f.applies), pods, slices.Clone(f.syncs), slices.Clone(f.terminated)
}

func (f *fakeDatapath) Trace(datapath.TraceFilter) (*datapath.Tracer, error) {
	return nil, datapath.ErrTraceUnavailable
}

func (f *fakeDatapath) TraceFeature() datapath.Feature {
	return datapath.Feature{Name: "trace_ringbuf", Detail: "fake datapath"}
}

func (f *fakeDatapath) MapCountFeature() datapath.Feature {
	return datapath.Feature{Name: "map_elem_count", Detail: "fake datapath"}
}

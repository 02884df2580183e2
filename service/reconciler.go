package service

import (
	"cmp"
	"errors"
	"slices"
	"sync"
)

// ErrClosed answers those waiting on an apply that will not run: the reconciler closed.
var ErrClosed = errors.New("service reconciler closed")

// Plan is one apply's input: the services merged from every source, and the settings
// (the agent's file config) to apply them with.
type Plan[S any] struct {
	Settings S
	// NewSettings says these settings were not in any apply before.
	NewSettings bool
	Services    []Service
	Conflicts   []Conflict

	// seq is the settings' number; sources, those whose services the plan holds.
	seq     uint64
	sources []Source
}

// Reconciler is the one way services reach the datapath. Sources publish whole snapshots;
// its loop merges the latest of each (Merge: the file first) and hands the result to
// apply with the newest settings. Snapshots that arrive while an apply runs are coalesced
// into the next one. Nothing is applied before the first settings.
type Reconciler[S any] struct {
	apply        func(Plan[S]) error
	newConflicts func([]Conflict)
	limits       Limits

	mu            sync.Mutex
	settings      S
	haveSettings  bool
	settingsFresh bool
	settingsSeq   uint64
	views         map[Source]Snapshot
	// registered are sources that will publish: status shows them before they have.
	registered map[Source]bool
	// adopted is what the datapath serves for each source, as the last apply that worked
	// wrote it (or as found at start): an unsynced source keeps it.
	adopted map[Source][]Service
	// servedList is what the last apply that worked wrote; served indexes it by key,
	// built by the first Served after that apply: only a service listing asks, and
	// building it for each apply was 100k strings at 100k services.
	servedList []Service
	served     map[string]int
	// merger merges the views for each apply, and remembers the last merge.
	merger    merger
	conflicts []Conflict
	pending   bool
	waiters   []chan error
	closed    bool

	wake chan struct{}
	done chan struct{}
}

// NewReconciler starts a reconciler that writes with apply; newConflicts hears of the
// conflicts an apply has that the one before it did not. What the limits do not hold is
// left out as conflicts (Merge).
func NewReconciler[S any](apply func(Plan[S]) error, newConflicts func([]Conflict), limits Limits) *Reconciler[S] {
	r := &Reconciler[S]{
		apply: apply, newConflicts: newConflicts, limits: limits,
		views: map[Source]Snapshot{}, adopted: map[Source][]Service{}, registered: map[Source]bool{},
		wake: make(chan struct{}, 1), done: make(chan struct{}),
	}
	go r.run()
	return r
}

// Adopt records services found for a source before it has published (what a previous
// agent served for it), so that they stay until it has synced.
func (r *Reconciler[S]) Adopt(src Source, svcs []Service) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.adopted[src] = svcs
}

// Register announces a source that will publish, so that status shows it (unsynced, with
// what was adopted for it) before its first snapshot.
func (r *Reconciler[S]) Register(src Source) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.registered[src] = true
}

// PublishSettings hands over new settings together with the snapshot of the source they
// carry (the file's services come with the file's settings).
func (r *Reconciler[S]) PublishSettings(settings S, snap Snapshot) <-chan error {
	return r.publish(&settings, snap)
}

// Publish replaces what snap's source wants. The channel says how the apply that took it
// went (or a later one that took a newer snapshot in its place).
func (r *Reconciler[S]) Publish(snap Snapshot) <-chan error { return r.publish(nil, snap) }

func (r *Reconciler[S]) publish(settings *S, snap Snapshot) <-chan error {
	done := make(chan error, 1)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		done <- ErrClosed
		return done
	}
	if settings != nil {
		r.settings, r.haveSettings, r.settingsFresh = *settings, true, true
		r.settingsSeq++
	}
	r.views[snap.Source] = snap
	r.pending = true
	r.waiters = append(r.waiters, done)
	// Under mu: Close closes wake.
	select {
	case r.wake <- struct{}{}:
	default:
	}
	return done
}

// take returns what the next apply should write and those waiting on it; false when
// nothing is pending, no settings came yet, or the reconciler closed.
func (r *Reconciler[S]) take() (Plan[S], []chan error, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || !r.pending || !r.haveSettings {
		return Plan[S]{}, nil, false
	}
	views := map[Source][]Service{}
	for src, svcs := range r.adopted {
		views[src] = svcs
	}
	for src, snap := range r.views {
		if snap.Synced {
			views[src] = snap.Services
		}
	}
	p := Plan[S]{Settings: r.settings, NewSettings: r.settingsFresh, seq: r.settingsSeq}
	for src := range views {
		p.sources = append(p.sources, src)
	}
	p.Services, p.Conflicts = r.merger.merge(views, r.limits)
	waiters := r.waiters
	r.pending, r.settingsFresh, r.waiters = false, false, nil
	return p, waiters, true
}

// applied records what an apply wrote and returns the conflicts the previous apply did
// not have. A failed apply changes nothing recorded, and settings it failed to bring in
// stay new for the next apply, unless newer ones came meanwhile: the next apply that
// works makes them the running ones.
func (r *Reconciler[S]) applied(p Plan[S], err error) (fresh []Conflict) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		if p.NewSettings && p.seq == r.settingsSeq {
			r.settingsFresh = true
		}
		return nil
	}
	for _, src := range p.sources {
		r.adopted[src] = nil
	}
	// The plan's services are kept, not copied: nothing changes them after the apply, and
	// at 100k services each copy was 18 MB of the agent's heap.
	if src, one := singleSource(p.Services); one {
		r.adopted[src] = p.Services
	} else {
		for _, s := range p.Services {
			r.adopted[s.Source] = append(r.adopted[s.Source], s)
		}
	}
	r.servedList, r.served = p.Services, nil
	// A cluster past the limits has as many conflicts as services left out: no quadratic
	// compare.
	known := make(map[Conflict]bool, len(r.conflicts))
	for _, c := range r.conflicts {
		known[c] = true
	}
	for _, c := range p.Conflicts {
		if !known[c] {
			fresh = append(fresh, c)
		}
	}
	r.conflicts = p.Conflicts
	return fresh
}

func (r *Reconciler[S]) run() {
	defer close(r.done)
	for range r.wake {
		p, waiters, ok := r.take()
		if !ok {
			continue
		}
		err := r.apply(p)
		if fresh := r.applied(p, err); len(fresh) > 0 && r.newConflicts != nil {
			r.newConflicts(fresh)
		}
		for _, w := range waiters {
			w <- err
		}
	}
}

// Close stops the loop after the apply in progress; those still waiting get ErrClosed.
func (r *Reconciler[S]) Close() {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return
	}
	r.closed = true
	waiters := r.waiters
	r.waiters = nil
	close(r.wake)
	r.mu.Unlock()
	<-r.done
	for _, w := range waiters {
		w <- ErrClosed
	}
}

// SourceState is one source: whether it has synced, and how many services the datapath
// serves for it.
type SourceState struct {
	Source   Source
	Synced   bool
	Services int
}

// Sources are the sources known (published, registered, or with services adopted), by
// name, and the conflicts of the last apply that worked.
func (r *Reconciler[S]) Sources() ([]SourceState, []Conflict) {
	r.mu.Lock()
	defer r.mu.Unlock()
	known := map[Source]bool{}
	for src := range r.views {
		known[src] = true
	}
	for src := range r.registered {
		known[src] = true
	}
	for src, svcs := range r.adopted {
		known[src] = known[src] || len(svcs) > 0
	}
	out := make([]SourceState, 0, len(known))
	for src, ok := range known {
		if ok {
			out = append(out, SourceState{Source: src, Synced: r.views[src].Synced, Services: len(r.adopted[src])})
		}
	}
	slices.SortFunc(out, func(a, b SourceState) int { return cmp.Compare(a.Source, b.Source) })
	return out, slices.Clone(r.conflicts)
}

// Served is the service the last apply that worked wrote for key, as its source gave it
// (its endpoints included).
func (r *Reconciler[S]) Served(key string) (Service, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.served == nil {
		r.served = make(map[string]int, len(r.servedList))
		for i, s := range r.servedList {
			r.served[s.Key()] = i
		}
	}
	i, ok := r.served[key]
	if !ok {
		return Service{}, false
	}
	return r.servedList[i], true
}

// singleSource is the one source all of svcs come from, if there is one.
func singleSource(svcs []Service) (Source, bool) {
	if len(svcs) == 0 {
		return "", false
	}
	src := svcs[0].Source
	for _, s := range svcs[1:] {
		if s.Source != src {
			return "", false
		}
	}
	return src, true
}

package agent

import (
	"cmp"
	"errors"
	"slices"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/config"
	"github.com/podsock/podsock/service"
)

// errShutDown answers those waiting on an apply that will not run: the agent stopped.
var errShutDown = errors.New("agent stopping")

// reconciler is the one way services reach the datapath. Sources publish whole snapshots;
// its loop merges the latest of each (service.Merge, the file first) with the [lb]
// settings of the file config in force, and applies the result. Snapshots that arrive
// while an apply runs are coalesced into the next one.
type reconciler struct {
	mu sync.Mutex
	// cfg is the newest file config, fresh until an apply has taken it.
	cfg      *config.Config
	cfgFresh bool
	views    map[service.Source]service.Snapshot
	// adopted is what was last applied for each source: an unsynced source keeps it.
	adopted map[service.Source][]service.Service
	// sourceOf says which source each served key came from, for `services`.
	sourceOf  map[string]service.Source
	conflicts []service.Conflict
	pending   bool
	waiters   []chan error
	closed    bool

	wake chan struct{}
	done chan struct{}
}

func newReconciler() *reconciler {
	return &reconciler{
		views:   map[service.Source]service.Snapshot{},
		adopted: map[service.Source][]service.Service{},
		wake:    make(chan struct{}, 1),
		done:    make(chan struct{}),
	}
}

// adopt records services found for a source before it has published, so that they stay
// until it has synced.
func (r *reconciler) adopt(src service.Source, svcs []service.Service) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.adopted[src] = svcs
}

// publishConfig hands over a new file config: its services are the file source's
// snapshot, its [lb] section the settings. The channel says how the apply that took it
// went.
func (r *reconciler) publishConfig(cfg *config.Config) <-chan error {
	r.mu.Lock()
	r.cfg, r.cfgFresh = cfg, true
	r.mu.Unlock()
	return r.Publish(service.Snapshot{Source: service.SourceFile, Services: cfg.Services, Synced: true})
}

// Publish replaces what snap's source wants. The channel says how the apply that took it
// went (or a later one that took a newer snapshot in its place).
func (r *reconciler) Publish(snap service.Snapshot) <-chan error {
	done := make(chan error, 1)
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		done <- errShutDown
		return done
	}
	r.views[snap.Source] = snap
	r.pending = true
	r.waiters = append(r.waiters, done)
	// Under mu: close closes wake.
	select {
	case r.wake <- struct{}{}:
	default:
	}
	r.mu.Unlock()
	return done
}

// work is one apply's input, taken from the reconciler at once.
type work struct {
	cfg       *config.Config
	newConfig bool
	services  []service.Service
	conflicts []service.Conflict
	// used is, per synced source, the services of its snapshot that the apply writes.
	used    map[service.Source][]service.Service
	waiters []chan error
}

// take returns what the next apply should write, or false when nothing is pending or no
// file config has arrived yet (without one there are no [lb] settings to apply with).
func (r *reconciler) take() (work, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.pending || r.cfg == nil {
		return work{}, false
	}
	w := work{cfg: r.cfg, newConfig: r.cfgFresh, waiters: r.waiters, used: map[service.Source][]service.Service{}}
	views := map[service.Source][]service.Service{}
	for src, svcs := range r.adopted {
		views[src] = svcs
	}
	for src, snap := range r.views {
		if snap.Synced {
			views[src] = snap.Services
			w.used[src] = snap.Services
		}
	}
	w.services, w.conflicts = service.Merge(views)
	r.pending, r.cfgFresh, r.waiters = false, false, nil
	return w, true
}

// applied records what an apply wrote (a failed one changes nothing adopted) and returns
// the conflicts the previous apply did not have.
func (r *reconciler) applied(w work, err error) (newConflicts []service.Conflict) {
	r.mu.Lock()
	if err == nil {
		for src, svcs := range w.used {
			r.adopted[src] = svcs
		}
	}
	r.sourceOf = make(map[string]service.Source, len(w.services))
	for _, s := range w.services {
		r.sourceOf[s.Key()] = s.Source
	}
	for _, c := range w.conflicts {
		if !slices.Contains(r.conflicts, c) {
			newConflicts = append(newConflicts, c)
		}
	}
	r.conflicts = w.conflicts
	r.mu.Unlock()
	for _, done := range w.waiters {
		done <- err
	}
	return newConflicts
}

// close stops the loop after the apply in progress; those still waiting are told.
func (r *reconciler) close() {
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
	for _, done := range waiters {
		done <- errShutDown
	}
}

// sourceStatus is what `status` shows of the sources and their conflicts.
func (r *reconciler) sourceStatus() ([]api.SourceStatus, []api.ServiceConflict) {
	r.mu.Lock()
	defer r.mu.Unlock()
	sources := []api.SourceStatus{}
	for src, snap := range r.views {
		sources = append(sources, api.SourceStatus{Name: string(src), Synced: snap.Synced, Services: len(snap.Services)})
	}
	slices.SortFunc(sources, func(a, b api.SourceStatus) int { return cmp.Compare(a.Name, b.Name) })
	conflicts := make([]api.ServiceConflict, 0, len(r.conflicts))
	for _, c := range r.conflicts {
		conflicts = append(conflicts, api.ServiceConflict{
			Key:     c.Key,
			Kept:    api.ServiceRef{Source: string(c.Kept.Source), Name: c.Kept.Name},
			Dropped: api.ServiceRef{Source: string(c.Dropped.Source), Name: c.Dropped.Name},
		})
	}
	return sources, conflicts
}

// source is where the served service with this key came from.
func (r *reconciler) source(key string) service.Source {
	r.mu.Lock()
	defer r.mu.Unlock()
	if src, ok := r.sourceOf[key]; ok {
		return src
	}
	return service.SourceFile
}

// reconcileLoop applies what the sources publish until the reconciler closes.
func (a *Agent) reconcileLoop() {
	r := a.sources
	defer close(r.done)
	for range r.wake {
		w, ok := r.take()
		if !ok {
			continue
		}
		a.logConflicts(r.applied(w, a.apply(w)))
	}
}

// logConflicts says, when they first appear, which claims of a frontend lost to another source's.
func (a *Agent) logConflicts(conflicts []service.Conflict) {
	for _, c := range conflicts {
		a.log.WithFields(logrus.Fields{
			"key": c.Key, "kept": string(c.Kept.Source) + " " + c.Kept.Name, "dropped": string(c.Dropped.Source) + " " + c.Dropped.Name,
		}).Warn("two sources claim one service; the first in precedence serves it")
	}
}

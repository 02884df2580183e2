package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/runtimehooks"
)

// handlerBudget is how long an NRI event waits for its pod's datapath entries before it
// returns to the runtime anyway. Normally the work takes microseconds; the budget only
// matters while a large reload holds the datapath, and then the entries land right after.
const handlerBudget = 250 * time.Millisecond

// podQueue runs pod work in arrival order on one goroutine, so that events of one pod
// never overtake each other even when a handler stopped waiting for its own.
type podQueue struct {
	mu      sync.Mutex
	ops     []podOp
	running bool
	wake    chan struct{}
	closed  bool
}

type podOp struct {
	fn   func()
	done chan struct{}
}

func newPodQueue() *podQueue { return &podQueue{wake: make(chan struct{}, 1)} }

// run executes queued work until close.
func (q *podQueue) run() {
	for {
		q.mu.Lock()
		for len(q.ops) == 0 && !q.closed {
			q.mu.Unlock()
			<-q.wake
			q.mu.Lock()
		}
		if len(q.ops) == 0 {
			q.mu.Unlock()
			return
		}
		op := q.ops[0]
		q.ops = q.ops[1:]
		q.running = true
		q.mu.Unlock()
		op.fn()
		q.mu.Lock()
		q.running = false
		q.mu.Unlock()
		close(op.done)
	}
}

// idle reports whether no work is queued or running: work that starts now cannot overtake
// any.
func (q *podQueue) idle() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.ops) == 0 && !q.running && !q.closed
}

// do queues fn and waits for it at most budget. It never blocks longer, whatever fn does.
func (q *podQueue) do(budget time.Duration, fn func()) bool {
	op := podOp{fn: fn, done: make(chan struct{})}
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return false
	}
	q.ops = append(q.ops, op)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
	t := time.NewTimer(budget)
	defer t.Stop()
	select {
	case <-op.done:
		return true
	case <-t.C:
		return false
	}
}

func (q *podQueue) isClosed() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.closed
}

func (q *podQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// event runs one pod event's work, a few syscalls and map writes, counting it, and
// counting it as late when the runtime could not be kept waiting for it.
func (a *Agent) event(kind, id string, fn func() error) { a.dispatch(kind, id, true, fn) }

// dispatch runs work for the runtime: inline when allowed and nothing is pending,
// otherwise through the queue and its budget.
func (a *Agent) dispatch(kind, id string, inline bool, fn func() error) {
	a.events.add(kind)
	a.log.WithField("event", kind).Debugf("runtime event for %s", id)
	work := func() {
		if a.dp == nil {
			return
		}
		if err := fn(); err != nil {
			a.events.fail(kind)
			a.log.WithField("event", kind).WithError(err).Warn("pod facts incomplete")
		}
	}
	// The usual case: nothing pending and no config being applied. Running right here
	// spares the runtime two goroutine hand-offs, which on a busy node cost more than the
	// work itself.
	if inline && a.podq.idle() && a.opMu.TryLock() {
		work()
		a.opMu.Unlock()
		return
	}
	ok := a.podq.do(handlerBudget, func() {
		a.opMu.Lock()
		defer a.opMu.Unlock()
		work()
	})
	if !ok && !a.podq.isClosed() {
		a.events.late(kind)
		a.log.WithField("event", kind).Warnf("event work took over %s; the runtime was not kept waiting", handlerBudget)
	}
}

// The plugin.Handler methods.

func (a *Agent) Synchronize(sbs []runtimehooks.Sandbox, ctrs []runtimehooks.ContainerInfo) {
	// Its size is the node's: always through the queue and its budget.
	a.dispatch("Synchronize", fmt.Sprintf("%d pods, %d containers", len(sbs), len(ctrs)), false, func() error {
		pods, removed, err := a.tracker.Synchronize(sbs, ctrs)
		a.podsSynced = true
		a.term.SetPodsKnown()
		a.syncLearned = map[string]bool{}
		for _, p := range pods {
			a.syncLearned[p.SandboxID] = true
		}
		// Exact from now on: pods gone while no agent listened lose their entries, allow
		// entries included.
		res, serr := a.dp.SyncPods(datapathPods(pods, a.currentPolicy()))
		// Ready even when some pods' facts were incomplete (counted as failed): the
		// runtime sends no second Synchronize to wait for.
		a.ready.podsSynced.Store(true)
		a.log.WithFields(map[string]any{
			"pods": len(pods), "forgotten": len(removed),
			"added": res.Added, "updated": res.Updated, "removed": res.Removed,
		}).Info("synchronized with the runtime")
		return errors.Join(err, serr)
	})
}

func (a *Agent) RunPodSandbox(s runtimehooks.Sandbox) {
	a.event("RunPodSandbox", s.ID, func() error {
		delete(a.syncLearned, s.ID)
		pod, err := a.tracker.RunPodSandbox(s)
		return errors.Join(err, a.setPod(pod))
	})
}

func (a *Agent) StopPodSandbox(id string) {
	// The netns stays held until RemovePodSandbox: sockets may outlive the stop. A pod the
	// runtime reports stopping is one it tracks, so the sweeper need not watch it.
	a.event("StopPodSandbox", id, func() error {
		delete(a.syncLearned, id)
		return nil
	})
}

func (a *Agent) RemovePodSandbox(id string) {
	a.event("RemovePodSandbox", id, func() error { return a.forgetPod(id) })
}

// forgetPod drops a pod's facts, its netns handle and its datapath entries. Called with
// opMu held.
func (a *Agent) forgetPod(id string) error {
	delete(a.syncLearned, id)
	a.tracker.RemovePodSandbox(id)
	return a.dp.RemovePod(id)
}

// sweepInterval is how often pods that may never get a RemovePodSandbox are checked.
const sweepInterval = 500 * time.Millisecond

// sweepVanishedPods forgets pods the runtime stopped without telling us. containerd keeps
// which pods its plugins know in memory: after it restarts it sends neither StopPodSandbox
// nor RemovePodSandbox for pods that existed before, although containers still get theirs.
// Such pods are known only from a Synchronize. Once one stops (its netns path no longer
// names the namespace we hold, or its sandbox process is gone), nothing runs in it, and
// keeping it would only leak its entries and its netns until the next resync.
func (a *Agent) sweepVanishedPods(stop <-chan struct{}) {
	t := time.NewTicker(sweepInterval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		a.opMu.Lock()
		ids := slices.Collect(maps.Keys(a.syncLearned))
		tracker := a.tracker
		a.opMu.Unlock()
		for _, id := range ids {
			if tracker == nil || !tracker.SandboxGone(id) {
				continue
			}
			a.event("SandboxVanished", id, func() error {
				if !a.syncLearned[id] {
					return nil // a RemovePodSandbox came first
				}
				a.log.WithField("sandbox", id).Info("pod stopped without a runtime event (the runtime restarted since the pod started); forgetting it")
				return a.forgetPod(id)
			})
		}
	}
}

func (a *Agent) ContainerCreated(c runtimehooks.ContainerInfo) {
	a.container("PostCreateContainer", c, true)
}

func (a *Agent) ContainerStarted(c runtimehooks.ContainerInfo) {
	a.container("StartContainer", c, false)
}

func (a *Agent) container(kind string, c runtimehooks.ContainerInfo, early bool) {
	a.event(kind, c.ID, func() error {
		pod, err := a.tracker.ContainerCreated(c)
		if early && onlyNotExist(err) {
			// Some runtimes create the container's cgroup only when it starts;
			// StartContainer reads it again.
			err = nil
		}
		if pod.SandboxID == "" {
			return err
		}
		return errors.Join(err, a.setPod(pod))
	})
}

func (a *Agent) StopContainer(runtimehooks.ContainerInfo) { a.events.add("StopContainer") }

func (a *Agent) RemoveContainer(c runtimehooks.ContainerInfo) {
	a.event("RemoveContainer", c.ID, func() error {
		pod, ok := a.tracker.ContainerRemoved(c.ID)
		if !ok {
			return nil
		}
		return a.setPod(pod)
	})
}

// onlyNotExist reports whether every problem err carries is a missing file or directory.
func onlyNotExist(err error) bool {
	for err != nil {
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			for _, part := range j.Unwrap() {
				if !onlyNotExist(part) {
					return false
				}
			}
			return true
		}
		next := errors.Unwrap(err)
		if next == nil {
			return errors.Is(err, fs.ErrNotExist)
		}
		err = next
	}
	return false
}

// setPod pushes one pod's facts and policy into the datapath. Called with opMu held.
func (a *Agent) setPod(p runtimehooks.Pod) error {
	if p.SandboxID == "" {
		return nil
	}
	pol := a.currentPolicy()
	others := a.tracker.SharingCgroup(p.CgroupID, p.SandboxID)
	shared := map[uint64]bool{}
	if len(others) > 0 {
		shared[p.CgroupID] = true
	}
	err := a.dp.SetPod(datapathPod(p, pol, shared))
	// The pods that claimed this cgroup alone so far must give it up too.
	for _, other := range others {
		err = errors.Join(err, a.dp.SetPod(datapathPod(other, pol, shared)))
	}
	return err
}

// eventCounts counts runtime events by kind, with failures and late completions.
type eventCounts struct {
	mu     sync.Mutex
	counts map[string]*api.EventCount
}

func (e *eventCounts) get(kind string) *api.EventCount {
	if e.counts == nil {
		e.counts = map[string]*api.EventCount{}
	}
	c := e.counts[kind]
	if c == nil {
		c = &api.EventCount{}
		e.counts[kind] = c
	}
	return c
}

func (e *eventCounts) add(kind string)  { e.mu.Lock(); e.get(kind).Total++; e.mu.Unlock() }
func (e *eventCounts) fail(kind string) { e.mu.Lock(); e.get(kind).Failed++; e.mu.Unlock() }
func (e *eventCounts) late(kind string) { e.mu.Lock(); e.get(kind).Late++; e.mu.Unlock() }

func (e *eventCounts) snapshot() map[string]api.EventCount {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := map[string]api.EventCount{}
	for k, v := range e.counts {
		out[k] = *v
	}
	return out
}

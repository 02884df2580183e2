// Package terminator ends the sockets still attached to removed backends, off the
// config path: it batches removals that arrive close together, gives each a pass at once
// and a late pass after, and retries failed passes with backoff.
package terminator

import (
	"errors"
	"runtime/debug"
	"slices"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/datapath"
)

// terminationBatchWindow is how long a termination waits for more removals to join it:
// a burst of config changes (or a future endpoint watch) costs one pass.
const terminationBatchWindow = 2 * time.Millisecond

// latePassDelay is when removals get their second pass. A connect() that chose the
// backend just before the Apply may not be in the kernel's socket tables yet when the
// first pass walks them; by then it is. First pass, delay and late pass stay within the 1 s
// that SPEC promises.
const latePassDelay = 300 * time.Millisecond

// largePass is how many removals make a late pass large enough to hand its garbage back.
const largePass = 1000

// A failed pass is retried after retryBackoff, doubling up to maxRetryBackoff, at most
// maxPassAttempts times in all.
const (
	retryBackoff    = 50 * time.Millisecond
	maxRetryBackoff = 2 * time.Second
	maxPassAttempts = 8
)

// pruneInterval is how often the socket counts of netns that are gone are dropped.
const pruneInterval = 5 * time.Minute

// Datapath is what the Terminator needs of the datapath.
type Datapath interface {
	Terminate(datapath.NetnsSet, []datapath.RemovedBackend, datapath.TerminateOptions) (datapath.TerminateResult, error)
	TerminateErr(proto uint8) error
	PruneSocketCounts(datapath.NetnsSet) error
	BackfillPending() bool
	Backfill(datapath.NetnsSet) (int, error)
}

// removal is one removed {service, backend} pair on its way through its passes.
type removal struct {
	backend datapath.RemovedBackend
	// late marks the second pass; attempts counts failed passes of the current one.
	late     bool
	attempts int
	due      time.Time
}

// Terminator destroys the sockets of removed backends off the config path, batching
// removals that arrive close together. Every removal gets a first pass at once and a late
// pass latePassDelay after it; a pass that fails is retried with backoff.
type Terminator struct {
	dp  Datapath
	ns  datapath.NetnsSet
	log logrus.FieldLogger
	now func() time.Time

	mu      sync.Mutex
	pending []datapath.RemovedBackend
	// scheduled are late passes and retries, each due at its time.
	scheduled []removal
	// podsKnown is set once the runtime has said which pods exist: until then the pod
	// netns are not held yet, and a pass would find them unreachable and leave their
	// sockets for good, so removals wait.
	podsKnown    bool
	stats        api.TerminationStatus
	availability sync.Once // sets stats.Available and stats.Error
	wake         chan struct{}
	stop         chan struct{}
	done         chan struct{}
	// observe, if set, gets every pass: its sockets destroyed per protocol and its time.
	observe func(destroyed map[uint8]int, d time.Duration)
}

// New starts a Terminator over the netns ns reaches; passes wait for SetPodsKnown.
func New(dp Datapath, ns datapath.NetnsSet, log logrus.FieldLogger) *Terminator {
	t := &Terminator{dp: dp, ns: ns, log: log, now: time.Now, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go t.run()
	return t
}

// checkAvailable records what termination can do. The datapath knows once its socket
// iterators are loaded, which it does in the background while the first services are
// applied: asking in New made the agent's start wait for them (30-50 ms at 10k services).
func (t *Terminator) checkAvailable() {
	t.availability.Do(func() {
		errAll := t.dp.TerminateErr(0)
		// Available when at least one protocol can be terminated; Error names what cannot.
		available := t.dp.TerminateErr(datapath.ProtoTCP) == nil || t.dp.TerminateErr(datapath.ProtoUDP) == nil
		t.mu.Lock()
		defer t.mu.Unlock()
		if errAll != nil {
			t.stats.Error = errAll.Error()
		}
		t.stats.Available = available
	})
}

// Observe hands every pass from now on, its sockets destroyed per protocol and its
// duration, to fn (the agent's metrics). Call it before the first Remove.
func (t *Terminator) Observe(fn func(destroyed map[uint8]int, d time.Duration)) {
	t.mu.Lock()
	t.observe = fn
	t.mu.Unlock()
}

// SetPodsKnown lets passes run: the runtime's pods (and their netns) are known.
func (t *Terminator) SetPodsKnown() {
	t.mu.Lock()
	t.podsKnown = true
	t.mu.Unlock()
	t.poke()
}

func (t *Terminator) poke() {
	select {
	case t.wake <- struct{}{}:
	default:
	}
}

// remove queues removed backends of the protocols [lb] terminate covers. It never blocks.
func (t *Terminator) Remove(gone []datapath.RemovedBackend, protos []uint8) {
	t.mu.Lock()
	t.stats.Protocols = t.stats.Protocols[:0]
	for _, p := range protos {
		t.stats.Protocols = append(t.stats.Protocols, datapath.ProtoName(p))
	}
	// Grown once: appending 100k removals one by one allocated five times their size.
	t.pending = slices.Grow(t.pending, len(gone))
	for _, b := range gone {
		// Without the protocol's iterator there is nothing to do; status says why.
		if t.dp.TerminateErr(b.Proto) == nil && slices.Contains(protos, b.Proto) {
			t.pending = append(t.pending, b)
		}
	}
	queued := len(t.pending) > 0
	t.mu.Unlock()
	if queued {
		t.poke()
	}
}

func (t *Terminator) run() {
	defer close(t.done)
	t.checkAvailable()
	prune := time.NewTicker(pruneInterval)
	defer prune.Stop()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		timer.Reset(t.untilNextDue())
		select {
		case <-t.stop:
			return
		case <-prune.C:
			if err := t.dp.PruneSocketCounts(t.ns); err != nil {
				t.log.WithError(err).Warn("prune socket counts")
			}
		case <-timer.C:
			t.pass()
		case <-t.wake:
			select {
			case <-time.After(terminationBatchWindow):
			case <-t.stop:
				return
			}
			t.pass()
		}
	}
}

// untilNextDue is how long until the earliest scheduled pass (an hour when none is).
func (t *Terminator) untilNextDue() time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	next := time.Hour
	if !t.podsKnown {
		return next
	}
	for _, r := range t.scheduled {
		next = min(next, max(r.due.Sub(t.now()), 0))
	}
	return next
}

// take returns the removals that are due now: every new one, and the scheduled ones
// whose time has come (which ride along with a first pass if it runs anyway).
func (t *Terminator) take() []removal {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.podsKnown {
		return nil
	}
	now := t.now()
	due := make([]removal, 0, len(t.pending)+len(t.scheduled))
	for _, b := range t.pending {
		due = append(due, removal{backend: b})
	}
	t.pending = nil
	t.scheduled = slices.DeleteFunc(t.scheduled, func(r removal) bool {
		if r.due.After(now) {
			return false
		}
		due = append(due, r)
		return true
	})
	if len(t.scheduled) == 0 {
		// A reload that removed every backend left it holding that many: let them go.
		t.scheduled = nil
	}
	return due
}

func (t *Terminator) pass() {
	due := t.take()
	t.backfill()
	if len(due) == 0 {
		return
	}
	gone := make([]datapath.RemovedBackend, len(due))
	late := true
	for i, r := range due {
		gone[i] = r.backend
		late = late && r.late
	}
	res, destroyed, err := t.terminate(gone)
	log := t.log.WithFields(logrus.Fields{
		"backends": res.Backends, "destroyed": res.Destroyed, "failed": res.Failed,
		"netns_entered": res.NetnsEntered, "full_walk": res.FullWalk, "late": late,
		"duration_ms": float64(res.Duration.Microseconds()) / 1000,
	})
	switch {
	case err != nil:
		log.WithError(err).Error("terminate sockets of removed backends")
	case res.Destroyed > 0 || res.Failed > 0:
		log.Info("terminated sockets of removed backends")
	default:
		log.Debug("no sockets to terminate")
	}
	if res.NetnsUnreachable > 0 {
		t.log.Warnf("%d netns hold sockets of removed backends but podsock has no handle on them; they were left alone", res.NetnsUnreachable)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.observe != nil {
		t.observe(destroyed, res.Duration)
	}
	t.reschedule(due, err)
	t.stats.Passes++
	t.stats.Backends += uint64(res.Backends)
	t.stats.Destroyed += uint64(res.Destroyed)
	t.stats.Failed += uint64(res.Failed)
	t.stats.NetnsEntered += uint64(res.NetnsEntered)
	t.stats.NetnsUnreachable += uint64(res.NetnsUnreachable)
	if res.FullWalk {
		t.stats.FullWalks++
	}
	if late {
		t.stats.LatePasses++
		t.stats.LateDestroyed += uint64(res.Destroyed)
		if len(due) >= largePass {
			// The last work of a large reload: its garbage (several megabytes per 10k
			// backends) would keep the agent above its idle size until a collection
			// minutes later. The agent returns a config's garbage the same way.
			go debug.FreeOSMemory()
		}
	}
	t.stats.LastPassMillis = float64(res.Duration.Microseconds()) / 1000
	t.stats.LastError = ""
	if err != nil {
		t.stats.LastError = err.Error()
	}
}

// terminate runs one pass over gone, one protocol at a time when it mixes them: the
// destroy programs count what they ended in one counter for both, and the metrics say
// which protocol's sockets went. A pass of one protocol (a Service port has one) is one
// walk as before. netns entered is the larger of the walks' counts, exact when the same
// netns hold both protocols' sockets (clients that use both) and a lower bound otherwise.
func (t *Terminator) terminate(gone []datapath.RemovedBackend) (datapath.TerminateResult, map[uint8]int, error) {
	start := time.Now()
	var res datapath.TerminateResult
	destroyed := map[uint8]int{}
	var errs []error
	for _, proto := range []uint8{datapath.ProtoTCP, datapath.ProtoUDP} {
		part := gone
		if slices.ContainsFunc(gone, func(b datapath.RemovedBackend) bool { return b.Proto != proto }) {
			part = slices.DeleteFunc(slices.Clone(gone), func(b datapath.RemovedBackend) bool { return b.Proto != proto })
		}
		if len(part) == 0 {
			continue
		}
		r, err := t.dp.Terminate(t.ns, part, datapath.TerminateOptions{Protocols: []uint8{proto}})
		res.Backends += r.Backends
		res.Destroyed += r.Destroyed
		res.Failed += r.Failed
		res.NetnsEntered = max(res.NetnsEntered, r.NetnsEntered)
		res.NetnsUnreachable = max(res.NetnsUnreachable, r.NetnsUnreachable)
		res.FullWalk = res.FullWalk || r.FullWalk
		destroyed[proto] += r.Destroyed
		errs = append(errs, err)
	}
	res.Duration = time.Since(start)
	return res, destroyed, errors.Join(errs...)
}

// reschedule decides what comes after a pass: a late pass after a first one that
// worked, a retry with backoff after one that failed, until the attempts run out.
func (t *Terminator) reschedule(due []removal, err error) {
	now := t.now()
	if err != nil || slices.ContainsFunc(due, func(r removal) bool { return !r.late }) {
		// Grown once for what follows, unless every removal is done.
		t.scheduled = slices.Grow(t.scheduled, len(due))
	}
	for _, r := range due {
		switch {
		case err == nil && r.late:
			// Done with this removal.
		case err == nil:
			t.scheduled = append(t.scheduled, removal{backend: r.backend, late: true, due: now.Add(latePassDelay)})
		case r.attempts+1 >= maxPassAttempts:
			t.stats.GaveUp++
			t.log.WithError(err).Errorf("gave up terminating the sockets of %s after %d failed passes", r.backend, maxPassAttempts)
		default:
			r.attempts++
			r.due = now.Add(min(retryBackoff<<(r.attempts-1), maxRetryBackoff))
			t.scheduled = append(t.scheduled, r)
			t.stats.Retries++
		}
	}
}

// backfill counts, once the pods' netns are held, the sockets an older agent balanced
// without counting them, if the datapath could not at load. Until then passes walk every
// netns.
func (t *Terminator) backfill() {
	if !t.dp.BackfillPending() {
		return
	}
	n, err := t.dp.Backfill(t.ns)
	if err != nil {
		t.log.WithError(err).Warn("count sockets balanced before their counts existed; passes walk every netns until it succeeds")
		return
	}
	t.log.Infof("counted %d connected sockets balanced before their counts existed", n)
}

// Status is what `status` shows of termination.
func (t *Terminator) Status() api.TerminationStatus {
	t.checkAvailable()
	t.mu.Lock()
	defer t.mu.Unlock()
	st := t.stats
	st.Protocols = append([]string{}, t.stats.Protocols...)
	return st
}

// Close stops the Terminator after any pass in progress.
func (t *Terminator) Close() {
	close(t.stop)
	<-t.done
}

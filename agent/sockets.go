package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/internal/netns"
	"github.com/podsock/podsock/runtimehooks"
)

// nodeNetns is every netns the agent holds a handle to: the host's, and each pod's from
// RunPodSandbox to RemovePodSandbox. It is the datapath's way into them.
type nodeNetns struct {
	host    *netns.Handle
	tracker *runtimehooks.Tracker
}

// hostNetnsPath names the agent's own netns: the host's, for a node agent. The main thread
// never leaves it (cmd/podsock locks it), so /proc/self is safe here.
const hostNetnsPath = "/proc/self/ns/net"

func (n nodeNetns) Cookies() []uint64 {
	out := []uint64{n.host.Cookie()}
	for _, c := range n.tracker.NetnsCookies() {
		if c != n.host.Cookie() {
			out = append(out, c)
		}
	}
	return out
}

func (n nodeNetns) Enter(cookie uint64, f func() error) error {
	if cookie == n.host.Cookie() {
		return netns.Do(n.host.Fd(), f)
	}
	err := n.tracker.WithNetnsCookie(cookie, func(fd int) error { return netns.Do(fd, f) })
	if errors.Is(err, runtimehooks.ErrNoNetns) {
		return fmt.Errorf("%w: %w", datapath.ErrUnknownNetns, err)
	}
	return err
}

// terminationBatchWindow is how long a termination waits for more removals to join it:
// a burst of config changes (or a future endpoint watch) costs one pass.
const terminationBatchWindow = 2 * time.Millisecond

// latePassDelay is when removals get their second pass. A connect() that chose the
// backend just before the Apply may not be in the kernel's socket tables yet when the
// first pass walks them; by then it is. First pass, delay and late pass stay within the 1 s
// that SPEC promises.
const latePassDelay = 300 * time.Millisecond

// A failed pass is retried after retryBackoff, doubling up to maxRetryBackoff, at most
// maxPassAttempts times in all.
const (
	retryBackoff    = 50 * time.Millisecond
	maxRetryBackoff = 2 * time.Second
	maxPassAttempts = 8
)

// pruneInterval is how often the socket counts of netns that are gone are dropped.
const pruneInterval = 5 * time.Minute

// socketTerminator is what the terminator needs of the datapath.
type socketTerminator interface {
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

// terminator destroys the sockets of removed backends off the config path, batching
// removals that arrive close together. Every removal gets a first pass at once and a late
// pass latePassDelay after it; a pass that fails is retried with backoff.
type terminator struct {
	dp  socketTerminator
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
	podsKnown bool
	stats     api.TerminationStatus
	wake      chan struct{}
	stop      chan struct{}
	done      chan struct{}
}

func newTerminator(dp socketTerminator, ns datapath.NetnsSet, log logrus.FieldLogger) *terminator {
	t := &terminator{dp: dp, ns: ns, log: log, now: time.Now, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	if err := dp.TerminateErr(0); err != nil {
		t.stats.Error = err.Error()
	}
	// Available when at least one protocol can be terminated; Error names what cannot.
	t.stats.Available = dp.TerminateErr(datapath.ProtoTCP) == nil || dp.TerminateErr(datapath.ProtoUDP) == nil
	go t.run()
	return t
}

// setPodsKnown lets passes run: the runtime's pods (and their netns) are known.
func (t *terminator) setPodsKnown() {
	t.mu.Lock()
	t.podsKnown = true
	t.mu.Unlock()
	t.poke()
}

func (t *terminator) poke() {
	select {
	case t.wake <- struct{}{}:
	default:
	}
}

// remove queues removed backends of the protocols [lb] terminate covers. It never blocks.
func (t *terminator) remove(gone []datapath.RemovedBackend, protos []uint8) {
	t.mu.Lock()
	t.stats.Protocols = t.stats.Protocols[:0]
	for _, p := range protos {
		t.stats.Protocols = append(t.stats.Protocols, datapath.ProtoName(p))
	}
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

func (t *terminator) run() {
	defer close(t.done)
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
func (t *terminator) untilNextDue() time.Duration {
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
func (t *terminator) take() []removal {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.podsKnown {
		return nil
	}
	now := t.now()
	var due []removal
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
	return due
}

func (t *terminator) pass() {
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
	res, err := t.dp.Terminate(t.ns, gone, datapath.TerminateOptions{Protocols: []uint8{datapath.ProtoTCP, datapath.ProtoUDP}})
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
	}
	t.stats.LastPassMillis = float64(res.Duration.Microseconds()) / 1000
	t.stats.LastError = ""
	if err != nil {
		t.stats.LastError = err.Error()
	}
}

// reschedule decides what comes after a pass: a late pass after a first one that
// worked, a retry with backoff after one that failed, until the attempts run out.
func (t *terminator) reschedule(due []removal, err error) {
	now := t.now()
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
func (t *terminator) backfill() {
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

func (t *terminator) status() api.TerminationStatus {
	t.mu.Lock()
	defer t.mu.Unlock()
	st := t.stats
	st.Protocols = append([]string{}, t.stats.Protocols...)
	return st
}

// close stops the terminator after any pass in progress.
func (t *terminator) close() {
	close(t.stop)
	<-t.done
}

// socketFilter turns a query into the datapath's filter, given the pods the runtime
// reported; its errors are the user's (HTTP 400), and name the bad value.
func (a *Agent) socketFilter(q api.SocketQuery, pods []runtimehooks.Pod) (datapath.SocketFilter, error) {
	p, err := q.Parse()
	if err != nil {
		return datapath.SocketFilter{}, err
	}
	f := datapath.SocketFilter{Proto: protoNumber(p.Proto), Backend: p.Backend}
	if p.Pod == "" {
		return f, nil
	}
	for _, pod := range pods {
		if pod.Namespace+"/"+pod.Name != p.Pod {
			continue
		}
		cookie := pod.NetnsCookie
		if pod.HostNetwork {
			cookie = a.netns.host.Cookie()
		} else if cookie == 0 {
			return f, fmt.Errorf("--pod %q: podsock holds no netns of that pod", p.Pod)
		}
		if !slices.Contains(f.Netns, cookie) {
			f.Netns = append(f.Netns, cookie)
		}
	}
	if f.Netns == nil {
		return f, fmt.Errorf("--pod %q: no such pod (want NAMESPACE/NAME, as `podsock pods` shows)", p.Pod)
	}
	return f, nil
}

// protoNumber is the datapath's number for a protocol's name; 0 (both) for "".
func protoNumber(name string) uint8 {
	switch name {
	case "tcp":
		return datapath.ProtoTCP
	case "udp":
		return datapath.ProtoUDP
	}
	return 0
}

// serveSockets streams the sockets as a JSON array, one element at a time, so the agent
// never holds the whole list however many sockets the node has.
func (a *Agent) serveSockets(w http.ResponseWriter, r *http.Request) {
	q := api.SocketQuery{Pod: r.URL.Query().Get("pod"), Backend: r.URL.Query().Get("backend"), Proto: r.URL.Query().Get("proto")}
	pods := a.tracker.Pods()
	f, err := a.socketFilter(q, pods)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if err := a.dp.ListErr(f.Proto); err != nil {
		http.Error(w, err.Error(), http.StatusNotImplemented)
		return
	}
	podOf := map[uint64]string{}
	for _, p := range pods {
		if p.NetnsCookie != 0 && !p.HostNetwork {
			podOf[p.NetnsCookie] = p.Namespace + "/" + p.Name
		}
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	rc := http.NewResponseController(w)
	first := true
	st, err := a.dp.Sockets(a.netns, f, func(s datapath.Socket) error {
		// A client that stops reading must not hold the listing (and its lock) forever.
		if err := rc.SetWriteDeadline(time.Now().Add(listWriteTimeout)); err != nil {
			return err
		}
		sep := ","
		if first {
			sep, first = "[", false
		}
		if _, err := w.Write([]byte(sep)); err != nil {
			return err
		}
		return enc.Encode(socketView(s, podOf[s.NetnsCookie]))
	})
	if st.NetnsSkipped > 0 {
		a.log.Infof("list sockets: %d netns went away during the walk and were skipped", st.NetnsSkipped)
	}
	if err != nil {
		a.log.WithError(err).Warn("list sockets")
		if first {
			http.Error(w, "list sockets: "+err.Error(), http.StatusInternalServerError)
			return
		}
		// The status line is gone already: a cut connection is how the client learns.
		panic(http.ErrAbortHandler)
	}
	if first {
		_, _ = w.Write([]byte("["))
	}
	_, _ = w.Write([]byte("]\n"))
}

// listWriteTimeout bounds how long one element of a listing may wait on the client.
const listWriteTimeout = 30 * time.Second

func socketView(s datapath.Socket, pod string) api.SocketView {
	v := api.SocketView{
		Proto: datapath.ProtoName(s.Proto), State: datapath.StateName(s.Proto, s.State),
		Local: s.Local.String(), NetnsCookie: s.NetnsCookie, SocketCookie: s.Cookie, Pod: pod, UID: s.UID,
	}
	if s.Remote.IsValid() {
		v.Remote = s.Remote.String()
	}
	if s.Balanced {
		v.Service = s.Service
		v.Backend = s.Backend.String()
		v.VIP = s.VIP.String()
	}
	return v
}

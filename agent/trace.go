package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/runtimehooks"
)

// traceLostEvery is how often a trace stream reports its lost decisions, when the count
// changed.
const traceLostEvery = time.Second

// traceFilter turns a query into the datapath's filter: the pod's sandbox ID (pods share
// no name, but a name may name a pod that was re-created: each sandbox with that name).
func traceFilter(q api.TraceQuery, pods []runtimehooks.Pod) (datapath.TraceFilter, error) {
	var f datapath.TraceFilter
	if q.Service != "" {
		f.Services = []string{q.Service}
	}
	if q.Pod == "" {
		return f, nil
	}
	for _, p := range pods {
		if p.Namespace+"/"+p.Name == q.Pod {
			f.Pods = append(f.Pods, p.SandboxID)
		}
	}
	if f.Pods == nil {
		return f, fmt.Errorf("--pod %q: no such pod (want NAMESPACE/NAME, as `podsock pods` shows)", q.Pod)
	}
	return f, nil
}

// podNames names pods by sandbox ID and containers by cgroup ID, from the runtime's
// facts; a miss re-reads them, at most once per traceLostEvery.
type podNames struct {
	tracker *runtimehooks.Tracker
	pods    map[string]string
	ctrs    map[uint64]string
	read    time.Time
}

func (n *podNames) refresh() {
	n.pods, n.ctrs = map[string]string{}, map[uint64]string{}
	for _, p := range n.tracker.Pods() {
		n.pods[p.SandboxID] = p.Namespace + "/" + p.Name
		for _, c := range p.Containers {
			n.ctrs[c.CgroupID] = c.Name
		}
	}
	n.read = time.Now()
}

func (n *podNames) names(sandboxID string, cgroupID uint64) (pod, container string) {
	pod, okPod := n.pods[sandboxID]
	container, okCtr := n.ctrs[cgroupID]
	if ((sandboxID != "" && !okPod) || !okCtr) && time.Since(n.read) > traceLostEvery {
		n.refresh()
		pod, container = n.pods[sandboxID], n.ctrs[cgroupID]
	}
	return pod, container
}

func traceView(d datapath.Decision, pod, container string) api.TraceView {
	v := api.TraceView{
		Time: d.Time.UTC().Format(api.TraceTimeFormat), Op: d.Op, Proto: datapath.ProtoName(d.Proto),
		Pod: pod, Container: container, CgroupID: d.CgroupID,
		NetnsCookie: d.NetnsCookie, SocketCookie: d.SocketCookie,
		VIP: d.VIP.String(), Service: d.Service, Verdict: d.Verdict, Errno: d.Errno,
	}
	if d.Backend.IsValid() {
		v.Backend = d.Backend.String()
	}
	return v
}

// serveTrace streams decisions as NDJSON until the client goes away, and, each time it
// changed, how many the tracer lost.
func (a *Agent) serveTrace(w http.ResponseWriter, r *http.Request) {
	q := api.TraceQuery{Pod: r.URL.Query().Get("pod"), Service: r.URL.Query().Get("service")}
	f, err := traceFilter(q, a.tracker.Pods())
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	tr, err := a.dp.Trace(f)
	if errors.Is(err, datapath.ErrTraceUnavailable) {
		http.Error(w, err.Error(), http.StatusNotImplemented)
		return
	}
	if err != nil {
		http.Error(w, "trace: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer func() {
		if err := tr.Close(); err != nil {
			a.log.WithError(err).Warn("stop a tracer")
		}
	}()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if err := rc.Flush(); err != nil {
		return
	}
	enc := json.NewEncoder(w)
	names := &podNames{tracker: a.tracker}
	names.refresh()
	tick := time.NewTicker(traceLostEvery)
	defer tick.Stop()
	var reported uint64
	for {
		select {
		case <-r.Context().Done():
			return
		case <-tick.C:
			lost, err := tr.Lost()
			if err != nil {
				a.log.WithError(err).Warn("read lost trace decisions")
				continue
			}
			if lost == reported {
				continue
			}
			reported = lost
			if err := a.writeTrace(rc, enc, struct {
				Lost uint64 `json:"lost"`
			}{lost}, true); err != nil {
				return
			}
		case d, ok := <-tr.Decisions():
			if !ok {
				return
			}
			pod, ctr := names.names(d.SandboxID, d.CgroupID)
			// Flushed when no other decision waits, so a burst goes out in few writes.
			if err := a.writeTrace(rc, enc, traceView(d, pod, ctr), len(tr.Decisions()) == 0); err != nil {
				return
			}
		}
	}
}

func (a *Agent) writeTrace(rc *http.ResponseController, enc *json.Encoder, l any, flush bool) error {
	// A client that stops reading must not keep its tracer (and the ring's writes) forever.
	if err := rc.SetWriteDeadline(time.Now().Add(listWriteTimeout)); err != nil {
		return err
	}
	if err := enc.Encode(l); err != nil {
		return err
	}
	if flush {
		return rc.Flush()
	}
	return nil
}

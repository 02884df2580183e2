package plugin

import (
	"slices"
	"sync"
	"time"

	"github.com/podsock/podsock/api"
)

// latencyWindow is how many recent events per kind the percentiles are computed over.
const latencyWindow = 4096

// LatencySummary is how long the runtime waited on podsock for recent events of a kind.
type LatencySummary = api.LatencySummary

// latencies keeps a ring of recent durations per event kind.
type latencies struct {
	mu    sync.Mutex
	kinds map[string]*ring
	// observe, if set, gets every duration too.
	observe func(kind string, d time.Duration)
}

type ring struct {
	count uint64
	max   time.Duration
	buf   []time.Duration
	next  int
}

func newLatencies() *latencies { return &latencies{kinds: map[string]*ring{}} }

func (l *latencies) since(kind string, start time.Time) { l.add(kind, time.Since(start)) }

func (l *latencies) add(kind string, d time.Duration) {
	if l.observe != nil {
		l.observe(kind, d)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	r := l.kinds[kind]
	if r == nil {
		r = &ring{}
		l.kinds[kind] = r
	}
	r.count++
	r.max = max(r.max, d)
	if len(r.buf) < latencyWindow {
		r.buf = append(r.buf, d)
		return
	}
	r.buf[r.next] = d
	r.next = (r.next + 1) % latencyWindow
}

func (l *latencies) summary() map[string]LatencySummary {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]LatencySummary{}
	var all []time.Duration
	var total uint64
	var worst time.Duration
	for kind, r := range l.kinds {
		out[kind] = summarize(r.buf, r.count, r.max)
		if kind != "Synchronize" && kind != "Configure" { // neither is a pod event
			all = append(all, r.buf...)
			total += r.count
			worst = max(worst, r.max)
		}
	}
	if total > 0 {
		out["all_pod_events"] = summarize(all, total, worst)
	}
	return out
}

func summarize(buf []time.Duration, count uint64, worst time.Duration) LatencySummary {
	s := slices.Clone(buf)
	slices.Sort(s)
	return LatencySummary{Count: count, P50: percentile(s, 50), P99: percentile(s, 99), Max: worst}
}

// percentile of sorted s, nearest-rank.
func percentile(s []time.Duration, p int) time.Duration {
	if len(s) == 0 {
		return 0
	}
	i := (len(s)*p + 99) / 100
	return s[max(i-1, 0)]
}

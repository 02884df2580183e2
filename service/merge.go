package service

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
)

// Snapshot is one source's whole desired view: every service it wants, replacing what it
// handed over before.
type Snapshot struct {
	Source   Source
	Services []Service
	// Synced says the source has its full view (a watch has listed everything). Until then
	// the services adopted for it are kept: a partial view must not remove services that
	// pods are using.
	Synced bool
}

// Ref names one service of one source.
type Ref struct {
	Source Source
	Name   string
}

// Conflict is a service Merge leaves out: a frontend key ("10.96.0.20:80/tcp") or a
// name ("name default/web") that another claim took first (Kept), or one the datapath
// could not serve (Key "invalid", Reason says why; Kept is empty). Dropped stays out until
// the claim goes away or the service is fixed.
type Conflict struct {
	Key     string
	Kept    Ref
	Dropped Ref
	Reason  string
}

// precedence orders sources for Merge: the file first (an operator's own config beats a
// cluster's), then the others by name.
func precedence(a, b Source) int {
	switch {
	case a == b:
		return 0
	case a == SourceFile:
		return -1
	case b == SourceFile:
		return 1
	}
	return cmp.Compare(a, b)
}

// Limits bound what Merge hands the datapath: [limits] of the config. 0 means no bound.
type Limits struct {
	Services           int // limits.services
	BackendsPerService int // limits.backends_per_service
	Slots              int // limits.slots, shared by all services
	SlotsPerService    int // limits.slots_per_service
}

// Merge joins the sources' views into one list the datapath can serve: each frontend key
// once, and each name in one source only (a source may give one name several frontends,
// as a Kubernetes Service port has). Where two claims meet, the source first in
// precedence keeps it, and within one source the first claim; the other is a Conflict. A
// service that fails Check is left out as one too, and so is each service past what the
// limits hold, in the sources' order: a view too large for the maps is served as far as
// it fits rather than not at all. Every service in the result has its Source set.
func Merge(views map[Source][]Service, limits Limits) ([]Service, []Conflict) {
	out, conflicts, _ := merge(views, limits)
	return out, conflicts
}

// sortedSources are the views' sources in precedence order.
func sortedSources(views map[Source][]Service) []Source {
	sources := make([]Source, 0, len(views))
	for s := range views {
		sources = append(sources, s)
	}
	slices.SortFunc(sources, precedence)
	return sources
}

// merge is Merge, which also says how many slots the result takes.
func merge(views map[Source][]Service, limits Limits) ([]Service, []Conflict, int) {
	sources := sortedSources(views)
	n := 0
	for _, s := range sources {
		n += len(views[s])
	}
	// One source whose every service is kept as it came is the result itself: at 100k
	// services a copy was 18 MB of the agent's heap for as long as it serves them. out is
	// made only once a service is left out or needs its Source set.
	var out []Service
	var whole []Service // the one view, while out would equal its prefix
	if len(sources) == 1 {
		whole = views[sources[0]]
	}
	prefix, count := 0, 0 // the view's first services kept as they came; all kept
	keep := func(i int, svc Service, changed bool) {
		count++
		if whole != nil && !changed && i == prefix {
			prefix++
			return
		}
		if out == nil {
			out = make([]Service, 0, n)
			out = append(out, whole[:prefix]...)
			whole = nil
		}
		out = append(out, svc)
	}
	// Keyed by the frontend itself, in plain bytes, which hash as one word array: its
	// string (Key) is built only for a conflict. Check has made sure VIP and Protocol
	// are valid.
	type frontend struct {
		addr [16]byte
		port uint16
		is4  bool
		udp  bool
	}
	byKey := make(map[frontend]Ref, n)
	// Names may repeat within a source (a Kubernetes service's frontends), not across
	// sources: with one source there is nothing to look up.
	var byName map[string]Ref
	if len(sources) > 1 {
		byName = make(map[string]Ref, n)
	}
	var conflicts []Conflict
	// A service switching revisions holds its old and new slots at once, one at a time.
	slotBudget := limits.Slots - limits.SlotsPerService
	slotsUsed := 0
	for _, src := range sources {
		for i, svc := range views[src] {
			changed := svc.Source != src
			svc.Source = src
			ref := Ref{Source: src, Name: svc.Name}
			if err := svc.Check(limits.BackendsPerService); err != nil {
				conflicts = append(conflicts, Conflict{Key: "invalid", Dropped: ref, Reason: err.Error()})
				continue
			}
			fe := frontend{svc.VIP.As16(), svc.Port, svc.VIP.Is4(), svc.Protocol == ProtocolUDP}
			if kept, taken := byKey[fe]; taken {
				conflicts = append(conflicts, Conflict{Key: svc.Key(), Kept: kept, Dropped: ref, Reason: "frontend already served"})
				continue
			}
			if kept, taken := byName[svc.Name]; taken && kept.Source != src {
				conflicts = append(conflicts, Conflict{Key: "name " + svc.Name, Kept: kept, Dropped: ref, Reason: "name already used"})
				continue
			}
			if limits.Services > 0 && count >= limits.Services {
				conflicts = append(conflicts, Conflict{Key: svc.Key(), Dropped: ref, Reason: fmt.Sprintf("limits.services = %d reached", limits.Services)})
				continue
			}
			slots := SlotCount(svc.Backends, limits.SlotsPerService)
			if limits.Slots > 0 && slotsUsed+slots > slotBudget {
				conflicts = append(conflicts, Conflict{Key: svc.Key(), Dropped: ref, Reason: fmt.Sprintf("limits.slots = %d reached", limits.Slots)})
				continue
			}
			slotsUsed += slots
			byKey[fe] = ref
			if byName != nil {
				byName[svc.Name] = ref
			}
			keep(i, svc, changed)
		}
	}
	if whole != nil && prefix == len(whole) {
		return whole, conflicts, slotsUsed
	}
	if out == nil {
		out = append(make([]Service, 0, n), whole[:prefix]...)
	}
	return out, conflicts, slotsUsed
}

// merger is Merge with a memory of its last call, for the reconciler's loop: when that call
// left nothing out and the views are the same but for a few services, each keeping its
// name and frontend, the result is the last one with those replaced. At 100k services a
// reload that changes one then takes a pass over the views instead of building two maps
// of every name and frontend again.
type merger struct {
	views     map[Source][]Service // the last call's
	limits    Limits
	out       []Service
	slotsUsed int
	clean     bool // the last call had no conflicts
	patched   bool // the last call patched the result of the one before
}

// change is a service of the result that differs from the last.
type change struct {
	at  int // in the result
	svc Service
}

func (m *merger) merge(views map[Source][]Service, limits Limits) ([]Service, []Conflict) {
	out, slotsUsed, ok := m.mergeChanged(views, limits)
	var conflicts []Conflict
	if !ok {
		out, conflicts, slotsUsed = merge(views, limits)
	}
	m.views = make(map[Source][]Service, len(views))
	maps.Copy(m.views, views)
	m.limits, m.out, m.slotsUsed, m.clean, m.patched = limits, out, slotsUsed, len(conflicts) == 0, ok
	return out, conflicts
}

// mergeChanged is the last result with the services that changed since replaced, or
// false when Merge must merge the views again: a source came or went, a view grew or
// shrank, a name or frontend moved, a changed service fails Check or the slots do not
// hold it, or more than a quarter changed.
func (m *merger) mergeChanged(views map[Source][]Service, limits Limits) ([]Service, int, bool) {
	if !m.clean || limits != m.limits || len(views) != len(m.views) {
		return nil, 0, false
	}
	var changes []change
	slotsUsed, offset := m.slotsUsed, 0
	for _, src := range sortedSources(views) {
		view, last := views[src], m.views[src]
		if len(view) != len(last) {
			return nil, 0, false
		}
		for i := range view {
			svc, was := &view[i], &last[i]
			if !svc.SameFrontend(was) {
				return nil, 0, false
			}
			if svc.Equal(was) {
				continue
			}
			if svc.Check(limits.BackendsPerService) != nil || len(changes)*4 > len(m.out) {
				return nil, 0, false
			}
			slotsUsed += SlotCount(svc.Backends, limits.SlotsPerService) - SlotCount(was.Backends, limits.SlotsPerService)
			c := change{at: offset + i, svc: *svc}
			c.svc.Source = src
			changes = append(changes, c)
		}
		offset += len(view)
	}
	if limits.Slots > 0 && slotsUsed > limits.Slots-limits.SlotsPerService {
		return nil, 0, false
	}
	if view, ok := m.servedWhole(views, changes); ok {
		return view, slotsUsed, true
	}
	out := slices.Clone(m.out)
	for _, c := range changes {
		out[c.at] = c.svc
	}
	return out, slotsUsed, true
}

// servedWhole is the one view, when the last result was that view as it came and each
// changed service has its Source set: Merge would hand it over as it comes too.
func (m *merger) servedWhole(views map[Source][]Service, changes []change) ([]Service, bool) {
	if len(views) != 1 || len(m.out) == 0 {
		return nil, false
	}
	for src, view := range views {
		if &m.out[0] != &m.views[src][0] {
			return nil, false
		}
		for _, c := range changes {
			if view[c.at].Source != src {
				return nil, false
			}
		}
		return view, true
	}
	return nil, false
}

// SlotCount is how many slots of the selection table the datapath gives these backends:
// one per unit of weight, once the weights are divided by their greatest common divisor,
// and at most perService (0: no bound), where each backend keeps at least one.
func SlotCount(backends []Backend, perService int) int {
	var g, total uint64
	for _, b := range backends {
		g = gcd(g, uint64(max(b.Weight, 1)))
	}
	for _, b := range backends {
		total += uint64(max(b.Weight, 1)) / g
	}
	if perService > 0 && total > uint64(perService) {
		return max(perService, len(backends))
	}
	return int(total)
}

func gcd(a, b uint64) uint64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

package service

import (
	"cmp"
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

// Merge joins the sources' views into one list the datapath can serve: each frontend key
// once, and each name once (the datapath keys a service's pod policy by its name). Where
// two claims meet, the source first in precedence keeps it, and within one source the
// first claim; the other is a Conflict. A service that fails Check(maxBackends) is left
// out as one too. Every service in the result has its Source set.
func Merge(views map[Source][]Service, maxBackends int) ([]Service, []Conflict) {
	sources := make([]Source, 0, len(views))
	for s := range views {
		sources = append(sources, s)
	}
	slices.SortFunc(sources, precedence)
	n := 0
	for _, s := range sources {
		n += len(views[s])
	}
	out := make([]Service, 0, n)
	byKey := make(map[string]Ref, n)
	byName := make(map[string]Ref, n)
	var conflicts []Conflict
	for _, src := range sources {
		for _, svc := range views[src] {
			svc.Source = src
			ref := Ref{Source: src, Name: svc.Name}
			if err := svc.Check(maxBackends); err != nil {
				conflicts = append(conflicts, Conflict{Key: "invalid", Dropped: ref, Reason: err.Error()})
				continue
			}
			key := svc.Key()
			if kept, taken := byKey[key]; taken {
				conflicts = append(conflicts, Conflict{Key: key, Kept: kept, Dropped: ref, Reason: "frontend already served"})
				continue
			}
			if kept, taken := byName[svc.Name]; taken {
				conflicts = append(conflicts, Conflict{Key: "name " + svc.Name, Kept: kept, Dropped: ref, Reason: "name already used"})
				continue
			}
			byKey[key], byName[svc.Name] = ref, ref
			out = append(out, svc)
		}
	}
	return out, conflicts
}

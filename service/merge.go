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

// Conflict is a frontend (or a name) that two sources claim. Kept serves it; Dropped is
// left out until the claim goes away.
type Conflict struct {
	Key     string
	Kept    Ref
	Dropped Ref
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
// once, and each name owned by one source (a source may give several frontends one name).
// Where two sources claim a key or a name, the one first in precedence keeps it and the
// claim of the other is a Conflict. Within one source the first claim of a key wins.
// Every service in the result has its Source set.
func Merge(views map[Source][]Service) ([]Service, []Conflict) {
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
	nameOwner := make(map[string]Source, n)
	var conflicts []Conflict
	for _, src := range sources {
		for _, svc := range views[src] {
			svc.Source = src
			ref := Ref{Source: src, Name: svc.Name}
			key := svc.Key()
			if kept, taken := byKey[key]; taken {
				conflicts = append(conflicts, Conflict{Key: key, Kept: kept, Dropped: ref})
				continue
			}
			if owner, taken := nameOwner[svc.Name]; taken && owner != src {
				conflicts = append(conflicts, Conflict{Key: "name " + svc.Name, Kept: Ref{Source: owner, Name: svc.Name}, Dropped: ref})
				continue
			}
			byKey[key], nameOwner[svc.Name] = ref, src
			out = append(out, svc)
		}
	}
	return out, conflicts
}

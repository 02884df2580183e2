package service

import (
	"net/netip"
	"reflect"
	"testing"
)

func svc(name, vip string, port uint16) Service {
	return Service{Name: name, VIP: netip.MustParseAddr(vip), Port: port, Protocol: ProtocolTCP}
}

// A frontend two sources claim goes to the file, and the claim it beat is reported; the
// rest of both views is served, each service marked with its source.
func TestMergeFileWinsAConflict(t *testing.T) {
	got, conflicts := Merge(map[Source][]Service{
		SourceKubernetes: {svc("default/web:http", "10.96.0.20", 80), svc("default/web:http", "10.0.0.9", 80), svc("default/db:5432", "10.96.0.30", 5432)},
		SourceFile:       {svc("web", "10.96.0.20", 80), svc("extra", "10.96.0.40", 80)},
	})
	var keys []string
	for _, s := range got {
		keys = append(keys, string(s.Source)+" "+s.Name+" "+s.Key())
	}
	want := []string{
		"file web 10.96.0.20:80/tcp",
		"file extra 10.96.0.40:80/tcp",
		"kubernetes default/web:http 10.0.0.9:80/tcp",
		"kubernetes default/db:5432 10.96.0.30:5432/tcp",
	}
	if !reflect.DeepEqual(keys, want) {
		t.Fatalf("merged %q, want %q", keys, want)
	}
	wantConflicts := []Conflict{{
		Key:     "10.96.0.20:80/tcp",
		Kept:    Ref{Source: SourceFile, Name: "web"},
		Dropped: Ref{Source: SourceKubernetes, Name: "default/web:http"},
	}}
	if !reflect.DeepEqual(conflicts, wantConflicts) {
		t.Fatalf("conflicts %+v, want %+v", conflicts, wantConflicts)
	}
}

// One name belongs to one source: a second source's service of that name is left out,
// while one source may give several frontends one name.
func TestMergeNameBelongsToOneSource(t *testing.T) {
	got, conflicts := Merge(map[Source][]Service{
		SourceFile:       {svc("default/web", "10.96.0.20", 80)},
		SourceKubernetes: {svc("default/web", "10.96.0.21", 80), svc("default/api", "10.96.0.22", 80), svc("default/api", "10.96.0.23", 80)},
	})
	if len(got) != 3 || got[0].Name != "default/web" || got[0].Source != SourceFile || got[1].Name != "default/api" || got[2].Name != "default/api" {
		t.Fatalf("merged %+v", got)
	}
	if len(conflicts) != 1 || conflicts[0].Key != "name default/web" || conflicts[0].Dropped.Source != SourceKubernetes {
		t.Fatalf("conflicts %+v, want the kubernetes default/web", conflicts)
	}
}

// Views are never modified, and a merge of nothing is empty.
func TestMergeLeavesViewsAlone(t *testing.T) {
	view := []Service{svc("a", "10.96.0.1", 1)}
	got, _ := Merge(map[Source][]Service{SourceFile: view})
	if view[0].Source != "" || got[0].Source != SourceFile {
		t.Fatalf("view %+v, merged %+v", view, got)
	}
	if got, conflicts := Merge(nil); len(got) != 0 || len(conflicts) != 0 {
		t.Fatalf("Merge(nil) = %v, %v", got, conflicts)
	}
}

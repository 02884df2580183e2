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
		SourceKubernetes: {svc("default/web:http", "10.96.0.20", 80), svc("default/web:https", "10.0.0.9", 80), svc("default/db:5432", "10.96.0.30", 5432)},
		SourceFile:       {svc("web", "10.96.0.20", 80), svc("extra", "10.96.0.40", 80)},
	}, 0)
	var keys []string
	for _, s := range got {
		keys = append(keys, string(s.Source)+" "+s.Name+" "+s.Key())
	}
	want := []string{
		"file web 10.96.0.20:80/tcp",
		"file extra 10.96.0.40:80/tcp",
		"kubernetes default/web:https 10.0.0.9:80/tcp",
		"kubernetes default/db:5432 10.96.0.30:5432/tcp",
	}
	if !reflect.DeepEqual(keys, want) {
		t.Fatalf("merged %q, want %q", keys, want)
	}
	wantConflicts := []Conflict{{
		Key:     "10.96.0.20:80/tcp",
		Kept:    Ref{Source: SourceFile, Name: "web"},
		Dropped: Ref{Source: SourceKubernetes, Name: "default/web:http"},
		Reason:  "frontend already served",
	}}
	if !reflect.DeepEqual(conflicts, wantConflicts) {
		t.Fatalf("conflicts %+v, want %+v", conflicts, wantConflicts)
	}
}

// A name is served once: a second claim of it, from another source or the same one, is
// left out (the datapath keys pod policy by name).
func TestMergeServesANameOnce(t *testing.T) {
	got, conflicts := Merge(map[Source][]Service{
		SourceFile:       {svc("default/web", "10.96.0.20", 80)},
		SourceKubernetes: {svc("default/web", "10.96.0.21", 80), svc("default/api", "10.96.0.22", 80), svc("default/api", "10.96.0.23", 80)},
	}, 0)
	if len(got) != 2 || got[0].Name != "default/web" || got[0].Source != SourceFile || got[1].Name != "default/api" || got[1].VIP != netip.MustParseAddr("10.96.0.22") {
		t.Fatalf("merged %+v", got)
	}
	if len(conflicts) != 2 || conflicts[0].Key != "name default/web" || conflicts[0].Dropped.Source != SourceKubernetes ||
		conflicts[1].Key != "name default/api" || conflicts[1].Kept.Source != SourceKubernetes {
		t.Fatalf("conflicts %+v, want the kubernetes default/web and the second default/api", conflicts)
	}
}

// A service the datapath could not serve is left out with the reason, and the rest of its
// source's view is served.
func TestMergeLeavesOutInvalidServices(t *testing.T) {
	big := svc("default/big", "10.96.0.30", 80)
	for i := range 3 {
		big.Backends = append(big.Backends, Backend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 88, 0, byte(i + 1)}), 80), Weight: 1})
	}
	mixed := svc("default/mixed", "10.96.0.31", 80)
	mixed.Backends = []Backend{{Addr: netip.MustParseAddrPort("[fd00::1]:80"), Weight: 1}}
	noPort := svc("default/noport", "10.96.0.32", 0)
	got, conflicts := Merge(map[Source][]Service{SourceKubernetes: {big, mixed, noPort, svc("default/ok", "10.96.0.33", 80)}}, 2)
	if len(got) != 1 || got[0].Name != "default/ok" {
		t.Fatalf("merged %+v, want only default/ok", got)
	}
	want := map[string]string{
		"default/big":    "3 backends exceed limits.backends_per_service = 2",
		"default/mixed":  "backend [fd00::1]:80 is not of the vip's address family",
		"default/noport": "port 0",
	}
	if len(conflicts) != len(want) {
		t.Fatalf("conflicts %+v", conflicts)
	}
	for _, c := range conflicts {
		if c.Key != "invalid" || c.Reason != want[c.Dropped.Name] {
			t.Fatalf("conflict %+v, want invalid: %q", c, want[c.Dropped.Name])
		}
	}
}

// Views are never modified, and a merge of nothing is empty.
func TestMergeLeavesViewsAlone(t *testing.T) {
	view := []Service{svc("a", "10.96.0.1", 1)}
	got, _ := Merge(map[Source][]Service{SourceFile: view}, 0)
	if view[0].Source != "" || got[0].Source != SourceFile {
		t.Fatalf("view %+v, merged %+v", view, got)
	}
	if got, conflicts := Merge(nil, 0); len(got) != 0 || len(conflicts) != 0 {
		t.Fatalf("Merge(nil) = %v, %v", got, conflicts)
	}
}

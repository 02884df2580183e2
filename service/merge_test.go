package service

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
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
	}, Limits{})
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

// A name belongs to the first source that uses it: another source's claim is left out,
// while its own source may give it several frontends (a Service's ClusterIPs).
func TestMergeKeepsANameInOneSource(t *testing.T) {
	got, conflicts := Merge(map[Source][]Service{
		SourceFile:       {svc("default/web", "10.96.0.20", 80)},
		SourceKubernetes: {svc("default/web", "10.96.0.21", 80), svc("default/api", "10.96.0.22", 80), svc("default/api", "10.96.0.23", 80)},
	}, Limits{})
	var keys []string
	for _, s := range got {
		keys = append(keys, string(s.Source)+" "+s.Name+" "+s.Key())
	}
	want := []string{"file default/web 10.96.0.20:80/tcp", "kubernetes default/api 10.96.0.22:80/tcp", "kubernetes default/api 10.96.0.23:80/tcp"}
	if !reflect.DeepEqual(keys, want) {
		t.Fatalf("merged %q, want %q", keys, want)
	}
	if len(conflicts) != 1 || conflicts[0].Key != "name default/web" || conflicts[0].Dropped.Source != SourceKubernetes || conflicts[0].Kept.Source != SourceFile {
		t.Fatalf("conflicts %+v, want only the kubernetes default/web", conflicts)
	}
}

// A view larger than the limits is served as far as they hold, in the sources' order (the
// file first), and each service past them is a conflict that says which limit it hit.
func TestMergeServesWhatFitsTheLimits(t *testing.T) {
	withBackends := func(s Service, n int) Service {
		for i := range n {
			s.Backends = append(s.Backends, Backend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 88, 0, byte(i + 1)}), 80), Weight: 1})
		}
		return s
	}
	views := map[Source][]Service{
		SourceKubernetes: {withBackends(svc("k/a:80", "10.96.0.1", 80), 2), withBackends(svc("k/b:80", "10.96.0.2", 80), 2), svc("k/c:80", "10.96.0.3", 80)},
		SourceFile:       {withBackends(svc("f", "10.96.0.9", 80), 3)},
	}
	got, conflicts := Merge(views, Limits{Services: 3})
	if len(got) != 3 || got[0].Name != "f" || got[1].Name != "k/a:80" || got[2].Name != "k/b:80" {
		t.Fatalf("merged %+v", got)
	}
	if len(conflicts) != 1 || conflicts[0].Dropped.Name != "k/c:80" || conflicts[0].Reason != "limits.services = 3 reached" {
		t.Fatalf("conflicts %+v", conflicts)
	}
	// 3 + 2 slots fit a budget of 8 - 2 (the overlap of one switch); the next 2 do not, the
	// empty service does.
	got, conflicts = Merge(views, Limits{Slots: 8, SlotsPerService: 2})
	if len(got) != 3 || got[2].Name != "k/c:80" {
		t.Fatalf("merged %+v", got)
	}
	if len(conflicts) != 1 || conflicts[0].Dropped.Name != "k/b:80" || conflicts[0].Reason != "limits.slots = 8 reached" {
		t.Fatalf("conflicts %+v", conflicts)
	}
}

func TestSlotCount(t *testing.T) {
	b := func(w ...uint32) []Backend {
		var out []Backend
		for i, x := range w {
			out = append(out, Backend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 1)}), 1), Weight: x})
		}
		return out
	}
	for _, c := range []struct {
		backends   []Backend
		perService int
		want       int
	}{{nil, 0, 0}, {b(1, 1, 1), 0, 3}, {b(2, 4), 0, 3}, {b(1, 999), 0, 1000}, {b(1, 999), 16, 16}, {b(1, 1, 1), 2, 3}} {
		if got := SlotCount(c.backends, c.perService); got != c.want {
			t.Errorf("SlotCount(%v, %d) = %d, want %d", c.backends, c.perService, got, c.want)
		}
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
	got, conflicts := Merge(map[Source][]Service{SourceKubernetes: {big, mixed, noPort, svc("default/ok", "10.96.0.33", 80)}}, Limits{BackendsPerService: 2})
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
	got, _ := Merge(map[Source][]Service{SourceFile: view}, Limits{})
	if view[0].Source != "" || got[0].Source != SourceFile {
		t.Fatalf("view %+v, merged %+v", view, got)
	}
	if got, conflicts := Merge(nil, Limits{}); len(got) != 0 || len(conflicts) != 0 {
		t.Fatalf("Merge(nil) = %v, %v", got, conflicts)
	}
}

// One source whose every service is kept is served as it came, without a copy; one with a
// service left out, early or late, gets its own list, and its view stays as it was.
func TestMergeOneWholeViewIsTheResult(t *testing.T) {
	view := func() []Service {
		out := []Service{svc("a", "10.96.0.1", 1), svc("b", "10.96.0.2", 1), svc("c", "10.96.0.3", 1)}
		for i := range out {
			out[i].Source = SourceKubernetes
		}
		return out
	}
	whole := view()
	got, conflicts := Merge(map[Source][]Service{SourceKubernetes: whole}, Limits{})
	if len(conflicts) != 0 || len(got) != 3 || &got[0] != &whole[0] {
		t.Fatalf("a whole view was not served as it came: %+v %+v", got, conflicts)
	}
	names := func(svcs []Service) (out []string) {
		for _, s := range svcs {
			out = append(out, s.Name)
		}
		return out
	}
	for _, c := range []struct {
		name   string
		edit   func([]Service)
		limits Limits
		want   []string
	}{
		{"limit", nil, Limits{Services: 2}, []string{"a", "b"}},
		{"first invalid", func(v []Service) { v[0].Port = 0 }, Limits{}, []string{"b", "c"}},
		{"middle repeats a frontend", func(v []Service) { v[1].VIP = v[0].VIP }, Limits{}, []string{"a", "c"}},
	} {
		v := view()
		if c.edit != nil {
			c.edit(v)
		}
		before := slices.Clone(v)
		got, conflicts := Merge(map[Source][]Service{SourceKubernetes: v}, c.limits)
		if !slices.Equal(names(got), c.want) || len(conflicts) != 1 {
			t.Errorf("%s: merged %v with %d conflicts, want %v and 1", c.name, names(got), len(conflicts), c.want)
		}
		if !reflect.DeepEqual(v, before) {
			t.Errorf("%s: the view changed: %+v", c.name, v)
		}
		if len(got) > 0 && &got[0] == &v[0] {
			t.Errorf("%s: a view with a service left out was served in place", c.name)
		}
	}
}

// The merger gives what Merge gives, call after call, whatever changed between them; and
// where a few services changed and nothing was left out, it does so without merging again.
func TestMergerMatchesMerge(t *testing.T) {
	be := func(port uint16) []Backend {
		return []Backend{{Addr: netip.AddrPortFrom(netip.MustParseAddr("10.88.0.5"), port), Weight: 1}}
	}
	view := func(src Source, n int) []Service {
		out := make([]Service, n)
		for i := range out {
			out[i] = svc(fmt.Sprintf("%s/svc-%d", src, i), fmt.Sprintf("10.96.%d.%d", len(src), i), 80)
			out[i].Source, out[i].Backends = src, be(8080)
		}
		return out
	}
	limits := Limits{Services: 100, BackendsPerService: 4, Slots: 200, SlotsPerService: 8}
	views := map[Source][]Service{SourceFile: view(SourceFile, 40), SourceKubernetes: view(SourceKubernetes, 40)}
	edit := func(src Source, f func([]Service)) {
		v := slices.Clone(views[src])
		f(v)
		views[src] = v
	}
	var m merger
	check := func(step string, wantFast bool) {
		t.Helper()
		got, gotConflicts := m.merge(views, limits)
		want, wantConflicts := Merge(views, limits)
		if !reflect.DeepEqual(got, want) || !reflect.DeepEqual(gotConflicts, wantConflicts) {
			t.Fatalf("%s: merger gave %d services, conflicts %v; Merge %d, %v", step, len(got), gotConflicts, len(want), wantConflicts)
		}
		if m.patched != wantFast {
			t.Fatalf("%s: patched the last result %v, want %v", step, m.patched, wantFast)
		}
	}
	check("first", false)
	check("the same again", true)
	edit(SourceFile, func(v []Service) { v[3].Backends = be(8081) })
	check("one file backend", true)
	edit(SourceKubernetes, func(v []Service) { v[5].Endpoints = []Endpoint{{Addr: be(9)[0].Addr, Ready: true}}; v[6].Source = "" })
	check("endpoints, and a source unset", true)
	edit(SourceKubernetes, func(v []Service) { v[7].Port = 0 })
	check("an invalid service", false)
	check("still invalid", false)
	edit(SourceKubernetes, func(v []Service) { v[7].Port = 80 })
	check("fixed", false)
	edit(SourceKubernetes, func(v []Service) { v[8].VIP = views[SourceFile][8].VIP; v[8].Name = "file/svc-8" })
	check("a frontend and name the file has", false)
	edit(SourceKubernetes, func(v []Service) { v[8].VIP = netip.MustParseAddr("10.96.99.8"); v[8].Name = "kubernetes/svc-8" })
	check("moved away", false)
	edit(SourceFile, func(v []Service) { v[9].Backends = slices.Repeat(be(1), 4) })
	check("more slots", true)
	views = map[Source][]Service{SourceFile: views[SourceFile]}
	check("a source gone", false)
	edit(SourceFile, func(v []Service) { v[1].Backends = be(7) })
	got, _ := m.merge(views, limits)
	if &got[0] != &views[SourceFile][0] {
		t.Fatalf("one view, a backend changed: the result is a copy, want the view as it came")
	}
	check("one view", true)
	edit(SourceFile, func(v []Service) { v[2].Source = "" })
	check("one view, a source unset", true)
	views[SourceFile] = views[SourceFile][:30]
	check("shrunk", false)
	limits.Slots = 8 + 34 // the 30 services hold 33 slots
	check("new limits", false)
	edit(SourceFile, func(v []Service) { v[3].Backends = slices.Repeat(be(1), 2) })
	check("a change the slots hold", true)
	edit(SourceFile, func(v []Service) { v[4].Backends = slices.Repeat(be(1), 3) })
	check("a change over the slots", false)
}

// Equal compares every field: one it missed would let the merger keep a stale service.
func TestServiceEqualSeesEveryField(t *testing.T) {
	base := Service{Name: "a", Source: SourceFile, VIP: netip.MustParseAddr("10.96.0.1"), Port: 80, Protocol: ProtocolTCP,
		Backends: []Backend{{Weight: 1}}, Affinity: AffinityNone, Allow: []Selector{{Namespace: "x", Labels: map[string]string{"a": "b"}}},
		Endpoints: []Endpoint{{Ready: true}}}
	typ := reflect.TypeOf(base)
	for i := range typ.NumField() {
		other := base
		other.Allow = []Selector{{Namespace: "x", Labels: map[string]string{"a": "b"}}}
		f := reflect.ValueOf(&other).Elem().Field(i)
		switch f.Kind() {
		case reflect.String:
			f.SetString(f.String() + "x")
		case reflect.Bool:
			f.SetBool(!f.Bool())
		case reflect.Uint16, reflect.Uint32:
			f.SetUint(f.Uint() + 1)
		case reflect.Int64:
			f.SetInt(f.Int() + 1)
		case reflect.Slice:
			f.Set(reflect.MakeSlice(f.Type(), 2, 2))
		case reflect.Struct: // netip.Addr
			other.VIP = netip.MustParseAddr("10.96.0.2")
		default:
			t.Fatalf("field %s of kind %s: teach this test to change it", typ.Field(i).Name, f.Kind())
		}
		if base.Equal(&other) {
			t.Errorf("Equal misses a change of %s", typ.Field(i).Name)
		}
		if !base.Equal(&base) {
			t.Fatal("Equal says a service differs from itself")
		}
	}
	labels := base
	labels.Allow = []Selector{{Namespace: "x", Labels: map[string]string{"a": "c"}}}
	if base.Equal(&labels) {
		t.Error("Equal misses a change of an allow selector's labels")
	}
}

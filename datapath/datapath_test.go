package datapath

import (
	"net/netip"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf/btf"

	"github.com/podsock/podsock/config"
)

// The object's map sizes are the defaults of [limits], so a config that leaves them out
// loads without resizing anything.
func TestDefaultLimitsMatchTheObject(t *testing.T) {
	spec, err := loadSocklb()
	if err != nil {
		t.Fatal(err)
	}
	d := config.DefaultLimits()
	want := Limits{
		Services: d.Services, BackendsPerService: d.BackendsPerService, SlotsPerService: d.SlotsPerService,
		Slots: d.Slots, Pods: d.Pods, Containers: d.Containers, PodServices: d.PodServices, SocketCounts: d.SocketCounts,
	}
	if got := (Limits{}).resolve(spec); got != want {
		t.Errorf("the object's sizes give limits %+v, config.DefaultLimits %+v", got, want)
	}
	for _, lm := range limitMaps {
		for _, name := range lm.maps {
			if got, first := spec.Maps[name].MaxEntries, spec.Maps[lm.maps[0]].MaxEntries; got != first {
				t.Errorf("map %s holds %d entries, %s %d: one limit sizes both", name, got, lm.maps[0], first)
			}
		}
	}
}

// The generated Go types must lay out exactly like the C structs the programs use.
func TestGoStructsMatchBTF(t *testing.T) {
	spec, err := loadSocklb()
	if err != nil {
		t.Fatal(err)
	}
	iterSpec, err := loadSockiter()
	if err != nil {
		t.Fatal(err)
	}
	checkStructs(t, iterSpec.Types, map[string]any{
		"sock_record":     sockiterSockRecord{},
		"list_filter":     sockiterListFilter{},
		"svc_backend_key": sockiterSvcBackendKey{},
		"sock_state":      socklbSockState{},
	})
	checkStructs(t, spec.Types, map[string]any{
		"svc_key":      socklbSvcKey{},
		"svc_value":    socklbSvcValue{},
		"slot_key":     socklbSlotKey{},
		"backend":      socklbBackend{},
		"svc_name":     socklbSvcName{},
		"lb_entry":     socklbLbEntry{},
		"sock_state":   socklbSockState{},
		"pod_ref":      socklbPodRef{},
		"pod_meta":     socklbPodMeta{},
		"pod_svc_key":  socklbPodSvcKey{},
		"datapath_cfg": socklbDatapathCfg{},

		"aff_value":        socklbAffValue{},
		"svc_netns_key":    socklbSvcNetnsKey{},
		"svc_netns_counts": socklbSvcNetnsCounts{},
	})
}

func checkStructs(t *testing.T, types *btf.Spec, structs map[string]any) {
	t.Helper()
	for cName, goVal := range structs {
		var st *btf.Struct
		if err := types.TypeByName(cName, &st); err != nil {
			t.Fatalf("struct %s: %v", cName, err)
		}
		gt := reflect.TypeOf(goVal)
		if uintptr(st.Size) != gt.Size() {
			t.Errorf("struct %s: C size %d, Go size %d", cName, st.Size, gt.Size())
		}
		var goFields []reflect.StructField
		for i := range gt.NumField() {
			if f := gt.Field(i); f.Name != "_" {
				goFields = append(goFields, f)
			}
		}
		if len(goFields) != len(st.Members) {
			t.Fatalf("struct %s: %d C members, %d Go fields", cName, len(st.Members), len(goFields))
		}
		for i, m := range st.Members {
			if uintptr(m.Offset.Bytes()) != goFields[i].Offset {
				t.Errorf("struct %s: member %s at C offset %d, Go field %s at %d",
					cName, m.Name, m.Offset.Bytes(), goFields[i].Name, goFields[i].Offset)
			}
		}
	}
}

// Every counter of enum stat_index is one field of Stats, so a counter added in C without
// a place in Stats fails here.
func TestStatsHasEveryCounter(t *testing.T) {
	if n := reflect.TypeFor[Stats]().NumField(); n != int(socklbStatIndexSTAT_MAX) {
		t.Fatalf("Stats has %d fields, enum stat_index %d counters", n, socklbStatIndexSTAT_MAX)
	}
}

func TestAddressWordsRoundTrip(t *testing.T) {
	for _, s := range []string{"10.96.0.20", "fd00:96::20", "::1", "255.255.255.255"} {
		a := netip.MustParseAddr(s)
		if got := wordsAddr(addrWords(a)); got != a {
			t.Errorf("%s came back as %s", a, got)
		}
	}
	// IPv4 must be stored v4-mapped so AF_INET6 sockets connecting to ::ffff:VIP match.
	w := addrWords(netip.MustParseAddr("10.96.0.20"))
	mapped := addrWords(netip.MustParseAddr("::ffff:10.96.0.20"))
	if w != mapped {
		t.Errorf("IPv4 words %x differ from v4-mapped words %x", w, mapped)
	}
	if ntohs(htons(8080)) != 8080 {
		t.Error("port byte order does not round-trip")
	}
	b := backendValue(netip.MustParseAddrPort("[fd00::5]:53"))
	if got := backendAddrPort(b); got.String() != "[fd00::5]:53" {
		t.Errorf("backend came back as %s", got)
	}
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func TestExpandSlots(t *testing.T) {
	a, b, c := ap("10.0.0.1:80"), ap("10.0.0.2:80"), ap("10.0.0.3:80")
	count := func(slots []netip.AddrPort) map[netip.AddrPort]int {
		m := map[netip.AddrPort]int{}
		for _, s := range slots {
			m[s]++
		}
		return m
	}
	tests := []struct {
		name     string
		backends []Backend
		want     map[netip.AddrPort]int
	}{
		{"none", nil, map[netip.AddrPort]int{}},
		{"equal weights reduce to one slot each", []Backend{{a, 5}, {b, 5}}, map[netip.AddrPort]int{a: 1, b: 1}},
		{"zero weight counts as one", []Backend{{a, 0}, {b, 1}}, map[netip.AddrPort]int{a: 1, b: 1}},
		{"gcd reduction", []Backend{{a, 2}, {b, 6}, {c, 4}}, map[netip.AddrPort]int{a: 1, b: 3, c: 2}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := count(expandSlots(tt.backends, defaultSlotsPerService))
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("slots %v, want %v", got, tt.want)
			}
		})
	}

	t.Run("scaled to the cap, nobody dropped", func(t *testing.T) {
		backends := []Backend{{a, 1000}, {b, 999}, {c, 1}}
		for i := range 10 {
			backends = append(backends, Backend{netip.AddrPortFrom(netip.MustParseAddr("10.1.0.1"), uint16(1000+i)), 997})
		}
		slots := expandSlots(backends, defaultSlotsPerService)
		if len(slots) > defaultSlotsPerService {
			t.Fatalf("%d slots, cap is %d", len(slots), defaultSlotsPerService)
		}
		got := count(slots)
		if got[c] != 1 || len(got) != len(backends) {
			t.Fatalf("light backend got %d slots, %d of %d backends kept", got[c], len(got), len(backends))
		}
	})

	t.Run("many light backends never push the table past the cap", func(t *testing.T) {
		var backends []Backend
		for i := range 1024 {
			w := uint32(1)
			if i < 5 {
				w = 1000
			}
			backends = append(backends, Backend{netip.AddrPortFrom(netip.MustParseAddr("10.2.0.1"), uint16(1+i)), w})
		}
		slots := expandSlots(backends, defaultSlotsPerService)
		got := count(slots)
		if len(slots) > defaultSlotsPerService || len(got) != len(backends) {
			t.Fatalf("%d slots for %d of %d backends, cap %d", len(slots), len(got), len(backends), defaultSlotsPerService)
		}
		heavy, light := got[backends[0].Addr], got[backends[1023].Addr]
		if heavy < 100*light {
			t.Fatalf("weight 1000 got %d slots, weight 1 got %d: proportion lost", heavy, light)
		}
	})

	t.Run("deterministic and interleaved", func(t *testing.T) {
		in := []Backend{{a, 1}, {b, 3}}
		first := expandSlots(in, defaultSlotsPerService)
		if !slices.Equal(first, expandSlots(in, defaultSlotsPerService)) {
			t.Fatal("same input gave different tables")
		}
		if !slices.Equal(first, []netip.AddrPort{b, b, a, b}) && !slices.Equal(first, []netip.AddrPort{b, a, b, b}) {
			t.Fatalf("table %v is not interleaved", first)
		}
	})

	t.Run("weights recovered from slots", func(t *testing.T) {
		got := weightsFromSlots(expandSlots([]Backend{{c, 4}, {a, 2}, {b, 6}}, defaultSlotsPerService))
		want := []Backend{{a, 1}, {b, 3}, {c, 2}}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("recovered %v, want %v", got, want)
		}
	})
}

// Re-applying a config must not count its slots twice: only one service at a time has
// both its old and its new table in the map.
func TestCapacityCountsOneOverlapAtATime(t *testing.T) {
	const maxSlots = 1 << 20
	dp := &Datapath{services: map[socklbSvcKey]*installed{}, limits: Limits{Services: 1 << 20, Slots: maxSlots}}
	var order []plannedKey
	big := []Backend{{ap("10.0.0.1:80"), 1}, {ap("10.0.0.2:80"), defaultSlotsPerService - 1}}
	slots := expandSlots(big, defaultSlotsPerService)
	n := maxSlots/len(slots) - 1 // fills the map but for one table's worth
	for i := range n {
		vip := netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)})
		k := svcKey(vip, 80, ProtoTCP)
		order = append(order, plannedKey{key: k, w: &wanted{slots: slots}})
		dp.services[k] = &installed{slots: slots}
	}
	kept, err := dp.checkCapacity(order, func() {})
	if err != nil {
		t.Fatalf("re-applying %d installed slots: %v", n*len(slots), err)
	}
	if kept != n {
		t.Fatalf("%d of the %d planned services counted as installed, want all", kept, n)
	}
	// One more service of the same size no longer fits next to the overlap.
	extra := netip.MustParseAddr("10.97.0.1")
	order = append(order, plannedKey{key: svcKey(extra, 80, ProtoTCP), w: &wanted{slots: slots}})
	if _, err := dp.checkCapacity(order, func() {}); err == nil {
		t.Fatal("a config past the slot capacity was accepted")
	}
}

func TestRetainedSet(t *testing.T) {
	a, b, c := ap("10.0.0.1:80"), ap("10.0.0.2:80"), ap("10.0.0.3:80")
	// Still in the slots means still picked: not retained. Order and repeats do not make
	// two sets differ.
	if got := retainedSet([]netip.AddrPort{c, a, b, c}, []netip.AddrPort{a, a}); !slices.Equal(got, []netip.AddrPort{b, c}) {
		t.Fatalf("retained %v, want %v", got, []netip.AddrPort{b, c})
	}
	if got := retainedSet(nil, []netip.AddrPort{a}); got != nil {
		t.Fatalf("nothing retained gave %v", got)
	}
}

func TestServiceFlags(t *testing.T) {
	for _, c := range []struct {
		name    string
		svc     Service
		want    socklbSvcFlags
		timeout time.Duration
	}{
		{"none", Service{}, 0, 0},
		{"host only", Service{HostOnly: true}, socklbSvcFlagsSVC_F_HOST_ONLY, 0},
		{"client IP", Service{Policy: ServicePolicy{AffinityPod: true, AffinityHost: true, AffinityTimeout: time.Hour}},
			socklbSvcFlagsSVC_F_AFFINITY_POD | socklbSvcFlagsSVC_F_AFFINITY_HOST | socklbSvcFlagsSVC_F_AFFINITY_TIMEOUT, time.Hour},
		{"host affinity alone", Service{Policy: ServicePolicy{AffinityHost: true}}, socklbSvcFlagsSVC_F_AFFINITY_HOST, 0},
		// A timeout without affinity has nothing to time out: no flag, no entry.
		{"timeout alone", Service{Policy: ServicePolicy{AffinityTimeout: time.Hour}}, 0, 0},
		{"allow host needs restrict", Service{Policy: ServicePolicy{AllowHost: true}}, 0, 0},
	} {
		if got := c.svc.flags(); got != c.want {
			t.Errorf("%s: flags %#x, want %#x", c.name, got, c.want)
		}
		if got := c.svc.affinityTimeout(); got != c.timeout {
			t.Errorf("%s: timeout %v, want %v", c.name, got, c.timeout)
		}
	}
}

// A removal whose backend is back, in the slots or retained, ends nothing; one of a
// backend still gone, or of a service gone, stays.
func TestStillRemovedKeepsRetainedBackends(t *testing.T) {
	a, b, c := ap("10.0.0.1:80"), ap("10.0.0.2:80"), ap("10.0.0.3:80")
	vip, gone := ap("10.96.0.1:80"), ap("10.96.0.2:80")
	dp := &Datapath{services: map[socklbSvcKey]*installed{
		svcKey(vip.Addr(), vip.Port(), ProtoTCP): {slots: []netip.AddrPort{a}, retained: []netip.AddrPort{b}},
	}}
	removed := func(svc, backend netip.AddrPort) RemovedBackend {
		return RemovedBackend{VIP: svc, Proto: ProtoTCP, Backend: backend}
	}
	got := dp.stillRemoved([]RemovedBackend{removed(vip, a), removed(vip, b), removed(vip, c), removed(gone, a)})
	if want := []RemovedBackend{removed(vip, c), removed(gone, a)}; !slices.Equal(got, want) {
		t.Fatalf("still removed %v, want %v", got, want)
	}
}

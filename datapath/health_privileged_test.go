package datapath

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// On the real kernel: a fresh datapath's pins are its own; one whose pin is gone is
// reported with the pin's path. Map entries counted with batch lookups equal a walk key
// by key, for every hash map the datapath has, and the batch path is the one taken.
func TestPrivilegedPinsOwnedAndBatchedCounts(t *testing.T) {
	f := newFixture(t)
	dp := f.load()
	if err := dp.PinsOwned(); err != nil {
		t.Fatalf("fresh datapath: %v", err)
	}
	var svcs []Service
	for i := range 5000 {
		svcs = append(svcs, Service{Name: fmt.Sprintf("bulk/s%d", i), VIP: netip.AddrFrom4([4]byte{10, 100, byte(i >> 8), byte(i)}), Port: 80, Proto: ProtoTCP,
			Backends: []Backend{{Addr: netip.MustParseAddrPort("10.88.0.5:8080"), Weight: 1}}})
	}
	if _, err := dp.Apply(svcs); err != nil {
		t.Fatal(err)
	}
	for name, m := range mapsByName(&dp.objs.socklbMaps) {
		if !strings.Contains(m.Type().String(), "Hash") {
			continue
		}
		batched, err := countEntriesBatched(m)
		if err != nil {
			t.Fatalf("%s: batched count: %v", name, err)
		}
		n := 0
		var k, v []byte
		for it := m.Iterate(); it.Next(&k, &v); {
			n++
		}
		if batched != n {
			t.Errorf("%s: batched %d, walked %d", name, batched, n)
		}
		if name == "podsock_svc_v1" && n != 5000 {
			t.Errorf("%s: %d entries, want 5000", name, n)
		}
	}
	pin := filepath.Join(dp.PinDir(), "links", "sendmsg6")
	if err := os.Remove(pin); err != nil {
		t.Fatal(err)
	}
	if err := dp.PinsOwned(); err == nil || !strings.Contains(err.Error(), "sendmsg6: pin "+pin) {
		t.Fatalf("with a pin gone: %v", err)
	}
}

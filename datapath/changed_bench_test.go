package datapath

import (
	"fmt"
	"net/netip"
	"testing"
)

func BenchmarkChangedOnly100k(b *testing.B) {
	dp := &Datapath{services: map[socklbSvcKey]*installed{}, limits: Limits{SlotsPerService: 4096}, tally: &backendTally{}}
	svcs := make([]Service, 100000)
	for i := range svcs {
		vip := netip.AddrFrom4([4]byte{10, byte(100 + i>>16), byte(i >> 8), byte(i)})
		svcs[i] = Service{Name: fmt.Sprintf("bench/svc-%d", i), VIP: vip, Port: 80, Proto: ProtoTCP, Backends: []Backend{{Addr: beA, Weight: 1}}}
		dp.services[svcKey(vip, 80, ProtoTCP)] = &installed{name: svcs[i].Name, slots: []netip.AddrPort{beA}}
	}
	for b.Loop() {
		if _, _, ok := dp.changedOnly(svcs); !ok {
			b.Fatal("not ok")
		}
	}
}

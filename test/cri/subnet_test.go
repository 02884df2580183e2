package cri

import (
	"net/netip"
	"testing"
)

// TestSubnetsOfOneProcessNeverCoincide: runtimes started before any of them runs a pod
// (so before any bridge route exists) each get a /24 of their own, and give it back when
// they stop.
func TestSubnetsOfOneProcessNeverCoincide(t *testing.T) {
	vips := netip.MustParsePrefix(defaultVIPRange)
	seen := map[netip.Prefix]bool{}
	for range 20 {
		p, err := pickSubnet(Containerd, vips)
		if err != nil {
			t.Fatal(err)
		}
		if seen[p] {
			t.Fatalf("%s picked twice while claimed", p)
		}
		seen[p] = true
	}
	for p := range seen {
		releaseSubnet(p)
	}
	claimedSubnets.Lock()
	left := len(claimedSubnets.set)
	claimedSubnets.Unlock()
	if left != 0 {
		t.Fatalf("%d subnets still claimed after all were released", left)
	}
}

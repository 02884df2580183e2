// Package revnat measures the reverse NAT of unconnected UDP under socket churn: podsock's
// translations, kept in each socket's own storage, against a baseline that keeps them the
// way Cilium's socket LB does, in one LRU hash keyed by {socket cookie, backend} of a fixed
// size. The bench prints the comparison and a privileged test asserts it.
package revnat

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/podsock/podsock/test/testenv"
)

// LRU is the baseline attached to one cgroup.
type LRU struct {
	revnat *ebpf.Map
}

// LoadLRU attaches the baseline's sendmsg4 and recvmsg4 to cg with a reverse-NAT LRU of
// size entries, serving each VIP by its one backend; everything is detached and closed at
// cleanup. Its links are never pinned, so a crashed run leaves nothing behind either.
func LoadLRU(t testenv.TB, cg *testenv.Cgroup, size int, services map[netip.AddrPort]netip.AddrPort) *LRU {
	t.Helper()
	spec, err := loadLrubase()
	if err != nil {
		t.Fatalf("LRU baseline: load spec: %v", err)
	}
	spec.Maps["lrubase_revnat"].MaxEntries = uint32(size)
	var objs lrubaseObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		t.Fatalf("LRU baseline: load objects: %v", err)
	}
	t.Cleanup(func() { objs.Close() })
	for vip, be := range services {
		k, v := lruAddr(vip), lruAddr(be)
		if err := objs.LrubaseSvc.Put(&k, &v); err != nil {
			t.Fatalf("LRU baseline: service %s -> %s: %v", vip, be, err)
		}
	}
	for _, p := range []struct {
		prog   *ebpf.Program
		attach ebpf.AttachType
	}{
		{objs.LrubaseSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
		{objs.LrubaseRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg},
	} {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cg.Path, Attach: p.attach, Program: p.prog})
		if err != nil {
			t.Fatalf("LRU baseline: attach %v to %s: %v", p.attach, cg.Path, err)
		}
		t.Cleanup(func() { l.Close() })
	}
	return &LRU{revnat: objs.LrubaseRevnat}
}

// Entries counts the translations the LRU holds now.
func (l *LRU) Entries() (int, error) {
	var (
		k lrubaseLruRevnatKey
		v lrubaseLruAddr
		n int
	)
	it := l.revnat.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		return n, fmt.Errorf("walk the LRU: %w", err)
	}
	return n, nil
}

// lruAddr is ap as the sock_addr context holds it: address and port in network byte
// order, which on this little-endian target reads back as the bytes in wire order.
func lruAddr(ap netip.AddrPort) lrubaseLruAddr {
	a := ap.Addr().As4()
	var p [2]byte
	binary.BigEndian.PutUint16(p[:], ap.Port())
	return lrubaseLruAddr{Addr: binary.LittleEndian.Uint32(a[:]), Port: binary.LittleEndian.Uint16(p[:])}
}

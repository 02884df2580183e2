package datapath

import (
	"encoding/binary"
	"net/netip"
)

// The BPF side keeps every address as 16 bytes of IPv6 (IPv4 as ::ffff:a.b.c.d) in network
// byte order, read as four native-endian words. These helpers translate both ways.

func addrWords(a netip.Addr) [4]uint32 {
	b := a.As16()
	var w [4]uint32
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return w
}

func wordsAddr(w [4]uint32) netip.Addr {
	var b [16]byte
	for i := range w {
		binary.NativeEndian.PutUint32(b[4*i:], w[i])
	}
	return netip.AddrFrom16(b).Unmap()
}

func htons(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func ntohs(p uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], p)
	return binary.BigEndian.Uint16(b[:])
}

func backendValue(ap netip.AddrPort) socklbBackend {
	return socklbBackend{Addr: addrWords(ap.Addr()), Port: htons(ap.Port())}
}

func backendAddrPort(b socklbBackend) netip.AddrPort {
	return netip.AddrPortFrom(wordsAddr(b.Addr), ntohs(b.Port))
}

package datapath

import (
	"io"
	"net/netip"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// chunkyReader hands out its bytes in the sizes given, with EAGAIN between some reads, as
// an iterator may.
type chunkyReader struct {
	data   []byte
	sizes  []int
	eagain map[int]bool // before the n-th read
	reads  int
}

func (c *chunkyReader) Read(p []byte) (int, error) {
	c.reads++
	if c.eagain[c.reads] {
		delete(c.eagain, c.reads)
		c.reads--
		return 0, unix.EAGAIN
	}
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := len(c.data)
	if len(c.sizes) > 0 {
		n = min(n, c.sizes[0])
		c.sizes = c.sizes[1:]
	}
	n = min(n, len(p))
	copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

func recordBytes(r sockiterSockRecord) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(&r)), recordSize)
}

func TestReadRecordsAcrossSplitsAndEAGAIN(t *testing.T) {
	var data []byte
	const n = 1200 // more than one readChunk of records
	for i := range n {
		data = append(data, recordBytes(sockiterSockRecord{SockCookie: uint64(i + 1), Proto: ProtoTCP})...)
	}
	r := &chunkyReader{data: data, sizes: []int{7, recordSize - 7, 3 * recordSize, 1, readChunk}, eagain: map[int]bool{2: true, 5: true}}
	var got []uint64
	err := readRecords(r, func(rec *sockiterSockRecord) error {
		got = append(got, rec.SockCookie)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != n {
		t.Fatalf("read %d records, want %d", len(got), n)
	}
	for i, c := range got {
		if c != uint64(i+1) {
			t.Fatalf("record %d has cookie %d, want %d", i, c, i+1)
		}
	}
}

func TestReadRecordsRejectsATruncatedStream(t *testing.T) {
	data := recordBytes(sockiterSockRecord{SockCookie: 1})
	r := &chunkyReader{data: append(data, 1, 2, 3)}
	if err := readRecords(r, func(*sockiterSockRecord) error { return nil }); err == nil {
		t.Fatal("a stream ending inside a record was accepted")
	}
}

func TestSocketFromRecord(t *testing.T) {
	names := serviceNames{cache: map[uint32]string{7: "default/web"}}
	r := sockiterSockRecord{
		NetnsCookie: 4096, SockCookie: 99, Proto: ProtoTCP, State: 1, Family: unix.AF_INET,
		Local: addrWords(netip.MustParseAddr("10.88.0.9")), LocalPort: htons(40000),
		Remote: addrWords(netip.MustParseAddr("10.88.0.5")), RemotePort: htons(8080),
		Flags: sockiterRecFlagsREC_F_BALANCED | sockiterRecFlagsREC_F_LB_CONNECTED, LbCount: 1,
	}
	r.Lb.Vip = addrWords(netip.MustParseAddr("10.96.0.20"))
	r.Lb.VipPort = htons(80)
	r.Lb.Backend = addrWords(netip.MustParseAddr("10.88.0.5"))
	r.Lb.BackendPort = htons(8080)
	r.Lb.SvcId = 7
	s := names.socket(&r)
	if s.Local.String() != "10.88.0.9:40000" || s.Remote.String() != "10.88.0.5:8080" || s.Service != "default/web" ||
		s.VIP.String() != "10.96.0.20:80" || s.Backend.String() != "10.88.0.5:8080" || !s.LBConnected ||
		s.NetnsCookie != 4096 || s.Cookie != 99 || StateName(s.Proto, s.State) != "ESTAB" {
		t.Fatalf("socket %+v", s)
	}
	// An unconnected UDP socket has no remote, and no service unless balanced.
	u := names.socket(&sockiterSockRecord{Proto: ProtoUDP, State: 7, Remote: addrWords(netip.IPv4Unspecified())})
	if u.Remote.IsValid() || u.Balanced || u.Service != "" || StateName(u.Proto, u.State) != "UNCONN" {
		t.Fatalf("unconnected UDP socket %+v", u)
	}
}

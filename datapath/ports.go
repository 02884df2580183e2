package datapath

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// portWordsPerProto matches PORT_WORDS_PER_PROTO (bpf/socklb.h): TCP's words come first,
// then UDP's.
const portWordsPerProto = 1 << 16 / 64

// portSet is podsock_svcport_v1 as userspace computes it: which ports (in the byte order
// of socklbSvcKey.Port, as the programs read them) some service uses, per protocol.
type portSet [2 * portWordsPerProto]uint64

func (p *portSet) add(k socklbSvcKey) {
	w := int(k.Port >> 6)
	if k.Proto == ProtoUDP {
		w += portWordsPerProto
	}
	p[w] |= 1 << (k.Port & 63)
}

func portsOf[V any](services map[socklbSvcKey]V) *portSet {
	p := &portSet{}
	for k := range services {
		p.add(k)
	}
	return p
}

// writePorts makes the port filter hold want, writing only the words that differ from
// what it holds. A port must be in the filter before its service entry is written and may
// leave only once no entry uses it: the programs look no further for a port not in it.
func (dp *Datapath) writePorts(want *portSet) error {
	for i := range want {
		if want[i] == dp.ports[i] {
			continue
		}
		if err := dp.objs.PodsockSvcportV1.Update(uint32(i), want[i], ebpf.UpdateAny); err != nil {
			return fmt.Errorf("write service port filter: %w", err)
		}
		dp.ports[i] = want[i]
	}
	return nil
}

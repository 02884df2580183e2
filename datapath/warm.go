package datapath

import (
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// A cold start parses its config before it can load the datapath, which the config sizes.
// Reading the socket-LB object and decoding the kernel's BTF depend on no config, and take
// a 10k-service start about a tenth of its time: Warm does them on another CPU meanwhile.
var warm struct {
	mu      sync.Mutex
	pending *warmed
}

type warmed struct {
	done    chan struct{}
	spec    *ebpf.CollectionSpec
	specErr error
	kernel  *btf.Cache
}

// Warm starts reading what the next Load needs whatever its options. A process that
// loads once calls it first thing; one that never loads wastes the work, not the result.
func Warm() {
	warm.mu.Lock()
	defer warm.mu.Unlock()
	if warm.pending != nil {
		return
	}
	w := &warmed{done: make(chan struct{})}
	warm.pending = w
	go func() {
		defer close(w.done)
		w.spec, w.specErr = loadSocklb()
		w.kernel = btf.NewCache()
		// An error is the Load's to meet and report when it needs the types.
		_, _ = w.kernel.Kernel()
	}()
}

// takeWarm hands Warm's results to one Load, waiting for them, or reads the object now
// when nothing is warmed. The cache goes with the Load that takes it, so the kernel's
// types, tens of megabytes decoded, do not stay in memory.
func takeWarm() (*ebpf.CollectionSpec, *btf.Cache, error) {
	warm.mu.Lock()
	w := warm.pending
	warm.pending = nil
	warm.mu.Unlock()
	if w == nil {
		spec, err := loadSocklb()
		return spec, btf.NewCache(), err
	}
	<-w.done
	return w.spec, w.kernel, w.specErr
}

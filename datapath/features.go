package datapath

import (
	"fmt"
	"io"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"
	"github.com/sirupsen/logrus"

	"github.com/podsock/podsock/api"
)

// Feature is one kernel feature or optional program, present or not (Detail says why).
type Feature = api.Feature

// ProbeFeatures asks the kernel, without attaching anything, which of podsock's
// dependencies it provides.
func ProbeFeatures() []Feature {
	probe := func(name string, required bool, err error) Feature {
		f := Feature{Name: name, Present: err == nil, Required: required}
		if err != nil {
			f.Detail = err.Error()
		}
		return f
	}
	kernel, btfErr := btf.LoadKernelSpec()
	hasType := func(names ...string) error {
		if btfErr != nil {
			return btfErr
		}
		for _, n := range names {
			if _, err := kernel.AnyTypeByName(n); err != nil {
				return fmt.Errorf("%s: %w", n, err)
			}
		}
		return nil
	}
	return []Feature{
		probe("btf", true, btfErr),
		probe("cgroup_sock_addr", true, features.HaveProgramType(ebpf.CGroupSockAddr)),
		probe("sk_storage", true, features.HaveMapType(ebpf.SkStorage)),
		probe("set_retval", true, features.HaveProgramHelper(ebpf.CGroupSockAddr, asm.FnSetRetval)),
		probe("bounded_loops", true, features.HaveBoundedLoops()),
		probe("iter_tcp_udp", false, hasType("bpf_iter__tcp", "bpf_iter__udp")),
		probe("bpf_sock_destroy", false, hasType("bpf_sock_destroy")),
		// Tells in-kernel sockets (NFS, Ceph) apart, so they are never counted or destroyed.
		probe("bpf_rdonly_cast", false, hasType("bpf_rdonly_cast")),
	}
}

// ProbeIterators loads each socket iterator program, as Load would, against throw-away
// maps, and reports which ones the kernel accepts and why it refuses the others. Nothing
// is attached or pinned.
func ProbeIterators() []Feature {
	spec, err := loadSocklb()
	if err != nil {
		return allRefused(err)
	}
	var maps struct {
		Storage *ebpf.Map `ebpf:"podsock_sock_v1"`
		Counts  *ebpf.Map `ebpf:"podsock_svcnetns_v2"`
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	if err := spec.LoadAndAssign(&maps, nil); err != nil {
		return allRefused(fmt.Errorf("create probe maps: %w", err))
	}
	defer func() { _ = maps.Storage.Close(); _ = maps.Counts.Close() }()
	log := logrus.New()
	log.SetOutput(io.Discard)
	it, err := loadIterators(maps.Storage, maps.Counts, 0, btf.NewCache(), log)
	if err != nil {
		return allRefused(err)
	}
	defer func() { _ = it.Close() }()
	return it.features()
}

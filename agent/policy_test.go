package agent

import (
	"reflect"
	"testing"

	"github.com/podsock/podsock/config"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/runtimehooks"
)

func TestPodPolicyFromConfig(t *testing.T) {
	cfg, err := config.Parse("t.toml", []byte(`
[lb]
[[lb.skip]]
namespace = "istio-system"

[[service]]
name = "default/db"
vip = "10.96.0.30"
port = 5432
backends = ["10.88.0.9:5432"]
affinity = "pod"
allow_host = false
[[service.allow]]
labels = { role = "api" }

[[service]]
name = "default/web"
vip = "10.96.0.20"
port = 80
backends = ["10.88.0.5:8080"]
`))
	if err != nil {
		t.Fatal(err)
	}
	api := runtimehooks.Pod{
		SandboxID: "sb-api", UID: "0d6f3c2a-1111-4b2e-9a39-000000000001", Namespace: "default", Labels: map[string]string{"role": "api"},
		CgroupPath: "/kubepods/pod0d6f3c2a-1111-4b2e-9a39-000000000001", CgroupID: 11, NetnsCookie: 7,
		Containers: []runtimehooks.Container{{ID: "c1", CgroupID: 12}, {ID: "c2"}},
	}
	// A systemd slice writes the UID with '_' for '-'.
	mesh := runtimehooks.Pod{
		SandboxID: "sb-mesh", UID: "7a1e0000-2222-4b2e-9a39-000000000002", Namespace: "istio-system", CgroupID: 21, NetnsCookie: 8,
		CgroupPath: "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod7a1e0000_2222_4b2e_9a39_000000000002.slice",
	}
	// One pod alone under containerd's shared parent must not claim it either.
	lone := runtimehooks.Pod{SandboxID: "sb-lone", UID: "0d6f3c2a-3333-4b2e-9a39-000000000003", Namespace: "default", CgroupPath: "/k8s.io", CgroupID: 41, NetnsCookie: 11}
	annotated := runtimehooks.Pod{
		SandboxID: "sb-ann", Namespace: "default", Annotations: map[string]string{config.SkipLBAnnotation: "true"},
		HostNetwork: true, NetnsCookie: 99, CgroupPath: "/", CgroupID: 1,
	}
	// Two pods that report the same pod cgroup (no per-pod parent) must not claim it.
	twinA := runtimehooks.Pod{SandboxID: "sb-ta", Namespace: "default", CgroupPath: "/k8s.io", CgroupID: 31, NetnsCookie: 9}
	twinB := runtimehooks.Pod{SandboxID: "sb-tb", Namespace: "default", CgroupPath: "/k8s.io", CgroupID: 31, NetnsCookie: 10}

	got := datapathPods([]runtimehooks.Pod{api, mesh, annotated, twinA, twinB, lone}, newPodPolicy(cfg.LB, cfg.Services))
	want := []datapath.Pod{
		{SandboxID: "sb-api", ContainerCgroups: []uint64{12}, PodCgroup: 11, NetnsCookie: 7, AllowedServices: []string{"default/db"}},
		{SandboxID: "sb-mesh", PodCgroup: 21, NetnsCookie: 8, SkipLB: true},
		// A host-network pod has no netns of its own, and "/" is every process's cgroup.
		{SandboxID: "sb-ann", SkipLB: true},
		{SandboxID: "sb-ta", NetnsCookie: 9},
		{SandboxID: "sb-tb", NetnsCookie: 10},
		{SandboxID: "sb-lone", NetnsCookie: 11},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("datapath pods:\n got %+v\nwant %+v", got, want)
	}

	pol := servicePolicies(cfg.Services, []runtimehooks.Pod{mesh, api})
	wantPol := map[string]datapath.ServicePolicy{
		// default/web has the zero policy, which the map leaves out.
		"default/db": {AffinityPod: true, Restrict: true, AllowHost: false, AllowedPods: []string{"sb-api"}},
	}
	if !reflect.DeepEqual(pol, wantPol) {
		t.Fatalf("policies:\n got %+v\nwant %+v", pol, wantPol)
	}
}

package agent

import (
	"reflect"
	"sync/atomic"
	"testing"
	"time"

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
		SandboxID: "sb-api", Namespace: "default", Labels: map[string]string{"role": "api"},
		CgroupPath: "/kubepods/pod1", CgroupID: 11, NetnsCookie: 7,
		Containers: []runtimehooks.Container{{ID: "c1", CgroupID: 12}, {ID: "c2"}},
	}
	mesh := runtimehooks.Pod{SandboxID: "sb-mesh", Namespace: "istio-system", CgroupPath: "/kubepods/pod2", CgroupID: 21, NetnsCookie: 8}
	annotated := runtimehooks.Pod{
		SandboxID: "sb-ann", Namespace: "default", Annotations: map[string]string{config.SkipLBAnnotation: "true"},
		HostNetwork: true, NetnsCookie: 99, CgroupPath: "/", CgroupID: 1,
	}
	// Two pods that report the same pod cgroup (no per-pod parent) must not claim it.
	twinA := runtimehooks.Pod{SandboxID: "sb-ta", Namespace: "default", CgroupPath: "/k8s.io", CgroupID: 31, NetnsCookie: 9}
	twinB := runtimehooks.Pod{SandboxID: "sb-tb", Namespace: "default", CgroupPath: "/k8s.io", CgroupID: 31, NetnsCookie: 10}

	got := (&Agent{}).datapathPods([]runtimehooks.Pod{api, mesh, annotated, twinA, twinB}, cfg)
	want := []datapath.Pod{
		{SandboxID: "sb-api", ContainerCgroups: []uint64{12}, PodCgroup: 11, NetnsCookie: 7, AllowedServices: []string{"default/db"}},
		{SandboxID: "sb-mesh", PodCgroup: 21, NetnsCookie: 8, SkipLB: true},
		// A host-network pod has no netns of its own, and "/" is every process's cgroup.
		{SandboxID: "sb-ann", SkipLB: true},
		{SandboxID: "sb-ta", NetnsCookie: 9},
		{SandboxID: "sb-tb", NetnsCookie: 10},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("datapath pods:\n got %+v\nwant %+v", got, want)
	}

	pol := servicePolicies(cfg, []runtimehooks.Pod{mesh, api})
	wantPol := map[string]datapath.ServicePolicy{
		"default/db":  {AffinityPod: true, Restrict: true, AllowHost: false, AllowedPods: []string{"sb-api"}},
		"default/web": {},
	}
	if !reflect.DeepEqual(pol, wantPol) {
		t.Fatalf("policies:\n got %+v\nwant %+v", pol, wantPol)
	}
}

func TestPodQueueKeepsOrderAndBoundsWaiting(t *testing.T) {
	q := newPodQueue()
	go q.run()
	defer q.close()
	release := make(chan struct{})
	var order []int
	if q.do(20*time.Millisecond, func() { <-release; order = append(order, 1) }) {
		t.Fatal("a blocked op reported completion")
	}
	var ran atomic.Bool
	start := time.Now()
	if q.do(20*time.Millisecond, func() { order = append(order, 2); ran.Store(true) }) {
		t.Fatal("an op queued behind a blocked one reported completion")
	}
	if waited := time.Since(start); waited > time.Second {
		t.Fatalf("do waited %s, want about its 20ms budget", waited)
	}
	close(release)
	if !q.do(time.Second, func() { order = append(order, 3) }) {
		t.Fatal("op after the blocked ones did not complete")
	}
	if !ran.Load() || !reflect.DeepEqual(order, []int{1, 2, 3}) {
		t.Fatalf("ops ran in order %v, want [1 2 3]", order)
	}
}

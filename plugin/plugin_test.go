package plugin

import (
	"reflect"
	"testing"
	"time"

	"github.com/containerd/nri/pkg/api"

	"github.com/podsock/podsock/runtimehooks"
)

func TestSandboxFromNRI(t *testing.T) {
	pod := &api.PodSandbox{
		Id: "sb1", Uid: "u1", Namespace: "default", Name: "web",
		Labels: map[string]string{"app": "web"}, Annotations: map[string]string{"a": "b"},
		Ips: []string{"10.244.0.5"}, Pid: 42,
		Linux: &api.LinuxPodSandbox{
			CgroupParent: "kubepods-besteffort-podu1.slice",
			CgroupsPath:  "kubepods-besteffort-podu1.slice:cri-containerd:sb1",
			Namespaces: []*api.LinuxNamespace{
				{Type: "ipc", Path: "/proc/42/ns/ipc"},
				{Type: "network", Path: "/var/run/netns/cni-1"},
			},
		},
	}
	want := runtimehooks.Sandbox{
		ID: "sb1", UID: "u1", Namespace: "default", Name: "web",
		Labels: map[string]string{"app": "web"}, Annotations: map[string]string{"a": "b"},
		CgroupParent: "kubepods-besteffort-podu1.slice",
		CgroupsPath:  "kubepods-besteffort-podu1.slice:cri-containerd:sb1",
		NetnsPath:    "/var/run/netns/cni-1", IPs: []string{"10.244.0.5"}, Pid: 42,
	}
	if got := sandbox(pod); !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
	// A host-network pod has no network namespace entry.
	if got := sandbox(&api.PodSandbox{Id: "h", Linux: &api.LinuxPodSandbox{}}); got.NetnsPath != "" {
		t.Fatalf("host-network pod got netns %q", got.NetnsPath)
	}
}

func TestContainerFromNRI(t *testing.T) {
	c := &api.Container{
		Id: "c1", PodSandboxId: "sb1", Pid: 7,
		Labels: map[string]string{"io.kubernetes.container.name": "app"},
		Linux:  &api.LinuxContainer{CgroupsPath: "/kubepods/besteffort/podu1/crio-c1"},
	}
	want := runtimehooks.ContainerInfo{ID: "c1", SandboxID: "sb1", Name: "app", CgroupsPath: "/kubepods/besteffort/podu1/crio-c1", Pid: 7}
	if got := container(c); !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
}

func TestLatencyPercentiles(t *testing.T) {
	l := newLatencies()
	for i := 1; i <= 100; i++ {
		l.add("RunPodSandbox", time.Duration(i)*time.Microsecond)
	}
	l.add("Synchronize", time.Second)
	s := l.summary()
	got := s["RunPodSandbox"]
	if got.Count != 100 || got.P50 != 50*time.Microsecond || got.P99 != 99*time.Microsecond || got.Max != 100*time.Microsecond {
		t.Fatalf("RunPodSandbox summary %+v", got)
	}
	if all := s["all_pod_events"]; all.Count != 100 || all.Max != 100*time.Microsecond {
		t.Fatalf("all_pod_events must leave Synchronize out: %+v", all)
	}
	// The window keeps the most recent events only.
	for range latencyWindow {
		l.add("RunPodSandbox", time.Millisecond)
	}
	if got := l.summary()["RunPodSandbox"]; got.P50 != time.Millisecond || got.Count != 100+latencyWindow {
		t.Fatalf("after a full window: %+v", got)
	}
}

func TestPreRegisteredFromEnvironment(t *testing.T) {
	orig := stubEnv
	defer func() { stubEnv = orig }()
	stubEnv = func(k string) string {
		if k == api.PluginSocketEnvVar {
			return "3"
		}
		return ""
	}
	if !PreRegistered() {
		t.Fatal("NRI_PLUGIN_SOCKET set, but not pre-registered")
	}
	stubEnv = func(string) string { return "" }
	if PreRegistered() {
		t.Fatal("pre-registered without NRI_PLUGIN_SOCKET")
	}
}

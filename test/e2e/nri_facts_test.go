package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/nri/pkg/stub"

	"github.com/podsock/podsock/internal/cgroupfs"
	"github.com/podsock/podsock/runtimehooks"
	"github.com/podsock/podsock/test/cri"
	"github.com/podsock/podsock/test/testenv"
)

// nriRecorder is a bare NRI plugin that writes down what the runtime reports at each
// event, as the runtime sent it, and whether the container's cgroup existed by then.
type nriRecorder struct {
	cgroup2 string
	synced  chan struct{}

	mu      sync.Mutex
	runtime string
	pods    map[string]*api.PodSandbox // at RunPodSandbox, by sandbox ID
	ctrs    map[string]ctrFact         // by "<event> <container ID>"
	removed map[string]bool            // sandbox IDs of RemovePodSandbox events
	// syncPods are the pods Synchronize handed over, by sandbox ID.
	syncPods map[string]*api.PodSandbox
}

// ctrFact is one container event as the plugin saw it.
type ctrFact struct {
	pid          uint32
	state        api.ContainerState
	name         string
	cgroupsPath  string
	cgroupExists bool
}

var (
	_ = stub.ConfigureInterface(&nriRecorder{})
	_ = stub.SynchronizeInterface(&nriRecorder{})
	_ = stub.RunPodInterface(&nriRecorder{})
	_ = stub.CreateContainerInterface(&nriRecorder{})
	_ = stub.PostCreateContainerInterface(&nriRecorder{})
	_ = stub.StartContainerInterface(&nriRecorder{})
	_ = stub.PostStartContainerInterface(&nriRecorder{})
	_ = stub.RemovePodInterface(&nriRecorder{})
)

func (r *nriRecorder) Configure(_ context.Context, _, runtime, _ string) (stub.EventMask, error) {
	r.mu.Lock()
	r.runtime = runtime
	r.mu.Unlock()
	return api.ParseEventMask("RunPodSandbox", "RemovePodSandbox", "CreateContainer", "PostCreateContainer", "StartContainer", "PostStartContainer")
}

func (r *nriRecorder) RemovePodSandbox(_ context.Context, pod *api.PodSandbox) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.removed[pod.GetId()] = true
	return nil
}

// startRecorder registers a fresh recorder with the runtime and waits for its Synchronize.
func startRecorder(t *testing.T, rt *cri.Runtime, cgroup2 string) *nriRecorder {
	t.Helper()
	rec := &nriRecorder{cgroup2: cgroup2, synced: make(chan struct{}),
		pods: map[string]*api.PodSandbox{}, ctrs: map[string]ctrFact{}, removed: map[string]bool{}}
	s, err := stub.New(rec, stub.WithSocketPath(rt.NRISocket()), stub.WithPluginName("recorder"), stub.WithPluginIdx("50"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := s.Start(ctx); err != nil {
		t.Fatalf("register the recorder with %s: %v", rt.Kind(), err)
	}
	t.Cleanup(s.Stop)
	select {
	case <-rec.synced:
	case <-ctx.Done():
		t.Fatalf("%s never synchronized the recorder", rt.Kind())
	}
	return rec
}

func (r *nriRecorder) Synchronize(_ context.Context, pods []*api.PodSandbox, _ []*api.Container) ([]*api.ContainerUpdate, error) {
	r.mu.Lock()
	r.syncPods = map[string]*api.PodSandbox{}
	for _, p := range pods {
		r.syncPods[p.GetId()] = p
	}
	r.mu.Unlock()
	close(r.synced)
	return nil, nil
}

func (r *nriRecorder) RunPodSandbox(_ context.Context, pod *api.PodSandbox) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pods[pod.GetId()] = pod
	return nil
}

func (r *nriRecorder) record(event string, c *api.Container) {
	f := ctrFact{pid: c.GetPid(), state: c.GetState(), name: c.GetName(), cgroupsPath: c.GetLinux().GetCgroupsPath()}
	if p, err := runtimehooks.CanonicalCgroupPath(f.cgroupsPath); err == nil {
		_, err := os.Stat(filepath.Join(r.cgroup2, p))
		f.cgroupExists = err == nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ctrs[event+" "+c.GetId()] = f
}

func (r *nriRecorder) CreateContainer(_ context.Context, _ *api.PodSandbox, c *api.Container) (*api.ContainerAdjustment, []*api.ContainerUpdate, error) {
	r.record("CreateContainer", c)
	return nil, nil, nil
}

func (r *nriRecorder) PostCreateContainer(_ context.Context, _ *api.PodSandbox, c *api.Container) error {
	r.record("PostCreateContainer", c)
	return nil
}

func (r *nriRecorder) StartContainer(_ context.Context, _ *api.PodSandbox, c *api.Container) error {
	r.record("StartContainer", c)
	return nil
}

func (r *nriRecorder) PostStartContainer(_ context.Context, _ *api.PodSandbox, c *api.Container) error {
	r.record("PostStartContainer", c)
	return nil
}

// TestPrivilegedNRIWhatRuntimesReport pins down, per runtime, the NRI facts podsock builds
// pod identity from, so that a runtime upgrade that changes one shows here first: the pod
// cgroup parent and netns path (the same under both), the container cgroup path (its leaf
// differs), the sandbox PID and the container PID and state at each event (CRI-O reports
// no PID, and the state CREATED even at StartContainer), and when the container cgroup
// exists; and whether a runtime restarted since a pod started still tells its plugins
// when that pod is removed (CRI-O does, containerd does not).
func TestPrivilegedNRIWhatRuntimesReport(t *testing.T) {
	eachRuntime(t, testNRIWhatRuntimesReport)
}

func testNRIWhatRuntimesReport(t *testing.T, kind cri.Kind) {
	testenv.RequirePrivileged(t)
	cri.Require(t, kind)
	cgroup2, err := cgroupfs.Mount()
	if err != nil {
		t.Fatal(err)
	}
	rt := cri.Start(t, cri.Options{Runtime: kind})
	rec := startRecorder(t, rt, cgroup2)

	p := rt.RunPod(t, cri.PodSpec{Name: "facts"})
	c := rt.StartContainer(t, p, "server", "serve", "tcp", "8080", "x")
	rt.WaitLog(t, c, "listening", 5*time.Second)
	checkFacts(t, kind, rec, p, c)

	// A pod removed after a runtime restart. A pod started after the restart is reported
	// removed under both. One started before it: CRI-O restores its pods from disk and
	// reports it; containerd keeps in memory which pods its plugins know and does not,
	// which is why podsock watches the netns of the pods it learns from Synchronize.
	rt.Restart(t)
	after := startRecorder(t, rt, cgroup2)
	after.mu.Lock()
	synced := after.syncPods[p.ID]
	after.mu.Unlock()
	t.Logf("%s: RunPodSandbox ips %v; Synchronize after a restart ips %v", kind, rec.pods[p.ID].GetIps(), synced.GetIps())
	again := startRecorder(t, rt, cgroup2)
	t.Logf("%s: Synchronize of a second plugin ips %v", kind, again.syncPods[p.ID].GetIps())
	fresh := rt.RunPod(t, cri.PodSpec{Name: "after-restart"})
	rt.RemovePod(t, p)
	rt.RemovePod(t, fresh)
	if !testenv.WaitFor(2*time.Second, func() bool {
		after.mu.Lock()
		defer after.mu.Unlock()
		return after.removed[fresh.ID]
	}) {
		t.Fatalf("%s sent no RemovePodSandbox for a pod started after its restart", kind)
	}
	// The runtime removes p before fresh and sends its events in order: whatever it sends
	// for p has arrived by now.
	after.mu.Lock()
	defer after.mu.Unlock()
	if want := kind == cri.CRIO; after.removed[p.ID] != want {
		t.Errorf("%s: RemovePodSandbox for a pod started before the restart: got %v, want %v", kind, after.removed[p.ID], want)
	}
}

// checkFacts compares what rec saw for pod p and its container c with what kind reports.
func checkFacts(t *testing.T, kind cri.Kind, rec *nriRecorder, p *cri.Pod, c *cri.Container) {
	t.Helper()
	rec.mu.Lock()
	defer rec.mu.Unlock()
	t.Logf("%s calls itself %q in Configure", kind, rec.runtime)
	pod := rec.pods[p.ID]
	if pod == nil {
		t.Fatalf("no RunPodSandbox for %s", p.ID)
	}
	var netnsPath string
	for _, ns := range pod.GetLinux().GetNamespaces() {
		if ns.GetType() == "network" {
			netnsPath = ns.GetPath()
		}
	}
	// The same under both: the pod cgroup parent as the pod spec gave it, and the netns
	// path the pod's processes are in (containerd's under its state dir, CRI-O's pinned by
	// pinns under namespaces_dir).
	if pod.GetLinux().GetCgroupParent() != p.CgroupParent || netnsPath != p.NetnsPath {
		t.Errorf("RunPodSandbox: cgroup parent %q netns %q, want %q and %q", pod.GetLinux().GetCgroupParent(), netnsPath, p.CgroupParent, p.NetnsPath)
	}
	// containerd runs a pause container and reports its PID; CRI-O runs none here (no
	// shared PID namespace) and reports 0, so podsock must never need a sandbox PID.
	wantPodPid := uint32(p.SandboxPid)
	if kind == cri.CRIO {
		wantPodPid = 0
	}
	if pod.GetPid() != wantPodPid || kind == cri.Containerd && wantPodPid == 0 {
		t.Errorf("RunPodSandbox: pid %d, want %d (the sandbox's, %s)", pod.GetPid(), wantPodPid, kind)
	}

	wantPath := p.CgroupParent + "/" + containerCgroupLeaf(kind, c.ID)
	type want struct {
		pid          bool // a non-zero PID, the container's
		state        api.ContainerState
		cgroupExists bool
	}
	// What each event carries. containerd creates the runc container only at start: the
	// cgroup and the PID exist from StartContainer on, and the state is RUNNING from
	// PostStartContainer. CRI-O creates it at create: the cgroup exists from
	// PostCreateContainer on, but no event carries a PID and the state stays CREATED
	// through StartContainer and PostStartContainer. So podsock reads a container's cgroup
	// ID at PostCreateContainer and again at StartContainer, and uses no PID or state.
	wants := map[cri.Kind]map[string]want{
		cri.Containerd: {
			"CreateContainer":     {false, api.ContainerState_CONTAINER_UNKNOWN, false},
			"PostCreateContainer": {false, api.ContainerState_CONTAINER_CREATED, false},
			"StartContainer":      {true, api.ContainerState_CONTAINER_CREATED, true},
			"PostStartContainer":  {true, api.ContainerState_CONTAINER_RUNNING, true},
		},
		cri.CRIO: {
			"CreateContainer":     {false, api.ContainerState_CONTAINER_UNKNOWN, false},
			"PostCreateContainer": {false, api.ContainerState_CONTAINER_CREATED, true},
			"StartContainer":      {false, api.ContainerState_CONTAINER_CREATED, true},
			"PostStartContainer":  {false, api.ContainerState_CONTAINER_CREATED, true},
		},
	}
	var errs []error
	for _, ev := range []string{"CreateContainer", "PostCreateContainer", "StartContainer", "PostStartContainer"} {
		got, ok := rec.ctrs[ev+" "+c.ID]
		if !ok {
			errs = append(errs, fmt.Errorf("no %s for %s", ev, c.ID))
			continue
		}
		t.Logf("%s %s: pid %d state %s name %q cgroupsPath %q cgroup exists %v", kind, ev, got.pid, got.state, got.name, got.cgroupsPath, got.cgroupExists)
		w := wants[kind][ev]
		wantPid := uint32(0)
		if w.pid {
			wantPid = uint32(c.Pid)
		}
		if got.cgroupsPath != wantPath || got.name != "server" || got.pid != wantPid || got.state != w.state || got.cgroupExists != w.cgroupExists {
			errs = append(errs, fmt.Errorf("%s: pid %d state %s name %q cgroupsPath %q cgroup exists %v; want pid %d state %s name \"server\" cgroupsPath %q cgroup exists %v",
				ev, got.pid, got.state, got.name, got.cgroupsPath, got.cgroupExists, wantPid, w.state, wantPath, w.cgroupExists))
		}
	}
	if err := errors.Join(errs...); err != nil {
		t.Errorf("%s:\n%v", kind, err)
	}
}

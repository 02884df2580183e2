package agent

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/internal/cgroupfs"
	"github.com/podsock/podsock/internal/netns"
	"github.com/podsock/podsock/runtimehooks"
	"github.com/podsock/podsock/test/testenv"
)

// nriFuzzWorld is what every sequence of FuzzNRIEvents runs against: a real datapath on a
// cgroup of the test's, three netns and, per sandbox, a pod cgroup with two container
// cgroups.
type nriFuzzWorld struct {
	dp      *datapath.Datapath
	host    *netns.Handle
	cgroup2 string
	netns   []*testenv.Netns
	podCg   []string // cgroup v2 paths, as the runtime reports them
}

// Sandbox IDs long enough for a pod cgroup to be claimed by name; the last is empty.
var fuzzSandboxes = []string{"sandbox-0", "sandbox-1", "sandbox-2", ""}

func newNRIFuzzWorld(f *testing.F) *nriFuzzWorld {
	testenv.RequirePrivileged(f)
	cgroup2, err := cgroupfs.Mount()
	if err != nil {
		f.Fatal(err)
	}
	w := &nriFuzzWorld{cgroup2: cgroup2}
	cg := testenv.NewCgroup(f)
	bpffs := testenv.BPFFS(f)
	for i, id := range fuzzSandboxes[:3] {
		w.netns = append(w.netns, testenv.NewNetns(f, []string{"10.96.0.0/12"}))
		pod := cg.NewChild(f, "pod-"+id)
		for j := range 2 {
			pod.NewChild(f, fmt.Sprintf("ctr-%d-%d", i, j))
		}
		w.podCg = append(w.podCg, "/"+strings.TrimPrefix(strings.TrimPrefix(pod.Path, cgroup2), "/"))
	}
	w.dp = loadDatapath(f, cg, bpffs)
	if w.host, err = netns.Open(hostNetnsPath); err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = w.host.Close() })
	return w
}

// fuzzPod is the model: what the pod maps must hold for one live sandbox.
type fuzzPod struct {
	spec       runtimehooks.Sandbox
	realNetns  bool
	realCgroup bool
	ctrs       map[string]runtimehooks.ContainerInfo
	realCtr    map[string]bool
}

func (w *nriFuzzWorld) sandbox(s int, v byte) (runtimehooks.Sandbox, bool, bool) {
	id := fuzzSandboxes[s]
	sb := runtimehooks.Sandbox{ID: id, UID: fmt.Sprintf("uid-%d-%d", s, v), Namespace: "fuzz", Name: fmt.Sprintf("pod-%d", s)}
	realNetns, realCg := false, false
	switch v % 4 {
	case 0:
		if s < len(w.netns) {
			sb.NetnsPath, realNetns = w.netns[s].Path, true
		}
	case 1:
		sb.NetnsPath = "/etc/hostname" // a file, not a netns
	case 2: // host network
	case 3:
		sb.NetnsPath = "/nonexistent/netns"
	}
	switch (v >> 2) % 4 {
	case 0:
		if s < len(w.podCg) {
			sb.CgroupParent, realCg = w.podCg[s], true
		}
	case 1:
		sb.CgroupParent = "/" // every process's cgroup: never the pod's
	case 2:
		sb.CgroupParent = "/kubepods/burstable" // a shared parent that does not exist here
	case 3:
		sb.CgroupParent = "/" + strings.Repeat("deep/", 400) + id
	}
	if v&16 != 0 {
		sb.Labels = map[string]string{strings.Repeat("k", 300): "\x00"}
	}
	return sb, realNetns, realCg
}

func (w *nriFuzzWorld) container(s int, v byte) (runtimehooks.ContainerInfo, bool) {
	j := int(v % 2)
	c := runtimehooks.ContainerInfo{ID: fmt.Sprintf("ctr-%d-%d", s, j), SandboxID: fuzzSandboxes[s], Name: "c"}
	switch (v >> 1) % 4 {
	case 0:
		if s < len(w.podCg) {
			c.CgroupsPath = fmt.Sprintf("%s/ctr-%d-%d", w.podCg[s], s, j)
			return c, true
		}
	case 1:
		c.CgroupsPath = "/" // the cgroup root: must never stand for one pod
	case 2:
		c.CgroupsPath = "kubepods.slice:cri-containerd:\x00/../.."
	case 3: // none
	}
	return c, false
}

// FuzzNRIEvents feeds the agent's NRI handlers random event sequences with malformed
// fields (empty and duplicate IDs, removals before creation, absurd cgroup paths, a netns
// path that is a plain file) against the real datapath. Nothing may panic, and after
// every sequence the pod maps hold exactly what a simple model of the live pods says.
func FuzzNRIEvents(f *testing.F) {
	w := newNRIFuzzWorld(f)
	f.Add([]byte{0, 0, 0, 3, 0, 0, 4, 0, 0})
	f.Add([]byte{1, 1, 0, 0, 1, 5, 3, 1, 2, 0, 1, 0, 2, 1, 0, 1, 1, 0})
	f.Add([]byte{0, 3, 0, 3, 2, 0, 5, 0, 0, 6, 0, 255})
	f.Add([]byte{0, 0, 0, 0, 1, 0, 0, 2, 0, 4, 0, 0, 4, 1, 0, 4, 2, 2, 6, 0, 5, 0, 0, 1, 1, 0})
	f.Fuzz(func(t *testing.T, ops []byte) {
		if len(ops) > 300 {
			ops = ops[:300]
		}
		a := testAgent(t, w.dp, w.cgroup2, w.host, nil)

		live := map[string]*fuzzPod{}
		for i := 0; i+2 < len(ops); i += 3 {
			kind, s, v := ops[i]%7, int(ops[i+1])%len(fuzzSandboxes), ops[i+2]
			id := fuzzSandboxes[s]
			switch kind {
			case 0:
				sb, realNetns, realCg := w.sandbox(s, v)
				a.RunPodSandbox(sb)
				if id != "" {
					p := live[id]
					if p == nil {
						p = &fuzzPod{ctrs: map[string]runtimehooks.ContainerInfo{}, realCtr: map[string]bool{}}
						live[id] = p
					}
					p.spec, p.realNetns, p.realCgroup = sb, realNetns, realCg
				}
			case 1:
				a.RemovePodSandbox(id)
				delete(live, id)
			case 2:
				a.StopPodSandbox(id)
			case 3, 4:
				c, real := w.container(s, v)
				if kind == 3 {
					a.ContainerCreated(c)
				} else {
					a.ContainerStarted(c)
				}
				if p := live[id]; p != nil {
					p.ctrs[c.ID], p.realCtr[c.ID] = c, real
				}
			case 5:
				c, _ := w.container(s, v)
				a.RemoveContainer(c)
				if p := live[id]; p != nil {
					delete(p.ctrs, c.ID)
					delete(p.realCtr, c.ID)
				}
			case 6:
				// The runtime's view: the live pods v selects, with their containers.
				var sbs []runtimehooks.Sandbox
				var ctrs []runtimehooks.ContainerInfo
				for j, sid := range fuzzSandboxes {
					p := live[sid]
					if p == nil {
						continue
					}
					if v&(1<<j) == 0 {
						delete(live, sid)
						continue
					}
					sbs = append(sbs, p.spec)
					for _, c := range p.ctrs {
						ctrs = append(ctrs, c)
					}
				}
				a.Synchronize(sbs, ctrs)
			}
		}
		w.check(t, a, live, "after the sequence")
		a.Synchronize(nil, nil)
		w.check(t, a, nil, "after a resync to no pods")
	})
}

// check drains the agent's event queue and compares the pod maps with the model.
func (w *nriFuzzWorld) check(t *testing.T, a *Agent, live map[string]*fuzzPod, when string) {
	t.Helper()
	if !a.podq.do(10*time.Second, func() {}) {
		t.Fatalf("%s: the event queue did not drain", when)
	}
	want := map[string]int{"pods": len(live), "netns": 0, "pod_cgroups": 0, "container_cgroups": 0, "allow": 0, "affinity": 0}
	for _, p := range live {
		if p.realNetns {
			want["netns"]++
		}
		if p.realCgroup {
			want["pod_cgroups"]++
		}
		for _, real := range p.realCtr {
			if real {
				want["container_cgroups"]++
			}
		}
	}
	got, err := w.dp.PodMapEntries()
	if err != nil {
		t.Fatal(err)
	}
	for k, n := range want {
		if got[k] != n {
			t.Fatalf("%s: pod maps %v, want %v (model: %s)", when, got, want, describe(live))
		}
	}
}

func describe(live map[string]*fuzzPod) string {
	var b strings.Builder
	for id, p := range live {
		fmt.Fprintf(&b, "%s{netns %v, cgroup %v, containers %v} ", id, p.realNetns, p.realCgroup, p.realCtr)
	}
	return b.String()
}

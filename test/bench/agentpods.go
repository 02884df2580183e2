package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	nriapi "github.com/containerd/nri/pkg/api"

	"github.com/podsock/podsock/internal/cgroupfs"
	"github.com/podsock/podsock/test/testenv"
)

// benchPods are pods for the agent bench: each a real netns and a pod cgroup with one
// container cgroup below the agent's cgroup root, which a runtime reports over NRI. The
// runtime is NRI's own runtime side (the adaptation containerd and CRI-O embed), in this
// process: the agent resolves every pod's cgroup IDs and netns cookie from the kernel as
// it does under containerd, without 1k runc containers on this VM.
type benchPods struct {
	root    *testenv.Cgroup
	sandbox []*nriapi.PodSandbox
	ctrs    []*nriapi.Container
}

// newBenchPods makes n pods below a cgroup of their own, which is also the agent's
// cgroup_root: the netns, cgroups and their removal at cleanup.
func newBenchPods(e *env, n int) *benchPods {
	mnt, err := cgroupfs.Mount()
	if err != nil {
		e.Fatal(err)
	}
	p := &benchPods{root: testenv.NewCgroup(e)}
	rel := strings.TrimPrefix(p.root.Path, mnt)
	for i := range n {
		ns := testenv.NewNetns(e, []string{vipRange})
		pod := p.root.NewChild(e, fmt.Sprintf("pod-%d", i))
		pod.NewChild(e, "ctr")
		id := fmt.Sprintf("bench-sandbox-%d", i)
		p.sandbox = append(p.sandbox, &nriapi.PodSandbox{
			Id: id, Name: fmt.Sprintf("client-%d", i), Namespace: "bench", Uid: fmt.Sprintf("uid-%d", i),
			Labels: map[string]string{"app": "client"},
			Linux: &nriapi.LinuxPodSandbox{
				CgroupParent: filepath.Join(rel, fmt.Sprintf("pod-%d", i)),
				Namespaces:   []*nriapi.LinuxNamespace{{Type: "network", Path: ns.Path}},
			},
		})
		p.ctrs = append(p.ctrs, &nriapi.Container{
			Id: fmt.Sprintf("bench-ctr-%d", i), PodSandboxId: id, Name: "app", State: nriapi.ContainerState_CONTAINER_RUNNING,
			Linux: &nriapi.LinuxContainer{CgroupsPath: filepath.Join(rel, fmt.Sprintf("pod-%d", i), "ctr")},
		})
	}
	return p
}

// runtime serves the pods over NRI on socket until stop: every plugin that registers is
// synchronized with all of them.
func (p *benchPods) runtime(e *env, socket string) (stop func()) {
	r := testenv.StartNRIRuntime(e, socket, func() ([]*nriapi.PodSandbox, []*nriapi.Container) { return p.sandbox, p.ctrs })
	return func() {
		r.Stop()
		os.Remove(socket)
	}
}

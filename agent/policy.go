package agent

import (
	"path"
	"slices"
	"strings"

	"github.com/podsock/podsock/config"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/runtimehooks"
	"github.com/podsock/podsock/service"
)

// podPolicy is what pod policy needs of a config, worked out once per applied config: a
// pod event then looks at the services with an allow-list only, not at every service.
type podPolicy struct {
	lb         config.LB
	restricted []service.Service
}

func newPodPolicy(lb config.LB, services []service.Service) *podPolicy {
	pol := &podPolicy{lb: lb}
	for _, s := range services {
		if s.RestrictsClients() {
			pol.restricted = append(pol.restricted, s)
		}
	}
	return pol
}

// currentPolicy is the pod policy of the config last pushed to the datapath.
func (a *Agent) currentPolicy() *podPolicy {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.policy == nil {
		return newPodPolicy(config.Default().LB, nil)
	}
	return a.policy
}

func datapathPods(pods []runtimehooks.Pod, pol *podPolicy) []datapath.Pod {
	shared := sharedPodCgroups(pods)
	out := make([]datapath.Pod, 0, len(pods))
	for _, p := range pods {
		out = append(out, datapathPod(p, pol, shared))
	}
	return out
}

// sharedPodCgroups finds pod cgroups that more than one pod reports (a runtime without a
// per-pod cgroup parent): such a cgroup says nothing about which pod a process is in.
func sharedPodCgroups(pods []runtimehooks.Pod) map[uint64]bool {
	seen := map[uint64]int{}
	for _, p := range pods {
		if p.CgroupID != 0 {
			seen[p.CgroupID]++
		}
	}
	shared := map[uint64]bool{}
	for id, n := range seen {
		if n > 1 {
			shared[id] = true
		}
	}
	return shared
}

// datapathPod is what the datapath needs of a pod under pol.
func datapathPod(p runtimehooks.Pod, pol *podPolicy, shared map[uint64]bool) datapath.Pod {
	d := datapath.Pod{
		SandboxID:   p.SandboxID,
		NetnsCookie: p.NetnsCookie,
		SkipLB:      pol.lb.SkipsLB(p.Namespace, p.Labels, p.Annotations),
	}
	if p.CgroupID != 0 && !shared[p.CgroupID] && ownsCgroup(p) {
		d.PodCgroup = p.CgroupID
	}
	if p.HostNetwork {
		d.NetnsCookie = 0
	}
	for _, c := range p.Containers {
		// A container "in" the cgroup root is a runtime's mistake; claiming the root would
		// make every process on the node look like this pod.
		if c.CgroupID != 0 && c.CgroupPath != "/" {
			d.ContainerCgroups = append(d.ContainerCgroups, c.CgroupID)
		}
	}
	for _, s := range pol.restricted {
		if s.AllowsPod(p.Namespace, p.Labels) {
			d.AllowedServices = append(d.AllowedServices, s.Name)
		}
	}
	return d
}

// ownsCgroup reports whether the pod cgroup's path names the pod (its UID, as kubelet and
// CRI-O write it, with '_' for '-' in systemd slices, or its sandbox ID). A runtime that
// has no per-pod cgroup reports a shared parent (containerd's "/k8s.io", "/system.slice"),
// and claiming that would make every host process under it look like this pod.
func ownsCgroup(p runtimehooks.Pod) bool {
	last := path.Base(p.CgroupPath)
	if p.CgroupPath == "" || last == "/" {
		return false
	}
	for _, id := range []string{p.UID, strings.ReplaceAll(p.UID, "-", "_"), p.SandboxID} {
		if len(id) >= 8 && strings.Contains(last, id) {
			return true
		}
	}
	return false
}

// servicePolicies computes each service's datapath policy against the pods known now.
func servicePolicies(services []service.Service, pods []runtimehooks.Pod) map[string]datapath.ServicePolicy {
	out := map[string]datapath.ServicePolicy{}
	for _, s := range services {
		p := datapath.ServicePolicy{AffinityPod: s.Affinity.Sticky()}
		if s.Affinity == service.AffinityClient {
			p.AffinityHost, p.AffinityTimeout = true, s.AffinityTimeout
		}
		if s.RestrictsClients() {
			p.Restrict = true
			p.AllowHost = s.AllowsHost()
			for _, pod := range pods {
				if s.AllowsPod(pod.Namespace, pod.Labels) {
					p.AllowedPods = append(p.AllowedPods, pod.SandboxID)
				}
			}
			slices.Sort(p.AllowedPods)
		}
		// A service without affinity or an allow-list has the zero policy, which a missing
		// entry reads as: most of a large config, kept out of the map.
		if p.AffinityPod || p.AffinityHost || p.Restrict {
			out[s.Name] = p
		}
	}
	return out
}

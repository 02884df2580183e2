package main

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/test/cri"
	"github.com/podsock/podsock/test/kubeenv"
	"github.com/podsock/podsock/test/testenv"
)

// runKubernetes is `make demo-kubernetes`: the same node, but the service comes from a
// real API server. kubectl applies a Service and the EndpointSlice a Deployment of three
// replicas would have; a client pod reaches them through the ClusterIP; the slice is scaled
// down to one, and the connection the client held to a removed replica is aborted.
func (d *demo) runKubernetes() {
	const node = "demo-node"
	step("private etcd v3.7.0 + kube-apiserver v1.37.2 on 127.0.0.1, RBAC on")
	dir, err := os.MkdirTemp("", "podsock-demo-k8s-")
	if err != nil {
		d.Fatal(err)
	}
	d.Cleanup(func() { os.RemoveAll(dir) })
	srv := kubeenv.Start(d, kubeenv.Options{Dir: filepath.Join(dir, "kube"), ServiceCIDR: netip.MustParsePrefix(vipRange)})
	fmt.Printf("    %s (etcd %s)\n", srv.URL, srv.EtcdURL)
	rbac := srv.ApplyAgentRBAC(d)
	agentKubeconfig := srv.UserKubeconfig(d, rbac.ServiceAccountUser(), rbac.ServiceAccountGroups()...)
	fmt.Printf("    deploy/rbac.yaml applied; podsock acts as %s\n", rbac.ServiceAccountUser())

	step("private containerd v2 with NRI on; pods get no default route and a blackhole for %s", vipRange)
	d.rt = cri.Start(d, cri.Options{Runtime: cri.Containerd, VIPRange: netip.MustParsePrefix(vipRange)})
	d.Cleanup(func() {
		d.rt.Stop(d)
		if left := d.rt.Leftovers(); len(left) > 0 {
			d.Errorf("left behind: %v", left)
		}
	})
	step("three replicas of web and a client pod")
	var replicas []*cri.Pod
	for i := range 3 {
		name := fmt.Sprintf("web-%d", i)
		p, c := d.pod(name, "web", "serve", "tcp", "8080", name)
		d.rt.WaitLog(d, c, "listening", 5*time.Second)
		fmt.Printf("    %s at %s\n", p.Name, p.IP)
		replicas = append(replicas, p)
	}
	clientPod, client := d.pod("client", "client", "pause")
	cgroupRoot := d.unreachedBeforePodsock(client)
	d.cfgPath = filepath.Join(dir, "podsock.toml")
	cfg := fmt.Sprintf(`[agent]
cgroup_root = %q   # the runtime's pod cgroup parent, not the machine's root
bpffs = %q
state_dir = %q

[nri]
enabled = true
socket = %q

[kubernetes]
enabled = true
kubeconfig = %q   # the podsock service account of deploy/rbac.yaml
node_name = %q
`, cgroupRoot, testenv.BPFFS(d), filepath.Join(dir, "state"), d.rt.NRISocket(), agentKubeconfig, node)
	if err := os.WriteFile(d.cfgPath, []byte(cfg), 0o644); err != nil {
		d.Fatal(err)
	}
	step("podsock run --config %s (an external NRI plugin, Services from the API server)", d.cfgPath)
	fmt.Print(indent(cfg))
	agent := d.startAgent()

	kubectl := func(stdin string, args ...string) {
		cmd := exec.Command(filepath.Join(filepath.Dir(*podsockBin), "kubectl"), append([]string{"--kubeconfig", srv.AdminKubeconfig}, args...)...)
		cmd.Stdin = strings.NewReader(stdin)
		out, err := cmd.CombinedOutput()
		fmt.Print(indent(string(out)))
		if err != nil {
			d.Fatalf("kubectl %s: %v", strings.Join(args, " "), err)
		}
	}
	step("kubectl apply: Service default/web (ClusterIP %s) and its EndpointSlice of three ready replicas", vip)
	kubectl(webManifest(node, replicas...), "apply", "-f", "-")
	d.waitServed(len(replicas))
	d.podsock("services")

	step("ten connects from the client pod to %s:80", vip)
	seen := d.dial(client, 10)
	if len(seen) < 2 {
		d.Fatalf("the replicas should share the connects through the ClusterIP; got %v", seen)
	}

	step("the client holds a connection through %s:80", vip)
	hold := d.rt.StartContainer(d, clientPod, "hold", "hold", "tcp", vip+":80")
	d.rt.WaitLog(d, hold, "connected peer="+vip+":80", 5*time.Second)
	line, _ := d.rt.Logs(hold)
	fmt.Print(indent(lastLine(line)))
	keep := replicas[0]
	for _, p := range replicas {
		if !strings.Contains(line, "reply="+p.Name) {
			keep = p
			break
		}
	}

	step("scale down to one replica (%s): kubectl apply of the smaller EndpointSlice", keep.Name)
	begin := time.Now()
	kubectl(webManifest(node, keep), "apply", "-f", "-")
	d.awaitAborted(hold, 3*time.Second, begin, "kubectl apply (API server, watch, apply and container log polling included)")
	if seen := d.dial(client, 4); seen[keep.Name] != 4 {
		d.Fatalf("after the scale-down only %s should answer; got %v", keep.Name, seen)
	}

	step("podsock services and status")
	d.podsock("services")
	d.podsock("status")

	step("stop podsock (SIGTERM) and clean up; then the API server, containerd and pods go")
	agent.Process.Signal(syscall.SIGTERM)
	agent.Wait()
	d.podsock("cleanup")
}

// waitServed waits until podsock serves default/web:http with n backends.
func (d *demo) waitServed(n int) {
	if !testenv.WaitFor(10*time.Second, func() bool {
		out, err := exec.Command(*podsockBin, "services", "--json", "--config", d.cfgPath).Output()
		var svcs []api.ServiceView
		if err != nil || json.Unmarshal(out, &svcs) != nil {
			return false
		}
		for _, s := range svcs {
			if s.Name == "default/web:http" && len(s.Backends) == n {
				return true
			}
		}
		return false
	}) {
		d.Fatalf("podsock did not serve default/web:http with %d backends", n)
	}
}

// webManifest is the Service and the EndpointSlice the EndpointSlice controller would
// write for a Deployment whose ready replicas are these pods.
func webManifest(node string, pods ...*cri.Pod) string {
	var eps strings.Builder
	for _, p := range pods {
		fmt.Fprintf(&eps, `  - addresses: [%q]
    conditions: {ready: true}
    nodeName: %s
    targetRef: {kind: Pod, namespace: default, name: %s}
`, p.IP, node, p.Name)
	}
	return fmt.Sprintf(`apiVersion: v1
kind: Node
metadata:
  name: %s
  labels: {topology.kubernetes.io/zone: demo-zone}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: %s
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-demo
  namespace: default
  labels: {kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: podsock-demo}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
%s`, node, vip, eps.String())
}

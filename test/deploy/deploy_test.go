// Package deploy tests the install files of deploy/ with the tools that consume them:
// systemd-analyze, the real containerd and CRI-O config loaders, podsock's own config
// parser, and a real kube-apiserver (server-side dry run: there is no kubelet here, so
// nothing is scheduled or run).
package deploy

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/podsock/podsock/config"
	"github.com/podsock/podsock/test/kubeenv"
	"github.com/podsock/podsock/test/testenv"
)

func deployFile(t *testing.T, parts ...string) string {
	t.Helper()
	root, err := testenv.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(append([]string{root, "deploy"}, parts...)...)
}

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func repoBin(t *testing.T, name string) string {
	t.Helper()
	root, err := testenv.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(root, "bin", name)
	if _, err := os.Stat(p); err != nil {
		testenv.SkipOrFail(t, "bin/"+name+" not built: run make deps")
	}
	return p
}

// The unit passes `systemd-analyze verify` without a single warning (an unknown key or a
// bad dependency is only a warning there, so any output fails), with the podsock binary
// path pointed at an executable that exists here. It restarts the agent, orders it after
// both runtimes without pulling them in, and has no mount namespace (the pins must be
// the host's).
func TestSystemdUnitVerifies(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		testenv.SkipOrFail(t, "systemd-analyze not installed: run make deps (scripts/install-deps.sh)")
	}
	unit := read(t, deployFile(t, "systemd", "podsock.service"))
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(unit, "=/usr/local/bin/podsock ") != 2 {
		t.Fatalf("the unit should run /usr/local/bin/podsock twice (check, run):\n%s", unit)
	}
	path := filepath.Join(t.TempDir(), "podsock.service")
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(unit, "=/usr/local/bin/podsock ", "="+self+" ")), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", path).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	for _, want := range []string{
		"\nAfter=containerd.service crio.service\n", "\nRestart=always\n", "\nExecReload=/bin/kill -HUP $MAINPID\n",
		"\nExecStart=/usr/local/bin/podsock run --config /etc/podsock/podsock.toml\n",
		"\nExecStartPre=/usr/local/bin/podsock check --config /etc/podsock/podsock.toml\n",
	} {
		if !strings.Contains(unit, want) {
			t.Errorf("unit lacks %q", strings.TrimSpace(want))
		}
	}
	for _, never := range []string{"\nWants=containerd", "\nRequires=containerd", "\nProtectSystem=", "\nPrivateTmp=", "\nPrivateMounts=", "\nExecStop"} {
		if strings.Contains(unit, never) {
			t.Errorf("unit has %q", strings.TrimSpace(never))
		}
	}
}

// The pre-registered plugin's config is a valid podsock config as shipped: NRI on,
// metrics on loopback. The plugin script passes the runtime's environment (the
// connection in NRI_PLUGIN_SOCKET) and arguments on to the binary by exec.
func TestPreRegisteredFiles(t *testing.T) {
	cfg, err := config.Load(deployFile(t, "nri", "10-podsock.conf"))
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.NRI.Enabled || cfg.Metrics.Listen != "127.0.0.1:9965" || cfg.Agent.StateDir != "/run/podsock" || cfg.Agent.CgroupRoot != "" {
		t.Fatalf("shipped pre-registered config: %+v %+v %+v", cfg.Agent, cfg.NRI, cfg.Metrics)
	}
	script := deployFile(t, "nri", "10-podsock")
	st, err := os.Stat(script)
	if err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("plugin %s: %v, mode %v; want 0755", script, err, st.Mode())
	}
	dir := t.TempDir()
	fake := filepath.Join(dir, "podsock")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\necho \"args=$# fd=$NRI_PLUGIN_SOCKET pid=$$\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	text := read(t, script)
	if strings.Count(text, "exec /usr/local/bin/podsock \"$@\"") != 1 {
		t.Fatalf("plugin script does not exec /usr/local/bin/podsock:\n%s", text)
	}
	plugin := filepath.Join(dir, "10-podsock")
	if err := os.WriteFile(plugin, []byte(strings.ReplaceAll(text, "/usr/local/bin/podsock", fake)), 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(plugin)
	cmd.Env = append(os.Environ(), "NRI_PLUGIN_SOCKET=3")
	out, err := cmd.Output()
	if err != nil || !strings.HasPrefix(string(out), "args=0 fd=3 pid=") {
		t.Fatalf("plugin script: %q %v; want the binary run with no arguments and NRI_PLUGIN_SOCKET", out, err)
	}
}

// containerd v2.4.2 loads the snippet through imports and, merged, has NRI on with the
// snippet's sockets, plugin dirs and timeouts.
func TestContainerdSnippet(t *testing.T) {
	containerd := repoBin(t, "containerd")
	snippet := deployFile(t, "containerd", "10-podsock-nri.toml")
	var want struct {
		Plugins map[string]map[string]any `toml:"plugins"`
	}
	if err := toml.Unmarshal([]byte(read(t, snippet)), &want); err != nil {
		t.Fatal(err)
	}
	nri := want.Plugins["io.containerd.nri.v1.nri"]
	if nri == nil || nri["disable"] != false {
		t.Fatalf("snippet does not enable NRI: %v", want.Plugins)
	}
	main := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(main, []byte("version = 3\nimports = [\""+snippet+"\"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(containerd, "--config", main, "config", "dump").Output()
	if err != nil {
		t.Fatalf("containerd config dump: %v", err)
	}
	var got struct {
		Plugins map[string]map[string]any `toml:"plugins"`
	}
	if err := toml.Unmarshal(out, &got); err != nil {
		t.Fatal(err)
	}
	for k, v := range nri {
		if got.Plugins["io.containerd.nri.v1.nri"][k] != v {
			t.Errorf("containerd's merged config: nri %s = %v, want the snippet's %v", k, got.Plugins["io.containerd.nri.v1.nri"][k], v)
		}
	}
	if nri["socket_path"] != config.Default().NRI.Socket {
		t.Errorf("snippet's socket %v is not podsock's default [nri] socket %s", nri["socket_path"], config.Default().NRI.Socket)
	}
}

// CRI-O v1.34.0 reads the drop-in: every key of it is one of CRI-O's [crio.nri] options
// and prints back with the snippet's value (CRI-O comments out values equal to its
// defaults), and a changed value shows as set.
func TestCRIOSnippet(t *testing.T) {
	crio := repoBin(t, "crio")
	text := read(t, deployFile(t, "crio", "10-podsock-nri.conf"))
	var snippet struct {
		Crio struct {
			NRI map[string]any `toml:"nri"`
		} `toml:"crio"`
	}
	if err := toml.Unmarshal([]byte(text), &snippet); err != nil {
		t.Fatal(err)
	}
	if snippet.Crio.NRI["enable_nri"] != true {
		t.Fatalf("snippet does not enable NRI: %v", snippet.Crio.NRI)
	}
	dump := func(dropIn string) string {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "10-podsock-nri.conf"), []byte(dropIn), 0o600); err != nil {
			t.Fatal(err)
		}
		empty := filepath.Join(dir, "crio.conf")
		if err := os.WriteFile(empty, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(crio, "--config", empty, "--config-dir", dir, "config").Output()
		if err != nil {
			t.Fatalf("crio config: %v", err)
		}
		return string(out)
	}
	out := dump(text)
	for k, v := range snippet.Crio.NRI {
		// As CRI-O prints it: strings in basic quotes (the snippet's are plain paths and
		// durations, which strconv.Quote writes the same way).
		want := fmt.Sprintf("%s = %v", k, v)
		if s, ok := v.(string); ok {
			want = k + " = " + strconv.Quote(s)
		}
		line := regexp.MustCompile(`(?m)^#? ?` + regexp.QuoteMeta(want) + `$`)
		if !line.MatchString(out) {
			t.Errorf("crio config lacks %s as the snippet sets it", want)
		}
	}
	moved := strings.Replace(text, `nri_listen = "/var/run/nri/nri.sock"`, `nri_listen = "/tmp/podsock-test-nri.sock"`, 1)
	if !strings.Contains(dump(moved), "\nnri_listen = \"/tmp/podsock-test-nri.sock\"\n") {
		t.Errorf("crio did not take nri_listen from the drop-in")
	}
}

// The manifests as shipped: a real kube-apiserver accepts them in a server-side dry run
// (field validation strict, the priority class checked by admission), the DaemonSet has
// what a node agent needs, and its config is a valid podsock config with metrics on
// loopback, where the probes look.
func TestManifestsServerSideDryRun(t *testing.T) {
	kubectl := repoBin(t, "kubectl")
	// The init container that mounts bpffs on the host is privileged, which kube-apiserver
	// refuses unless --allow-privileged is set, as every cluster that runs a CNI does.
	srv := kubeenv.Start(t, kubeenv.Options{APIServerArgs: []string{"--allow-privileged=true"}})
	apply := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(kubectl, append([]string{"--kubeconfig", srv.AdminKubeconfig, "apply", "--server-side", "--dry-run=server", "--validate=strict", "--field-manager=podsock-test"}, args...)...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("kubectl apply %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	out := apply("-k", deployFile(t))
	for _, want := range []string{"serviceaccount/podsock serverside-applied (server dry run)", "clusterrole.rbac.authorization.k8s.io/podsock", "clusterrolebinding.rbac.authorization.k8s.io/podsock", "configmap/podsock-config", "daemonset.apps/podsock serverside-applied (server dry run)"} {
		if !strings.Contains(out, want) {
			t.Errorf("apply -k deploy/ lacks %q:\n%s", want, out)
		}
	}
	if out := apply("-f", deployFile(t, "podsock-cleanup.yaml")); !strings.Contains(out, "daemonset.apps/podsock-cleanup serverside-applied (server dry run)") {
		t.Errorf("apply podsock-cleanup.yaml:\n%s", out)
	}
	// Nothing was created: a dry run.
	if _, err := exec.Command(kubectl, "--kubeconfig", srv.AdminKubeconfig, "-n", "kube-system", "get", "daemonset", "podsock").CombinedOutput(); err == nil {
		t.Errorf("the dry run created the DaemonSet")
	}
	if _, err := kubeenv.LoadAgentRBAC(); err != nil {
		t.Fatalf("deploy/rbac.yaml is no longer what test/kubeenv applies: %v", err)
	}

	var cm corev1.ConfigMap
	var ds appsv1.DaemonSet
	for _, doc := range strings.Split(read(t, deployFile(t, "podsock.yaml")), "\n---\n") {
		var meta struct{ Kind string }
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			t.Fatal(err)
		}
		var err error
		switch meta.Kind {
		case "ConfigMap":
			err = yaml.UnmarshalStrict([]byte(doc), &cm)
		case "DaemonSet":
			err = yaml.UnmarshalStrict([]byte(doc), &ds)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	cfg, err := config.Parse("podsock-config", []byte(cm.Data["podsock.toml"]))
	if err != nil {
		t.Fatalf("the DaemonSet's config: %v", err)
	}
	if !cfg.NRI.Enabled || !cfg.Kubernetes.Enabled || cfg.Metrics.Listen != "127.0.0.1:9965" {
		t.Fatalf("the DaemonSet's config: nri %v kubernetes %v metrics %q", cfg.NRI.Enabled, cfg.Kubernetes.Enabled, cfg.Metrics.Listen)
	}
	pod := ds.Spec.Template.Spec
	if !pod.HostNetwork || !pod.HostPID || pod.PriorityClassName != "system-node-critical" || pod.ServiceAccountName != "podsock" {
		t.Errorf("pod spec: hostNetwork %v hostPID %v priority %q service account %q", pod.HostNetwork, pod.HostPID, pod.PriorityClassName, pod.ServiceAccountName)
	}
	var agent corev1.Container
	for _, c := range append(slices.Clone(pod.InitContainers), pod.Containers...) {
		if c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() || c.Resources.Requests.Cpu().IsZero() || c.Resources.Limits.Cpu().IsZero() {
			t.Errorf("container %s: requests %v limits %v, want both for cpu and memory", c.Name, c.Resources.Requests, c.Resources.Limits)
		}
		if c.Name == "podsock" {
			agent = c
		}
	}
	sc := agent.SecurityContext
	if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Fatalf("agent container: security context %+v, want unprivileged, ALL dropped, capabilities added", sc)
	}
	for _, need := range []corev1.Capability{"BPF", "SYS_ADMIN", "NET_ADMIN"} {
		if !slices.Contains(sc.Capabilities.Add, need) {
			t.Errorf("agent container lacks CAP_%s, which podsock run checks for", need)
		}
	}
	for probe, path := range map[*corev1.Probe]string{agent.LivenessProbe: "/healthz", agent.ReadinessProbe: "/readyz"} {
		if probe == nil || probe.HTTPGet == nil || probe.HTTPGet.Path != path || probe.HTTPGet.Host != "127.0.0.1" || probe.HTTPGet.Port.IntValue() != 9965 {
			t.Errorf("probe for %s: %+v, want GET 127.0.0.1:9965%s (metrics.listen)", path, probe, path)
		}
	}
	mounts := map[string]string{}
	for _, m := range agent.VolumeMounts {
		mounts[m.MountPath] = m.Name
	}
	hostPaths := map[string]string{}
	for _, v := range pod.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	for mount, host := range map[string]string{"/sys/fs/bpf": "/sys/fs/bpf", "/sys/fs/cgroup": "/sys/fs/cgroup", "/var/run/nri": "/var/run/nri", "/run/podsock": "/run/podsock"} {
		if hostPaths[mounts[mount]] != host {
			t.Errorf("agent container: %s is not the host's %s", mount, host)
		}
	}
}

package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/podsock/podsock/config"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/internal/netns"
	"github.com/podsock/podsock/internal/statedir"
	"github.com/podsock/podsock/runtimehooks"
	"github.com/podsock/podsock/service"
	"github.com/podsock/podsock/test/testenv"
)

// The tests in this file run the agent's own logic against fakeDatapath: they need no
// root, no BPF and no runtime. What they assert is what the agent writes.

// fakeAgent is an agent on a fake datapath, with a tracker whose "cgroup2 mount" is a
// temporary directory: the pod cgroup IDs it reads are the inodes of directories there.
func fakeAgent(t *testing.T) (*Agent, *fakeDatapath, string) {
	t.Helper()
	host, err := netns.Open(hostNetnsPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = host.Close() })
	fake := newFakeDatapath()
	cgroup2 := t.TempDir()
	a := testAgent(t, fake, cgroup2, host, nil)
	a.tracker = runtimehooks.NewTrackerWith(cgroup2, dirInode)
	a.netns.tracker = a.tracker
	return a, fake, cgroup2
}

// dirInode stands in for the cgroup2 filesystem: a directory's ID is its inode, as a
// cgroup's is.
func dirInode(mount, p string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(mount, p), &st); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", p, err)
	}
	return st.Ino, nil
}

// releaseAtCleanup lets a held apply finish before the agent stops, whether or not the
// test got as far as releasing it.
func releaseAtCleanup(t *testing.T, fake *fakeDatapath) func() {
	release := sync.OnceFunc(func() { close(fake.hold) })
	t.Cleanup(release)
	return release
}

func writeConfig(t *testing.T, path, body string) {
	t.Helper()
	if err := os.WriteFile(path, []byte("[nri]\nenabled = false\n"+body), 0o600); err != nil {
		t.Fatal(err)
	}
}

// serviceTOML is one [[service]] table.
func serviceTOML(name, vip string, port int, proto string, backends ...string) string {
	return fmt.Sprintf("[[service]]\nname = %q\nvip = %q\nport = %d\nprotocol = %q\nbackends = [\"%s\"]\n",
		name, vip, port, proto, strings.Join(backends, `", "`))
}

const terminateTCP = "[lb]\nterminate = [\"tcp\"]\n"

var webAndDNS = terminateTCP +
	serviceTOML("default/web", "10.96.0.20", 80, "tcp", "10.88.0.5:8080", "10.88.0.6:8080") +
	serviceTOML("kube-system/dns", "10.96.0.10", 53, "udp", "10.88.0.9:53")

func serviceNames(svcs []datapath.Service) []string {
	var out []string
	for _, s := range svcs {
		out = append(out, fmt.Sprintf("%s %s:%d/%s %d", s.Name, s.VIP, s.Port, datapath.ProtoName(s.Proto), len(s.Backends)))
	}
	slices.Sort(out)
	return out
}

// A reload whose file does not parse writes nothing, keeps the running config and its
// generation, and says what is wrong in status, with the file and line.
func TestReloadWithABadConfigChangesNothing(t *testing.T) {
	a, fake, _ := fakeAgent(t)
	path := filepath.Join(t.TempDir(), "podsock.toml")
	writeConfig(t, path, webAndDNS)
	a.reload(path)
	if a.Generation() != 1 {
		t.Fatalf("generation %d after the first config, want 1 (last error %q)", a.Generation(), a.status().LastReloadError)
	}
	writeConfig(t, path, webAndDNS+"\n[[service]]\nname = \"broken\"\nvip = \"10.96.0.300\"\nport = 80\n")
	a.reload(path)
	applies, _, _, _ := fake.state()
	if len(applies) != 1 {
		t.Fatalf("%d applies, want only the first: a bad config must write nothing", len(applies))
	}
	st := a.status()
	if st.ConfigGeneration != 1 || !strings.HasPrefix(st.LastReloadError, path+":") || strings.Contains(st.LastReloadError, "\n") {
		t.Fatalf("after a bad reload: generation %d, last error %q; want 1 and one line naming %s:LINE", st.ConfigGeneration, st.LastReloadError, path)
	}
	served, _ := fake.Services()
	if got := serviceNames(served); !slices.Equal(got, serviceNames(applies[0])) || st.Services != 2 {
		t.Fatalf("datapath serves %v (%d), want the two services of the running config", got, st.Services)
	}
	// A good file again clears the error.
	writeConfig(t, path, webAndDNS)
	a.reload(path)
	if st := a.status(); st.ConfigGeneration != 2 || st.LastReloadError != "" {
		t.Fatalf("after a good reload: generation %d, last error %q", st.ConfigGeneration, st.LastReloadError)
	}
}

// An apply writes the new view whole; the backends it removes reach the terminator in
// one batch, filtered by [lb] terminate.
func TestApplyDiffReachesTheTerminator(t *testing.T) {
	a, fake, _ := fakeAgent(t)
	a.term.SetPodsKnown()
	dir := t.TempDir()
	path := filepath.Join(dir, "podsock.toml")
	writeConfig(t, path, webAndDNS)
	a.reload(path)
	writeConfig(t, path, terminateTCP+
		serviceTOML("default/web", "10.96.0.20", 80, "tcp", "10.88.0.5:8080")+
		serviceTOML("default/api", "10.96.0.30", 443, "tcp", "10.88.0.7:8443"))
	a.reload(path)
	applies, _, _, _ := fake.state()
	want := []string{"default/api 10.96.0.30:443/tcp 1", "default/web 10.96.0.20:80/tcp 1"}
	if len(applies) != 2 || !slices.Equal(serviceNames(applies[1]), want) {
		t.Fatalf("applies %v, want the second to write exactly %v", applies, want)
	}
	if !testenv.WaitFor(2*time.Second, func() bool { _, _, _, term := fake.state(); return len(term) > 0 }) {
		t.Fatal("no termination pass for the removed backends")
	}
	_, _, _, term := fake.state()
	wantGone := datapath.RemovedBackend{Service: "default/web", VIP: netip.MustParseAddrPort("10.96.0.20:80"), Proto: datapath.ProtoTCP, Backend: netip.MustParseAddrPort("10.88.0.6:8080")}
	// The dns backend is UDP, which [lb] terminate leaves out.
	if len(term[0]) != 1 || term[0][0] != wantGone {
		t.Fatalf("first pass terminated %v, want only %v", term[0], wantGone)
	}
}

// podDirs makes a pod cgroup and its container cgroups under cgroup2, as a runtime would,
// and returns the sandbox and containers it reports.
func podDirs(t *testing.T, cgroup2, namespace, name string, containers ...string) (runtimehooks.Sandbox, []runtimehooks.ContainerInfo) {
	t.Helper()
	uid := "uid-" + name + "-0000"
	parent := "/kubepods/pod" + uid
	sb := runtimehooks.Sandbox{ID: "sb-" + name, UID: uid, Namespace: namespace, Name: name, CgroupParent: parent}
	var ctrs []runtimehooks.ContainerInfo
	for _, c := range containers {
		if err := os.MkdirAll(filepath.Join(cgroup2, parent, c), 0o755); err != nil {
			t.Fatal(err)
		}
		ctrs = append(ctrs, runtimehooks.ContainerInfo{ID: c, SandboxID: sb.ID, Name: c, CgroupsPath: parent + "/" + c})
	}
	if err := os.MkdirAll(filepath.Join(cgroup2, parent), 0o755); err != nil {
		t.Fatal(err)
	}
	return sb, ctrs
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// Synchronize makes the datapath's pods exactly the runtime's: a pod the agent knew but
// the runtime no longer reports is dropped, and each pod's cgroup IDs are the inodes of
// the directories the runtime named.
func TestSynchronizeIsExact(t *testing.T) {
	a, fake, cgroup2 := fakeAgent(t)
	stale, _ := podDirs(t, cgroup2, "default", "stale")
	a.RunPodSandbox(stale)
	web, webCtrs := podDirs(t, cgroup2, "default", "web", "ctr-web-1", "ctr-web-2")
	db, dbCtrs := podDirs(t, cgroup2, "data", "db", "ctr-db")
	a.Synchronize([]runtimehooks.Sandbox{web, db}, append(webCtrs, dbCtrs...))
	if !testenv.WaitFor(2*time.Second, func() bool { _, _, syncs, _ := fake.state(); return len(syncs) == 1 }) {
		t.Fatal("Synchronize wrote no pods")
	}
	_, pods, syncs, _ := fake.state()
	var ids []string
	for _, p := range syncs[0] {
		ids = append(ids, p.SandboxID)
	}
	slices.Sort(ids)
	if !slices.Equal(ids, []string{db.ID, web.ID}) || len(pods) != 2 {
		t.Fatalf("synchronized %v (datapath holds %d), want exactly %v", ids, len(pods), []string{db.ID, web.ID})
	}
	got := pods[web.ID]
	if want := inode(t, filepath.Join(cgroup2, web.CgroupParent)); got.PodCgroup != want {
		t.Fatalf("web's pod cgroup %d, want the inode %d", got.PodCgroup, want)
	}
	wantCtrs := []uint64{inode(t, filepath.Join(cgroup2, webCtrs[0].CgroupsPath)), inode(t, filepath.Join(cgroup2, webCtrs[1].CgroupsPath))}
	slices.Sort(wantCtrs)
	gotCtrs := slices.Sorted(slices.Values(got.ContainerCgroups))
	if !slices.Equal(gotCtrs, wantCtrs) {
		t.Fatalf("web's container cgroups %v, want the inodes %v", gotCtrs, wantCtrs)
	}
	if p := a.tracker.Pods(); len(p) != 2 {
		t.Fatalf("tracker holds %d pods, want 2", len(p))
	}
}

// A pod that starts while a long apply holds the datapath is handled at once, under the
// config being applied: it is not late, and its allow-list entry is the new service's.
func TestPodEventDuringALongApply(t *testing.T) {
	a, fake, cgroup2 := fakeAgent(t)
	fake.hold, fake.applying = make(chan struct{}), make(chan struct{}, 1)
	release := releaseAtCleanup(t, fake)
	cfg, err := config.Parse("t.toml", []byte(serviceTOML("default/api", "10.96.0.30", 443, "tcp", "10.88.0.7:8443")+
		"[[service.allow]]\nnamespace = \"allowed\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	applied := a.publishConfig(cfg)
	<-fake.applying
	sb, ctrs := podDirs(t, cgroup2, "allowed", "client", "ctr-client")
	start := time.Now()
	a.RunPodSandbox(sb)
	a.ContainerStarted(ctrs[0])
	took := time.Since(start)
	_, pods, _, _ := fake.state()
	if p, ok := pods[sb.ID]; !ok || !slices.Equal(p.AllowedServices, []string{"default/api"}) || len(p.ContainerCgroups) != 1 {
		t.Fatalf("pod during the apply: %+v (known %v), want its container and the new service's allow-list", p, ok)
	}
	release()
	if err := <-applied; err != nil {
		t.Fatal(err)
	}
	for kind, ev := range a.events.snapshot() {
		if ev.Late != 0 || ev.Failed != 0 {
			t.Fatalf("%s: %+v, want none late or failed", kind, ev)
		}
	}
	if took > handlerBudget {
		t.Fatalf("the pod's handlers took %v during the apply, over the %v budget", took, handlerBudget)
	}
}

func kubeService(name, vip string, backends ...string) service.Service {
	s := service.Service{Name: name, VIP: netip.MustParseAddr(vip), Port: 80, Protocol: service.ProtocolTCP}
	for _, b := range backends {
		s.Backends = append(s.Backends, service.Backend{Addr: netip.MustParseAddrPort(b), Weight: 1})
	}
	return s
}

// Snapshots that arrive while an apply runs are coalesced: one more apply writes the
// newest, and everyone who published is told its outcome.
func TestReconcileCoalescesBursts(t *testing.T) {
	a, fake, _ := fakeAgent(t)
	fake.hold, fake.applying = make(chan struct{}), make(chan struct{}, 1)
	release := releaseAtCleanup(t, fake)
	first := a.publishConfig(config.Default())
	<-fake.applying
	var done []<-chan error
	for i := range 50 {
		done = append(done, a.sources.Publish(service.Snapshot{
			Source: service.SourceKubernetes, Synced: true,
			Services: []service.Service{kubeService("default/web:http", "10.96.0.20", fmt.Sprintf("10.88.0.%d:8080", i+1))},
		}))
	}
	release()
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	for _, d := range done {
		if err := <-d; err != nil {
			t.Fatal(err)
		}
	}
	applies, _, _, _ := fake.state()
	if len(applies) != 2 {
		t.Fatalf("%d applies for 1 config and a burst of 50 snapshots, want 2", len(applies))
	}
	last := applies[1]
	if len(last) != 1 || last[0].Backends[0].Addr != netip.MustParseAddrPort("10.88.0.50:8080") {
		t.Fatalf("last apply wrote %+v, want the newest snapshot", last)
	}
}

// A source that has not synced keeps what was adopted for it; once it has, its snapshot
// replaces that. A frontend the file also claims stays the file's, and status says so.
func TestReconcileKeepsAnUnsyncedSourcesServices(t *testing.T) {
	a, fake, _ := fakeAgent(t)
	a.sources.Adopt(service.SourceKubernetes, []service.Service{kubeService("default/old:http", "10.96.0.21", "10.88.0.1:80")})
	cfg := config.Default()
	cfg.Services = []service.Service{kubeService("file/web", "10.96.0.20", "10.88.0.2:80")}
	if err := <-a.publishConfig(cfg); err != nil {
		t.Fatal(err)
	}
	partial := []service.Service{kubeService("default/new:http", "10.96.0.22", "10.88.0.3:80")}
	if err := <-a.sources.Publish(service.Snapshot{Source: service.SourceKubernetes, Services: partial}); err != nil {
		t.Fatal(err)
	}
	applies, _, _, _ := fake.state()
	want := []string{"default/old:http 10.96.0.21:80/tcp 1", "file/web 10.96.0.20:80/tcp 1"}
	if got := serviceNames(applies[len(applies)-1]); !slices.Equal(got, want) {
		t.Fatalf("with the source unsynced the datapath got %v, want the adopted %v", got, want)
	}
	synced := append(slices.Clone(partial), kubeService("default/clash:http", "10.96.0.20", "10.88.0.4:80"))
	if err := <-a.sources.Publish(service.Snapshot{Source: service.SourceKubernetes, Services: synced, Synced: true}); err != nil {
		t.Fatal(err)
	}
	applies, _, _, _ = fake.state()
	want = []string{"default/new:http 10.96.0.22:80/tcp 1", "file/web 10.96.0.20:80/tcp 1"}
	if got := serviceNames(applies[len(applies)-1]); !slices.Equal(got, want) {
		t.Fatalf("with the source synced the datapath got %v, want %v", got, want)
	}
	st := a.status()
	if len(st.Conflicts) != 1 || st.Conflicts[0].Key != "10.96.0.20:80/tcp" || st.Conflicts[0].Kept.Source != "file" || st.Conflicts[0].Dropped.Name != "default/clash:http" {
		t.Fatalf("status conflicts %+v, want the file keeping 10.96.0.20:80/tcp", st.Conflicts)
	}
	if len(st.Sources) != 2 || !st.Sources[1].Synced || st.Sources[1].Name != "kubernetes" || st.Sources[1].Services != 1 {
		t.Fatalf("status sources %+v", st.Sources)
	}
	svcs, _ := fake.Services()
	for _, v := range serviceViews(svcs, a.sources.Served) {
		if wantSrc := map[string]string{"file/web": "file", "default/new:http": "kubernetes"}[v.Name]; v.Source != wantSrc {
			t.Fatalf("services shows %s from %q, want %q", v.Name, v.Source, wantSrc)
		}
	}
}

// A config the datapath fails to apply stays the one wanted: the next apply that works,
// whichever source asked for it, makes it the running config (+1 generation, error gone).
func TestFailedApplyOfANewConfigIsRetried(t *testing.T) {
	a, fake, _ := fakeAgent(t)
	path := filepath.Join(t.TempDir(), "podsock.toml")
	writeConfig(t, path, webAndDNS)
	a.reload(path)
	fake.mu.Lock()
	fake.applyErr = errors.New("injected: map full")
	fake.mu.Unlock()
	writeConfig(t, path, terminateTCP+serviceTOML("default/web", "10.96.0.20", 80, "tcp", "10.88.0.5:8080"))
	a.reload(path)
	if st := a.status(); st.ConfigGeneration != 1 || !strings.Contains(st.LastReloadError, "injected") {
		t.Fatalf("after a failed apply: generation %d, last error %q", st.ConfigGeneration, st.LastReloadError)
	}
	if err := <-a.sources.Publish(service.Snapshot{Source: service.SourceKubernetes, Synced: true}); err != nil {
		t.Fatal(err)
	}
	st := a.status()
	served, _ := fake.Services()
	if st.ConfigGeneration != 2 || st.LastReloadError != "" || !slices.Equal(serviceNames(served), []string{"default/web 10.96.0.20:80/tcp 1"}) {
		t.Fatalf("after the next apply: generation %d, last error %q, serving %v; want the new config in force", st.ConfigGeneration, st.LastReloadError, serviceNames(served))
	}
}

// The services another source had are kept by the next agent until that source has
// synced, though the datapath knows no sources: the agent records them in state_dir.
func TestNextAgentKeepsAnotherSourcesServices(t *testing.T) {
	stateDir := t.TempDir()
	first, fake, _ := fakeAgent(t)
	first.settings.StateDir = stateDir
	cfg := config.Default()
	cfg.Services = []service.Service{kubeService("file/web", "10.96.0.20", "10.88.0.2:80")}
	if err := <-first.publishConfig(cfg); err != nil {
		t.Fatal(err)
	}
	kube := []service.Service{kubeService("default/api:http", "10.96.0.22", "10.88.0.3:80")}
	if err := <-first.sources.Publish(service.Snapshot{Source: service.SourceKubernetes, Services: kube, Synced: true}); err != nil {
		t.Fatal(err)
	}

	if _, err := os.Stat(filepath.Join(stateDir, statedir.SourcesName)); err != nil {
		t.Fatalf("no record of the kubernetes service: %v", err)
	}
	next, _, _ := fakeAgent(t)
	next.dp = fake
	next.settings.StateDir = stateDir
	next.adoptRecordedSources()
	if err := <-next.publishConfig(cfg); err != nil {
		t.Fatal(err)
	}
	served, _ := fake.Services()
	want := []string{"default/api:http 10.96.0.22:80/tcp 1", "file/web 10.96.0.20:80/tcp 1"}
	if got := serviceNames(served); !slices.Equal(got, want) {
		t.Fatalf("the next agent serves %v, want the kubernetes service kept: %v", got, want)
	}
	st := next.status()
	if len(st.Sources) != 2 || st.Sources[1].Name != "kubernetes" || st.Sources[1].Synced || st.Sources[1].Services != 1 {
		t.Fatalf("sources %+v, want kubernetes unsynced with its 1 service kept", st.Sources)
	}
	if err := <-next.sources.Publish(service.Snapshot{Source: service.SourceKubernetes, Synced: true}); err != nil {
		t.Fatal(err)
	}
	if served, _ := fake.Services(); len(served) != 1 {
		t.Fatalf("once kubernetes synced with nothing, the datapath serves %v", serviceNames(served))
	}
	if _, err := os.Stat(filepath.Join(stateDir, statedir.SourcesName)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("with only the file's services served, %s is left: %v", statedir.SourcesName, err)
	}
}

// A reload that changes a few services of many hands the datapath only their positions,
// and the datapath's check of that promise holds; one that renames or moves a service,
// or changes most of them, is a full apply.
func TestReloadOfAFewServicesIsIncremental(t *testing.T) {
	a, fake, _ := fakeAgent(t)
	path := filepath.Join(t.TempDir(), "podsock.toml")
	services := func(changed map[int]string) string {
		var b strings.Builder
		b.WriteString(terminateTCP)
		for i := range 40 {
			name, backend := fmt.Sprintf("default/svc-%d", i), "10.88.0.5:8080"
			if c, ok := changed[i]; ok {
				backend = c
			}
			b.WriteString(serviceTOML(name, fmt.Sprintf("10.96.1.%d", i), 80, "tcp", backend))
		}
		return b.String()
	}
	for _, tt := range []struct {
		name        string
		body        string
		incremental bool
	}{
		{"first", services(nil), false},
		{"two backends", services(map[int]string{3: "10.88.0.6:8080", 17: "10.88.0.7:8080"}), true},
		{"the same", services(map[int]string{3: "10.88.0.6:8080", 17: "10.88.0.7:8080"}), true},
		{"renamed", strings.Replace(services(nil), "default/svc-5\"", "default/other\"", 1), false},
		{"most changed", strings.ReplaceAll(services(nil), "10.88.0.5:8080", "10.88.0.9:8080"), false},
	} {
		before := fake.incrementalApplies
		writeConfig(t, path, tt.body)
		a.reload(path)
		if st := a.status(); st.LastReloadError != "" {
			t.Fatalf("%s: %s", tt.name, st.LastReloadError)
		}
		if got := fake.incrementalApplies > before; got != tt.incremental {
			t.Fatalf("%s: incremental %v, want %v", tt.name, got, tt.incremental)
		}
		// The changes alone leave the datapath with what a full apply would have given it.
		if want := toDatapath(a.lastApply.services, a.lastApply.policies); !reflect.DeepEqual(fake.lastInput, want) {
			t.Fatalf("%s: the datapath's services\n got %+v\nwant %+v", tt.name, fake.lastInput, want)
		}
	}
	applies, _, _, _ := fake.state()
	if last := applies[len(applies)-1]; len(last) != 40 || last[3].Backends[0].Addr.String() != "10.88.0.9:8080" {
		t.Fatalf("last apply %v, want all 40 services with the new backend", serviceNames(last))
	}
}

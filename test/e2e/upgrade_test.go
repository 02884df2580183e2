package e2e

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/podsock/podsock/test/cri"
	"github.com/podsock/podsock/test/testenv"
)

// previousRelease is the commit the upgrade test starts from: the release before the
// current map layout. A later change of layout moves it to the release before that change.
const previousRelease = "359d23c"

// buildRelease builds the podsock binary of a commit of this repository, from its own
// sources (git archive), against the module cache.
func buildRelease(t *testing.T, commit string) string {
	t.Helper()
	root, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		testenv.SkipOrFail(t, fmt.Sprintf("not in a git checkout, cannot build release %s: %v", commit, err))
	}
	repo := strings.TrimSpace(string(root))
	if err := exec.Command("git", "-C", repo, "cat-file", "-e", commit+"^{commit}").Run(); err != nil {
		testenv.SkipOrFail(t, fmt.Sprintf("release %s is not in this clone's history", commit))
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	archive := exec.Command("git", "-C", repo, "archive", "--format=tar", commit)
	extract := exec.Command("tar", "-x", "-C", src)
	pipe, err := archive.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	extract.Stdin = pipe
	if err := extract.Start(); err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	archive.Stderr = &stderr
	if err := archive.Run(); err != nil {
		t.Fatalf("git archive %s: %v: %s", commit, err, stderr.String())
	}
	if err := extract.Wait(); err != nil {
		t.Fatalf("extract %s: %v", commit, err)
	}
	bin := filepath.Join(dir, "podsock-"+commit)
	build := exec.Command("go", "build", "-o", bin, "./cmd/podsock")
	build.Dir = src
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build release %s: %v: %s", commit, err, out)
	}
	return bin
}

// TestPrivilegedNRIUpgradeWithLiveSockets: the previous release serves pods with balanced
// TCP and connected-UDP sockets that keep exchanging; the current binary replaces it. The
// sockets keep working and keep seeing the VIP, termination still finds them, and the
// pins of the old layout are gone.
func TestPrivilegedNRIUpgradeWithLiveSockets(t *testing.T) {
	testenv.RequirePrivileged(t)
	oldBin := buildRelease(t, previousRelease)
	eachRuntime(t, func(t *testing.T, kind cri.Kind) { testNRIUpgradeWithLiveSockets(t, kind, oldBin) })
}

func testNRIUpgradeWithLiveSockets(t *testing.T, kind cri.Kind, oldBin string) {
	w := newNRIWorld(t, cri.Options{Runtime: kind})
	a, b := backendsWithDNS(t, w)
	c, probe := clientPod(t, w.rt, cri.PodSpec{Name: "client", Namespace: "shop"})
	requireBlackholed(t, w, probe, "before podsock runs")

	w.writeConfig(terminateServices(a, b))
	old := startAgentBin(t, oldBin, w.cfgPath)
	w.waitConnected()
	w.waitPods(map[string]int{a.ID: 2, b.ID: 2, c.ID: 1})
	tcpPing := w.rt.StartContainer(t, c, "ping-web", "ping", "tcp", e2eWeb.String())
	udpPing := w.rt.StartContainer(t, c, "ping-dns", "ping", "udp", e2eDNS.String())
	w.rt.WaitLog(t, tcpPing, "ping=2 reply=a from="+e2eWeb.String(), 5*time.Second)
	w.rt.WaitLog(t, udpPing, "ping=2 reply=a from="+e2eDNS.String(), 5*time.Second)

	// The upgrade: the old agent stops (the pinned datapath keeps serving), the new one
	// adopts it.
	old.cmd.Process.Signal(syscall.SIGTERM)
	old.cmd.Wait()
	pings := func(ct *cri.Container) int {
		out, _ := w.rt.Logs(ct)
		return strings.Count(out, "ping=")
	}
	before := map[*cri.Container]int{tcpPing: pings(tcpPing), udpPing: pings(udpPing)}
	current := w.startAgent()
	w.waitPods(map[string]int{a.ID: 2, b.ID: 2, c.ID: 3})
	for _, ct := range []*cri.Container{tcpPing, udpPing} {
		if !testenv.WaitFor(5*time.Second, func() bool { return pings(ct) >= before[ct]+5 }) {
			out, _ := w.rt.Logs(ct)
			t.Fatalf("the held socket stopped exchanging after the upgrade:\n%s\nagent log:\n%s", out, current.logText())
		}
		out, _ := w.rt.Logs(ct)
		vip := e2eWeb.String()
		if ct == udpPing {
			vip = e2eDNS.String()
		}
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			if !strings.HasSuffix(l, "reply=a from="+vip) || strings.Contains(l, "error") {
				t.Fatalf("held socket across the upgrade printed %q: want every reply from a through the VIP %s", l, vip)
			}
		}
	}
	// Pins of the old layout go once nothing needs them: the pair counts, the affinity
	// map without revisions and the names of at most 127 bytes.
	for _, name := range []string{"podsock_pairnetns_v1", "podsock_aff_v1", "podsock_name_v1"} {
		if _, err := os.Stat(filepath.Join(w.bpffs, "podsock", name)); !os.IsNotExist(err) {
			t.Errorf("pin %s of the old layout is still there (%v)", name, err)
		}
	}
	// New connects go through the VIP too.
	if got := w.through(probe, e2eWeb, 4); got["a"] != 4 {
		t.Fatalf("new connects after the upgrade: %v, want a", got)
	}

	// Termination finds the sockets the old release balanced.
	if !testenv.WaitFor(5*time.Second, func() bool {
		st, err := agentStatus(w.cfgPath)
		return err == nil && !st.Datapath.BackfillPending
	}) {
		t.Fatalf("the sockets of the old release were never counted:\n%s", current.logText())
	}
	w.writeConfig(terminateServices(b, b))
	start := time.Now()
	current.cmd.Process.Signal(syscall.SIGHUP)
	w.rt.WaitLog(t, tcpPing, "read-error=ECONNABORTED", time.Second)
	// A destroyed connected UDP socket is also disconnected: a receive blocked on it fails
	// with ECONNABORTED, and a send after that with EDESTADDRREQ. Which one the workload
	// meets depends on where its loop was.
	w.rt.WaitLogAny(t, udpPing, []string{"read-error=EDESTADDRREQ", "read-error=ECONNABORTED"}, time.Second)
	st, err := agentStatus(w.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if st.Termination.FullWalks != 0 || st.Termination.Destroyed != 2 {
		t.Fatalf("termination %+v: want the 2 old sockets found through their counts", st.Termination)
	}
	t.Logf("sockets of release %s kept the VIP across the upgrade, and were ended %v after the backend left",
		previousRelease, time.Since(start).Round(time.Millisecond))
}

// startAgentBin is startAgent for another podsock binary.
func startAgentBin(t *testing.T, bin, cfgPath string) *agentProc {
	t.Helper()
	saved := podsockBin
	podsockBin = bin
	defer func() { podsockBin = saved }()
	return startAgent(t, cfgPath)
}

// TestPrivilegedAgentRollbackOverNewPins: a rollback. The previous release (359d23c) is
// started over the pins this one left (after SIGTERM, serving). It refuses, with one line
// and exit 1, and leaves this release's datapath serving; never a half state. Connects
// through the VIP keep reaching the backend throughout, and this release, started again,
// adopts every link.
func TestPrivilegedAgentRollbackOverNewPins(t *testing.T) {
	w := newWorld(t)
	oldBin := buildRelease(t, previousRelease)
	testenv.StartTCPBackend(t, w.ns, "A", beA)
	w.writeConfig(webService(`"10.88.0.5:8080"`))
	a := w.startAgent()
	a.cmd.Process.Signal(syscall.SIGTERM)
	a.cmd.Wait()
	if got := w.connects(20); got["A"] != 20 {
		t.Fatalf("after SIGTERM: %v, want the pinned datapath serving A", got)
	}

	// 359d23c sizes its maps by constants that differ from this release's [limits]
	// defaults, and cilium/ebpf refuses a pinned map of another size: it stops at load,
	// before it attaches or unpins anything, with one line.
	out, err := exec.Command(oldBin, "run", "--config", w.cfgPath).CombinedOutput()
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	last := lines[len(lines)-1]
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.HasPrefix(last, "podsock run: pinned maps are incompatible with this podsock version in ") ||
		!strings.Contains(last, "(run `podsock cleanup`)") {
		t.Fatalf("release %s over this release's pins: %v, last line %q; want exit 1 and one line refusing the pinned maps\n%s", previousRelease, err, last, out)
	}
	t.Logf("release %s over this release's pins refused: %s", previousRelease, last)
	if got := w.connects(20); got["A"] != 20 {
		t.Fatalf("after the refused rollback: %v, want this release's datapath serving A", got)
	}
	w.startAgent()
	// All 9 links still pinned as this release left them: the old one touched none.
	if st, err := w.status(); err != nil || !st.Datapath.Attached || st.Services != 1 || st.Datapath.AdoptedLinks != 9 {
		t.Fatalf("this release started again: attached %v, %d services, %d links adopted (%v); want 1 service and all 9 links", st.Datapath.Attached, st.Services, st.Datapath.AdoptedLinks, err)
	}
	if got := w.connects(20); got["A"] != 20 {
		t.Fatalf("this release started again: %v, want A", got)
	}
}

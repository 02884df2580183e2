package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/test/cri"
)

// traceProc is a running `podsock trace --json` and the decisions it printed.
type traceProc struct {
	cmd    *exec.Cmd
	stderr bytes.Buffer
	mu     sync.Mutex
	lines  []api.TraceView
	bad    []string
	done   chan struct{}
}

func startTrace(t *testing.T, cfgPath string, args ...string) *traceProc {
	t.Helper()
	p := &traceProc{done: make(chan struct{})}
	p.cmd = exec.Command(podsockBin, append([]string{"trace", "--json", "--config", cfgPath}, args...)...)
	p.cmd.Stderr = &p.stderr
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var v api.TraceView
			p.mu.Lock()
			if err := json.Unmarshal(sc.Bytes(), &v); err != nil {
				p.bad = append(p.bad, sc.Text())
			} else {
				p.lines = append(p.lines, v)
			}
			p.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			_ = p.cmd.Process.Kill()
			_ = p.cmd.Wait()
		}
	})
	return p
}

// stop interrupts the trace as a user would, and returns what it printed.
func (p *traceProc) stop(t *testing.T) []api.TraceView {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	<-p.done
	if err := p.cmd.Wait(); err != nil {
		t.Fatalf("podsock trace after SIGINT: %v; stderr:\n%s", err, p.stderr.String())
	}
	if !strings.Contains(p.stderr.String(), " lost") {
		t.Fatalf("podsock trace did not say what it lost; stderr:\n%s", p.stderr.String())
	}
	if len(p.bad) > 0 {
		t.Fatalf("podsock trace --json printed lines that are not decisions: %q", p.bad)
	}
	return p.lines
}

// TestPrivilegedNRITrace: `podsock trace` shows connects from two containerd pods with their
// exact pod names, containers and backends, a denied connect as denied with EPERM, and a
// filtered trace (by pod, by service) only what it asked for, while other traces run.
func TestPrivilegedNRITrace(t *testing.T) {
	w := newNRIWorld(t, cri.Options{Runtime: cri.Containerd})
	a, _ := servePod(t, w.rt, "backend-a", "a")
	b, _ := servePod(t, w.rt, "backend-b", "b")
	db := netip.MustParseAddrPort("10.96.0.30:80")
	w.writeConfig(webServiceFor(a, b) + dbServiceFor(db, a))
	w.startAgent()
	apiPod, apiC := clientPod(t, w.rt, cri.PodSpec{Name: "api", Namespace: "shop", Labels: map[string]string{"role": "api"}})
	front, frontC := clientPod(t, w.rt, cri.PodSpec{Name: "frontend", Namespace: "shop", Labels: map[string]string{"role": "frontend"}})
	w.waitPods(map[string]int{a.ID: 1, b.ID: 1, apiPod.ID: 1, front.ID: 1})
	backendName := map[string]string{
		netip.AddrPortFrom(a.IP, 8080).String(): "a",
		netip.AddrPortFrom(b.IP, 8080).String(): "b",
	}

	all := startTrace(t, w.cfgPath)
	byPod := startTrace(t, w.cfgPath, "--pod", "shop/api")
	bySvc := startTrace(t, w.cfgPath, "--service", "shop/db")
	// Each trace attaches once the agent answers; a connect before that is not seen.
	time.Sleep(time.Second)

	apiReplies := w.through(apiC, e2eWeb, 6)
	frontReplies := w.through(frontC, e2eWeb, 6)
	w.through(apiC, db, 2)
	lines, err := w.dial(frontC, "tcp", db, 1)
	if err == nil || !strings.Contains(lines[0], "EPERM") {
		t.Fatalf("frontend to db: %q (%v), want EPERM", lines, err)
	}
	time.Sleep(500 * time.Millisecond)

	got := all.stop(t)
	// Every balanced connect to web names its pod, its container and the backend that
	// answered it.
	seen := map[string]map[string]int{}
	denied := 0
	for _, d := range got {
		if d.Time == "" || d.NetnsCookie == 0 || d.SocketCookie == 0 {
			t.Fatalf("decision without time or cookies: %+v", d)
		}
		if _, err := time.Parse(time.RFC3339Nano, d.Time); err != nil {
			t.Fatalf("time %q: %v", d.Time, err)
		}
		switch {
		case d.Op == "connect" && d.Verdict == "balanced" && d.Service == "default/web":
			if d.Container != "client" || d.VIP != e2eWeb.String() || d.Proto != "tcp" || d.Errno != 0 {
				t.Fatalf("balanced connect: %+v", d)
			}
			if seen[d.Pod] == nil {
				seen[d.Pod] = map[string]int{}
			}
			seen[d.Pod][backendName[d.Backend]]++
		case d.Verdict == "denied":
			denied++
			if d.Pod != "shop/frontend" || d.Container != "client" || d.Service != "shop/db" || d.Errno != int(syscall.EPERM) || d.Backend != "" || d.Op != "connect" {
				t.Fatalf("denied connect: %+v", d)
			}
		}
	}
	if !mapsEqual(seen["shop/api"], apiReplies) || !mapsEqual(seen["shop/frontend"], frontReplies) {
		t.Fatalf("traced backends per pod %v, want what the clients were answered by: api %v, frontend %v", seen, apiReplies, frontReplies)
	}
	if denied != 1 {
		t.Fatalf("%d denied decisions, want 1", denied)
	}

	podLines := byPod.stop(t)
	webConnects := 0
	for _, d := range podLines {
		if d.Pod != "shop/api" {
			t.Fatalf("--pod shop/api showed %+v", d)
		}
		if d.Op == "connect" && d.Service == "default/web" {
			webConnects++
		}
	}
	if webConnects != 6 {
		t.Fatalf("--pod shop/api showed %d connects to web, want 6", webConnects)
	}
	svcLines := bySvc.stop(t)
	verdicts := map[string]int{}
	for _, d := range svcLines {
		if d.Service != "shop/db" {
			t.Fatalf("--service shop/db showed %+v", d)
		}
		if d.Op == "connect" {
			verdicts[d.Pod+" "+d.Verdict]++
		}
	}
	if want := map[string]int{"shop/api balanced": 2, "shop/frontend denied": 1}; !mapsEqual(verdicts, want) {
		t.Fatalf("--service shop/db connects %v, want %v", verdicts, want)
	}

	// status reports the ring among the features; a pod that does not exist is refused.
	st, err := agentStatus(w.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range st.Datapath.Features {
		if f.Name == "trace_ringbuf" && !f.Present {
			t.Fatalf("trace feature absent: %+v", f)
		}
	}
	out, err := exec.Command(podsockBin, "trace", "--config", w.cfgPath, "--pod", "shop/nope").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "no such pod") {
		t.Fatalf("trace of an unknown pod: %v: %s", err, out)
	}
}

package plugin

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/containerd/nri/pkg/adaptation"
	"github.com/containerd/nri/pkg/api"
	"github.com/sirupsen/logrus"

	"github.com/podsock/podsock/runtimehooks"
	"github.com/podsock/podsock/test/testenv"
)

// recorder is a Handler that writes down what the runtime told it.
type recorder struct {
	mu     sync.Mutex
	events []string
}

func (r *recorder) add(e string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, e)
}

func (r *recorder) has(e string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Contains(r.events, e)
}

func (r *recorder) count(e string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, x := range r.events {
		if x == e {
			n++
		}
	}
	return n
}

func (r *recorder) Synchronize(sbs []runtimehooks.Sandbox, _ []runtimehooks.ContainerInfo) {
	ids := ""
	for _, s := range sbs {
		ids += " " + s.ID
	}
	r.add("Synchronize" + ids)
}
func (r *recorder) RunPodSandbox(s runtimehooks.Sandbox)          { r.add("RunPodSandbox " + s.ID) }
func (r *recorder) StopPodSandbox(id string)                      { r.add("StopPodSandbox " + id) }
func (r *recorder) RemovePodSandbox(id string)                    { r.add("RemovePodSandbox " + id) }
func (r *recorder) ContainerCreated(c runtimehooks.ContainerInfo) { r.add("ContainerCreated " + c.ID) }
func (r *recorder) ContainerStarted(c runtimehooks.ContainerInfo) { r.add("ContainerStarted " + c.ID) }
func (r *recorder) StopContainer(c runtimehooks.ContainerInfo)    { r.add("StopContainer " + c.ID) }
func (r *recorder) RemoveContainer(c runtimehooks.ContainerInfo)  { r.add("RemoveContainer " + c.ID) }

// fakeRuntime is NRI's own runtime side, in this process on a private socket, with the
// pods it reports at each Synchronize.
func fakeRuntime(t *testing.T, socket string, pods ...string) *adaptation.Adaptation {
	t.Helper()
	return testenv.StartNRIRuntime(t, socket, func() ([]*api.PodSandbox, []*api.Container) {
		var sbs []*api.PodSandbox
		for _, id := range pods {
			sbs = append(sbs, &api.PodSandbox{Id: id, Name: id, Namespace: "default", Uid: "uid-" + id})
		}
		return sbs, nil
	})
}

// runtimeSocket stands for the runtime's NRI socket. It relays each connection to the
// current runtime, and restart cuts them all, as a runtime that dies does (stopping an
// adaptation leaves external plugins connected).
type runtimeSocket struct {
	ln     net.Listener
	mu     sync.Mutex
	target string
	conns  []net.Conn
}

func newRuntimeSocket(t *testing.T, path string) *runtimeSocket {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	s := &runtimeSocket{ln: ln}
	t.Cleanup(func() { ln.Close(); s.cut() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			up, err := net.Dial("unix", s.target)
			if err != nil {
				s.mu.Unlock()
				c.Close()
				continue
			}
			s.conns = append(s.conns, c, up)
			s.mu.Unlock()
			go func() { _, _ = io.Copy(up, c); up.Close() }()
			go func() { _, _ = io.Copy(c, up); c.Close() }()
		}
	}()
	return s
}

func (s *runtimeSocket) to(target string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.target = target
}

func (s *runtimeSocket) cut() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
	s.conns = nil
}

// socketDir is a private directory with a short path: a unix socket path has 108 bytes.
func socketDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nri-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// runPlugin runs a plugin on socket until the test ends, recording what it is told.
func runPlugin(t *testing.T, socket string) (*Plugin, *recorder) {
	t.Helper()
	log := logrus.New()
	log.SetOutput(io.Discard)
	rec := &recorder{}
	p := New(Options{Socket: socket, Name: "podsock", Index: "10", Log: log}, rec)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return p, rec
}

// plugin.Run against the real NRI runtime side, in process: it registers, gets the
// runtime's pods in Synchronize and its events, and when the runtime goes away and comes
// back (a containerd restart), it reconnects and is synchronized again.
func TestRunAgainstAnInProcessRuntime(t *testing.T) {
	dir := socketDir(t)
	socket := filepath.Join(dir, "nri.sock")
	relay := newRuntimeSocket(t, socket)
	first := filepath.Join(dir, "rt1.sock")
	rt := fakeRuntime(t, first, "sb-1")
	relay.to(first)
	p, rec := runPlugin(t, socket)
	ctx := context.Background()

	if !testenv.WaitFor(5*time.Second, func() bool { return p.Connected() && rec.has("Synchronize sb-1") }) {
		t.Fatalf("not registered and synchronized with the runtime; events %v", rec.events)
	}
	if err := rt.RunPodSandbox(ctx, &api.RunPodSandboxRequest{Pod: &api.PodSandbox{Id: "sb-2", Name: "sb-2", Namespace: "default"}}); err != nil {
		t.Fatal(err)
	}
	if !rec.has("RunPodSandbox sb-2") {
		t.Fatalf("RunPodSandbox not delivered before the runtime's call returned; events %v", rec.events)
	}

	// The runtime goes away, and a new one (a restarted containerd) knows two pods.
	rt.Stop()
	second := filepath.Join(dir, "rt2.sock")
	fakeRuntime(t, second, "sb-1", "sb-2")
	relay.to(second)
	relay.cut()
	if !testenv.WaitFor(10*time.Second, func() bool { return p.Connected() && rec.has("Synchronize sb-1 sb-2") }) {
		t.Fatalf("did not reconnect and resynchronize with the restarted runtime; events %v", rec.events)
	}
	if n := p.Reconnects(); n != 1 {
		t.Fatalf("%d reconnects, want 1", n)
	}
	if n := rec.count("Synchronize sb-1"); n != 1 {
		t.Fatalf("%d synchronizations with the first runtime, want 1", n)
	}
	if _, ok := p.Latency()["RunPodSandbox"]; !ok {
		t.Fatalf("no handler latency recorded for RunPodSandbox: %v", p.Latency())
	}
}

// A runtime that accepts the connection but never configures the plugin (hung, or dying
// half-way): the registration is abandoned after registerTimeout and tried again, and the
// plugin registers once a working runtime answers.
func TestRunAbandonsARegistrationTheRuntimeNeverConfigures(t *testing.T) {
	saved := registerTimeout
	registerTimeout = 300 * time.Millisecond
	defer func() { registerTimeout = saved }()
	dir := socketDir(t)
	socket := filepath.Join(dir, "nri.sock")
	relay := newRuntimeSocket(t, socket)
	// The hung runtime: it accepts and then says nothing.
	hung := filepath.Join(dir, "hung.sock")
	ln, err := net.Listen("unix", hung)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	relay.to(hung)

	p, rec := runPlugin(t, socket)
	// Two attempts on the hung runtime: the first was abandoned.
	for i := range 2 {
		select {
		case c := <-accepted:
			defer c.Close()
		case <-time.After(5 * time.Second):
			t.Fatalf("no registration attempt %d on the hung runtime", i+1)
		}
	}
	if p.Connected() {
		t.Fatal("connected to a runtime that never configured the plugin")
	}
	working := filepath.Join(dir, "rt.sock")
	fakeRuntime(t, working, "sb-1")
	relay.to(working)
	if !testenv.WaitFor(10*time.Second, func() bool { return p.Connected() && rec.has("Synchronize sb-1") }) {
		t.Fatalf("did not register with the working runtime after the hung one; events %v", rec.events)
	}
}

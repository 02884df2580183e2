package terminator

import (
	"errors"
	"io"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/test/testenv"
)

// fakeTerminator records the passes it is asked for and fails the first failFirst ones.
// Only the terminator's scheduling is under test here; the privileged tests run it
// against the kernel.
type fakeTerminator struct {
	mu        sync.Mutex
	failFirst int
	passes    []fakePass
}

type fakePass struct {
	at     time.Time
	gone   []datapath.RemovedBackend
	protos []uint8
	err    error
}

func (f *fakeTerminator) Terminate(_ datapath.NetnsSet, gone []datapath.RemovedBackend, opts datapath.TerminateOptions) (datapath.TerminateResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p := fakePass{at: time.Now(), gone: gone, protos: opts.Protocols}
	if len(f.passes) < f.failFirst {
		p.err = errors.New("netns 7: read iterator: injected failure")
	}
	f.passes = append(f.passes, p)
	// One socket per removed pair, in two netns.
	return datapath.TerminateResult{Backends: len(gone), Destroyed: len(gone), NetnsEntered: 2}, p.err
}

func (f *fakeTerminator) TerminateErr(uint8) error                  { return nil }
func (f *fakeTerminator) PruneSocketCounts(datapath.NetnsSet) error { return nil }
func (f *fakeTerminator) BackfillPending() bool                     { return false }
func (f *fakeTerminator) Backfill(datapath.NetnsSet) (int, error)   { return 0, nil }
func (f *fakeTerminator) count() int                                { f.mu.Lock(); defer f.mu.Unlock(); return len(f.passes) }
func (f *fakeTerminator) pass(i int) fakePass                       { f.mu.Lock(); defer f.mu.Unlock(); return f.passes[i] }

func quietLog() logrus.FieldLogger {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return l
}

var removedWeb = datapath.RemovedBackend{
	Service: "default/web", VIP: netip.MustParseAddrPort("10.96.0.20:80"), Proto: datapath.ProtoTCP,
	Backend: netip.MustParseAddrPort("10.88.0.5:8080"), ServiceID: 1, Revision: 2,
}

// A removal gets a pass at once and a late one before SPEC's 1 s is out; a failed pass is
// retried, and the late pass follows the retry that worked.
func TestTerminatorRetriesAndRunsALatePass(t *testing.T) {
	fake := &fakeTerminator{failFirst: 2}
	term := New(fake, nil, quietLog())
	defer term.Close()
	term.SetPodsKnown()
	start := time.Now()
	term.Remove([]datapath.RemovedBackend{removedWeb}, []uint8{datapath.ProtoTCP})
	if !testenv.WaitFor(2*time.Second, func() bool { return fake.count() == 4 }) {
		t.Fatalf("%d passes, want 2 failed, 1 that worked and 1 late", fake.count())
	}
	for i := range 4 {
		if p := fake.pass(i); len(p.gone) != 1 || p.gone[0] != removedWeb {
			t.Fatalf("pass %d terminated %v, want only %v", i, p.gone, removedWeb)
		}
	}
	worked, late := fake.pass(2), fake.pass(3)
	if gap := late.at.Sub(worked.at); gap < latePassDelay || gap > latePassDelay+200*time.Millisecond {
		t.Fatalf("late pass %v after the one that worked, want about %v", gap, latePassDelay)
	}
	if total := late.at.Sub(start); total > time.Second {
		t.Fatalf("late pass %v after the removal, past SPEC's 1 s", total)
	}
	time.Sleep(latePassDelay + 100*time.Millisecond)
	if n := fake.count(); n != 4 {
		t.Fatalf("%d passes, want no more after the late one", n)
	}
	st := term.Status()
	if st.Passes != 4 || st.Retries != 2 || st.LatePasses != 1 || st.GaveUp != 0 || st.LastError != "" {
		t.Fatalf("status %+v, want 4 passes, 2 retries, 1 late pass and no error", st)
	}
}

// A reload that removes many backends schedules as many late passes; once they ran, the
// terminator keeps nothing of them (it held megabytes at 100k services until the next).
func TestTerminatorLetsLatePassesGo(t *testing.T) {
	fake := &fakeTerminator{}
	term := New(fake, nil, quietLog())
	defer term.Close()
	term.SetPodsKnown()
	gone := make([]datapath.RemovedBackend, 10000)
	for i := range gone {
		gone[i] = removedWeb
		gone[i].Backend = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 88, byte(i >> 8), byte(i)}), 8080)
	}
	term.Remove(gone, []uint8{datapath.ProtoTCP})
	if !testenv.WaitFor(2*time.Second, func() bool { return fake.count() == 2 }) {
		t.Fatalf("%d passes, want a first and a late one", fake.count())
	}
	if late := fake.pass(1); len(late.gone) != len(gone) {
		t.Fatalf("late pass of %d removals, want %d", len(late.gone), len(gone))
	}
	term.mu.Lock()
	held := cap(term.scheduled)
	term.mu.Unlock()
	if held != 0 {
		t.Fatalf("after the late passes the terminator holds room for %d removals, want none", held)
	}
}

// A removal whose passes keep failing is given up after maxPassAttempts, and said so.
func TestTerminatorGivesUpAfterMaxAttempts(t *testing.T) {
	fake := &fakeTerminator{failFirst: 1000}
	term := New(fake, nil, quietLog())
	defer term.Close()
	term.SetPodsKnown()
	term.Remove([]datapath.RemovedBackend{removedWeb}, []uint8{datapath.ProtoTCP})
	if !testenv.WaitFor(10*time.Second, func() bool { return term.Status().GaveUp == 1 }) {
		t.Fatalf("status %+v after %d passes, want the removal given up", term.Status(), fake.count())
	}
	time.Sleep(3 * retryBackoff)
	if n := fake.count(); n != maxPassAttempts {
		t.Fatalf("%d passes, want exactly %d", n, maxPassAttempts)
	}
	if st := term.Status(); st.LastError == "" || st.LatePasses != 0 {
		t.Fatalf("status %+v, want the last error shown and no late pass", st)
	}
}

// Removals wait for the runtime's pods, then pass.
func TestTerminatorWaitsForPods(t *testing.T) {
	fake := &fakeTerminator{}
	term := New(fake, nil, quietLog())
	defer term.Close()
	term.Remove([]datapath.RemovedBackend{removedWeb}, []uint8{datapath.ProtoTCP})
	time.Sleep(50 * time.Millisecond)
	if n := fake.count(); n != 0 {
		t.Fatalf("%d passes before the pods were known", n)
	}
	term.SetPodsKnown()
	if !testenv.WaitFor(time.Second, func() bool { return fake.count() == 1 }) {
		t.Fatal("no pass once the pods were known")
	}
}

// A pass that removes TCP and UDP pairs runs one walk per protocol, each asked for its
// own protocol only, so the sockets each destroyed are known per protocol; status still
// counts it as one pass, and netns entered as the larger walk's.
func TestTerminatorSplitsAMixedPassByProtocol(t *testing.T) {
	fake := &fakeTerminator{}
	term := New(fake, nil, quietLog())
	defer term.Close()
	var mu sync.Mutex
	seen := map[uint8]int{}
	passes := 0
	term.Observe(func(destroyed map[uint8]int, d time.Duration) {
		mu.Lock()
		defer mu.Unlock()
		passes++
		for p, n := range destroyed {
			seen[p] += n
		}
	})
	term.SetPodsKnown()
	dns := datapath.RemovedBackend{Service: "kube-system/dns", VIP: netip.MustParseAddrPort("10.96.0.10:53"), Proto: datapath.ProtoUDP,
		Backend: netip.MustParseAddrPort("10.88.0.9:53"), ServiceID: 2, Revision: 2}
	web2 := removedWeb
	web2.Backend = netip.MustParseAddrPort("10.88.0.6:8080")
	term.Remove([]datapath.RemovedBackend{removedWeb, dns, web2}, []uint8{datapath.ProtoTCP, datapath.ProtoUDP})
	if !testenv.WaitFor(2*time.Second, func() bool { return term.Status().Passes == 2 }) {
		t.Fatalf("status %+v, want a first and a late pass", term.Status())
	}
	if fake.count() != 4 {
		t.Fatalf("%d walks, want 2 per pass (tcp, udp)", fake.count())
	}
	for i, want := range []struct {
		proto uint8
		n     int
	}{{datapath.ProtoTCP, 2}, {datapath.ProtoUDP, 1}} {
		p := fake.pass(i)
		if len(p.protos) != 1 || p.protos[0] != want.proto || len(p.gone) != want.n {
			t.Fatalf("walk %d: protocols %v, %d pairs; want only %d with %d", i, p.protos, len(p.gone), want.proto, want.n)
		}
		for _, g := range p.gone {
			if g.Proto != want.proto {
				t.Fatalf("walk %d for protocol %d got %v", i, want.proto, g)
			}
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if passes != 2 || seen[datapath.ProtoTCP] != 4 || seen[datapath.ProtoUDP] != 2 {
		t.Fatalf("observed %d passes, destroyed %v; want 2 passes, tcp 4 and udp 2", passes, seen)
	}
	if st := term.Status(); st.Destroyed != 6 || st.NetnsEntered != 4 {
		t.Fatalf("status destroyed %d netns entered %d, want 6 and 2 per pass", st.Destroyed, st.NetnsEntered)
	}
}

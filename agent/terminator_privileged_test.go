package agent

import (
	"errors"
	"net/netip"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/internal/terminator"
	"github.com/podsock/podsock/test/testenv"
)

// loadDatapath loads a real datapath on the test's cgroup, and removes it at cleanup.
func loadDatapath(t testing.TB, cg *testenv.Cgroup, bpffs string) *datapath.Datapath {
	return loadDatapathWith(t, cg, bpffs, datapath.Limits{})
}

func loadDatapathWith(t testing.TB, cg *testenv.Cgroup, bpffs string, limits datapath.Limits) *datapath.Datapath {
	t.Helper()
	dp, err := datapath.Load(datapath.Options{CgroupRoot: cg.Path, BPFFS: bpffs, Limits: limits, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		dp.Close()
		if err := datapath.Cleanup(bpffs); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return dp
}

// failOnce is a NetnsSet whose first Enter fails as a walk that broke off would.
type failOnce struct {
	*testenv.NetnsSet
	failed atomic.Bool
}

func (f *failOnce) Enter(cookie uint64, fn func() error) error {
	if f.failed.CompareAndSwap(false, true) {
		return errors.New("read iterator: injected failure")
	}
	return f.NetnsSet.Enter(cookie, fn)
}

// On the real kernel: a pass that fails is retried and ends the removed backend's socket,
// and the late pass ends a socket that the first passes could not see (balanced before
// the Apply, but not yet counted when they ran), all within SPEC's 1 s.
func TestPrivilegedTerminatorRetriesAndLatePass(t *testing.T) {
	testenv.RequirePrivileged(t)
	vip := netip.MustParseAddrPort("10.96.0.20:80")
	beA, beB := netip.MustParseAddrPort("10.88.0.5:8080"), netip.MustParseAddrPort("10.88.0.6:8080")
	cg := testenv.NewCgroup(t)
	clientNetns := func() *testenv.Netns {
		ns := testenv.NewNetns(t, []string{"10.96.0.0/12"}, "10.88.0.5/32", "10.88.0.6/32")
		testenv.StartTCPBackend(t, ns, "A", beA)
		testenv.StartTCPBackend(t, ns, "B", beB)
		return ns
	}
	ns1, ns2 := clientNetns(), clientNetns()
	bpffs := testenv.BPFFS(t)
	cg.EnterSelf(t)
	dp := loadDatapath(t, cg, bpffs)
	if err := dp.TerminateErr(datapath.ProtoTCP); err != nil {
		testenv.SkipOrFail(t, err.Error())
	}
	web := func(backends ...netip.AddrPort) []datapath.Service {
		s := datapath.Service{Name: "default/web", VIP: vip.Addr(), Port: vip.Port(), Proto: datapath.ProtoTCP}
		for _, b := range backends {
			s.Backends = append(s.Backends, datapath.Backend{Addr: b, Weight: 1})
		}
		return []datapath.Service{s}
	}
	if _, err := dp.Apply(web(beA)); err != nil {
		t.Fatal(err)
	}
	dial := func(ns *testenv.Netns) int {
		t.Helper()
		r, err := testenv.DialTCP(ns, 0, vip, true)
		if err != nil || r.Backend != "A" || r.Peer != vip {
			t.Fatalf("dial %s: %+v %v, want backend A behind the VIP", vip, r, err)
		}
		t.Cleanup(func() { unix.Close(r.FD) })
		return r.FD
	}
	counted := dial(ns1)
	counts, err := ebpf.LoadPinnedMap(filepath.Join(bpffs, datapath.PinDirName, "podsock_svcnetns_v2"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer counts.Close()
	before := map[string]bool{}
	var key []byte
	var n [16]int64
	for it := counts.Iterate(); it.Next(&key, &n); {
		before[string(key)] = true
	}
	unseen := dial(ns2)
	// unseen's connect() has chosen A, but its count is not taken yet: take it back out
	// of the count map, as if the first passes ran in that instant.
	var unseenKey []byte
	var unseenCounts [16]int64
	for it := counts.Iterate(); it.Next(&key, &n); {
		if !before[string(key)] {
			unseenKey, unseenCounts = append([]byte{}, key...), n
		}
	}
	if len(before) != 1 || unseenKey == nil {
		t.Fatalf("socket counts: %d entries before the second netns dialled, want 1, and one more after", len(before))
	}
	if err := counts.Update(unseenKey, [16]int64{}, ebpf.UpdateExist); err != nil {
		t.Fatal(err)
	}

	set := &failOnce{NetnsSet: testenv.NewNetnsSet(t, datapath.ErrUnknownNetns, ns1, ns2)}
	term := terminator.New(dp, set, quietLog())
	defer term.Close()
	term.SetPodsKnown()
	res, err := dp.Apply(web(beB))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	term.Remove(res.RemovedBackends, []uint8{datapath.ProtoTCP, datapath.ProtoUDP})

	if !testenv.WaitFor(time.Second, func() bool { return term.Status().Passes >= 2 }) {
		t.Fatalf("status %+v, want a failed pass and its retry", term.Status())
	}
	if err := readAborted(counted); err != nil {
		t.Fatalf("counted socket after the retry: %v", err)
	}
	if err := stillOpen(unseen); err != nil {
		t.Fatalf("the uncounted socket was found before the late pass: %v", err)
	}
	// Now the connect() finishes counting.
	if err := counts.Update(unseenKey, unseenCounts, ebpf.UpdateExist); err != nil {
		t.Fatal(err)
	}
	if !testenv.WaitFor(time.Second, func() bool { return term.Status().LatePasses == 1 }) {
		t.Fatalf("status %+v, want a late pass", term.Status())
	}
	if err := readAborted(unseen); err != nil {
		t.Fatalf("socket the first passes could not see, after the late pass: %v", err)
	}
	if took := time.Since(start); took > time.Second {
		t.Fatalf("the late pass ended the socket %v after the removal, past SPEC's 1 s", took)
	}
	st := term.Status()
	if st.Retries != 1 || st.Destroyed != 2 || st.LateDestroyed != 1 || st.LastError != "" {
		t.Fatalf("status %+v, want 1 retry, 2 destroyed (1 by the late pass)", st)
	}
	t.Logf("retry and late pass ended both sockets %v after the removal", time.Since(start).Round(time.Millisecond))
}

func readAborted(fd int) error {
	_, err := unix.Read(fd, make([]byte, 64))
	if errors.Is(err, unix.ECONNABORTED) {
		return nil
	}
	return errors.New("read did not fail with ECONNABORTED: " + errString(err))
}

func stillOpen(fd int) error {
	soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return err
	}
	if soErr != 0 {
		return unix.Errno(soErr)
	}
	return nil
}

func errString(err error) string {
	if err == nil {
		return "no error"
	}
	return err.Error()
}

package agent

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"

	"github.com/podsock/podsock/datapath"
)

// A reload that drops many backends names the first ones and counts the rest, instead
// of writing a line per backend at info level.
func TestRemovedBackendsLogOnlyTheFirstAtInfo(t *testing.T) {
	log, hook := test.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	var gone []datapath.RemovedBackend
	for i := range removedLogLimit + 5 {
		gone = append(gone, datapath.RemovedBackend{
			Service: fmt.Sprintf("default/svc-%d", i),
			VIP:     netip.MustParseAddrPort("10.96.0.1:80"),
			Backend: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 88, 0, byte(i)}), 8080),
		})
	}
	logRemovedBackends(log, gone)
	info, debug := 0, 0
	for _, e := range hook.AllEntries() {
		switch e.Level {
		case logrus.InfoLevel:
			info++
		case logrus.DebugLevel:
			debug++
		}
	}
	if info != removedLogLimit+1 || debug != 5 {
		t.Fatalf("%d info and %d debug lines for %d removed backends, want %d info (the first %d and a count) and 5 debug",
			info, debug, len(gone), removedLogLimit+1, removedLogLimit)
	}
	if last := hook.LastEntry(); last.Message != "5 more backends removed (each logged at debug level)" {
		t.Fatalf("last line %q, want the count of the rest", last.Message)
	}

	hook.Reset()
	logRemovedBackends(log, gone[:3])
	if n := len(hook.AllEntries()); n != 3 {
		t.Fatalf("%d lines for 3 removed backends, want one each", n)
	}
}

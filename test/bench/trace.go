package main

import (
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/test/testenv"
)

// traceCost measures what tracing and the per-service counters cost a connect: one
// datapath with neither (the settings bit tested and clear), one with a tracer attached
// whose decisions are read and dropped, one with the counters on. Sibling cgroups, so each
// connect runs one datapath's programs; interleaved op by op, and bpf_stats gives each
// connect4 program's own run time.
func (e *env) traceCost() {
	ns := testenv.NewNetns(e, []string{vipRange}, "10.88.0.5/32")
	startAcceptor(e, ns, backendTCP)
	cgOff, cgTraced, cgCounted := testenv.NewCgroup(e), testenv.NewCgroup(e), testenv.NewCgroup(e)
	home, err := testenv.HomeCgroup()
	if err != nil {
		e.Fatal(err)
	}
	e.Cleanup(func() { enter(home) })
	dps := map[string]*datapath.Datapath{}
	for name, cg := range map[string]*testenv.Cgroup{"off": cgOff, "traced": cgTraced, "counted": cgCounted} {
		dps[name] = e.datapath(cg, 1)
		apply(dps[name], services(1, backendTCP))
	}
	if err := dps["counted"].SetServiceCounters(true); err != nil {
		e.Fatal(err)
	}
	tr, err := dps["traced"].Trace(datapath.TraceFilter{})
	if err != nil {
		e.Fatalf("attach a tracer: %v", err)
	}
	traced := 0
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		for range tr.Decisions() {
			traced++
		}
	}()
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		e.Fatalf("enable BPF run-time stats: %v", err)
	}
	before := map[string]datapath.ProgramCost{}
	for name, dp := range dps {
		c, err := dp.ProgramCosts()
		if err != nil {
			e.Fatal(err)
		}
		before[name] = c["connect4"]
	}
	fmt.Printf("trace: %d rounds of %d connects per case, alternating op by op...\n\n", *rounds, *perRound)
	res := interleave(*rounds, *perRound, []benchCase{
		{name: "off", cg: cgOff, ns: ns, addr: vip(0)},
		{name: "traced", cg: cgTraced, ns: ns, addr: vip(0)},
		{name: "counted", cg: cgCounted, ns: ns, addr: vip(0)},
	})
	enter(home)
	per := map[string]time.Duration{}
	for name, dp := range dps {
		c, err := dp.ProgramCosts()
		if err != nil {
			e.Fatal(err)
		}
		runs := c["connect4"].Runs - before[name].Runs
		if runs > 0 {
			per[name] = (c["connect4"].Runtime - before[name].Runtime) / time.Duration(runs)
		}
	}
	stats.Close()
	lost, err := tr.Lost()
	if err != nil {
		e.Fatal(err)
	}
	if err := tr.Close(); err != nil {
		e.Fatal(err)
	}
	<-drained

	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "case\tconnect\tratio to off\tconnect4 program (bpf_stats)\t")
	for _, name := range []string{"off", "traced", "counted"} {
		fmt.Fprintf(w, "%s\t%v\t%.3fx\t%v\t\n", name, median(res[name]), res.ratio(name, "off"), per[name])
	}
	w.Flush()
	fmt.Printf("tracer read %d decisions, lost %d\n", traced, lost)
	fmt.Println("(off: no tracer, counters off, which costs the test of a settings bit; traced: a tracer attached; counted: [metrics] per_service)")
}

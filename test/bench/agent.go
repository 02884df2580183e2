package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/test/testenv"
)

var (
	agentSizes        = flag.String("agent-services", "10000,100000", "service counts of the agent apply bench, comma-separated")
	agentRounds       = flag.Int("agent-rounds", 3, "agent apply rounds per size; each starts the old release and this build, in alternating order")
	agentScrapeRounds = flag.Int("agent-scrape-rounds", 3, "rounds per size of this build alone, untimed, that scrape /metrics every 20 ms during the reload changing every backend")
	agentOld          = flag.String("agent-old", "359d23c", `commit of the release the agent apply bench compares against ("" = none)`)
	agentOldCurrent   = flag.Bool("agent-old-current", false, "the -agent-old commit is of this build's era: give it the same config, [limits] and [metrics] included (359d23c knows neither)")
	agentLog          = flag.String("agent-log-level", "warn", "log_level of the agents of the agent apply bench")
	agentPods         = flag.Int("agent-pods", 1000, "pods the runtime reports over NRI in rounds of their own at 10000 services, for P8's RSS (0 = none)")
	agentProf         = flag.String("agent-profile", "", "directory for CPU (start until idle after the reloads) and heap profiles of this build's agent")
)

// agentRun is what one agent start measured.
type agentRun struct {
	ready, fullReload, oneReload time.Duration
	rss, hwm                     int64
	memoryBytes                  uint64 // kernel memory of the maps, from status (this build only)
	scrapes                      []time.Duration
}

// printAgent measures the real agent against the old release, both from the file source:
// how long until a large config is served, a reload changing every backend, a reload
// changing one service, and memory. The two alternate round by round, so the VM's drift
// lands on both.
func (e *env) printAgent() {
	fmt.Println()
	var oldBin string
	if *agentOld != "" {
		oldBin = e.buildRelease(*agentOld)
	}
	var sizes []int
	for _, s := range strings.Split(*agentSizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 2 {
			e.Fatalf("-agent-services %q: want counts of at least 2", *agentSizes)
		}
		sizes = append(sizes, n)
	}
	fmt.Printf("agent from the file source (NRI off, so no pods, except where pods are named), %d rounds per size, this build and %s alternating...\n", *agentRounds, orNone(*agentOld))
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "case\tpodsock\told\tratio\ttarget\t")
	// The maps' buckets alone, before any service: what a node pays for podsock at idle.
	idle := e.agentApply(*podsockBin, 0, true, false, nil).memoryBytes
	fmt.Fprintf(w, "kernel memory of all maps (status), default [limits], no services\t%.1f MiB%s\t-\t\t<= 16 MiB (P8)\t\n",
		float64(idle)/(1<<20), verdict(idle <= 16<<20, 16))
	var notes []string
	for _, n := range sizes {
		var cur, old []agentRun
		for r := range *agentRounds {
			first, second := func() { cur = append(cur, e.agentApply(*podsockBin, n, true, false, nil)) }, func() {}
			if oldBin != "" {
				second = func() { old = append(old, e.agentApply(oldBin, n, false, false, nil)) }
				if r%2 == 1 {
					first, second = second, first
				}
			}
			first()
			second()
		}
		// Scrapes cost the agent CPU: they run in rounds of their own, which time nothing.
		var scrapeMax []time.Duration
		var scrapes []time.Duration
		for range *agentScrapeRounds {
			s := e.agentApply(*podsockBin, n, true, true, nil).scrapes
			if len(s) > 0 {
				scrapeMax = append(scrapeMax, slices.Max(s))
				scrapes = append(scrapes, s...)
			}
		}
		med := func(rs []agentRun, f func(agentRun) time.Duration) time.Duration {
			var d []time.Duration
			for _, r := range rs {
				d = append(d, f(r))
			}
			return median(d)
		}
		medMem := func(rs []agentRun, f func(agentRun) int64) int64 {
			var m []int64
			for _, r := range rs {
				m = append(m, f(r))
			}
			slices.Sort(m)
			return m[len(m)/2]
		}
		ready := func(r agentRun) time.Duration { return r.ready }
		full := func(r agentRun) time.Duration { return r.fullReload }
		one := func(r agentRun) time.Duration { return r.oneReload }
		rss := func(r agentRun) int64 { return r.rss }
		hwm := func(r agentRun) int64 { return r.hwm }
		timeRow := func(name string, f func(agentRun) time.Duration, maxRatio float64, target string) {
			c := med(cur, f)
			if len(old) == 0 {
				fmt.Fprintf(w, "%s\t%v\t-\t-\t%s\t\n", name, c.Round(time.Millisecond), target)
				return
			}
			// Per-round pairs: round r of each binary ran back to back.
			var ratios []float64
			for i := range min(len(cur), len(old)) {
				ratios = append(ratios, float64(f(cur[i]))/float64(f(old[i])))
			}
			ratio := medianRatio(ratios)
			fmt.Fprintf(w, "%s\t%v\t%v\t%.3fx%s\t%s\t\n", name, c.Round(time.Millisecond), med(old, f).Round(time.Millisecond), ratio, verdict(maxRatio == 0 || ratio <= maxRatio, maxRatio), target)
		}
		memRow := func(name string, f func(agentRun) int64, maxMiB int64, target string) {
			c := medMem(cur, f)
			o := "-"
			if len(old) > 0 {
				o = fmt.Sprintf("%d MiB", medMem(old, f)>>20)
			}
			fmt.Fprintf(w, "%s\t%d MiB%s\t%s\t\t%s\t\n", name, c>>20, verdict(maxMiB == 0 || c < maxMiB<<20, float64(maxMiB)), o, target)
		}
		switch {
		case n >= 100000:
			timeRow(fmt.Sprintf("ready from start, %d services", n), ready, 1.0/3, "<= 0.333x (P9)")
		case n == 10000:
			timeRow(fmt.Sprintf("ready from start, %d services", n), ready, 0.5, "<= 0.5x (P8)")
		default:
			timeRow(fmt.Sprintf("ready from start, %d services", n), ready, 0, "(info)")
		}
		timeRow(fmt.Sprintf("reload changing every backend, %d services", n), full, 0, "(info)")
		timeRow(fmt.Sprintf("reload changing 1 service of %d", n), one, 0, "(info)")
		// The one-service reload against this build's own full reload, round by round.
		var oneToFull []float64
		for _, r := range cur {
			oneToFull = append(oneToFull, float64(r.oneReload)/float64(r.fullReload))
		}
		target, maxRatio := "(info)", 0.0
		if n >= 100000 {
			target, maxRatio = "<= 0.1x (P9)", 0.1
		}
		ratio := medianRatio(oneToFull)
		fmt.Fprintf(w, "reload of 1 service vs every backend, %d services, podsock\t%v\t%v\t%.3fx%s\t%s\t\n", n,
			med(cur, one).Round(time.Millisecond), med(cur, full).Round(time.Millisecond), ratio, verdict(maxRatio == 0 || ratio <= maxRatio, maxRatio), target)
		if n == 10000 {
			memRow(fmt.Sprintf("agent RSS after the reloads, %d services", n), rss, 0, "(info, no pods)")
			if *agentPods > 0 {
				// This build alone: the old release's NRI plugin is not what P8 measures.
				pods := newBenchPods(e, *agentPods)
				var withPods []agentRun
				for range *agentRounds {
					withPods = append(withPods, e.agentApply(*podsockBin, n, true, false, pods))
				}
				c := medMem(withPods, rss)
				fmt.Fprintf(w, "agent RSS after the reloads, %d services, %d pods over NRI\t%d MiB%s\t-\t\t< 40 MiB (P8)\t\n",
					n, *agentPods, c>>20, verdict(c < 40<<20, 40))
			}
		} else {
			memRow(fmt.Sprintf("agent RSS after the reloads, %d services", n), rss, 0, "(info)")
		}
		if n >= 100000 {
			memRow(fmt.Sprintf("agent peak RSS (VmHWM), %d services", n), hwm, 120, "<= 120 MiB (P9)")
		} else {
			memRow(fmt.Sprintf("agent peak RSS (VmHWM), %d services", n), hwm, 0, "(info)")
		}
		if l := limitsFor(n); l.Services == 32768 && l.Slots == 262144 {
			m := cur[0].memoryBytes
			fmt.Fprintf(w, "kernel memory of all maps (status), default [limits], %d services\t%.1f MiB\t-\t\t(info)\t\n", n,
				float64(m)/(1<<20))
		}
		if s := scrapes; len(s) > 0 {
			slices.Sort(s)
			worst := s[len(s)-1]
			var perRound []string
			for _, m := range scrapeMax {
				perRound = append(perRound, m.Round(100*time.Microsecond).String())
			}
			notes = append(notes, fmt.Sprintf("/metrics scrape during the reload changing every backend of %d services, %d rounds of their own (%d scrapes): p50 %v, max %v (per round %s) (target <= 100ms: %s)",
				n, len(scrapeMax), len(s), s[len(s)/2].Round(10*time.Microsecond), worst.Round(10*time.Microsecond), strings.Join(perRound, ", "),
				strings.TrimSpace(strings.Trim(verdict(worst <= 100*time.Millisecond, 1), " ()"))))
		}
	}
	w.Flush()
	for _, n := range notes {
		fmt.Println(n)
	}
	fmt.Println("(times: median over the rounds; ratio: median of per-round ratios; RSS: VmRSS after the reloads, medians)")
	if *agentPods > 0 {
		fmt.Printf("(pods: %d netns and pod and container cgroups the bench creates, reported by NRI's own runtime side in the bench; the agent resolves their IDs and cookies from the kernel)\n", *agentPods)
	}
}

func orNone(s string) string {
	if s == "" {
		return "no old release"
	}
	return s
}

func verdict(ok bool, target float64) string {
	if target == 0 {
		return ""
	}
	if ok {
		return " (met)"
	}
	return " (missed)"
}

// agentApply starts bin with an n-service config and measures how long until it serves
// all of them, a reload that changes every backend, one that changes one service, and its
// memory. current says bin is this build: it gets [limits] and [metrics], which the old
// release does not know; scrape also scrapes /metrics during the full reload.
func (e *env) agentApply(bin string, n int, current, scrape bool, pods *benchPods) agentRun {
	var run agentRun
	metricsAddr := freeLoopbackAddr(e)
	bpffs := testenv.BPFFS(e)
	dir := e.tempDir("podsock-bench-")
	cfgPath := filepath.Join(dir, "podsock.toml")
	nri := "[nri]\nenabled = false\n"
	var cg *testenv.Cgroup
	if pods != nil {
		// The runtime reports the pods over NRI, from below the agent's cgroup root.
		socket := filepath.Join(dir, "nri.sock")
		stop := pods.runtime(e, socket)
		defer stop()
		cg, nri = pods.root, fmt.Sprintf("[nri]\nenabled = true\nsocket = %q\n", socket)
	} else {
		cg = testenv.NewCgroup(e)
	}
	write := func(port, firstPort int) {
		var b strings.Builder
		fmt.Fprintf(&b, "[agent]\ncgroup_root = %q\nbpffs = %q\nstate_dir = %q\nlog_level = %q\n%s",
			cg.Path, bpffs, filepath.Join(dir, "state"), *agentLog, nri)
		if current || *agentOldCurrent {
			l := limitsFor(n)
			fmt.Fprintf(&b, "[metrics]\nlisten = %q\n[limits]\nservices = %d\nslots = %d\n", metricsAddr, l.Services, l.Slots)
		}
		for i := range n {
			v, p := vip(i), port
			if i == 0 {
				p = firstPort
			}
			fmt.Fprintf(&b, "[[service]]\nname = \"bench/svc-%d\"\nvip = \"%s\"\nport = %d\nbackends = [\"10.88.0.5:%d\"]\n", i, v.Addr(), v.Port(), p)
		}
		if err := os.WriteFile(cfgPath, []byte(b.String()), 0o644); err != nil {
			e.Fatal(err)
		}
	}
	write(8080, 8080)
	var env []string
	if current && *agentProf != "" {
		env = []string{"PODSOCK_CPU_PROFILE=" + filepath.Join(*agentProf, fmt.Sprintf("cpu-%d.pprof", n)),
			"PODSOCK_HEAP_PROFILE=" + filepath.Join(*agentProf, fmt.Sprintf("heap-%d.pprof", n))}
	}
	start := time.Now()
	cmd := e.runAgentBin(bin, cfgPath, env)
	// Each poll asks the agent's control socket, as `podsock status` does, but without a
	// CLI process that reads the whole config file first (a quarter of a second of CPU
	// at 100k services, taken from the agent it times). Polled every 10 ms, even that took
	// a CPU of this 2-vCPU VM; the interval grows with the wait instead, so it stays within
	// 5% of what it measures.
	control := api.NewClient(filepath.Join(dir, "state"))
	waitGeneration := func(gen uint64, since time.Time) {
		for deadline := time.Now().Add(120 * time.Second); time.Now().Before(deadline); {
			st, err := control.Status()
			if err == nil && st.Services == n && st.ConfigGeneration == gen && (pods == nil || st.Pods == len(pods.sandbox)) {
				run.memoryBytes = st.Datapath.MemoryBytes
				return
			}
			if exited(cmd) {
				e.Fatalf("agent %s exited before config generation %d (its last words are above)", bin, gen)
			}
			time.Sleep(max(10*time.Millisecond, time.Since(since)/20))
		}
		e.Fatalf("agent %s did not reach config generation %d", bin, gen)
	}
	waitGeneration(1, start)
	run.ready = time.Since(start)

	var latePasses uint64
	if st, err := control.Status(); err == nil {
		latePasses = st.Termination.LatePasses
	}
	write(8081, 8081)
	stop := make(chan struct{})
	scraped := make(chan []time.Duration, 1)
	if scrape && current {
		go func() { scraped <- scrapeUntil("http://"+metricsAddr+"/metrics", stop) }()
	} else {
		scraped <- nil
	}
	start = time.Now()
	cmd.Process.Signal(unix.SIGHUP)
	waitGeneration(2, start)
	run.fullReload = time.Since(start)
	close(stop)
	run.scrapes = <-scraped

	// The full reload's backends are terminated in the background, a first pass at once
	// and a late one after (SPEC: within 1 s), and their garbage handed back: the
	// one-service reload waits for that, so that it times itself alone, on an agent as idle
	// as the full reload found. An old release that does not show its late passes gets 1.5 s.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		st, err := control.Status()
		if !current && !*agentOldCurrent {
			time.Sleep(1500 * time.Millisecond)
			break
		}
		if err == nil && st.Termination.LatePasses > latePasses || time.Now().After(deadline) {
			time.Sleep(250 * time.Millisecond) // the late pass's garbage returned
			break
		}
	}
	write(8081, 8082)
	start = time.Now()
	cmd.Process.Signal(unix.SIGHUP)
	waitGeneration(3, start)
	run.oneReload = time.Since(start)
	run.rss, run.hwm = settledMem(cmd.Process.Pid)
	if len(env) > 0 {
		cmd.Process.Signal(unix.SIGUSR1)
		prof := filepath.Join(*agentProf, fmt.Sprintf("heap-%d.pprof", n))
		testenv.WaitFor(10*time.Second, func() bool { _, err := os.Stat(prof); return err == nil })
	}
	e.stopAgent(cmd, bin, cfgPath)
	return run
}

// settledMem is procMem once RSS stops falling: an agent hands a config's garbage back
// to the kernel just after the config is in force, which status already shows.
func settledMem(pid int) (rss, hwm int64) {
	rss, hwm = procMem(pid)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		time.Sleep(250 * time.Millisecond)
		next, nextHWM := procMem(pid)
		if next >= rss {
			return rss, nextHWM
		}
		rss, hwm = next, nextHWM
	}
	return rss, hwm
}

// runAgentBin starts `bin run --config cfgPath` with env added, its output to stderr.
func (e *env) runAgentBin(bin, cfgPath string, env []string) *exec.Cmd {
	cmd := exec.Command(bin, "run", "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Start(); err != nil {
		e.Fatal(err)
	}
	e.Cleanup(func() { e.stopAgent(cmd, bin, cfgPath) })
	return cmd
}

// exited says the agent's process has ended (a zombie until stopAgent reaps it).
func exited(cmd *exec.Cmd) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", cmd.Process.Pid))
	if err != nil {
		return true
	}
	// The state follows the command, which is in parentheses and may hold spaces.
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) {
		return stat[i+2] == 'Z' || stat[i+2] == 'X'
	}
	return false
}

// stopAgent stops the agent and removes what it pinned, at once rather than at exit: the
// next round must not share the VM with an idle agent's maps. Twice is harmless.
func (e *env) stopAgent(cmd *exec.Cmd, bin, cfgPath string) {
	if cmd.ProcessState != nil {
		return
	}
	cmd.Process.Signal(unix.SIGTERM)
	cmd.Wait()
	exec.Command(bin, "cleanup", "--config", cfgPath).Run()
}

// buildRelease builds the podsock binary of a commit of this repository from its own
// sources (git archive), against the module cache, as the upgrade e2e test does.
func (e *env) buildRelease(commit string) string {
	dir := e.tempDir("podsock-release-")
	src := filepath.Join(dir, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		e.Fatal(err)
	}
	archive := exec.Command("bash", "-c", `set -o pipefail; git archive --format=tar "$1" | tar -x -C "$2"`, "bash", commit, src)
	if out, err := archive.CombinedOutput(); err != nil {
		e.Fatalf("git archive %s: %v: %s", commit, err, out)
	}
	bin := filepath.Join(dir, "podsock-"+commit)
	build := exec.Command("go", "build", "-o", bin, "./cmd/podsock")
	build.Dir = src
	if out, err := build.CombinedOutput(); err != nil {
		e.Fatalf("build release %s: %v: %s", commit, err, out)
	}
	return bin
}

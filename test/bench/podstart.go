package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/test/cri"
	"github.com/podsock/podsock/test/testenv"
)

// podStartResult is the pod start comparison: the same pod started on a runtime with
// podsock registered as its NRI plugin and on an identical runtime without it.
type podStartResult struct {
	with, without []time.Duration // runp + create + start, one per round
	ratios        []float64       // per round, with/without
	latency       map[string]api.LatencySummary
}

// podStart runs rounds of "start a pod and its container" on two private runtimes of one
// kind, one with podsock attached over NRI and one without, alternating which goes first,
// and removes the pods as it goes.
func (e *env) podStart(kind cri.Kind, rounds int) podStartResult {
	withRT := cri.Start(e, cri.Options{Runtime: kind})
	withoutRT := cri.Start(e, cri.Options{Runtime: kind})
	cfgPath := e.podsockFor(withRT)

	start := func(rt *cri.Runtime, i int) time.Duration {
		p := rt.RunPod(e, cri.PodSpec{Name: fmt.Sprintf("bench-%d", i), Labels: map[string]string{"app": "bench"}})
		c := rt.StartContainer(e, p, "main", "pause")
		rt.RemovePod(e, p)
		return p.RunDuration + c.StartDuration
	}
	// A warm-up pod on each: the first pod pays for image unpacking and cold caches.
	start(withRT, -1)
	start(withoutRT, -1)
	var res podStartResult
	for i := range rounds {
		var w, wo time.Duration
		if i%2 == 0 {
			w, wo = start(withRT, i), start(withoutRT, i)
		} else {
			wo, w = start(withoutRT, i), start(withRT, i)
		}
		res.with = append(res.with, w)
		res.without = append(res.without, wo)
		res.ratios = append(res.ratios, float64(w)/float64(wo))
	}
	st, err := podsockStatus(cfgPath)
	if err != nil {
		e.Fatal(err)
	}
	res.latency = st.NRI.HandlerLatency
	return res
}

// podsockFor starts the real agent as an external NRI plugin of rt, attached to rt's pod
// cgroup parent with one service, and returns its config path.
func (e *env) podsockFor(rt *cri.Runtime) string {
	root := e.runtimeCgroupRoot(rt)
	dir := e.tempDir("podsock-bench-nri-")
	cfgPath := filepath.Join(dir, "podsock.toml")
	cfg := fmt.Sprintf(`[agent]
cgroup_root = %q
bpffs = %q
state_dir = %q
log_level = "warn"
[nri]
socket = %q
[[service]]
name = "bench/web"
vip = "10.96.0.20"
port = 80
backends = ["10.88.0.5:8080"]
[[service]]
name = "bench/db"
vip = "10.96.0.30"
port = 5432
backends = ["10.88.0.6:5432"]
[[service.allow]]
labels = { app = "bench" }
`, root, testenv.BPFFS(e), filepath.Join(dir, "state"), rt.NRISocket())
	// A node's worth of other services, one in ten with an allow-list: a pod event must cost
	// what the pod touches, not the number of services.
	var extra strings.Builder
	for i := range *podServices {
		v := vip(1000 + i)
		fmt.Fprintf(&extra, "[[service]]\nname = \"bench/svc-%d\"\nvip = \"%s\"\nport = 80\nbackends = [\"10.88.0.5:8080\"]\n", i, v.Addr())
		if i%10 == 0 {
			fmt.Fprintf(&extra, "[[service.allow]]\nnamespace = \"ns-%d\"\n", i)
		}
	}
	cfg += extra.String()
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		e.Fatal(err)
	}
	e.runAgent(cfgPath, os.Stderr)
	if !testenv.WaitFor(15*time.Second, func() bool {
		st, err := podsockStatus(cfgPath)
		return err == nil && st.NRI.Connected
	}) {
		e.Fatalf("podsock did not connect to the bench runtime's NRI")
	}
	return cfgPath
}

// podsockStatus is `podsock status --json` of the agent with this config.
func podsockStatus(cfgPath string) (api.Status, error) {
	var st api.Status
	out, err := exec.Command(*podsockBin, "status", "--json", "--config", cfgPath).Output()
	if err != nil {
		return st, fmt.Errorf("podsock status: %w", err)
	}
	return st, json.Unmarshal(out, &st)
}

func medianRatio(r []float64) float64 {
	s := slices.Clone(r)
	slices.Sort(s)
	return s[len(s)/2]
}

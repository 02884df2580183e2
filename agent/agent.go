// Package agent is the long-running podsock process: it loads or adopts the datapath,
// applies the configuration, reloads it on SIGHUP and answers the control socket.
package agent

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/podsock/podsock/config"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/internal/cgroupfs"
	"github.com/podsock/podsock/internal/netns"
	"github.com/podsock/podsock/internal/preflight"
	"github.com/podsock/podsock/internal/statedir"
	"github.com/podsock/podsock/internal/terminator"
	"github.com/podsock/podsock/kubesource"
	"github.com/podsock/podsock/plugin"
	"github.com/podsock/podsock/runtimehooks"
	"github.com/podsock/podsock/service"
)

// Agent holds the running state. Everything mutable is guarded by mu; the datapath has
// its own lock for map writes.
type Agent struct {
	log *logrus.Logger
	dp  datapathOps
	ctl *control

	// settings, nri and limits are the sections the process started with; they cannot
	// change live.
	settings config.Agent
	nri      config.NRI
	limits   config.Limits

	// tracker holds the runtime's pod facts (and their netns handles); plugin is the NRI
	// connection, nil when NRI is disabled.
	tracker *runtimehooks.Tracker
	plugin  *plugin.Plugin
	podq    *podQueue
	events  eventCounts
	// opMu serialises everything that writes pod policy into the datapath: runtime
	// events and the planning and finish of config applies.
	opMu sync.Mutex

	srv *http.Server
	// obs serves [metrics] listen, nil when it is off; ready is what /readyz waits for.
	obs        *observer
	ready      readiness
	metricsCfg config.Metrics

	// netns reaches the host's and every pod's netns for the socket iterators; term
	// destroys the sockets of removed backends.
	netns nodeNetns
	term  *terminator.Terminator

	// syncLearned are the pods known only from a Synchronize, which the runtime may never
	// report the removal of (see sweepVanishedPods). Guarded by opMu.
	syncLearned map[string]bool
	sweepStop   chan struct{}
	// podsSynced is set by the runtime's first Synchronize: from then on the tracker, not
	// what a previous agent left in the maps, says which pods exist. Guarded by opMu.
	podsSynced bool

	// sources merges what the service sources want; its loop is the only writer of
	// services into the datapath.
	sources *sourceReconciler
	metrics *agentMetrics
	// kube is the Kubernetes source, nil when [kubernetes] is off; kubeCfg, the settings it
	// started with (a change takes a restart).
	kube    *kubesource.Source
	kubeCfg config.Kubernetes
	// reconcilerUp is closed once start has made sources (and what apply uses): the
	// Kubernetes source may list before that, and its first snapshot waits for it.
	reconcilerUp chan struct{}
	// kubeStopped is done once the Kubernetes source is told to stop.
	kubeStopped <-chan struct{}
	// recordedSources is what state_dir records of the sources (nil: not known yet);
	// only the reconciler touches it after start.
	recordedSources statedir.Sources

	// loader loads the config file at start and at each reload.
	loader *config.Loader
	// lastApply is what the last apply handed the datapath; only the reconciler touches it.
	lastApply appliedView

	mu  sync.Mutex
	cfg *config.Config
	// policy is the pod policy of the config last pushed to the datapath, even if only
	// partly.
	policy          *podPolicy
	cgroupRoot      string
	generation      uint64
	lastReloadError string
}

func newAgent(log *logrus.Logger) *Agent {
	a := &Agent{log: log, podq: newPodQueue(), reconcilerUp: make(chan struct{}), syncLearned: map[string]bool{}, sweepStop: make(chan struct{}), metrics: newAgentMetrics()}
	go a.podq.run()
	go a.sweepVanishedPods(a.sweepStop)
	return a
}

// Run is `podsock run`: it returns when ctx is done or SIGTERM/SIGINT arrives, leaving the
// pinned datapath serving. Errors it returns are fatal and fit on one line.
func Run(ctx context.Context, cfgPath string, log *logrus.Logger) error {
	// Catch signals before anything slow: a SIGHUP during a long adoption must not take
	// the default action and kill the agent.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	serveProfiles(ctx, log)
	datapath.Warm()

	// The loader remembers the file's services, so that a reload decodes only those that
	// changed.
	loader := config.NewLoader()
	cfg, err := loader.Load(cfgPath)
	if err != nil {
		return err
	}
	a := newAgent(log)
	a.loader = loader
	defer a.podq.close()
	if err := a.newKubernetesSource(cfg.Kubernetes); err != nil {
		return err
	}
	if cfg.NRI.Enabled {
		a.plugin = plugin.New(plugin.Options{
			Socket: cfg.NRI.Socket, Name: cfg.NRI.PluginName, Index: cfg.NRI.PluginIndex, Log: log,
			Observe: a.metrics.observeNRIEvent,
		}, a)
	}
	// The first list of a large cluster takes longer than loading the datapath: it runs
	// meanwhile, and its first snapshot waits for the reconciler that start makes.
	kctx, stopKube := context.WithCancel(ctx)
	waitKube := a.runKubernetes(kctx)
	stopKubernetes := func() { stopKube(); waitKube() }
	reloadPending, err := a.start(cfg, sigs)
	if err != nil {
		stopKubernetes()
		if errors.Is(err, errStopped) {
			return nil
		}
		return err
	}
	defer a.stop()
	// Before stop, which closes the reconciler the source publishes to.
	defer stopKubernetes()
	a.applyInitial(cfg)
	if reloadPending {
		a.reload(cfgPath)
	}
	var pluginDone <-chan error
	if a.plugin != nil {
		pctx, cancel := context.WithCancel(ctx)
		// Unregister before the datapath handles go: stop runs after this.
		defer cancel()
		pluginDone = a.runPlugin(pctx)
	} else {
		// Without a runtime there are no pods: whatever a previous agent installed goes.
		a.opMu.Lock()
		a.podsSynced = true
		_, err := a.dp.SyncPods(nil)
		a.opMu.Unlock()
		a.term.SetPodsKnown()
		if err != nil {
			log.WithError(err).Warn("drop pods left by an earlier agent")
		}
	}

	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-pluginDone:
			return err
		case sig := <-sigs:
			if sig != syscall.SIGHUP {
				log.Infof("received %s", sig)
				return nil
			}
			a.reload(cfgPath)
		}
	}
}

// start runs the preflight checks, takes the state dir and loads (or adopts) and attaches
// the datapath; applyInitial then applies cfg. A stop signal that arrives during a long
// load is honoured (stop is then already done); a reload asked for then is reported back.
func (a *Agent) start(cfg *config.Config, sigs <-chan os.Signal) (reloadPending bool, err error) {
	log := a.log
	if err := setLogLevel(log, cfg.Agent.LogLevel); err != nil {
		return false, err
	}
	if err := preflight.CheckPrivileges(); err != nil {
		return false, err
	}
	if err := preflight.CheckBTF(); err != nil {
		return false, err
	}
	cgroupRoot, err := preflight.ResolveCgroupRoot(cfg.Agent.CgroupRoot)
	if err != nil {
		return false, err
	}
	if err := preflight.EnsureBPFFS(cfg.Agent.BPFFS); err != nil {
		return false, err
	}
	if err := os.MkdirAll(cfg.Agent.StateDir, 0o700); err != nil {
		return false, fmt.Errorf("create state dir: %w", err)
	}
	cgroup2, err := cgroupfs.Mount()
	if err != nil {
		return false, err
	}
	ctl, err := listenControl(cfg.Agent.StateDir)
	if err != nil {
		return false, err
	}
	mln, err := listenMetrics(cfg.Metrics.Listen)
	if err != nil {
		ctl.Close()
		return false, err
	}
	closeListeners := func() {
		ctl.Close()
		if mln != nil {
			mln.Close()
		}
	}
	dp, err := datapath.Load(datapath.Options{CgroupRoot: cgroupRoot, BPFFS: cfg.Agent.BPFFS, Limits: datapathLimits(cfg.Limits), Log: log})
	if err != nil {
		closeListeners()
		return false, err
	}
	host, err := netns.Open(hostNetnsPath)
	if err != nil {
		closeListeners()
		return false, errors.Join(fmt.Errorf("hold the host netns: %w", err), dp.Close())
	}
	a.opMu.Lock()
	a.dp, a.ctl, a.cgroupRoot, a.settings, a.nri, a.limits = dp, ctl, cgroupRoot, cfg.Agent, cfg.NRI, cfg.Limits
	a.sources = service.NewReconciler(a.apply, a.logConflicts, serviceLimits(cfg.Limits))
	if a.kube != nil {
		a.sources.Register(service.SourceKubernetes)
	}
	a.adoptRecordedSources()
	a.tracker = runtimehooks.NewTracker(cgroup2)
	a.netns = nodeNetns{host: host, tracker: a.tracker}
	a.term = terminator.New(dp, a.netns, log)
	a.term.Observe(a.metrics.observeTermination)
	a.metricsCfg = cfg.Metrics
	a.serveMetrics(mln)
	a.opMu.Unlock()
	close(a.reconcilerUp)
drain:
	for sigs != nil {
		select {
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				reloadPending = true
				continue
			}
			log.Infof("received %s during start-up", sig)
			a.stop()
			return false, errStopped
		default:
			break drain
		}
	}
	log.WithFields(logrus.Fields{
		"cgroup_root":   cgroupRoot,
		"pin_dir":       dp.PinDir(),
		"adopted_links": dp.AdoptedLinks(),
	}).Info("datapath attached")
	// Pod events that arrive before the services are applied already get this config's
	// policy.
	a.mu.Lock()
	a.policy = newPodPolicy(cfg.LB, cfg.Services)
	a.mu.Unlock()
	return reloadPending, nil
}

// applyInitial applies the config the agent started with, then serves the control socket.
func (a *Agent) applyInitial(cfg *config.Config) {
	defer func() { a.srv = a.serveControl(a.ctl.ln) }()
	// A pre-registered plugin reads its services file only now, after it answered the
	// runtime. One that does not load leaves what the datapath serves as it was.
	err := cfg.LoadServicesFile()
	if err != nil {
		a.log.WithError(err).Error("services not applied, keeping what the datapath serves")
	} else if err = <-a.publishConfig(cfg); err != nil {
		// The datapath keeps whatever it served before; the half-applied config is shown
		// in status, with its error, until a reload succeeds.
		a.log.WithError(err).Error("initial config not fully applied")
	}
	if err != nil {
		a.mu.Lock()
		a.cfg = cfg
		a.lastReloadError = err.Error()
		a.mu.Unlock()
	}
}

// errStopped means a stop signal arrived during start-up; it is not a failure.
var errStopped = errors.New("stopped during start-up")

// stop shuts the control socket, releases the datapath handles and the held netns handles.
// The pinned datapath keeps serving.
func (a *Agent) stop() {
	close(a.sweepStop)
	if a.sources != nil {
		// An apply in progress finishes first: it holds the datapath.
		a.sources.Close()
	}
	if a.srv != nil {
		// Let answers in flight finish before the datapath handles they read go away.
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := a.srv.Shutdown(shutdownCtx); err != nil {
			// A request still running may use the datapath: leave the handles to the exit.
			a.log.WithError(err).Warn("control socket shutdown")
			return
		}
	}
	if a.obs != nil {
		a.obs.close()
	}
	if a.term != nil {
		// A pass in progress finishes before the handles it uses go.
		a.term.Close()
	}
	a.opMu.Lock()
	defer a.opMu.Unlock()
	if a.ctl != nil {
		a.ctl.Close()
	}
	if a.netns.host != nil {
		_ = a.netns.host.Close()
	}
	if a.tracker != nil {
		if err := a.tracker.Close(); err != nil {
			a.log.WithError(err).Warn("release netns handles")
		}
	}
	if a.dp != nil {
		if err := a.dp.Close(); err != nil {
			a.log.WithError(err).Warn("release datapath handles")
		}
		a.dp = nil
		a.log.Info("stopped; the pinned datapath keeps serving")
	}
}

// runPlugin serves NRI until ctx ends; the channel reports a plugin that gave up.
func (a *Agent) runPlugin(ctx context.Context) <-chan error {
	done := make(chan error, 1)
	go func() {
		if err := a.plugin.Run(ctx); err != nil {
			done <- err
		}
	}()
	return done
}

func setLogLevel(log *logrus.Logger, level string) error {
	lvl, err := logrus.ParseLevel(level)
	if err != nil {
		return fmt.Errorf("log level: %w", err)
	}
	log.SetLevel(lvl)
	return nil
}

// reload re-reads the config. A file that fails to parse or validate is logged and the
// running config stays in force.
func (a *Agent) reload(path string) {
	if a.loader == nil {
		a.loader = config.NewLoader()
	}
	cfg, err := a.loader.Load(path)
	if err != nil {
		a.log.WithError(err).WithField("generation", a.Generation()).Error("reload rejected, keeping the running config")
		a.metrics.observeReload(false)
		a.mu.Lock()
		a.lastReloadError = err.Error()
		a.mu.Unlock()
		return
	}
	// Where the datapath lives cannot move under a running agent.
	old := a.settings
	cfg.Agent.CgroupRoot = keepRestartOnly(a.log, "agent.cgroup_root", old.CgroupRoot, cfg.Agent.CgroupRoot)
	cfg.Agent.BPFFS = keepRestartOnly(a.log, "agent.bpffs", old.BPFFS, cfg.Agent.BPFFS)
	cfg.Agent.StateDir = keepRestartOnly(a.log, "agent.state_dir", old.StateDir, cfg.Agent.StateDir)
	if cfg.NRI != a.nri {
		a.log.Warn("nri settings changed; that takes a restart, keeping the running ones")
		cfg.NRI = a.nri
	}
	if cfg.Metrics.Listen != a.metricsCfg.Listen {
		a.log.Warnf("metrics.listen changed from %q to %q; that takes a restart, keeping %q", a.metricsCfg.Listen, cfg.Metrics.Listen, a.metricsCfg.Listen)
		cfg.Metrics.Listen = a.metricsCfg.Listen
	}
	if cfg.Kubernetes != a.kubeCfg {
		a.log.Warn("kubernetes settings changed; that takes a restart, keeping the running ones")
		cfg.Kubernetes = a.kubeCfg
	}
	if cfg.Limits != a.limits {
		// The maps are sized at load; the restart migrates them.
		a.log.Warn("limits changed; that takes a restart, keeping the running ones")
		cfg.Limits = a.limits
	}
	if err := setLogLevel(a.log, cfg.Agent.LogLevel); err != nil {
		a.log.WithError(err).Error("reload: log level")
	}
	err = <-a.publishConfig(cfg)
	a.metrics.observeReload(err == nil)
	if err != nil {
		a.log.WithError(err).Error("reload not fully applied")
		a.mu.Lock()
		a.lastReloadError = err.Error()
		a.mu.Unlock()
	}
}

func keepRestartOnly(log *logrus.Logger, key, running, next string) string {
	if running != next {
		log.Warnf("%s changed from %q to %q; that takes a restart, keeping %q", key, running, next, running)
	}
	return running
}

// apply writes one merged view into the datapath: the services of every source, with the
// pod policy and [lb] settings of the file config in force. A new file config becomes the
// running one when it applies in full. Runtime events are not held up by it: opMu is taken
// only to plan and to finish, and the datapath lets pod events in between its chunks. Pods
// that arrive meanwhile get the new policy at once. Only the reconciler calls it.
func (a *Agent) apply(w service.Plan[*config.Config]) error {
	started := time.Now()
	cfg := w.Settings
	a.opMu.Lock()
	policies := servicePolicies(w.Services, a.tracker.Pods())
	if !a.podsSynced {
		// Until the runtime's first Synchronize the tracker knows no pods, but the datapath
		// may hold those a previous agent installed: keep admitting them.
		for name, p := range policies {
			if p.Restrict {
				p.AllowedPods = append(p.AllowedPods, a.dp.AllowedSandboxes(name)...)
				policies[name] = p
			}
		}
	}
	// Even a partly applied view is what the datapath serves, so pod policy follows it
	// rather than the previous one.
	pol := newPodPolicy(cfg.LB, w.Services)
	a.mu.Lock()
	a.policy = pol
	a.mu.Unlock()
	// Pod events wait until the datapath counts them as late, so none falls between the
	// policies planned here and the apply.
	res, err := a.applyServices(w.Services, policies)
	a.lastApply = appliedView{services: w.Services, policies: policies, ok: err == nil}
	a.log.WithFields(logrus.Fields{
		"added": res.Added, "updated": res.Updated, "removed": res.Removed, "unchanged": res.Unchanged,
	}).Info("services applied")
	logRemovedBackends(a.log, res.RemovedBackends)
	a.term.Remove(res.RemovedBackends, terminatedProtos(cfg))
	a.opMu.Lock()
	defer a.opMu.Unlock()
	err = errors.Join(err, a.dp.SetHostnsOnly(cfg.LB.HostnsOnly), a.dp.SetServiceCounters(cfg.Metrics.PerService))
	if a.podsSynced {
		// The pods as they are now, those started during the apply included.
		_, serr := a.dp.SyncPods(datapathPods(a.tracker.Pods(), pol))
		err = errors.Join(err, serr)
	}
	a.refreshSnapshot()
	if err != nil {
		return err
	}
	a.recordSources(w.Services)
	a.metrics.observeConflicts(w.Conflicts)
	if !w.NewSettings {
		return nil
	}
	a.metrics.sync.WithLabelValues(string(service.SourceFile)).Observe(time.Since(started).Seconds())
	a.mu.Lock()
	a.cfg = cfg
	a.generation++
	a.lastReloadError = ""
	gen := a.generation
	a.mu.Unlock()
	a.log.WithField("generation", gen).Infof("config %s in force", cfg.Path)
	// Decoding and applying a config leaves garbage of several times the config's size,
	// which the runtime would hand back to the kernel only over minutes: a node's agent
	// would sit at its peak. A config change is rare (start, SIGHUP), so one forced
	// collection for it is cheap; it runs after the config is in force, not before, and
	// after what the datapath still loads in the background (its iterators, and the
	// kernel's types decoded for them), whose garbage a small config's start would
	// otherwise keep: 9 MiB of the 32 an agent of one service held.
	go func() {
		a.dp.WaitLoaded()
		debug.FreeOSMemory()
	}()
	return nil
}

// applyServices hands the datapath services: those that changed since the last apply
// alone when it can follow that (datapath.ApplyChanges), all of them otherwise. It
// unlocks opMu once the datapath has started.
func (a *Agent) applyServices(services []service.Service, policies map[string]datapath.ServicePolicy) (datapath.ApplyResult, error) {
	opts := datapath.ApplyOptions{Started: a.opMu.Unlock}
	if changed, ok := a.lastApply.changedIn(services, policies); ok {
		changes := make([]datapath.Change, len(changed))
		for j, i := range changed {
			changes[j] = datapath.Change{At: i, Service: toDatapathService(&services[i], policies)}
		}
		if res, applied, err := a.dp.ApplyChanges(changes, opts); applied {
			return res, err
		}
	}
	return a.dp.ApplyWith(toDatapath(services, policies), opts)
}

// appliedView is what an apply handed the datapath, and whether it took all of it.
type appliedView struct {
	services []service.Service
	policies map[string]datapath.ServicePolicy
	ok       bool
}

// changedIn lists the positions at which services differs from the view, when the
// datapath may write those alone (datapath.ApplyChanges): the view was taken
// in full, the policies are the same, each service keeps its name and frontend at its
// position, and at most a quarter changed (or restrict their clients).
func (v appliedView) changedIn(services []service.Service, policies map[string]datapath.ServicePolicy) ([]int, bool) {
	if !v.ok || len(services) != len(v.services) || !maps.EqualFunc(policies, v.policies, samePolicy) {
		return nil, false
	}
	var changed []int
	for i := range services {
		s, was := &services[i], &v.services[i]
		if !s.SameFrontend(was) {
			return nil, false
		}
		// A restricted service is written each time: the datapath resolves its pods then.
		if !s.Equal(was) || s.RestrictsClients() {
			if changed = append(changed, i); len(changed)*4 > len(services) {
				return nil, false
			}
		}
	}
	return changed, true
}

func samePolicy(a, b datapath.ServicePolicy) bool {
	return a.AffinityPod == b.AffinityPod && a.AffinityHost == b.AffinityHost && a.AffinityTimeout == b.AffinityTimeout &&
		a.Restrict == b.Restrict && a.AllowHost == b.AllowHost && slices.Equal(a.AllowedPods, b.AllowedPods)
}

// removedLogLimit is how many removed backends an apply names at info level: a reload
// that changes every backend of 100k services would otherwise write 100k lines.
const removedLogLimit = 20

// logRemovedBackends names the first removed backends, and the rest at debug level.
func logRemovedBackends(log *logrus.Logger, gone []datapath.RemovedBackend) {
	for i, b := range gone {
		if i >= removedLogLimit && !log.IsLevelEnabled(logrus.DebugLevel) {
			// An entry made for a line never written was 600 B of garbage a backend.
			break
		}
		entry := log.WithField("service", b.Service)
		if i < removedLogLimit {
			entry.Infof("backend removed: %s", b)
		} else {
			entry.Debugf("backend removed: %s", b)
		}
	}
	if n := len(gone) - removedLogLimit; n > 0 {
		log.Infof("%d more backends removed (each logged at debug level)", n)
	}
}

// Generation counts the configs applied since the agent started.
func (a *Agent) Generation() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.generation
}

// terminatedProtos are the protocols of [lb] terminate, as the datapath numbers them.
func terminatedProtos(cfg *config.Config) []uint8 {
	var out []uint8
	if cfg.LB.Terminates(service.ProtocolTCP) {
		out = append(out, datapath.ProtoTCP)
	}
	if cfg.LB.Terminates(service.ProtocolUDP) {
		out = append(out, datapath.ProtoUDP)
	}
	return out
}

func toDatapath(svcs []service.Service, policies map[string]datapath.ServicePolicy) []datapath.Service {
	out := make([]datapath.Service, len(svcs))
	for i := range svcs {
		out[i] = toDatapathService(&svcs[i], policies)
	}
	return out
}

func toDatapathService(s *service.Service, policies map[string]datapath.ServicePolicy) datapath.Service {
	d := datapath.Service{Name: s.Name, VIP: s.VIP, Port: s.Port, Proto: datapath.ProtoTCP, Policy: policies[s.Name],
		HostOnly: s.HostOnly, Retained: s.Retained()}
	if s.Protocol == service.ProtocolUDP {
		d.Proto = datapath.ProtoUDP
	}
	if len(s.Backends) > 0 {
		d.Backends = make([]datapath.Backend, len(s.Backends))
	}
	for i, b := range s.Backends {
		d.Backends[i] = datapath.Backend{Addr: b.Addr, Weight: b.Weight}
	}
	return d
}

// serviceLimits are the bounds Merge keeps a view within, so that a view too large is
// served as far as it fits instead of failing the apply.
func serviceLimits(l config.Limits) service.Limits {
	return service.Limits{Services: l.Services, BackendsPerService: l.BackendsPerService, Slots: l.Slots, SlotsPerService: l.SlotsPerService}
}

func datapathLimits(l config.Limits) datapath.Limits {
	return datapath.Limits{
		Services: l.Services, BackendsPerService: l.BackendsPerService, SlotsPerService: l.SlotsPerService,
		Slots: l.Slots, Pods: l.Pods, Containers: l.Containers, PodServices: l.PodServices, SocketCounts: l.SocketCounts,
	}
}

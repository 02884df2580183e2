// Package agent is the long-running podsock process: it loads or adopts the datapath,
// applies the configuration, reloads it on SIGHUP and answers the control socket.
package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/podsock/podsock/config"
	"github.com/podsock/podsock/datapath"
)

// Agent holds the running state. Everything mutable is guarded by mu; the datapath has
// its own lock for map writes.
type Agent struct {
	log *logrus.Logger
	dp  *datapath.Datapath

	// settings is the [agent] section the process started with; it cannot change live.
	settings config.Agent

	mu              sync.Mutex
	cfg             *config.Config
	cgroupRoot      string
	generation      uint64
	lastReloadError string
}

// Run is `podsock run`: it returns when ctx is done or SIGTERM/SIGINT arrives, leaving the
// pinned datapath serving. Errors it returns are fatal and fit on one line.
func Run(ctx context.Context, cfgPath string, log *logrus.Logger) error {
	// Catch signals before anything slow: a SIGHUP during a long adoption must not take
	// the default action and kill the agent.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	cfg, err := config.Load(cfgPath)
	if err != nil {
		return err
	}
	if err := setLogLevel(log, cfg.Agent.LogLevel); err != nil {
		return err
	}
	if err := checkPrivileges(); err != nil {
		return err
	}
	if err := checkBTF(); err != nil {
		return err
	}
	cgroupRoot, err := resolveCgroupRoot(cfg.Agent.CgroupRoot)
	if err != nil {
		return err
	}
	if err := ensureBPFFS(cfg.Agent.BPFFS); err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.Agent.StateDir, 0o700); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	ctl, err := listenControl(cfg.Agent.StateDir)
	if err != nil {
		return err
	}

	dp, err := datapath.Load(datapath.Options{CgroupRoot: cgroupRoot, BPFFS: cfg.Agent.BPFFS, Log: log})
	if err != nil {
		ctl.Close()
		return err
	}
	a := &Agent{log: log, dp: dp, cgroupRoot: cgroupRoot, settings: cfg.Agent}
	// A stop asked for during a long load is honoured before the config is applied; a
	// reload asked for then is done right after.
	reloadPending := false
drain:
	for {
		select {
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				reloadPending = true
				continue
			}
			log.Infof("received %s during start-up", sig)
			ctl.Close()
			return dp.Close()
		default:
			break drain
		}
	}
	log.WithFields(logrus.Fields{
		"cgroup_root":   cgroupRoot,
		"pin_dir":       dp.PinDir(),
		"adopted_links": dp.AdoptedLinks(),
	}).Info("datapath attached")
	if err := a.apply(cfg); err != nil {
		// The datapath keeps whatever it served before; the half-applied config is shown
		// in status, with its error, until a reload succeeds.
		log.WithError(err).Error("initial config not fully applied")
		a.mu.Lock()
		a.cfg = cfg
		a.lastReloadError = err.Error()
		a.mu.Unlock()
	}
	if reloadPending {
		a.reload(cfgPath)
	}
	if cfg.NRI.Enabled {
		log.Warn("nri.enabled is set, but this build has no NRI adapter yet; balancing every process under cgroup_root")
	}

	srv := a.serveControl(ctl.ln)
	defer func() {
		// Let answers in flight finish before the datapath handles they read go away.
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(shutdownCtx); err != nil {
			log.WithError(err).Warn("control socket shutdown")
		}
		ctl.Close()
		if err := dp.Close(); err != nil {
			log.WithError(err).Warn("release datapath handles")
		}
		log.Info("stopped; the pinned datapath keeps serving")
	}()

	for {
		select {
		case <-ctx.Done():
			return nil
		case sig := <-sigs:
			if sig != syscall.SIGHUP {
				log.Infof("received %s", sig)
				return nil
			}
			a.reload(cfgPath)
		}
	}
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
	cfg, err := config.Load(path)
	if err != nil {
		a.log.Errorf("reload rejected, keeping config generation %d: %v", a.Generation(), err)
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
	if err := setLogLevel(a.log, cfg.Agent.LogLevel); err != nil {
		a.log.WithError(err).Error("reload: log level")
	}
	if err := a.apply(cfg); err != nil {
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

// apply pushes the config's services into the datapath and makes it the running config.
func (a *Agent) apply(cfg *config.Config) error {
	res, err := a.dp.Apply(toDatapath(cfg.Services))
	a.log.WithFields(logrus.Fields{
		"added": res.Added, "updated": res.Updated, "removed": res.Removed, "unchanged": res.Unchanged,
	}).Info("services applied")
	for svc, gone := range res.RemovedBackends {
		a.log.WithField("service", svc).Infof("backends removed: %v", gone)
	}
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.cfg = cfg
	a.generation++
	a.lastReloadError = ""
	gen := a.generation
	a.mu.Unlock()
	a.log.WithField("generation", gen).Infof("config %s in force", cfg.Path)
	return nil
}

// Generation counts the configs applied since the agent started.
func (a *Agent) Generation() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.generation
}

func toDatapath(svcs []config.Service) []datapath.Service {
	out := make([]datapath.Service, 0, len(svcs))
	for _, s := range svcs {
		d := datapath.Service{Name: s.Name, VIP: s.VIP, Port: s.Port, Proto: datapath.ProtoTCP}
		if s.Protocol == config.ProtocolUDP {
			d.Proto = datapath.ProtoUDP
		}
		for _, b := range s.Backends {
			d.Backends = append(d.Backends, datapath.Backend{Addr: b.Addr, Weight: b.Weight})
		}
		out = append(out, d)
	}
	return out
}

// ErrNotRunning says no agent answers on the control socket.
var ErrNotRunning = errors.New("agent is not running")

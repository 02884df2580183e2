package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/internal/statedir"
	"github.com/podsock/podsock/plugin"
	"github.com/podsock/podsock/service"
)

// control is the agent's claim on its state dir: the lock and the listening socket.
type control struct {
	lock *os.File
	ln   net.Listener
}

// listenControl takes the state dir's lock, so two agents never share it, then binds the
// control socket (mode 0600), replacing a socket file a dead agent left behind.
func listenControl(stateDir string) (*control, error) {
	lock, err := statedir.Lock(stateDir)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(stateDir, api.SocketName)
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		lock.Close()
		return nil, fmt.Errorf("remove stale control socket: %w", err)
	}
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err == nil {
		err = os.Chmod(path, 0o600)
	}
	if err != nil {
		if ln != nil {
			ln.Close()
		}
		lock.Close()
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	return &control{lock: lock, ln: ln}, nil
}

// Close removes the socket and releases the lock.
func (c *control) Close() {
	c.ln.Close()
	os.Remove(c.ln.Addr().String())
	c.lock.Close()
}

func (a *Agent) serveControl(ln net.Listener) *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, a.status())
	})
	mux.HandleFunc("GET /v1/services", func(w http.ResponseWriter, r *http.Request) {
		svcs, err := a.dp.Services()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, serviceViews(svcs, a.sources.Served))
	})
	mux.HandleFunc("GET /v1/pods", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, a.podViews())
	})
	mux.HandleFunc("GET /v1/sockets", a.serveSockets)
	mux.HandleFunc("GET /v1/trace", a.serveTrace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.WithError(err).Error("control socket stopped")
		}
	}()
	return srv
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	// An error here means the client went away; there is no one left to tell.
	_ = json.NewEncoder(w).Encode(v)
}

func (a *Agent) status() api.Status {
	a.mu.Lock()
	gen, lastErr, cfg := a.generation, a.lastReloadError, a.cfg
	a.mu.Unlock()
	nSvc, nBackends := a.dp.Counts()
	counters, err := a.dp.Stats()
	if err != nil {
		a.log.WithError(err).Warn("read datapath counters")
	}
	st := api.Status{
		Datapath: api.DatapathStatus{
			Attached:     a.dp.Attached(),
			PinDir:       a.dp.PinDir(),
			CgroupRoot:   a.cgroupRoot,
			AdoptedLinks: a.dp.AdoptedLinks(),
			Counters:     counters,

			Features:        append(a.dp.IteratorFeatures(), a.dp.TraceFeature(), a.dp.MapCountFeature()),
			BackfillPending: a.dp.BackfillPending(),
		},
		Services:         nSvc,
		Backends:         nBackends,
		ConfigGeneration: gen,
		LastReloadError:  lastErr,
		PID:              os.Getpid(),
		Goroutines:       runtime.NumGoroutine(),
	}
	if cfg != nil {
		st.ConfigPath = cfg.Path
		st.NRI.Enabled = cfg.NRI.Enabled
	}
	if a.tracker != nil {
		pods := a.tracker.Pods()
		st.Pods = len(pods)
		for _, p := range pods {
			if p.NetnsCookie != 0 {
				st.Netns++
			}
		}
	}
	if maps, err := a.dp.MapStats(); err != nil {
		a.log.WithError(err).Warn("read map sizes")
	} else {
		st.Datapath.Maps = maps
		for _, m := range maps {
			st.Datapath.MemoryBytes += m.MemoryBytes
		}
	}
	st.Version, st.MetricsListen = Version, a.metricsCfg.Listen
	if err := a.readiness(); err != nil {
		st.ReadyReason = err.Error()
	} else {
		st.Ready = true
	}
	st.Termination = a.term.Status()
	st.Sources, st.Conflicts = a.sourceStatus()
	st.NRI.Events = a.events.snapshot()
	if a.plugin != nil {
		st.NRI.Connected = a.plugin.Connected()
		st.NRI.Reconnects = a.plugin.Reconnects()
		st.NRI.HandlerLatency = a.plugin.Latency()
		if !plugin.PreRegistered() && cfg != nil {
			st.NRI.Socket = cfg.NRI.Socket
		}
	}
	return st
}

func (a *Agent) podViews() []api.PodView {
	pol := a.currentPolicy()
	pods := a.tracker.Pods()
	dps := datapathPods(pods, pol)
	out := make([]api.PodView, 0, len(pods))
	for i, p := range pods {
		v := api.PodView{
			Namespace: p.Namespace, Name: p.Name, UID: p.UID, SandboxID: p.SandboxID,
			CgroupPath: p.CgroupPath, CgroupID: p.CgroupID,
			Containers: []api.ContainerView{},
			NetnsPath:  p.NetnsPath, NetnsCookie: p.NetnsCookie, HostNetwork: p.HostNetwork,
			IPs:    []string{},
			SkipLB: dps[i].SkipLB, AllowedServices: dps[i].AllowedServices,
		}
		if v.AllowedServices == nil {
			v.AllowedServices = []string{}
		}
		for _, c := range p.Containers {
			v.Containers = append(v.Containers, api.ContainerView{ID: c.ID, Name: c.Name, CgroupPath: c.CgroupPath, CgroupID: c.CgroupID})
		}
		for _, ip := range p.IPs {
			v.IPs = append(v.IPs, ip.String())
		}
		out = append(out, v)
	}
	return out
}

// serviceViews shows the datapath's services; served says what a source wanted for the
// one with a key: where it came from, and its endpoints. Backends stay what the datapath
// has.
func serviceViews(svcs []datapath.Service, served func(key string) (service.Service, bool)) []api.ServiceView {
	out := make([]api.ServiceView, 0, len(svcs))
	for _, s := range svcs {
		want, ok := served(s.Key())
		src := service.SourceFile
		if ok {
			src = want.From()
		}
		v := api.ServiceView{Name: s.Name, VIP: s.VIP.String(), Port: s.Port, Protocol: datapath.ProtoName(s.Proto),
			Source:   string(src),
			Backends: []string{}, Weights: []uint32{}}
		inUse := make(map[netip.AddrPort]bool, len(s.Backends))
		for _, b := range s.Backends {
			v.Backends = append(v.Backends, b.Addr.String())
			v.Weights = append(v.Weights, b.Weight)
			inUse[b.Addr] = true
		}
		for _, e := range want.Endpoints {
			v.Endpoints = append(v.Endpoints, api.EndpointView{
				Addr: e.Addr.String(), Ready: e.Ready, Serving: e.Serving, Terminating: e.Terminating,
				Zone: e.Zone, Node: e.Node, InUse: inUse[e.Addr],
			})
		}
		if v.Endpoints == nil {
			v.Endpoints = []api.EndpointView{}
		}
		out = append(out, v)
	}
	return out
}

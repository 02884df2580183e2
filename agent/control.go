package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/plugin"
)

// SocketName is the control socket's file name inside state_dir.
const SocketName = "podsock.sock"

// Status is what `podsock status --json` prints.
type Status struct {
	Datapath DatapathStatus `json:"datapath"`
	NRI      NRIStatus      `json:"nri"`
	Services int            `json:"services"`
	Backends int            `json:"backends"`
	Pods     int            `json:"pods"`
	// Netns counts the pod network namespaces the agent holds open.
	Netns int `json:"netns"`
	// Termination is what became of sockets still attached to removed backends.
	Termination      TerminationStatus `json:"termination"`
	ConfigGeneration uint64            `json:"config_generation"`
	ConfigPath       string            `json:"config_path"`
	LastReloadError  string            `json:"last_reload_error"`
	PID              int               `json:"pid"`
	// Goroutines the agent runs: flat over pod churn, or something leaks.
	Goroutines int `json:"goroutines"`
}

type DatapathStatus struct {
	Attached     bool           `json:"attached"`
	PinDir       string         `json:"pin_dir"`
	CgroupRoot   string         `json:"cgroup_root"`
	AdoptedLinks int            `json:"adopted_links"`
	Counters     datapath.Stats `json:"counters"`
	// Features are the optional BPF programs, each loaded on its own: a program the kernel
	// refused (detail: its reason) costs only what that program does.
	Features []datapath.Feature `json:"features"`
	// BackfillPending says that sockets an older agent balanced are not counted yet:
	// termination walks every netns until they are.
	BackfillPending bool `json:"backfill_pending"`
	// Maps are each pinned map's entries, capacity ([limits]) and kernel memory;
	// MemoryBytes is their sum.
	Maps        []datapath.MapStat `json:"maps"`
	MemoryBytes uint64             `json:"memory_bytes"`
}

type NRIStatus struct {
	Enabled    bool   `json:"enabled"`
	Connected  bool   `json:"connected"`
	Socket     string `json:"socket,omitempty"`
	Reconnects uint64 `json:"reconnects"`
	// Events counts runtime events by kind: failed ones left pod facts incomplete (the pod
	// still started), late ones outlasted the handler budget.
	Events map[string]EventCount `json:"events"`
	// HandlerLatency is how long the runtime waited on podsock, per event kind, over the
	// recent events ("all_pod_events" covers every pod and container event).
	HandlerLatency map[string]plugin.LatencySummary `json:"handler_latency"`
}

// PodView is one element of `podsock pods --json`.
type PodView struct {
	Namespace   string          `json:"namespace"`
	Name        string          `json:"name"`
	UID         string          `json:"uid"`
	SandboxID   string          `json:"sandbox_id"`
	CgroupPath  string          `json:"cgroup_path"`
	CgroupID    uint64          `json:"cgroup_id"`
	Containers  []ContainerView `json:"containers"`
	NetnsPath   string          `json:"netns_path"`
	NetnsCookie uint64          `json:"netns_cookie"`
	HostNetwork bool            `json:"host_network"`
	IPs         []string        `json:"ips"`
	// SkipLB and AllowedServices are the pod's policy under the running config.
	SkipLB          bool     `json:"skip_lb"`
	AllowedServices []string `json:"allowed_services"`
}

// ContainerView is one workload container of a pod.
type ContainerView struct {
	ID         string `json:"id"`
	Name       string `json:"name"`
	CgroupPath string `json:"cgroup_path"`
	CgroupID   uint64 `json:"cgroup_id"`
}

// ServiceView is one element of `podsock services --json`.
type ServiceView struct {
	Name     string   `json:"name"`
	VIP      string   `json:"vip"`
	Port     uint16   `json:"port"`
	Protocol string   `json:"protocol"`
	Backends []string `json:"backends"`
	Weights  []uint32 `json:"weights"`
}

// LockName is the lock file in state_dir that one agent at a time holds.
const LockName = "podsock.lock"

// control is the agent's claim on its state dir: the lock and the listening socket.
type control struct {
	lock *os.File
	ln   net.Listener
}

// listenControl takes the state dir's lock, so two agents never share it, then binds the
// control socket (mode 0600), replacing a socket file a dead agent left behind.
func listenControl(stateDir string) (*control, error) {
	lock, err := LockStateDir(stateDir)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(stateDir, SocketName)
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

// LockStateDir takes the state dir's lock file (created if missing), failing at once if
// an agent holds it. Closing the file releases it.
func LockStateDir(stateDir string) (*os.File, error) {
	lockPath := filepath.Join(stateDir, LockName)
	lock, err := os.OpenFile(lockPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", lockPath, err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("another agent is already running with state dir %s", stateDir)
		}
		return nil, fmt.Errorf("lock %s: %w", lockPath, err)
	}
	return lock, nil
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
		writeJSON(w, serviceViews(svcs))
	})
	mux.HandleFunc("GET /v1/pods", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, a.podViews())
	})
	mux.HandleFunc("GET /v1/sockets", a.serveSockets)
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

func (a *Agent) status() Status {
	a.mu.Lock()
	gen, lastErr, cfg := a.generation, a.lastReloadError, a.cfg
	a.mu.Unlock()
	nSvc, nBackends := a.dp.Counts()
	counters, err := a.dp.Stats()
	if err != nil {
		a.log.WithError(err).Warn("read datapath counters")
	}
	st := Status{
		Datapath: DatapathStatus{
			Attached:     a.dp.Attached(),
			PinDir:       a.dp.PinDir(),
			CgroupRoot:   a.cgroupRoot,
			AdoptedLinks: a.dp.AdoptedLinks(),
			Counters:     counters,

			Features:        a.dp.IteratorFeatures(),
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
	st.Termination = a.term.status()
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

func (a *Agent) podViews() []PodView {
	pol := a.currentPolicy()
	pods := a.tracker.Pods()
	dps := datapathPods(pods, pol)
	out := make([]PodView, 0, len(pods))
	for i, p := range pods {
		v := PodView{
			Namespace: p.Namespace, Name: p.Name, UID: p.UID, SandboxID: p.SandboxID,
			CgroupPath: p.CgroupPath, CgroupID: p.CgroupID,
			Containers: []ContainerView{},
			NetnsPath:  p.NetnsPath, NetnsCookie: p.NetnsCookie, HostNetwork: p.HostNetwork,
			IPs:    []string{},
			SkipLB: dps[i].SkipLB, AllowedServices: dps[i].AllowedServices,
		}
		if v.AllowedServices == nil {
			v.AllowedServices = []string{}
		}
		for _, c := range p.Containers {
			v.Containers = append(v.Containers, ContainerView{ID: c.ID, Name: c.Name, CgroupPath: c.CgroupPath, CgroupID: c.CgroupID})
		}
		for _, ip := range p.IPs {
			v.IPs = append(v.IPs, ip.String())
		}
		out = append(out, v)
	}
	return out
}

func serviceViews(svcs []datapath.Service) []ServiceView {
	out := make([]ServiceView, 0, len(svcs))
	for _, s := range svcs {
		v := ServiceView{Name: s.Name, VIP: s.VIP.String(), Port: s.Port, Protocol: datapath.ProtoName(s.Proto),
			Backends: []string{}, Weights: []uint32{}}
		for _, b := range s.Backends {
			v.Backends = append(v.Backends, b.Addr.String())
			v.Weights = append(v.Weights, b.Weight)
		}
		out = append(out, v)
	}
	return out
}

// Client talks to a running agent over its control socket.
type Client struct {
	path string
	http *http.Client
}

// NewClient returns a client for the agent whose state_dir is given.
func NewClient(stateDir string) *Client {
	path := filepath.Join(stateDir, SocketName)
	return &Client{path: path, http: &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}},
	}}
}

func (c *Client) get(path string, v any) error {
	return c.stream(path, func(dec *json.Decoder) error { return dec.Decode(v) })
}

// stream sends a GET and hands the answer's body to read.
func (c *Client) stream(path string, read func(*json.Decoder) error) error {
	resp, err := c.http.Get("http://podsock" + path)
	if err != nil {
		switch {
		case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ECONNREFUSED):
			return fmt.Errorf("%w (no answer on %s)", ErrNotRunning, c.path)
		case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
			return fmt.Errorf("permission denied on %s (the control socket is root's)", c.path)
		}
		return fmt.Errorf("control socket %s: %w", c.path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var msg [512]byte
		n, _ := resp.Body.Read(msg[:])
		return fmt.Errorf("agent: %s: %s", resp.Status, bytes.TrimSpace(msg[:n]))
	}
	return read(json.NewDecoder(resp.Body))
}

// Status asks the agent for its status.
func (c *Client) Status() (Status, error) {
	var st Status
	return st, c.get("/v1/status", &st)
}

// Pods asks the agent for the pods it knows from the runtime.
func (c *Client) Pods() ([]PodView, error) {
	var out []PodView
	return out, c.get("/v1/pods", &out)
}

// Sockets asks the agent for the sockets matching q and hands them to fn as they arrive.
func (c *Client) Sockets(q SocketQuery, fn func(SocketView) error) error {
	v := url.Values{}
	for k, s := range map[string]string{"pod": q.Pod, "backend": q.Backend, "proto": q.Proto} {
		if s != "" {
			v.Set(k, s)
		}
	}
	path := "/v1/sockets"
	if len(v) > 0 {
		path += "?" + v.Encode()
	}
	return c.stream(path, func(dec *json.Decoder) error {
		if _, err := dec.Token(); err != nil {
			return fmt.Errorf("read sockets: %w", err)
		}
		for dec.More() {
			var s SocketView
			if err := dec.Decode(&s); err != nil {
				return fmt.Errorf("read sockets (the agent may have cut the list short): %w", err)
			}
			if err := fn(s); err != nil {
				return err
			}
		}
		if _, err := dec.Token(); err != nil {
			return fmt.Errorf("read sockets (the agent cut the list short): %w", err)
		}
		return nil
	})
}

// Services asks the agent for the services as the datapath has them.
func (c *Client) Services() ([]ServiceView, error) {
	var out []ServiceView
	return out, c.get("/v1/services", &out)
}

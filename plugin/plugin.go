// Package plugin is podsock's NRI adapter and nothing else: it registers with the
// container runtime, turns NRI's pod and container events into runtimehooks inputs for a
// Handler, keeps the connection alive, and measures how long the runtime waits on us.
//
// Handlers never fail an event: NRI fails the pod or container operation when a plugin
// returns an error, and podsock's own trouble must never stop a pod from starting.
package plugin

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/nri/pkg/stub"
	"github.com/sirupsen/logrus"

	"github.com/podsock/podsock/runtimehooks"
)

// Handler receives the runtime's events. Its methods must return quickly (the runtime
// holds every pod operation on the node while one runs) and cannot fail.
type Handler interface {
	// Synchronize hands over every pod and container the runtime has, on each (re)connect.
	Synchronize(sandboxes []runtimehooks.Sandbox, containers []runtimehooks.ContainerInfo)
	RunPodSandbox(runtimehooks.Sandbox)
	StopPodSandbox(sandboxID string)
	RemovePodSandbox(sandboxID string)
	// ContainerCreated is called at PostCreateContainer, ContainerStarted at
	// StartContainer; the container's cgroup may exist only from the start on.
	ContainerCreated(runtimehooks.ContainerInfo)
	ContainerStarted(runtimehooks.ContainerInfo)
	StopContainer(runtimehooks.ContainerInfo)
	RemoveContainer(runtimehooks.ContainerInfo)
}

// Options says how to reach the runtime.
type Options struct {
	// Socket is the runtime's NRI socket (external mode). Ignored when the runtime started
	// us and handed over a connection (NRI_PLUGIN_SOCKET).
	Socket string
	Name   string
	Index  string
	Log    logrus.FieldLogger
	// Configure, if set, receives the configuration text the runtime hands over (from
	// /etc/nri/conf.d/NN-name.conf, for a pre-registered plugin). An error refuses the
	// registration.
	Configure func(config string) error
	// Observe, if set, gets the time spent in each handler, as the latency summary does:
	// the agent feeds its histogram with it.
	Observe func(event string, d time.Duration)
}

// Plugin is one NRI registration, kept alive across runtime restarts.
type Plugin struct {
	opts          Options
	h             Handler
	connected     atomic.Bool
	latency       *latencies
	registrations atomic.Uint64
}

// New returns a plugin that will deliver events to h once Run is called.
func New(opts Options, h Handler) *Plugin {
	if opts.Log == nil {
		opts.Log = logrus.StandardLogger()
	}
	return &Plugin{opts: opts, h: h, latency: &latencies{kinds: map[string]*ring{}, observe: opts.Observe}}
}

// Connected reports whether the plugin is registered with the runtime right now.
func (p *Plugin) Connected() bool { return p.connected.Load() }

// Reconnects counts registrations after the first one.
func (p *Plugin) Reconnects() uint64 {
	if n := p.registrations.Load(); n > 1 {
		return n - 1
	}
	return 0
}

// Latency reports how long the runtime waited on each kind of event.
func (p *Plugin) Latency() map[string]LatencySummary { return p.latency.summary() }

// Backoff bounds for reconnecting to a runtime that went away.
const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 5 * time.Second
)

// registerTimeout is how long a registration may take before it is abandoned and tried
// again; a variable so tests need not wait 15 s.
var registerTimeout = 15 * time.Second

// Run registers with the runtime and serves events until ctx ends. In external mode a
// lost connection (the runtime restarted) is re-established with capped exponential
// backoff; the runtime then sends a fresh Synchronize. When the runtime launched us
// (pre-registered), a lost connection ends Run: the runtime starts a new instance.
func (p *Plugin) Run(ctx context.Context) error {
	backoff := minBackoff
	for {
		started := time.Now()
		err := p.serveOnce(ctx)
		if ctx.Err() != nil {
			return nil //nolint:nilerr // a cancelled context is how Run is asked to stop
		}
		if PreRegistered() {
			return fmt.Errorf("NRI connection handed over by the runtime closed: %w", err)
		}
		if time.Since(started) > 10*maxBackoff {
			backoff = minBackoff // it was up for a while: this is a new outage
		}
		p.opts.Log.WithError(err).Warnf("NRI connection to %s lost; reconnecting in %s", p.opts.Socket, backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// stubEnv is os.Getenv; a variable so tests can pretend the runtime launched us.
var stubEnv = os.Getenv

// PreRegistered reports whether the runtime launched this process as a plugin.
func PreRegistered() bool {
	return stubEnv(api.PluginSocketEnvVar) != ""
}

func (p *Plugin) serveOnce(ctx context.Context) error {
	closed := make(chan struct{})
	var once sync.Once
	opts := []stub.Option{
		stub.WithOnClose(func() { once.Do(func() { close(closed) }) }),
		stub.WithLogger(nriLogger{p.opts.Log}),
	}
	// The connection is ours to close: a runtime that dies between accepting the
	// registration and configuring us would otherwise leave Start waiting forever.
	var conn net.Conn
	var connMu sync.Mutex
	if !PreRegistered() {
		opts = append(opts, stub.WithSocketPath(p.opts.Socket),
			stub.WithPluginName(p.opts.Name), stub.WithPluginIdx(p.opts.Index),
			stub.WithDialer(func(path string) (net.Conn, error) {
				c, err := net.Dial("unix", path)
				connMu.Lock()
				conn = c
				connMu.Unlock()
				return c, err
			}))
	}
	s, err := stub.New(&adapter{p: p}, opts...)
	if err != nil {
		return fmt.Errorf("create NRI stub: %w", err)
	}
	started := make(chan error, 1)
	go func() { started <- s.Start(ctx) }()
	var timeout <-chan time.Time
	if !PreRegistered() {
		// A runtime that launched us owns the timeouts of its own connection.
		timeout = time.After(registerTimeout)
	}
	select {
	case err := <-started:
		if err != nil {
			return fmt.Errorf("register with %s: %w", p.opts.Socket, err)
		}
	case <-timeout:
		connMu.Lock()
		if conn != nil {
			conn.Close()
		}
		connMu.Unlock()
		// The stub's Start holds its lock while it waits for Configure, so the goroutine
		// that runs it stays blocked (with the stub's own) if Configure never comes: a
		// small leak per abandoned registration, which this stub gives no way to avoid.
		// Should Configure arrive after all, that stub is stopped, not left registered.
		go func() {
			if err := <-started; err == nil {
				s.Stop()
			}
		}()
		return fmt.Errorf("register with %s: not configured within %s", p.opts.Socket, registerTimeout)
	}
	p.connected.Store(true)
	p.registrations.Add(1)
	p.opts.Log.Infof("registered with the runtime as NRI plugin %s-%s", p.opts.Index, p.opts.Name)
	defer p.connected.Store(false)
	select {
	case <-ctx.Done():
		s.Stop()
		return ctx.Err()
	case <-closed:
		return errors.New("connection closed")
	}
}

// adapter implements the stub's event interfaces on behalf of a Plugin.
type adapter struct{ p *Plugin }

// events are the ones podsock subscribes to; nothing else is worth a round trip.
var events = []string{
	"RunPodSandbox", "StopPodSandbox", "RemovePodSandbox",
	"PostCreateContainer", "StartContainer", "StopContainer", "RemoveContainer",
}

func (a *adapter) Configure(_ context.Context, config, runtime, version string) (stub.EventMask, error) {
	defer a.p.latency.since("Configure", time.Now())
	a.p.opts.Log.Infof("NRI configure from %s %s", runtime, version)
	if a.p.opts.Configure != nil {
		if err := a.p.opts.Configure(config); err != nil {
			return 0, err
		}
	}
	return api.ParseEventMask(events...)
}

func (a *adapter) Synchronize(_ context.Context, pods []*api.PodSandbox, ctrs []*api.Container) ([]*api.ContainerUpdate, error) {
	defer a.p.latency.since("Synchronize", time.Now())
	sbs := make([]runtimehooks.Sandbox, 0, len(pods))
	for _, pod := range pods {
		sbs = append(sbs, sandbox(pod))
	}
	cis := make([]runtimehooks.ContainerInfo, 0, len(ctrs))
	for _, c := range ctrs {
		cis = append(cis, container(c))
	}
	a.p.h.Synchronize(sbs, cis)
	return nil, nil
}

func (a *adapter) RunPodSandbox(_ context.Context, pod *api.PodSandbox) error {
	defer a.p.latency.since("RunPodSandbox", time.Now())
	a.p.h.RunPodSandbox(sandbox(pod))
	return nil
}

func (a *adapter) StopPodSandbox(_ context.Context, pod *api.PodSandbox) error {
	defer a.p.latency.since("StopPodSandbox", time.Now())
	a.p.h.StopPodSandbox(pod.GetId())
	return nil
}

func (a *adapter) RemovePodSandbox(_ context.Context, pod *api.PodSandbox) error {
	defer a.p.latency.since("RemovePodSandbox", time.Now())
	a.p.h.RemovePodSandbox(pod.GetId())
	return nil
}

func (a *adapter) PostCreateContainer(_ context.Context, _ *api.PodSandbox, c *api.Container) error {
	defer a.p.latency.since("PostCreateContainer", time.Now())
	a.p.h.ContainerCreated(container(c))
	return nil
}

func (a *adapter) StartContainer(_ context.Context, _ *api.PodSandbox, c *api.Container) error {
	defer a.p.latency.since("StartContainer", time.Now())
	a.p.h.ContainerStarted(container(c))
	return nil
}

func (a *adapter) StopContainer(_ context.Context, _ *api.PodSandbox, c *api.Container) ([]*api.ContainerUpdate, error) {
	defer a.p.latency.since("StopContainer", time.Now())
	a.p.h.StopContainer(container(c))
	return nil, nil
}

func (a *adapter) RemoveContainer(_ context.Context, _ *api.PodSandbox, c *api.Container) error {
	defer a.p.latency.since("RemoveContainer", time.Now())
	a.p.h.RemoveContainer(container(c))
	return nil
}

func sandbox(pod *api.PodSandbox) runtimehooks.Sandbox {
	s := runtimehooks.Sandbox{
		ID:          pod.GetId(),
		UID:         pod.GetUid(),
		Namespace:   pod.GetNamespace(),
		Name:        pod.GetName(),
		Labels:      pod.GetLabels(),
		Annotations: pod.GetAnnotations(),
		IPs:         pod.GetIps(),
		Pid:         pod.GetPid(),
	}
	if l := pod.GetLinux(); l != nil {
		s.CgroupParent = l.GetCgroupParent()
		s.CgroupsPath = l.GetCgroupsPath()
		for _, ns := range l.GetNamespaces() {
			if ns.GetType() == "network" {
				s.NetnsPath = ns.GetPath()
			}
		}
	}
	return s
}

func container(c *api.Container) runtimehooks.ContainerInfo {
	ci := runtimehooks.ContainerInfo{
		ID:        c.GetId(),
		SandboxID: c.GetPodSandboxId(),
		Name:      c.GetName(),
		Pid:       c.GetPid(),
	}
	if ci.Name == "" {
		// CRI-O leaves the name empty and puts it in a label.
		ci.Name = c.GetLabels()["io.kubernetes.container.name"]
	}
	if l := c.GetLinux(); l != nil {
		ci.CgroupsPath = l.GetCgroupsPath()
	}
	return ci
}

// nriLogger routes the NRI library's logging into ours, one level down: its Info lines
// are routine for us.
type nriLogger struct{ log logrus.FieldLogger }

func (l nriLogger) Debugf(_ context.Context, f string, a ...any) { l.log.Debugf("nri: "+f, a...) }
func (l nriLogger) Infof(_ context.Context, f string, a ...any)  { l.log.Debugf("nri: "+f, a...) }
func (l nriLogger) Warnf(_ context.Context, f string, a ...any)  { l.log.Warnf("nri: "+f, a...) }
func (l nriLogger) Errorf(_ context.Context, f string, a ...any) { l.log.Errorf("nri: "+f, a...) }

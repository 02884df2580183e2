package agent

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/config"
	"github.com/podsock/podsock/kubesource"
	"github.com/podsock/podsock/service"
)

// newKubernetesSource builds the Kubernetes source of [kubernetes], nil when it is off. It
// runs before the datapath is touched, so that a kubeconfig that does not load stops the
// agent with one line and changes nothing.
func (a *Agent) newKubernetesSource(cfg config.Kubernetes) error {
	a.kubeCfg = cfg
	if !cfg.Enabled {
		return nil
	}
	node, err := nodeName(cfg.NodeName)
	if err != nil {
		return err
	}
	src, err := kubesource.New(kubesource.Options{
		Kubeconfig: cfg.Kubeconfig, NodeName: node, ServiceProxyName: cfg.ServiceProxyName,
		QPS: float32(cfg.QPS), Burst: cfg.Burst, MinSyncPeriod: time.Duration(cfg.MinSyncPeriod),
		Publish:    a.publishKubernetes,
		Log:        a.log.WithField("source", "kubernetes"),
		Registerer: a.metrics.registry,
	})
	if err != nil {
		return fmt.Errorf("kubernetes source: %w", err)
	}
	routeKlog(a.log)
	a.kube = src
	return nil
}

// publishKubernetes hands the source's snapshot to the reconciler; the first synced one
// that applies makes the agent ready, as far as Kubernetes goes.
func (a *Agent) publishKubernetes(s service.Snapshot) <-chan error {
	done := a.publishOnceUp(s)
	if !s.Synced || a.ready.kubeSynced.Load() {
		return done
	}
	out := make(chan error, 1)
	go func() {
		err := <-done
		if err == nil {
			a.ready.kubeSynced.Store(true)
		}
		out <- err
	}()
	return out
}

// runKubernetes watches the API server until ctx ends; the returned func waits for the
// watch to wind down. A source that stops on its own leaves the services it published
// serving: the datapath keeps them, and so does the next agent.
func (a *Agent) runKubernetes(ctx context.Context) (wait func()) {
	if a.kube == nil {
		return func() {}
	}
	a.kubeStopped = ctx.Done()
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := a.kube.Run(ctx); err != nil && ctx.Err() == nil {
			a.log.WithError(err).Error("kubernetes source stopped; its services keep serving as last synced")
		}
	}()
	return func() {
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			a.log.Warn("kubernetes source still winding down")
		}
	}
}

// publishOnceUp hands a snapshot of the Kubernetes source to the reconciler, once start
// has made it: the source may have listed the cluster before the datapath loaded.
func (a *Agent) publishOnceUp(s service.Snapshot) <-chan error {
	select {
	case <-a.reconcilerUp:
		return a.sources.Publish(s)
	default:
	}
	out := make(chan error, 1)
	go func() {
		select {
		case <-a.reconcilerUp:
			out <- <-a.sources.Publish(s)
		case <-a.kubeStopped:
			// The source stops too: it no longer waits for this.
			out <- service.ErrClosed
		}
	}()
	return out
}

// nodeName is [kubernetes] node_name, else $NODE_NAME (a DaemonSet's downward API), else
// the hostname, as kube-proxy picks it.
func nodeName(configured string) (string, error) {
	if configured != "" {
		return configured, nil
	}
	if n := os.Getenv("NODE_NAME"); n != "" {
		return n, nil
	}
	h, err := os.Hostname()
	if err != nil {
		return "", fmt.Errorf("kubernetes node name: none configured, and the hostname: %w", err)
	}
	return h, nil
}

// kubernetesStatus adds what the Kubernetes source says of itself to its line in status.
func (a *Agent) kubernetesStatus(s *api.SourceStatus) {
	if a.kube == nil || s.Name != string(service.SourceKubernetes) {
		return
	}
	st := a.kube.Status()
	s.State, s.Syncs, s.Warning, s.SkippedServicePorts = st.State, st.Syncs, st.Warning, st.Skipped
	s.CachesSyncedSeconds = st.CachesSynced.Seconds()
	if !st.LastSync.IsZero() {
		last := st.LastSync
		s.LastSync, s.LastSyncSeconds = &last, st.LastSyncDuration.Seconds()
	}
}

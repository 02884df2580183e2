package kubesource

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"reflect"
	"runtime"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/podsock/podsock/service"
)

const sourceName = service.SourceKubernetes

// Status.State values.
const (
	StateConnecting  = "connecting"  // never synced
	StateSynced      = "synced"      // the API server answers and its view is applied
	StateUnreachable = "unreachable" // the API server does not answer; the last view keeps serving
)

const (
	defaultMinSyncPeriod = 100 * time.Millisecond
	// The probe tells "unreachable" from "synced" while the watches are quiet; the
	// watches tell it at once when they break.
	probeInterval = 2 * time.Second
	probeTimeout  = 2 * time.Second
	// An apply that failed is tried again after these, doubling.
	retryMin, retryMax = time.Second, 30 * time.Second

	sliceServiceIndex = "service" // EndpointSlices by namespace/service-name
)

// Options configures a Source.
type Options struct {
	Kubeconfig       string  // "" = in-cluster service account (rest.InClusterConfig)
	NodeName         string  // resolved by the caller ($NODE_NAME, hostname)
	ServiceProxyName string  // as [kubernetes] service_proxy_name
	QPS              float32 // 0 = client-go's default
	Burst            int     // 0 = client-go's default
	// MinSyncPeriod is the coalescing window, as kube-proxy's --min-sync-period: after a
	// publish, what changes within it goes into one snapshot. 0 = 100ms.
	MinSyncPeriod time.Duration
	// Publish hands a snapshot to the reconciler; the channel says how the apply that took
	// it went. The snapshot's slices are shared with the Source's cache: read-only.
	Publish    func(service.Snapshot) <-chan error
	Log        logrus.FieldLogger    // nil = logrus's standard logger
	Registerer prometheus.Registerer // nil = metrics not registered
}

// Status is what `podsock status` shows of the source.
type Status struct {
	State            string
	LastSync         time.Time     // the last snapshot applied
	LastSyncDuration time.Duration // translate + apply time of that snapshot
	Syncs            uint64        // snapshots applied
	// CachesSynced is how long the first list took: from Run until every informer's
	// cache had synced. It is what a cold start spends before it can translate.
	CachesSynced time.Duration
	NodeAccess   bool   // false: the role cannot read nodes → no zone, no NodePort
	Warning      string // one line, e.g. the nodes degradation
	LastError    string // why it does not sync yet, or why the API server is unreachable
	Services     int    // Kubernetes service ports translated
	Skipped      int    // service ports, or frontends of one, skipped (SCTP, ...)
}

// Source watches the API server and publishes what it serves, as whole snapshots, to
// the reconciler: the first once its informers' caches have synced, then one after each
// burst of changes, at most one per MinSyncPeriod, and none while nothing changes (the
// API server down among those times). Each Service is translated again only when it or
// its slices change, or the Node does.
type Source struct {
	opts             Options
	log              logrus.FieldLogger
	client           *client
	metrics          *metrics
	servicesSelector labels.Selector
	slicesSelector   labels.Selector
	running          atomic.Bool
	changed          chan struct{} // a change is pending; holds at most one

	mu          sync.Mutex
	pending     pendingChanges
	node        NodeInfo
	nodesDenied bool
	measuring   bool      // changes count for the programming latency from now on
	startedAt   time.Time // trigger times before it are not ours to measure
	reachable   bool
	refusals    sets.Set[string] // refusals logged, by resource and reason
	status      Status

	// The sync loop's own.
	translated  map[types.NamespacedName]translation
	published   bool // a snapshot has been applied
	unpublished bool // a translation changed since the last snapshot applied
	closed      bool // the reconciler is closed: nothing more to publish
	retryDelay  time.Duration
}

// pendingChanges are the changes seen since the last sync took them.
type pendingChanges struct {
	services sets.Set[types.NamespacedName] // to translate again
	all      bool                           // every Service (the Node changed)
	// triggers are the last-change-trigger-times of the slices changed, by Service.
	triggers map[types.NamespacedName][]time.Time
}

func newPendingChanges() pendingChanges {
	return pendingChanges{services: sets.New[types.NamespacedName](), triggers: map[types.NamespacedName][]time.Time{}}
}

// New builds the client from the kubeconfig (or the in-cluster service account) and
// registers the metrics; it does not contact the API server.
func New(opts Options) (*Source, error) {
	switch {
	case opts.NodeName == "":
		return nil, errors.New("kubernetes source: no node name")
	case opts.Publish == nil:
		return nil, errors.New("kubernetes source: no Publish")
	}
	if opts.MinSyncPeriod <= 0 {
		opts.MinSyncPeriod = defaultMinSyncPeriod
	}
	if opts.Log == nil {
		opts.Log = logrus.StandardLogger()
	}
	servicesSel, err := selector(opts.ServiceProxyName, true)
	if err != nil {
		return nil, fmt.Errorf("kubernetes source: %w", err)
	}
	// A slice carries its Service's labels only when the EndpointSlice controller wrote
	// it; one written by hand for a Service of ours may lack service_proxy_name, so
	// slices are filtered by it only where kube-proxy filters them: its absence.
	slicesSel, err := selector(opts.ServiceProxyName, opts.ServiceProxyName == "")
	if err != nil {
		return nil, fmt.Errorf("kubernetes source: %w", err)
	}
	cfg, err := restConfig(opts.Kubeconfig)
	if err != nil {
		return nil, err
	}
	preferList()
	if opts.QPS > 0 {
		cfg.QPS = opts.QPS
	}
	if opts.Burst > 0 {
		cfg.Burst = opts.Burst
	}
	cfg.UserAgent = "podsock"
	// As kube-proxy: protobuf is much cheaper to decode for large lists.
	cfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	client, err := newClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes source: client: %w", err)
	}
	m, err := newMetrics(opts.Registerer)
	if err != nil {
		return nil, fmt.Errorf("kubernetes source: %w", err)
	}
	return &Source{
		opts: opts, log: opts.Log, client: client, metrics: m,
		servicesSelector: servicesSel, slicesSelector: slicesSel,
		changed:    make(chan struct{}, 1),
		pending:    newPendingChanges(),
		node:       NodeInfo{Name: opts.NodeName},
		reachable:  true,
		refusals:   sets.New[string](),
		status:     Status{State: StateConnecting, NodeAccess: true},
		translated: map[types.NamespacedName]translation{},
	}, nil
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("kubernetes source: in-cluster config (no kubeconfig given): %w", err)
		}
		return cfg, nil
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubernetes source: kubeconfig %s: %w", kubeconfig, err)
	}
	return cfg, nil
}

// Status is the source's state now.
func (s *Source) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status
}

// informers are the watches of one Run, and their handlers' registrations.
type informers struct {
	services, slices, nodes          cache.SharedIndexInformer
	servicesReg, slicesReg, nodesReg cache.ResourceEventHandlerRegistration
}

// Run watches until ctx is done, then returns nil once every watch has stopped. It may
// be called once.
func (s *Source) Run(ctx context.Context) error {
	if !s.running.CompareAndSwap(false, true) {
		return errors.New("kubernetes source: Run called twice")
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	s.mu.Lock()
	s.startedAt = time.Now()
	s.mu.Unlock()
	inf, err := s.informers()
	if err != nil {
		return err
	}
	wg.Go(func() { inf.services.RunWithContext(ctx) })
	wg.Go(func() { inf.slices.RunWithContext(ctx) })
	wg.Go(func() { inf.nodes.RunWithContext(ctx) })
	wg.Go(func() { s.probe(ctx) })

	// Without access to nodes there is no node cache to wait for.
	nodeKnown := func() bool { return inf.nodesReg.HasSynced() || s.nodeAccessDenied() }
	if !cache.WaitForCacheSync(ctx.Done(), inf.servicesReg.HasSynced, inf.slicesReg.HasSynced, nodeKnown) {
		return nil
	}
	s.mu.Lock()
	s.status.CachesSynced = time.Since(s.startedAt)
	s.mu.Unlock()
	if !s.nodeAccessDenied() && len(inf.nodes.GetStore().List()) == 0 {
		s.setNode(NodeInfo{Name: s.opts.NodeName})
	}
	s.loop(ctx, stores{
		services: corelisters.NewServiceLister(inf.services.GetIndexer()),
		slices:   inf.slices.GetIndexer(),
	})
	return nil
}

func (s *Source) informers() (informers, error) {
	withLabels := func(sel labels.Selector) func(*metav1.ListOptions) {
		return func(o *metav1.ListOptions) { o.LabelSelector = sel.String() }
	}
	inf := informers{
		services: informer(s.client.core, "services", &corev1.Service{}, cache.Indexers{}, withLabels(s.servicesSelector)),
		slices: informer(s.client.discovery, "endpointslices", &discoveryv1.EndpointSlice{},
			cache.Indexers{sliceServiceIndex: indexByService}, withLabels(s.slicesSelector)),
		nodes: informer(s.client.core, "nodes", &corev1.Node{}, cache.Indexers{}, onlyNode(s.opts.NodeName)),
	}
	errs := []error{
		inf.services.SetWatchErrorHandlerWithContext(s.watchErrors("services", nil)),
		inf.slices.SetWatchErrorHandlerWithContext(s.watchErrors("endpointslices", nil)),
		inf.nodes.SetWatchErrorHandlerWithContext(s.watchErrors("nodes", func(err error) {
			// A restarted API server refuses for a moment, until its RBAC cache is
			// filled: a role that could read the Node before keeps its last view of it.
			if inf.nodes.HasSynced() {
				s.refused("nodes", err)
			} else {
				s.denyNodes(err)
			}
		})),
	}
	for _, i := range []cache.SharedIndexInformer{inf.services, inf.slices, inf.nodes} {
		errs = append(errs, i.SetTransform(slim))
	}
	var err error
	inf.servicesReg, err = inf.services.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: s.serviceChanged,
		UpdateFunc: func(old, cur any) {
			if !sameVersion(old, cur) {
				s.serviceChanged(cur)
			}
		},
		DeleteFunc: s.serviceChanged,
	})
	errs = append(errs, err)
	inf.slicesReg, err = inf.slices.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { s.sliceChanged(obj, false) },
		UpdateFunc: func(old, cur any) {
			if sameVersion(old, cur) {
				return
			}
			if o, c := sliceServiceOf(old), sliceServiceOf(cur); o != c {
				s.sliceChanged(old, true) // relabelled: it left its old Service
			}
			s.sliceChanged(cur, false)
		},
		DeleteFunc: func(obj any) { s.sliceChanged(obj, true) },
	})
	errs = append(errs, err)
	inf.nodesReg, err = inf.nodes.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { s.setNode(nodeInfo(s.opts.NodeName, obj)) },
		UpdateFunc: func(_, cur any) { s.setNode(nodeInfo(s.opts.NodeName, cur)) },
		DeleteFunc: func(any) { s.setNode(NodeInfo{Name: s.opts.NodeName}) },
	})
	errs = append(errs, err)
	if err := errors.Join(errs...); err != nil {
		return informers{}, fmt.Errorf("kubernetes source: informers: %w", err)
	}
	return inf, nil
}

// stores are the informers' caches the sync loop reads.
type stores struct {
	services corelisters.ServiceLister
	slices   cache.Indexer
}

func indexByService(obj any) ([]string, error) {
	slice, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil, nil
	}
	if key, ok := sliceService(slice); ok {
		return []string{key.String()}, nil
	}
	return nil, nil
}

// dropManagedFields keeps the caches small: the managed fields are most of a Service.
func dropManagedFields(obj any) (any, error) {
	if m, err := meta.Accessor(obj); err == nil {
		m.SetManagedFields(nil)
	}
	return obj, nil
}

// sameVersion says an update changed nothing: a relist after a reconnect hands every
// object over again.
func sameVersion(old, cur any) bool {
	o, err1 := meta.Accessor(old)
	c, err2 := meta.Accessor(cur)
	return err1 == nil && err2 == nil && o.GetResourceVersion() == c.GetResourceVersion()
}

// objectOf unwraps the tombstone of a delete the informer missed.
func objectOf[T any](obj any) (T, bool) {
	if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = tomb.Obj
	}
	o, ok := obj.(T)
	return o, ok
}

func (s *Source) serviceChanged(obj any) {
	if svc, ok := objectOf[*corev1.Service](obj); ok {
		s.changes(types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}, time.Time{}, false)
	}
}

func sliceServiceOf(obj any) types.NamespacedName {
	slice, _ := objectOf[*discoveryv1.EndpointSlice](obj)
	if slice == nil {
		return types.NamespacedName{}
	}
	key, _ := sliceService(slice)
	return key
}

func (s *Source) sliceChanged(obj any, removed bool) {
	slice, ok := objectOf[*discoveryv1.EndpointSlice](obj)
	if !ok {
		return
	}
	key, ok := sliceService(slice)
	if !ok {
		return
	}
	var trigger time.Time
	if !removed {
		trigger = triggerTime(slice)
	}
	s.changes(key, trigger, removed)
}

// triggerTime is when the change a slice carries began, as the EndpointSlice controller
// records it; zero when it did not.
func triggerTime(slice *discoveryv1.EndpointSlice) time.Time {
	t, err := time.Parse(time.RFC3339Nano, slice.Annotations[corev1.EndpointsLastChangeTriggerTime])
	if err != nil {
		return time.Time{}
	}
	return t
}

// changes records that a Service (or its slices) changed. As kube-proxy, the trigger
// times of a Service whose slice went are dropped: a deleted slice's annotation is the
// time of its last update, not of the deletion.
func (s *Source) changes(key types.NamespacedName, trigger time.Time, removed bool) {
	s.mu.Lock()
	s.pending.services.Insert(key)
	switch {
	case removed:
		delete(s.pending.triggers, key)
	case s.measuring && trigger.After(s.startedAt):
		s.pending.triggers[key] = append(s.pending.triggers[key], trigger)
	}
	s.mu.Unlock()
	s.notify()
}

func (s *Source) notify() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// nodeInfo reads what Translate needs of this node's Node object.
func nodeInfo(name string, obj any) NodeInfo {
	info := NodeInfo{Name: name}
	n, ok := objectOf[*corev1.Node](obj)
	if !ok {
		return info
	}
	info.Known, info.Zone = true, n.Labels[corev1.LabelTopologyZone]
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP && a.Type != corev1.NodeExternalIP {
			continue
		}
		if ip, ok := parseIP(a.Address); ok && !slices.Contains(info.Addresses, ip) {
			info.Addresses = append(info.Addresses, ip)
		}
	}
	return info
}

// setNode takes what the Node says now; a change translates every Service again. That it
// says anything means the role may read it.
func (s *Source) setNode(info NodeInfo) {
	s.mu.Lock()
	allowed := s.nodesDenied
	if allowed {
		s.nodesDenied, s.status.NodeAccess, s.status.Warning = false, true, ""
	}
	was := s.node
	s.node = info
	missing := fmt.Sprintf("node %s not found: no zone, no NodePort", info.Name)
	appeared, vanished := info.Known && s.status.Warning == missing, !info.Known && s.status.Warning != missing
	switch {
	case appeared:
		s.status.Warning = ""
	case vanished:
		s.status.Warning = missing
	}
	changed := was.Name != info.Name || was.Zone != info.Zone || was.Known != info.Known || !slices.Equal(was.Addresses, info.Addresses)
	if changed {
		s.pending.all = true
	}
	s.mu.Unlock()
	if allowed {
		s.log.Infof("kubernetes: may read node %s now", info.Name)
	}
	switch {
	case vanished:
		s.log.Warnf("kubernetes: node %s not found: serving without its zone and NodePorts until it appears", info.Name)
	case appeared:
		s.log.Infof("kubernetes: node %s found", info.Name)
	}
	if changed {
		s.notify()
	}
}

func (s *Source) nodeAccessDenied() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.nodesDenied
}

// denyNodes degrades when the role may not read nodes: no waiting for a node cache that
// cannot fill. The reflector keeps trying, slower and slower; should it succeed (the role
// granted later), setNode lifts the degradation.
func (s *Source) denyNodes(err error) {
	s.mu.Lock()
	if s.nodesDenied {
		s.mu.Unlock()
		return
	}
	s.nodesDenied = true
	s.node = NodeInfo{Name: s.opts.NodeName}
	s.pending.all = true
	s.status.NodeAccess = false
	s.status.Warning = "no access to nodes: no zone, no NodePort"
	s.mu.Unlock()
	s.log.Warnf("kubernetes: may not read node %s (%v): serving without its zone (no topology by zone) and without NodePorts", s.opts.NodeName, err)
	s.notify()
}

// watchErrors sorts what a watch failed with: the end of a watch is routine, a refusal
// (forbidden) is the role's, anything else means the API server does not answer.
func (s *Source) watchErrors(resource string, forbidden func(error)) cache.WatchErrorHandlerWithContext {
	return func(ctx context.Context, _ *cache.Reflector, err error) {
		var status apierrors.APIStatus
		switch {
		case ctx.Err() != nil, errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
			apierrors.IsResourceExpired(err), apierrors.IsGone(err):
			// The reflector lists or watches again by itself.
		case forbidden != nil && apierrors.IsForbidden(err):
			forbidden(err)
		case errors.As(err, &status):
			s.refused(resource, err)
		default:
			s.unreachable(err)
		}
	}
}

// refused logs, once per resource and reason, that the API server answers but refuses.
func (s *Source) refused(resource string, err error) {
	key := resource + "/" + string(apierrors.ReasonForError(err))
	s.mu.Lock()
	if s.status.State == StateConnecting {
		// Why it does not sync. Once synced, a refusal is the moment after an API
		// server's restart, or else the log says it.
		s.status.LastError = err.Error()
	}
	first := !s.refusals.Has(key)
	s.refusals.Insert(key)
	s.mu.Unlock()
	if first {
		s.log.Warnf("kubernetes: watch of %s refused: %v", resource, err)
	}
}

func (s *Source) unreachable(err error) {
	s.mu.Lock()
	was := s.reachable
	s.reachable = false
	s.status.LastError = err.Error()
	if s.status.State == StateSynced {
		s.status.State = StateUnreachable
	}
	s.mu.Unlock()
	if was {
		s.log.Warnf("kubernetes: API server unreachable, the last view keeps serving: %v", err)
	}
}

func (s *Source) answered() {
	s.mu.Lock()
	was := s.reachable
	s.reachable = true
	if !was {
		s.status.LastError = ""
	}
	if s.status.State == StateUnreachable {
		s.status.State = StateSynced
	}
	s.mu.Unlock()
	if !was {
		s.log.Info("kubernetes: API server answers again")
	}
}

// probe asks the API server whether it is ready, so that the state follows it while
// the watches have nothing to say.
func (s *Source) probe(ctx context.Context) {
	tick := time.NewTicker(probeInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		pctx, cancel := context.WithTimeout(ctx, probeTimeout)
		err := s.client.core.Get().AbsPath("/readyz").Do(pctx).Error()
		cancel()
		var status apierrors.APIStatus
		switch {
		case ctx.Err() != nil:
			return
		case err == nil, errors.As(err, &status) && status.Status().Code < 500:
			s.answered() // a refusal is an answer too
		default:
			s.unreachable(fmt.Errorf("readyz: %w", err))
		}
	}
}

// loop syncs at once, then after each change, at most once per MinSyncPeriod: what
// changes meanwhile waits and goes into the same snapshot.
func (s *Source) loop(ctx context.Context, st stores) {
	for {
		began := time.Now()
		s.sync(ctx, st)
		select {
		case <-ctx.Done():
			return
		case <-s.changed:
		}
		if wait := s.opts.MinSyncPeriod - time.Since(began); wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
	}
}

// sync translates what changed and publishes the whole view when any translation did
// (or when the last publish failed), and waits for its apply.
func (s *Source) sync(ctx context.Context, st stores) {
	began := time.Now()
	changes, node := s.takeChanges()
	keys := changes.services
	if changes.all {
		for key := range s.translated {
			keys.Insert(key)
		}
		svcs, _ := st.services.List(labels.Everything())
		for _, svc := range svcs {
			keys.Insert(types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name})
		}
	}
	keyList := keys.UnsortedList()
	translations := s.translateAll(st, keyList, node)
	for i, key := range keyList {
		t := translations[i]
		old := s.translated[key]
		if reflect.DeepEqual(old, t) {
			continue
		}
		s.unpublished = true
		s.logNewSkips(old.skips, t.skips)
		if len(t.services) == 0 && len(t.skips) == 0 {
			delete(s.translated, key)
		} else {
			s.translated[key] = t
		}
	}
	if s.closed || (s.published && !s.unpublished) {
		// Nothing to program: the view already has these changes.
		s.observeProgramming(changes.triggers, time.Now())
		return
	}
	snap, ports, skipped := s.snapshot()
	var err error
	select {
	case err = <-s.opts.Publish(snap):
	case <-ctx.Done():
		return
	}
	if err != nil {
		s.applyFailed(err, changes.triggers)
		return
	}
	applied := time.Now()
	took := applied.Sub(began)
	first := !s.published
	s.published, s.unpublished, s.retryDelay = true, false, 0
	s.observeProgramming(changes.triggers, applied)
	s.metrics.sync.Observe(took.Seconds())
	s.metrics.skipped.Set(float64(skipped))
	s.mu.Lock()
	s.status.LastSync, s.status.LastSyncDuration = applied, took
	s.status.Syncs++
	s.status.Services, s.status.Skipped = ports, skipped
	if first {
		// The caches have just synced: the API server answered.
		s.status.State, s.reachable, s.status.LastError = StateSynced, true, ""
	}
	s.mu.Unlock()
	if first {
		s.log.Infof("kubernetes: first sync applied: %d service ports, %d frontends, in %v", ports, len(snap.Services), took.Round(time.Millisecond))
		// The first list and translation of a large cluster are a peak the agent never
		// sees again: each list was decoded whole before the slim forms were kept, and
		// the heap grew to twice that. The runtime would hand the pages back over
		// minutes; at once, what the agent holds is what it needs (measured at 10,000
		// Services: 180 MiB before the slim forms, 117-122 MiB with them and this).
		go debug.FreeOSMemory()
	}
}

// takeChanges returns the changes pending, and the Node they are to be translated for.
// The first sync translates everything, and from then on changes count for the
// programming latency.
func (s *Source) takeChanges() (pendingChanges, NodeInfo) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.pending
	s.pending = newPendingChanges()
	if !s.measuring {
		c.all, s.measuring = true, true
	}
	return c, s.node
}

// parallelTranslations is how many Services make it worth translating them on every
// CPU: the first sync of a large cluster translates them all, on the critical path of
// the agent's start.
const parallelTranslations = 512

// translateAll translates keys, result i being key i's.
func (s *Source) translateAll(st stores, keys []types.NamespacedName, node NodeInfo) []translation {
	out := make([]translation, len(keys))
	workers := min(runtime.GOMAXPROCS(0), len(keys)/parallelTranslations+1)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := w; i < len(keys); i += workers {
				out[i] = s.translate(st, keys[i], node)
			}
		})
	}
	wg.Wait()
	return out
}

// translate is safe to call concurrently: it only reads the informers' caches.
func (s *Source) translate(st stores, key types.NamespacedName, node NodeInfo) translation {
	svc, err := st.services.Services(key.Namespace).Get(key.Name)
	if err != nil {
		return translation{} // gone
	}
	objs, err := st.slices.ByIndex(sliceServiceIndex, key.String())
	if err != nil {
		s.log.Errorf("kubernetes: slices of %s: %v", key, err) // only if the index were missing
	}
	endpointSlices := make([]*discoveryv1.EndpointSlice, 0, len(objs))
	for _, o := range objs {
		if slice, ok := o.(*discoveryv1.EndpointSlice); ok {
			endpointSlices = append(endpointSlices, slice)
		}
	}
	return translateService(svc, endpointSlices, node, s.servicesSelector)
}

// logNewSkips logs each skip once, when it appears.
func (s *Source) logNewSkips(old, cur []Skip) {
	for _, skip := range cur {
		if !slices.Contains(old, skip) {
			s.log.Warnf("kubernetes: skipped %s", skip)
		}
	}
}

// snapshot joins the translations in Translate's order. Each translation is sorted
// already, and two Services' names never interleave: "ns/a:port" and "ns/b:port" compare
// on a character of "ns/a" or "ns/b", or on ':' against a character a name cannot have;
// so sorting the Services by one of their names sorts the whole, at a fraction of the
// cost of moving every frontend around.
func (s *Source) snapshot() (snap service.Snapshot, ports, skipped int) {
	n := 0
	groups := make([]*translation, 0, len(s.translated))
	for _, t := range s.translated {
		n += len(t.services)
		ports += t.ports
		skipped += len(t.skips)
		if len(t.services) > 0 {
			groups = append(groups, &t)
		}
	}
	slices.SortFunc(groups, func(a, b *translation) int { return cmp.Compare(a.services[0].Name, b.services[0].Name) })
	svcs := make([]service.Service, 0, n)
	for _, t := range groups {
		svcs = append(svcs, t.services...)
	}
	return service.Snapshot{Source: sourceName, Services: svcs, Synced: true}, ports, skipped
}

// applyFailed keeps the changes for the next try, which comes after a backoff, unless
// the reconciler closed (the agent stops).
func (s *Source) applyFailed(err error, triggers map[types.NamespacedName][]time.Time) {
	s.mu.Lock()
	for key, times := range triggers {
		s.pending.triggers[key] = append(times, s.pending.triggers[key]...)
	}
	s.mu.Unlock()
	if errors.Is(err, service.ErrClosed) {
		s.closed = true
		s.log.Info("kubernetes: the reconciler closed; nothing more is published")
		return
	}
	s.retryDelay = min(max(2*s.retryDelay, retryMin), retryMax)
	s.log.Warnf("kubernetes: apply failed, trying again in %v: %v", s.retryDelay, err)
	time.AfterFunc(s.retryDelay, s.notify)
}

func (s *Source) observeProgramming(triggers map[types.NamespacedName][]time.Time, at time.Time) {
	for _, times := range triggers {
		for _, t := range times {
			s.metrics.programming.Observe(at.Sub(t).Seconds())
		}
	}
}

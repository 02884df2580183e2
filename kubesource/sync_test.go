package kubesource

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	logrustest "github.com/sirupsen/logrus/hooks/test"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/podsock/podsock/service"
)

// The sync loop without an API server: stores filled by hand, as the informers fill
// them, and changes recorded as their handlers record them.

// nowhere is a kubeconfig that New accepts; nothing here contacts its server.
func nowhere(t testing.TB) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "kubeconfig")
	cfg := "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n" +
		"users: [{name: u, user: {token: t}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n"
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// fakeReconciler answers each publish with the next of errs, then with nil.
type fakeReconciler struct {
	snaps []service.Snapshot
	errs  []error
}

func (f *fakeReconciler) publish(snap service.Snapshot) <-chan error {
	f.snaps = append(f.snaps, snap)
	done := make(chan error, 1)
	var err error
	if len(f.errs) > 0 {
		err, f.errs = f.errs[0], f.errs[1:]
	}
	done <- err
	return done
}

type syncFixture struct {
	src      *Source
	rec      *fakeReconciler
	reg      *prometheus.Registry
	services cache.Indexer
	slices   cache.Indexer
}

func newSyncFixture(t testing.TB, n int) *syncFixture {
	t.Helper()
	f := &syncFixture{
		rec:      &fakeReconciler{},
		reg:      prometheus.NewRegistry(),
		services: cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{}),
		slices:   cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{sliceServiceIndex: indexByService}),
	}
	log, _ := logrustest.NewNullLogger()
	var err error
	f.src, err = New(Options{Kubeconfig: nowhere(t), NodeName: testNode, Publish: f.rec.publish, Log: log, Registerer: f.reg})
	if err != nil {
		t.Fatal(err)
	}
	f.src.startedAt = time.Now().Add(-time.Hour)
	for i := range n {
		name := fmt.Sprintf("svc-%05d", i)
		svc := webService(func(s *corev1.Service) {
			s.Name = name
			s.ResourceVersion = "1"
			s.Spec.ClusterIPs = []string{fmt.Sprintf("10.96.%d.%d", i/250, i%250+1)}
		})
		slice := webSlice(name+"-1", ep(fmt.Sprintf("10.88.%d.%d", i/250, i%250+1)), ep(fmt.Sprintf("10.89.%d.%d", i/250, i%250+1)))
		slice.Labels[discoveryv1.LabelServiceName] = name
		if err := f.services.Add(svc); err != nil {
			t.Fatal(err)
		}
		if err := f.slices.Add(slice); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func (f *syncFixture) sync() {
	f.src.sync(context.Background(), stores{services: corelisters.NewServiceLister(f.services), slices: f.slices})
}

// setEndpoints changes the slice of service i as an informer would, and tells the source.
func (f *syncFixture) setEndpoints(t testing.TB, i int, addrs ...string) {
	t.Helper()
	name := fmt.Sprintf("svc-%05d", i)
	var eps []discoveryv1.Endpoint
	for _, a := range addrs {
		eps = append(eps, ep(a))
	}
	slice := webSlice(name+"-1", eps...)
	slice.Labels[discoveryv1.LabelServiceName] = name
	slice.Annotations = map[string]string{corev1.EndpointsLastChangeTriggerTime: time.Now().Format(time.RFC3339Nano)}
	if err := f.slices.Update(slice); err != nil {
		t.Fatal(err)
	}
	f.src.sliceChanged(slice, false)
}

func key(i int) types.NamespacedName {
	return types.NamespacedName{Namespace: metav1.NamespaceDefault, Name: fmt.Sprintf("svc-%05d", i)}
}

func TestSyncPublishesOnlyChangesAndTranslatesOnlyWhatChanged(t *testing.T) {
	const n = 100
	f := newSyncFixture(t, n)
	f.sync()
	if len(f.rec.snaps) != 1 || len(f.rec.snaps[0].Services) != n || !f.rec.snaps[0].Synced {
		t.Fatalf("first sync: %d snapshots", len(f.rec.snaps))
	}
	before := map[types.NamespacedName]*service.Service{}
	for k, tr := range f.src.translated {
		before[k] = &tr.services[0]
	}

	f.sync()
	if len(f.rec.snaps) != 1 {
		t.Errorf("a sync with nothing changed published")
	}

	f.setEndpoints(t, 7, "10.77.0.1")
	f.sync()
	if len(f.rec.snaps) != 2 {
		t.Fatalf("a slice change: %d snapshots, want 2", len(f.rec.snaps))
	}
	for _, s := range f.rec.snaps[1].Services {
		if s.Name == "default/svc-00007:http" && (len(s.Backends) != 1 || s.Backends[0].Addr.String() != "10.77.0.1:8080") {
			t.Errorf("svc-00007 after its change: %v", s.Backends)
		}
	}
	for k, tr := range f.src.translated {
		if retranslated := &tr.services[0] != before[k]; retranslated != (k == key(7)) {
			t.Errorf("%s translated again: %v", k, retranslated)
		}
	}
	if n, _ := histogramCount(t, f.reg, "podsock_network_programming_duration_seconds"); n != 1 {
		t.Errorf("programming latency observed %d times, want 1", n)
	}

	if err := f.services.Delete(&corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: metav1.NamespaceDefault, Name: key(3).Name}}); err != nil {
		t.Fatal(err)
	}
	f.src.serviceChanged(&corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: metav1.NamespaceDefault, Name: key(3).Name}})
	f.sync()
	if got := len(f.rec.snaps[len(f.rec.snaps)-1].Services); got != n-1 {
		t.Errorf("after a delete: %d services, want %d", got, n-1)
	}
	if _, ok := f.src.translated[key(3)]; ok {
		t.Error("a deleted service stays in the cache")
	}
}

// A failed apply is tried again with the same view, its changes' latency still pending;
// a closed reconciler gets nothing more.
func TestSyncRetriesAFailedApply(t *testing.T) {
	f := newSyncFixture(t, 3)
	f.sync()
	f.rec.errs = []error{errors.New("datapath busy")}
	f.setEndpoints(t, 1, "10.77.0.1")
	f.sync()
	if len(f.rec.snaps) != 2 || f.src.Status().Syncs != 1 {
		t.Fatalf("%d snapshots, %d syncs after a failed apply", len(f.rec.snaps), f.src.Status().Syncs)
	}
	if n, _ := histogramCount(t, f.reg, "podsock_network_programming_duration_seconds"); n != 0 {
		t.Errorf("latency of a change not applied observed")
	}
	f.sync() // what the retry timer would do
	if len(f.rec.snaps) != 3 || f.src.Status().Syncs != 2 {
		t.Fatalf("%d snapshots, %d syncs after the retry", len(f.rec.snaps), f.src.Status().Syncs)
	}
	if summary(f.rec.snaps[2].Services)[1] != summary(f.rec.snaps[1].Services)[1] {
		t.Errorf("the retry published another view")
	}
	if n, _ := histogramCount(t, f.reg, "podsock_network_programming_duration_seconds"); n != 1 {
		t.Errorf("programming latency observed %d times after the retry, want 1", n)
	}

	f.rec.errs = []error{service.ErrClosed}
	f.setEndpoints(t, 1, "10.77.0.2")
	f.sync()
	f.setEndpoints(t, 1, "10.77.0.3")
	f.sync()
	if len(f.rec.snaps) != 4 {
		t.Errorf("%d snapshots: published after the reconciler closed", len(f.rec.snaps))
	}
}

// A Node change translates every Service again; only those it changes are published.
func TestSyncNodeChange(t *testing.T) {
	f := newSyncFixture(t, 3)
	f.src.setNode(thisNode)
	f.sync()
	if f.src.Status().Warning != "" {
		t.Errorf("warning with the node known: %q", f.src.Status().Warning)
	}
	f.src.setNode(thisNode)
	f.sync()
	if len(f.rec.snaps) != 1 {
		t.Errorf("the same Node again published")
	}
	f.src.setNode(NodeInfo{Name: testNode})
	if w := f.src.Status().Warning; w == "" {
		t.Error("no warning with the Node gone")
	}
	f.sync() // ClusterIPs only: nothing the Node changes
	if len(f.rec.snaps) != 1 {
		t.Errorf("a Node change that changes no service published")
	}
}

// One slice change among 10,000 Services: only that Service is translated again, so the
// sync costs the snapshot's assembly, not 10,000 translations.
func BenchmarkSyncOneChangeAt10k(b *testing.B) {
	f := newSyncFixture(b, 10_000)
	f.sync()
	b.ResetTimer()
	for i := range b.N {
		f.setEndpoints(b, i%10_000, fmt.Sprintf("10.77.%d.%d", i/250%250, i%250+1))
		f.sync()
	}
}

func BenchmarkTranslate10k(b *testing.B) {
	f := newSyncFixture(b, 10_000)
	in := Input{Node: thisNode}
	for _, o := range f.services.List() {
		in.Services = append(in.Services, o.(*corev1.Service))
	}
	for _, o := range f.slices.List() {
		in.EndpointSlices = append(in.EndpointSlices, o.(*discoveryv1.EndpointSlice))
	}
	b.ResetTimer()
	for range b.N {
		Translate(in)
	}
}

// The snapshot is in Translate's order (name, then frontend key) though it sorts only
// whole Services: names that are prefixes of others, ports around them, namespaces too.
func TestSnapshotOrder(t *testing.T) {
	f := newSyncFixture(t, 0)
	i := 0
	for _, ns := range []string{"n", "n-1", "n0", "na"} {
		for _, name := range []string{"a", "a-b", "a0", "ab", "a-0"} {
			i++
			svc := webService(func(s *corev1.Service) {
				s.Namespace, s.Name = ns, name
				s.Spec.ClusterIPs = []string{fmt.Sprintf("10.96.0.%d", i)}
				s.Spec.ExternalIPs = []string{fmt.Sprintf("203.0.113.%d", i)}
				s.Spec.Ports = []corev1.ServicePort{{Name: "z", Port: 80}, {Name: "0", Port: 81}, {Name: "a-1", Port: 82}}
			})
			if err := f.services.Add(svc); err != nil {
				t.Fatal(err)
			}
		}
	}
	f.sync()
	got := f.rec.snaps[0].Services
	want := slices.Clone(got)
	sortServices(want)
	if g, w := summary(got), summary(want); !slices.Equal(g, w) {
		t.Errorf("snapshot order:\n got %s\nwant %s", strings.Join(g, "\n     "), strings.Join(w, "\n     "))
	}
	if len(got) != 4*5*3*2 {
		t.Errorf("%d services, want %d", len(got), 4*5*3*2)
	}
}

package kubesource

import (
	"fmt"
	"sync"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
)

// The source reads three kinds of one version each. client-go's clientset and its typed
// informers would link every API group the cluster has and register them all in a scheme
// at the agent's start, whether Kubernetes is on or not: that was 20 MB of the binary and
// 9 MiB of every agent's RSS (file source included). Its REST client and informers are
// used directly instead, with a scheme of these kinds alone.

// client holds one REST client per API group read. They share one HTTP client, so its
// connections; each has its own rate limiter of [kubernetes] qps and burst, as each group
// of the clientset had.
type client struct {
	core, discovery *rest.RESTClient
}

// kinds is the codecs of the kinds the source reads, built on first use, so the file
// source never pays for them.
var kinds = sync.OnceValues(func() (serializer.CodecFactory, error) {
	scheme := runtime.NewScheme()
	builder := runtime.NewSchemeBuilder(corev1.AddToScheme, discoveryv1.AddToScheme)
	if err := builder.AddToScheme(scheme); err != nil {
		return serializer.CodecFactory{}, err
	}
	metav1.AddToGroupVersion(scheme, schema.GroupVersion{Version: "v1"})
	return rest.CodecFactoryForGeneratedClient(scheme, serializer.NewCodecFactory(scheme)), nil
})

func newClient(cfg *rest.Config) (*client, error) {
	codecs, err := kinds()
	if err != nil {
		return nil, fmt.Errorf("scheme: %w", err)
	}
	httpClient, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return nil, fmt.Errorf("http client: %w", err)
	}
	group := func(gv schema.GroupVersion, apiPath string) (*rest.RESTClient, error) {
		c := rest.CopyConfig(cfg)
		c.GroupVersion, c.APIPath = &gv, apiPath
		c.NegotiatedSerializer = codecs.WithoutConversion()
		return rest.RESTClientForConfigAndClient(c, httpClient)
	}
	core, err := group(corev1.SchemeGroupVersion, "/api")
	if err != nil {
		return nil, fmt.Errorf("%s client: %w", corev1.SchemeGroupVersion, err)
	}
	discovery, err := group(discoveryv1.SchemeGroupVersion, "/apis")
	if err != nil {
		return nil, fmt.Errorf("%s client: %w", discoveryv1.SchemeGroupVersion, err)
	}
	return &client{core: core, discovery: discovery}, nil
}

// informer watches one resource of all namespaces, its list options tweaked by tweak,
// as client-go's typed informers do (watch-list semantics included).
func informer(c *rest.RESTClient, resource string, obj runtime.Object, indexers cache.Indexers,
	tweak func(*metav1.ListOptions)) cache.SharedIndexInformer {
	lw := cache.NewFilteredListWatchFromClient(c, resource, metav1.NamespaceAll, tweak)
	return cache.NewSharedIndexInformerWithOptions(cache.ToListWatcherWithWatchListSemantics(lw, c), obj,
		cache.SharedIndexInformerOptions{Indexers: indexers})
}

// onlyNode selects the Node named.
func onlyNode(name string) func(*metav1.ListOptions) {
	sel := fields.OneTermEqualSelector(metav1.ObjectNameField, name).String()
	return func(o *metav1.ListOptions) { o.FieldSelector = sel }
}

package kubesource

import (
	"os"
	"sync"

	clientfeatures "k8s.io/client-go/features"
)

// The informers fill their caches with a LIST served from the API server's watch cache,
// not with client-go's default since 1.35, a watch that streams the initial objects one
// event at a time (WatchListClient). Measured here with 10,000 Services and 10,000
// EndpointSlices, on 2 vCPUs shared with the API server: the stream took 0.8-1.2 s until
// the caches synced, the LIST 0.4 s, for a brief peak of memory (the list is decoded
// whole) that the agent gives back after its first sync. The stream's benefit, a
// smaller peak on the API server for huge lists, matters less for one node's agent than
// its cold start. KUBE_FEATURE_WatchListClient, when set, decides as client-go would.
var listNotStream sync.Once

type gates struct{ clientfeatures.Gates }

func (g gates) Enabled(f clientfeatures.Feature) bool {
	if f == clientfeatures.WatchListClient {
		if _, set := os.LookupEnv("KUBE_FEATURE_" + string(f)); !set {
			return false
		}
	}
	return g.Gates.Enabled(f)
}

// preferList switches client-go's feature gates, which are the process's: it runs before
// any informer of the agent exists.
func preferList() {
	listNotStream.Do(func() { clientfeatures.ReplaceFeatureGates(gates{clientfeatures.FeatureGates()}) })
}

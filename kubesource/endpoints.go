package kubesource

import (
	"cmp"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/podsock/podsock/service"
)

// endpoint is one endpoint of a service port, as its slices give it.
type endpoint struct {
	service.Endpoint
	zoneHints, nodeHints []string
}

func (e endpoint) local(node string) bool { return node != "" && e.Node == node }

// endpointsOf merges the endpoints of one family that a service port has in its slices,
// as kube-proxy's EndpointSliceCache does: slices of the other family (and FQDN ones) are
// left out, the slice port is the one of the service port's name and protocol, only an
// endpoint's first address counts, and an address:port in several slices counts once.
// The result is sorted by address.
func endpointsOf(endpointSlices []*discoveryv1.EndpointSlice, port corev1.ServicePort, family corev1.IPFamily) []endpoint {
	wantType := discoveryv1.AddressTypeIPv4
	if family == corev1.IPv6Protocol {
		wantType = discoveryv1.AddressTypeIPv6
	}
	// By name, so that which of two copies of an endpoint wins does not depend on the
	// order the informer listed them in.
	sorted := slices.SortedFunc(slices.Values(endpointSlices), func(a, b *discoveryv1.EndpointSlice) int {
		return cmp.Compare(a.Name, b.Name)
	})
	var out []endpoint
	at := map[netip.AddrPort]int{}
	for _, slice := range sorted {
		if slice.AddressType != wantType {
			continue
		}
		number, ok := slicePort(slice, port)
		if !ok {
			continue
		}
		for _, ep := range slice.Endpoints {
			e, ok := endpointOf(ep, number, family)
			if !ok {
				continue
			}
			i, dup := at[e.Addr]
			switch {
			case !dup:
				at[e.Addr] = len(out)
				out = append(out, e)
			case !e.Terminating:
				// An endpoint moving between slices shows in both for a while, and a new
				// pod may reuse the address of a terminating one: the one not
				// terminating is the one to believe.
				out[i] = e
			}
		}
	}
	slices.SortFunc(out, func(a, b endpoint) int { return a.Addr.Compare(b.Addr) })
	return out
}

// slicePort is the port number a slice gives the service port: that of the slice port
// with its name and protocol. As kube-proxy, a slice port without a name (rather than the
// name "") or without a number is ignored.
func slicePort(slice *discoveryv1.EndpointSlice, port corev1.ServicePort) (uint16, bool) {
	for _, p := range slice.Ports {
		if p.Name == nil || *p.Name != port.Name || p.Port == nil {
			continue
		}
		proto := corev1.ProtocolTCP // the API server's default
		if p.Protocol != nil {
			proto = *p.Protocol
		}
		if want := port.Protocol; proto == want || (want == "" && proto == corev1.ProtocolTCP) {
			return portNumber(*p.Port)
		}
	}
	return 0, false
}

// endpointOf reads one slice endpoint; absent ready and serving mean true, absent
// terminating false.
func endpointOf(ep discoveryv1.Endpoint, port uint16, family corev1.IPFamily) (endpoint, bool) {
	if len(ep.Addresses) == 0 {
		return endpoint{}, false
	}
	ip, ok := parseIP(ep.Addresses[0])
	if !ok || familyOf(ip) != family {
		return endpoint{}, false
	}
	c := ep.Conditions
	e := endpoint{Endpoint: service.Endpoint{
		Addr:        netip.AddrPortFrom(ip, port),
		Ready:       c.Ready == nil || *c.Ready,
		Serving:     c.Serving == nil || *c.Serving,
		Terminating: c.Terminating != nil && *c.Terminating,
	}}
	if ep.NodeName != nil {
		e.Node = *ep.NodeName
	}
	if ep.Zone != nil {
		e.Zone = *ep.Zone
	}
	if h := ep.Hints; h != nil {
		for _, z := range h.ForZones {
			e.zoneHints = append(e.zoneHints, z.Name)
		}
		for _, n := range h.ForNodes {
			e.nodeHints = append(e.nodeHints, n.Name)
		}
	}
	return e, true
}

// topology is the part of the endpoints a node's clients are sent to.
type topology int

const (
	anyTopology topology = iota
	sameNode             // PreferSameNode: the endpoints hinted for this node
	sameZone             // the endpoints hinted for this node's zone
)

// topologyOf chooses the topology from the hints as kube-proxy's topologyModeFromHints:
// node hints first, then zone hints, each only when every ready endpoint has one and at
// least one is for this node (zone). Endpoints that are not ready do not count.
func topologyOf(eps []endpoint, node NodeInfo) topology {
	anyReady := false
	allNodeHints, forNode := true, false
	allZoneHints, forZone := true, false
	for _, e := range eps {
		if !e.Ready {
			continue
		}
		anyReady = true
		allNodeHints = allNodeHints && len(e.nodeHints) > 0
		forNode = forNode || (node.Name != "" && slices.Contains(e.nodeHints, node.Name))
		allZoneHints = allZoneHints && len(e.zoneHints) > 0
		forZone = forZone || (node.Zone != "" && slices.Contains(e.zoneHints, node.Zone))
	}
	switch {
	case !anyReady:
		return anyTopology
	case allNodeHints && forNode:
		return sameNode
	case allZoneHints && forZone:
		return sameZone
	}
	return anyTopology
}

func (t topology) admits(e endpoint, node NodeInfo) bool {
	switch t {
	case sameNode:
		return slices.Contains(e.nodeHints, node.Name)
	case sameZone:
		return slices.Contains(e.zoneHints, node.Zone)
	}
	return true
}

// clusterBackends are the backends of internalTrafficPolicy Cluster, and of every
// frontend but the ClusterIPs: the ready endpoints the topology admits, or, when there
// is none (then none is ready anywhere: topology would not have applied otherwise), the
// serving and terminating ones, wherever they are.
func clusterBackends(eps []endpoint, node NodeInfo) []service.Backend {
	t := topologyOf(eps, node)
	backends := backendsOf(eps, func(e endpoint) bool { return e.Ready && t.admits(e, node) })
	if len(backends) == 0 {
		backends = backendsOf(eps, func(e endpoint) bool { return e.Serving && e.Terminating })
	}
	return backends
}

// localBackends are the backends of a ClusterIP with internalTrafficPolicy Local: the
// ready endpoints on this node, or else its serving and terminating ones; topology does
// not apply. None at all leaves the frontend without backends, so its connects are
// refused at once, where kube-proxy drops the packets.
func localBackends(eps []endpoint, node string) []service.Backend {
	backends := backendsOf(eps, func(e endpoint) bool { return e.local(node) && e.Ready })
	if len(backends) == 0 {
		backends = backendsOf(eps, func(e endpoint) bool { return e.local(node) && e.Serving && e.Terminating })
	}
	return backends
}

func backendsOf(eps []endpoint, use func(endpoint) bool) []service.Backend {
	var out []service.Backend
	for _, e := range eps {
		if use(e) {
			out = append(out, service.Backend{Addr: e.Addr, Weight: 1})
		}
	}
	return out
}

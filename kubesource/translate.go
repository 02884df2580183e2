// Package kubesource is the Kubernetes service source: it watches Services,
// discovery.k8s.io/v1 EndpointSlices and this node's Node, turns them into the model of
// package service with kube-proxy's semantics (Translate), and publishes whole snapshots
// to the agent's reconciler (Source). The datapath knows nothing of Kubernetes.
//
// podsock balances at the socket layer, so it serves only clients on this node, and that
// shapes where it departs from kube-proxy:
//   - Every frontend that is not a ClusterIP (external IPs, load-balancer IPs, node ports)
//     uses the cluster-wide endpoints, as kube-proxy does for traffic that starts on its
//     node, whatever externalTrafficPolicy says: that policy concerns traffic arriving from
//     elsewhere, which never meets a cgroup hook and stays kube-proxy's.
//   - A frontend with no usable endpoint keeps existing with no backends, and the datapath
//     refuses its connects at once (ECONNREFUSED), as kube-proxy's REJECT rule does. With
//     internalTrafficPolicy Local and no endpoint on this node, kube-proxy drops the
//     packets instead (the client waits for a timeout); podsock refuses at once too.
//   - Endpoints that are not chosen as backends (not ready, terminating, on another node or
//     zone) stay in service.Service.Endpoints, so the sockets they have survive; only an
//     endpoint that leaves every slice ends them. kube-proxy leaves established TCP flows
//     to conntrack in much the same way.
//   - SCTP is not balanced: such a service port is skipped and reported (Skip).
//   - A NodePort needs this node's Node object (its addresses); without it (no access to
//     nodes, or no such Node) no NodePort is served, nor topology by zone.
//
// As kube-proxy, the watches choose by label: no Service or EndpointSlice labelled
// service.kubernetes.io/headless, and none labelled service.kubernetes.io/service-proxy-name
// unless it names service_proxy_name. With service_proxy_name set, only the Services are
// chosen by it, not their slices: the EndpointSlice controller copies a Service's labels
// to its slices, but a slice written by hand may lack them.
package kubesource

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/apimachinery/pkg/types"
	netutils "k8s.io/utils/net"

	"github.com/podsock/podsock/service"
)

// LabelServiceProxyName names the service proxy that is to serve a Service; kube-proxy
// serves only Services without it, podsock those with [kubernetes] service_proxy_name.
const LabelServiceProxyName = "service.kubernetes.io/service-proxy-name"

// NodeInfo is what Translate needs of this node.
type NodeInfo struct {
	Name string
	// Zone is the Node's topology.kubernetes.io/zone label.
	Zone string
	// Addresses are the Node's InternalIP and ExternalIP addresses: where its NodePorts
	// are served.
	Addresses []netip.Addr
	// Known says the Node object was read. Without it there is no zone and no NodePort.
	Known bool
}

// Input is the state of the API that Translate turns into services.
type Input struct {
	Services []*corev1.Service
	// EndpointSlices may hold slices of any Service; each goes with the Service its
	// kubernetes.io/service-name label names.
	EndpointSlices   []*discoveryv1.EndpointSlice
	Node             NodeInfo
	ServiceProxyName string
}

// Skip is a service port, or one frontend of it, that cannot be served.
type Skip struct {
	Service  string // namespace/name:port
	Frontend string // the frontend's key, or the address that does not parse; "" for the whole port
	Reason   string
}

func (s Skip) String() string {
	if s.Frontend == "" {
		return s.Service + ": " + s.Reason
	}
	return s.Service + " " + s.Frontend + ": " + s.Reason
}

// Translate turns Services and their EndpointSlices into the services podsock serves,
// sorted by name and then frontend key (the order in which Merge serves what its limits
// hold), and says what it had to leave out. Services that are not this proxy's (labels),
// headless and ExternalName Services are left out without a word: they are not meant to
// be proxied.
func Translate(in Input) ([]service.Service, []Skip) {
	ours := servicesSelector(in.ServiceProxyName)
	slicesOf := map[types.NamespacedName][]*discoveryv1.EndpointSlice{}
	for _, slice := range in.EndpointSlices {
		if key, ok := sliceService(slice); ok {
			slicesOf[key] = append(slicesOf[key], slice)
		}
	}
	var out []service.Service
	var skips []Skip
	for _, svc := range in.Services {
		t := translateService(svc, slicesOf[types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}], in.Node, ours)
		out = append(out, t.services...)
		skips = append(skips, t.skips...)
	}
	sortServices(out)
	return out, skips
}

// servicesSelector selects the Services this proxy serves, as kube-proxy's informers do:
// none marked headless, and those of ServiceProxyName (none named, for "").
func servicesSelector(proxyName string) labels.Selector {
	sel, err := selector(proxyName, true)
	if err != nil {
		// Not a valid label value, so no Service can carry it; New refuses it earlier.
		return labels.Nothing()
	}
	return sel
}

// selector is the label selector of the Services (and, filterProxy false, of the
// EndpointSlices) this proxy watches.
func selector(proxyName string, filterProxy bool) (labels.Selector, error) {
	notHeadless, err := labels.NewRequirement(corev1.IsHeadlessService, selection.DoesNotExist, nil)
	if err != nil {
		return nil, err
	}
	sel := labels.NewSelector().Add(*notHeadless)
	if !filterProxy {
		return sel, nil
	}
	var proxy *labels.Requirement
	if proxyName == "" {
		proxy, err = labels.NewRequirement(LabelServiceProxyName, selection.DoesNotExist, nil)
	} else {
		proxy, err = labels.NewRequirement(LabelServiceProxyName, selection.Equals, []string{proxyName})
	}
	if err != nil {
		return nil, fmt.Errorf("service proxy name %q: %w", proxyName, err)
	}
	return sel.Add(*proxy), nil
}

// sliceService is the Service an EndpointSlice belongs to.
func sliceService(slice *discoveryv1.EndpointSlice) (types.NamespacedName, bool) {
	name := slice.Labels[discoveryv1.LabelServiceName]
	return types.NamespacedName{Namespace: slice.Namespace, Name: name}, name != ""
}

func sortServices(svcs []service.Service) {
	slices.SortStableFunc(svcs, func(a, b service.Service) int {
		if c := cmp.Compare(a.Name, b.Name); c != 0 {
			return c
		}
		return cmp.Compare(a.Key(), b.Key()) // only on a tie: Key allocates
	})
}

// translation is what one Service gives: its frontends, and what it had to leave out.
type translation struct {
	services []service.Service
	skips    []Skip
	ports    int // service ports with at least one frontend
}

// translateService translates one Service with its slices.
func translateService(svc *corev1.Service, endpointSlices []*discoveryv1.EndpointSlice, node NodeInfo, ours labels.Selector) translation {
	var t translation
	if !ours.Matches(labels.Set(svc.Labels)) || !proxied(svc) {
		return t
	}
	affinity, timeout := affinityOf(svc)
	itpLocal := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	for _, port := range svc.Spec.Ports {
		name := portName(svc, port)
		proto, ok := protocolOf(port.Protocol)
		if !ok {
			t.skips = append(t.skips, Skip{Service: name, Reason: fmt.Sprintf("protocol %s is not balanced", port.Protocol)})
			continue
		}
		before := len(t.services)
		frontends, skips := frontendsOf(svc, port, node)
		for _, s := range skips {
			s.Service = name
			t.skips = append(t.skips, s)
		}
		base := service.Service{
			Name: name, Source: service.SourceKubernetes, Protocol: proto,
			Affinity: affinity, AffinityTimeout: timeout,
		}
		for _, family := range []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol} {
			ofFamily := slices.DeleteFunc(slices.Clone(frontends), func(fe frontend) bool { return familyOf(fe.addr) != family })
			if len(ofFamily) == 0 {
				continue
			}
			svcs, skips := serve(base, ofFamily, endpointsOf(endpointSlices, port, family), node, itpLocal)
			t.services = append(t.services, svcs...)
			t.skips = append(t.skips, skips...)
		}
		if len(t.services) > before {
			t.ports++
		}
	}
	sortServices(t.services)
	return t
}

// serve gives frontends of one family the endpoints of that family: each service base
// with the frontend's address, and the backends chosen for it.
func serve(base service.Service, frontends []frontend, eps []endpoint, node NodeInfo, itpLocal bool) ([]service.Service, []Skip) {
	all := make([]service.Endpoint, len(eps))
	for i, e := range eps {
		all[i] = e.Endpoint
	}
	cluster := clusterBackends(eps, node)
	var local []service.Backend
	if itpLocal {
		local = localBackends(eps, node.Name)
	}
	var out []service.Service
	var skips []Skip
	for _, fe := range frontends {
		backends := cluster
		if fe.clusterIP && itpLocal {
			backends = local
		}
		s := base
		s.VIP, s.Port, s.HostOnly = fe.addr, fe.port, fe.hostOnly
		// Each its own: a consumer that sorts or trims one must not change another.
		s.Backends, s.Endpoints = slices.Clone(backends), slices.Clone(all)
		if err := s.Check(0); err != nil {
			skips = append(skips, Skip{Service: s.Name, Frontend: s.Key(), Reason: err.Error()})
			continue
		}
		out = append(out, s)
	}
	return out, skips
}

// proxied says whether a Service is meant to be proxied at all, as kube-proxy's
// ShouldSkipService: not headless, not ExternalName.
func proxied(svc *corev1.Service) bool {
	return svc.Spec.ClusterIP != corev1.ClusterIPNone && svc.Spec.ClusterIP != "" &&
		svc.Spec.Type != corev1.ServiceTypeExternalName
}

// portName is namespace/name:port, port being the port's name or, unnamed, its number.
func portName(svc *corev1.Service, port corev1.ServicePort) string {
	p := port.Name
	if p == "" {
		p = strconv.Itoa(int(port.Port))
	}
	return svc.Namespace + "/" + svc.Name + ":" + p
}

func protocolOf(p corev1.Protocol) (service.Protocol, bool) {
	switch p {
	case corev1.ProtocolTCP, "": // the API server defaults to TCP
		return service.ProtocolTCP, true
	case corev1.ProtocolUDP:
		return service.ProtocolUDP, true
	}
	return "", false
}

func affinityOf(svc *corev1.Service) (service.Affinity, time.Duration) {
	if svc.Spec.SessionAffinity != corev1.ServiceAffinityClientIP {
		return service.AffinityNone, 0
	}
	seconds := corev1.DefaultClientIPServiceAffinitySeconds
	if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
		seconds = *c.ClientIP.TimeoutSeconds
	}
	return service.AffinityClient, time.Duration(seconds) * time.Second
}

// frontend is one address:port a service port is served on.
type frontend struct {
	addr      netip.Addr
	port      uint16
	clusterIP bool // internalTrafficPolicy applies to it
	hostOnly  bool
}

// frontendsOf lists the frontends of a service port, each address:port once. As in
// kube-proxy, a Service with no ClusterIP of a family has no frontend of that family at
// all: its external IPs and node ports of that family go unserved.
func frontendsOf(svc *corev1.Service, port corev1.ServicePort, node NodeInfo) ([]frontend, []Skip) {
	number, ok := portNumber(port.Port)
	if !ok {
		return nil, []Skip{{Reason: fmt.Sprintf("port %d out of range", port.Port)}}
	}
	var out []frontend
	var skips []Skip
	add := func(fe frontend) {
		if !slices.ContainsFunc(out, func(o frontend) bool { return o.addr == fe.addr && o.port == fe.port }) {
			out = append(out, fe)
		}
	}
	hasClusterIP := map[corev1.IPFamily]bool{}
	clusterIPs := svc.Spec.ClusterIPs
	if len(clusterIPs) == 0 {
		clusterIPs = []string{svc.Spec.ClusterIP}
	}
	for _, s := range clusterIPs {
		switch ip, ok := parseIP(s); {
		case !ok:
			skips = append(skips, Skip{Frontend: s, Reason: "cluster IP is not an IP address"})
		case !hasClusterIP[familyOf(ip)]:
			hasClusterIP[familyOf(ip)] = true
			add(frontend{addr: ip, port: number, clusterIP: true})
		}
	}
	external := func(what, s string) {
		switch ip, ok := parseIP(s); {
		case !ok:
			skips = append(skips, Skip{Frontend: s, Reason: what + " is not an IP address"})
		case hasClusterIP[familyOf(ip)]:
			add(frontend{addr: ip, port: number})
		}
	}
	for _, s := range svc.Spec.ExternalIPs {
		external("external IP", s)
	}
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		// An ingress in Proxy mode is an address of the load balancer, which proxies to
		// the node; only a VIP-mode ingress address reaches the node as itself.
		if ing.IP != "" && (ing.IPMode == nil || *ing.IPMode == corev1.LoadBalancerIPModeVIP) {
			external("load-balancer IP", ing.IP)
		}
	}
	if port.NodePort == 0 || !node.Known {
		return out, skips
	}
	nodePort, ok := portNumber(port.NodePort)
	if !ok {
		return out, append(skips, Skip{Reason: fmt.Sprintf("node port %d out of range", port.NodePort)})
	}
	for _, ip := range node.Addresses {
		if hasClusterIP[familyOf(ip)] {
			add(frontend{addr: ip, port: nodePort})
		}
	}
	// A pod's loopback is its own: only the host's connects to localhost reach a NodePort.
	for _, lo := range []netip.Addr{netip.AddrFrom4([4]byte{127, 0, 0, 1}), netip.IPv6Loopback()} {
		if hasClusterIP[familyOf(lo)] {
			add(frontend{addr: lo, port: nodePort, hostOnly: true})
		}
	}
	return out, skips
}

func portNumber(p int32) (uint16, bool) {
	if p < 1 || p > 65535 {
		return 0, false
	}
	return uint16(p), true
}

// parseIP reads an address as the API server accepts it (leading zeros included, which
// old objects may have), v4-mapped IPv6 as IPv4.
func parseIP(s string) (netip.Addr, bool) {
	ip := netutils.ParseIPSloppy(s)
	if ip == nil {
		return netip.Addr{}, false
	}
	addr, ok := netip.AddrFromSlice(ip)
	return addr.Unmap(), ok
}

func familyOf(ip netip.Addr) corev1.IPFamily {
	if ip.Is4() {
		return corev1.IPv4Protocol
	}
	return corev1.IPv6Protocol
}

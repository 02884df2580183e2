package kubesource

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/podsock/podsock/service"
)

// The objects of these tests: Service default/web with ClusterIP 10.96.0.10 and port
// "http" 80/TCP, and slices of its port "http" → 8080/TCP, unless a row says otherwise.

func webService(mods ...func(*corev1.Service)) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web"},
		Spec: corev1.ServiceSpec{
			Type:       corev1.ServiceTypeClusterIP,
			ClusterIP:  "10.96.0.10",
			ClusterIPs: []string{"10.96.0.10"},
			Ports:      []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}},
		},
	}
	for _, m := range mods {
		m(s)
	}
	return s
}

func webSlice(name string, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: "default", Name: name,
			Labels: map[string]string{discoveryv1.LabelServiceName: "web"},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   eps,
		Ports:       []discoveryv1.EndpointPort{slicePortOf("http", 8080, corev1.ProtocolTCP)},
	}
}

func slicePortOf(name string, port int32, proto corev1.Protocol) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: ptr.To(name), Port: ptr.To(port), Protocol: ptr.To(proto)}
}

// ep is an endpoint with explicit conditions; mods set the rest.
func ep(addr string, mods ...func(*discoveryv1.Endpoint)) discoveryv1.Endpoint {
	e := discoveryv1.Endpoint{
		Addresses:  []string{addr},
		Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
	}
	for _, m := range mods {
		m(&e)
	}
	return e
}

func notReady(e *discoveryv1.Endpoint) { e.Conditions.Ready = ptr.To(false) }

// terminating is what the EndpointSlice controller writes for a pod being deleted that
// still passes its readiness probe.
func terminating(e *discoveryv1.Endpoint) {
	e.Conditions = discoveryv1.EndpointConditions{Ready: ptr.To(false), Serving: ptr.To(true), Terminating: ptr.To(true)}
}

func terminatingNotServing(e *discoveryv1.Endpoint) {
	e.Conditions = discoveryv1.EndpointConditions{Ready: ptr.To(false), Serving: ptr.To(false), Terminating: ptr.To(true)}
}

func onNode(node string) func(*discoveryv1.Endpoint) {
	return func(e *discoveryv1.Endpoint) { e.NodeName = ptr.To(node) }
}

func inZone(zone string) func(*discoveryv1.Endpoint) {
	return func(e *discoveryv1.Endpoint) { e.Zone = ptr.To(zone) }
}

func zoneHints(zones ...string) func(*discoveryv1.Endpoint) {
	return func(e *discoveryv1.Endpoint) {
		if e.Hints == nil {
			e.Hints = &discoveryv1.EndpointHints{}
		}
		for _, z := range zones {
			e.Hints.ForZones = append(e.Hints.ForZones, discoveryv1.ForZone{Name: z})
		}
	}
}

func nodeHints(nodes ...string) func(*discoveryv1.Endpoint) {
	return func(e *discoveryv1.Endpoint) {
		if e.Hints == nil {
			e.Hints = &discoveryv1.EndpointHints{}
		}
		for _, n := range nodes {
			e.Hints.ForNodes = append(e.Hints.ForNodes, discoveryv1.ForNode{Name: n})
		}
	}
}

// thisNode is the node Translate runs for in these tests.
var thisNode = NodeInfo{
	Name: "node-a", Zone: "zone-a", Known: true,
	Addresses: []netip.Addr{netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8::10")},
}

// summary writes each service on one line: name, frontend, then its backends, and after
// "|" the endpoints that are not backends (kept for the sockets they have).
func summary(svcs []service.Service) []string {
	var out []string
	for _, s := range svcs {
		line := s.Name + " " + s.Key()
		if s.HostOnly {
			line += " host-only"
		}
		if s.Affinity == service.AffinityClient {
			line += fmt.Sprintf(" affinity=%v", s.AffinityTimeout)
		}
		line += " ->"
		for _, b := range s.Backends {
			line += " " + b.Addr.String()
		}
		if r := s.Retained(); len(r) > 0 {
			line += " |"
			for _, a := range r {
				line += " " + a.String()
			}
		}
		out = append(out, line)
	}
	return out
}

type translateCase struct {
	name     string
	services []*corev1.Service
	slices   []*discoveryv1.EndpointSlice
	node     *NodeInfo // nil: thisNode
	proxy    string    // ServiceProxyName
	want     []string  // summary lines
	skips    []string  // Skip.String() of each
}

func runTranslateCases(t *testing.T, cases []translateCase) {
	t.Helper()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			node := thisNode
			if c.node != nil {
				node = *c.node
			}
			got, skips := Translate(Input{Services: c.services, EndpointSlices: c.slices, Node: node, ServiceProxyName: c.proxy})
			// The informers cache the slim forms: they must translate the same.
			slimIn := Input{Node: node, ServiceProxyName: c.proxy}
			for _, svc := range c.services {
				slimIn.Services = append(slimIn.Services, slimService(svc))
			}
			for _, slice := range c.slices {
				slimIn.EndpointSlices = append(slimIn.EndpointSlices, slimSlice(slice))
			}
			if slimGot, slimSkips := Translate(slimIn); !reflect.DeepEqual(slimGot, got) || !reflect.DeepEqual(slimSkips, skips) {
				t.Errorf("the slim objects translate otherwise:\n got %s\nwant %s", strings.Join(summary(slimGot), "\n     "), strings.Join(summary(got), "\n     "))
			}
			if lines := summary(got); !slices.Equal(lines, c.want) {
				t.Errorf("services:\n got %s\nwant %s", strings.Join(lines, "\n     "), strings.Join(c.want, "\n     "))
			}
			var gotSkips []string
			for _, s := range skips {
				gotSkips = append(gotSkips, s.String())
			}
			if !slices.Equal(gotSkips, c.skips) {
				t.Errorf("skips:\n got %q\nwant %q", gotSkips, c.skips)
			}
			for _, s := range got {
				if err := s.Check(0); err != nil {
					t.Errorf("%s %s fails Check: %v", s.Name, s.Key(), err)
				}
				if s.Source != service.SourceKubernetes {
					t.Errorf("%s has source %q", s.Name, s.Source)
				}
			}
		})
	}
}

func TestTranslateWhichServices(t *testing.T) {
	labelled := func(k, v string) func(*corev1.Service) {
		return func(s *corev1.Service) { s.Labels = map[string]string{k: v} }
	}
	runTranslateCases(t, []translateCase{{
		name:     "a ClusterIP service with its ready endpoints",
		services: []*corev1.Service{webService()},
		slices:   []*discoveryv1.EndpointSlice{webSlice("web-1", ep("10.88.0.5"), ep("10.88.0.6"))},
		want:     []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 10.88.0.6:8080"},
	}, {
		name:     "labelled headless: skipped",
		services: []*corev1.Service{webService(labelled(corev1.IsHeadlessService, ""))},
		slices:   []*discoveryv1.EndpointSlice{webSlice("web-1", ep("10.88.0.5"))},
	}, {
		name:     "another proxy's service: skipped",
		services: []*corev1.Service{webService(labelled(LabelServiceProxyName, "other"))},
		slices:   []*discoveryv1.EndpointSlice{webSlice("web-1", ep("10.88.0.5"))},
	}, {
		name:     "service_proxy_name set: only the services labelled with it",
		proxy:    "podsock",
		services: []*corev1.Service{webService(labelled(LabelServiceProxyName, "podsock")), webService(func(s *corev1.Service) { s.Name = "plain" })},
		slices:   []*discoveryv1.EndpointSlice{webSlice("web-1", ep("10.88.0.5"))},
		want:     []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080"},
	}, {
		name:     "service_proxy_name set: another proxy's service skipped",
		proxy:    "podsock",
		services: []*corev1.Service{webService(labelled(LabelServiceProxyName, "other"))},
	}, {
		name:     "headless (clusterIP None): skipped",
		services: []*corev1.Service{webService(func(s *corev1.Service) { s.Spec.ClusterIP, s.Spec.ClusterIPs = "None", []string{"None"} })},
		slices:   []*discoveryv1.EndpointSlice{webSlice("web-1", ep("10.88.0.5"))},
	}, {
		name: "ExternalName: skipped",
		services: []*corev1.Service{webService(func(s *corev1.Service) {
			s.Spec.Type, s.Spec.ExternalName, s.Spec.ClusterIP, s.Spec.ClusterIPs = corev1.ServiceTypeExternalName, "example.com", "", nil
		})},
	}, {
		name: "an ExternalName with a cluster IP left over: skipped",
		services: []*corev1.Service{webService(func(s *corev1.Service) {
			s.Spec.Type, s.Spec.ExternalName = corev1.ServiceTypeExternalName, "example.com"
		})},
	}, {
		name:     "no endpoints: the frontend exists without backends (connects refused)",
		services: []*corev1.Service{webService()},
		want:     []string{"default/web:http 10.96.0.10:80/tcp ->"},
	}, {
		name: "SCTP port skipped and said, the other ports served",
		services: []*corev1.Service{webService(func(s *corev1.Service) {
			s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Name: "sig", Port: 2905, Protocol: corev1.ProtocolSCTP})
		})},
		want:  []string{"default/web:http 10.96.0.10:80/tcp ->"},
		skips: []string{"default/web:sig: protocol SCTP is not balanced"},
	}, {
		name: "a bad object is skipped with its reason and stops no other",
		services: []*corev1.Service{
			webService(func(s *corev1.Service) { s.Name = strings.Repeat("x", 140) }),
			webService(),
		},
		want:  []string{"default/web:http 10.96.0.10:80/tcp ->"},
		skips: []string{"default/" + strings.Repeat("x", 140) + ":http 10.96.0.10:80/tcp: name of 153 bytes, want 1 to 143"},
	}})
}

func TestTranslateNamesAndPorts(t *testing.T) {
	twoPorts := webService(func(s *corev1.Service) {
		s.Spec.Ports = []corev1.ServicePort{
			{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP},
			{Name: "admin", Port: 9000, Protocol: corev1.ProtocolTCP},
		}
	})
	twoPortsSlice := webSlice("web-1", ep("10.88.0.5"))
	twoPortsSlice.Ports = []discoveryv1.EndpointPort{slicePortOf("admin", 9090, corev1.ProtocolTCP), slicePortOf("http", 8080, corev1.ProtocolTCP)}

	dns := webService(func(s *corev1.Service) {
		s.Spec.Ports = []corev1.ServicePort{
			{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP},
			{Name: "dns-tcp", Port: 53, Protocol: corev1.ProtocolTCP},
		}
	})
	dnsSlice := webSlice("web-1", ep("10.88.0.5"))
	dnsSlice.Ports = []discoveryv1.EndpointPort{slicePortOf("dns", 5353, corev1.ProtocolUDP), slicePortOf("dns-tcp", 5354, corev1.ProtocolTCP)}

	// Same name, other protocol: not the port of the service port.
	wrongProto := webSlice("web-1", ep("10.88.0.5"))
	wrongProto.Ports = []discoveryv1.EndpointPort{slicePortOf("http", 8080, corev1.ProtocolUDP)}

	unnamed := webService(func(s *corev1.Service) { s.Spec.Ports[0].Name = "" })
	unnamedSlice := webSlice("web-1", ep("10.88.0.5"))
	unnamedSlice.Ports = []discoveryv1.EndpointPort{slicePortOf("", 8080, corev1.ProtocolTCP)}
	nilName := webSlice("web-2", ep("10.88.0.6"))
	nilName.Ports = []discoveryv1.EndpointPort{{Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.ProtocolTCP)}}
	nilPort := webSlice("web-3", ep("10.88.0.7"))
	nilPort.Ports = []discoveryv1.EndpointPort{{Name: ptr.To(""), Protocol: ptr.To(corev1.ProtocolTCP)}}

	runTranslateCases(t, []translateCase{{
		name:     "each port its own name; endpoint ports by name",
		services: []*corev1.Service{twoPorts},
		slices:   []*discoveryv1.EndpointSlice{twoPortsSlice},
		want: []string{
			"default/web:admin 10.96.0.10:9000/tcp -> 10.88.0.5:9090",
			"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080",
		},
	}, {
		name:     "endpoint ports by name and protocol",
		services: []*corev1.Service{dns},
		slices:   []*discoveryv1.EndpointSlice{dnsSlice},
		want: []string{
			"default/web:dns 10.96.0.10:53/udp -> 10.88.0.5:5353",
			"default/web:dns-tcp 10.96.0.10:53/tcp -> 10.88.0.5:5354",
		},
	}, {
		name:     "a slice port of another protocol is not the service port's",
		services: []*corev1.Service{webService()},
		slices:   []*discoveryv1.EndpointSlice{wrongProto},
		want:     []string{"default/web:http 10.96.0.10:80/tcp ->"},
	}, {
		name:     "an unnamed port is named by its number; slice ports without a name or number are ignored (kube-proxy)",
		services: []*corev1.Service{unnamed},
		slices:   []*discoveryv1.EndpointSlice{unnamedSlice, nilName, nilPort},
		want:     []string{"default/web:80 10.96.0.10:80/tcp -> 10.88.0.5:8080"},
	}, {
		name:     "no protocol means TCP, on the service and on the slice port",
		services: []*corev1.Service{webService(func(s *corev1.Service) { s.Spec.Ports[0].Protocol = "" })},
		slices: []*discoveryv1.EndpointSlice{func() *discoveryv1.EndpointSlice {
			s := webSlice("web-1", ep("10.88.0.5"))
			s.Ports[0].Protocol = nil
			return s
		}()},
		want: []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080"},
	}, {
		name: "sorted by name, then frontend key",
		services: []*corev1.Service{
			webService(func(s *corev1.Service) { s.Name = "web-b"; s.Spec.ClusterIPs = []string{"10.96.0.12"} }),
			webService(func(s *corev1.Service) {
				s.Name = "web"
				s.Spec.ExternalIPs = []string{"203.0.113.9", "203.0.113.10"}
			}),
		},
		want: []string{
			"default/web-b:http 10.96.0.12:80/tcp ->",
			"default/web:http 10.96.0.10:80/tcp ->",
			"default/web:http 203.0.113.10:80/tcp ->",
			"default/web:http 203.0.113.9:80/tcp ->",
		},
	}, {
		name:     "slices of other services, and slices without a service, are not this one's",
		services: []*corev1.Service{webService()},
		slices: []*discoveryv1.EndpointSlice{
			func() *discoveryv1.EndpointSlice {
				s := webSlice("other-1", ep("10.88.0.9"))
				s.Labels[discoveryv1.LabelServiceName] = "other"
				return s
			}(),
			func() *discoveryv1.EndpointSlice {
				s := webSlice("orphan", ep("10.88.0.8"))
				s.Labels = nil
				return s
			}(),
			func() *discoveryv1.EndpointSlice {
				s := webSlice("elsewhere", ep("10.88.0.7"))
				s.Namespace = "kube-system"
				return s
			}(),
		},
		want: []string{"default/web:http 10.96.0.10:80/tcp ->"},
	}})
}

func TestTranslateFrontends(t *testing.T) {
	dualStack := func(s *corev1.Service) {
		s.Spec.ClusterIPs = []string{"10.96.0.10", "fd00:96::10"}
	}
	v6Slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: "default", Name: "web-v6",
			Labels: map[string]string{discoveryv1.LabelServiceName: "web"},
		},
		AddressType: discoveryv1.AddressTypeIPv6,
		Endpoints:   []discoveryv1.Endpoint{ep("fd00:88::5")},
		Ports:       []discoveryv1.EndpointPort{slicePortOf("http", 8080, corev1.ProtocolTCP)},
	}
	fqdnSlice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: "default", Name: "web-fqdn",
			Labels: map[string]string{discoveryv1.LabelServiceName: "web"},
		},
		AddressType: discoveryv1.AddressTypeFQDN,
		Endpoints:   []discoveryv1.Endpoint{ep("backend.example.com")},
		Ports:       []discoveryv1.EndpointPort{slicePortOf("http", 8080, corev1.ProtocolTCP)},
	}
	nodePort := func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeNodePort
		s.Spec.Ports[0].NodePort = 30080
	}
	v4 := webSlice("web-1", ep("10.88.0.5"))
	noNode := NodeInfo{Name: "node-a"}
	runTranslateCases(t, []translateCase{{
		name:     "dual-stack: a ClusterIP of each family, each with the endpoints of its family; FQDN slices dropped",
		services: []*corev1.Service{webService(dualStack)},
		slices:   []*discoveryv1.EndpointSlice{v4, v6Slice, fqdnSlice},
		want: []string{
			"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080",
			"default/web:http [fd00:96::10]:80/tcp -> [fd00:88::5]:8080",
		},
	}, {
		name: "external IPs and VIP-mode load-balancer IPs, of the families the service has",
		services: []*corev1.Service{webService(func(s *corev1.Service) {
			s.Spec.Type = corev1.ServiceTypeLoadBalancer
			s.Spec.ExternalIPs = []string{"203.0.113.5", "2001:db8::5"}
			s.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{
				{IP: "198.51.100.7"},
				{IP: "198.51.100.8", IPMode: ptr.To(corev1.LoadBalancerIPModeVIP)},
				{IP: "198.51.100.9", IPMode: ptr.To(corev1.LoadBalancerIPModeProxy)},
				{Hostname: "lb.example.com"},
				{IP: "203.0.113.5"}, // also an external IP: one frontend
			}
		})},
		slices: []*discoveryv1.EndpointSlice{v4},
		want: []string{
			"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080",
			"default/web:http 198.51.100.7:80/tcp -> 10.88.0.5:8080",
			"default/web:http 198.51.100.8:80/tcp -> 10.88.0.5:8080",
			"default/web:http 203.0.113.5:80/tcp -> 10.88.0.5:8080",
		},
	}, {
		name:     "NodePort on the node's addresses of the family, and on loopback for the host only",
		services: []*corev1.Service{webService(nodePort)},
		slices:   []*discoveryv1.EndpointSlice{v4},
		want: []string{
			"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080",
			"default/web:http 127.0.0.1:30080/tcp host-only -> 10.88.0.5:8080",
			"default/web:http 192.0.2.10:30080/tcp -> 10.88.0.5:8080",
		},
	}, {
		name:     "dual-stack NodePort",
		services: []*corev1.Service{webService(nodePort, dualStack)},
		slices:   []*discoveryv1.EndpointSlice{v4, v6Slice},
		want: []string{
			"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080",
			"default/web:http 127.0.0.1:30080/tcp host-only -> 10.88.0.5:8080",
			"default/web:http 192.0.2.10:30080/tcp -> 10.88.0.5:8080",
			"default/web:http [2001:db8::10]:30080/tcp -> [fd00:88::5]:8080",
			"default/web:http [::1]:30080/tcp host-only -> [fd00:88::5]:8080",
			"default/web:http [fd00:96::10]:80/tcp -> [fd00:88::5]:8080",
		},
	}, {
		name:     "no Node known (no access, or no object): no NodePort",
		node:     &noNode,
		services: []*corev1.Service{webService(nodePort)},
		slices:   []*discoveryv1.EndpointSlice{v4},
		want:     []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080"},
	}, {
		name: "an address that does not parse loses its frontend only",
		services: []*corev1.Service{webService(func(s *corev1.Service) {
			s.Spec.ExternalIPs = []string{"not-an-ip", "203.0.113.5"}
		})},
		want: []string{
			"default/web:http 10.96.0.10:80/tcp ->",
			"default/web:http 203.0.113.5:80/tcp ->",
		},
		skips: []string{"default/web:http not-an-ip: external IP is not an IP address"},
	}, {
		name: "session affinity ClientIP with its timeout, and the default of 3 hours",
		services: []*corev1.Service{
			webService(func(s *corev1.Service) {
				s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
				s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To[int32](30)}}
			}),
			webService(func(s *corev1.Service) {
				s.Name = "web-default"
				s.Spec.ClusterIPs = []string{"10.96.0.11"}
				s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
			}),
		},
		want: []string{
			"default/web-default:http 10.96.0.11:80/tcp affinity=3h0m0s ->",
			"default/web:http 10.96.0.10:80/tcp affinity=30s ->",
		},
	}})
}

func TestTranslateEndpointSelection(t *testing.T) {
	web := []*corev1.Service{webService()}
	slice := func(eps ...discoveryv1.Endpoint) []*discoveryv1.EndpointSlice {
		return []*discoveryv1.EndpointSlice{webSlice("web-1", eps...)}
	}
	runTranslateCases(t, []translateCase{{
		name:     "ready endpoints are the backends; the others are kept, not chosen",
		services: web,
		slices:   slice(ep("10.88.0.5"), ep("10.88.0.6", notReady), ep("10.88.0.7", terminating)),
		want:     []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 | 10.88.0.6:8080 10.88.0.7:8080"},
	}, {
		name:     "none ready: the serving and terminating ones; not the terminating that do not serve",
		services: web,
		slices:   slice(ep("10.88.0.6", notReady), ep("10.88.0.7", terminating), ep("10.88.0.8", terminatingNotServing)),
		want:     []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.7:8080 | 10.88.0.6:8080 10.88.0.8:8080"},
	}, {
		name:     "absent conditions: ready and serving, not terminating",
		services: web,
		slices: slice(discoveryv1.Endpoint{Addresses: []string{"10.88.0.5"}},
			ep("10.88.0.6", func(e *discoveryv1.Endpoint) {
				e.Conditions = discoveryv1.EndpointConditions{Serving: ptr.To(true), Terminating: ptr.To(true)}
			})),
		// Ready absent counts as ready even when terminating, as in kube-proxy.
		want: []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 10.88.0.6:8080"},
	}, {
		name:     "slices merged, an address in two slices once: the copy not terminating wins",
		services: web,
		slices: []*discoveryv1.EndpointSlice{
			webSlice("web-1", ep("10.88.0.5"), ep("10.88.0.6", terminating)),
			webSlice("web-2", ep("10.88.0.6"), ep("10.88.0.7")),
			webSlice("web-3", ep("10.88.0.7", terminating)),
		},
		want: []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 10.88.0.6:8080 10.88.0.7:8080"},
	}, {
		name:     "only an endpoint's first address counts; an address of the other family is dropped",
		services: web,
		slices: slice(ep("10.88.0.5", func(e *discoveryv1.Endpoint) { e.Addresses = append(e.Addresses, "10.88.0.99") }),
			ep("fd00:88::6"), discoveryv1.Endpoint{}),
		want: []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080"},
	}})
}

func TestTranslateTrafficPolicyAndTopology(t *testing.T) {
	local := func(s *corev1.Service) {
		s.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
		s.Spec.ExternalIPs = []string{"203.0.113.5"}
	}
	localWeb := []*corev1.Service{webService(local)}
	web := []*corev1.Service{webService()}
	slice := func(eps ...discoveryv1.Endpoint) []*discoveryv1.EndpointSlice {
		return []*discoveryv1.EndpointSlice{webSlice("web-1", eps...)}
	}
	noZone := NodeInfo{Name: "node-a"}
	runTranslateCases(t, []translateCase{{
		name:     "internalTrafficPolicy Local: the ClusterIP has this node's endpoints; an external IP has them all",
		services: localWeb,
		slices:   slice(ep("10.88.0.5", onNode("node-a")), ep("10.88.0.6", onNode("node-b")), ep("10.88.0.7")),
		want: []string{
			"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 | 10.88.0.6:8080 10.88.0.7:8080",
			"default/web:http 203.0.113.5:80/tcp -> 10.88.0.5:8080 10.88.0.6:8080 10.88.0.7:8080",
		},
	}, {
		name:     "internalTrafficPolicy Local with none here: no backends (refused at once; kube-proxy drops)",
		services: localWeb,
		slices:   slice(ep("10.88.0.6", onNode("node-b"))),
		want: []string{
			"default/web:http 10.96.0.10:80/tcp -> | 10.88.0.6:8080",
			"default/web:http 203.0.113.5:80/tcp -> 10.88.0.6:8080",
		},
	}, {
		name:     "internalTrafficPolicy Local: none ready here, the serving and terminating ones here",
		services: localWeb,
		slices:   slice(ep("10.88.0.5", onNode("node-a"), terminating), ep("10.88.0.6", onNode("node-b"))),
		want: []string{
			"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 | 10.88.0.6:8080",
			"default/web:http 203.0.113.5:80/tcp -> 10.88.0.6:8080 | 10.88.0.5:8080",
		},
	}, {
		name:     "internalTrafficPolicy Local ignores topology hints",
		services: localWeb,
		slices:   slice(ep("10.88.0.5", onNode("node-a"), zoneHints("zone-b")), ep("10.88.0.6", onNode("node-b"), zoneHints("zone-a"))),
		want: []string{
			"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 | 10.88.0.6:8080",
			"default/web:http 203.0.113.5:80/tcp -> 10.88.0.6:8080 | 10.88.0.5:8080",
		},
	}, {
		name:     "zone hints: every ready endpoint has one, one is for this zone: this zone's",
		services: web,
		slices: slice(ep("10.88.0.5", inZone("zone-a"), zoneHints("zone-a")), ep("10.88.0.6", inZone("zone-b"), zoneHints("zone-b")),
			ep("10.88.0.7", notReady)), // not ready: needs no hint
		want: []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 | 10.88.0.6:8080 10.88.0.7:8080"},
	}, {
		name:     "zone hints: a ready endpoint without one: hints ignored",
		services: web,
		slices:   slice(ep("10.88.0.5", zoneHints("zone-a")), ep("10.88.0.6")),
		want:     []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 10.88.0.6:8080"},
	}, {
		name:     "zone hints: none for this zone: hints ignored",
		services: web,
		slices:   slice(ep("10.88.0.5", zoneHints("zone-b")), ep("10.88.0.6", zoneHints("zone-c"))),
		want:     []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 10.88.0.6:8080"},
	}, {
		name:     "zone hints: the node's zone unknown (no access to nodes): hints ignored",
		node:     &noZone,
		services: web,
		slices:   slice(ep("10.88.0.5", zoneHints("zone-a")), ep("10.88.0.6", zoneHints("zone-b"))),
		want:     []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 10.88.0.6:8080"},
	}, {
		name:     "node hints (PreferSameNode) before zone hints",
		services: web,
		slices: slice(ep("10.88.0.5", nodeHints("node-a"), zoneHints("zone-a")), ep("10.88.0.6", nodeHints("node-b"), zoneHints("zone-a")),
			ep("10.88.0.7", nodeHints("node-c"), zoneHints("zone-b"))),
		want: []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 | 10.88.0.6:8080 10.88.0.7:8080"},
	}, {
		name:     "node hints without one for this node: zone hints apply",
		services: web,
		slices:   slice(ep("10.88.0.5", nodeHints("node-b"), zoneHints("zone-a")), ep("10.88.0.6", nodeHints("node-c"), zoneHints("zone-b"))),
		want:     []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 | 10.88.0.6:8080"},
	}, {
		name:     "node hints: a ready endpoint without one: node hints ignored (no zone hints either)",
		node:     &noZone,
		services: web,
		slices:   slice(ep("10.88.0.5", nodeHints("node-a")), ep("10.88.0.6")),
		want:     []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 10.88.0.6:8080"},
	}, {
		name:     "node hints apply without access to nodes: the node's name is known",
		node:     &noZone,
		services: web,
		slices:   slice(ep("10.88.0.5", nodeHints("node-a")), ep("10.88.0.6", nodeHints("node-b"))),
		want:     []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 | 10.88.0.6:8080"},
	}, {
		name:     "none ready: serving and terminating ones, hints or not",
		services: web,
		slices:   slice(ep("10.88.0.5", terminating, zoneHints("zone-a")), ep("10.88.0.6", terminating, zoneHints("zone-b"))),
		want:     []string{"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 10.88.0.6:8080"},
	}, {
		name: "topology applies to external frontends too",
		services: []*corev1.Service{webService(func(s *corev1.Service) {
			s.Spec.ExternalIPs = []string{"203.0.113.5"}
		})},
		slices: slice(ep("10.88.0.5", zoneHints("zone-a")), ep("10.88.0.6", zoneHints("zone-b"))),
		want: []string{
			"default/web:http 10.96.0.10:80/tcp -> 10.88.0.5:8080 | 10.88.0.6:8080",
			"default/web:http 203.0.113.5:80/tcp -> 10.88.0.5:8080 | 10.88.0.6:8080",
		},
	}})
}

// Endpoints list every endpoint with what its slice says of it.
func TestTranslateEndpointsCarryTheirState(t *testing.T) {
	got, _ := Translate(Input{
		Services: []*corev1.Service{webService()},
		EndpointSlices: []*discoveryv1.EndpointSlice{webSlice("web-1",
			ep("10.88.0.5", onNode("node-a"), inZone("zone-a")),
			ep("10.88.0.6", terminating, onNode("node-b"), inZone("zone-b")),
			discoveryv1.Endpoint{Addresses: []string{"10.88.0.7"}},
		)},
		Node: thisNode,
	})
	if len(got) != 1 {
		t.Fatalf("got %d services, want 1", len(got))
	}
	want := []service.Endpoint{
		{Addr: netip.MustParseAddrPort("10.88.0.5:8080"), Ready: true, Serving: true, Zone: "zone-a", Node: "node-a"},
		{Addr: netip.MustParseAddrPort("10.88.0.6:8080"), Serving: true, Terminating: true, Zone: "zone-b", Node: "node-b"},
		{Addr: netip.MustParseAddrPort("10.88.0.7:8080"), Ready: true, Serving: true},
	}
	if !reflect.DeepEqual(got[0].Endpoints, want) {
		t.Errorf("endpoints\n got %+v\nwant %+v", got[0].Endpoints, want)
	}
	for _, b := range got[0].Backends {
		if b.Weight != 1 {
			t.Errorf("backend %v has weight %d, want 1", b.Addr, b.Weight)
		}
	}
}

// A change of ready, serving, terminating or hints moves an address between Backends and
// the endpoints kept, and never out of Endpoints: so no socket is ended by it. Only
// leaving the slice removes an address.
func TestTranslateConditionChangesKeepEndpoints(t *testing.T) {
	variants := map[string][]func(*discoveryv1.Endpoint){
		"ready":                   nil,
		"not ready":               {notReady},
		"terminating":             {terminating},
		"terminating not serving": {terminatingNotServing},
		"zone hint here":          {zoneHints("zone-a")},
		"zone hint elsewhere":     {zoneHints("zone-b")},
		"node hint here":          {nodeHints("node-a")},
		"node hint elsewhere":     {nodeHints("node-b")},
	}
	addrs := []string{"10.88.0.5", "10.88.0.6"}
	wantEndpoints := []netip.AddrPort{netip.MustParseAddrPort("10.88.0.5:8080"), netip.MustParseAddrPort("10.88.0.6:8080")}
	for n1, v1 := range variants {
		for n2, v2 := range variants {
			for _, svc := range []*corev1.Service{webService(), webService(func(s *corev1.Service) {
				s.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
			})} {
				got, _ := Translate(Input{
					Services:       []*corev1.Service{svc},
					EndpointSlices: []*discoveryv1.EndpointSlice{webSlice("web-1", ep(addrs[0], append(v1, onNode("node-a"))...), ep(addrs[1], append(v2, onNode("node-b"))...))},
					Node:           thisNode,
				})
				if len(got) != 1 {
					t.Fatalf("%s + %s: %d services", n1, n2, len(got))
				}
				var have []netip.AddrPort
				for _, e := range got[0].Endpoints {
					have = append(have, e.Addr)
				}
				if !slices.Equal(have, wantEndpoints) {
					t.Errorf("%s + %s: endpoints %v, want %v", n1, n2, have, wantEndpoints)
				}
				for _, b := range got[0].Backends {
					if !slices.Contains(have, b.Addr) {
						t.Errorf("%s + %s: backend %v not among the endpoints", n1, n2, b.Addr)
					}
				}
			}
		}
	}
}

func TestSelectorOfTheWatch(t *testing.T) {
	for _, c := range []struct {
		proxy       string
		filterProxy bool
		want        string
	}{
		{"", true, "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"},
		{"podsock", true, "!service.kubernetes.io/headless,service.kubernetes.io/service-proxy-name=podsock"},
		{"podsock", false, "!service.kubernetes.io/headless"},
	} {
		sel, err := selector(c.proxy, c.filterProxy)
		if err != nil || sel.String() != c.want {
			t.Errorf("selector(%q, %v) = %v, %v; want %s", c.proxy, c.filterProxy, sel, err, c.want)
		}
	}
	if _, err := selector("not a label value", true); err == nil {
		t.Error("an invalid service proxy name was accepted")
	}
}

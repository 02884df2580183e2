// Package service is the desired service model: what podsock should balance, whichever
// source wants it. The TOML file (package config) is one source; each source hands the
// agent whole snapshots of it, and the agent merges them (Merge) into what the datapath
// serves. Nothing here knows Kubernetes or BPF; the tags give the shape a config file
// writes it in.
package service

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"time"
)

// Source names where a service came from, as `services --json` shows it.
type Source string

const (
	SourceFile       Source = "file"
	SourceKubernetes Source = "kubernetes"
)

// Protocol is a transport protocol a service is balanced for.
type Protocol string

const (
	ProtocolTCP Protocol = "tcp"
	ProtocolUDP Protocol = "udp"
)

// Valid reports whether p is a protocol the datapath balances.
func (p Protocol) Valid() bool { return p == ProtocolTCP || p == ProtocolUDP }

// Affinity chooses how a service's backend is picked for a new socket.
type Affinity string

const (
	// AffinityNone picks a backend for every socket on its own, by weight.
	// It is the default; the zero Affinity "" means the same.
	AffinityNone Affinity = "none"
	// AffinityPod sends every socket of one pod to the same backend for as
	// long as that backend stays in the service; when it is removed, the
	// pod's next socket picks a new one, which then sticks in turn. Sockets
	// that are not a pod's (the host's among them) have no affinity: each
	// picks by weight.
	AffinityPod Affinity = "pod"
	// AffinityClient is Kubernetes' sessionAffinity ClientIP, with the pod as the client:
	// AffinityPod, except that the host netns counts as one client too, and that a choice
	// lapses once AffinityTimeout passes with no new socket of that client.
	AffinityClient Affinity = "client"
)

// Valid reports whether a is a known affinity ("" is not: a source fills it in).
func (a Affinity) Valid() bool { return a == AffinityNone || a == AffinityPod || a == AffinityClient }

// Sticky reports whether a pod's sockets stick to one backend.
func (a Affinity) Sticky() bool { return a == AffinityPod || a == AffinityClient }

// Selector picks pods by namespace and labels, like a Kubernetes label
// selector restricted to equality.
type Selector struct {
	// Namespace is the pod's namespace; "" means any namespace.
	Namespace string `toml:"namespace,omitempty"`
	// Labels must all be on the pod with exactly these values (a value ""
	// requires the label to be present and empty); labels the selector does
	// not name are ignored. Empty means any labels.
	Labels map[string]string `toml:"labels,omitempty"`
}

// Matches reports whether a pod in namespace with labels is selected. The zero
// Selector matches every pod; a source must not hand one over by mistake.
func (s Selector) Matches(namespace string, labels map[string]string) bool {
	if s.Namespace != "" && s.Namespace != namespace {
		return false
	}
	for k, want := range s.Labels {
		if got, ok := labels[k]; !ok || got != want {
			return false
		}
	}
	return true
}

// AnyMatches reports whether any of sels selects the pod.
func AnyMatches(sels []Selector, namespace string, labels map[string]string) bool {
	return slices.ContainsFunc(sels, func(s Selector) bool { return s.Matches(namespace, labels) })
}

// Service is one frontend (VIP, port, protocol) and the backends behind it. The zero
// values of the newer fields behave as a file that leaves them out: the zero Affinity
// means AffinityNone, and the zero AllowHost (false) has no effect without Allow. Code
// that sets Allow must choose AllowHost deliberately.
type Service struct {
	Name string `toml:"name"`
	// Source is who wants the service; "" counts as SourceFile.
	Source   Source     `toml:"-"`
	VIP      netip.Addr `toml:"vip"`
	Port     uint16     `toml:"port"`
	Protocol Protocol   `toml:"protocol"`
	// Backends may be empty: the service then exists but refuses connects.
	Backends []Backend `toml:"backends"`
	Affinity Affinity  `toml:"affinity,omitempty"`
	// Allow is the service's client allow-list. When it is present, only pods that any
	// selector matches, plus the host netns if AllowHost, may connect; connect() and
	// sendmsg() from any other client fail with EPERM. Without it every client may
	// connect.
	Allow     []Selector `toml:"allow,omitempty"`
	AllowHost bool       `toml:"allow_host"`

	// AffinityTimeout bounds an AffinityClient choice; 0 keeps it while its backend stays.
	AffinityTimeout time.Duration `toml:"-"`
	// HostOnly balances only the host netns' sockets and leaves every other client's
	// alone: a NodePort on 127.0.0.1 is the host's, while a pod's loopback is its own.
	HostOnly bool `toml:"-"`
	// Endpoints are every endpoint the source knows behind the service, chosen as a
	// backend or not (Kubernetes' terminating ones, for instance). Sockets already on an
	// endpoint that is not a backend are kept; they end only when it leaves Endpoints. A
	// source without the notion leaves it empty, and then only Backends count.
	Endpoints []Endpoint `toml:"-"`
}

// Endpoint is one address a source knows behind a service, and the state it gave it.
type Endpoint struct {
	Addr                        netip.AddrPort
	Ready, Serving, Terminating bool
	Zone, Node                  string
}

// Retained are the endpoints that are not backends: no new socket goes to them, and the
// sockets they have stay.
func (s Service) Retained() []netip.AddrPort {
	var out []netip.AddrPort
	for _, e := range s.Endpoints {
		if !s.HasBackend(e.Addr) && !slices.Contains(out, e.Addr) {
			out = append(out, e.Addr)
		}
	}
	return out
}

// HasBackend reports whether addr is one of the service's backends.
func (s Service) HasBackend(addr netip.AddrPort) bool {
	return slices.ContainsFunc(s.Backends, func(b Backend) bool { return b.Addr == addr })
}

// Backend is one address a service balances to, with its relative share of new sockets.
type Backend struct {
	Addr   netip.AddrPort `toml:"addr"`
	Weight uint32         `toml:"weight"`
}

// Key identifies the service in the datapath, e.g. "10.96.0.20:80/tcp" or
// "[fd00::1]:53/udp". Two services the datapath serves never share a key.
func (s Service) Key() string {
	return netip.AddrPortFrom(s.VIP, s.Port).String() + "/" + string(s.Protocol)
}

// From is the service's source, SourceFile when it names none.
func (s Service) From() Source {
	if s.Source == "" {
		return SourceFile
	}
	return s.Source
}

// RestrictsClients reports whether the service has a client allow-list. Without one
// every client, pod or host, may connect, whatever AllowHost says.
func (s Service) RestrictsClients() bool { return len(s.Allow) > 0 }

// AllowsPod reports whether a pod with this namespace and labels may connect to the
// service: always when the service does not restrict clients, else when any Allow
// selector matches the pod. Other pods get EPERM.
func (s Service) AllowsPod(namespace string, labels map[string]string) bool {
	return !s.RestrictsClients() || AnyMatches(s.Allow, namespace, labels)
}

// AllowsHost reports whether sockets of the host netns may connect to the service:
// always when the service does not restrict clients, else when AllowHost is set.
func (s Service) AllowsHost() bool { return !s.RestrictsClients() || s.AllowHost }

// Bounds the datapath has whatever the limits: the weight range, and the fixed-size name
// field it reports back, which holds a Kubernetes service port's namespace/name:port
// (63 + 1 + 63 + 1 + 15 bytes).
const (
	MaxWeight  = 1000
	MaxNameLen = 143
)

// SameFrontend says s and o have the same name and frontend: one may stand for the other
// where a position of a list was checked for unique names and frontends.
func (s *Service) SameFrontend(o *Service) bool {
	return s.Name == o.Name && s.VIP == o.VIP && s.Port == o.Port && s.Protocol == o.Protocol
}

// Equal says s and o are the same service, in every field.
func (s *Service) Equal(o *Service) bool {
	return s.Name == o.Name && s.Source == o.Source && s.VIP == o.VIP && s.Port == o.Port && s.Protocol == o.Protocol &&
		slices.Equal(s.Backends, o.Backends) && s.Affinity == o.Affinity && s.AffinityTimeout == o.AffinityTimeout &&
		slices.EqualFunc(s.Allow, o.Allow, Selector.Equal) && s.AllowHost == o.AllowHost && s.HostOnly == o.HostOnly &&
		slices.Equal(s.Endpoints, o.Endpoints)
}

// Equal says the selectors select the same.
func (s Selector) Equal(o Selector) bool {
	return s.Namespace == o.Namespace && maps.Equal(s.Labels, o.Labels)
}

// Check says what keeps the datapath from serving s, or nil: a source hands over what it
// is given (a file, an API object), and one bad service must not stop the others.
// maxBackends is limits.backends_per_service; 0 means no bound.
func (s Service) Check(maxBackends int) error {
	switch {
	case s.Name == "" || len(s.Name) > MaxNameLen:
		return fmt.Errorf("name of %d bytes, want 1 to %d", len(s.Name), MaxNameLen)
	case !s.VIP.IsValid() || s.VIP.Zone() != "" || s.VIP.Is4In6():
		return fmt.Errorf("vip %v is not a plain IPv4 or IPv6 address", s.VIP)
	case s.Port == 0:
		return errors.New("port 0")
	case !s.Protocol.Valid():
		return fmt.Errorf("protocol %q is not tcp or udp", s.Protocol)
	case maxBackends > 0 && len(s.Backends) > maxBackends:
		return fmt.Errorf("%d backends exceed limits.backends_per_service = %d", len(s.Backends), maxBackends)
	}
	for _, b := range s.Backends {
		switch {
		case !b.Addr.IsValid() || b.Addr.Port() == 0 || b.Addr.Addr().Zone() != "":
			return fmt.Errorf("backend %v is not a plain IP:PORT", b.Addr)
		case b.Addr.Addr().Is4() != s.VIP.Is4():
			return fmt.Errorf("backend %v is not of the vip's address family", b.Addr)
		case b.Weight < 1 || b.Weight > MaxWeight:
			return fmt.Errorf("backend %v: weight %d out of range (1..%d)", b.Addr, b.Weight, MaxWeight)
		}
	}
	for _, e := range s.Endpoints {
		if !e.Addr.IsValid() || e.Addr.Addr().Is4() != s.VIP.Is4() {
			return fmt.Errorf("endpoint %v is not an IP:PORT of the vip's address family", e.Addr)
		}
	}
	switch {
	case !s.Affinity.Valid() && s.Affinity != "":
		return fmt.Errorf("affinity %q is not none, pod or client", s.Affinity)
	case s.AffinityTimeout < 0 || (s.AffinityTimeout > 0 && s.Affinity != AffinityClient):
		return fmt.Errorf("affinity timeout %v needs affinity client", s.AffinityTimeout)
	}
	return nil
}

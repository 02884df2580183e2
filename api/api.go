// Package api is the contract between a running agent and its clients: the JSON shapes
// the control socket answers with (SPEC's --json shapes) and a client for it. It imports
// nothing of podsock, so a client does not pull in the agent or the datapath.
package api

import (
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// Status is what `podsock status --json` prints.
type Status struct {
	Datapath DatapathStatus `json:"datapath"`
	NRI      NRIStatus      `json:"nri"`
	Services int            `json:"services"`
	Backends int            `json:"backends"`
	Pods     int            `json:"pods"`
	// Netns counts the pod network namespaces the agent holds open.
	Netns int `json:"netns"`
	// Termination is what became of sockets still attached to removed backends.
	Termination      TerminationStatus `json:"termination"`
	ConfigGeneration uint64            `json:"config_generation"`
	ConfigPath       string            `json:"config_path"`
	LastReloadError  string            `json:"last_reload_error"`
	PID              int               `json:"pid"`
	// Goroutines the agent runs: flat over pod churn, or something leaks.
	Goroutines int `json:"goroutines"`
	// Sources are where services come from; Conflicts, the frontends two of them claim.
	Sources   []SourceStatus    `json:"sources"`
	Conflicts []ServiceConflict `json:"conflicts"`
	// Version is the agent's build; Ready is what /readyz answers, and ReadyReason what
	// it still waits for; MetricsListen is [metrics] listen ("" when off).
	Version       string `json:"version"`
	Ready         bool   `json:"ready"`
	ReadyReason   string `json:"ready_reason,omitempty"`
	MetricsListen string `json:"metrics_listen"`
}

// SourceStatus is one source of services: "file", "kubernetes".
type SourceStatus struct {
	Name string `json:"name"`
	// Synced says the source has handed over its full view; until then the services it
	// had before are kept.
	Synced   bool `json:"synced"`
	Services int  `json:"services"`
	// What a watching source (Kubernetes) adds. State is "connecting" until its first
	// sync, then "synced", or "unreachable" while its server does not answer (the last
	// view keeps serving). Syncs counts its snapshots applied, as config_generation counts
	// the file's configs. Warning says what it cannot do (no nodes access: no zone, no
	// NodePort).
	State           string     `json:"state,omitempty"`
	LastSync        *time.Time `json:"last_sync,omitempty"`
	LastSyncSeconds float64    `json:"last_sync_seconds,omitempty"`
	// CachesSyncedSeconds is how long the source's first list took, until its caches
	// had synced.
	CachesSyncedSeconds float64 `json:"caches_synced_seconds,omitempty"`
	Syncs               uint64  `json:"syncs,omitempty"`
	Warning             string  `json:"warning,omitempty"`
	SkippedServicePorts int     `json:"skipped_service_ports,omitempty"`
}

// ServiceConflict is a service left out: Dropped claimed a frontend key
// ("10.96.0.20:80/tcp") or a name ("name default/web") that Kept took first, or (key
// "invalid", no Kept) the datapath could not serve it; Reason says which.
type ServiceConflict struct {
	Key     string     `json:"key"`
	Kept    ServiceRef `json:"kept"`
	Dropped ServiceRef `json:"dropped"`
	Reason  string     `json:"reason"`
}

// ServiceRef names a service of one source.
type ServiceRef struct {
	Source string `json:"source"`
	Name   string `json:"name"`
}

type DatapathStatus struct {
	Attached     bool     `json:"attached"`
	PinDir       string   `json:"pin_dir"`
	CgroupRoot   string   `json:"cgroup_root"`
	AdoptedLinks int      `json:"adopted_links"`
	Counters     Counters `json:"counters"`
	// Features are the optional BPF programs, each loaded on its own: a program the kernel
	// refused (detail: its reason) costs only what that program does.
	Features []Feature `json:"features"`
	// BackfillPending says that sockets an older agent balanced are not counted yet:
	// termination walks every netns until they are.
	BackfillPending bool `json:"backfill_pending"`
	// Maps are each pinned map's entries, capacity ([limits]) and kernel memory;
	// MemoryBytes is their sum.
	Maps        []MapStat `json:"maps"`
	MemoryBytes uint64    `json:"memory_bytes"`
}

type NRIStatus struct {
	Enabled    bool   `json:"enabled"`
	Connected  bool   `json:"connected"`
	Socket     string `json:"socket,omitempty"`
	Reconnects uint64 `json:"reconnects"`
	// Events counts runtime events by kind: failed ones left pod facts incomplete (the pod
	// still started), late ones outlasted the handler budget.
	Events map[string]EventCount `json:"events"`
	// HandlerLatency is how long the runtime waited on podsock, per event kind, over the
	// recent events ("all_pod_events" covers every pod and container event).
	HandlerLatency map[string]LatencySummary `json:"handler_latency"`
}

// PodView is one element of `podsock pods --json`.
type PodView struct {
	Namespace   string          `json:"namespace"`
	Name        string          `json:"name"`
	UID         string          `json:"uid"`
	SandboxID   string          `json:"sandbox_id"`
	CgroupPath  string          `json:"cgroup_path"`
	CgroupID    uint64          `json:"cgroup_id"`
	Containers  []ContainerView `json:"containers"`
	NetnsPath   string          `json:"netns_path"`
	NetnsCookie uint64          `json:"netns_cookie"`
	HostNetwork bool            `json:"host_network"`
	IPs         []string        `json:"ips"`
	// SkipLB and AllowedServices are the pod's policy under the running config.
	SkipLB          bool     `json:"skip_lb"`
	AllowedServices []string `json:"allowed_services"`
}

// ContainerView is one workload container of a pod.
type ContainerView struct {
	ID         string `json:"id"`
	Name       string `json:"name"`
	CgroupPath string `json:"cgroup_path"`
	CgroupID   uint64 `json:"cgroup_id"`
}

// ServiceView is one element of `podsock services --json`.
type ServiceView struct {
	Name     string `json:"name"`
	VIP      string `json:"vip"`
	Port     uint16 `json:"port"`
	Protocol string `json:"protocol"`
	// Source is where the service came from: "file" or "kubernetes".
	Source   string   `json:"source"`
	Backends []string `json:"backends"`
	Weights  []uint32 `json:"weights"`
	// Endpoints are every endpoint a Kubernetes service knows, backend or not: in_use says
	// it is one of Backends; the others keep the sockets they have and get no new ones.
	// A file's service has none ([]).
	Endpoints []EndpointView `json:"endpoints"`
}

// EndpointView is one endpoint of a Kubernetes service, as its EndpointSlices have it.
type EndpointView struct {
	Addr        string `json:"addr"`
	Ready       bool   `json:"ready"`
	Serving     bool   `json:"serving"`
	Terminating bool   `json:"terminating"`
	Zone        string `json:"zone"`
	Node        string `json:"node"`
	InUse       bool   `json:"in_use"`
}

// EventCount is how often one kind of runtime event arrived, how often its pod facts were
// incomplete, and how often its work outlasted the handler budget.
type EventCount struct {
	Total  uint64 `json:"total"`
	Failed uint64 `json:"failed"`
	Late   uint64 `json:"late"`
}

// TerminationStatus is what `status` shows about socket termination.
type TerminationStatus struct {
	Available bool   `json:"available"`
	Error     string `json:"error,omitempty"`
	// Protocols are the ones [lb] terminate covers now.
	Protocols []string `json:"protocols"`
	Passes    uint64   `json:"passes"`
	// Backends counts removed {service, backend} pairs handled; Destroyed and Failed the
	// sockets bpf_sock_destroy ended or refused to end.
	Backends     uint64 `json:"backends"`
	Destroyed    uint64 `json:"destroyed"`
	Failed       uint64 `json:"failed"`
	NetnsEntered uint64 `json:"netns_entered"`
	// NetnsUnreachable counts netns holding such sockets that the agent has no handle on.
	NetnsUnreachable uint64 `json:"netns_unreachable"`
	FullWalks        uint64 `json:"full_walks"`
	// LatePasses are the second passes, LateDestroyed what only they found.
	LatePasses    uint64 `json:"late_passes"`
	LateDestroyed uint64 `json:"late_destroyed"`
	// Retries counts passes run again after an error; GaveUp, removals dropped after
	// maxPassAttempts failed passes.
	Retries        uint64  `json:"retries"`
	GaveUp         uint64  `json:"gave_up"`
	LastPassMillis float64 `json:"last_pass_ms"`
	LastError      string  `json:"last_error,omitempty"`
}

// SocketView is one element of `podsock sockets --json`.
type SocketView struct {
	Proto        string `json:"proto"`
	State        string `json:"state"`
	Local        string `json:"local"`
	Remote       string `json:"remote"`
	NetnsCookie  uint64 `json:"netns_cookie"`
	SocketCookie uint64 `json:"socket_cookie"`
	Pod          string `json:"pod"`
	Service      string `json:"service"`
	Backend      string `json:"backend"`
	// VIP is the service address the application asked for (and sees); "" when podsock
	// did not balance the socket.
	VIP string `json:"vip"`
	UID uint32 `json:"uid"`
}

// SocketQuery is what `podsock sockets` can filter on.
type SocketQuery struct {
	Pod     string // "namespace/name"
	Backend string // "ip:port"
	Proto   string // "tcp" or "udp"
}

// ParsedSocketQuery is a SocketQuery whose values have been checked.
type ParsedSocketQuery struct {
	Proto   string         // "tcp", "udp"; "": both
	Backend netip.AddrPort // invalid: any
	Pod     string         // "": every netns
}

// Parse checks the query's values, as the CLI does before it asks the agent and the agent
// does for any client. Its errors name the bad value and fit on one line.
func (q SocketQuery) Parse() (ParsedSocketQuery, error) {
	var p ParsedSocketQuery
	switch q.Proto {
	case "":
	case "tcp":
		p.Proto = "tcp"
	case "udp":
		p.Proto = "udp"
	default:
		return p, fmt.Errorf("--proto %q: want tcp or udp", q.Proto)
	}
	if q.Backend != "" {
		ap, err := netip.ParseAddrPort(q.Backend)
		if err != nil {
			return p, fmt.Errorf("--backend %q: want IP:PORT ([v6]:PORT for IPv6)", q.Backend)
		}
		p.Backend = ap
	}
	if q.Pod != "" && strings.Count(q.Pod, "/") != 1 {
		return p, fmt.Errorf("--pod %q: want NAMESPACE/NAME", q.Pod)
	}
	p.Pod = q.Pod
	return p, nil
}

// Counters are the datapath's operation counters, summed over CPUs.
type Counters struct {
	Connects  uint64 `json:"connects"`
	Sendmsgs  uint64 `json:"sendmsgs"`
	Reversed  uint64 `json:"reversed"`
	NoBackend uint64 `json:"no_backend"`
	NoStorage uint64 `json:"no_storage"`
	// Denied counts connects/sendmsgs refused with EPERM by a service's allow-list.
	Denied uint64 `json:"denied"`
	// Skipped counts operations towards a VIP that were left alone (skip-LB pods,
	// hostns_only).
	Skipped uint64 `json:"skipped"`
	// AffinityFull counts pod-affinity choices that could not be recorded.
	AffinityFull uint64 `json:"affinity_full"`
	// Untracked counts connected sockets missing from the socket counts (the map was
	// full), and UntrackedReleased those of them since closed. While some are open,
	// termination walks every netns.
	Untracked         uint64 `json:"untracked"`
	UntrackedReleased uint64 `json:"untracked_released"`
}

// Feature is one optional kernel feature or BPF program: present, or the kernel's reason
// in Detail.
type Feature struct {
	Name     string `json:"name"`
	Present  bool   `json:"present"`
	Required bool   `json:"required"`
	Detail   string `json:"detail,omitempty"`
}

// MapStat is one pinned BPF map's use.
type MapStat struct {
	Name string `json:"name"`
	// Entries is what the map holds; for the socket storage, which has no capacity, the
	// balanced connected sockets open (those the socket counts hold).
	Entries  int `json:"entries"`
	Capacity int `json:"capacity"`
	// Limit is the [limits] key that sets Capacity; "" for maps of a fixed size.
	Limit string `json:"limit,omitempty"`
	// MemoryBytes is the kernel memory the map takes, as the kernel accounts it.
	MemoryBytes uint64 `json:"memory_bytes"`
}

// LatencySummary is how long the runtime waited on podsock for recent events of a kind.
type LatencySummary struct {
	Count uint64        `json:"count"`
	P50   time.Duration `json:"p50_ns"`
	P99   time.Duration `json:"p99_ns"`
	Max   time.Duration `json:"max_ns"`
}

// TraceTimeFormat is RFC 3339 with all nine digits of the nanoseconds, so times sort as
// strings and line up.
const TraceTimeFormat = "2006-01-02T15:04:05.000000000Z07:00"

// TraceView is one line of `podsock trace --json`: one socket-LB decision.
type TraceView struct {
	Time  string `json:"time"`
	Op    string `json:"op"`
	Proto string `json:"proto"`
	// Pod is "namespace/name", "" for the host or a netns podsock does not know;
	// Container is the workload container whose task made the call, "" when not one.
	Pod          string `json:"pod"`
	Container    string `json:"container"`
	CgroupID     uint64 `json:"cgroup_id"`
	NetnsCookie  uint64 `json:"netns_cookie"`
	SocketCookie uint64 `json:"socket_cookie"`
	VIP          string `json:"vip"`
	Service      string `json:"service"`
	Backend      string `json:"backend"`
	Verdict      string `json:"verdict"`
	Errno        int    `json:"errno"`
}

// TraceQuery is what `podsock trace` can filter on.
type TraceQuery struct {
	Pod     string // "namespace/name"
	Service string // a service's name
}

// TraceLine is one line of the control socket's trace stream: a decision, or (Lost set)
// how many decisions the tracer has lost so far.
type TraceLine struct {
	TraceView
	Lost *uint64 `json:"lost,omitempty"`
}

// Package config is podsock's configuration model: a strict TOML file whose
// every problem is reported as a single "FILE:LINE: what is wrong" line, so an
// operator can fix the file without reading agent logs.
package config

import (
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"slices"
	"strconv"

	"github.com/BurntSushi/toml"
)

// DefaultPath is where the agent looks for its configuration.
const DefaultPath = "/etc/podsock/podsock.toml"

// Limits enforced by Validate that no setting changes: the weight range and the
// fixed-size name field the datapath reports back.
const (
	MaxWeight         = 1000
	MaxServiceNameLen = 127
)

// Limits is the [limits] section: the capacity of each datapath map, fixed when
// the maps are created. Each costs kernel memory at idle (16 bytes per entry of
// capacity, rounded up to a power of two, for a hash map's buckets), and more
// as entries are used. The defaults fit a node of a few hundred pods and
// thousands of services within about 12 MiB; a large node raises them.
// Changing one takes a restart, which migrates the pinned maps.
type Limits struct {
	// Services is how many services (each VIP, port and protocol) the datapath holds.
	Services int `toml:"services"`
	// BackendsPerService and SlotsPerService bound one service: its backends, and
	// the selection table its weights expand to (at least one slot per backend).
	BackendsPerService int `toml:"backends_per_service"`
	SlotsPerService    int `toml:"slots_per_service"`
	// Slots bounds the selection tables of all services together.
	Slots int `toml:"slots"`
	// Pods and Containers bound the pods the runtime reports and their workload
	// containers.
	Pods       int `toml:"pods"`
	Containers int `toml:"containers"`
	// PodServices bounds the {pod, service} entries of allow-lists, and as many of
	// pod affinity.
	PodServices int `toml:"pod_services"`
	// SocketCounts bounds the {service, netns} counts that let termination enter
	// only the netns that hold a removed backend's sockets.
	SocketCounts int `toml:"socket_counts"`
}

// DefaultLimits are the [limits] a config gets for keys it leaves out.
func DefaultLimits() Limits {
	return Limits{
		Services: 32768, BackendsPerService: 1024, SlotsPerService: 4096, Slots: 262144,
		Pods: 4096, Containers: 16384, PodServices: 131072, SocketCounts: 65536,
	}
}

// limitRange is the values one limit may take: the datapath's own bounds.
type limitRange struct {
	key      string
	min, max int
	field    func(*Limits) *int
}

var limitRanges = []limitRange{
	{"services", 1, 1 << 20, func(l *Limits) *int { return &l.Services }},
	{"backends_per_service", 1, 65536, func(l *Limits) *int { return &l.BackendsPerService }},
	{"slots_per_service", 1, 65536, func(l *Limits) *int { return &l.SlotsPerService }},
	{"slots", 1, 1 << 24, func(l *Limits) *int { return &l.Slots }},
	{"pods", 1, 1 << 20, func(l *Limits) *int { return &l.Pods }},
	{"containers", 1, 1 << 22, func(l *Limits) *int { return &l.Containers }},
	{"pod_services", 1, 1 << 24, func(l *Limits) *int { return &l.PodServices }},
	{"socket_counts", 1, 1 << 22, func(l *Limits) *int { return &l.SocketCounts }},
}

// Protocol is a transport protocol a service is balanced for.
type Protocol string

const (
	ProtocolTCP Protocol = "tcp"
	ProtocolUDP Protocol = "udp"
)

func (p Protocol) valid() bool { return p == ProtocolTCP || p == ProtocolUDP }

// Config is a parsed, validated configuration file.
type Config struct {
	Path     string    `toml:"-"` // file it was loaded from; "" when parsed from unnamed bytes
	Agent    Agent     `toml:"agent"`
	NRI      NRI       `toml:"nri"`
	LB       LB        `toml:"lb"`
	Limits   Limits    `toml:"limits"`
	Services []Service `toml:"service"`
}

type Agent struct {
	CgroupRoot string `toml:"cgroup_root"` // "" means the cgroup2 mount itself
	BPFFS      string `toml:"bpffs"`
	StateDir   string `toml:"state_dir"`
	LogLevel   string `toml:"log_level"`
}

type NRI struct {
	Enabled     bool   `toml:"enabled"`
	Socket      string `toml:"socket"`
	PluginName  string `toml:"plugin_name"`
	PluginIndex string `toml:"plugin_index"` // two digits: NRI orders plugins by it
}

// LB is the [lb] section: how socket-LB treats sockets, across services.
type LB struct {
	// Terminate lists the protocols whose sockets to a removed backend are
	// destroyed. Empty means none.
	Terminate []Protocol `toml:"terminate"`
	// HostnsOnly (hostns_only, default false) limits socket-LB to sockets of
	// the host network namespace, as Cilium's bpf-lb-sock-hostns-only does:
	// connects and sends from pods go to the service VIP untranslated, for
	// another load balancer (a CNI, a service mesh) to handle.
	HostnsOnly bool `toml:"hostns_only"`
	// Skip ([[lb.skip]]) selects pods whose sockets socket-LB leaves alone,
	// typically service mesh pods whose sidecar must see the VIP. A pod is
	// skipped when any selector matches it, or when it carries the
	// annotation podsock.io/skip-lb: "true" (see SkipsLB). Empty means none.
	Skip []Selector `toml:"skip,omitempty"`
	// SkipAnnotation (skip_annotation, default true) honours the annotation
	// podsock.io/skip-lb. Whoever writes a pod spec can set it; an operator
	// who wants only their own [[lb.skip]] selectors to count sets this false.
	SkipAnnotation bool `toml:"skip_annotation"`
}

// Terminates reports whether sockets of protocol p to removed backends are
// destroyed.
func (l LB) Terminates(p Protocol) bool { return slices.Contains(l.Terminate, p) }

// Service is one [[service]]. Parse fills in the keys a file omits (protocol
// "tcp", affinity "none", allow_host = true). A Service built in Go behaves
// the same when it leaves the newer fields zero: the zero Affinity means
// AffinityNone, and the zero AllowHost (false) has no effect without Allow.
// Code that sets Allow must choose AllowHost deliberately.
type Service struct {
	Name     string     `toml:"name"`
	VIP      netip.Addr `toml:"vip"`
	Port     uint16     `toml:"port"`
	Protocol Protocol   `toml:"protocol"`
	// Backends may be empty: the service then exists but refuses connects.
	Backends []Backend `toml:"backends"`
	// Affinity (affinity, default "none") is "none" or "pod"; see AffinityPod.
	Affinity Affinity `toml:"affinity,omitempty"`
	// Allow ([[service.allow]]) is the service's client allow-list. When it
	// is present, only pods that any selector matches, plus the host netns
	// if AllowHost, may connect; connect() and sendmsg() from any other
	// client fail with EPERM. Without it every client may connect. In a file
	// the list may be left out but not given empty (allow = []).
	Allow []Selector `toml:"allow,omitempty"`
	// AllowHost (allow_host, default true) lets sockets of the host network
	// namespace connect when the service has an allow-list. Without an
	// allow-list it has no effect, so a file may only set allow_host = false
	// together with [[service.allow]].
	AllowHost bool `toml:"allow_host"`
}

// Key identifies the service in the datapath, e.g. "10.96.0.20:80/tcp" or
// "[fd00::1]:53/udp". Two services may not share a key.
func (s Service) Key() string {
	return netip.AddrPortFrom(s.VIP, s.Port).String() + "/" + string(s.Protocol)
}

type Backend struct {
	Addr   netip.AddrPort `toml:"addr"`
	Weight uint32         `toml:"weight"` // 1..MaxWeight; relative share of new connections
}

// Default returns the configuration used for every key a file omits.
func Default() *Config {
	return &Config{
		Agent: Agent{
			BPFFS:    "/sys/fs/bpf",
			StateDir: "/run/podsock",
			LogLevel: "info",
		},
		NRI: NRI{
			Enabled:     true,
			Socket:      "/var/run/nri/nri.sock",
			PluginName:  "podsock",
			PluginIndex: "10",
		},
		LB:     LB{Terminate: []Protocol{ProtocolTCP, ProtocolUDP}, SkipAnnotation: true},
		Limits: DefaultLimits(),
	}
}

// Load reads and parses the file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		msg := err.Error()
		// The path is already the error's prefix; don't repeat it.
		var pe *fs.PathError
		if errors.As(err, &pe) {
			msg = pe.Op + ": " + pe.Err.Error()
		}
		return nil, &Error{File: path, Msg: msg, Err: err}
	}
	return Parse(path, data)
}

// Parse parses and validates data; name is the file name used in errors and
// recorded as Config.Path. Keys the file omits keep their Default values. The
// returned error is an *Error describing the first problem in the file.
func Parse(name string, data []byte) (*Config, error) {
	var doc map[string]any
	if _, err := toml.Decode(string(data), &doc); err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, &Error{File: name, Line: pe.Position.Line, Msg: pe.Message, Err: err}
		}
		return nil, &Error{File: name, Msg: err.Error(), Err: err}
	}

	c := Default()
	c.Path = name
	pos := indexLines(data)

	d := decoder{c: c, bad: map[string]bool{}}
	d.document(doc)

	// Values that failed to decode were left at their zero value; checking
	// them again would only repeat the decode error less precisely.
	problems := d.problems
	for _, p := range c.check(pos) {
		if !d.covers(p.at) {
			problems = append(problems, p)
		}
	}
	if err := c.report(problems, pos); err != nil {
		return nil, err
	}
	return c, nil
}

// Validate checks the values and their relations (unique names and keys,
// address families, limits). Parse already calls it; it is exported for
// configurations built or modified in code, so its errors name Path but no
// line: the config may no longer match the file.
func (c *Config) Validate() error {
	return c.report(c.check(nil), nil)
}

// report turns the problems into one error: the one earliest in the file, as
// later ones are often consequences of it and one clear line beats a list.
func (c *Config) report(problems []problem, pos lineIndex) error {
	if len(problems) == 0 {
		return nil
	}
	best, bestLine := 0, pos.line(problems[0].at)
	for i, p := range problems[1:] {
		if l := pos.line(p.at); l > 0 && (bestLine == 0 || l < bestLine) {
			best, bestLine = i+1, l
		}
	}
	return &Error{File: c.Path, Line: bestLine, Msg: problems[best].msg}
}

// Error is a problem with a configuration file.
type Error struct {
	File string
	Line int // 1-based; 0 when the problem has no single line
	Msg  string
	Err  error // underlying cause, if any
}

func (e *Error) Error() string {
	file := e.File
	if file == "" {
		file = "<config>"
	}
	msg := oneLine(e.Msg)
	if e.Line > 0 {
		return file + ":" + strconv.Itoa(e.Line) + ": " + msg
	}
	return file + ": " + msg
}

func (e *Error) Unwrap() error { return e.Err }

// oneLine keeps messages that quote foreign text (the TOML library's) on one
// line, which log scrapers and the CLI rely on.
func oneLine(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c == '\n' || c == '\r' {
			b[i] = ' '
		}
	}
	return string(b)
}

// problem is one thing wrong, located by its place in the document rather
// than by line so that decode and validation problems can be ordered together.
type problem struct {
	at  keyPath
	msg string
}

// AgentSettings reads only the [agent] section, leniently: the commands that talk to a
// running agent need its state_dir even when the rest of the file has just been broken
// (which is exactly when an operator asks for `podsock status`).
func AgentSettings(path string) (Agent, error) {
	var doc struct {
		Agent Agent `toml:"agent"`
	}
	doc.Agent = Default().Agent
	if _, err := toml.DecodeFile(path, &doc); err != nil {
		return Agent{}, err
	}
	return doc.Agent, nil
}

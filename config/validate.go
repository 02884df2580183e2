package config

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/podsock/podsock/service"
)

type problems []problem

func (ps *problems) add(at keyPath, format string, args ...any) {
	*ps = append(*ps, problem{at: at, msg: fmt.Sprintf(format, args...)})
}

// check finds everything wrong with c's values, in document order. pos, when
// the config was parsed, locates the other party of a conflict.
func (c *Config) check(pos *positions) []problem {
	ps := c.checkSettings()
	c.checkServices(&ps, pos, knownServices{})
	return ps
}

// checkSettings checks everything but the services themselves.
func (c *Config) checkSettings() problems {
	var ps problems
	var root keyPath

	agent := root.key("agent")
	switch c.Agent.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		ps.add(agent.key("log_level"), "agent.log_level %q is not one of debug, info, warn, error", c.Agent.LogLevel)
	}
	ps.absPath(agent.key("cgroup_root"), "agent.cgroup_root", c.Agent.CgroupRoot, true)
	ps.absPath(agent.key("bpffs"), "agent.bpffs", c.Agent.BPFFS, false)
	ps.absPath(agent.key("state_dir"), "agent.state_dir", c.Agent.StateDir, false)
	ps.absPath(agent.key("services_file"), "agent.services_file", c.Agent.ServicesFile, true)

	nri := root.key("nri")
	// The socket only matters when NRI is used; a disabled section may keep
	// whatever it had.
	if c.NRI.Enabled {
		ps.absPath(nri.key("socket"), "nri.socket", c.NRI.Socket, false)
	}
	if n := c.NRI.PluginName; n == "" {
		ps.add(nri.key("plugin_name"), "nri.plugin_name must not be empty")
	} else if !validPluginName(n) {
		ps.add(nri.key("plugin_name"), "nri.plugin_name %q may only contain letters, digits, '_', '.' and '-'", n)
	}
	if x := c.NRI.PluginIndex; len(x) != 2 || !isDigit(x[0]) || !isDigit(x[1]) {
		ps.add(nri.key("plugin_index"), "nri.plugin_index %q must be exactly two digits, like \"10\"", x)
	}

	lb := root.key("lb")
	terminate := lb.key("terminate")
	seen := map[service.Protocol]bool{}
	for i, p := range c.LB.Terminate {
		switch {
		case !p.Valid():
			ps.add(terminate.index(i), "lb.terminate: %q is not tcp or udp", p)
		case seen[p]:
			ps.add(terminate.index(i), "lb.terminate lists %q twice", p)
		}
		seen[p] = true
	}
	for i, sel := range c.LB.Skip {
		ps.checkSelector(lb.key("skip").index(i), fmt.Sprintf("lb.skip #%d", i+1), sel)
	}

	lim := root.key("limits")
	if l := c.Limits; l.SlotsPerService < l.BackendsPerService {
		ps.add(lim.key("slots_per_service"), "limits.slots_per_service = %d is below limits.backends_per_service = %d: every backend needs a slot",
			l.SlotsPerService, l.BackendsPerService)
	}
	if l := c.Limits; l.Slots < l.SlotsPerService {
		ps.add(lim.key("slots"), "limits.slots = %d is below limits.slots_per_service = %d", l.Slots, l.SlotsPerService)
	}
	if n := len(c.Services); n > c.Limits.Services {
		// One line for the whole config, at the first service that does not fit.
		ps.add(keyPath{}.key("service").index(c.Limits.Services), "%d services exceed limits.services = %d", n, c.Limits.Services)
	}
	return ps
}

// knownServices is what a check may take as already shown of a config's services: a
// reload's Loader knows those decoded from unchanged text, and whether the names and
// frontends are those of the config before, position by position.
type knownServices struct {
	valid  func(i int) bool // the i-th service passes its own checks; nil: none known
	unique bool             // no two services share a name or a frontend
}

func (c *Config) checkServices(ps *problems, pos *positions, known knownServices) {
	svcs := keyPath{}.key("service")
	// Keyed by value: a frontend's string (Key) is built only for a problem.
	type frontend struct {
		addr  netip.AddrPort
		proto service.Protocol
	}
	var names map[string]int  // name -> index of the service that has it
	var keys map[frontend]int // frontend -> index of the service that has it
	if !known.unique {
		names, keys = make(map[string]int, len(c.Services)), make(map[frontend]int, len(c.Services))
	}
	for i, s := range c.Services {
		// Paths and labels are only built for a problem: most services have none, and
		// building them for each of 100k services was most of the check's time.
		at := func() keyPath { return svcs.index(i) }
		label := lazyLabel{i: i, name: s.Name}
		claimName := func() {
			if known.unique {
				return
			}
			if first, dup := names[s.Name]; dup {
				ps.add(at().key("name"), "%s: name already used by service #%d%s", label, first+1, pos.lineOf(svcs.index(first).key("name")))
			} else {
				names[s.Name] = i
			}
		}
		claimFrontend := func() {
			if known.unique {
				return
			}
			fe := frontend{netip.AddrPortFrom(s.VIP, s.Port), s.Protocol}
			if first, dup := keys[fe]; dup {
				ps.add(at().key("vip"), "%s: %s already used by %s%s",
					label, s.Key(), serviceLabel(first, c.Services[first].Name), pos.lineOf(svcs.index(first).key("vip")))
			} else {
				keys[fe] = i
			}
		}
		if known.valid != nil && known.valid(i) {
			claimName()
			claimFrontend()
			continue
		}

		if msg := checkName(s.Name); msg != "" {
			ps.add(at().key("name"), "%s: %s", label, msg)
		} else {
			claimName()
		}

		vipOK := false
		if s.VIP.IsValid() {
			if msg := checkAddr(s.VIP); msg != "" {
				ps.add(at().key("vip"), "%s: vip %s", label, msg)
			} else {
				vipOK = true
			}
		} else {
			ps.add(at().key("vip"), "%s: vip is required", label)
		}
		if s.Port == 0 {
			ps.add(at().key("port"), "%s: port is required (1..65535)", label)
		}
		if !s.Protocol.Valid() {
			ps.add(at().key("protocol"), "%s: protocol %q is not tcp or udp", label, s.Protocol)
		}
		if vipOK && s.Port != 0 && s.Protocol.Valid() {
			claimFrontend()
		}

		if max := c.Limits.BackendsPerService; len(s.Backends) > max {
			ps.add(at().key("backends"), "%s: %d backends exceed limits.backends_per_service = %d", label, len(s.Backends), max)
		}
		// Most services have a handful of backends: a map for each would cost more than
		// looking back through them.
		var seen map[netip.AddrPort]bool
		if len(s.Backends) > smallBackendList {
			seen = make(map[netip.AddrPort]bool, len(s.Backends))
		}
		listedBefore := func(j int, a netip.AddrPort) bool {
			if seen != nil {
				return seen[a]
			}
			return slices.ContainsFunc(s.Backends[:j], func(b service.Backend) bool { return b.Addr == a })
		}
		for j, b := range s.Backends {
			bat := func() keyPath { return at().key("backends").index(j) }
			addr := func() keyPath { return bat().key("addr") }
			what := backendLabel{svc: label, addr: b.Addr}
			a := b.Addr.Addr()
			switch {
			case !a.IsValid():
				what.index = j + 1
				ps.add(addr(), "%s: address is required", what)
			case checkAddr(a) != "":
				ps.add(addr(), "%s: address %s", what, checkAddr(a))
			case b.Addr.Port() == 0:
				ps.add(addr(), "%s: port out of range (1..65535)", what)
			case vipOK && a.Is4() != s.VIP.Is4():
				ps.add(addr(), "%s: address family differs from vip %s", what, s.VIP)
			case listedBefore(j, b.Addr):
				ps.add(addr(), "%s: listed twice", what)
			}
			if seen != nil {
				seen[b.Addr] = true
			}
			if b.Weight < 1 || b.Weight > MaxWeight {
				ps.add(bat().key("weight"), "%s: weight %d out of range (1..%d)", what, b.Weight, MaxWeight)
			}
		}

		// The zero Affinity is AffinityNone for Services built in code; a
		// file cannot say affinity = "" (the decoder rejects it).
		if s.Affinity != "" && !fileAffinity(s.Affinity) {
			ps.add(at().key("affinity"), "%s", affinityMsg(label.String(), s.Affinity))
		}
		for j, sel := range s.Allow {
			ps.checkSelector(at().key("allow").index(j), fmt.Sprintf("%s: allow #%d", label, j+1), sel)
		}
	}
}

// smallBackendList is how many backends checkServices checks for repeats by looking back
// rather than with a map.
const smallBackendList = 16

// lazyLabel is serviceLabel, formatted only when a problem is.
type lazyLabel struct {
	i    int
	name string
}

func (l lazyLabel) String() string { return serviceLabel(l.i, l.name) }

// backendLabel names a backend in a problem: by address, or by position (index, from 1)
// when it has none.
type backendLabel struct {
	svc   lazyLabel
	addr  netip.AddrPort
	index int
}

func (b backendLabel) String() string {
	if b.index > 0 {
		return fmt.Sprintf("%s: backend #%d", b.svc, b.index)
	}
	return fmt.Sprintf("%s: backend %q", b.svc, b.addr)
}

func (ps *problems) absPath(at keyPath, what, p string, emptyOK bool) {
	switch {
	case p == "" && emptyOK:
	case p == "":
		ps.add(at, "%s must not be empty", what)
	case !filepath.IsAbs(p):
		ps.add(at, "%s %q must be an absolute path", what, p)
	}
}

// checkName returns what is wrong with a service name, or "". Names are shown
// in CLI tables and carried in fixed-size datapath records, hence the limits.
func checkName(n string) string {
	switch {
	case n == "":
		return "name must not be empty"
	case len(n) > MaxServiceNameLen:
		return fmt.Sprintf("name is %d bytes long, at most %d allowed", len(n), MaxServiceNameLen)
	case !utf8.ValidString(n):
		return "name must be valid UTF-8"
	}
	if printableASCII(n) {
		return ""
	}
	for _, r := range n {
		if unicode.IsSpace(r) || !unicode.IsPrint(r) {
			return "name must not contain spaces or unprintable characters"
		}
	}
	return ""
}

// printableASCII says every byte of n is a printable ASCII character other than space:
// most names, which need no look at Unicode's tables.
func printableASCII(n string) bool {
	for i := 0; i < len(n); i++ {
		if n[i] <= ' ' || n[i] > '~' {
			return false
		}
	}
	return true
}

// checkAddr returns what is wrong with a VIP or backend address, or "".
func checkAddr(a netip.Addr) string {
	switch {
	case a.Zone() != "":
		return fmt.Sprintf("%s must not have a zone", a)
	case a.Is4In6():
		// Parse unmaps these; only configs built in code can get here.
		return fmt.Sprintf("%s is IPv4-mapped; write it as %s", a, a.Unmap())
	case a.IsUnspecified():
		return fmt.Sprintf("%s is unspecified", a)
	case a.IsMulticast():
		return fmt.Sprintf("%s is multicast", a)
	}
	return ""
}

func validPluginName(n string) bool {
	return !strings.ContainsFunc(n, func(r rune) bool { return !isBareKeyRune(r) && r != '.' })
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

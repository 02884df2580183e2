package config

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/podsock/podsock/service"
)

// decoder fills a Config from the generic document the TOML library produced.
// Walking the document by hand, rather than letting the library decode into
// structs, is what gives every unknown key and wrong type an exact location:
// the library neither tells which [[service]] a key belongs to nor reports
// problems in a stable order.
type decoder struct {
	c        *Config
	problems []problem
	bad      map[string]bool // paths whose value could not be decoded
}

func (d *decoder) fail(at keyPath, format string, args ...any) {
	d.problems = append(d.problems, problem{at: at, msg: fmt.Sprintf(format, args...)})
	d.bad[at.String()] = true
}

// covers reports whether at, or a value containing it, failed to decode.
func (d *decoder) covers(at keyPath) bool {
	for ; len(at) > 0; at = at[:len(at)-1] {
		if d.bad[at.String()] {
			return true
		}
	}
	return false
}

// serviceKeys are a [[service]]'s keys, sorted.
var serviceKeys = []string{"affinity", "allow", "allow_host", "backends", "name", "port", "protocol", "vip"}

// serviceKeysOf is sortedKeys(t) for a [[service]] table, without sorting when t has only
// keys of serviceKeys: sorting each of 100k services' keys was a third of their decode.
func serviceKeysOf(t map[string]any) []string {
	out := make([]string, 0, len(t))
	for _, k := range serviceKeys {
		if _, ok := t[k]; ok {
			out = append(out, k)
		}
	}
	if len(out) != len(t) {
		return sortedKeys(t)
	}
	return out
}

// Maps are walked in key order so that two problems on one line (an inline
// table) are always reported the same way.
func sortedKeys(m map[string]any) []string { return slices.Sorted(maps.Keys(m)) }

func (d *decoder) document(doc map[string]any) {
	var root keyPath
	for _, k := range sortedKeys(doc) {
		v, at := doc[k], root.key(k)
		switch k {
		case "agent":
			d.agent(at, v)
		case "nri":
			d.nri(at, v)
		case "lb":
			d.lb(at, v)
		case "limits":
			d.limits(at, v)
		case "kubernetes":
			d.kubernetes(at, v)
		case "metrics":
			d.metrics(at, v)
		case "service":
			d.services(at, v)
		default:
			if _, ok := v.(map[string]any); ok {
				d.fail(at, "unknown table [%s]", quoteKey(k))
			} else {
				d.fail(at, "unknown key %q", k)
			}
		}
	}
}

func (d *decoder) table(at keyPath, name string, v any) (map[string]any, bool) {
	t, ok := v.(map[string]any)
	if !ok {
		d.fail(at, "%s must be a table ([%s]), not %s", name, name, typeName(v))
	}
	return t, ok
}

func (d *decoder) unknown(at keyPath, section, k string) {
	d.fail(at, "unknown key %q in [%s]", k, section)
}

func (d *decoder) agent(at keyPath, v any) {
	t, ok := d.table(at, "agent", v)
	if !ok {
		return
	}
	a := &d.c.Agent
	fields := map[string]*string{
		"cgroup_root": &a.CgroupRoot,
		"bpffs":       &a.BPFFS,
		"state_dir":   &a.StateDir,
		"log_level":   &a.LogLevel,

		"services_file": &a.ServicesFile,
	}
	for _, k := range sortedKeys(t) {
		if dst, ok := fields[k]; ok {
			d.str(at.key(k), "agent."+k, t[k], dst)
		} else {
			d.unknown(at.key(k), "agent", k)
		}
	}
}

func (d *decoder) nri(at keyPath, v any) {
	t, ok := d.table(at, "nri", v)
	if !ok {
		return
	}
	n := &d.c.NRI
	for _, k := range sortedKeys(t) {
		v, kat := t[k], at.key(k)
		switch k {
		case "enabled":
			d.boolean(kat, "nri.enabled", v, &n.Enabled)
		case "socket":
			d.str(kat, "nri.socket", v, &n.Socket)
		case "plugin_name":
			d.str(kat, "nri.plugin_name", v, &n.PluginName)
		case "plugin_index":
			// An easy mistake, as it looks like a number.
			if i, ok := v.(int64); ok {
				d.fail(kat, "nri.plugin_index must be a string of two digits (plugin_index = \"%02d\"), not integer", i)
			} else {
				d.str(kat, "nri.plugin_index", v, &n.PluginIndex)
			}
		default:
			d.unknown(kat, "nri", k)
		}
	}
}

func (d *decoder) lb(at keyPath, v any) {
	t, ok := d.table(at, "lb", v)
	if !ok {
		return
	}
	for _, k := range sortedKeys(t) {
		v, kat := t[k], at.key(k)
		switch k {
		case "terminate":
			elems, ok := v.([]any)
			if !ok {
				d.fail(kat, "lb.terminate must be an array of protocols, not %s", typeName(v))
				continue
			}
			// Non-nil even when empty: "terminate = []" means none, not the default.
			ps := make([]service.Protocol, 0, len(elems))
			for i, e := range elems {
				s, ok := e.(string)
				if !ok {
					d.fail(kat.index(i), "lb.terminate[%d] must be a string, not %s", i, typeName(e))
				}
				// Keep indexes aligned with the file even for rejected elements.
				ps = append(ps, service.Protocol(s))
			}
			d.c.LB.Terminate = ps
		case "hostns_only":
			d.boolean(kat, "lb.hostns_only", v, &d.c.LB.HostnsOnly)
		case "skip_annotation":
			d.boolean(kat, "lb.skip_annotation", v, &d.c.LB.SkipAnnotation)
		case "skip":
			d.c.LB.Skip = d.selectors(kat, "lb.skip", "lb.skip", v)
		default:
			d.unknown(kat, "lb", k)
		}
	}
}

func (d *decoder) limits(at keyPath, v any) {
	t, ok := d.table(at, "limits", v)
	if !ok {
		return
	}
	for _, k := range sortedKeys(t) {
		v, kat := t[k], at.key(k)
		i := slices.IndexFunc(limitRanges, func(r limitRange) bool { return r.key == k })
		if i < 0 {
			d.unknown(kat, "limits", k)
			continue
		}
		n, ok := v.(int64)
		if !ok {
			d.fail(kat, "limits.%s must be an integer, not %s", k, typeName(v))
			continue
		}
		r := limitRanges[i]
		if n < int64(r.min) || n > int64(r.max) {
			d.fail(kat, "limits.%s = %d is out of range (%d..%d)", k, n, r.min, r.max)
			continue
		}
		*r.field(&d.c.Limits) = int(n)
	}
}

func (d *decoder) kubernetes(at keyPath, v any) {
	t, ok := d.table(at, "kubernetes", v)
	if !ok {
		return
	}
	k := &d.c.Kubernetes
	for _, key := range sortedKeys(t) {
		v, kat := t[key], at.key(key)
		switch key {
		case "enabled":
			d.boolean(kat, "kubernetes.enabled", v, &k.Enabled)
		case "kubeconfig":
			d.str(kat, "kubernetes.kubeconfig", v, &k.Kubeconfig)
		case "node_name":
			d.str(kat, "kubernetes.node_name", v, &k.NodeName)
		case "service_proxy_name":
			d.str(kat, "kubernetes.service_proxy_name", v, &k.ServiceProxyName)
		case "qps":
			switch n := v.(type) {
			case float64:
				k.QPS = n
			case int64:
				k.QPS = float64(n)
			default:
				d.fail(kat, "kubernetes.qps must be a number, not %s", typeName(v))
			}
			if k.QPS < 0 {
				d.fail(kat, "kubernetes.qps = %v is negative", k.QPS)
			}
		case "burst":
			n, ok := v.(int64)
			switch {
			case !ok:
				d.fail(kat, "kubernetes.burst must be an integer, not %s", typeName(v))
			case n < 0 || n > 1<<20:
				d.fail(kat, "kubernetes.burst = %d is out of range (0..%d)", n, 1<<20)
			default:
				k.Burst = int(n)
			}
		case "min_sync_period":
			var s string
			if !d.str(kat, "kubernetes.min_sync_period", v, &s) {
				continue
			}
			p, err := time.ParseDuration(s)
			switch {
			case err != nil:
				d.fail(kat, "kubernetes.min_sync_period %q is not a duration (e.g. \"100ms\", \"1s\")", s)
			case p < 0 || p > time.Minute:
				d.fail(kat, "kubernetes.min_sync_period = %s is out of range (0s..1m)", s)
			default:
				k.MinSyncPeriod = Duration(p)
			}
		default:
			d.unknown(kat, "kubernetes", key)
		}
	}
}

func (d *decoder) metrics(at keyPath, v any) {
	t, ok := d.table(at, "metrics", v)
	if !ok {
		return
	}
	m := &d.c.Metrics
	for _, key := range sortedKeys(t) {
		v, kat := t[key], at.key(key)
		switch key {
		case "listen":
			if d.str(kat, "metrics.listen", v, &m.Listen) {
				if err := checkListen(m.Listen); err != nil {
					d.fail(kat, "metrics.listen %q: %v", m.Listen, err)
				}
			}
		case "per_service":
			d.boolean(kat, "metrics.per_service", v, &m.PerService)
		default:
			d.unknown(kat, "metrics", key)
		}
	}
}

// checkListen accepts "" (off) or host:port with a fixed port: probes and scrapers need
// to know where to look, so port 0 is refused, and a host name other than localhost
// would depend on the resolver at start.
func checkListen(s string) error {
	if s == "" {
		return nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return errors.New(`must be host:port, e.g. "127.0.0.1:9965"`)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("port %q must be 1-65535", port)
	}
	if host == "" || host == "localhost" {
		return nil
	}
	if a, err := netip.ParseAddr(host); err != nil || a.Zone() != "" {
		return fmt.Errorf("host %q must be an IP address, \"localhost\" or empty (every address)", host)
	}
	return nil
}

// arrayElems returns the elements of an array, be it an array of tables
// ([[service]]) or an inline array (service = [{...}]).
func arrayElems(v any) ([]any, bool) {
	switch v := v.(type) {
	case []map[string]any:
		es := make([]any, len(v))
		for i, t := range v {
			es[i] = t
		}
		return es, true
	case []any:
		return v, true
	}
	return nil, false
}

func (d *decoder) services(at keyPath, v any) {
	elems, ok := arrayElems(v)
	if !ok {
		d.fail(at, "service must be an array of tables ([[service]]), not %s", typeName(v))
		return
	}
	tables, _ := v.([]map[string]any)
	d.c.Services = slices.Grow(d.c.Services, len(elems))
	for i, e := range elems {
		t, ok := e.(map[string]any)
		if !ok {
			d.fail(at.index(i), "service #%d must be a table, not %s", i+1, typeName(e))
			d.c.Services = append(d.c.Services, service.Service{})
			continue
		}
		d.c.Services = append(d.c.Services, d.service(at, i, t))
		// The document's table is garbage once decoded: letting it go as the decode goes
		// keeps a large file's document and config from both being live at the peak.
		elems[i] = nil
		if tables != nil {
			tables[i] = nil
		}
	}
}

// service decodes the i-th [[service]] of the array at. Its keys' paths are built only
// for a problem: building one for every key of a 100k-service file was a fifth of the
// decode's allocations.
func (d *decoder) service(at keyPath, i int, t map[string]any) service.Service {
	s := service.Service{Source: service.SourceFile, Protocol: service.ProtocolTCP, Affinity: service.AffinityNone, AllowHost: true}
	name, _ := t["name"].(string)
	// Formatted only for a problem: most services have none.
	label := lazyLabel{i: i, name: name}
	for _, k := range serviceKeysOf(t) {
		v := t[k]
		kat := func() keyPath { return at.index(i).key(k) }
		switch k {
		case "name":
			if str, ok := v.(string); ok {
				s.Name = str
				continue
			}
			d.str(kat(), label.String()+": name", v, &s.Name)
		case "vip":
			str, ok := v.(string)
			if !ok {
				d.fail(kat(), "%s: vip must be a string, not %s", label, typeName(v))
				continue
			}
			a, err := netip.ParseAddr(str)
			if err != nil {
				d.fail(kat(), "%s: vip %q is not an IP address", label, str)
				continue
			}
			s.VIP = unmap(a)
		case "port":
			n, ok := v.(int64)
			if !ok {
				d.fail(kat(), "%s: port must be an integer, not %s", label, typeName(v))
				continue
			}
			if n < 1 || n > 65535 {
				d.fail(kat(), "%s: port %d out of range (1..65535)", label, n)
				continue
			}
			s.Port = uint16(n)
		case "protocol":
			p, ok := v.(string)
			if !ok {
				d.str(kat(), label.String()+": protocol", v, &p)
			}
			s.Protocol = service.Protocol(p)
		case "backends":
			s.Backends = d.backends(kat, label, v)
		case "affinity":
			var a string
			if d.str(kat(), label.String()+": affinity", v, &a) && !fileAffinity(service.Affinity(a)) {
				d.fail(kat(), "%s", affinityMsg(label.String(), service.Affinity(a)))
			}
			s.Affinity = service.Affinity(a)
		case "allow":
			s.Allow = d.selectors(kat(), label.String()+": allow", "service.allow", v)
			if s.Allow != nil && len(s.Allow) == 0 {
				// Read literally, an empty allow-list would refuse everyone.
				d.fail(kat(), "%s: allow is empty; leave it out to let every client connect", label)
			}
		case "allow_host":
			_, hasAllow := t["allow"]
			if d.boolean(kat(), label.String()+": allow_host", v, &s.AllowHost) && !s.AllowHost && !hasAllow {
				d.fail(kat(), "%s: allow_host = false needs a client allow-list ([[service.allow]]); without one every client may connect", label)
			}
		default:
			d.fail(kat(), "%s: unknown key %q", label, k)
		}
	}
	return s
}

// selectors decodes a list of pod selectors: lb.skip or a service's allow.
// what names it in messages, header is how it is written as an array of
// tables.
func (d *decoder) selectors(at keyPath, what, header string, v any) []service.Selector {
	elems, ok := arrayElems(v)
	if !ok {
		d.fail(at, "%s must be an array of tables ([[%s]]), not %s", what, header, typeName(v))
		return nil
	}
	sels := make([]service.Selector, 0, len(elems))
	for i, e := range elems {
		sels = append(sels, d.selector(at.index(i), fmt.Sprintf("%s #%d", what, i+1), e))
	}
	return sels
}

func (d *decoder) selector(at keyPath, what string, e any) service.Selector {
	var sel service.Selector
	t, ok := e.(map[string]any)
	if !ok {
		d.fail(at, "%s must be a table {namespace = \"...\", labels = {...}}, not %s", what, typeName(e))
		return sel
	}
	before := len(d.problems)
	for _, k := range sortedKeys(t) {
		v, kat := t[k], at.key(k)
		switch k {
		case "namespace":
			if d.str(kat, what+": namespace", v, &sel.Namespace) && sel.Namespace == "" {
				d.fail(kat, "%s: namespace is empty; leave it out to match every namespace", what)
			}
		case "labels":
			sel.Labels = d.labels(kat, what, v)
		default:
			d.fail(kat, "%s: unknown key %q", what, k)
		}
	}
	if len(d.problems) > before {
		// Validate would only add that the half-decoded selector is empty.
		d.bad[at.String()] = true
	}
	return sel
}

func (d *decoder) labels(at keyPath, what string, v any) map[string]string {
	t, ok := v.(map[string]any)
	if !ok {
		d.fail(at, "%s: labels must be a table of strings, as in labels = {app = \"web\"}, not %s", what, typeName(v))
		return nil
	}
	labels := make(map[string]string, len(t))
	for _, k := range sortedKeys(t) {
		switch v := t[k].(type) {
		case string:
			labels[k] = v
		case map[string]any:
			// labels = {app.kubernetes.io/name = "x"} is a syntax error, but
			// labels = {app.tier = "x"} is a nested table.
			d.fail(at.key(k), "%s: label %q must be a string, not table (quote a key with dots or '/', as in \"app.kubernetes.io/name\" = \"web\")", what, k)
		default:
			d.fail(at.key(k), "%s: label %q must be a string, not %s", what, k, typeName(v))
		}
	}
	return labels
}

// boolean decodes a boolean into dst and reports whether it could.
func (d *decoder) boolean(at keyPath, what string, v any, dst *bool) bool {
	return scalar(d, at, what, "boolean", v, dst)
}

func (d *decoder) backends(at func() keyPath, label fmt.Stringer, v any) []service.Backend {
	elems, ok := arrayElems(v) // also [[service.backends]]
	if !ok {
		d.fail(at(), "%s: backends must be an array, not %s", label, typeName(v))
		return nil
	}
	bs := make([]service.Backend, 0, len(elems))
	for j, e := range elems {
		// Rejected elements stay as zero values so indexes match the file.
		bs = append(bs, d.backend(at, label, j, e))
	}
	return bs
}

// backend decodes the j-th element of the backends at; its path is built only for a
// problem or a table.
func (d *decoder) backend(backends func() keyPath, label fmt.Stringer, j int, e any) service.Backend {
	switch e := e.(type) {
	case string:
		ap, err := parseAddrPort(e)
		if err != nil {
			d.fail(backends().index(j), "%s: backend %q: %v", label, e, err)
			return service.Backend{}
		}
		return service.Backend{Addr: ap, Weight: 1}
	case map[string]any:
		at := backends().index(j)
		b := service.Backend{Weight: 1}
		what := fmt.Sprintf("%s: backend #%d", label, j+1)
		if addr, ok := e["addr"].(string); ok {
			what = fmt.Sprintf("%s: backend %q", label, addr)
		}
		if _, ok := e["addr"]; !ok {
			d.fail(at, "%s: missing addr", what)
		}
		for _, k := range sortedKeys(e) {
			v, kat := e[k], at.key(k)
			switch k {
			case "addr":
				s, ok := v.(string)
				if !ok {
					d.fail(kat, "%s: addr must be a string, not %s", what, typeName(v))
					continue
				}
				ap, err := parseAddrPort(s)
				if err != nil {
					d.fail(kat, "%s: %v", what, err)
					continue
				}
				b.Addr = ap
			case "weight":
				n, ok := v.(int64)
				if !ok {
					d.fail(kat, "%s: weight must be an integer, not %s", what, typeName(v))
					continue
				}
				if n < 1 || n > MaxWeight {
					d.fail(kat, "%s: weight %d out of range (1..%d)", what, n, MaxWeight)
					continue
				}
				b.Weight = uint32(n)
			default:
				d.fail(kat, "%s: unknown key %q", what, k)
			}
		}
		return b
	default:
		d.fail(backends().index(j), "%s: backend #%d must be a string \"ip:port\" or a table {addr = \"ip:port\", weight = n}, not %s",
			label, j+1, typeName(e))
		return service.Backend{}
	}
}

// str decodes a string into dst and reports whether it could.
func (d *decoder) str(at keyPath, what string, v any, dst *string) bool {
	return scalar(d, at, what, "string", v, dst)
}

// scalar decodes a value of TOML type kind into dst and reports whether it
// could.
func scalar[T string | bool](d *decoder, at keyPath, what, kind string, v any, dst *T) bool {
	x, ok := v.(T)
	if !ok {
		d.fail(at, "%s must be a %s, not %s", what, kind, typeName(v))
		return false
	}
	*dst = x
	return true
}

// parseAddrPort parses "ip:port" or "[ipv6]:port". It does the splitting
// itself so each mistake gets a specific message, where netip.ParseAddrPort
// has one generic error.
func parseAddrPort(s string) (netip.AddrPort, error) {
	var host, port string
	if rest, ok := strings.CutPrefix(s, "["); ok {
		end := strings.IndexByte(rest, ']')
		if end < 0 {
			return netip.AddrPort{}, fmt.Errorf("missing ']'")
		}
		host, rest = rest[:end], rest[end+1:]
		if rest == "" {
			return netip.AddrPort{}, fmt.Errorf("missing port")
		}
		if rest[0] != ':' {
			return netip.AddrPort{}, fmt.Errorf("unexpected %q after ']'", rest)
		}
		port = rest[1:]
		if !strings.Contains(host, ":") {
			return netip.AddrPort{}, fmt.Errorf("only IPv6 addresses go in brackets")
		}
	} else {
		i := strings.LastIndexByte(s, ':')
		if i < 0 {
			return netip.AddrPort{}, fmt.Errorf("missing port")
		}
		host, port = s[:i], s[i+1:]
		if strings.Contains(host, ":") {
			return netip.AddrPort{}, fmt.Errorf("IPv6 address must be in brackets, as in \"[fd00::1]:80\"")
		}
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q is not an IP address", host)
	}
	if port == "" {
		return netip.AddrPort{}, fmt.Errorf("missing port")
	}
	if strings.Trim(port, "0123456789") != "" {
		return netip.AddrPort{}, fmt.Errorf("invalid port %q", port)
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return netip.AddrPort{}, fmt.Errorf("port out of range (1..65535)")
	}
	return netip.AddrPortFrom(unmap(ip), uint16(n)), nil
}

// unmap turns ::ffff:a.b.c.d into a.b.c.d, so that the datapath, which keys on
// the family, sees one spelling of each IPv4 address. Zoned addresses are kept
// as written for Validate to reject.
func unmap(a netip.Addr) netip.Addr {
	if a.Zone() != "" {
		return a
	}
	return a.Unmap()
}

func serviceLabel(i int, name string) string {
	if name == "" {
		return fmt.Sprintf("service #%d", i+1)
	}
	return fmt.Sprintf("service %q", name)
}

// quoteKey shows a key as it would be written in TOML, quoted only if needed.
func quoteKey(k string) string {
	if k == "" || strings.ContainsFunc(k, func(r rune) bool { return !isBareKeyRune(r) }) {
		return strconv.Quote(k)
	}
	return k
}

func isBareKeyRune(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-'
}

// typeName names a decoded value's TOML type for error messages.
func typeName(v any) string {
	switch v.(type) {
	case string:
		return "string"
	case int64:
		return "integer"
	case float64:
		return "float"
	case bool:
		return "boolean"
	case time.Time, toml.LocalDateTime, toml.LocalDate, toml.LocalTime:
		return "datetime"
	case []any, []map[string]any:
		return "array"
	case map[string]any:
		return "table"
	default:
		return fmt.Sprintf("%T", v)
	}
}

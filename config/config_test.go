package config

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/podsock/podsock/service"
)

// doc joins its arguments as lines, so argument n is line n of the file and
// the expected line of each error case can be read off the test table.
func doc(lines ...string) string { return strings.Join(lines, "\n") + "\n" }

// svc is a valid [[service]] body; cases append one bad key or override one.
const (
	svcName = `name = "default/web"`
	svcVIP  = `vip = "10.96.0.20"`
	svcPort = `port = 80`
)

func TestParseErrors(t *testing.T) {
	manyBackends := make([]string, DefaultLimits().BackendsPerService+1)
	for i := range manyBackends {
		manyBackends[i] = fmt.Sprintf("%q", fmt.Sprintf("10.88.%d.%d:80", i/250, i%250+1))
	}

	tests := []struct {
		name string
		in   string
		line int
		want string
	}{
		// Syntax errors come from the TOML library.
		{"syntax/unterminated string", doc(`[agent]`, `log_level = "info`), 2, "basic strings cannot have new lines"},
		{"syntax/trailing garbage", doc(`[nri]`, `enabled = true false`), 2, "expected newline but got"},
		{"syntax/duplicate key", doc(`[agent]`, `bpffs = "/a"`, `bpffs = "/b"`), 3, "key bpffs is already defined"},
		{"syntax/duplicate table", doc(`[agent]`, `[nri]`, `[agent]`), 3, "table agent already exists"},

		// Structure and types.
		{"unknown top-level key", doc(`# podsock`, `foo = 1`), 2, `unknown key "foo"`},
		{"unknown table", doc(`[agent]`, ``, `[agnet]`, `bpffs = "/x"`), 3, "unknown table [agnet]"},
		{"unknown table, quoted", doc(`[agent]`, `["a b".c]`), 2, `unknown table ["a b"]`},
		{"byte order mark", "\uFEFF" + doc(`[agent]`, `log_level = "x"`), 2, `agent.log_level "x"`},
		{"agent not a table", doc(`agent = "x"`), 1, "agent must be a table ([agent]), not string"},
		{"nri array of tables", doc(`[[nri]]`, `enabled = true`), 1, "nri must be a table ([nri]), not array"},
		{"lb not a table", doc(`lb = 1`), 1, "lb must be a table ([lb]), not integer"},
		{"agent unknown key", doc(`[agent]`, `bpffs = "/x"`, `bogus = 1`), 3, `unknown key "bogus" in [agent]`},
		{"agent unknown subtable", doc(`[agent]`, `[agent.extra]`, `x = 1`), 2, `unknown key "extra" in [agent]`},
		{"agent wrong type", doc(`[agent]`, `state_dir = 5`), 2, "agent.state_dir must be a string, not integer"},
		{"agent dotted key wrong type", doc(`agent.log_level = 3`), 1, "agent.log_level must be a string, not integer"},
		{"agent quoted key wrong type", doc(`[agent]`, `"cgroup_root" = []`), 2, "agent.cgroup_root must be a string, not array"},
		{"nri enabled wrong type", doc(`[nri]`, `enabled = "yes"`), 2, "nri.enabled must be a boolean, not string"},
		{"nri plugin_index integer", doc(`[nri]`, `plugin_index = 10`), 2, `must be a string of two digits (plugin_index = "10"), not integer`},
		{"nri plugin_index float", doc(`[nri]`, `plugin_index = 1.5`), 2, "nri.plugin_index must be a string, not float"},
		{"nri socket wrong type", doc(`[nri]`, `socket = 1979-05-27`), 2, "nri.socket must be a string, not datetime"},
		{"nri unknown key", doc(`[nri]`, `enabled = false`, `sock = "/x"`), 3, `unknown key "sock" in [nri]`},
		{"lb unknown key", doc(`[lb]`, `terminates = []`), 2, `unknown key "terminates" in [lb]`},
		{"lb terminate not array", doc(`[lb]`, `terminate = "tcp"`), 2, "lb.terminate must be an array of protocols, not string"},
		{"lb terminate element type", doc(`[lb]`, `terminate = [`, `  "tcp",`, `  7,`, `]`), 4, "lb.terminate[1] must be a string, not integer"},
		{"service single table", doc(`[service]`, svcName), 1, "service must be an array of tables ([[service]]), not table"},
		{"service element not table", doc(`service = [1]`), 1, "service #1 must be a table, not integer"},
		{"service unknown key", doc(`[[service]]`, svcName, svcVIP, svcPort, ``,
			`[[service]]`, `name = "b"`, svcVIP, `port = 81`, `bogus = true`), 10, `service "b": unknown key "bogus"`},
		{"service name wrong type", doc(`[[service]]`, `name = 5`, svcVIP, svcPort), 2, "service #1: name must be a string, not integer"},
		{"vip wrong type", doc(`[[service]]`, svcName, `vip = 10`, svcPort), 3, `service "default/web": vip must be a string, not integer`},
		{"vip not an address", doc(`[[service]]`, svcName, `vip = "10.96.0.300"`, svcPort), 3, `vip "10.96.0.300" is not an IP address`},
		{"port wrong type", doc(`[[service]]`, svcName, svcVIP, `port = "80"`), 4, "port must be an integer, not string"},
		{"port float", doc(`[[service]]`, svcName, svcVIP, `port = 80.0`), 4, "port must be an integer, not float"},
		{"port zero", doc(`[[service]]`, svcName, svcVIP, `port = 0`), 4, "port 0 out of range (1..65535)"},
		{"port too big", doc(`[[service]]`, svcName, svcVIP, `port = 65536`), 4, "port 65536 out of range (1..65535)"},
		{"port negative", doc(`[[service]]`, svcName, svcVIP, `port = -1`), 4, "port -1 out of range"},
		{"protocol wrong type", doc(`[[service]]`, svcName, svcVIP, svcPort, `protocol = true`), 5, "protocol must be a string, not boolean"},
		{"backends not array", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = "10.88.0.5:80"`), 5, "backends must be an array, not string"},
		{"backend wrong type", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = [8080]`), 5, `backend #1 must be a string "ip:port" or a table`},
		{"backend missing port", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = ["10.88.0.5"]`), 5, `backend "10.88.0.5": missing port`},
		{"backend empty port", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = ["10.88.0.5:"]`), 5, `backend "10.88.0.5:": missing port`},
		{"backend bad ip", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = ["10.88.0:80"]`), 5, `"10.88.0" is not an IP address`},
		{"backend ipv6 without brackets", doc(`[[service]]`, `name = "v6"`, `vip = "fd00::1"`, svcPort, `backends = ["fd00::5:80"]`), 5, "IPv6 address must be in brackets"},
		{"backend ipv4 in brackets", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = ["[10.88.0.5]:80"]`), 5, "only IPv6 addresses go in brackets"},
		{"backend missing bracket", doc(`[[service]]`, `name = "v6"`, `vip = "fd00::1"`, svcPort, `backends = ["[fd00::5:80"]`), 5, "missing ']'"},
		{"backend bracket without port", doc(`[[service]]`, `name = "v6"`, `vip = "fd00::1"`, svcPort, `backends = ["[fd00::5]"]`), 5, `backend "[fd00::5]": missing port`},
		{"backend junk after bracket", doc(`[[service]]`, `name = "v6"`, `vip = "fd00::1"`, svcPort, `backends = ["[fd00::5]80"]`), 5, `unexpected "80" after ']'`},
		{"backend port not numeric", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = ["10.88.0.5:http"]`), 5, `invalid port "http"`},
		{"backend port signed", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = ["10.88.0.5:+80"]`), 5, `invalid port "+80"`},
		{"backend port out of range", doc(`[[service]]`, svcName, svcVIP, svcPort, ``, `backends = ["10.88.0.5:99999"]`), 6,
			`service "default/web": backend "10.88.0.5:99999": port out of range`},
		{"backend port zero", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = ["10.88.0.5:0"]`), 5, `backend "10.88.0.5:0": port out of range`},
		{"backend table unknown key", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = [{addr = "10.88.0.5:80", wieght = 2}]`), 5,
			`backend "10.88.0.5:80": unknown key "wieght"`},
		{"backend table missing addr", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = ["10.88.0.5:80", {weight = 2}]`), 5, "backend #2: missing addr"},
		{"backend addr wrong type", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = [{addr = 5}]`), 5, "backend #1: addr must be a string, not integer"},
		{"backend addr invalid", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = [{addr = "10.88.0.5"}]`), 5, `backend "10.88.0.5": missing port`},
		{"backend weight wrong type", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = [{addr = "10.88.0.5:80", weight = "3"}]`), 5,
			"weight must be an integer, not string"},
		{"backend weight zero", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = [{addr = "10.88.0.5:80", weight = 0}]`), 5,
			"weight 0 out of range (1..1000)"},
		{"backend weight too big", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = [{addr = "10.88.0.5:80", weight = 1001}]`), 5,
			"weight 1001 out of range (1..1000)"},

		// Values.
		{"log_level", doc(`[agent]`, `log_level = "verbose"`), 2, `agent.log_level "verbose" is not one of debug, info, warn, error`},
		{"bpffs empty", doc(`[agent]`, `bpffs = ""`), 2, "agent.bpffs must not be empty"},
		{"bpffs relative", doc(`[agent]`, `bpffs = "sys/fs/bpf"`), 2, `agent.bpffs "sys/fs/bpf" must be an absolute path`},
		{"state_dir empty", doc(`[agent]`, `state_dir = ''`), 2, "agent.state_dir must not be empty"},
		{"state_dir relative", doc(`[agent]`, `state_dir = "run"`), 2, `agent.state_dir "run" must be an absolute path`},
		{"cgroup_root relative", doc(`[agent]`, `cgroup_root = "kubepods"`), 2, `agent.cgroup_root "kubepods" must be an absolute path`},
		{"nri socket relative", doc(`[nri]`, `socket = "nri.sock"`), 2, `nri.socket "nri.sock" must be an absolute path`},
		{"nri socket empty", doc(`[nri]`, `enabled = true`, `socket = ""`), 3, "nri.socket must not be empty"},
		{"plugin_index one digit", doc(`[nri]`, `plugin_index = "1"`), 2, `nri.plugin_index "1" must be exactly two digits`},
		{"plugin_index three digits", doc(`[nri]`, `plugin_index = "100"`), 2, `nri.plugin_index "100" must be exactly two digits`},
		{"plugin_index letters", doc(`[nri]`, `plugin_index = "a1"`), 2, `nri.plugin_index "a1" must be exactly two digits`},
		{"plugin_name empty", doc(`[nri]`, `plugin_name = ""`), 2, "nri.plugin_name must not be empty"},
		{"plugin_name bad char", doc(`[nri]`, `plugin_name = "pod sock"`), 2, `nri.plugin_name "pod sock" may only contain`},
		{"kubernetes unknown key", doc(`[kubernetes]`, `enabled = true`, `kubeconfg = "/k"`), 3, `unknown key "kubeconfg" in [kubernetes]`},
		{"kubernetes enabled string", doc(`[kubernetes]`, `enabled = "yes"`), 2, "kubernetes.enabled must be a boolean, not string"},
		{"kubernetes qps negative", doc(`[kubernetes]`, `qps = -1.5`), 2, "kubernetes.qps = -1.5 is negative"},
		{"kubernetes burst string", doc(`[kubernetes]`, `burst = "10"`), 2, "kubernetes.burst must be an integer, not string"},
		{"kubernetes min_sync_period bad", doc(`[kubernetes]`, `min_sync_period = "fast"`), 2, `kubernetes.min_sync_period "fast" is not a duration`},
		{"kubernetes min_sync_period long", doc(`[kubernetes]`, `min_sync_period = "2m"`), 2, "kubernetes.min_sync_period = 2m is out of range (0s..1m)"},
		{"affinity client in a file", doc(`[[service]]`, svcName, svcVIP, svcPort, `affinity = "client"`), 5, `affinity "client" is not "none" or "pod"`},
		{"terminate unknown protocol", doc(`[lb]`, `terminate = ["sctp"]`), 2, `lb.terminate: "sctp" is not tcp or udp`},
		{"terminate duplicate", doc(`[lb]`, `terminate = [`, `  "udp",`, `  "tcp",  # both`, `  "udp",`, `]`), 5, `lb.terminate lists "udp" twice`},

		{"name empty", doc(`[[service]]`, `name = ""`, svcVIP, svcPort), 2, "service #1: name must not be empty"},
		{"name missing", doc(`[[service]]`, svcName, svcVIP, svcPort, `[[service]]`, `vip = "10.96.0.21"`, svcPort), 5, "service #2: name must not be empty"},
		{"name too long", doc(`[[service]]`, `name = "`+strings.Repeat("n", 144)+`"`, svcVIP, svcPort), 2, "name is 144 bytes long, at most 143 allowed"},
		{"name with space", doc(`[[service]]`, `name = "web app"`, svcVIP, svcPort), 2, `service "web app": name must not contain spaces or unprintable characters`},
		{"name with control", doc(`[[service]]`, `name = "web\u0007"`, svcVIP, svcPort), 2, `must not contain spaces or unprintable characters`},
		{"name duplicate", doc(`[[service]]`, svcName, svcVIP, svcPort, `[[service]]`, svcName, svcVIP, `port = 81`), 6,
			`service "default/web": name already used by service #1 (line 2)`},
		{"vip missing", doc(`[[service]]`, svcName, svcPort), 1, `service "default/web": vip is required`},
		{"vip unspecified v4", doc(`[[service]]`, svcName, `vip = "0.0.0.0"`, svcPort), 3, "vip 0.0.0.0 is unspecified"},
		{"vip unspecified v6", doc(`[[service]]`, svcName, `vip = "::"`, svcPort), 3, "vip :: is unspecified"},
		{"vip multicast v4", doc(`[[service]]`, svcName, `vip = "239.1.1.1"`, svcPort), 3, "vip 239.1.1.1 is multicast"},
		{"vip multicast v6", doc(`[[service]]`, svcName, `vip = "ff02::1"`, svcPort), 3, "vip ff02::1 is multicast"},
		{"vip zone", doc(`[[service]]`, svcName, `vip = "fe80::1%eth0"`, svcPort), 3, "vip fe80::1%eth0 must not have a zone"},
		{"port missing", doc(`[[service]]`, svcName, svcVIP, `protocol = "udp"`), 1, `service "default/web": port is required`},
		{"protocol unknown", doc(`[[service]]`, svcName, svcVIP, svcPort, `protocol = "sctp"`), 5, `protocol "sctp" is not tcp or udp`},
		{"protocol upper case", doc(`[[service]]`, svcName, svcVIP, svcPort, `protocol = "TCP"`), 5, `protocol "TCP" is not tcp or udp`},
		{"backend family v6 in v4", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = ["[fd00::5]:80"]`), 5,
			`backend "[fd00::5]:80": address family differs from vip 10.96.0.20`},
		{"backend family mapped in v6", doc(`[[service]]`, `name = "v6"`, `vip = "fd00::1"`, svcPort, `backends = ["[::ffff:10.88.0.5]:80"]`), 5,
			`backend "10.88.0.5:80": address family differs from vip fd00::1`},
		{"backend duplicate", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = [`, `  "10.88.0.5:80",`, `  "10.88.0.6:80",`,
			`  {addr = "[::ffff:10.88.0.5]:80", weight = 2},`, `]`), 8, `backend "10.88.0.5:80": listed twice`},
		{"backend duplicate in a long list", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = [`+strings.Join(manyBackends[:20], ", ")+`,`,
			`  "10.88.0.7:80",`, `]`), 6, `backend "10.88.0.7:80": listed twice`},
		{"backend unspecified", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = ["0.0.0.0:80"]`), 5, "address 0.0.0.0 is unspecified"},
		{"backend multicast", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = ["224.0.0.1:80"]`), 5, "address 224.0.0.1 is multicast"},
		{"backend zone", doc(`[[service]]`, `name = "v6"`, `vip = "fd00::1"`, svcPort, `backends = ["[fe80::5%eth0]:80"]`), 5, "must not have a zone"},
		{"too many backends", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = [`+strings.Join(manyBackends, ", ")+`]`), 5,
			"1025 backends exceed limits.backends_per_service = 1024"},
		{"duplicate key", doc(`[[service]]`, `name = "a"`, svcVIP, svcPort, `[[service]]`, `name = "b"`, svcVIP, svcPort, `protocol = "tcp"`), 7,
			`service "b": 10.96.0.20:80/tcp already used by service "a" (line 3)`},
		{"duplicate key v6", doc(`[[service]]`, `name = "a"`, `vip = "fd00::1"`, `port = 53`, `protocol = "udp"`,
			`[[service]]`, `name = "b"`, `vip = "fd00:0::1"`, `port = 53`, `protocol = "udp"`), 8, `[fd00::1]:53/udp already used by service "a"`},
		{"duplicate key mapped", doc(`[[service]]`, `name = "a"`, svcVIP, svcPort, `[[service]]`, `name = "b"`, `vip = "::ffff:10.96.0.20"`, svcPort), 7,
			`10.96.0.20:80/tcp already used`},

		// Locations: the first problem by line wins, whatever its kind, and
		// the scanner is not fooled by strings, comments or other layouts.
		{"first by line/value before type", doc(`[[service]]`, `name = "a"`, `vip = "0.0.0.0"`, svcPort, `[[service]]`, `name = "b"`, svcVIP, `port = "80"`), 3,
			"vip 0.0.0.0 is unspecified"},
		{"first by line/type before value", doc(`[[service]]`, `name = "a"`, `vip = 1`, svcPort, `[[service]]`, `name = "b"`, `vip = "0.0.0.0"`, svcPort), 3,
			"vip must be a string"},
		{"first by line/sections out of order", doc(`[lb]`, `terminate = ["sctp"]`, `[agent]`, `log_level = "loud"`), 2, "lb.terminate"},
		{"first by line/later table", doc(`[nri]`, `plugin_index = "x"`, `[agent]`, `log_level = "loud"`), 2, "nri.plugin_index"},
		{"first by line/one service", doc(`[[service]]`, `port = 0`, `name = "web app"`, svcVIP), 2, "port 0 out of range"},
		{"multi-line string hides headers", doc(`[agent]`, `cgroup_root = """`, `[[service]]`, `vip = 1`, `"""`,
			`[[service]]`, svcName, `vip = "1.2.3"`, svcPort), 2, "agent.cgroup_root"},
		{"multi-line string does not shift services", doc(`[nri]`, `socket = '''/run/nri.sock`, `[[service]]`, `'''`, `enabled = false`,
			`[[service]]`, svcName, `vip = "1.2.3"`, svcPort), 8, `vip "1.2.3" is not an IP address`},
		{"strings and comments with brackets", doc(`[[service]] # [[service]]`, `name = "a#[[service]]=1"`, `"vip" = "10.96.0.20" # vip = "x"`,
			svcPort, `backends = ["10.88.0.5:80", # ],[`, `  "10.88.0.6:80", '10.88.0.7:8x']`), 6, `invalid port "8x"`},
		{"escaped quote in string", doc(`[[service]]`, `name = "a\"[[service]]"`, `vip = "10.96.0.20"`, svcPort, `backends = ["\"", "10.88.0.5:80"]`), 5,
			`backend "\"": missing port`},
		{"array of backend tables", doc(`[[service]]`, svcName, svcVIP, svcPort, `[[service.backends]]`, `addr = "10.88.0.5:80"`,
			`[[service.backends]]`, `addr = "10.88.0.6:80"`, `weight = 5000`), 9, `backend "10.88.0.6:80": weight 5000 out of range`},
		{"array of backend tables, missing addr", doc(`[[service]]`, svcName, svcVIP, svcPort, `[[service.backends]]`, `addr = "10.88.0.5:80"`,
			`[[service.backends]]`, `weight = 5`), 7, "backend #2: missing addr"},
		{"inline services", doc(`service = [`, `  {name = "a", vip = "10.96.0.20", port = 80},`, `  {name = "b", vip = "10.96.0.21", port = 80, extra = 1},`, `]`), 3,
			`service "b": unknown key "extra"`},
		{"inline service missing vip", doc(`service = [{name = "a", port = 80}]`), 1, `service "a": vip is required`},
		{"multi-line backend element", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = [`, `  "10.88.0.5:80",`, ``, `  # next one is bad`,
			`  { addr = "10.88.0.6:80",`, `    weight = 0 },`, `]`), 9, "weight 0 out of range"},
		{"crlf", strings.ReplaceAll(doc(`[agent]`, `bpffs = "/x"`, `[[service]]`, svcName, `vip = "x"`, svcPort), "\n", "\r\n"), 5, `vip "x" is not an IP address`},
		{"dotted keys in service", doc(`[[service]]`, svcName, svcVIP, svcPort, `backends.x = 1`), 5, "backends must be an array, not table"},

		// [limits].
		{"limit unknown", doc(`[limits]`, `service = 10`), 2, `unknown key "service" in [limits]`},
		{"limit not integer", doc(`[limits]`, `pods = "many"`), 2, "limits.pods must be an integer, not string"},
		{"limit zero", doc(`[limits]`, `slots = 0`), 2, "limits.slots = 0 is out of range (1..16777216)"},
		{"limit too large", doc(`[limits]`, `services = 2000000`), 2, "limits.services = 2000000 is out of range (1..1048576)"},
		{"slots per service below backends", doc(`[limits]`, `backends_per_service = 5000`, `slots_per_service = 4096`), 3,
			"limits.slots_per_service = 4096 is below limits.backends_per_service = 5000"},
		{"slots below slots per service", doc(`[limits]`, `slots_per_service = 8192`, `slots = 4096`), 3, "limits.slots = 4096 is below limits.slots_per_service = 8192"},
		{"more services than the limit", doc(`[limits]`, `services = 1`, `[[service]]`, `name = "a"`, svcVIP, svcPort,
			`[[service]]`, `name = "b"`, `vip = "10.96.0.21"`, svcPort), 7, "2 services exceed limits.services = 1"},
		{"backends over a raised limit", doc(`[limits]`, `backends_per_service = 2`, `[[service]]`, svcName, svcVIP, svcPort,
			`backends = ["10.88.0.5:80", "10.88.0.6:80", "10.88.0.7:80"]`), 7, "3 backends exceed limits.backends_per_service = 2"},

		// [lb] hostns_only and [[lb.skip]].
		{"hostns_only wrong type", doc(`[lb]`, `hostns_only = "true"`), 2, "lb.hostns_only must be a boolean, not string"},
		{"skip_annotation wrong type", doc(`[lb]`, ``, `skip_annotation = 0`), 3, "lb.skip_annotation must be a boolean, not integer"},
		{"skip not array", doc(`[lb]`, `skip = {namespace = "a"}`), 2, "lb.skip must be an array of tables ([[lb.skip]]), not table"},
		{"skip single table", doc(`[lb.skip]`, `namespace = "a"`), 1, "lb.skip must be an array of tables ([[lb.skip]]), not table"},
		{"skip element not table", doc(`[lb]`, `skip = [`, `  {namespace = "a"},`, `  "istio-system",`, `]`), 4,
			`lb.skip #2 must be a table {namespace = "...", labels = {...}}, not string`},
		{"skip unknown key", doc(`[[lb.skip]]`, `namespace = "a"`, `[[lb.skip]]`, `namespaces = ["b"]`), 4, `lb.skip #2: unknown key "namespaces"`},
		{"skip unknown key, no empty-selector echo", doc(`[[lb.skip]]`, `label = {app = "x"}`), 2, `lb.skip #1: unknown key "label"`},
		{"skip namespace wrong type", doc(`[[lb.skip]]`, `namespace = ["a"]`), 2, "lb.skip #1: namespace must be a string, not array"},
		{"skip namespace empty", doc(`[[lb.skip]]`, `namespace = ""`, `labels = {app = "x"}`), 2,
			"lb.skip #1: namespace is empty; leave it out to match every namespace"},
		{"skip selects everything", doc(`[lb]`, `terminate = []`, ``, `[[lb.skip]]`, `# nothing`), 4,
			"lb.skip #1 selects every pod; give a namespace, labels or both"},
		{"skip selects everything, empty labels", doc(`[lb]`, `skip = [{labels = {}}]`), 2, "lb.skip #1 selects every pod"},
		{"skip selects everything, inline", doc(`[lb]`, `skip = [`, `  {namespace = "a"},`, `  {},`, `]`), 4, "lb.skip #2 selects every pod"},
		{"skip namespace upper case", doc(`[[lb.skip]]`, `namespace = "Istio"`), 2, `lb.skip #1: namespace "Istio" is not a Kubernetes namespace name`},
		{"skip namespace too long", doc(`[[lb.skip]]`, `namespace = "`+strings.Repeat("n", 64)+`"`), 2, "is not a Kubernetes namespace name (at most 63"},
		{"skip namespace with dot", doc(`[[lb.skip]]`, `namespace = "a.b"`), 2, `namespace "a.b" is not a Kubernetes namespace name`},
		{"skip labels not table", doc(`[[lb.skip]]`, `labels = ["app=x"]`), 2,
			`lb.skip #1: labels must be a table of strings, as in labels = {app = "web"}, not array`},
		{"skip label value wrong type", doc(`[[lb.skip]]`, `namespace = "a"`, `[lb.skip.labels]`, `app = "x"`, `replicas = 3`), 5,
			`lb.skip #1: label "replicas" must be a string, not integer`},
		{"skip label dotted key", doc(`[[lb.skip]]`, `labels = {app.kubernetes = "x"}`), 2,
			`lb.skip #1: label "app" must be a string, not table (quote a key with dots or '/'`},
		{"skip label key bad", doc(`[[lb.skip]]`, `labels = {"-app" = "x"}`), 2,
			`lb.skip #1: label key "-app": must be 1 to 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit, optionally after a DNS subdomain prefix and '/'`},
		{"skip label key bad prefix", doc(`[[lb.skip]]`, `[lb.skip.labels]`, `"Example.com/app" = "x"`), 3,
			`lb.skip #1: label key "Example.com/app": prefix "Example.com" must be a DNS subdomain`},
		{"skip label key empty prefix", doc(`[[lb.skip]]`, `labels = {"/app" = "x"}`), 2, `label key "/app": prefix "" must be a DNS subdomain`},
		{"skip label key two slashes", doc(`[[lb.skip]]`, `labels = {"a.io/b/c" = "x"}`), 2, `label key "a.io/b/c": name "b/c" after the prefix must be 1 to 63`},
		{"skip label key empty name", doc(`[[lb.skip]]`, `labels = {"a.io/" = "x"}`), 2, `label key "a.io/": name "" after the prefix`},
		{"skip label key too long", doc(`[[lb.skip]]`, `labels = {`+strings.Repeat("k", 64)+` = "x"}`), 2, `label key "kkkk`},
		{"skip label value bad", doc(`[[lb.skip]]`, `namespace = "a"`, `labels = {app = "web app"}`), 3,
			`lb.skip #1: label "app": value "web app" must be empty or 1 to 63 letters`},
		{"skip label value too long", doc(`[[lb.skip]]`, `labels = {app = "`+strings.Repeat("v", 64)+`"}`), 2, `label "app": value "vvvv`},
		{"skip second selector bad", doc(`[[lb.skip]]`, `namespace = "a"`, `[[lb.skip]]`, `namespace = "b"`, `[[lb.skip]]`, `namespace = "c_"`), 6,
			`lb.skip #3: namespace "c_"`},

		// affinity, allow_host and [[service.allow]].
		{"affinity unknown", doc(`[[service]]`, svcName, svcVIP, svcPort, `affinity = "client-ip"`), 5,
			`service "default/web": affinity "client-ip" is not "none" or "pod"`},
		{"affinity empty", doc(`[[service]]`, svcName, svcVIP, svcPort, `affinity = ""`), 5, `affinity "" is not "none" or "pod"`},
		{"affinity upper case", doc(`[[service]]`, svcName, svcVIP, svcPort, `affinity = "Pod"`), 5, `affinity "Pod" is not "none" or "pod"`},
		{"affinity wrong type", doc(`[[service]]`, svcName, svcVIP, svcPort, `affinity = true`), 5, `service "default/web": affinity must be a string, not boolean`},
		{"allow_host wrong type", doc(`[[service]]`, svcName, svcVIP, svcPort, `allow_host = 1`), 5, `service "default/web": allow_host must be a boolean, not integer`},
		{"allow_host false without allow", doc(`[[service]]`, svcName, svcVIP, svcPort, `allow_host = false`), 5,
			`service "default/web": allow_host = false needs a client allow-list ([[service.allow]]); without one every client may connect`},
		{"allow empty", doc(`[[service]]`, svcName, svcVIP, svcPort, `allow = []`), 5, `service "default/web": allow is empty; leave it out to let every client connect`},
		{"allow not array", doc(`[[service]]`, svcName, svcVIP, svcPort, `allow = "default"`), 5,
			`service "default/web": allow must be an array of tables ([[service.allow]]), not string`},
		{"allow element not table", doc(`[[service]]`, svcName, svcVIP, svcPort, `allow = [{namespace = "a"}, 2]`), 5,
			`service "default/web": allow #2 must be a table`},
		{"allow unknown key", doc(`[[service]]`, svcName, svcVIP, svcPort, `[[service.allow]]`, `namespace = "a"`, `pods = ["x"]`), 7,
			`service "default/web": allow #1: unknown key "pods"`},
		{"allow selects everything", doc(`[[service]]`, svcName, svcVIP, svcPort, `[[service.allow]]`, `namespace = "a"`, `[[service.allow]]`), 7,
			`service "default/web": allow #2 selects every pod`},
		{"allow bad namespace", doc(`[[service]]`, svcName, svcVIP, svcPort, `allow = [`, `  {namespace = "default"},`, `  {namespace = "-x"},`, `]`), 7,
			`service "default/web": allow #2: namespace "-x" is not a Kubernetes namespace name`},
		{"allow bad label key", doc(`[[service]]`, svcName, svcVIP, svcPort, `[[service.allow]]`, `[service.allow.labels]`, `role = "client"`, `"bad key" = "x"`), 8,
			`service "default/web": allow #1: label key "bad key"`},
		{"allow in second service", doc(`[[service]]`, `name = "a"`, svcVIP, svcPort, `[[service.allow]]`, `namespace = "x"`,
			`[[service]]`, `name = "b"`, svcVIP, `port = 81`, `[[service.allow]]`, `namespace = "y"`, `labels = {k = "v"}`, `[[service.allow]]`, `labels = {k = 1}`), 15,
			`service "b": allow #2: label "k" must be a string, not integer`},
		{"allow_host false before a bad allow", doc(`[[service]]`, svcName, svcVIP, svcPort, `allow_host = false`, `allow = 1`), 6, "allow must be an array of tables"},
		{"allow in inline service", doc(`service = [`, `  {name = "a", vip = "10.96.0.20", port = 80, allow = [{namespace = "ok"}]},`,
			`  {name = "b", vip = "10.96.0.20", port = 81, allow = [{labels = {"x/" = "y"}}]},`, `]`), 3, `service "b": allow #1: label key "x/"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			const file = "/etc/podsock/podsock.toml"
			c, err := Parse(file, []byte(tt.in))
			if err == nil {
				t.Fatalf("Parse succeeded (%d services), want error at line %d containing %q", len(c.Services), tt.line, tt.want)
			}
			msg := err.Error()
			prefix := fmt.Sprintf("%s:%d: ", file, tt.line)
			if !strings.HasPrefix(msg, prefix) || !strings.Contains(msg, tt.want) {
				t.Errorf("error = %q\nwant prefix %q containing %q", msg, prefix, tt.want)
			}
			if strings.ContainsAny(msg, "\n\r") {
				t.Errorf("error spans several lines: %q", msg)
			}
			var ce *Error
			if !errors.As(err, &ce) || ce.File != file || ce.Line != tt.line {
				t.Errorf("error is %#v, want *Error with File %q and Line %d", err, file, tt.line)
			}
		})
	}
}

const example = `# podsock example
[agent]
cgroup_root = "/sys/fs/cgroup/kubepods.slice"
bpffs = "/sys/fs/bpf"
state_dir = "/run/podsock"
log_level = "debug"

[nri]
enabled = true
socket = "/var/run/nri/nri.sock"
plugin_name = "podsock"
plugin_index = "05"

[lb]
terminate = ["udp"]
hostns_only = true
skip_annotation = false

[limits]
services = 100000
backends_per_service = 5000
slots_per_service = 8192

[[lb.skip]]
namespace = "istio-system"
labels = { app = "istio-ingress" }

[[lb.skip]]
labels = { "sidecar.istio.io/inject" = "true", "example.com/empty" = "" }

[[service]]
name = "default/web"
vip = "10.96.0.20"
port = 80
protocol = "tcp"
backends = ["10.88.0.5:8080", "10.88.0.6:8080"]
affinity = "pod"
allow_host = false

[[service.allow]]
namespace = "default"
labels = { role = "client" }

[[service.allow]]
namespace = "monitoring"

[[service]]
name = "default/web-udp"        # same VIP and port, other protocol
vip = "10.96.0.20"
port = 80
protocol = "udp"
backends = [
  {addr = "10.88.0.5:8080", weight = 3},
  "10.88.0.6:8080",
  {addr = "[::ffff:10.88.0.7]:8080"},
]

[[service]]
name = "kube-system/dns"
vip = "fd00::a"
port = 53
backends = ["[fd00::5]:5353", {addr = "[fd00::6]:5353", weight = 1000}]
affinity = "none"
allow = [{labels = {"k8s-app" = "kube-dns"}}]

[[service]]
name = "default/mapped"
vip = "::ffff:10.96.0.30"
port = 443
backends = []

[[service]]
name = "default/none"
vip = "10.96.0.31"
port = 65535
`

func TestParseExample(t *testing.T) {
	c, err := Parse("example.toml", []byte(example))
	if err != nil {
		t.Fatal(err)
	}
	if c.Path != "example.toml" {
		t.Errorf("Path = %q", c.Path)
	}
	wantAgent := Agent{CgroupRoot: "/sys/fs/cgroup/kubepods.slice", BPFFS: "/sys/fs/bpf", StateDir: "/run/podsock", LogLevel: "debug"}
	if c.Agent != wantAgent {
		t.Errorf("Agent = %+v, want %+v", c.Agent, wantAgent)
	}
	wantNRI := NRI{Enabled: true, Socket: "/var/run/nri/nri.sock", PluginName: "podsock", PluginIndex: "05"}
	if c.NRI != wantNRI {
		t.Errorf("NRI = %+v, want %+v", c.NRI, wantNRI)
	}
	if !slices.Equal(c.LB.Terminate, []service.Protocol{service.ProtocolUDP}) || c.LB.Terminates(service.ProtocolTCP) || !c.LB.Terminates(service.ProtocolUDP) {
		t.Errorf("LB = %+v", c.LB)
	}
	wantSkip := []service.Selector{
		{Namespace: "istio-system", Labels: map[string]string{"app": "istio-ingress"}},
		{Labels: map[string]string{"sidecar.istio.io/inject": "true", "example.com/empty": ""}},
	}
	wantLimits := DefaultLimits()
	wantLimits.Services, wantLimits.BackendsPerService, wantLimits.SlotsPerService = 100000, 5000, 8192
	if c.Limits != wantLimits {
		t.Errorf("Limits = %+v, want %+v", c.Limits, wantLimits)
	}
	if !c.LB.HostnsOnly || c.LB.SkipAnnotation || !sameSelectors(c.LB.Skip, wantSkip) {
		t.Errorf("LB = %+v, want hostns_only and skip %+v", c.LB, wantSkip)
	}
	web, dns := c.Services[0], c.Services[2]
	wantAllow := []service.Selector{{Namespace: "default", Labels: map[string]string{"role": "client"}}, {Namespace: "monitoring"}}
	if web.Affinity != service.AffinityPod || web.AllowHost || !sameSelectors(web.Allow, wantAllow) || !web.RestrictsClients() || web.AllowsHost() {
		t.Errorf("web = %+v, want affinity pod, allow %+v, no host", web, wantAllow)
	}
	if dns.Affinity != service.AffinityNone || !dns.AllowHost || !dns.AllowsHost() ||
		!sameSelectors(dns.Allow, []service.Selector{{Labels: map[string]string{"k8s-app": "kube-dns"}}}) {
		t.Errorf("dns = %+v, want affinity none, allow k8s-app=kube-dns and the host", dns)
	}
	for _, s := range c.Services[3:] {
		if s.Affinity != service.AffinityNone || !s.AllowHost || s.Allow != nil || s.RestrictsClients() {
			t.Errorf("service %q = %+v, want the defaults", s.Name, s)
		}
	}

	ap := netip.MustParseAddrPort
	want := []struct {
		key      string
		name     string
		backends []service.Backend
	}{
		{"10.96.0.20:80/tcp", "default/web", []service.Backend{{Addr: ap("10.88.0.5:8080"), Weight: 1}, {Addr: ap("10.88.0.6:8080"), Weight: 1}}},
		{"10.96.0.20:80/udp", "default/web-udp", []service.Backend{{Addr: ap("10.88.0.5:8080"), Weight: 3}, {Addr: ap("10.88.0.6:8080"), Weight: 1}, {Addr: ap("10.88.0.7:8080"), Weight: 1}}},
		{"[fd00::a]:53/tcp", "kube-system/dns", []service.Backend{{Addr: ap("[fd00::5]:5353"), Weight: 1}, {Addr: ap("[fd00::6]:5353"), Weight: 1000}}},
		{"10.96.0.30:443/tcp", "default/mapped", []service.Backend{}},
		{"10.96.0.31:65535/tcp", "default/none", nil},
	}
	if len(c.Services) != len(want) {
		t.Fatalf("%d services, want %d", len(c.Services), len(want))
	}
	for i, w := range want {
		s := c.Services[i]
		if s.Key() != w.key || s.Name != w.name {
			t.Errorf("service %d = %q %s, want %q %s", i, s.Name, s.Key(), w.name, w.key)
		}
		if !slices.Equal(s.Backends, w.backends) {
			t.Errorf("service %q backends = %v, want %v", s.Name, s.Backends, w.backends)
		}
		if !s.VIP.Is4() && !s.VIP.Is6() || s.VIP.Is4In6() {
			t.Errorf("service %q VIP %v not normalized", s.Name, s.VIP)
		}
		for _, b := range s.Backends {
			if b.Addr.Addr().Is4In6() {
				t.Errorf("service %q backend %v not unmapped", s.Name, b.Addr)
			}
		}
	}
	if c.Services[3].VIP != netip.MustParseAddr("10.96.0.30") {
		t.Errorf("mapped VIP = %v, want 10.96.0.30", c.Services[3].VIP)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("Validate after Parse: %v", err)
	}
}

// sameConfig compares everything but Path, treating nil and empty slices and
// maps alike.
func sameConfig(a, b *Config) bool {
	if a.Agent != b.Agent || a.NRI != b.NRI || !slices.Equal(a.LB.Terminate, b.LB.Terminate) ||
		a.LB.HostnsOnly != b.LB.HostnsOnly || !sameSelectors(a.LB.Skip, b.LB.Skip) || len(a.Services) != len(b.Services) {
		return false
	}
	for i, s := range a.Services {
		t := b.Services[i]
		if s.Name != t.Name || s.VIP != t.VIP || s.Port != t.Port || s.Protocol != t.Protocol || !slices.Equal(s.Backends, t.Backends) ||
			s.Affinity != t.Affinity || s.AllowHost != t.AllowHost || !sameSelectors(s.Allow, t.Allow) {
			return false
		}
	}
	return true
}

func sameSelectors(a, b []service.Selector) bool {
	return slices.EqualFunc(a, b, func(x, y service.Selector) bool { return x.Namespace == y.Namespace && maps.Equal(x.Labels, y.Labels) })
}

// reencode writes c back as TOML, which must parse to the same config: the
// struct tags and the parser agree on the file format.
func reencode(t *testing.T, c *Config) {
	t.Helper()
	var buf strings.Builder
	if err := toml.NewEncoder(&buf).Encode(c); err != nil {
		t.Fatalf("encode: %v", err)
	}
	again, err := Parse("encoded.toml", []byte(buf.String()))
	if err != nil {
		t.Fatalf("re-parse of encoded config: %v\n%s", err, buf.String())
	}
	if !sameConfig(c, again) {
		t.Fatalf("re-parse differs:\n%+v\n%+v\n%s", c, again, buf.String())
	}
}

func TestEncodeRoundTrip(t *testing.T) {
	c, err := Parse("example.toml", []byte(example))
	if err != nil {
		t.Fatal(err)
	}
	reencode(t, c)
	reencode(t, Default())
}

func TestParseDefaults(t *testing.T) {
	for _, in := range []string{"", "# nothing\n", "[agent]\n[nri]\n[lb]\n"} {
		c, err := Parse("empty.toml", []byte(in))
		if err != nil {
			t.Fatalf("Parse(%q): %v", in, err)
		}
		d := Default()
		if c.Agent != d.Agent || c.NRI != d.NRI || !slices.Equal(c.LB.Terminate, d.LB.Terminate) || c.LB.HostnsOnly || c.LB.Skip != nil || len(c.Services) != 0 {
			t.Errorf("Parse(%q) = %+v, want defaults %+v", in, c, d)
		}
	}

	d := Default()
	wantAgent := Agent{CgroupRoot: "", BPFFS: "/sys/fs/bpf", StateDir: "/run/podsock", LogLevel: "info"}
	wantNRI := NRI{Enabled: true, Socket: "/var/run/nri/nri.sock", PluginName: "podsock", PluginIndex: "10"}
	if d.Agent != wantAgent || d.NRI != wantNRI || !d.LB.Terminates(service.ProtocolTCP) || !d.LB.Terminates(service.ProtocolUDP) || d.Path != "" {
		t.Errorf("Default() = %+v", d)
	}
	if err := d.Validate(); err != nil {
		t.Errorf("Default().Validate() = %v", err)
	}

	// Only the keys present are overridden.
	c, err := Parse("x", []byte(doc(`[agent]`, `log_level = "warn"`, `[nri]`, `enabled = false`, `socket = ""`, `plugin_name = "Pod.sock-2_x"`, `[lb]`, `terminate = []`,
		`[[service]]`, `name = "a"`, `vip = "10.96.0.1"`, `port = 1`)))
	if err != nil {
		t.Fatal(err)
	}
	if c.Agent.LogLevel != "warn" || c.Agent.BPFFS != "/sys/fs/bpf" || c.NRI.Enabled || c.NRI.PluginName != "Pod.sock-2_x" || c.NRI.PluginIndex != "10" {
		t.Errorf("partial override: %+v %+v", c.Agent, c.NRI)
	}
	if c.LB.Terminate == nil || len(c.LB.Terminate) != 0 || c.LB.Terminates(service.ProtocolTCP) {
		t.Errorf("terminate = [] gave %#v", c.LB.Terminate)
	}
	if s := c.Services[0]; s.Protocol != service.ProtocolTCP || len(s.Backends) != 0 || s.Affinity != service.AffinityNone || !s.AllowHost || s.Allow != nil ||
		s.RestrictsClients() || !s.AllowsHost() || !s.AllowsPod("any", nil) {
		t.Errorf("service defaults: %+v", s)
	}
	if d.LB.HostnsOnly || d.LB.Skip != nil || !d.LB.SkipAnnotation || d.LB.SkipsLB("kube-system", map[string]string{"app": "x"}, nil) {
		t.Errorf("Default().LB = %+v, want no hostns_only and no skip", d.LB)
	}
}

func TestServiceKey(t *testing.T) {
	for _, tt := range []struct {
		s    service.Service
		want string
	}{
		{service.Service{VIP: netip.MustParseAddr("10.96.0.20"), Port: 80, Protocol: service.ProtocolTCP}, "10.96.0.20:80/tcp"},
		{service.Service{VIP: netip.MustParseAddr("fd00::1"), Port: 53, Protocol: service.ProtocolUDP}, "[fd00::1]:53/udp"},
	} {
		if got := tt.s.Key(); got != tt.want {
			t.Errorf("Key() = %q, want %q", got, tt.want)
		}
	}
}

// Configs built in code have no file positions; Validate still names the
// problem, without a line.
func TestValidateInCode(t *testing.T) {
	valid := func() *Config {
		c := Default()
		c.Services = []service.Service{{
			Name:     "a",
			VIP:      netip.MustParseAddr("10.96.0.1"),
			Port:     80,
			Protocol: service.ProtocolTCP,
			Backends: []service.Backend{{Addr: netip.MustParseAddrPort("10.88.0.5:80"), Weight: 1}},
		}}
		return c
	}
	if err := valid().Validate(); err != nil {
		t.Fatal(err)
	}
	// The zero values of the newer fields are valid and mean the defaults;
	// AllowHost = false without Allow is accepted here (only a file cannot say it).
	if s := valid().Services[0]; s.Affinity != "" || s.AllowHost || s.RestrictsClients() || !s.AllowsHost() || !s.AllowsPod("x", nil) {
		t.Fatalf("zero Service fields do not mean the defaults: %+v", s)
	}
	withAllow := valid()
	withAllow.LB = LB{HostnsOnly: true, Skip: []service.Selector{{Namespace: "istio-system"}}}
	withAllow.Services[0].Affinity = service.AffinityPod
	withAllow.Services[0].Allow = []service.Selector{{Namespace: "default", Labels: map[string]string{"example.com/role": ""}}}
	if err := withAllow.Validate(); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		change func(c *Config)
		want   string
	}{
		{"mapped vip", func(c *Config) { c.Services[0].VIP = netip.MustParseAddr("::ffff:10.96.0.1") },
			`<config>: service "a": vip ::ffff:10.96.0.1 is IPv4-mapped; write it as 10.96.0.1`},
		{"mapped backend", func(c *Config) { c.Services[0].Backends[0].Addr = netip.MustParseAddrPort("[::ffff:10.88.0.5]:80") },
			`backend "[::ffff:10.88.0.5]:80": address ::ffff:10.88.0.5 is IPv4-mapped`},
		{"backend port zero", func(c *Config) { c.Services[0].Backends[0].Addr = netip.MustParseAddrPort("10.88.0.5:0") },
			`backend "10.88.0.5:0": port out of range`},
		{"backend without address", func(c *Config) { c.Services[0].Backends[0].Addr = netip.AddrPort{} },
			`service "a": backend #1: address is required`},
		{"weight zero", func(c *Config) { c.Services[0].Backends[0].Weight = 0 }, "weight 0 out of range (1..1000)"},
		{"weight too big", func(c *Config) { c.Services[0].Backends[0].Weight = 1001 }, "weight 1001 out of range (1..1000)"},
		{"port zero", func(c *Config) { c.Services[0].Port = 0 }, `service "a": port is required`},
		{"no vip", func(c *Config) { c.Services[0].VIP = netip.Addr{} }, `service "a": vip is required`},
		{"empty protocol", func(c *Config) { c.Services[0].Protocol = "" }, `protocol "" is not tcp or udp`},
		{"invalid utf-8 name", func(c *Config) { c.Services[0].Name = "a\xff" }, "name must be valid UTF-8"},
		{"duplicate name", func(c *Config) {
			s := c.Services[0]
			s.Port = 81
			c.Services = append(c.Services, s)
		}, `<config>: service "a": name already used by service #1`},
		{"duplicate key", func(c *Config) {
			s := c.Services[0]
			s.Name = "b"
			c.Services = append(c.Services, s)
		}, `<config>: service "b": 10.96.0.1:80/tcp already used by service "a"`},
		{"first in order", func(c *Config) { c.Agent.LogLevel = ""; c.NRI.PluginIndex = "" }, "<config>: agent.log_level"},
		{"affinity unknown", func(c *Config) { c.Services[0].Affinity = "sticky" }, `<config>: service "a": affinity "sticky" is not "none" or "pod"`},
		{"skip selects everything", func(c *Config) { c.LB.Skip = []service.Selector{{Namespace: "a"}, {Labels: map[string]string{}}} },
			"<config>: lb.skip #2 selects every pod"},
		{"skip bad label value", func(c *Config) { c.LB.Skip = []service.Selector{{Labels: map[string]string{"app": "a/b"}}} },
			`<config>: lb.skip #1: label "app": value "a/b" must be empty or`},
		{"allow bad namespace", func(c *Config) { c.Services[0].Allow = []service.Selector{{Namespace: "Default"}} },
			`<config>: service "a": allow #1: namespace "Default" is not a Kubernetes namespace name`},
		{"allow selects everything", func(c *Config) { c.Services[0].Allow = []service.Selector{{}}; c.Services[0].AllowHost = true },
			`<config>: service "a": allow #1 selects every pod`},
		{"path prefix", func(c *Config) { c.Path = "/x.toml"; c.Agent.BPFFS = "" }, "/x.toml: agent.bpffs must not be empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := valid()
			tt.change(c)
			err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate() = %v, want %q", err, tt.want)
			}
			if !strings.HasPrefix(err.Error(), "<config>: ") && !strings.HasPrefix(err.Error(), "/x.toml: ") {
				t.Errorf("error %q has a line or no file", err)
			}
		})
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "podsock.toml")
	if err := os.WriteFile(path, []byte(example), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.Path != path || len(c.Services) != 5 {
		t.Errorf("Load = Path %q, %d services", c.Path, len(c.Services))
	}

	bad := filepath.Join(dir, "bad.toml")
	if err := os.WriteFile(bad, []byte(doc(`[agent]`, `log_level = "loud"`)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(bad); err == nil || !strings.HasPrefix(err.Error(), bad+":2: agent.log_level") {
		t.Errorf("Load(bad) = %v", err)
	}

	missing := filepath.Join(dir, "missing.toml")
	_, err = Load(missing)
	if err == nil || err.Error() != missing+": open: no such file or directory" || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load(missing) = %v", err)
	}
}

func TestIndexLines(t *testing.T) {
	in := doc(
		`[agent]`,                // 1
		`bpffs = "/x"  # [nri]`,  // 2
		`[[service]]`,            // 3
		`name = '''`,             // 4
		`[[service]]`,            // 5
		`'''`,                    // 6
		`[[service]]`,            // 7
		`'vip' = "10.0.0.1"`,     // 8
		`backends = [ "a:1",`,    // 9
		`  { addr = "b:2" }, [`,  // 10
		`  1, 2 ], "c:3" ]`,      // 11
		`[[service.backends]]`,   // 12
		`"a.b" .c = 1`,           // 13
		`[service.backends.sub]`, // 14
	)
	ix := indexLines([]byte(in))
	svc := keyPath{}.key("service")
	for _, tt := range []struct {
		p    keyPath
		want int
	}{
		{keyPath{}.key("agent"), 1},
		{keyPath{}.key("agent").key("bpffs"), 2},
		{keyPath{}.key("nri"), 0},
		{svc.index(0), 3},
		{svc.index(0).key("name"), 4},
		{svc.index(1), 7},
		{svc.index(1).key("vip"), 8},
		{svc.index(1).key("port"), 7},
		{svc.index(1).key("backends"), 9},
		{svc.index(1).key("backends").index(0), 9},
		{svc.index(1).key("backends").index(1), 10},
		{svc.index(1).key("backends").index(1).key("addr"), 10},
		{svc.index(1).key("backends").index(2), 10},
		{svc.index(1).key("backends").index(3), 11},
		{svc.index(2), 3}, // unknown element: the array's first line
		{svc.index(1).key("backends").index(0).key("a.b").key("c"), 13},
		{svc.index(1).key("backends").index(0).key("sub"), 14},
	} {
		if got := ix.line(tt.p); got != tt.want {
			t.Errorf("line(%q) = %d, want %d", tt.p, got, tt.want)
		}
	}
}

func TestIndexLinesStrings(t *testing.T) {
	in := doc(
		`[agent]`,                  // 1
		`cgroup_root = """a \"""\`, // 2: escaped quotes, line continuation
		`  b"""""`,                 // 3: content quotes before the delimiter
		`bpffs = "\" [x]"`,         // 4
		`state_dir = '''`,          // 5
		`\'''`,                     // 6: no escapes in literal strings
		`log_level = 1`,            // 7
		strings.Repeat("a.", maxDepth)+"a = [1,", // 8: too deep to index, still skipped
		`2]`, // 9
		"["+strings.Repeat("b.", maxDepth)+"b]", // 10
		`c = 1`,              // 11
		`[nri]`,              // 12
		`"bad\escape" = """`, // 13: a key Go cannot unquote
		`"""`,                // 14
		`x = 'unterminated`,  // 15: invalid, but must not derail the scan
		`y = 1`,              // 16
	)
	ix := indexLines([]byte(in))
	agent, nri := keyPath{}.key("agent"), keyPath{}.key("nri")
	for _, tt := range []struct {
		p    keyPath
		want int
	}{
		{agent.key("cgroup_root"), 2},
		{agent.key("bpffs"), 4},
		{agent.key("state_dir"), 5},
		{agent.key("log_level"), 7},
		{keyPath{}.key("a"), 0},
		{keyPath{}.key("b"), 0},
		{nri, 12},
		{nri.key(`bad\escape`), 13},
		{nri.key("x"), 15},
		{nri.key("y"), 16},
	} {
		if got := ix.line(tt.p); got != tt.want {
			t.Errorf("line(%q) = %d, want %d", tt.p, got, tt.want)
		}
	}
}

func TestErrorString(t *testing.T) {
	for _, tt := range []struct {
		err  Error
		want string
	}{
		{Error{File: "f.toml", Line: 3, Msg: "bad"}, "f.toml:3: bad"},
		{Error{File: "f.toml", Msg: "bad"}, "f.toml: bad"},
		{Error{Msg: "two\nlines\r"}, "<config>: two lines "},
	} {
		if got := tt.err.Error(); got != tt.want {
			t.Errorf("Error() = %q, want %q", got, tt.want)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(example))
	f.Add([]byte(""))
	f.Add([]byte(doc(`[agent]`, `log_level = "verbose"`)))
	f.Add([]byte(doc(`[[service]]`, svcName, svcVIP, svcPort, `backends = ["10.88.0.5:99999", {addr = "[fd00::1]:80", weight = 0}]`)))
	f.Add([]byte(doc(`[[service]]`, svcName, `vip = "::ffff:10.0.0.1"`, svcPort, `[[service.backends]]`, `addr = "[::ffff:10.0.0.2]:1"`)))
	f.Add([]byte(doc(`service = [{name = "a", vip = "fd00::1", port = 1, protocol = "udp", backends = ["[fd00::2]:2"]}]`)))
	f.Add([]byte(doc(`[lb]`, `terminate = ["tcp", "tcp"]`, `[nri]`, `plugin_index = 10`)))
	f.Add([]byte(doc(`[agent]`, `cgroup_root = """`, `[[service]]`, `"""`, `x = 'y'`, `[[service]]`)))
	f.Add([]byte("[agent\nbpffs = \"/x\r\n"))
	f.Add([]byte(doc(`[lb]`, `hostns_only = true`, `[[lb.skip]]`, `namespace = "istio-system"`, `labels = { app = "istio-ingress" }`,
		`[[lb.skip]]`, `[lb.skip.labels]`, `"sidecar.istio.io/inject" = "true"`)))
	f.Add([]byte(doc(`[lb]`, `skip = [{namespace = "a"}, {labels = {"a/b/c" = "-"}}, {}]`)))
	f.Add([]byte(doc(`[[service]]`, svcName, svcVIP, svcPort, `affinity = "pod"`, `allow_host = false`,
		`[[service.allow]]`, `namespace = "default"`, `labels = { role = "client" }`, `[[service.allow]]`, `labels.tier = "web"`)))
	f.Add([]byte(doc(`service = [{name = "a", vip = "10.0.0.1", port = 1, affinity = "", allow_host = false, allow = []}]`)))
	f.Add([]byte(doc(`[[service]]`, svcName, svcVIP, svcPort, `allow = [{namespace = ""}, {labels = {app.x = "y"}}, 3]`)))

	f.Fuzz(func(t *testing.T, data []byte) {
		indexLines(data) // must cope with anything, not only valid TOML

		const file = "fuzz.toml"
		c, err := Parse(file, data)
		if err != nil {
			msg := err.Error()
			if !strings.HasPrefix(msg, file+":") {
				t.Fatalf("error without file name: %q", msg)
			}
			if strings.ContainsAny(msg, "\n\r") {
				t.Fatalf("error spans several lines: %q", msg)
			}
			var ce *Error
			if !errors.As(err, &ce) || ce.Line > bytes.Count(data, []byte("\n"))+1 {
				t.Fatalf("error %q: not an *Error, or line past the end of the input", msg)
			}
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("parsed config fails Validate: %v", err)
		}
		reencode(t, c)
	})
}

func TestAgentSettingsSurviveErrorsElsewhere(t *testing.T) {
	path := filepath.Join(t.TempDir(), "podsock.toml")
	data := "[agent]\nstate_dir = \"/run/other\"\n\n[[service]]\nname = \"x\"\nport = 99999\nbogus = 1\n"
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(path); err == nil {
		t.Fatal("Load accepted a broken config")
	}
	a, err := AgentSettings(path)
	if err != nil {
		t.Fatal(err)
	}
	if a.StateDir != "/run/other" || a.BPFFS != "/sys/fs/bpf" {
		t.Fatalf("AgentSettings = %+v, want state_dir from the file and default bpffs", a)
	}
	if err := os.WriteFile(path, []byte("[agent\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := AgentSettings(path); err == nil {
		t.Fatal("AgentSettings accepted a file that is not TOML")
	}
	// Only what comes before the services is read when it holds [agent]: broken TOML
	// among the services does not matter; an [agent] after them is found all the same.
	for _, data := range []string{
		"[agent]\nstate_dir = \"/run/other\"\n[[service]]\nname = = \"x\"\n",
		"[nri]\nenabled = false\n[[ service ]]\nname = \"x\"\n[agent]\nstate_dir = \"/run/other\"\n",
		"agent.state_dir = \"/run/other\"\n[[service]]\nname = \"x\"\n",
	} {
		if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
		if a, err := AgentSettings(path); err != nil || a.StateDir != "/run/other" {
			t.Errorf("AgentSettings of %q = %+v, %v: want state_dir /run/other", data, a, err)
		}
	}
}

// agent.services_file adds its [[service]] tables to the config's, checked together;
// its errors name that file and line.
func TestLoadServicesFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	svc := func(name, vip string) string {
		return fmt.Sprintf("[[service]]\nname = %q\nvip = %q\nport = 80\nbackends = [\"10.88.0.5:8080\"]\n", name, vip)
	}
	load := func(services, extraAgent string) (*Config, error) {
		sf := write("services.toml", services)
		main := write("podsock.toml", fmt.Sprintf("[agent]\nservices_file = %q\n%s\n[limits]\nservices = 3\n\n%s", sf, extraAgent, svc("default/web", "10.96.0.20")))
		c, err := Load(main)
		if err != nil {
			t.Fatalf("main file: %v", err)
		}
		return c, c.LoadServicesFile()
	}
	c, err := load(svc("gen/a", "10.96.1.1")+svc("gen/b", "10.96.1.2"), "")
	if err != nil || len(c.Services) != 3 || c.Services[2].Name != "gen/b" {
		t.Fatalf("services %+v, %v: want web then gen/a and gen/b", c.Services, err)
	}
	sf := filepath.Join(dir, "services.toml")
	for _, tt := range []struct {
		name, services, want string
	}{
		{"not only services", svc("gen/a", "10.96.1.1") + "[lb]\nhostns_only = true\n", sf + ":6: \"lb\": a services file holds only [[service]] tables"},
		{"bad service", "[[service]]\nname = \"gen/a\"\nvip = \"nope\"\nport = 80\n", sf + ":3: "},
		{"name used in the main file", "\n" + svc("default/web", "10.96.1.1"), sf + ":3: service \"default/web\": name already used in"},
		{"key used in the main file", svc("gen/a", "10.96.0.20"), sf + ":3: service \"gen/a\": 10.96.0.20:80/tcp already served"},
		{"over the limit", svc("gen/a", "10.96.1.1") + svc("gen/b", "10.96.1.2") + svc("gen/c", "10.96.1.3"), sf + ":11: 4 services (with"},
		{"syntax", "[[service]\n", sf + ":1: "},
	} {
		c, err := load(tt.services, "")
		if err == nil || !strings.HasPrefix(err.Error(), tt.want[:strings.LastIndex(tt.want, ":")+1]) || !strings.Contains(err.Error(), tt.want[strings.LastIndex(tt.want, ":")+1:]) {
			t.Errorf("%s: %v, want %q", tt.name, err, tt.want)
		}
		if err != nil && len(c.Services) != 1 {
			t.Errorf("%s: a rejected services file changed the config (%d services)", tt.name, len(c.Services))
		}
	}
	if _, err := Parse("x", []byte("[agent]\nservices_file = \"relative.toml\"\n")); err == nil || !strings.Contains(err.Error(), "must be an absolute path") {
		t.Errorf("relative services_file: %v", err)
	}
}

// A config or services file that is a FIFO, a device or a directory is refused with one
// line at once: read as a file, a FIFO would hold the load until something wrote to it.
func TestLoadRefusesWhatIsNotARegularFile(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.toml")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	main := filepath.Join(dir, "podsock.toml")
	if err := os.WriteFile(main, []byte(fmt.Sprintf("[agent]\nservices_file = %q\n", fifo)), 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for _, path := range []string{fifo, dir, "/dev/zero"} {
			if _, err := Load(path); err == nil || err.Error() != path+": not a regular file" {
				t.Errorf("Load(%s): %v, want %q", path, err, path+": not a regular file")
			}
		}
		c, err := Load(main)
		if err != nil {
			t.Errorf("main file: %v", err)
			return
		}
		if err := c.LoadServicesFile(); err == nil || err.Error() != fifo+": not a regular file" {
			t.Errorf("a FIFO as services_file: %v", err)
		}
		if _, err := NewLoader().Load(main); err == nil || err.Error() != fifo+": not a regular file" {
			t.Errorf("the Loader, a FIFO as services_file: %v", err)
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("a load blocked on a FIFO")
	}
}

// The [kubernetes] keys land in the model as written; those left out keep their defaults.
func TestParseKubernetes(t *testing.T) {
	c, err := Parse("k.toml", []byte(doc(`[kubernetes]`, `enabled = true`, `kubeconfig = "/etc/podsock/kubeconfig"`,
		`node_name = "node-a"`, `service_proxy_name = "podsock"`, `qps = 50`, `burst = 100`)))
	if err != nil {
		t.Fatal(err)
	}
	want := Kubernetes{Enabled: true, Kubeconfig: "/etc/podsock/kubeconfig", NodeName: "node-a", ServiceProxyName: "podsock",
		QPS: 50, Burst: 100, MinSyncPeriod: DefaultMinSyncPeriod}
	if c.Kubernetes != want {
		t.Fatalf("kubernetes %+v, want %+v", c.Kubernetes, want)
	}
	if c, err = Parse("k.toml", []byte(doc(`[kubernetes]`, `min_sync_period = "0s"`, `qps = 2.5`))); err != nil || c.Kubernetes.MinSyncPeriod != 0 || c.Kubernetes.QPS != 2.5 {
		t.Fatalf("parse: %+v, %v", c, err)
	}
}

// [metrics]: listen is host:port with a fixed port, off when empty; per_service is a
// boolean; both are strict like every other key, with the line of the problem.
func TestParseMetrics(t *testing.T) {
	c, err := Parse("m.toml", []byte(doc(`[metrics]`, `listen = "127.0.0.1:9965"`, `per_service = true`)))
	if err != nil {
		t.Fatal(err)
	}
	if c.Metrics != (Metrics{Listen: "127.0.0.1:9965", PerService: true}) {
		t.Fatalf("metrics %+v", c.Metrics)
	}
	if Default().Metrics != (Metrics{}) {
		t.Fatalf("default metrics %+v, want off", Default().Metrics)
	}
	for _, ok := range []string{"", "[::1]:9965", ":9965", "localhost:1", "0.0.0.0:65535"} {
		if _, err := Parse("m.toml", []byte(doc(`[metrics]`, fmt.Sprintf("listen = %q", ok)))); err != nil {
			t.Errorf("listen %q: %v", ok, err)
		}
	}
	for _, tc := range []struct{ in, want string }{
		{`listen = "127.0.0.1"`, `m.toml:2: metrics.listen "127.0.0.1": must be host:port, e.g. "127.0.0.1:9965"`},
		{`listen = "127.0.0.1:0"`, `m.toml:2: metrics.listen "127.0.0.1:0": port "0" must be 1-65535`},
		{`listen = "127.0.0.1:http"`, `port "http" must be 1-65535`},
		{`listen = "127.0.0.1:70000"`, `port "70000" must be 1-65535`},
		{`listen = "example.com:9965"`, `host "example.com" must be an IP address, "localhost" or empty (every address)`},
		{`listen = "[fe80::1%eth0]:9965"`, `host "fe80::1%eth0" must be an IP address`},
		{`listen = 9965`, `m.toml:2: metrics.listen must be a string, not integer`},
		{`per_service = "yes"`, `m.toml:2: metrics.per_service must be a boolean, not string`},
		{`port = 9965`, `m.toml:2: unknown key "port" in [metrics]`},
	} {
		_, err := Parse("m.toml", []byte(doc(`[metrics]`, tc.in)))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want %q", tc.in, err, tc.want)
		}
	}
}

// Package cli implements podsock's commands: argument parsing, talking to the agent, and
// printing for humans or as JSON.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/config"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/internal/preflight"
	"github.com/podsock/podsock/internal/statedir"
	"github.com/podsock/podsock/plugin"
)

// Version is set at build time (-ldflags "-X github.com/podsock/podsock/cli.Version=…").
var Version = ""

const usage = `usage: podsock <command> [flags]

commands:
  run       --config FILE             run the agent (load or adopt the datapath, serve)
  status    --config FILE [--json]    datapath, NRI and config state; exit 0 when serving
  services  --config FILE [--json]    services and backends as the datapath has them
  pods      --config FILE [--json]    pods known from the runtime: cgroups, netns, IPs, policy
  sockets   --config FILE [--json] [--pod NS/NAME] [--backend IP:PORT] [--proto tcp|udp]
                                      every TCP/UDP socket of the host and pod netns, with
                                      its pod and, when podsock balanced it, service and backend
  trace     --config FILE [--json] [--pod NS/NAME] [--service NAME]
                                      socket-LB decisions as they happen, until interrupted;
                                      decisions lost (ring full, slow reader) go to stderr
  check     --config FILE             validate a config as a reload would, touching nothing
  cleanup   --config FILE             detach and unpin everything podsock created
  version   [--json]                  version and the kernel features found
  mount-bpffs DIR                     mount bpffs at DIR unless it is one (a DaemonSet's init container)

--config defaults to ` + config.DefaultPath + `
`

// exit codes
const (
	exitOK    = 0
	exitFail  = 1
	exitUsage = 2
)

// Agent is how the commands that run the agent start it. The binary wires in package
// agent; the client commands need only the control socket's api.
type Agent struct {
	Run              func(ctx context.Context, configPath string, log *logrus.Logger) error
	RunPreRegistered func(ctx context.Context, log *logrus.Logger) error
}

// Main runs one command and returns the process exit code.
func Main(args []string, stdout, stderr io.Writer, ag Agent) int {
	// The runtime starts a pre-registered plugin with no arguments and a connection in
	// NRI_PLUGIN_SOCKET.
	if len(args) == 0 && plugin.PreRegistered() {
		return runPreRegistered(ag, stderr)
	}
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	cmd, rest := args[0], args[1:]
	c := &command{name: cmd, stdout: stdout, stderr: stderr, agent: ag}
	var run func(*command) error
	switch cmd {
	case "run":
		run = runAgent
	case "status":
		run = status
	case "services":
		run = services
	case "pods":
		run = pods
	case "sockets":
		run = sockets
	case "trace":
		run = trace
	case "check":
		run = check
	case "cleanup":
		run = cleanup
	case "version":
		run = version
	case "mount-bpffs":
		return mountBPFFS(rest, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return exitOK
	default:
		fmt.Fprintf(stderr, "podsock: unknown command %q (try `podsock help`)\n", cmd)
		return exitUsage
	}
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	c.flags = fs
	if cmd != "version" {
		fs.StringVar(&c.configPath, "config", config.DefaultPath, "config file")
	}
	if cmd == "status" || cmd == "services" || cmd == "pods" || cmd == "sockets" || cmd == "trace" || cmd == "version" {
		fs.BoolVar(&c.json, "json", false, "print JSON")
	}
	if cmd == "sockets" {
		fs.StringVar(&c.sockets.Pod, "pod", "", "only this pod's netns (NAMESPACE/NAME)")
		fs.StringVar(&c.sockets.Backend, "backend", "", "only sockets whose backend or remote is IP:PORT")
		fs.StringVar(&c.sockets.Proto, "proto", "", "tcp or udp")
	}
	if cmd == "trace" {
		fs.StringVar(&c.trace.Pod, "pod", "", "only this pod's decisions (NAMESPACE/NAME)")
		fs.StringVar(&c.trace.Service, "service", "", "only this service's decisions (its name)")
	}
	if err := fs.Parse(rest); err != nil {
		fmt.Fprintf(stderr, "podsock %s: %v (try `podsock help`)\n", cmd, err)
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "podsock %s: unexpected argument %q (try `podsock help`)\n", cmd, fs.Arg(0))
		return exitUsage
	}
	if err := run(c); err != nil {
		var u unhealthy
		if !errors.As(err, &u) {
			fmt.Fprintf(stderr, "podsock %s: %s\n", cmd, config.OneLine(err.Error()))
		}
		var bad badArgument
		if errors.As(err, &bad) {
			return exitUsage
		}
		return exitFail
	}
	return exitOK
}

type command struct {
	name           string
	agent          Agent
	flags          *flag.FlagSet
	configPath     string
	json           bool
	sockets        api.SocketQuery
	trace          api.TraceQuery
	stdout, stderr io.Writer
}

// badArgument is a flag value the command cannot use.
type badArgument struct{ error }

// unhealthy is a failure already reported on stdout (status of a broken datapath).
type unhealthy struct{}

func (unhealthy) Error() string { return "unhealthy" }

func (c *command) config() (*config.Config, error) {
	return config.Load(c.configPath)
}

// settings returns the [agent] section. A config that is broken elsewhere still names the
// agent's state dir and pins, so read-only commands and cleanup keep working; the problem
// is shown as a warning.
func (c *command) settings() (config.Agent, error) {
	cfg, err := c.config()
	if err == nil {
		return cfg.Agent, nil
	}
	settings, lenientErr := config.AgentSettings(c.configPath)
	if lenientErr != nil {
		return config.Agent{}, err
	}
	fmt.Fprintf(c.stderr, "podsock %s: warning: %s\n", c.name, config.OneLine(err.Error()))
	return settings, nil
}

func (c *command) client() (*api.Client, error) {
	settings, err := c.settings()
	if err != nil {
		return nil, err
	}
	return api.NewClient(settings.StateDir), nil
}

func (c *command) printJSON(v any) error {
	enc := json.NewEncoder(c.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func runAgent(c *command) error {
	if c.agent.Run == nil {
		return errors.New("this binary cannot run the agent")
	}
	return c.agent.Run(context.Background(), c.configPath, agentLogger(c.stderr))
}

func agentLogger(w io.Writer) *logrus.Logger {
	log := logrus.New()
	log.SetOutput(w)
	log.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	return log
}

// runPreRegistered is `podsock run` for a binary the runtime launched as an NRI plugin.
func runPreRegistered(ag Agent, stderr io.Writer) int {
	if ag.RunPreRegistered == nil {
		fmt.Fprintln(stderr, "podsock: this binary cannot run the agent")
		return exitFail
	}
	if err := ag.RunPreRegistered(context.Background(), agentLogger(stderr)); err != nil {
		fmt.Fprintf(stderr, "podsock: %s\n", config.OneLine(err.Error()))
		return exitFail
	}
	return exitOK
}

func status(c *command) error {
	cl, err := c.client()
	if err != nil {
		return err
	}
	st, err := cl.Status()
	if err != nil {
		return err
	}
	if c.json {
		if err := c.printJSON(st); err != nil {
			return err
		}
	} else {
		w := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintf(w, "agent\tpid %d, config %s (generation %d)\n", st.PID, st.ConfigPath, st.ConfigGeneration)
		if st.LastReloadError != "" {
			fmt.Fprintf(w, "last reload\trejected: %s\n", st.LastReloadError)
		}
		fmt.Fprintf(w, "datapath\t%s, pinned in %s, cgroup root %s\n", attachedWord(st.Datapath.Attached), st.Datapath.PinDir, st.Datapath.CgroupRoot)
		fmt.Fprintf(w, "nri\t%s\n", nriWord(st.NRI))
		fmt.Fprintf(w, "services\t%d (%d backends)\n", st.Services, st.Backends)
		for _, src := range st.Sources {
			fmt.Fprintf(w, "source %s\t%s\n", src.Name, sourceLine(src))
		}
		if n := len(st.Conflicts); n > 0 {
			fmt.Fprintf(w, "left out\t%d services (first: %s %s, %s)\n", n, st.Conflicts[0].Dropped.Source, st.Conflicts[0].Dropped.Name, st.Conflicts[0].Reason)
		}
		fmt.Fprintf(w, "pods\t%d (%d netns held)\n", st.Pods, st.Netns)
		k := st.Datapath.Counters
		fmt.Fprintf(w, "counters\t%d connects, %d sendmsgs, %d reversed, %d refused (no backend), %d without socket storage\n",
			k.Connects, k.Sendmsgs, k.Reversed, k.NoBackend, k.NoStorage)
		fmt.Fprintf(w, "policy\t%d denied (allow-lists), %d left alone (skip-LB, hostns_only)\n", k.Denied, k.Skipped)
		fmt.Fprintf(w, "termination\t%s\n", terminationLine(st.Termination))
		fmt.Fprintf(w, "kernel memory\t%.1f MiB in %d maps\n", float64(st.Datapath.MemoryBytes)/(1<<20), len(st.Datapath.Maps))
		for _, m := range st.Datapath.Maps {
			if m.Limit != "" && m.Entries*10 >= m.Capacity*9 {
				fmt.Fprintf(w, "map nearly full\t%s: %d of %d entries (raise %s)\n", m.Name, m.Entries, m.Capacity, m.Limit)
			}
		}
		for _, f := range st.Datapath.Features {
			if !f.Present {
				fmt.Fprintf(w, "refused by kernel\t%s: %s\n", f.Name, f.Detail)
			}
		}
		if l, ok := st.NRI.HandlerLatency["all_pod_events"]; ok {
			fmt.Fprintf(w, "nri handlers\t%d events, p50 %s, p99 %s, max %s\n", l.Count, l.P50, l.P99, l.Max)
		}
		if err := w.Flush(); err != nil {
			return err
		}
	}
	if !st.Datapath.Attached {
		return unhealthy{}
	}
	return nil
}

// sourceLine says how far a source got: a watching source's state and last sync.
func sourceLine(s api.SourceStatus) string {
	state := s.State
	if state == "" {
		state = map[bool]string{true: "synced", false: "not synced"}[s.Synced]
	}
	line := fmt.Sprintf("%s, %d services", state, s.Services)
	if s.LastSync != nil {
		line += fmt.Sprintf(", %d syncs, last %s ago (%.1f ms)", s.Syncs, time.Since(*s.LastSync).Round(time.Second), s.LastSyncSeconds*1000)
	}
	if s.SkippedServicePorts > 0 {
		line += fmt.Sprintf(", %d service ports skipped", s.SkippedServicePorts)
	}
	if s.Warning != "" {
		line += "; " + s.Warning
	}
	return line
}

func terminationLine(t api.TerminationStatus) string {
	if !t.Available {
		return "unavailable: " + t.Error
	}
	protos := strings.Join(t.Protocols, ",")
	if protos == "" {
		protos = "off"
	}
	line := fmt.Sprintf("%s; %d sockets destroyed (%d refused) for %d removed backends, %d netns entered over %d passes",
		protos, t.Destroyed, t.Failed, t.Backends, t.NetnsEntered, t.Passes)
	if t.Passes > 0 {
		line += fmt.Sprintf(", last %.1f ms", t.LastPassMillis)
	}
	if t.LastError != "" {
		line += "; last error: " + t.LastError
	}
	return line
}

func attachedWord(b bool) string {
	if b {
		return "attached"
	}
	return "NOT attached"
}

func nriWord(n api.NRIStatus) string {
	switch {
	case !n.Enabled:
		return "disabled (standalone)"
	case n.Connected:
		return "connected"
	}
	return "enabled, not connected"
}

func services(c *command) error {
	cl, err := c.client()
	if err != nil {
		return err
	}
	svcs, err := cl.Services()
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(svcs)
	}
	w := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tVIP\tPROTO\tSOURCE\tBACKENDS")
	for _, s := range svcs {
		var bs []string
		for i, b := range s.Backends {
			if s.Weights[i] != 1 {
				b = fmt.Sprintf("%s (weight %d)", b, s.Weights[i])
			}
			bs = append(bs, b)
		}
		backends := strings.Join(bs, ", ")
		if backends == "" {
			backends = "(none: connects are refused)"
		}
		if kept := keptEndpoints(s.Endpoints); kept != "" {
			backends += "; keeping sockets of " + kept
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", s.Name, joinHostPort(s.VIP, s.Port), s.Protocol, s.Source, backends)
	}
	return w.Flush()
}

// keptEndpoints names the endpoints that are no backend (terminating, not ready), whose
// sockets stay.
func keptEndpoints(eps []api.EndpointView) string {
	var out []string
	for _, e := range eps {
		if e.InUse {
			continue
		}
		state := "not ready"
		if e.Terminating {
			state = "terminating"
		}
		out = append(out, e.Addr+" ("+state+")")
	}
	return strings.Join(out, ", ")
}

func pods(c *command) error {
	cl, err := c.client()
	if err != nil {
		return err
	}
	ps, err := cl.Pods()
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(ps)
	}
	w := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "POD\tIPS\tCGROUP (ID)\tNETNS COOKIE\tCONTAINERS\tPOLICY")
	for _, p := range ps {
		ips := strings.Join(p.IPs, ",")
		if p.HostNetwork {
			ips = "host network"
		}
		var policy []string
		if p.SkipLB {
			policy = append(policy, "skip-lb")
		}
		if len(p.AllowedServices) > 0 {
			policy = append(policy, "allowed: "+strings.Join(p.AllowedServices, ","))
		}
		if len(policy) == 0 {
			policy = []string{"-"}
		}
		fmt.Fprintf(w, "%s/%s\t%s\t%s (%d)\t%d\t%d\t%s\n", p.Namespace, p.Name, ips, p.CgroupPath, p.CgroupID,
			p.NetnsCookie, len(p.Containers), strings.Join(policy, "; "))
	}
	return w.Flush()
}

func sockets(c *command) error {
	q := c.sockets
	// Bad arguments are caught here, before the agent is asked anything.
	if _, err := q.Parse(); err != nil {
		return badArgument{err}
	}
	cl, err := c.client()
	if err != nil {
		return err
	}
	if c.json {
		// Streamed through, so a node with many sockets never sits in memory here either.
		sep := "["
		err := cl.Sockets(q, func(s api.SocketView) error {
			b, err := json.Marshal(s)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(c.stdout, "%s\n%s", sep, b)
			sep = ","
			return err
		})
		if err != nil {
			return err
		}
		if sep == "[" {
			_, err = fmt.Fprintln(c.stdout, "[]")
		} else {
			_, err = fmt.Fprintln(c.stdout, "\n]")
		}
		return err
	}
	w := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "PROTO\tSTATE\tLOCAL\tREMOTE\tPOD\tSERVICE\tBACKEND\tNETNS\tCOOKIE")
	err = cl.Sockets(q, func(s api.SocketView) error {
		_, err := fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\n", s.Proto, s.State, s.Local, dash(s.Remote),
			dash(s.Pod), dash(s.Service), dash(s.Backend), s.NetnsCookie, s.SocketCookie)
		return err
	})
	if err != nil {
		return err
	}
	return w.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func joinHostPort(ip string, port uint16) string {
	if strings.Contains(ip, ":") {
		return fmt.Sprintf("[%s]:%d", ip, port)
	}
	return fmt.Sprintf("%s:%d", ip, port)
}

// check validates a config the way the agent's reload does (the file, then its
// services_file), and talks to no agent and touches no datapath: an operator or a config
// pipeline runs it before SIGHUP. Its only failure line is the config's own
// `FILE:LINE: what is wrong`, which is what a script greps for.
func check(c *command) error {
	cfg, err := config.Load(c.configPath)
	if err == nil {
		err = cfg.LoadServicesFile()
	}
	if err != nil {
		fmt.Fprintln(c.stderr, config.OneLine(err.Error()))
		return unhealthy{}
	}
	fmt.Fprintf(c.stdout, "%s: ok, %d services\n", c.configPath, len(cfg.Services))
	return nil
}

// mountBPFFS is a DaemonSet's privileged init container: the agent's container cannot
// propagate a mount to the host, and a bpffs mounted only in the pod would take the pins
// with it when the pod goes.
func mountBPFFS(args []string, stderr io.Writer) int {
	if len(args) != 1 || !filepath.IsAbs(args[0]) {
		fmt.Fprintln(stderr, "podsock mount-bpffs: want one absolute directory (try `podsock help`)")
		return exitUsage
	}
	if err := preflight.EnsureBPFFS(args[0]); err != nil {
		fmt.Fprintf(stderr, "podsock mount-bpffs: %s\n", config.OneLine(err.Error()))
		return exitFail
	}
	return exitOK
}

func cleanup(c *command) error {
	settings, err := c.settings()
	if err != nil {
		return err
	}
	cl := api.NewClient(settings.StateDir)
	if st, err := cl.Status(); err == nil {
		return fmt.Errorf("the agent (pid %d) is running; stop it first, then run cleanup", st.PID)
	}
	// An agent that is starting, or whose socket is gone, still holds its lock.
	if _, err := os.Stat(settings.StateDir); err == nil {
		lock, err := statedir.Lock(settings.StateDir)
		if err != nil {
			return fmt.Errorf("%w; stop it first, then run cleanup", err)
		}
		defer lock.Close()
	}
	if err := datapath.Cleanup(settings.BPFFS); err != nil {
		return err
	}
	for _, name := range []string{api.SocketName, statedir.LockName, statedir.SourcesName} {
		p := filepath.Join(settings.StateDir, name)
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove %s: %w", p, err)
		}
	}
	// The state dir goes too when nothing but podsock's own files were in it.
	if err := os.Remove(settings.StateDir); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOTEMPTY) {
		return fmt.Errorf("remove %s: %w", settings.StateDir, err)
	}
	fmt.Fprintf(c.stdout, "removed podsock's links and pins under %s and its state in %s\n",
		filepath.Join(settings.BPFFS, datapath.PinDirName), settings.StateDir)
	return nil
}

type versionInfo struct {
	Version  string             `json:"version"`
	Kernel   string             `json:"kernel"`
	Features []datapath.Feature `json:"features"`
}

func version(c *command) error {
	v := versionInfo{Version: buildVersion(), Kernel: kernelRelease(), Features: append(append(datapath.ProbeFeatures(), datapath.ProbeIterators()...), datapath.ProbeTrace(), datapath.ProbeMapCounts())}
	if c.json {
		return c.printJSON(v)
	}
	fmt.Fprintf(c.stdout, "podsock %s\nkernel %s\n", v.Version, v.Kernel)
	for _, f := range v.Features {
		state := "yes"
		if !f.Present {
			state = "NO"
			if f.Required {
				state = "NO (required)"
			}
		}
		if !f.Present && f.Detail != "" {
			state += ": " + f.Detail
		}
		fmt.Fprintf(c.stdout, "  %-20s %s\n", f.Name, state)
	}
	return nil
}

// BuildVersion is the version `podsock version` prints: the agent reports the same in its
// metrics and status.
func BuildVersion() string { return buildVersion() }

func buildVersion() string {
	if Version != "" {
		return Version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				return "dev-" + s.Value[:12]
			}
		}
		if bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			return bi.Main.Version
		}
	}
	return "dev"
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

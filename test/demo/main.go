// Command demo shows podsock's main job end to end on this machine, standalone (no
// container runtime): two HTTP backends and a client in a network namespace and a cgroup
// the demo creates, the real `podsock run` balancing a service VIP between them, a reload
// that removes a backend, and a cleanup that leaves nothing behind. Run it as root:
// `make demo`.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/podsock/podsock/test/testenv"
)

var podsockBin = flag.String("podsock", "bin/podsock", "podsock binary")

const (
	vipRange = "10.96.0.0/12"
	vip      = "10.96.0.20"
)

type demo struct {
	testenv.Standalone
	ns      *testenv.Netns
	cfgPath string
	cfg     string
}

func main() {
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "demo: must run as root")
		os.Exit(1)
	}
	d := &demo{}
	d.Main("demo", d.run)
	fmt.Println("\n==> demo done: netns, cgroup, pins and processes removed")
}

func step(format string, a ...any) { fmt.Printf("\n==> "+format+"\n", a...) }

func (d *demo) run() {
	step("network namespace with two backends; VIP range %s blackholed so nothing can leave", vipRange)
	d.ns = testenv.NewNetns(d, []string{vipRange}, "10.88.0.5/32", "10.88.0.6/32")
	d.startBackend("backend-a", "10.88.0.5:8080")
	d.startBackend("backend-b", "10.88.0.6:8080")
	out, _ := exec.Command("ip", "-n", d.ns.Name, "route", "show", "type", "blackhole").CombinedOutput()
	fmt.Printf("    netns %s, blackhole routes: %s", d.ns.Name, out)

	cg := testenv.NewCgroup(d)
	bpffs := testenv.BPFFS(d)
	dir, err := os.MkdirTemp("", "podsock-demo-")
	if err != nil {
		d.Fatal(err)
	}
	d.Cleanup(func() { os.RemoveAll(dir) })
	cg.EnterSelf(d)
	fmt.Printf("    this demo's client runs in cgroup %s\n", cg.Path)

	step("without podsock, http://%s/ does not answer", vip)
	d.get(1)

	d.cfgPath = filepath.Join(dir, "podsock.toml")
	d.cfg = fmt.Sprintf(`[agent]
cgroup_root = %q   # the demo's cgroup, not the machine's root
bpffs = %q
state_dir = %q

[nri]
enabled = false     # standalone: balance every process under cgroup_root

[[service]]
name = "default/web"
vip = "%s"
port = 80
protocol = "tcp"
backends = ["10.88.0.5:8080", "10.88.0.6:8080"]
`, cg.Path, bpffs, filepath.Join(dir, "state"), vip)
	d.writeConfig()
	step("podsock run --config %s", d.cfgPath)
	fmt.Print(indent(d.cfg))
	agent := d.startAgent()

	step("six requests to http://%s/", vip)
	d.get(6)
	step("podsock status")
	d.podsock("status")
	step("podsock services")
	d.podsock("services")

	step("remove backend-b from the config and send SIGHUP")
	d.cfg = strings.Replace(d.cfg, `, "10.88.0.6:8080"`, "", 1)
	d.writeConfig()
	agent.Process.Signal(syscall.SIGHUP)
	time.Sleep(300 * time.Millisecond)
	d.podsock("services")
	d.get(4)

	step("stop the agent (SIGTERM): the pinned datapath keeps serving")
	agent.Process.Signal(syscall.SIGTERM)
	agent.Wait()
	d.get(2)

	step("podsock cleanup: nothing attached or pinned is left")
	d.podsock("cleanup")
	d.get(1)
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ") + "\n"
}

func (d *demo) writeConfig() {
	if err := os.WriteFile(d.cfgPath, []byte(d.cfg), 0o644); err != nil {
		d.Fatal(err)
	}
}

func (d *demo) startBackend(name, addr string) {
	var ln net.Listener
	if err := d.ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		d.Fatal(err)
	}
	srv := &http.Server{ReadHeaderTimeout: time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s (%s), you are %s\n", name, addr, r.RemoteAddr)
	})}
	go srv.Serve(ln)
	d.Cleanup(func() { srv.Close() })
}

func (d *demo) startAgent() *exec.Cmd {
	log, err := os.Create(filepath.Join(filepath.Dir(d.cfgPath), "agent.log"))
	if err != nil {
		d.Fatal(err)
	}
	cmd := exec.Command(*podsockBin, "run", "--config", d.cfgPath)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		d.Fatal(err)
	}
	d.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
		}
		exec.Command(*podsockBin, "cleanup", "--config", d.cfgPath).Run()
		log.Close()
	})
	if !testenv.WaitFor(10*time.Second, func() bool {
		return exec.Command(*podsockBin, "status", "--config", d.cfgPath).Run() == nil
	}) {
		b, _ := os.ReadFile(log.Name())
		d.Fatalf("agent did not start:\n%s", b)
	}
	return cmd
}

func (d *demo) podsock(args ...string) {
	out, err := exec.Command(*podsockBin, append(args, "--config", d.cfgPath)...).CombinedOutput()
	fmt.Print(indent(string(out)))
	if err != nil {
		d.Fatalf("podsock %s: %v", args[0], err)
	}
}

// get sends n HTTP requests to the VIP from a socket created in the demo netns.
func (d *demo) get(n int) {
	client := &http.Client{
		Timeout: 2 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				var c net.Conn
				err := d.ns.Do(func() (err error) {
					c, err = (&net.Dialer{Timeout: time.Second}).DialContext(ctx, network, addr)
					return err
				})
				return c, err
			},
		},
	}
	for range n {
		resp, err := client.Get("http://" + netip.AddrPortFrom(netip.MustParseAddr(vip), 80).String() + "/")
		if err != nil {
			fmt.Printf("    GET http://%s/ -> %v\n", vip, err)
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		fmt.Printf("    GET http://%s/ -> %s", vip, body)
	}
}

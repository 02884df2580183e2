package cri

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// containerd is the containerd v2 engine: NRI built in, the runc v2 shim, images imported
// with ctr once it runs.
type containerd struct{}

func (containerd) tools() []string {
	return []string{"containerd", "containerd-shim-runc-v2", "ctr", "crictl"}
}

func (containerd) socket(r *Runtime) string { return r.path("containerd.sock") }

func (containerd) writeConfig(r *Runtime) error {
	q := strconv.Quote
	// Version 4 is what containerd 2.4 writes; an older version works but is migrated
	// with a warning at every start. Only the files in imports are loaded (the default
	// /etc/containerd/conf.d shows in "config dump" but is not read when imports is set).
	config := fmt.Sprintf(`version = 4
root = %s
state = %s
temp = %s
imports = []
# Plugins that would otherwise touch host-global paths or devices.
disabled_plugins = [
  'io.containerd.snapshotter.v1.btrfs', 'io.containerd.snapshotter.v1.zfs',
  'io.containerd.snapshotter.v1.devmapper', 'io.containerd.snapshotter.v1.blockfile',
  'io.containerd.snapshotter.v1.erofs', 'io.containerd.differ.v1.erofs',
  'io.containerd.image-verifier.v1.bindir', 'io.containerd.tracing.processor.v1.otlp',
  'io.containerd.internal.v1.tracing',
]

[plugins.'io.containerd.server.v1.grpc']
  address = %s
[plugins.'io.containerd.server.v1.ttrpc']
  address = %s

[plugins.'io.containerd.internal.v1.opt']
  path = %s
[plugins.'io.containerd.shim.v1.manager']
  socket_dir = %s

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = %s

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  cdi_spec_dirs = []
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = %s
        # runc's own state, by default in /run/containerd/runc.
        Root = %s
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = [%s]
    conf_dir = %s
    max_conf_num = 1

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'

[plugins.'io.containerd.nri.v1.nri']
  disable = false
  socket_path = %s
  plugin_path = %s
  plugin_config_path = %s
  plugin_request_timeout = %s
`,
		q(r.path("root")), q(r.path("state")), q(r.path("tmp")),
		q(r.path("containerd.sock")), q(r.path("containerd.sock.ttrpc")),
		q(r.path("opt")), q(r.path("s")),
		q(ImageName),
		q(r.runc), q(r.path("runc")),
		q(cniBinDir), q(r.path("net.d")),
		q(r.opts.NRISocket), q(r.opts.NRIPluginDir), q(r.opts.NRIPluginConfDir),
		q(r.opts.NRITimeout.String()),
	)
	if err := os.WriteFile(r.path("containerd.toml"), []byte(config), 0o600); err != nil {
		return fmt.Errorf("write containerd.toml: %w", err)
	}
	return nil
}

func (containerd) command(r *Runtime) *exec.Cmd {
	cmd := exec.Command(filepath.Join(r.bin, "containerd"), "--config", r.path("containerd.toml"))
	// The shim is found through PATH; runc and the CNI plugins are configured by path.
	cmd.Env = append(os.Environ(), "PATH="+r.bin+":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	return cmd
}

// loadImage imports the archive through the running containerd; its CRI plugin learns of
// imported images from events, which Start waits for.
func (containerd) loadImage(r *Runtime, archive string, running bool) error {
	if !running {
		return nil
	}
	ctr := exec.Command(filepath.Join(r.bin, "ctr"), "-n", "k8s.io", "--address", r.path("containerd.sock"), "images", "import", archive)
	if out, err := ctr.CombinedOutput(); err != nil {
		return fmt.Errorf("import workload image: %w\n%s", err, out)
	}
	return nil
}

// Pods share one PID namespace with their pause container, containerd's default.
func (containerd) podLinux(map[string]any)       {}
func (containerd) containerLinux(map[string]any) {}

// helpers lists this runtime's shims: each writes shim.pid in its task's state dir.
func (containerd) helpers(r *Runtime) []int {
	var pids []int
	filepath.WalkDir(r.path("state"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.Name() != "shim.pid" {
			return nil //nolint:nilerr // nothing there, nothing to kill
		}
		b, _ := os.ReadFile(p)
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			return nil //nolint:nilerr // not a pid file we understand
		}
		// PIDs are reused: only a shim whose command line names this runtime's socket.
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if bytes.Contains(cmdline, []byte(r.dir+"/")) {
			pids = append(pids, pid)
		}
		return nil
	})
	return pids
}

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

// conmonPath is Debian's conmon (scripts/install-deps.sh pins it).
const conmonPath = "/usr/bin/conmon"

// crio is the CRI-O engine: CRI-O v1.34 with NRI on, runc under conmon, cgroupfs, and an
// image loaded into its storage by copyimg before it starts.
//
// Everything it reads or writes is under the state dir, but for libcni's result cache in
// /var/lib/cni (no option moves it; Start removes what it wrote): CRI-O is given its
// config with --config and an empty --config-dir, its registries with the (hidden)
// --registries-conf and an empty --registries-conf-dir, a private, empty
// default_mounts_file, and the containers libraries (storage, registries, containers.conf,
// signature policy) their files through the environment, so nothing in /etc/crio or
// /etc/containers is read. Hostport mapping is off, so CRI-O creates no iptables or
// nftables chains on the host.
//
// Pods run without an infra container: this machine's runc cannot set the pause
// container's oom_score_adj of -998 (no CAP_SYS_RESOURCE in the VM), so pods and
// containers ask for per-container PID namespaces, as a kubelet does by default, and CRI-O
// then runs none (drop_infra_ctr) and pins the pod's netns with pinns. What follows for
// NRI: Pod.Pid is 0, and the container cgroups are the pod's only processes.
type crio struct{}

func (crio) tools() []string { return []string{"crio", "copyimg", "pinns", "crictl"} }

func (crio) socket(r *Runtime) string { return r.path("crio.sock") }

// storageEnv points the containers libraries at the private configuration; copyimg and
// CRI-O must agree on the storage.
func (crio) storageEnv(r *Runtime) []string {
	return []string{
		"CONTAINERS_STORAGE_CONF=" + r.path("crio", "storage.conf"),
		"CONTAINERS_REGISTRIES_CONF=" + r.path("crio", "registries.conf"),
		"CONTAINERS_CONF=" + r.path("crio", "containers.conf"),
		"TMPDIR=" + r.path("tmp"),
	}
}

func (e crio) writeConfig(r *Runtime) error {
	q := strconv.Quote
	for _, d := range []string{"crio", "crio/conf.d", "crio/registries.conf.d", "crio/lib", "crio/run", "crio/keys", "crio/policies", "tmp"} {
		if err := os.MkdirAll(r.path(d), 0o700); err != nil {
			return err
		}
	}
	config := fmt.Sprintf(`[crio]
root = %s
runroot = %s
storage_driver = "overlay"
log_dir = %s
version_file = %s
version_file_persist = %s
clean_shutdown_file = %s
internal_repair = false

[crio.api]
listen = %s
stream_address = "127.0.0.1"
stream_port = "0"

[crio.runtime]
default_runtime = "runc"
cgroup_manager = "cgroupfs"
selinux = false
drop_infra_ctr = true
disable_hostport_mapping = true
log_to_journald = false
hooks_dir = []
default_mounts_file = %s
cdi_spec_dirs = []
decryption_keys_path = %s
container_exits_dir = %s
container_attach_socket_dir = %s
namespaces_dir = %s
pinns_path = %s
irqbalance_config_file = %s
irqbalance_config_restore_file = ""
conmon_env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]

[crio.runtime.runtimes.runc]
runtime_path = %s
runtime_type = "oci"
runtime_root = %s
monitor_path = %s
monitor_cgroup = "pod"

[crio.image]
pause_image = %s
pause_command = "/workload"
pinned_images = [%s]
signature_policy = %s
signature_policy_dir = %s
big_files_temporary_dir = %s

[crio.network]
network_dir = %s
plugin_dirs = [%s]

[crio.metrics]
enable_metrics = false

[crio.tracing]
enable_tracing = false

[crio.nri]
enable_nri = true
nri_listen = %s
nri_plugin_dir = %s
nri_plugin_config_dir = %s
nri_plugin_request_timeout = %s
`,
		q(r.path("crio", "storage")), q(r.path("crio", "storage-run")),
		q(r.path("logs")),
		q(r.path("crio", "run", "version")), q(r.path("crio", "lib", "version")),
		q(r.path("crio", "lib", "clean.shutdown")),
		q(e.socket(r)),
		q(r.path("crio", "mounts.conf")),
		q(r.path("crio", "keys")),
		q(r.path("crio", "run", "exits")), q(r.path("crio", "run")),
		q(r.path("ns")), q(filepath.Join(r.bin, "pinns")),
		q(r.path("crio", "irqbalance")),
		q(r.runc), q(r.path("runc")), q(conmonPath),
		q(ImageName), q(ImageName),
		q(r.path("crio", "policy.json")), q(r.path("crio", "policies")), q(r.path("tmp")),
		q(r.path("net.d")), q(cniBinDir),
		q(r.opts.NRISocket), q(r.opts.NRIPluginDir), q(r.opts.NRIPluginConfDir),
		q(r.opts.NRITimeout.String()),
	)
	storage := fmt.Sprintf("[storage]\ndriver = \"overlay\"\ngraphroot = %s\nrunroot = %s\n",
		q(r.path("crio", "storage")), q(r.path("crio", "storage-run")))
	for name, data := range map[string]string{
		"crio/crio.conf":       config,
		"crio/storage.conf":    storage,
		"crio/registries.conf": "unqualified-search-registries = []\n",
		"crio/containers.conf": "",
		"crio/mounts.conf":     "",
		// Only a local image is ever used; nothing is pulled.
		"crio/policy.json": `{"default": [{"type": "insecureAcceptAnything"}]}` + "\n",
	} {
		if err := os.WriteFile(r.path(name), []byte(data), 0o600); err != nil {
			return fmt.Errorf("write %s: %w", name, err)
		}
	}
	return nil
}

func (e crio) command(r *Runtime) *exec.Cmd {
	cmd := exec.Command(filepath.Join(r.bin, "crio"),
		"--config", r.path("crio", "crio.conf"), "--config-dir", r.path("crio", "conf.d"),
		"--registries-conf", r.path("crio", "registries.conf"), "--registries-conf-dir", r.path("crio", "registries.conf.d"),
		"--log-level", "info")
	cmd.Env = append(os.Environ(), e.storageEnv(r)...)
	cmd.Env = append(cmd.Env, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	return cmd
}

// loadImage copies the OCI archive into CRI-O's storage before CRI-O starts, with the
// same storage configuration.
//
// The image library writes its blob-info cache to /var/lib/containers/cache whatever the
// storage root (copyimg gives no option for it), so copyimg runs in a mount namespace of
// its own where a private directory is mounted over /var/lib.
func (e crio) loadImage(r *Runtime, archive string, running bool) error {
	if running {
		return nil
	}
	varLib := r.path("crio", "var-lib")
	if err := os.MkdirAll(varLib, 0o700); err != nil {
		return err
	}
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "--",
		"sh", "-ec", `mount --bind "$0" /var/lib; exec "$@"`, varLib,
		filepath.Join(r.bin, "copyimg"),
		"--root", r.path("crio", "storage"), "--runroot", r.path("crio", "storage-run"),
		"--storage-driver", "overlay", "--signature-policy", r.path("crio", "policy.json"),
		"--image-name", ImageName, "--import-from", "oci-archive:"+archive)
	cmd.Env = append(os.Environ(), e.storageEnv(r)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("copyimg workload image: %w\n%s", err, out)
	}
	return nil
}

// namespaceOptions asks for a PID namespace per container (CONTAINER = 1 in CRI), which
// is what lets CRI-O run the pod without an infra container.
func namespaceOptions(linux map[string]any) {
	linux["security_context"] = map[string]any{"namespace_options": map[string]any{"pid": 1}}
}

func (crio) podLinux(linux map[string]any)       { namespaceOptions(linux) }
func (crio) containerLinux(linux map[string]any) { namespaceOptions(linux) }

// helpers lists the conmons of this runtime still alive: conmon daemonizes, so it is found
// by name, and only one whose command line names this runtime's state dir counts.
func (crio) helpers(r *Runtime) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil || strings.TrimSpace(string(comm)) != "conmon" {
			continue
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if bytes.Contains(cmdline, []byte(r.dir+"/")) {
			pids = append(pids, pid)
		}
	}
	return pids
}

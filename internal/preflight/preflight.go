// Package preflight is what the agent checks before it touches the kernel, each failure one
// clear line: the privileges to load and attach BPF, kernel BTF, the cgroup v2 root to
// attach at, and a bpffs to pin in.
package preflight

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/internal/cgroupfs"
)

// CheckPrivileges fails unless the process may load BPF programs and attach them to
// cgroups: root, or CAP_BPF + CAP_NET_ADMIN (+ CAP_SYS_ADMIN for setns and mounts).
func CheckPrivileges() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("read capabilities: %w", err)
	}
	has := func(c uint) bool { return data[c/32].Effective&(1<<(c%32)) != 0 }
	var missing []string
	for _, c := range []struct {
		n    uint
		name string
	}{{unix.CAP_BPF, "CAP_BPF"}, {unix.CAP_NET_ADMIN, "CAP_NET_ADMIN"}, {unix.CAP_SYS_ADMIN, "CAP_SYS_ADMIN"}} {
		if !has(c.n) {
			missing = append(missing, c.name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("must run as root (missing %s)", strings.Join(missing, ", "))
	}
	return nil
}

// CheckBTF fails unless the kernel exposes its BTF, which CO-RE relocations need.
func CheckBTF() error {
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err != nil {
		return errors.New("kernel has no BTF (/sys/kernel/btf/vmlinux missing); podsock needs CONFIG_DEBUG_INFO_BTF=y")
	}
	return nil
}

// ResolveCgroupRoot picks the cgroup the LB programs attach to: the configured one, or
// the root of the cgroup v2 mount.
func ResolveCgroupRoot(configured string) (string, error) {
	mnt, err := cgroupfs.Mount()
	if err != nil {
		return "", err
	}
	if configured == "" {
		return mnt, nil
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(configured, &fs); err != nil {
		return "", fmt.Errorf("agent.cgroup_root %s: %w", configured, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return "", fmt.Errorf("agent.cgroup_root %s is not a cgroup v2 directory (cgroup2 is mounted at %s)", configured, mnt)
	}
	return configured, nil
}

// EnsureBPFFS mounts bpffs at dir unless one is already there.
func EnsureBPFFS(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return fmt.Errorf("statfs %s: %w", dir, err)
	}
	if fs.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", dir, err)
	}
	return nil
}

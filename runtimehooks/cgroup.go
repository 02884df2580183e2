// Package runtimehooks turns container-runtime events (as NRI reports them under containerd
// or CRI-O) into runtime-neutral pod facts: canonical cgroup v2 paths and IDs, held network
// namespaces and their cookies. It does not import NRI: the adapter converts NRI types into
// Sandbox and ContainerInfo.
package runtimehooks

import (
	"errors"
	"fmt"
	"io/fs"
	"path"
	"strings"

	"github.com/podsock/podsock/internal/cgroupfs"
)

const (
	sliceSuffix = ".slice"
	// runc's systemd driver puts a container whose cgroupsPath names no slice here (rootful).
	defaultSlice = "system.slice"
)

// CanonicalCgroupPath turns a cgroup path as a runtime reports it into the path the kernel
// shows in the "0::" line of /proc/PID/cgroup: absolute within the cgroup2 mount, cleaned.
//
// It accepts:
//   - cgroupfs paths ("/kubepods/besteffort/pod<uid>/<id>"); a relative path is taken as
//     relative to the cgroup root, which is where runc's cgroupfs driver puts it;
//   - a systemd slice name ("kubepods-besteffort-pod<uid>.slice"), expanded as systemd
//     nests slices: each "-" opens a level;
//   - runc's systemd form "slice:prefix:name", which names the scope "<prefix>-<name>.scope"
//     (or the nested slice "name" when name ends in ".slice") inside the expanded slice;
//     an empty slice means system.slice, as in runc;
//   - already expanded systemd paths, which are cgroupfs paths and pass through.
func CanonicalCgroupPath(p string) (string, error) {
	switch {
	case p == "":
		return "", errors.New("empty cgroup path")
	case !strings.HasPrefix(p, "/") && strings.Contains(p, ":"):
		return systemdUnitPath(p)
	case !strings.Contains(p, "/") && strings.HasSuffix(p, sliceSuffix):
		return expandSlice(p)
	default:
		// Clean on a rooted path also drops ".." that would climb above the root, as runc's
		// securejoin does when it creates the directory.
		return path.Clean("/" + p), nil
	}
}

// systemdUnitPath resolves runc's "slice:prefix:name" cgroupsPath.
func systemdUnitPath(p string) (string, error) {
	parts := strings.Split(p, ":")
	if len(parts) != 3 {
		return "", fmt.Errorf("cgroup path %q: want systemd \"slice:prefix:name\"", p)
	}
	slice, prefix, name := parts[0], parts[1], parts[2]
	if slice == "" {
		slice = defaultSlice
	}
	if name == "" {
		return "", fmt.Errorf("cgroup path %q: empty unit name", p)
	}
	if strings.Contains(prefix, "/") || strings.Contains(name, "/") {
		return "", fmt.Errorf("cgroup path %q: unit prefix and name must not contain \"/\"", p)
	}
	parent, err := expandSlice(slice)
	if err != nil {
		return "", fmt.Errorf("cgroup path %q: %w", p, err)
	}
	unit := name
	// runc ignores the prefix for a nested slice and uses the name as the unit itself.
	if !strings.HasSuffix(name, sliceSuffix) {
		unit = prefix + "-" + name + ".scope"
	}
	return path.Join(parent, unit), nil
}

// expandSlice follows systemd's slice naming: "a-b-c.slice" lives at
// /a.slice/a-b.slice/a-b-c.slice and "-.slice" is the root.
func expandSlice(slice string) (string, error) {
	base, ok := strings.CutSuffix(slice, sliceSuffix)
	if !ok || strings.Contains(slice, "/") {
		return "", fmt.Errorf("invalid systemd slice name %q", slice)
	}
	if base == "-" {
		return "/", nil
	}
	var b strings.Builder
	prefix := ""
	for comp := range strings.SplitSeq(base, "-") {
		// Covers "", leading, trailing and doubled dashes, all of which systemd rejects.
		if comp == "" {
			return "", fmt.Errorf("invalid systemd slice name %q", slice)
		}
		prefix += comp
		b.WriteString("/" + prefix + sliceSuffix)
		prefix += "-"
	}
	return b.String(), nil
}

// CgroupID is the kernel's ID of a cgroup v2 directory (its inode, the value
// bpf_get_current_cgroup_id returns for tasks in it). path is canonical, as
// CanonicalCgroupPath returns it. An error for a directory that does not exist matches
// fs.ErrNotExist.
func CgroupID(cgroup2Mount, p string) (uint64, error) {
	if !strings.HasPrefix(p, "/") {
		return 0, fmt.Errorf("cgroup path %q is not canonical (absolute within the cgroup2 mount)", p)
	}
	dir := path.Join(cgroup2Mount, p)
	id, err := cgroupfs.ID(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, fmt.Errorf("cgroup %s does not exist: %w", dir, fs.ErrNotExist)
	}
	return id, err
}

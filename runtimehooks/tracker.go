package runtimehooks

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"net/netip"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/internal/netns"
)

// Sandbox is a pod sandbox as the runtime reports it.
type Sandbox struct {
	ID, UID, Namespace, Name string
	Labels, Annotations      map[string]string
	// CgroupParent is the pod cgroup as the runtime reports it: a cgroupfs path
	// ("/kubepods/besteffort/pod<uid>") or a systemd slice ("kubepods-besteffort-pod<uid>.slice").
	CgroupParent string
	// CgroupsPath is the sandbox container's own cgroup; may be "".
	CgroupsPath string
	// NetnsPath is "" for a host-network pod.
	NetnsPath string
	IPs       []string
	Pid       uint32
}

// ContainerInfo is a workload container as the runtime reports it.
type ContainerInfo struct {
	ID, SandboxID, Name string
	// CgroupsPath is a cgroupfs path or systemd "slice:prefix:name".
	CgroupsPath string
	Pid         uint32
}

// Pod is what podsock knows about a pod. Values handed out are copies the caller owns.
type Pod struct {
	SandboxID, UID, Namespace, Name string
	Labels, Annotations             map[string]string
	CgroupPath                      string // canonical cgroup v2 path of the pod cgroup
	CgroupID                        uint64 // 0 while the directory does not exist
	NetnsPath                       string
	NetnsCookie                     uint64 // 0 for host-network pods and an unreadable netns
	HostNetwork                     bool
	IPs                             []netip.Addr
	Containers                      []Container // sorted by ID
	// Pid is the sandbox process as the runtime last reported it; 0 when it reported none
	// (a stopped sandbox, or a runtime without one).
	Pid uint32
}

// Container is a workload container of a pod.
type Container struct {
	ID, Name, CgroupPath string
	CgroupID             uint64
}

var (
	// ErrUnknownSandbox is returned for an event about a sandbox the tracker does not know.
	ErrUnknownSandbox = errors.New("unknown pod sandbox")
	// ErrNoNetns is returned by WithNetns for a host-network pod or one whose netns could
	// not be opened.
	ErrNoNetns = errors.New("pod has no held network namespace")
	errClosed  = errors.New("tracker is closed")
)

// Tracker keeps the pods of one runtime and holds their network namespaces open from
// RunPodSandbox to RemovePodSandbox. All methods are safe for concurrent use.
type Tracker struct {
	mount    string
	cgroupID func(mount, path string) (uint64, error)

	mu     sync.Mutex
	closed bool
	pods   map[string]*podState // by sandbox ID
	owner  map[string]string    // container ID → sandbox ID
}

type podState struct {
	pod   Pod // Containers unused here; built from containers on the way out
	netns *heldNetns
	// pidStart is the sandbox process's start time (/proc/PID/stat), so a reused PID is
	// not taken for the sandbox; 0 when unknown.
	pidStart   uint64
	containers map[string]Container
}

// heldNetns lets WithNetns use the fd without holding the tracker lock: a removal while f
// runs defers the close until the last user is done, and never blocks runtime events.
type heldNetns struct {
	ns      *netns.Handle
	users   int
	retired bool
}

// NewTracker tracks pods whose cgroups live under the given cgroup2 mount point.
func NewTracker(cgroup2Mount string) *Tracker {
	return NewTrackerWith(cgroup2Mount, CgroupID)
}

// NewTrackerWith is NewTracker reading cgroup IDs with cgroupID, which has CgroupID's
// contract: the tests of the tracker's users run it over a plain directory tree, which
// needs no root.
func NewTrackerWith(cgroup2Mount string, cgroupID func(mount, path string) (uint64, error)) *Tracker {
	return &Tracker{
		mount:    cgroup2Mount,
		cgroupID: cgroupID,
		pods:     make(map[string]*podState),
		owner:    make(map[string]string),
	}
}

// RunPodSandbox records a pod, opens and holds its netns and reads its cookie, and reads
// the pod cgroup ID when the cgroup exists already (with CRI-O and no infra container it
// may not; ContainerCreated retries). The pod is recorded even when a fact cannot be read:
// the Pod returned then has what could be read and the error says what is missing.
// A repeated event for a known sandbox updates it and keeps the held netns.
func (t *Tracker) RunPodSandbox(s Sandbox) (Pod, error) {
	if s.ID == "" {
		return Pod{}, errors.New("run pod sandbox: empty sandbox ID")
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return Pod{}, fmt.Errorf("run pod sandbox %s: %w", s.ID, errClosed)
	}
	ps, err := t.upsertPod(s)
	return ps.export(), err
}

// upsertPod records or refreshes a sandbox. Called with t.mu held.
func (t *Tracker) upsertPod(s Sandbox) (*podState, error) {
	ps, known := t.pods[s.ID]
	if !known {
		ps = &podState{containers: make(map[string]Container)}
		t.pods[s.ID] = ps
	}
	var errs []error
	p := &ps.pod
	if s.Pid != p.Pid || ps.pidStart == 0 {
		ps.pidStart = 0
		if s.Pid != 0 {
			ps.pidStart, _ = procStartTime(s.Pid) // unknown (another pid namespace) stays 0
		}
	}
	p.SandboxID, p.UID, p.Namespace, p.Name, p.Pid = s.ID, s.UID, s.Namespace, s.Name, s.Pid
	p.Labels, p.Annotations = maps.Clone(s.Labels), maps.Clone(s.Annotations)

	p.IPs = p.IPs[:0:0]
	for _, ip := range s.IPs {
		a, err := parseIP(ip)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		p.IPs = append(p.IPs, a)
	}

	cgPath, err := podCgroupPath(s)
	if err != nil {
		errs = append(errs, err)
	}
	// Keep a path learnt from a container when a repeated event again reports none.
	if cgPath != "" && (cgPath != p.CgroupPath || p.CgroupID == 0) {
		p.CgroupPath, p.CgroupID = cgPath, 0
		if err := t.readPodCgroupID(p); err != nil {
			errs = append(errs, err)
		}
	}

	p.HostNetwork = s.NetnsPath == ""
	if ps.netns != nil && ps.netns.ns.Path() != s.NetnsPath {
		if err := t.retire(ps); err != nil {
			errs = append(errs, err)
		}
	}
	p.NetnsPath = s.NetnsPath
	if ps.netns == nil && !p.HostNetwork {
		ns, err := netns.Open(s.NetnsPath)
		if err != nil {
			errs = append(errs, err)
		} else {
			ps.netns = &heldNetns{ns: ns}
		}
	}
	p.NetnsCookie = 0
	if ps.netns != nil {
		p.NetnsCookie = ps.netns.ns.Cookie()
	}
	if len(p.IPs) == 0 && ps.netns != nil {
		// CRI-O sometimes hands over a pod that started before the plugin connected
		// without its IPs: the pod's own netns says which they are.
		ips, err := netnsAddrs(ps.netns.ns)
		if err != nil {
			errs = append(errs, err)
		}
		p.IPs = ips
	}

	if err := errors.Join(errs...); err != nil {
		return ps, fmt.Errorf("pod %s/%s (sandbox %s): %w", s.Namespace, s.Name, s.ID, err)
	}
	return ps, nil
}

// netnsAddrs are the global addresses of the interfaces in a netns, IPv4 first, as a
// runtime reports a pod's IPs.
func netnsAddrs(h *netns.Handle) ([]netip.Addr, error) {
	var v4, v6 []netip.Addr
	err := netns.Do(h.Fd(), func() error {
		ifs, err := net.Interfaces()
		if err != nil {
			return err
		}
		for _, ifc := range ifs {
			if ifc.Flags&net.FlagLoopback != 0 {
				continue
			}
			addrs, err := ifc.Addrs()
			if err != nil {
				return err
			}
			for _, a := range addrs {
				ipn, ok := a.(*net.IPNet)
				if !ok {
					continue
				}
				ip, ok := netip.AddrFromSlice(ipn.IP)
				if !ok || !ip.Unmap().IsGlobalUnicast() {
					continue
				}
				if ip = ip.Unmap(); ip.Is4() {
					v4 = append(v4, ip)
				} else {
					v6 = append(v6, ip)
				}
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read the pod's addresses in netns %s: %w", h.Path(), err)
	}
	return append(v4, v6...), nil
}

// podCgroupPath prefers the runtime's CgroupParent. Without one, the sandbox container's
// cgroup sits directly in the pod cgroup under both drivers (<parent>/<id>, or
// <parent slice>/<prefix>-<id>.scope), so its directory is the pod cgroup.
func podCgroupPath(s Sandbox) (string, error) {
	if s.CgroupParent != "" {
		p, err := CanonicalCgroupPath(s.CgroupParent)
		if err != nil {
			return "", fmt.Errorf("pod cgroup: %w", err)
		}
		return p, nil
	}
	if s.CgroupsPath != "" {
		p, err := CanonicalCgroupPath(s.CgroupsPath)
		if err != nil {
			return "", fmt.Errorf("pod cgroup from sandbox container cgroup: %w", err)
		}
		return path.Dir(p), nil
	}
	return "", errors.New("pod cgroup: the runtime reported no cgroup parent")
}

// readPodCgroupID fills in the pod cgroup ID. A pod cgroup that does not exist yet is not
// an error: it appears with the first container.
func (t *Tracker) readPodCgroupID(p *Pod) error {
	if p.CgroupPath == "" {
		return nil
	}
	id, err := t.cgroupID(t.mount, p.CgroupPath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("pod cgroup: %w", err)
	}
	p.CgroupID = id
	return nil
}

func parseIP(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		// Some runtimes hand over the address with its prefix length.
		pfx, perr := netip.ParsePrefix(s)
		if perr != nil {
			return netip.Addr{}, fmt.Errorf("pod IP %q: %w", s, err)
		}
		a = pfx.Addr()
	}
	return a.Unmap(), nil
}

// ContainerCreated records a container (PostCreateContainer and StartContainer both call
// it; the second call refreshes the first). A missing cgroup is an error (wrapping
// fs.ErrNotExist: containerd may create it only at start), but the container is recorded
// all the same. It also retries the pod
// cgroup ID while that is still unknown. An unknown sandbox is an error and records nothing.
func (t *Tracker) ContainerCreated(c ContainerInfo) (Pod, error) {
	if c.ID == "" {
		return Pod{}, errors.New("container created: empty container ID")
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return Pod{}, fmt.Errorf("container %s: %w", c.ID, errClosed)
	}
	ps, ok := t.pods[c.SandboxID]
	if !ok {
		return Pod{}, fmt.Errorf("container %s: sandbox %q: %w", c.ID, c.SandboxID, ErrUnknownSandbox)
	}
	err := t.upsertContainer(ps, c)
	return ps.export(), err
}

// upsertContainer records a container in its pod. Called with t.mu held.
func (t *Tracker) upsertContainer(ps *podState, c ContainerInfo) error {
	if prev, ok := t.owner[c.ID]; ok && prev != c.SandboxID {
		// A container cannot change pods; trust the newest event and drop the stale record.
		if old, ok := t.pods[prev]; ok {
			delete(old.containers, c.ID)
		}
	}
	t.owner[c.ID] = c.SandboxID

	var errs []error
	ctr := Container{ID: c.ID, Name: c.Name}
	if c.CgroupsPath == "" {
		errs = append(errs, errors.New("the runtime reported no cgroup path"))
	} else if p, err := CanonicalCgroupPath(c.CgroupsPath); err != nil {
		errs = append(errs, err)
	} else {
		ctr.CgroupPath = p
		id, err := t.cgroupID(t.mount, p)
		if err != nil {
			errs = append(errs, err)
		}
		ctr.CgroupID = id
	}
	ps.containers[c.ID] = ctr

	pod := &ps.pod
	if pod.CgroupPath == "" && ctr.CgroupPath != "" {
		// Same reasoning as for the sandbox container: the container sits in the pod cgroup.
		pod.CgroupPath = path.Dir(ctr.CgroupPath)
	}
	if pod.CgroupID == 0 {
		if err := t.readPodCgroupID(pod); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("container %s of pod %s/%s: %w", c.ID, pod.Namespace, pod.Name, err)
	}
	return nil
}

// ContainerRemoved forgets a container and returns its pod as it is now. ok is false for
// an unknown container.
func (t *Tracker) ContainerRemoved(id string) (pod Pod, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	sid, ok := t.owner[id]
	if !ok {
		return Pod{}, false
	}
	delete(t.owner, id)
	ps, ok := t.pods[sid]
	if !ok {
		return Pod{}, false
	}
	delete(ps.containers, id)
	return ps.export(), true
}

// RemovePodSandbox forgets a pod and its containers and closes its netns handle (the
// runtime has removed the namespace by then). It returns the pod as it was.
func (t *Tracker) RemovePodSandbox(id string) (pod Pod, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	ps, ok := t.pods[id]
	if !ok {
		return Pod{}, false
	}
	pod = ps.export()
	// Closing an nsfs fd has nothing to report that the caller could act on.
	_ = t.forget(id, ps)
	return pod, true
}

// forget drops a pod and releases its netns. Called with t.mu held.
func (t *Tracker) forget(id string, ps *podState) error {
	for cid := range ps.containers {
		if t.owner[cid] == id {
			delete(t.owner, cid)
		}
	}
	delete(t.pods, id)
	return t.retire(ps)
}

// retire releases a pod's netns handle now, or when its last WithNetns user returns.
// Called with t.mu held.
func (t *Tracker) retire(ps *podState) error {
	h := ps.netns
	if h == nil {
		return nil
	}
	ps.netns = nil
	h.retired = true
	if h.users == 0 {
		return h.ns.Close()
	}
	return nil
}

// Synchronize makes the tracker hold exactly the given sandboxes and containers, as after
// NRI's Synchronize: pods not listed are removed and their handles closed, known pods keep
// their open handle, new ones are opened, and containers are rebuilt the same way. err
// joins every per-pod and per-container problem; every pod that could be recorded is kept.
func (t *Tracker) Synchronize(sandboxes []Sandbox, containers []ContainerInfo) (pods, removed []Pod, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, nil, fmt.Errorf("synchronize: %w", errClosed)
	}
	var errs []error
	want := make(map[string]bool, len(sandboxes))
	for _, s := range sandboxes {
		if s.ID == "" {
			errs = append(errs, errors.New("sandbox with empty ID"))
			continue
		}
		want[s.ID] = true
	}
	for id, ps := range t.pods {
		if !want[id] {
			removed = append(removed, ps.export())
			if err := t.forget(id, ps); err != nil {
				errs = append(errs, err)
			}
		}
	}
	for _, s := range sandboxes {
		if s.ID == "" {
			continue
		}
		if _, err := t.upsertPod(s); err != nil {
			errs = append(errs, err)
		}
	}

	wantCtr := make(map[string]bool, len(containers))
	for _, c := range containers {
		if c.ID == "" {
			errs = append(errs, errors.New("container with empty ID"))
			continue
		}
		ps, ok := t.pods[c.SandboxID]
		if !ok {
			errs = append(errs, fmt.Errorf("container %s: sandbox %q: %w", c.ID, c.SandboxID, ErrUnknownSandbox))
			continue
		}
		wantCtr[c.ID] = true
		if err := t.upsertContainer(ps, c); err != nil {
			errs = append(errs, err)
		}
	}
	for cid, sid := range t.owner {
		if !wantCtr[cid] {
			delete(t.owner, cid)
			if ps, ok := t.pods[sid]; ok {
				delete(ps.containers, cid)
			}
		}
	}

	sortPods(removed)
	return t.podsLocked(), removed, errors.Join(errs...)
}

// Pods returns every known pod, sorted by namespace and name.
func (t *Tracker) Pods() []Pod {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.podsLocked()
}

func (t *Tracker) podsLocked() []Pod {
	out := make([]Pod, 0, len(t.pods))
	for _, ps := range t.pods {
		out = append(out, ps.export())
	}
	sortPods(out)
	return out
}

func sortPods(p []Pod) {
	slices.SortFunc(p, func(a, b Pod) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name),
			strings.Compare(a.SandboxID, b.SandboxID))
	})
}

// Pod returns one pod by sandbox ID.
func (t *Tracker) Pod(sandboxID string) (Pod, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	ps, ok := t.pods[sandboxID]
	if !ok {
		return Pod{}, false
	}
	return ps.export(), true
}

// WithNetns runs f with the pod's held netns fd, which stays open until f returns even if
// the pod is removed meanwhile. f runs without the tracker lock, so runtime events are
// not held up by it. To act inside the namespace, f calls netns.Do(fd, ...).
func (t *Tracker) WithNetns(sandboxID string, f func(fd int) error) error {
	t.mu.Lock()
	ps, ok := t.pods[sandboxID]
	if !ok {
		t.mu.Unlock()
		return fmt.Errorf("netns of sandbox %q: %w", sandboxID, ErrUnknownSandbox)
	}
	if ps.netns == nil {
		t.mu.Unlock()
		return fmt.Errorf("netns of sandbox %q: %w", sandboxID, ErrNoNetns)
	}
	return t.useNetns(ps.netns, f)
}

// WithNetnsCookie is WithNetns for the pod whose netns has this cookie.
func (t *Tracker) WithNetnsCookie(cookie uint64, f func(fd int) error) error {
	t.mu.Lock()
	for _, ps := range t.pods {
		if ps.netns != nil && ps.netns.ns.Cookie() == cookie {
			return t.useNetns(ps.netns, f)
		}
	}
	t.mu.Unlock()
	return fmt.Errorf("netns cookie %d: %w", cookie, ErrNoNetns)
}

// NetnsCookies lists the cookies of the netns the tracker holds, one per namespace.
func (t *Tracker) NetnsCookies() []uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]uint64, 0, len(t.pods))
	for _, ps := range t.pods {
		if ps.netns != nil && !slices.Contains(out, ps.netns.ns.Cookie()) {
			out = append(out, ps.netns.ns.Cookie())
		}
	}
	slices.Sort(out)
	return out
}

// useNetns is called with t.mu held and releases it before f runs.
func (t *Tracker) useNetns(h *heldNetns, f func(fd int) error) error {
	h.users++
	t.mu.Unlock()
	defer func() {
		t.mu.Lock()
		defer t.mu.Unlock()
		h.users--
		if h.users == 0 && h.retired {
			_ = h.ns.Close()
		}
	}()
	return f(h.ns.Fd())
}

// Close forgets every pod and closes every held netns handle (those in use by WithNetns
// when f returns). Later events fail.
func (t *Tracker) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closed = true
	var errs []error
	for id, ps := range t.pods {
		if err := t.forget(id, ps); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// export is a deep copy the caller may keep and change.
func (ps *podState) export() Pod {
	if ps == nil {
		return Pod{}
	}
	p := ps.pod
	p.Labels = maps.Clone(p.Labels)
	p.Annotations = maps.Clone(p.Annotations)
	p.IPs = slices.Clone(p.IPs)
	p.Containers = make([]Container, 0, len(ps.containers))
	for _, c := range ps.containers {
		p.Containers = append(p.Containers, c)
	}
	slices.SortFunc(p.Containers, func(a, b Container) int { return strings.Compare(a.ID, b.ID) })
	return p
}

// SharingCgroup returns the pods other than sandboxID whose pod cgroup has this ID. It
// copies only those, so a runtime event on a large node does not copy every pod.
func (t *Tracker) SharingCgroup(cgroupID uint64, sandboxID string) []Pod {
	if cgroupID == 0 {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []Pod
	for id, ps := range t.pods {
		if id != sandboxID && ps.pod.CgroupID == cgroupID {
			out = append(out, ps.export())
		}
	}
	return out
}

// SandboxGone reports whether a pod shows no sign of running any more: its netns path no
// longer names the namespace the tracker holds (the runtime tore the network down), or,
// for a pod without a held netns, the sandbox process the runtime reported has exited (a
// process with the same PID but another start time is not it). A pod whose sandbox
// process is unknown is never reported gone. False for unknown pods.
func (t *Tracker) SandboxGone(sandboxID string) bool {
	t.mu.Lock()
	ps, ok := t.pods[sandboxID]
	if !ok {
		t.mu.Unlock()
		return false
	}
	pid, start := ps.pod.Pid, ps.pidStart
	if ps.netns == nil {
		t.mu.Unlock()
		if pid == 0 || start == 0 {
			return false
		}
		now, err := procStartTime(pid)
		return errors.Is(err, fs.ErrNotExist) || err == nil && now != start
	}
	path, fd := ps.pod.NetnsPath, ps.netns.ns.Fd()
	var held unix.Stat_t
	err := unix.Fstat(fd, &held)
	t.mu.Unlock()
	if err != nil {
		return false
	}
	var now unix.Stat_t
	if err := unix.Stat(path, &now); err != nil {
		return errors.Is(err, unix.ENOENT)
	}
	return now.Dev != held.Dev || now.Ino != held.Ino
}

// procStartTime is field 22 of /proc/PID/stat: when the process started, in clock ticks
// since boot.
func procStartTime(pid uint32) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces and parentheses: count from its end.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	fields := strings.Fields(string(b[i+1:]))
	const startTime = 22 - 3 // fields after the name start at field 3
	if len(fields) <= startTime {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(fields)+2)
	}
	return strconv.ParseUint(fields[startTime], 10, 64)
}

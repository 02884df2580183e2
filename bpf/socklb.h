// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
// Types shared by the socket-LB programs and the Go loader (which gets them through BTF).
// Changing a layout means a new map name (…_v2): an SK_STORAGE map that is recreated loses
// every socket's state.
#ifndef PODSOCK_SOCKLB_H
#define PODSOCK_SOCKLB_H

// Flags are enums, not macros, so that BTF carries them and bpf2go generates their Go names
// (-type in datapath/gen.go). BTF knows only the types something in the object refers to (a
// map's key or value, a struct field, a variable): a flags enum is the type of the field that
// holds the flags, with that field's size as its fixed underlying type (C23, which clang
// accepts in any C mode), so the layout stays what it was.
//
// An enum whose constants are all the code uses (counter indexes) is kept by a constant that
// points to it, which nothing reads: 8 bytes of .rodata. A pointer, not a value of the enum:
// bpf2go generates a variable's type on its own, and would refuse its -type.
#define KEEP_BTF_ENUM(tag) const enum tag *const btf_keep_##tag = 0

// Map capacities as built: the defaults of [limits] (config.DefaultLimits). The loader
// sets each map's size from the config before it creates the maps.
#define PODSOCK_MAX_SERVICES 32768
#define PODSOCK_MAX_SLOTS 262144
// Kubernetes names a service port namespace/name:port: 63 + 1 + 63 + 1 + 15 bytes, and the NUL.
#define PODSOCK_NAME_LEN 144
#define LB_ENTRIES 4
#define PODSOCK_MAX_PODS 4096
#define PODSOCK_MAX_CONTAINERS 16384
#define PODSOCK_MAX_POD_SERVICE 131072
#define PODSOCK_SANDBOX_ID_LEN 64
// How deep below the cgroup2 root a pod cgroup may sit (kubepods QoS slices, kind, a
// custom cgroup_parent): the datapath looks for the pod at every level up to this one.
#define PODSOCK_MAX_CGROUP_DEPTH 16

// Addresses are IPv6 or IPv4-mapped IPv6 (::ffff:a.b.c.d) in network byte order, so one
// lookup serves AF_INET sockets, AF_INET6 sockets and v4-mapped connects alike.
// Ports are in network byte order.
struct svc_key {
	__u32 addr[4];
	__u16 port;
	__u8 proto;
	__u8 pad;
};

enum svc_flags : __u32 {
	SVC_F_AFFINITY_POD = 1,  // every socket of one pod goes to the same backend
	SVC_F_RESTRICT = 2,      // only clients in podsock_allow_v1 (and the host, with ALLOW_HOST)
	SVC_F_ALLOW_HOST = 4,    // host-netns clients pass a restricted service
	SVC_F_AFFINITY_HOST = 8, // the host netns is one client, whose sockets stick like a pod's
	SVC_F_AFFINITY_TIMEOUT = 16, // choices expire: podsock_afftime_v1 has the service's timeout
	// Only host-netns sockets are balanced: a frontend on 127.0.0.1 or ::1 (a node port)
	// means the host's loopback, and a pod's loopback is its own.
	SVC_F_HOST_ONLY = 32,
};

// The client ID the host netns has in podsock_aff_v3: pod IDs stay below 1 << 20.
enum client_id : __u32 {
	HOST_CLIENT_ID = 0xffffffff,
};

struct svc_value {
	__u32 id;
	__u32 rev;        // bumped on every change of the backend set
	__u32 slot_count; // 0: the service has no backends and refuses connects
	enum svc_flags flags;
};

struct slot_key {
	__u32 svc_id;
	__u32 rev;
	__u32 slot;
};

struct backend {
	__u32 addr[4];
	__u16 port;
	__u16 pad;
};

struct svc_name {
	char name[PODSOCK_NAME_LEN];
};

// One translation a socket made: which service, and the backend it was sent to.
struct lb_entry {
	__u32 vip[4];
	__u32 backend[4];
	__u16 vip_port;
	__u16 backend_port;
	__u32 svc_id;
	__u32 svc_rev;
};

// Socket flags. CONNECTED is 1 so that state pinned by an older agent, which stored a
// plain boolean here, still reads right.
enum sock_state_flags : __u8 {
	SOCK_F_CONNECTED = 1, // entries[0] is the connected peer (TCP, connected UDP)
	SOCK_F_TRACKED = 2,   // counted in podsock_svcnetns_v2, in the count epoch of the bits below
	SOCK_F_UNTRACKED = 4, // connected, but the count could not be taken (map full)
	// The application closed the socket; the kernel may keep it (FIN_WAIT, LAST_ACK) and its
	// storage for a while, but it no longer counts and must not be counted again.
	SOCK_F_RELEASED = 8,
	// An in-kernel socket (an NFS or Ceph client): balanced, but never counted, since the
	// kernel does not run cgroup/sock_release for it, and never destroyed, since its owner
	// manages its own transport.
	SOCK_F_KERNEL = 16,
	// Which count map TRACKED refers to. Every count map podsock creates next to adopted
	// socket state starts a new epoch; a socket tracked in an earlier one is counted again by
	// the backfill, and its release no longer touches the new map.
	SOCK_F_EPOCH_SHIFT = 5,
	SOCK_F_EPOCH_MASK = 3 << SOCK_F_EPOCH_SHIFT,
};

// The socket's whole LB state. entries[0] is the peer of a connected socket; an unconnected
// UDP socket keeps up to LB_ENTRIES recent translations so each reply can be reversed.
struct sock_state {
	struct lb_entry entries[LB_ENTRIES];
	enum sock_state_flags flags;
	__u8 proto;
	__u8 next;
	__u8 count;
};

// A {service, backend} pair as connected sockets use it: the service is named by its VIP
// key, not by its ID, which a later service may reuse.
struct svc_backend_key {
	__u32 vip[4];
	__u32 backend[4];
	__u16 vip_port;
	__u16 backend_port;
	__u8 proto;
	__u8 pad[3];
};

// How many connected sockets of one netns a service balanced, per bucket of backends (a
// hash of the backend): when a backend leaves the service, podsock enters only the netns
// whose count in that backend's bucket is not zero, instead of every netns on the node.
// One entry per {service, netns}, however many backends the service has and the netns'
// sockets use.
#define COUNT_BUCKETS 16

struct svc_netns_key {
	struct svc_key svc;
	__u64 netns_cookie;
};

struct svc_netns_counts {
	__s64 n[COUNT_BUCKETS];
};

#define PODSOCK_MAX_SVC_NETNS 65536

// The ports some service listens on, one bit per port (in network byte order, as in
// struct svc_key) and protocol: a connect or datagram to any other port leaves with one
// array read, without hashing its address. Words 0..1023 are TCP's, 1024..2047 UDP's.
#define PORT_WORDS_PER_PROTO 1024

enum pod_flags : __u32 {
	POD_F_SKIP_LB = 1, // socket-LB leaves this pod's sockets alone (service meshes)
};

// What the identity maps (container cgroup, pod cgroup, netns cookie) say about a pod.
struct pod_ref {
	__u32 pod_id;
	enum pod_flags flags;
};

// Userspace's record of a pod ID, so a restarted agent finds the IDs that the allow and
// affinity entries use. The datapath never reads it.
struct pod_meta {
	char sandbox_id[PODSOCK_SANDBOX_ID_LEN];
	enum pod_flags flags;
	__u32 pad;
};

struct pod_svc_key {
	__u32 svc_id;
	__u32 pod_id;
};

// A client's affinity choice (a pod's, or the host's under HOST_CLIENT_ID) and the revision
// of the backend set it is good for. Userspace moves the choices whose backend stays to
// the new revision before it switches the service, so a choice is current at the
// service's revision or the one after it; any other is stale, and can never send a socket
// to a backend the service dropped.
//
// last_used is when a connect or sendmsg of the client last used the choice
// (bpf_ktime_get_ns): a service with an affinity timeout (podsock_afftime_v1) lets a choice
// unused for that long expire, and the client's next socket picks by weight again.
struct aff_value {
	struct backend be;
	__u32 rev;
	__u64 last_used;
};

// Node-wide settings.
enum cfg_flags : __u32 {
	CFG_HOSTNS_ONLY = 1, // balance only sockets of the host netns
	CFG_ANY_SKIP = 2,    // some pod has POD_F_SKIP_LB: clients must be classified
	// A tracer is attached: decisions go to podsock_trace_ring, while podsock_trace_v1's
	// lease lasts and its filters pass them. Off, tracing costs the test of this bit.
	CFG_TRACE = 4,
	// Balanced connects and datagrams are counted per service in podsock_svccount_v1.
	CFG_SVC_COUNTS = 8,
};

struct datapath_cfg {
	__u64 host_netns_cookie;
	enum cfg_flags flags;
	__u32 count_epoch; // the epoch the loaded programs count in, kept for the next load
};

// STAT_UNTRACKED counts connected sockets whose pair/netns count could not be taken,
// STAT_UNTRACKED_RELEASED the release of such sockets: while more were taken than
// released, termination walks every netns, since the count map no longer names them all.
enum stat_index {
	STAT_CONNECT,
	STAT_SENDMSG,
	STAT_REVERSE,
	STAT_NO_BACKEND,
	STAT_NO_STORAGE,
	STAT_DENIED,
	STAT_SKIPPED,
	STAT_AFFINITY_FULL,
	STAT_UNTRACKED,
	STAT_UNTRACKED_RELEASED,
	STAT_MAX,
};

// One LB decision, as `podsock trace` shows it. Userspace names the pod (pod_id), the
// container (cgroup_id), the service (svc_id) and converts the time to wall clock.
enum trace_op : __u8 {
	TRACE_OP_CONNECT = 1,
	TRACE_OP_SENDMSG = 2,
	TRACE_OP_RECVMSG = 3,
	TRACE_OP_GETPEERNAME = 4,
};

enum trace_verdict : __u8 {
	TRACE_BALANCED = 1,
	TRACE_SKIPPED = 2,
	TRACE_DENIED = 3,
	TRACE_REFUSED = 4,
	TRACE_REVERSED = 5,
};

struct lb_decision {
	__u64 time_ns; // bpf_ktime_get_ns
	__u64 cgroup_id;
	__u64 netns_cookie;
	__u64 socket_cookie;
	__u32 vip[4];
	__u32 backend[4]; // zero when no backend was chosen
	__u16 vip_port;
	__u16 backend_port;
	__u32 svc_id;
	__u32 pod_id; // 0: the host, or a netns podsock does not know
	__u16 err;    // the errno the application sees, 0 if none
	__u8 proto;
	enum trace_op op;
	enum trace_verdict verdict;
	__u8 host;
	__u8 pad[2];
};

// Which of the filter maps apply: each is the union of what the tracers asked for, and
// is on only when every tracer filters that way, so no tracer misses a decision it wants;
// each tracer then keeps its own in userspace.
enum trace_filter_flags : __u32 {
	TRACE_F_PODS = 1,     // only pods in podsock_tracepod
	TRACE_F_SERVICES = 2, // only services in podsock_tracesvc
};

// until is a lease (bpf_ktime_get_ns) the agent renews while a tracer is attached: an agent
// that dies with CFG_TRACE set stops the writes once it lapses.
struct trace_cfg {
	__u64 until;
	enum trace_filter_flags flags;
	__u32 pad;
};

struct svc_counters {
	__u64 connects; // balanced connects (TCP, connected UDP)
	__u64 sendmsgs; // balanced datagrams of unconnected UDP
};

#endif

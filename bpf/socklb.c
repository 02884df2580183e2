//go:build ignore
// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause

// Socket-level service load balancing: cgroup sock_addr programs attached at the cgroup v2
// root rewrite a service VIP:port to a backend once per connect() (TCP, connected UDP) or
// per datagram (unconnected UDP), and undo the rewrite for recvmsg()/getpeername().
//
// The per-socket choice lives in SK_STORAGE: it dies with the socket, so there is no LRU
// to evict from, no 5-tuple to collide on and nothing for userspace to garbage-collect.

#include "vmlinux.h"
#include "bpf_helpers.h"
#include "bpf_endian.h"
#include "bpf_core_read.h"
#include "socklb.h"
#include "addr.h"
#include "shared_maps.h"
#include "counts.h"

char __license[] SEC("license") = "Dual BSD/GPL";

#define EPERM 1
#define ECONNREFUSED 111

#define SYS_REJECT 0
#define SYS_PROCEED 1

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PODSOCK_MAX_SERVICES);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podsock_svc_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PODSOCK_MAX_SLOTS);
	__type(key, struct slot_key);
	__type(value, struct backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podsock_slot_v1 SEC(".maps");

// Not pinned: every agent fills its own from the services before its programs attach.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * PORT_WORDS_PER_PROTO);
	__type(key, __u32);
	__type(value, __u64);
} podsock_svcport_v1 SEC(".maps");

// Service names are only read by userspace; keeping them next to the services lets a
// restarted agent (or a human with bpftool) see exactly what the datapath serves.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PODSOCK_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct svc_name);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podsock_name_v2 SEC(".maps");

// The counters of enum stat_index (socklb.h).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podsock_stat_v3 SEC(".maps");

KEEP_BTF_ENUM(stat_index);
KEEP_BTF_ENUM(client_id);

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct datapath_cfg);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podsock_cfg_v1 SEC(".maps");

// Pod identity, as the runtime reported it: the cgroup of each workload container, the
// pod cgroup, and the pod's netns cookie.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PODSOCK_MAX_CONTAINERS);
	__type(key, __u64);
	__type(value, struct pod_ref);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podsock_ctrcg_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PODSOCK_MAX_PODS);
	__type(key, __u64);
	__type(value, struct pod_ref);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podsock_podcg_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PODSOCK_MAX_PODS);
	__type(key, __u64);
	__type(value, struct pod_ref);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podsock_netns_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PODSOCK_MAX_PODS);
	__type(key, __u32);
	__type(value, struct pod_meta);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podsock_pod_v1 SEC(".maps");

// {service, pod} pairs a restricted service admits.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PODSOCK_MAX_POD_SERVICE);
	__type(key, struct pod_svc_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podsock_allow_v1 SEC(".maps");

// The backend each client (a pod, or the host as HOST_CLIENT_ID) sticks to, per service
// with affinity. Written here on a client's first connect, and again when the choice is
// stale or expired; userspace carries choices over to a service's new revision and removes
// entries when the backend, the pod or the service goes.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PODSOCK_MAX_POD_SERVICE);
	__type(key, struct pod_svc_key);
	__type(value, struct aff_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podsock_aff_v3 SEC(".maps");

// The affinity timeout of each service with SVC_F_AFFINITY_TIMEOUT, in nanoseconds, by
// service ID. Apart from struct svc_value, so that services without affinity, which
// never look here, keep their entry and their connect path as they were.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PODSOCK_MAX_SERVICES);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podsock_afftime_v1 SEC(".maps");

// Tracing. None of it is pinned: only this agent's tracers read it, and the next agent
// starts with CFG_TRACE clear. The loader sizes the ring (Options.TraceRing).
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} podsock_trace_ring SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct trace_cfg);
} podsock_trace_v1 SEC(".maps");

// The pod IDs and service IDs a tracer filters on, when podsock_trace_v1 says so.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PODSOCK_MAX_PODS);
	__type(key, __u32);
	__type(value, __u8);
} podsock_tracepod SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PODSOCK_MAX_SERVICES);
	__type(key, __u32);
	__type(value, __u8);
} podsock_tracesvc SEC(".maps");

// Decisions a full ring had no room for.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} podsock_tracelost SEC(".maps");

// Per-service counters while CFG_SVC_COUNTS is set, by service ID. Userspace creates each
// service's entry (the programs never insert), so an ID reused starts from zero.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PODSOCK_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct svc_counters);
} podsock_svccount_v1 SEC(".maps");

// Only the ring holds trace events, and a ring has no value type: this keeps the struct
// (and its enums) in BTF for bpf2go.
const struct lb_decision *const btf_keep_lb_decision = 0;

// Cleared by the loader when the kernel refuses a ring buffer: the verifier then drops
// the tracing code as dead, and the ring is a placeholder map, so only tracing is lost.
const volatile __u8 trace_ready = 1;

// A decision wakes the reader only once the ring holds this many bytes (the loader sets a
// quarter of the ring): a wakeup per decision cost each traced connect several
// microseconds. The reader polls for the rest.
const volatile __u32 trace_wake_bytes = 1 << 18;

static __always_inline void count(__u32 stat)
{
	counter_add(&podsock_stat_v3, stat);
}

// The kernel only accepts 32-bit loads of user_ip6, so read it word by word.
static __always_inline void read_user_addr(struct bpf_sock_addr *ctx, int v6, __u32 *addr)
{
	if (v6) {
		addr[0] = ctx->user_ip6[0];
		addr[1] = ctx->user_ip6[1];
		addr[2] = ctx->user_ip6[2];
		addr[3] = ctx->user_ip6[3];
	} else {
		addr_from_v4(addr, ctx->user_ip4);
	}
}

static __always_inline void write_user_addr(struct bpf_sock_addr *ctx, int v6, const __u32 *addr,
					    __u16 port)
{
	if (v6) {
		ctx->user_ip6[0] = addr[0];
		ctx->user_ip6[1] = addr[1];
		ctx->user_ip6[2] = addr[2];
		ctx->user_ip6[3] = addr[3];
	} else {
		ctx->user_ip4 = addr[3];
	}
	// user_port must be written as a 32-bit store; the port sits in its low 16 bits.
	ctx->user_port = (__u32)port;
}

// port_served says whether some service uses this port (network byte order) and
// protocol. The verifier inlines the array read, so the node's other connects pay a few
// instructions instead of a hash of their address.
static __always_inline int port_served(__u16 port, __u8 proto)
{
	__u32 word = port >> 6;
	__u64 *bits;

	if (proto == IPPROTO_UDP)
		word += PORT_WORDS_PER_PROTO;
	else if (proto != IPPROTO_TCP)
		return 0;
	bits = bpf_map_lookup_elem(&podsock_svcport_v1, &word);
	return bits && (*bits & (1ULL << (port & 63)));
}

static __always_inline struct svc_value *lookup_service(struct bpf_sock_addr *ctx, int v6,
							 struct svc_key *key)
{
	__u16 port = (__u16)ctx->user_port;
	__u8 proto = (__u8)ctx->protocol;

	if (!port_served(port, proto))
		return NULL;
	__builtin_memset(key, 0, sizeof(*key));
	read_user_addr(ctx, v6, key->addr);
	key->port = port;
	key->proto = proto;
	return bpf_map_lookup_elem(&podsock_svc_v1, key);
}

// Spreads socket cookies (sequential numbers) over the slots so that a socket keeps one
// backend for as long as the backend set stays the same.
static __always_inline __u32 cookie_hash(__u64 cookie)
{
	return (__u32)((cookie * 0x9e3779b97f4a7c15ULL) >> 32);
}

#define PICK_TRIES 3

// Userspace writes a new revision's slots before it switches the service entry to that
// revision and deletes the old slots after, so a reader that lost that race re-reads the
// service and then sees a complete set. Back-to-back updates can make it lose again, so it
// retries a few times before refusing.
static __always_inline struct backend *pick_backend(struct svc_key *key, struct svc_value **svcp,
						    __u32 hash)
{
	struct svc_value *svc = *svcp;
	struct slot_key slot = {};
	struct backend *be;
	int try;

	for (try = 0; try < PICK_TRIES; try++) {
		if (try > 0) {
			svc = bpf_map_lookup_elem(&podsock_svc_v1, key);
			if (!svc)
				return NULL;
			*svcp = svc;
		}
		if (svc->slot_count == 0)
			return NULL;
		slot.svc_id = svc->id;
		slot.rev = svc->rev;
		slot.slot = hash % svc->slot_count;
		be = bpf_map_lookup_elem(&podsock_slot_v1, &slot);
		if (be)
			return be;
	}
	return NULL;
}

static __always_inline void fill_entry(struct lb_entry *e, const struct svc_key *key,
				       const struct svc_value *svc, const struct backend *be)
{
	addr_copy(e->vip, key->addr);
	addr_copy(e->backend, be->addr);
	e->vip_port = key->port;
	e->backend_port = be->port;
	e->svc_id = svc->id;
	e->svc_rev = svc->rev;
}

// find_entry returns the socket's translation for this service made under the service's
// current revision, if it has one.
static __always_inline struct lb_entry *find_entry(struct sock_state *state,
						   const struct svc_key *key,
						   const struct svc_value *svc, __u32 first)
{
	__u32 i;

	// Counting from 0 keeps the entry's offset a constant per iteration for the verifier.
	for (i = 0; i < LB_ENTRIES; i++) {
		struct lb_entry *e = &state->entries[i];

		if (i >= state->count)
			break;
		if (i < first)
			continue;
		if (e->svc_id == svc->id && e->svc_rev == svc->rev && e->vip_port == key->port &&
		    addr_equal(e->vip, key->addr))
			return e;
	}
	return NULL;
}

static __always_inline int entry_has_backend(const struct lb_entry *e, const struct backend *be)
{
	return e->backend_port == be->port && addr_equal(e->backend, be->addr);
}

// find_backend returns the translation that sent the socket to this backend, if any.
static __always_inline struct lb_entry *find_backend(struct sock_state *state,
						     const struct backend *be, __u32 first)
{
	__u32 i;

	for (i = 0; i < LB_ENTRIES; i++) {
		struct lb_entry *e = &state->entries[i];

		if (i >= state->count)
			break;
		if (i < first)
			continue;
		if (entry_has_backend(e, be))
			return e;
	}
	return NULL;
}

// Weak: a kernel without it (before 6.2) still loads socket-LB, and counts in-kernel
// sockets like the others.
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym __weak;

#define ksym_exists(sym) (!!(sym))

// kernel_socket says the socket belongs to the kernel (sock_create_kern: NFS, Ceph).
static __always_inline int kernel_socket(struct bpf_sock *sk)
{
	struct sock *s;

	if (!ksym_exists(bpf_rdonly_cast))
		return 0;
	s = bpf_rdonly_cast(sk, bpf_core_type_id_kernel(struct sock));
	return BPF_CORE_READ_BITFIELD(s, sk_kern_sock);
}

// track counts a newly connected socket under its service, netns and backend bucket.
static __always_inline void track(struct bpf_sock *sk, struct sock_state *state, __u64 netns)
{
	if (kernel_socket(sk)) {
		state->flags |= SOCK_F_KERNEL;
		return;
	}
	if (count_socket(&podsock_svcnetns_v2, state, netns))
		return;
	state->flags |= SOCK_F_UNTRACKED;
	count(STAT_UNTRACKED);
}

// untrack undoes track when the socket goes or connects elsewhere. A count taken in an
// earlier epoch is in a map that is gone.
static __always_inline void untrack(struct sock_state *state, __u64 netns)
{
	struct svc_netns_counts *n;
	struct svc_netns_key k;

	if ((state->flags & SOCK_F_TRACKED) && sock_epoch(state) == count_epoch_now) {
		svc_netns_key(&k, state, netns);
		n = bpf_map_lookup_elem(&podsock_svcnetns_v2, &k);
		if (n)
			__sync_fetch_and_add(&n->n[backend_bucket(&state->entries[0])], -1);
	}
	if (state->flags & SOCK_F_UNTRACKED)
		count(STAT_UNTRACKED_RELEASED);
	state->flags &= ~(SOCK_F_TRACKED | SOCK_F_UNTRACKED | SOCK_F_EPOCH_MASK);
}

// Who is calling: a known pod, the host, or neither (a netns the runtime never told us of).
struct client {
	__u32 pod_id;    // 0: not a known pod
	__u32 flags;     // pod flags
	__u8 host;       // the socket lives in the host netns
	__u8 classified; // the fields above are known; policy() skips it when nothing needs it
};

static __always_inline struct pod_ref *pod_by_cgroup(void)
{
	__u64 id = bpf_get_current_cgroup_id();
	struct pod_ref *ref = bpf_map_lookup_elem(&podsock_ctrcg_v1, &id);
	int level;

	if (ref)
		return ref;
	// Not a container cgroup we know (the pause process, a nested cgroup, a container
	// created behind the runtime's back): the pod cgroup, at whatever depth the runtime put
	// it, is an exact match among the caller's ancestors.
	for (level = 1; level <= PODSOCK_MAX_CGROUP_DEPTH; level++) {
		id = bpf_get_current_ancestor_cgroup_id(level);
		if (!id)
			break;
		ref = bpf_map_lookup_elem(&podsock_podcg_v1, &id);
		if (ref)
			return ref;
	}
	return NULL;
}

static __always_inline void classify(__u64 netns, __u8 host, struct client *c)
{
	struct pod_ref *ref = pod_by_cgroup();

	if (!ref)
		ref = bpf_map_lookup_elem(&podsock_netns_v1, &netns);
	c->pod_id = ref ? ref->pod_id : 0;
	c->flags = ref ? ref->flags : 0;
	c->host = host;
	c->classified = 1;
}

static __always_inline struct datapath_cfg *settings(void)
{
	__u32 key = 0;

	return bpf_map_lookup_elem(&podsock_cfg_v1, &key);
}

enum verdict {
	VERDICT_BALANCE,
	VERDICT_SKIP,
	VERDICT_DENY,
};

// policy decides what happens to a socket operation towards svc from this client. Clients
// are only classified when a node setting or the service needs it, so services without
// pod policy pay nothing for it.
static __always_inline enum verdict policy(struct bpf_sock_addr *ctx, const struct svc_value *svc,
					   const struct datapath_cfg *cfg, struct client *c)
{
	__u32 cfg_flags = cfg ? cfg->flags : 0;
	__u64 netns;
	__u8 host;

	if (!(cfg_flags & (CFG_HOSTNS_ONLY | CFG_ANY_SKIP)) &&
	    !(svc->flags & (SVC_F_RESTRICT | SVC_F_AFFINITY_POD | SVC_F_AFFINITY_HOST | SVC_F_HOST_ONLY)))
		return VERDICT_BALANCE;
	netns = bpf_get_netns_cookie(ctx);
	host = cfg && netns == cfg->host_netns_cookie;
	// Before the pod lookup, which a socket of another netns then never pays for.
	if ((svc->flags & SVC_F_HOST_ONLY) && !host)
		return VERDICT_SKIP;
	classify(netns, host, c);
	if ((cfg_flags & CFG_HOSTNS_ONLY) && !c->host)
		return VERDICT_SKIP;
	if (c->flags & POD_F_SKIP_LB)
		return VERDICT_SKIP;
	if (svc->flags & SVC_F_RESTRICT) {
		struct pod_svc_key ak = { .svc_id = svc->id, .pod_id = c->pod_id };

		if (c->pod_id) {
			if (!bpf_map_lookup_elem(&podsock_allow_v1, &ak))
				return VERDICT_DENY;
		} else if (!c->host || !(svc->flags & SVC_F_ALLOW_HOST)) {
			// A netns that is neither the host nor a pod we know is denied: an
			// allow-list fails closed.
			return VERDICT_DENY;
		}
	}
	return VERDICT_BALANCE;
}

// trace writes one decision to the ring, if a tracer's lease is current and the filters
// pass it. Callers test CFG_TRACE first: that test is all tracing costs while it is off.
static __always_inline void trace(struct bpf_sock_addr *ctx, const struct datapath_cfg *cfg,
				  struct client *c, const __u32 *vip, __u16 vip_port, __u8 proto,
				  __u32 svc_id, const __u32 *be_addr, __u16 be_port, __u8 op,
				  __u8 verdict, __u16 err)
{
	struct lb_decision *e;
	struct trace_cfg *tc;
	__u32 zero = 0;
	__u64 now, netns;

	if (!trace_ready)
		return;
	tc = bpf_map_lookup_elem(&podsock_trace_v1, &zero);
	if (!tc)
		return;
	now = bpf_ktime_get_ns();
	if (now > tc->until)
		return;
	netns = bpf_get_netns_cookie(ctx);
	if (!c->classified)
		classify(netns, cfg && netns == cfg->host_netns_cookie, c);
	if ((tc->flags & TRACE_F_PODS) && !bpf_map_lookup_elem(&podsock_tracepod, &c->pod_id))
		return;
	if ((tc->flags & TRACE_F_SERVICES) && !bpf_map_lookup_elem(&podsock_tracesvc, &svc_id))
		return;
	e = bpf_ringbuf_reserve(&podsock_trace_ring, sizeof(*e), 0);
	if (!e) {
		counter_add(&podsock_tracelost, 0);
		return;
	}
	e->time_ns = now;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->netns_cookie = netns;
	e->socket_cookie = bpf_get_socket_cookie(ctx);
	addr_copy(e->vip, vip);
	e->vip_port = vip_port;
	if (be_addr) {
		addr_copy(e->backend, be_addr);
		e->backend_port = be_port;
	} else {
		__builtin_memset(e->backend, 0, sizeof(e->backend));
		e->backend_port = 0;
	}
	e->svc_id = svc_id;
	e->pod_id = c->pod_id;
	e->err = err;
	e->proto = proto;
	e->op = op;
	e->verdict = verdict;
	e->host = c->host;
	e->pad[0] = 0;
	e->pad[1] = 0;
	bpf_ringbuf_submit(e, bpf_ringbuf_query(&podsock_trace_ring, BPF_RB_AVAIL_DATA) >= trace_wake_bytes ?
				      BPF_RB_FORCE_WAKEUP :
				      BPF_RB_NO_WAKEUP);
}

#define TRACE(cfg_flags, ...)                  \
	do {                                   \
		if ((cfg_flags) & CFG_TRACE)   \
			trace(__VA_ARGS__);    \
	} while (0)

// count_service counts a balanced connect (connects) or datagram under its service.
static __always_inline void count_service(__u32 cfg_flags, __u32 svc_id, int datagram)
{
	struct svc_counters *n;

	if (!(cfg_flags & CFG_SVC_COUNTS))
		return;
	n = bpf_map_lookup_elem(&podsock_svccount_v1, &svc_id);
	if (!n)
		return;
	// Atomic even per CPU: a preempted program can share its CPU with another.
	if (datagram)
		__sync_fetch_and_add(&n->sendmsgs, 1);
	else
		__sync_fetch_and_add(&n->connects, 1);
}

static __always_inline int deny(void)
{
	count(STAT_DENIED);
	bpf_set_retval(-EPERM);
	return SYS_REJECT;
}

// affinity_client is the ID a client's choices in this service are kept under, 0 for a
// client whose sockets each pick on their own. A pod in the host netns (host network) is
// its pod, not the host.
static __always_inline __u32 affinity_client(const struct svc_value *svc, const struct client *c)
{
	if (c->pod_id)
		return (svc->flags & SVC_F_AFFINITY_POD) ? c->pod_id : 0;
	if (c->host && (svc->flags & SVC_F_AFFINITY_HOST))
		return HOST_CLIENT_ID;
	return 0;
}

// A choice's last use is written at most this often: every connect of a busy client would
// otherwise write the one cache line its choice sits in, from every CPU. Timeouts are
// whole seconds.
#define AFF_TOUCH_NS 1000000ULL

// choice_current says whether a choice may still be used: made for the service's backend
// set (see struct aff_value), and used within the service's timeout, if it has one.
static __always_inline int choice_current(const struct aff_value *cur, const struct svc_value *svc,
					  __u64 timeout, __u64 now)
{
	if (cur->rev != svc->rev && cur->rev != svc->rev + 1)
		return 0;
	// Signed: a use stamped by userspace may be a little ahead of this program's now.
	return !timeout || (__s64)(now - cur->last_used) < (__s64)timeout;
}

// pick_for_client is pick_backend, except that a client of a service with affinity reuses
// the backend it was given first, for as long as that choice is current: a choice of a
// backend the service dropped never is, whether or not userspace has removed it yet, nor
// one left unused for longer than the service's timeout.
static __always_inline struct backend *pick_for_client(struct svc_key *key, struct svc_value **svcp,
						       const struct client *c, __u32 hash,
						       struct backend *scratch)
{
	struct aff_value *cur, fresh = {};
	struct pod_svc_key ak;
	struct backend *be;
	__u64 timeout = 0, now, *t;
	long err;

	if (!((*svcp)->flags & (SVC_F_AFFINITY_POD | SVC_F_AFFINITY_HOST)))
		return pick_backend(key, svcp, hash);
	ak.pod_id = affinity_client(*svcp, c);
	if (!ak.pod_id)
		return pick_backend(key, svcp, hash);
	if ((*svcp)->slot_count == 0)
		return NULL;
	ak.svc_id = (*svcp)->id;
	if ((*svcp)->flags & SVC_F_AFFINITY_TIMEOUT) {
		t = bpf_map_lookup_elem(&podsock_afftime_v1, &ak.svc_id);
		if (t)
			timeout = *t;
	}
	now = bpf_ktime_get_ns();
	cur = bpf_map_lookup_elem(&podsock_aff_v3, &ak);
	if (cur && choice_current(cur, *svcp, timeout, now)) {
		// Unsigned: a stamp ahead of now is written over too, which is harmless.
		if (now - cur->last_used >= AFF_TOUCH_NS)
			cur->last_used = now;
		return &cur->be;
	}
	be = pick_backend(key, svcp, hash);
	if (!be)
		return NULL;
	fresh.be = *be;
	fresh.rev = (*svcp)->rev;
	fresh.last_used = now;
	*scratch = *be;
	// A stale or expired choice is replaced; a first one is added only if no other socket
	// of the client has just made it, and then that socket's choice is followed.
	err = bpf_map_update_elem(&podsock_aff_v3, &ak, &fresh, cur ? BPF_ANY : BPF_NOEXIST);
	if (err == -EEXIST) {
		cur = bpf_map_lookup_elem(&podsock_aff_v3, &ak);
		if (cur && cur->rev == fresh.rev)
			return &cur->be;
		return scratch;
	}
	if (err)
		count(STAT_AFFINITY_FULL);
	return scratch;
}

static __always_inline int refuse(__u32 stat)
{
	count(stat);
	// Without an error set the caller would see EPERM, which reads like a policy denial.
	bpf_set_retval(-ECONNREFUSED);
	return SYS_REJECT;
}

static __always_inline int sock_connect(struct bpf_sock_addr *ctx, int v6)
{
	struct sock_state *state;
	struct svc_value *svc;
	struct backend *be = NULL, chosen_be = {}, scratch = {};
	struct svc_key key;
	struct client client = {};
	struct datapath_cfg *cfg = NULL;
	enum verdict verdict;
	__u32 hash, cfg_flags = 0;
	// Read ctx->sk once, up front: clang otherwise folds the offset into a derived ctx
	// pointer, which the verifier rejects.
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		return SYS_PROCEED;
	svc = lookup_service(ctx, v6, &key);
	if (svc) {
		cfg = settings();
		cfg_flags = cfg ? cfg->flags : 0;
	}
	verdict = svc ? policy(ctx, svc, cfg, &client) : VERDICT_SKIP;
	// A denied connect fails, and the kernel keeps the socket's old peer (a connected UDP
	// socket stays connected): so does its state.
	if (verdict == VERDICT_DENY) {
		TRACE(cfg_flags, ctx, cfg, &client, key.addr, key.port, key.proto, svc->id, NULL, 0,
		      TRACE_OP_CONNECT, TRACE_DENIED, EPERM);
		return deny();
	}
	if (verdict != VERDICT_BALANCE) {
		// A balanced socket re-connected elsewhere must not keep claiming its old backend.
		state = bpf_sk_storage_get(&podsock_sock_v1, sk, 0, 0);
		if (state) {
			untrack(state, bpf_get_netns_cookie(ctx));
			bpf_sk_storage_delete(&podsock_sock_v1, sk);
		}
		if (svc) {
			count(STAT_SKIPPED);
			TRACE(cfg_flags, ctx, cfg, &client, key.addr, key.port, key.proto, svc->id, NULL,
			      0, TRACE_OP_CONNECT, TRACE_SKIPPED, 0);
		}
		return SYS_PROCEED;
	}

	state = bpf_sk_storage_get(&podsock_sock_v1, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (key.proto == IPPROTO_UDP && state) {
		// Connected UDP picks once per socket: keep what an earlier sendmsg() to this
		// service chose, as long as the service has not changed since.
		struct lb_entry *prev = find_entry(state, &key, svc, 0);

		if (prev) {
			addr_copy(chosen_be.addr, prev->backend);
			chosen_be.port = prev->backend_port;
			be = &chosen_be;
		}
	}
	if (!be) {
		hash = key.proto == IPPROTO_TCP ? bpf_get_prandom_u32() :
						  cookie_hash(bpf_get_socket_cookie(ctx));
		be = pick_for_client(&key, &svc, &client, hash, &scratch);
	}
	if (!be) {
		TRACE(cfg_flags, ctx, cfg, &client, key.addr, key.port, key.proto, svc->id, NULL, 0,
		      TRACE_OP_CONNECT, TRACE_REFUSED, ECONNREFUSED);
		return refuse(STAT_NO_BACKEND);
	}

	if (state) {
		__u64 netns = bpf_get_netns_cookie(ctx);

		// Storage the kernel just created is zeroed: only an earlier use needs undoing.
		if (state->flags || state->count) {
			untrack(state, netns);
			__builtin_memset(state, 0, sizeof(*state));
		}
		fill_entry(&state->entries[0], &key, svc, be);
		state->flags = SOCK_F_CONNECTED;
		state->proto = key.proto;
		state->count = 1;
		track(sk, state, netns);
	} else {
		count(STAT_NO_STORAGE);
	}
	write_user_addr(ctx, v6, be->addr, be->port);
	count(STAT_CONNECT);
	count_service(cfg_flags, svc->id, 0);
	TRACE(cfg_flags, ctx, cfg, &client, key.addr, key.port, key.proto, svc->id, be->addr,
	      be->port, TRACE_OP_CONNECT, TRACE_BALANCED, 0);
	return SYS_PROCEED;
}

static __always_inline int sock_sendmsg(struct bpf_sock_addr *ctx, int v6)
{
	struct sock_state *state;
	struct lb_entry *e = NULL;
	struct svc_value *svc;
	struct backend *be, scratch = {};
	struct svc_key key;
	struct client client = {};
	struct datapath_cfg *cfg;
	enum verdict verdict;
	__u32 first, cfg_flags;
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		return SYS_PROCEED;
	svc = lookup_service(ctx, v6, &key);
	if (!svc || key.proto != IPPROTO_UDP)
		return SYS_PROCEED;
	cfg = settings();
	cfg_flags = cfg ? cfg->flags : 0;
	verdict = policy(ctx, svc, cfg, &client);
	if (verdict == VERDICT_DENY) {
		TRACE(cfg_flags, ctx, cfg, &client, key.addr, key.port, key.proto, svc->id, NULL, 0,
		      TRACE_OP_SENDMSG, TRACE_DENIED, EPERM);
		return deny();
	}
	if (verdict == VERDICT_SKIP) {
		count(STAT_SKIPPED);
		TRACE(cfg_flags, ctx, cfg, &client, key.addr, key.port, key.proto, svc->id, NULL, 0,
		      TRACE_OP_SENDMSG, TRACE_SKIPPED, 0);
		return SYS_PROCEED;
	}

	state = bpf_sk_storage_get(&podsock_sock_v1, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state) {
		count(STAT_NO_STORAGE);
		be = pick_for_client(&key, &svc, &client, cookie_hash(bpf_get_socket_cookie(ctx)),
				     &scratch);
		if (!be)
			goto refused;
		write_user_addr(ctx, v6, be->addr, be->port);
		goto balanced;
	}

	// Entry 0 belongs to the connected peer, if any; datagrams to other services rotate
	// through the remaining entries so replies from each backend can still be reversed.
	first = (state->flags & SOCK_F_CONNECTED) ? 1 : 0;
	e = find_entry(state, &key, svc, first);
	if (e) {
		write_user_addr(ctx, v6, e->backend, e->backend_port);
		count(STAT_SENDMSG);
		count_service(cfg_flags, svc->id, 1);
		TRACE(cfg_flags, ctx, cfg, &client, key.addr, key.port, key.proto, svc->id, e->backend,
		      e->backend_port, TRACE_OP_SENDMSG, TRACE_BALANCED, 0);
		return SYS_PROCEED;
	}

	be = pick_for_client(&key, &svc, &client, cookie_hash(bpf_get_socket_cookie(ctx)), &scratch);
	if (!be)
		goto refused;
	// Keep one entry per backend, so a reply can mean only one VIP: the one this socket
	// used last with that backend. A backend new to the socket takes a fresh entry, and
	// the service's previous translation stays, so replies still in flight from a
	// backend the service just dropped keep showing the VIP.
	e = find_backend(state, be, first);
	if (!e) {
		__u32 span = LB_ENTRIES - first;
		__u32 idx = first + (state->next % span);

		if (idx >= LB_ENTRIES)
			idx = LB_ENTRIES - 1;
		e = &state->entries[idx];
		state->next = (state->next + 1) % span;
		if (state->count < idx + 1)
			state->count = idx + 1;
		state->proto = IPPROTO_UDP;
	}
	fill_entry(e, &key, svc, be);
	write_user_addr(ctx, v6, be->addr, be->port);
balanced:
	count(STAT_SENDMSG);
	count_service(cfg_flags, svc->id, 1);
	TRACE(cfg_flags, ctx, cfg, &client, key.addr, key.port, key.proto, svc->id, be->addr, be->port,
	      TRACE_OP_SENDMSG, TRACE_BALANCED, 0);
	return SYS_PROCEED;
refused:
	TRACE(cfg_flags, ctx, cfg, &client, key.addr, key.port, key.proto, svc->id, NULL, 0,
	      TRACE_OP_SENDMSG, TRACE_REFUSED, ECONNREFUSED);
	return refuse(STAT_NO_BACKEND);
}

// Replace the backend with the VIP it stands for, in the address that recvmsg() or
// getpeername() hands to the application.
static __always_inline int sock_reverse(struct bpf_sock_addr *ctx, int v6, int connected_only)
{
	struct sock_state *state;
	struct backend peer = {}, vip;
	struct datapath_cfg *cfg;
	struct client client = {};
	struct lb_entry *e;
	__u32 svc_id;
	__u8 proto;
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		return SYS_PROCEED;
	state = bpf_sk_storage_get(&podsock_sock_v1, sk, 0, 0);
	if (!state)
		return SYS_PROCEED;
	if (connected_only && !(state->flags & SOCK_F_CONNECTED))
		return SYS_PROCEED;

	read_user_addr(ctx, v6, peer.addr);
	peer.port = (__u16)ctx->user_port;
	if (connected_only) {
		// A connected socket's peer is entry 0.
		if (!entry_has_backend(&state->entries[0], &peer))
			return SYS_PROCEED;
		e = &state->entries[0];
	} else {
		e = find_backend(state, &peer, 0);
		if (!e)
			return SYS_PROCEED;
	}
	// Copied before any helper call: the verifier does not follow the entry pointer
	// through the spill that the calls force.
	addr_copy(vip.addr, e->vip);
	vip.port = e->vip_port;
	svc_id = e->svc_id;
	proto = state->proto;
	write_user_addr(ctx, v6, vip.addr, vip.port);
	count(STAT_REVERSE);
	// Only a reversal reads the settings: the other recvmsg()s and getpeername()s pay
	// nothing for tracing.
	cfg = settings();
	if (cfg)
		TRACE(cfg->flags, ctx, cfg, &client, vip.addr, vip.port, proto, svc_id, peer.addr,
		      peer.port, connected_only ? TRACE_OP_GETPEERNAME : TRACE_OP_RECVMSG,
		      TRACE_REVERSED, 0);
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int podsock_connect4(struct bpf_sock_addr *ctx)
{
	return sock_connect(ctx, 0);
}

SEC("cgroup/connect6")
int podsock_connect6(struct bpf_sock_addr *ctx)
{
	return sock_connect(ctx, 1);
}

SEC("cgroup/sendmsg4")
int podsock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock_sendmsg(ctx, 0);
}

SEC("cgroup/sendmsg6")
int podsock_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock_sendmsg(ctx, 1);
}

SEC("cgroup/recvmsg4")
int podsock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock_reverse(ctx, 0, 0);
}

SEC("cgroup/recvmsg6")
int podsock_recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock_reverse(ctx, 1, 0);
}

SEC("cgroup/getpeername4")
int podsock_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock_reverse(ctx, 0, 1);
}

SEC("cgroup/getpeername6")
int podsock_getpeername6(struct bpf_sock_addr *ctx)
{
	return sock_reverse(ctx, 1, 1);
}

// A released socket no longer counts towards its backend: termination skips netns whose
// sockets are all gone.
SEC("cgroup/sock_release")
int podsock_sock_release(struct bpf_sock *ctx)
{
	struct sock_state *state = bpf_sk_storage_get(&podsock_sock_v1, ctx, 0, 0);

	if (state) {
		untrack(state, bpf_get_netns_cookie(ctx));
		state->flags |= SOCK_F_RELEASED;
	}
	return SYS_PROCEED;
}

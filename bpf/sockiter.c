//go:build ignore
// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause

// Socket iterators: list the TCP/UDP sockets of one netns, with the LB state socket-LB
// left in their SK_STORAGE, and destroy the connected ones still attached to a removed
// backend. iter/tcp and iter/udp see only the netns of the thread that opens them, so the
// agent opens them inside each netns it needs; which netns those are comes from
// podsock_svcnetns_v2 (see socklb.c).
//
// Kept apart from socklb.c: a kernel without bpf_sock_destroy (< 6.5) still gets
// socket-LB, only without listing and termination.

#include "vmlinux.h"
#include "bpf_helpers.h"
#include "bpf_endian.h"
#include "bpf_core_read.h"
#include "socklb.h"
#include "addr.h"
#include "shared_maps.h"
#include "counts.h"

char __license[] SEC("license") = "Dual BSD/GPL";

// A macro in the kernel's headers, so not in vmlinux.h (IPPROTO_* and TCP_ESTABLISHED are
// enum constants there).
#define AF_INET6 10

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

// Record flags.
enum rec_flags : __u8 {
	REC_F_BALANCED = 1,     // socket-LB translated for this socket; lb is its first entry
	REC_F_LB_CONNECTED = 2, // lb is the connected peer's translation
	REC_F_RELEASED = 4,     // the application closed it; the kernel has not freed it yet
};

// One socket, as the iterator writes it to the reader.
struct sock_record {
	__u64 netns_cookie;
	__u64 sock_cookie;
	__u32 local[4]; // IPv6 or v4-mapped, network byte order
	__u32 remote[4];
	__u16 local_port; // network byte order
	__u16 remote_port;
	__u8 proto;
	__u8 state; // the kernel's TCP state numbering (UDP: 1 connected, 7 not)
	__u8 family;
	enum rec_flags flags;
	__u32 uid;
	__u32 lb_count; // translations the socket holds (unconnected UDP may hold several)
	struct lb_entry lb;
};

// List filters, applied here so that non-matching sockets are never copied out.
enum filter_flags : __u32 {
	FILTER_BACKEND = 1, // only sockets whose remote or any translation is filter.backend
};

struct list_filter {
	__u32 backend[4];
	__u16 backend_port;
	__u16 pad;
	enum filter_flags flags;
};

// The reader runs one listing at a time and sets the filter before it opens the
// iterator.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct list_filter);
} podsock_list_filter SEC(".maps");

// The {service, backend} pairs being terminated: a connected socket is destroyed when the
// translation of its peer is one of them, made by that service (its ID) under a revision
// older than the first one without the backend.
struct doomed_value {
	__u32 svc_id;
	__u32 first_rev_without;
};

#define PODSOCK_MAX_DOOMED 65536

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PODSOCK_MAX_DOOMED);
	__type(key, struct svc_backend_key);
	__type(value, struct doomed_value);
} podsock_doomed SEC(".maps");

// What destroy runs did, counted here rather than written to the reader: when the reader's
// buffer fills, the kernel shows the socket again, but a destroyed socket is unhashed by
// then and skipped, so its record would be lost.
enum destroy_count {
	DESTROYED,
	DESTROY_FAILED,
	BACKFILLED, // sockets podsock_backfill_counts counted
	DESTROY_COUNT_MAX,
};

KEEP_BTF_ENUM(destroy_count);

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DESTROY_COUNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} podsock_destroy_count SEC(".maps");

static __always_inline void fill_record(struct sock_record *r, struct sock_common *skc, __u8 proto,
					__u32 uid)
{
	__builtin_memset(r, 0, sizeof(*r));
	r->netns_cookie = skc->skc_net.net->net_cookie;
	r->sock_cookie = bpf_get_socket_cookie(skc);
	r->family = (__u8)skc->skc_family;
	r->state = skc->skc_state;
	r->proto = proto;
	r->uid = uid;
	r->local_port = bpf_htons(skc->skc_num);
	r->remote_port = skc->skc_dport;
	if (r->family == AF_INET6) {
		r->local[0] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[0];
		r->local[1] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[1];
		r->local[2] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[2];
		r->local[3] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[3];
		r->remote[0] = skc->skc_v6_daddr.in6_u.u6_addr32[0];
		r->remote[1] = skc->skc_v6_daddr.in6_u.u6_addr32[1];
		r->remote[2] = skc->skc_v6_daddr.in6_u.u6_addr32[2];
		r->remote[3] = skc->skc_v6_daddr.in6_u.u6_addr32[3];
	} else {
		addr_from_v4(r->local, skc->skc_rcv_saddr);
		addr_from_v4(r->remote, skc->skc_daddr);
	}
}

// Not inlined, which also puts struct sock_record in the object's BTF for the Go loader.
static __noinline void fill_lb(struct sock_record *r, const struct sock_state *state)
{
	if (!state || state->count == 0)
		return;
	r->flags |= REC_F_BALANCED;
	if (state->flags & SOCK_F_CONNECTED)
		r->flags |= REC_F_LB_CONNECTED;
	if (state->flags & SOCK_F_RELEASED)
		r->flags |= REC_F_RELEASED;
	r->lb_count = state->count;
	r->lb = state->entries[0];
}

static __always_inline int lb_has_backend(const struct sock_state *state,
					  const struct list_filter *f)
{
	__u32 i;

	for (i = 0; i < LB_ENTRIES; i++) {
		const struct lb_entry *e = &state->entries[i];

		if (i >= state->count)
			break;
		if (e->backend_port == f->backend_port && addr_equal(e->backend, f->backend))
			return 1;
	}
	return 0;
}

static __always_inline int list_one(struct seq_file *seq, struct sock_common *skc,
				    struct sock *sk, __u8 proto, __u32 uid)
{
	// On the stack: iterator programs can be preempted, so a per-CPU slot could be
	// overwritten by another walker on the same CPU.
	struct sock_record rec, *r = &rec;
	struct sock_state *state = NULL;
	struct list_filter *f;
	__u32 zero = 0;

	if (sk)
		state = bpf_sk_storage_get(&podsock_sock_v1, sk, 0, 0);
	fill_record(r, skc, proto, uid);
	f = bpf_map_lookup_elem(&podsock_list_filter, &zero);
	if (f && (f->flags & FILTER_BACKEND)) {
		int hit = r->remote_port == f->backend_port && addr_equal(r->remote, f->backend);

		if (!hit && state)
			hit = lb_has_backend(state, f);
		if (!hit)
			return 0;
	}
	fill_lb(r, state);
	bpf_seq_write(seq, r, sizeof(*r));
	return 0;
}

// destroy_one destroys a socket whose connected peer is a doomed backend. Unconnected
// UDP sockets are never touched: destroying one would silently change its local port.
static __always_inline int destroy_one(struct sock_common *skc, struct sock *sk, __u8 proto)
{
	struct sock_record rec, *r = &rec;
	struct sock_state *state;
	struct svc_backend_key k = {};
	struct doomed_value *d;
	struct lb_entry *e;

	if (!sk)
		return 0;
	state = bpf_sk_storage_get(&podsock_sock_v1, sk, 0, 0);
	// A socket its application closed has nobody left to tell; an in-kernel client
	// manages its own transport.
	if (!state || !(state->flags & SOCK_F_CONNECTED) ||
	    (state->flags & (SOCK_F_RELEASED | SOCK_F_KERNEL)) || state->proto != proto)
		return 0;
	e = &state->entries[0];
	__builtin_memcpy(k.vip, e->vip, sizeof(k.vip));
	__builtin_memcpy(k.backend, e->backend, sizeof(k.backend));
	k.vip_port = e->vip_port;
	k.backend_port = e->backend_port;
	k.proto = proto;
	d = bpf_map_lookup_elem(&podsock_doomed, &k);
	// Only choices the service made before the revision that dropped the backend: a
	// backend added back since serves its new sockets undisturbed. Revisions wrap.
	if (!d || e->svc_id != d->svc_id || (__s32)(e->svc_rev - d->first_rev_without) >= 0)
		return 0;
	fill_record(r, skc, proto, 0);
	// The kernel's peer must be that backend too: a socket the application re-connected
	// behind socket-LB's back is not ours to end.
	if (r->remote_port != e->backend_port || !addr_equal(r->remote, e->backend))
		return 0;
	if (proto == IPPROTO_UDP && r->state != TCP_ESTABLISHED)
		return 0;
	counter_add(&podsock_destroy_count, bpf_sock_destroy(skc) ? DESTROY_FAILED : DESTROYED);
	return 0;
}

static __always_inline struct sock *tcp_full_sock(struct sock_common *skc)
{
	// Time-wait and request sockets carry no storage and cannot be destroyed.
	return (struct sock *)bpf_skc_to_tcp_sock(skc);
}

SEC("iter/tcp")
int podsock_list_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;

	if (!skc)
		return 0;
	return list_one(ctx->meta->seq, skc, tcp_full_sock(skc), IPPROTO_TCP, ctx->uid);
}

SEC("iter/udp")
int podsock_list_udp(struct bpf_iter__udp *ctx)
{
	struct udp_sock *udp = ctx->udp_sk;

	if (!udp)
		return 0;
	return list_one(ctx->meta->seq, &udp->inet.sk.__sk_common, (struct sock *)udp, IPPROTO_UDP,
			ctx->uid);
}

SEC("iter/tcp")
int podsock_destroy_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;

	if (!skc)
		return 0;
	return destroy_one(skc, tcp_full_sock(skc), IPPROTO_TCP);
}

SEC("iter/udp")
int podsock_destroy_udp(struct bpf_iter__udp *ctx)
{
	struct udp_sock *udp = ctx->udp_sk;

	if (!udp)
		return 0;
	return destroy_one((struct sock_common *)udp, (struct sock *)udp, IPPROTO_UDP);
}

// Connected sockets balanced before their counts existed (by an agent older than the
// counts, or before the count map was recreated) would be invisible to targeted
// termination. The loader runs a backfill once, when it finds socket state but no count
// map, and counts them. Sockets their application already closed (still lingering in
// FIN_WAIT or LAST_ACK) are not counted: nothing would ever uncount them. A socket
// connecting at that very moment may be counted twice; the surplus only makes later passes
// enter its netns needlessly.
static __always_inline void backfill_one(struct sock *sk, struct sock_state *state)
{
	if (!(state->flags & SOCK_F_CONNECTED) ||
	    (state->flags & (SOCK_F_UNTRACKED | SOCK_F_RELEASED | SOCK_F_KERNEL)))
		return;
	if ((state->flags & SOCK_F_TRACKED) && sock_epoch(state) == count_epoch_now)
		return;
	// Marked the way socklb marks them now, for sockets an older agent balanced: one its
	// application closed (no struct socket left) and an in-kernel one are never counted.
	if (!sk->sk_socket) {
		state->flags |= SOCK_F_RELEASED;
		return;
	}
	if (BPF_CORE_READ_BITFIELD(sk, sk_kern_sock)) {
		state->flags |= SOCK_F_KERNEL;
		return;
	}
	if (count_socket(&podsock_svcnetns_v2, state, sk->__sk_common.skc_net.net->net_cookie))
		counter_add(&podsock_destroy_count, BACKFILLED);
}

// The fast way: every socket's LB state, in every netns at once. Some kernels refuse
// map-element iterators (EPERM before verification); the loader then uses the two below.
SEC("iter/bpf_sk_storage_map")
int podsock_backfill_counts(struct bpf_iter__bpf_sk_storage_map *ctx)
{
	struct sock_state *state = ctx->value;
	struct sock *sk = ctx->sk;

	if (sk && state)
		backfill_one(sk, state);
	return 0;
}

// The same, one netns at a time, for kernels without the map-element iterator.
static __always_inline int backfill_sk(struct sock *sk)
{
	struct sock_state *state;

	if (!sk)
		return 0;
	state = bpf_sk_storage_get(&podsock_sock_v1, sk, 0, 0);
	if (state)
		backfill_one(sk, state);
	return 0;
}

SEC("iter/tcp")
int podsock_backfill_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;

	return skc ? backfill_sk(tcp_full_sock(skc)) : 0;
}

SEC("iter/udp")
int podsock_backfill_udp(struct bpf_iter__udp *ctx)
{
	return backfill_sk((struct sock *)ctx->udp_sk);
}

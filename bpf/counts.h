// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
// Counting shared by the socket-LB programs and the iterators: plain counters, and the
// connected sockets per {service, netns} and backend bucket that socklb.c keeps at
// connect() and sockiter.c backfills for sockets balanced before those counts existed.
#ifndef PODSOCK_COUNTS_H
#define PODSOCK_COUNTS_H

#ifndef EEXIST
#define EEXIST 17
#endif

// counter_add adds one to entry idx of an array of __u64 counters. Atomically, even in a
// per-CPU array: a preempted program can share its CPU with another.
static __always_inline void counter_add(void *counters, __u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(counters, &idx);

	if (v)
		__sync_fetch_and_add(v, 1);
}

// svc_netns_key is the count a connected socket belongs to: its peer's service.
static __always_inline void svc_netns_key(struct svc_netns_key *k, const struct sock_state *state,
					  __u64 netns)
{
	const struct lb_entry *e = &state->entries[0];

	__builtin_memset(k, 0, sizeof(*k));
	addr_copy(k->svc.addr, e->vip);
	k->svc.port = e->vip_port;
	k->svc.proto = state->proto;
	k->netns_cookie = netns;
}

// backend_bucket spreads backends over the buckets of a count. The Go side computes the
// same (datapath.backendBucket) on the same words, in network byte order.
static __always_inline __u32 backend_bucket(const struct lb_entry *e)
{
	__u32 h = e->backend[0] ^ e->backend[1] ^ e->backend[2] ^ e->backend[3] ^ e->backend_port;

	return ((h * 0x9e3779b1u) >> 28) & (COUNT_BUCKETS - 1);
}

// The count epoch these programs count in, set by the loader: a constant of each loaded
// program, not a setting programs share, so the previous agent's programs, still attached
// while the new ones load, keep counting in their own epoch.
const volatile __u32 count_epoch_now = 0;

static __always_inline __u32 sock_epoch(const struct sock_state *state)
{
	return (state->flags & SOCK_F_EPOCH_MASK) >> SOCK_F_EPOCH_SHIFT;
}

// count_socket adds the connected socket to its count in the map counts and marks it
// tracked in this program's epoch; it returns whether the count was taken (not when the
// map is full).
static __always_inline int count_socket(void *counts, struct sock_state *state, __u64 netns)
{
	struct svc_netns_counts zero = {}, *n;
	struct svc_netns_key k;
	long err;

	svc_netns_key(&k, state, netns);
	n = bpf_map_lookup_elem(counts, &k);
	if (!n) {
		err = bpf_map_update_elem(counts, &k, &zero, BPF_NOEXIST);
		// Another socket may have created the entry first: add to it either way.
		if (!err || err == -EEXIST)
			n = bpf_map_lookup_elem(counts, &k);
	}
	if (!n)
		return 0;
	__sync_fetch_and_add(&n->n[backend_bucket(&state->entries[0])], 1);
	state->flags = (state->flags & ~SOCK_F_EPOCH_MASK) | SOCK_F_TRACKED |
		       ((count_epoch_now << SOCK_F_EPOCH_SHIFT) & SOCK_F_EPOCH_MASK);
	return 1;
}

#endif

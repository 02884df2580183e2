// Counting shared by the socket-LB programs and the iterators: plain counters, and the
// connected sockets per {service, backend, netns} that socklb.c keeps at connect() and
// sockiter.c backfills for sockets balanced before those counts existed.
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

// pair_netns_key is the count a connected socket belongs to: its peer's translation.
static __always_inline void pair_netns_key(struct svc_backend_netns_key *k,
					   const struct sock_state *state, __u64 netns)
{
	const struct lb_entry *e = &state->entries[0];

	__builtin_memset(k, 0, sizeof(*k));
	addr_copy(k->pair.vip, e->vip);
	addr_copy(k->pair.backend, e->backend);
	k->pair.vip_port = e->vip_port;
	k->pair.backend_port = e->backend_port;
	k->pair.proto = state->proto;
	k->netns_cookie = netns;
}

// pair_count_add adds one to k's entry in the count map pairs, creating the entry if
// need be. It returns whether the count was taken (not when the map is full).
static __always_inline int pair_count_add(void *pairs, const struct svc_backend_netns_key *k)
{
	__s64 one = 1, *n = bpf_map_lookup_elem(pairs, k);
	long err;

	if (!n) {
		err = bpf_map_update_elem(pairs, k, &one, BPF_NOEXIST);
		if (!err)
			return 1;
		// Another socket created the entry first: add to it.
		if (err == -EEXIST)
			n = bpf_map_lookup_elem(pairs, k);
	}
	if (!n)
		return 0;
	__sync_fetch_and_add(n, 1);
	return 1;
}

#endif

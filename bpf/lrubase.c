//go:build ignore
// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause

// A baseline for the bench only, never loaded by the agent: unconnected UDP reverse NAT
// kept the way Cilium's socket LB keeps it, in one LRU hash shared by every socket, keyed
// by {socket cookie, backend address, backend port}. podsock keeps the same translations in
// each socket's own storage instead. Under enough sockets with replies in flight the LRU
// evicts translations that are still needed, and the application then sees a reply from
// the backend rather than from the VIP it sent to; the bench counts those replies.
//
// IPv4 only: the comparison needs one family. Cilium also checks, on a reply, that the
// service still exists; the bench's services never change, so that check is left out.

#include "vmlinux.h"
#include "bpf_helpers.h"
#include "bpf_endian.h"

char __license[] SEC("license") = "Dual BSD/GPL";

#define SYS_PROCEED 1

// Addresses and ports in network byte order, as the sock_addr context holds them.
struct lru_addr {
	__u32 addr;
	__u16 port;
	__u16 pad;
};

struct lru_revnat_key {
	__u64 cookie;
	__u32 addr;
	__u16 port;
	__u16 pad;
};

// VIP:port to its one backend. The bench's services have a single backend each: the
// comparison is about remembering a choice, not making it.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct lru_addr);
	__type(value, struct lru_addr);
} lrubase_svc SEC(".maps");

// The loader sets max_entries: the size under test.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct lru_revnat_key);
	__type(value, struct lru_addr);
} lrubase_revnat SEC(".maps");

SEC("cgroup/sendmsg4")
int lrubase_sendmsg4(struct bpf_sock_addr *ctx)
{
	struct lru_addr vip = {}, *be, *cur;
	struct lru_revnat_key key = {};

	if (ctx->protocol != IPPROTO_UDP)
		return SYS_PROCEED;
	vip.addr = ctx->user_ip4;
	vip.port = (__u16)ctx->user_port;
	be = bpf_map_lookup_elem(&lrubase_svc, &vip);
	if (!be)
		return SYS_PROCEED;
	key.cookie = bpf_get_socket_cookie(ctx);
	key.addr = be->addr;
	key.port = be->port;
	ctx->user_ip4 = be->addr;
	ctx->user_port = (__u32)be->port;
	// Look before writing, as Cilium does: an unchanged translation is not rewritten, and
	// the lookup marks the entry recently used, which is what keeps it from eviction.
	cur = bpf_map_lookup_elem(&lrubase_revnat, &key);
	if (cur && cur->addr == vip.addr && cur->port == vip.port)
		return SYS_PROCEED;
	bpf_map_update_elem(&lrubase_revnat, &key, &vip, BPF_ANY);
	return SYS_PROCEED;
}

// A miss leaves the backend's address in the reply's source: the wrong source the bench
// counts.
SEC("cgroup/recvmsg4")
int lrubase_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct lru_revnat_key key = {};
	struct lru_addr *vip;

	key.cookie = bpf_get_socket_cookie(ctx);
	key.addr = ctx->user_ip4;
	key.port = (__u16)ctx->user_port;
	vip = bpf_map_lookup_elem(&lrubase_revnat, &key);
	if (!vip)
		return SYS_PROCEED;
	ctx->user_ip4 = vip->addr;
	ctx->user_port = (__u32)vip->port;
	return SYS_PROCEED;
}

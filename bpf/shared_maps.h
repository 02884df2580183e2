// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
// The maps both BPF objects use, declared once. socklb.o creates and pins them; the
// loader hands socklb's maps to sockiter.o, so both see the same ones.
#ifndef PODSOCK_SHARED_MAPS_H
#define PODSOCK_SHARED_MAPS_H

// Each socket's LB state, attached to the socket itself.
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podsock_sock_v1 SEC(".maps");

// Connected sockets per {service, netns}, by backend bucket. Counts go up at a balanced
// connect() and down when the socket is released or re-connected. An entry at zero stays
// until userspace drops it: when its netns is gone (or is one podsock cannot enter anyway),
// or when its service has been gone for a whole prune interval, so that a delete does not
// race the increment of a socket podsock could terminate.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PODSOCK_MAX_SVC_NETNS);
	__type(key, struct svc_netns_key);
	__type(value, struct svc_netns_counts);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} podsock_svcnetns_v2 SEC(".maps");

#endif

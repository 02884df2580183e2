// Types shared by the socket-LB programs and the Go loader (which gets them through BTF).
// Changing a layout means a new map name (…_v2): an SK_STORAGE map that is recreated loses
// every socket's state.
#ifndef PODSOCK_SOCKLB_H
#define PODSOCK_SOCKLB_H

#define PODSOCK_MAX_SERVICES 262144
#define PODSOCK_MAX_SLOTS 1048576
#define PODSOCK_NAME_LEN 128
#define LB_ENTRIES 4

// Addresses are IPv6 or IPv4-mapped IPv6 (::ffff:a.b.c.d) in network byte order, so one
// lookup serves AF_INET sockets, AF_INET6 sockets and v4-mapped connects alike.
// Ports are in network byte order.
struct svc_key {
	__u32 addr[4];
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct svc_value {
	__u32 id;
	__u32 rev;        // bumped on every change of the backend set
	__u32 slot_count; // 0: the service has no backends and refuses connects
	__u32 flags;
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

// The socket's whole LB state. entries[0] is the peer of a connected socket; an unconnected
// UDP socket keeps up to LB_ENTRIES recent translations so each reply can be reversed.
struct sock_state {
	struct lb_entry entries[LB_ENTRIES];
	__u8 connected;
	__u8 proto;
	__u8 next;
	__u8 count;
};

enum stat_index {
	STAT_CONNECT,
	STAT_SENDMSG,
	STAT_REVERSE,
	STAT_NO_BACKEND,
	STAT_NO_STORAGE,
	STAT_MAX,
};

#endif

// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
// Address helpers shared by the socket-LB programs and the iterators. Addresses are
// IPv6 or IPv4-mapped IPv6, four words in network byte order (see socklb.h).
#ifndef PODSOCK_ADDR_H
#define PODSOCK_ADDR_H

static __always_inline void addr_from_v4(__u32 *addr, __u32 ip4)
{
	addr[0] = 0;
	addr[1] = 0;
	addr[2] = bpf_htonl(0x0000ffff);
	addr[3] = ip4;
}

static __always_inline int addr_equal(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline void addr_copy(__u32 *dst, const __u32 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

#endif

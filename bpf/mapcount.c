//go:build ignore
// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause

// Map entry counts from the kernel's own per-map element counters (Linux 6.6+), one
// record per BPF map of the host. Counting a hash map from userspace copies every entry
// out; at 100k services that was a fifth of a second of CPU for each `status` and metrics
// snapshot. Kept apart from the other objects: a kernel without the kfunc or the bpf_map
// iterator loses only this, and the agent walks the maps instead.

#include "vmlinux.h"
#include "bpf_helpers.h"

char __license[] SEC("license") = "Dual BSD/GPL";

extern s64 bpf_map_sum_elem_count(const struct bpf_map *map) __ksym;

// One map, as the iterator writes it to the reader. The kernel keeps a count only for
// hash maps; for other types it is 0.
struct map_count {
	__u32 id;
	__u32 _pad;
	__s64 entries;
};

SEC("iter/bpf_map")
int podsock_map_counts(struct bpf_iter__bpf_map *ctx)
{
	struct bpf_map *map = ctx->map;
	if (!map)
		return 0;
	struct map_count rec = {.id = map->id, .entries = bpf_map_sum_elem_count(map)};
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}

#!/usr/bin/env bash
# Regenerates bpf/include: the libbpf headers from the pinned libbpf-dev and a vmlinux.h
# dumped from the running kernel's BTF. Both are committed so a build needs neither.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bpf/include
mkdir -p "$out"
for h in bpf_helpers.h bpf_helper_defs.h bpf_endian.h bpf_core_read.h bpf_tracing.h; do
  install -m 0644 "/usr/include/bpf/$h" "$out/$h"
done
bpftool btf dump file /sys/kernel/btf/vmlinux format c > "$out/vmlinux.h.tmp"
mv "$out/vmlinux.h.tmp" "$out/vmlinux.h"
echo "vendored libbpf headers and vmlinux.h ($(uname -r)) into $out"

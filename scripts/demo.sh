#!/usr/bin/env bash
# `make demo`: podsock balancing a service VIP between two backends, end to end, in a
# network namespace and cgroup of its own. Needs root; installs nothing beyond `make deps`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "demo: run as root (it creates a netns, a cgroup and a bpffs mount, and removes them)" >&2
  exit 1
fi
exec go run ./test/demo -podsock bin/podsock

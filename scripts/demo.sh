#!/usr/bin/env bash
# `make demo`: podsock as the NRI plugin of a private containerd (`make demo RUNTIME=crio`:
# CRI-O), balancing a service VIP between two backend pods for a client pod, then torn down.
# KUBERNETES=1 (`make demo-kubernetes`): the service comes from a private kube-apiserver.
# Needs root; `make deps` installs (pinned) what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "demo: run as root (it runs a private containerd, pods, a bridge and a bpffs mount, and removes them)" >&2
  exit 1
fi
if [[ -n ${KUBERNETES:-} ]]; then
  exec go run ./test/demo -podsock bin/podsock -kubernetes
fi
exec go run ./test/demo -podsock bin/podsock -runtime "${RUNTIME:-containerd}"

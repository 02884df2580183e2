#!/usr/bin/env bash
# Installs the pinned build and test toolchain from Debian. Idempotent: a package already at
# its pinned version is left alone, so `make test` stays fast on a warm machine.
#
# With arguments, only those packages (each must be in PINNED): scripts/install-runtime.sh
# uses that for the container runtime's packages, so there is one pin table and one install
# path.
#
# Debian replaces point releases in place (security updates), so a pinned version can
# disappear from the archive. Then the current candidate is installed with a warning;
# `make generate-check` still proves that the committed BPF objects match what it builds.
set -euo pipefail

declare -A PINNED=(
  [clang-19]="1:19.1.7-3~deb12u1"
  [llvm-19]="1:19.1.7-3~deb12u1"
  [libbpf-dev]="1:1.1.2-0+deb12u1"
  [bpftool]="7.1.0+6.1.192-3"
  [iproute2]="6.1.0-3"
  [iptables]="1.8.9-2"
  # The real-runtime e2e tests (scripts/install-runtime.sh): runc for containerd's shim,
  # the bridge/host-local/loopback CNI plugins in /usr/lib/cni.
  [runc]="1.1.5+ds1-1+deb12u1"
  [containernetworking-plugins]="1.1.1+ds1-3+b5"
  # CRI-O (scripts/install-crio.sh): cgo against libseccomp and gpgme, pinns linked
  # statically with gcc, and Debian's conmon as its container monitor.
  [gcc]="4:12.2.0-3"
  [libc6-dev]="2.36-9+deb12u14"
  [pkgconf]="1.8.1-1"
  [libseccomp-dev]="2.5.4-1+deb12u1"
  [libgpgme-dev]="1.18.0-3+deb12u1"
  [conmon]="2.1.6+ds1-1"
  # The real kube-proxy (scripts/install-kube.sh, test/kubeenv): nftables mode drives the
  # nft binary, and socat relays its netns to the API server on the host's loopback.
  # kube-proxy 1.37 clears conntrack entries over netlink, so no conntrack tool; nsenter
  # comes from util-linux, which is Essential and always there.
  [nftables]="1.0.6-2+deb12u2"
  [socat]="1.7.4.4-2"
  # test/deploy: systemd-analyze verify of deploy/systemd/podsock.service (only verify:
  # PID 1 of these machines is not systemd).
  [systemd]="252.38-1~deb12u1"
)

selected=("$@")
[[ ${#selected[@]} -gt 0 ]] || selected=("${!PINNED[@]}")
missing=()
for pkg in "${selected[@]}"; do
  if [[ -z "${PINNED[$pkg]:-}" ]]; then
    echo "install-deps: $pkg has no pinned version in $0" >&2
    exit 1
  fi
  have=$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || true)
  [[ "$have" == "${PINNED[$pkg]}" ]] || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]]; then
  echo "install-deps: need root to install: ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=120 update -qq

want=()
for pkg in "${missing[@]}"; do
  pin=${PINNED[$pkg]}
  if apt-cache madison "$pkg" | awk -F'|' '{gsub(/ /,"",$2); print $2}' | grep -qxF "$pin"; then
    want+=("$pkg=$pin")
  else
    have=$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || true)
    candidate=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
    if [[ -z "$candidate" || "$candidate" == "(none)" ]]; then
      echo "install-deps: $pkg is not available from the configured Debian archive" >&2
      exit 1
    fi
    echo "install-deps: warning: $pkg $pin is gone from the archive; using $candidate" >&2
    [[ "$have" == "$candidate" ]] || want+=("$pkg=$candidate")
  fi
done
[[ ${#want[@]} -eq 0 ]] && exit 0
echo "install-deps: installing ${want[*]}"
apt-get -o DPkg::Lock::Timeout=120 install -y -qq --no-install-recommends "${want[@]}" >/dev/null

#!/usr/bin/env bash
# Installs the CRI-O the e2e tests can drive instead of containerd (test/cri, runtime
# "crio"): CRI-O v1.34.0 and its test/copyimg (which loads a local OCI archive into CRI-O's
# image storage; no registry is reachable here) built from the pinned tools module
# tools/crio into bin/, pinns linked statically from the same module's pinns/, plus
# Debian's conmon, runc and CNI plugins through install-deps.sh's pin table.
#
# Nothing is installed under /etc: the harness writes CRI-O's configuration (crio.conf,
# storage.conf, registries.conf, policy.json, containers.conf) privately for every run.
#
# Idempotent like install-runtime.sh: the binaries are rebuilt only when the tools module,
# Go or the C compiler change, which a stamp next to them records; a cold build takes about
# two minutes on two cores, a warm run well under 1 s.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
command -v go >/dev/null || export PATH="/usr/local/go/bin:$PATH"

# cgo: CRI-O links libseccomp (seccomp filters) and gpgme's headers are needed by the
# image library even with the openpgp tag; pinns is C.
"$repo/scripts/install-deps.sh" gcc libc6-dev pkgconf libseccomp-dev libgpgme-dev conmon runc containernetworking-plugins

bins=(crio copyimg pinns)
stamp="$repo/bin/.crio-stamp"
want=$( {
  go version
  gcc --version | head -1
  cat "$0" "$repo"/tools/crio/go.mod "$repo"/tools/crio/go.sum
} | sha256sum | cut -d' ' -f1)

# shellcheck source=scripts/stamp.sh
. "$repo/scripts/stamp.sh"
stamp_current "$stamp" "$want" "${bins[@]}" && exit 0

echo "install-crio: building ${bins[*]} into bin/ (about two minutes when cold)"
mkdir -p "$repo/bin"
rm -f "$stamp"
# The build tags CRI-O's own Makefile uses, less the ones that need libraries Debian's
# conmon setup does not (btrfs, ostree) and with the pure-Go openpgp signature backend.
tags="containers_image_ostree_stub exclude_graphdriver_btrfs containers_image_openpgp seccomp"
# -mod=readonly with the committed go.sum: no checksum-database lookups.
export CGO_ENABLED=1 GOFLAGS=-mod=readonly
cd "$repo/tools/crio"
go build -trimpath -tags "$tags" -o "$repo/bin/" \
  github.com/cri-o/cri-o/cmd/crio \
  github.com/cri-o/cri-o/test/copyimg

# pinns pins the pod's namespaces as files (CRI-O requires it); build it as the module's
# pinns/Makefile does, from its sources in the module cache, into a scratch dir.
src=$(go list -m -f '{{.Dir}}' github.com/cri-o/cri-o)/pinns/src
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
gcc -std=c99 -O3 -Wall -Werror -Wextra -static -o "$scratch/pinns" "$src"/*.c
strip -s "$scratch/pinns"
install -m 0755 "$scratch/pinns" "$repo/bin/pinns"
echo "$want" >"$stamp"

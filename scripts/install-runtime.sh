#!/usr/bin/env bash
# Installs the real container runtime the e2e tests drive (test/cri): containerd v2.4.2 with
# its runc shim, ctr and crictl, built from the pinned tools modules into bin/, plus Debian's
# runc and CNI plugins through install-deps.sh's pin table.
#
# Idempotent: the binaries are rebuilt only when the tools modules (or Go) change, which a
# stamp next to them records; a cold build takes a few minutes, a warm run well under 1 s.
#
# crictl lives in its own module (tools/crictl): cri-tools v1.34.0 needs k8s.io/cri-client
# v0.34 and containerd v2.4.2 needs v0.37, whose API differs, so one module graph cannot
# hold both.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
command -v go >/dev/null || export PATH="/usr/local/go/bin:$PATH"

"$repo/scripts/install-deps.sh" runc containernetworking-plugins

bins=(containerd containerd-shim-runc-v2 ctr crictl)
stamp="$repo/bin/.runtime-stamp"
want=$( {
  go version
  cat "$repo"/tools/go.mod "$repo"/tools/go.sum "$repo"/tools/crictl/go.mod "$repo"/tools/crictl/go.sum
} | sha256sum | cut -d' ' -f1)

# shellcheck source=scripts/stamp.sh
. "$repo/scripts/stamp.sh"
stamp_current "$stamp" "$want" "${bins[@]}" && exit 0

echo "install-runtime: building ${bins[*]} into bin/ (a few minutes when cold)"
mkdir -p "$repo/bin"
rm -f "$stamp"
# Static, no cgo: the same binaries whether or not the machine has a C compiler.
# -mod=readonly with the committed go.sum files: no checksum-database lookups, which fail
# for several k8s.io pre-releases cri-tools depends on.
export CGO_ENABLED=0 GOFLAGS=-mod=readonly
(cd "$repo/tools" && go build -trimpath -o "$repo/bin/" \
  github.com/containerd/containerd/v2/cmd/containerd \
  github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
  github.com/containerd/containerd/v2/cmd/ctr)
(cd "$repo/tools/crictl" && go build -trimpath -o "$repo/bin/crictl" sigs.k8s.io/cri-tools/cmd/crictl)
echo "$want" >"$stamp"

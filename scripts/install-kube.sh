#!/usr/bin/env bash
# Installs the real Kubernetes control-plane pieces the tests run against (test/kubeenv):
# kube-apiserver, etcd, kubectl and kube-proxy, built from the pinned module tools/kube into
# bin/. They report the release they were built from (kube-apiserver --version says
# v1.37.2), not v0.0.0-master, so version checks and skew warnings see the real one.
#
# Idempotent: the binaries are rebuilt only when tools/kube, Go or this script changes,
# which a stamp next to them records. A cold build takes 10 to 15 minutes on 2 cores
# (kube-apiserver is most of it); a warm run well under 1 s.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
command -v go >/dev/null || export PATH="/usr/local/go/bin:$PATH"
mod="$repo/tools/kube"

bins=(kube-apiserver etcd kubectl kube-proxy)
mkdir -p "$repo/bin"
# One build at a time (two `make deps` at once would write the same binaries).
exec 9>"$repo/bin/.kube-lock"
flock 9
stamp="$repo/bin/.kube-stamp"
want=$( {
  go version
  cat "$0" "$mod/go.mod" "$mod/go.sum"
  for b in "${bins[@]}"; do cat "$mod/cmd/$b/main.go"; done
} | sha256sum | cut -d' ' -f1)

# shellcheck source=scripts/stamp.sh
source "$repo/scripts/stamp.sh"
if stamp_current "$stamp" "$want" "${bins[@]}"; then
  exit 0
fi

# Static, no cgo; -mod=readonly with the committed go.sum: no checksum-database lookups.
export CGO_ENABLED=0 GOFLAGS=-mod=readonly
cd "$mod"
# The version the binaries report is the one go.mod pins, e.g. v1.37.2: major 1, minor 37.
version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
if [[ ! $version =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]]; then
  echo "install-kube: cannot read a release version of k8s.io/kubernetes from tools/kube/go.mod: '$version'" >&2
  exit 1
fi
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=${BASH_REMATCH[1]}
  -X $pkg.gitMinor=${BASH_REMATCH[2]} -X $pkg.gitTreeState=clean"

echo "install-kube: building ${bins[*]} $version into bin/ (10 to 15 minutes when cold)"
rm -f "$stamp"
pkgs=()
for b in "${bins[@]}"; do pkgs+=("./cmd/$b"); done
go build -trimpath -ldflags "$ldflags" -o "$repo/bin/" "${pkgs[@]}"
echo "$want" >"$stamp"

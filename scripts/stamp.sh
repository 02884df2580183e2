# shellcheck shell=bash
# Sourced by the install scripts. A build is skipped when all its binaries are in bin/ and
# the stamp next to them records the same inputs (a hash of the Go version and the module
# files that pin them).

# stamp_fresh STAMP HASH BIN...: true when every BIN is in $repo/bin and STAMP holds HASH.
stamp_fresh() {
  local stamp=$1 want=$2 b
  shift 2
  for b in "$@"; do
    [[ -x "$repo/bin/$b" ]] || return 1
  done
  [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]
}

# Sourced by the install scripts: a build into bin/ is redone only when what it was built
# from changes. The stamp holds the sha256 of that input.

# stamp_current STAMP WANT BIN...: true when every BIN is in bin/ and STAMP holds WANT.
stamp_current() {
  local stamp=$1 want=$2 b
  shift 2
  for b in "$@"; do
    [[ -x "$repo/bin/$b" ]] || return 1
  done
  [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]
}

# Shared by the scripts that build one Go tool pinned by tests/<tool>/go.mod + go.sum
# (build-toxiproxy.sh, build-prometheus.sh). Source it, then:
#
#   go_tool_cached NAME MODULE MOD_DIR BINARY
#     sets VERSION (MODULE's version in go.mod) and DEST (the cache directory, keyed by
#     that version and the hash of the pins, so bumping either rebuilds and nothing else
#     does), and ends the script when BINARY is already built there (printing DEST) or
#     when METAL_AGENT_NO_BUILD asks for a lookup only (exit 3 on a miss);
#
#   go_tool_build MOD_DIR BINARY PACKAGE [go build flags...]
#     builds PACKAGE through the Go module proxy into DEST, atomically, and prints DEST.

go_tool_cached() {
  local name=$1 module=$2 mod_dir=$3 binary=$4
  local key
  key="$(cat "$mod_dir/go.mod" "$mod_dir/go.sum" | sha256sum | cut -c1-16)"
  VERSION="$(awk -v m="$module" '{ for (i = 1; i < NF; i++) if ($i == m) { print $(i + 1); exit } }' "$mod_dir/go.mod")"
  DEST="${METAL_AGENT_CACHE:-$HOME/.cache/metal-agent}/$name-$VERSION-$key"
  if [[ -x "$DEST/$binary" ]]; then
    echo "$DEST"
    exit 0
  fi
  if [[ -n "${METAL_AGENT_NO_BUILD:-}" ]]; then
    echo "not built yet: run $0 (or make dev)" >&2
    exit 3
  fi
}

go_tool_build() {
  local mod_dir=$1 binary=$2 package=$3
  shift 3
  rm -rf "$DEST.tmp"
  mkdir -p "$DEST.tmp"
  (cd "$mod_dir" && CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly" \
     go build -trimpath "$@" -o "$DEST.tmp/$binary" "$package")
  rm -rf "$DEST"
  mv "$DEST.tmp" "$DEST"
  echo "$DEST"
}

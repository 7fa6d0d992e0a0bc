#!/usr/bin/env bash
# Build llama-swap (mostlygeek/llama-swap, MIT) from the vendored source
# tarball in ../shared/vendor, for the front door's side-by-side benchmark
# (bench/front_door.py) and the test that proves the build proxies a request.
# It is not part of metal-agent: it is the comparable on-demand model swapper
# issue 21 measures the front door against. Its Go modules come from the Go
# module proxy, pinned by the tarball's go.sum; the binary is cached outside
# the repo keyed by the tarball's commit and hash, so only a new tarball
# rebuilds (a cold build is about a minute; the web UI is not built).
#
# Exit 4 when the tarball is absent (a user's clone has no ../shared): the
# bench section and the test that need it skip. With METAL_AGENT_NO_BUILD set
# it only looks up the cache (exit 3 on a miss). Prints the directory holding
# `llama-swap` on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_ROOT="${METAL_AGENT_CACHE:-$HOME/.cache/metal-agent}"
tarball="${LLAMA_SWAP_TARBALL:-$(ls "$here"/../shared/vendor/llama-swap-*.tar.gz 2>/dev/null | head -1 || true)}"

if [[ -z "$tarball" || ! -f "$tarball" ]]; then
  echo "no llama-swap source tarball (../shared/vendor/llama-swap-*.tar.gz): skipping" >&2
  exit 4
fi

commit="$(basename "$tarball" .tar.gz)"; commit="${commit#llama-swap-}"
key="$(sha256sum "$tarball" | cut -c1-16)"
DEST="$CACHE_ROOT/llama-swap-$commit-$key"

if [[ -x "$DEST/llama-swap" ]]; then
  echo "$DEST"
  exit 0
fi

if [[ -n "${METAL_AGENT_NO_BUILD:-}" ]]; then
  echo "llama-swap not built yet: run $0 (or make dev)" >&2
  exit 3
fi

src="$DEST.src"
rm -rf "$src" "$DEST.tmp"
mkdir -p "$src" "$DEST.tmp"
tar -xzf "$tarball" -C "$src"
echo ">> building llama-swap $commit" >&2
(cd "$src" && CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly" \
   go build -trimpath -ldflags="-s -w" -o "$DEST.tmp/llama-swap" .)
cp "$src/LICENSE.md" "$DEST.tmp/LICENSE.md"
rm -rf "$src" "$DEST"
mv "$DEST.tmp" "$DEST"
echo "$DEST"

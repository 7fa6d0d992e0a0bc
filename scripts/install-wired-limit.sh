#!/usr/bin/env bash
# Install a root LaunchDaemon that sets the GPU's wired-memory ceiling at every boot:
#   /Library/LaunchDaemons/com.llmkube.wired-limit.plist  (mode 0644, owner root:wheel)
# whose only job is `/usr/sbin/sysctl iogpu.wired_limit_mb=N`, and apply it now.
# `metal-agent doctor` suggests N for this Mac's RAM.
#
# Usage: scripts/install-wired-limit.sh --limit-mb N     (or WIRED_LIMIT_MB=N)
# Environment: METAL_AGENT (the metal-agent that renders the plist; default:
# the repo's venv). Tests only: LAUNCH_DAEMONS_DIR, LAUNCHCTL, SYSCTL (a
# directory and stand-ins), which also allow running off macOS.
#
# The plist comes from `metal-agent render-wired-limit` (one fixed argv, N
# validated there: digits only, at least 1024, at most this Mac's RAM); this
# script never builds a command line from N. The plist is checked with plutil
# (on macOS), staged under a name launchd ignores, then renamed into place.
set -euo pipefail

usage() { sed -n '2,15s/^# \{0,1\}//p' "$0" >&2; exit 2; }

limit="${WIRED_LIMIT_MB:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --limit-mb) [[ $# -ge 2 ]] || usage; limit="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[[ -n "$limit" ]] || { echo "give the ceiling: make install-wired-limit WIRED_LIMIT_MB=N (metal-agent doctor suggests N)" >&2; exit 2; }

daemons_dir="${LAUNCH_DAEMONS_DIR:-/Library/LaunchDaemons}"
launchctl="${LAUNCHCTL:-/bin/launchctl}"
sysctl="${SYSCTL:-/usr/sbin/sysctl}"
prefix_mode=0
[[ "$daemons_dir" == /Library/LaunchDaemons ]] || prefix_mode=1
if [[ "$(uname -s)" != Darwin && $prefix_mode -eq 0 ]]; then
  echo "iogpu.wired_limit_mb exists only on macOS (Apple silicon)" >&2
  exit 2
fi


# Prefix mode (tests): the directory is the caller's own, no root needed.
run_root() { if [[ "$(id -u)" -eq 0 || $prefix_mode -eq 1 ]]; then "$@"; else sudo -- "$@"; fi; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
metal_agent="${METAL_AGENT:-}"
if [[ -z "$metal_agent" ]]; then
  if [[ -x "$repo/.venv/bin/metal-agent" ]]; then metal_agent="$repo/.venv/bin/metal-agent"
  elif command -v metal-agent >/dev/null 2>&1; then metal_agent="$(command -v metal-agent)"
  else echo "metal-agent is not installed (run make dev, or set METAL_AGENT)" >&2; exit 1
  fi
fi

label=com.llmkube.wired-limit
target="$daemons_dir/$label.plist"
staged="$daemons_dir/.$label.plist.new"
ram="$("$sysctl" -n hw.memsize)"
[[ "$ram" =~ ^[0-9]+$ ]] || { echo "cannot read this Mac's RAM (sysctl -n hw.memsize said: $ram)" >&2; exit 1; }
"$sysctl" -n iogpu.wired_limit_mb >/dev/null 2>&1 || { echo "this Mac has no iogpu.wired_limit_mb (Intel, or macOS before 14)" >&2; exit 1; }

rendered="$(mktemp "${TMPDIR:-/tmp}/$label.XXXXXX")"
trap 'rm -f "$rendered"' EXIT
# Renders unprivileged; refuses anything but a sane whole number of MB (exit 2).
"$metal_agent" render-wired-limit --limit-mb "$limit" --ram-bytes "$ram" >"$rendered"
if [[ -x /usr/bin/plutil ]]; then /usr/bin/plutil -lint "$rendered" >/dev/null; fi

run_root mkdir -p "$daemons_dir"
if [[ $prefix_mode -eq 0 ]]; then
  run_root install -m 0644 -o root -g wheel "$rendered" "$staged"
else
  run_root install -m 0644 "$rendered" "$staged"
fi
run_root mv -f "$staged" "$target"
# Replace a previous version: launchd keeps what it loaded until booted out.
run_root "$launchctl" bootout "system/$label" >/dev/null 2>&1 || true
run_root "$launchctl" bootstrap system "$target"
echo "installed $target: runs /usr/sbin/sysctl $(grep -o 'iogpu.wired_limit_mb=[0-9]*' "$rendered") at every boot"
echo "iogpu.wired_limit_mb is now $("$sysctl" -n iogpu.wired_limit_mb)"

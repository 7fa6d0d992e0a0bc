#!/usr/bin/env bash
# Install the sudoers grant that lets the agent's user run its one
# powermetrics command as root without a password:
#   /etc/sudoers.d/llmkube-powermetrics  (mode 0440, owner root)
# The grant pins the whole command, interval and sample count (-n) included;
# re-run this after upgrading metal-agent when `metal-agent doctor` says the
# grant is stale (replacing the file is idempotent).
#
# Usage: scripts/install-powermetrics-sudo.sh [--user NAME] [--interval-ms N]
#   --user         who the agent runs as. Default: $SUDO_USER when run through
#                  sudo, else the current user. Never root.
#   --interval-ms  default $INTERVAL_MS or 1000; must equal the agent's
#                  power interval, because the grant pins that exact number.
# Environment: SUDOERS_DIR (default /etc/sudoers.d), METAL_AGENT (the
# metal-agent command that renders the fragment; default: the repo's venv).
#
# The text comes from `metal-agent render-sudoers` (the one source of truth,
# shared with the sampler's argv). Why the care below: a sudoers.d file with
# a syntax error or wrong owner breaks sudo for everyone on the machine, so
# the file is checked with visudo twice (rendered copy, then installed copy
# with its final owner and mode) under a name sudo ignores (it contains a
# '.'), and only then renamed into place atomically.
set -euo pipefail

usage() { sed -n '2,16s/^# \{0,1\}//p' "$0" >&2; exit 2; }

user=""
interval="${INTERVAL_MS:-1000}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --user) [[ $# -ge 2 ]] || usage; user="$2"; shift 2 ;;
    --interval-ms) [[ $# -ge 2 ]] || usage; interval="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done

if [[ -z "$user" ]]; then
  if [[ "$(id -u)" -eq 0 && -n "${SUDO_USER:-}" ]]; then user="$SUDO_USER"; else user="$(id -un)"; fi
fi
if [[ "$user" == root ]]; then
  echo "refusing to install a grant for root: run this as the user the agent runs as, or pass --user NAME" >&2
  exit 2
fi

run_root() { if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo -- "$@"; fi; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
metal_agent="${METAL_AGENT:-}"
if [[ -z "$metal_agent" ]]; then
  if [[ -x "$repo/.venv/bin/metal-agent" ]]; then metal_agent="$repo/.venv/bin/metal-agent"
  elif command -v metal-agent >/dev/null 2>&1; then metal_agent="$(command -v metal-agent)"
  else echo "metal-agent is not installed (run make dev, or set METAL_AGENT)" >&2; exit 1
  fi
fi

sudoers_dir="${SUDOERS_DIR:-/etc/sudoers.d}"
target="$sudoers_dir/llmkube-powermetrics"
staged="$sudoers_dir/.llmkube-powermetrics.new"
if [[ "$(uname -s)" == Darwin ]]; then group=wheel; else group=root; fi
visudo=/usr/sbin/visudo

rendered="$(mktemp "${TMPDIR:-/tmp}/llmkube-powermetrics.XXXXXX")"
trap 'rm -f "$rendered"' EXIT

# Renders unprivileged; refuses bad user names and intervals (exit 2).
"$metal_agent" render-sudoers --user "$user" --interval-ms "$interval" >"$rendered"
if ! id -- "$user" >/dev/null 2>&1; then
  echo "no such user: $user" >&2
  exit 2
fi

run_root "$visudo" -cf "$rendered"
run_root mkdir -p "$sudoers_dir"
run_root install -m 0440 -o root -g "$group" "$rendered" "$staged"
if ! run_root "$visudo" -cf "$staged"; then
  run_root rm -f "$staged"
  echo "visudo rejected the installed copy; nothing changed" >&2
  exit 1
fi
run_root mv -f "$staged" "$target"
echo "installed $target for $user: $(sed -n 's/^Cmnd_Alias LLMKUBE_POWERMETRICS = //p' "$rendered" | sed 's/\\,/,/g')"

if [[ "$sudoers_dir" != /etc/sudoers.d ]]; then
  echo "note: $sudoers_dir is not /etc/sudoers.d, so sudo does not read it; not checking the grant"
  exit 0
fi

# Ask sudo itself, for exactly the rendered command, whether the grant holds.
command_line="$(sed -n 's/^Cmnd_Alias LLMKUBE_POWERMETRICS = //p' "$rendered" | sed 's/\\,/,/g')"
read -r -a command_argv <<<"$command_line"
if granted="$(run_root /usr/bin/sudo -n -l -U "$user" "${command_argv[@]}")"; then
  echo "sudo -l: $user may run as root without a password: $granted"
else
  echo "installed, but sudo does not grant '$command_line' to $user: does /etc/sudoers include /etc/sudoers.d?" >&2
  exit 1
fi

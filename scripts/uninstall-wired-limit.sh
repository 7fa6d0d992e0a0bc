#!/usr/bin/env bash
# Remove the LaunchDaemon install-wired-limit.sh installed (and a staged copy an
# interrupted install may have left). The ceiling it set stays until the next
# boot; `sudo /usr/sbin/sysctl iogpu.wired_limit_mb=0` returns to macOS's default now.
#
# Environment (tests only): LAUNCH_DAEMONS_DIR, LAUNCHCTL.
set -euo pipefail


daemons_dir="${LAUNCH_DAEMONS_DIR:-/Library/LaunchDaemons}"
launchctl="${LAUNCHCTL:-/bin/launchctl}"
# Prefix mode (tests): the directory is the caller's own, no root needed.
run_root() { if [[ "$(id -u)" -eq 0 || "$daemons_dir" != /Library/LaunchDaemons ]]; then "$@"; else sudo -- "$@"; fi; }
label=com.llmkube.wired-limit
target="$daemons_dir/$label.plist"
staged="$daemons_dir/.$label.plist.new"

run_root "$launchctl" bootout "system/$label" >/dev/null 2>&1 || true
if [[ -e "$target" || -e "$staged" ]]; then
  run_root rm -f -- "$target" "$staged"
  echo "removed $target; the ceiling it set stays until reboot (sudo /usr/sbin/sysctl iogpu.wired_limit_mb=0 resets it now)"
else
  echo "nothing to remove: $target does not exist"
fi

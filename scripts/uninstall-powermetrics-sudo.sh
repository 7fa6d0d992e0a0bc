#!/usr/bin/env bash
# Remove the powermetrics sudoers grant installed by
# install-powermetrics-sudo.sh (and a staged copy an interrupted install may
# have left). The agent keeps running without it; its power gauges read 0,
# which InferCost treats as "sampler off".
#
# Environment: SUDOERS_DIR (default /etc/sudoers.d).
set -euo pipefail

run_root() { if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo -- "$@"; fi; }

sudoers_dir="${SUDOERS_DIR:-/etc/sudoers.d}"
target="$sudoers_dir/llmkube-powermetrics"
staged="$sudoers_dir/.llmkube-powermetrics.new"

if [[ -e "$target" || -e "$staged" ]]; then
  run_root rm -f -- "$target" "$staged"
  echo "removed $target"
else
  echo "nothing to remove: $target does not exist"
fi

#!/usr/bin/env bash
# Install metal-agent as a LaunchAgent (com.llmkube.metal-agent) for this user:
#   venv       ~/Library/Application Support/metal-agent/venv  (this checkout, pip-installed)
#   plist      ~/Library/LaunchAgents/com.llmkube.metal-agent.plist
#   logs       ~/Library/Logs/metal-agent/agent.log (+ one log per llama-server)
# then loads it (launchctl bootstrap) and restarts it (launchctl kickstart -k),
# so running this again upgrades a running agent to this checkout's code.
#
# Usage: scripts/install-metal-agent.sh [-- RUN_ARG...]
#   RUN_ARGs are appended to `metal-agent run` in the plist, e.g. -- --threads 8
# Environment:
#   METAL_AGENT_KUBECONFIG    kubeconfig the agent uses (default: ~/.kube/config)
#   METAL_AGENT_NAMESPACES    namespaces to watch, comma-separated (default: all)
#   METAL_AGENT_LLAMA_SERVER  llama-server binary (default: the agent finds Homebrew's)
#   PYTHON                    Python >= 3.11 for the venv (default: python3)
#   METAL_AGENT_VENV          use this existing venv (with metal-agent installed)
#                             instead of building one; uninstall leaves it alone
# Dry-run / prefix mode (tests, CI, trying it on Linux):
#   METAL_AGENT_INSTALL_ROOT  stands in for $HOME: every path above lives under it
#   LAUNCHCTL                 the launchctl to run (default /bin/launchctl)
#   Off macOS both must be set. Nothing is installed outside the root.
set -euo pipefail

usage() { sed -n '2,24s/^# \{0,1\}//p' "$0" >&2; exit 2; }

run_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --) shift; run_args=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1 (arguments for the agent go after --)" >&2; usage ;;
  esac
done

action=install
# shellcheck source=lib/launchagent-env.sh
source "$(dirname "$0")/lib/launchagent-env.sh"
repo="$(cd "$(dirname "$0")/.." && pwd)"
service="gui/$uid/$label"
state_dir="$home/Library/Application Support/metal-agent"
log_dir="$home/Library/Logs/metal-agent"
agents_dir="$home/Library/LaunchAgents"
plist="$agents_dir/$label.plist"

# 1. The code: a venv of its own, so Homebrew or system Python upgrades cannot break the agent.
if [[ -n "${METAL_AGENT_VENV:-}" ]]; then
  venv="$METAL_AGENT_VENV"
else
  venv="$state_dir/venv"
  python="${PYTHON:-python3}"
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "$python is missing or older than 3.11 (macOS's own python3 is 3.9): brew install python@3.12, or set PYTHON" >&2
    exit 1
  fi
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # Not editable: the agent runs a copy, so editing or switching branches in
  # this checkout changes nothing until the next install.
  "$venv/bin/python" -m pip install --quiet --upgrade "$repo"
fi
agent="$venv/bin/metal-agent"
if [[ ! -x "$agent" ]]; then
  echo "no metal-agent in $venv (pip install it there, or unset METAL_AGENT_VENV)" >&2
  exit 1
fi

# 2. The job definition, rendered by the agent itself (metal_agent/launchd.py).
mkdir -p "$log_dir" "$state_dir" "$agents_dir"  # launchd opens the log and chdirs before exec
render=("$agent" render-plist --agent-path "$agent" --log-dir "$log_dir" --state-dir "$state_dir")
if [[ -n "${METAL_AGENT_KUBECONFIG:-}" ]]; then render+=(--kubeconfig "$METAL_AGENT_KUBECONFIG"); fi
if [[ -n "${METAL_AGENT_LLAMA_SERVER:-}" ]]; then render+=(--llama-server "$METAL_AGENT_LLAMA_SERVER"); fi
# ${a[@]+"${a[@]}"}: macOS's bash 3.2 calls an empty array unbound under set -u.
IFS=, read -r -a namespaces <<<"${METAL_AGENT_NAMESPACES:-}"
for ns in ${namespaces[@]+"${namespaces[@]}"}; do
  if [[ -n "$ns" ]]; then render+=(--namespace "$ns"); fi
done
for arg in ${run_args[@]+"${run_args[@]}"}; do
  render+=("--extra-arg=$arg")
done
staged="$(mktemp "$agents_dir/.$label.XXXXXX")"
trap 'rm -f "$staged"' EXIT
"${render[@]}" --output "$staged"

# 3. Load it. `print` tells whether launchd already has the job: bootstrapping
# a loaded job fails ("Bootstrap failed: 5: Input/output error"), and a loaded
# job keeps its old definition until booted out, so a changed plist needs
# bootout + bootstrap while an unchanged one only needs the restart below.
loaded=0
if "$launchctl" print "$service" >/dev/null 2>&1; then loaded=1; fi
changed=1
if cmp -s "$staged" "$plist"; then changed=0; fi
mv -f "$staged" "$plist"
if [[ $loaded -eq 1 && $changed -eq 1 ]]; then
  echo "job definition changed: unloading the old one (llama-servers keep running and are adopted)"
  "$launchctl" bootout "$service" || true
  loaded=0
fi
if [[ $loaded -eq 0 ]]; then
  tries=0
  until "$launchctl" bootstrap "gui/$uid" "$plist"; do
    # A just-booted-out job can take a moment to go; a job loaded meanwhile is fine.
    if "$launchctl" print "$service" >/dev/null 2>&1; then break; fi
    tries=$((tries + 1))
    if [[ $tries -ge 10 ]]; then
      echo "launchctl bootstrap gui/$uid $plist keeps failing; see: log show --last 5m --predicate 'process == \"launchd\"'" >&2
      exit 1
    fi
    sleep 1
  done
fi
# 4. Restart, so the agent now running is this install's code and flags.
"$launchctl" kickstart -k "$service"

cat <<EOF
metal-agent is installed and running as $service
  status:  $agent status        (or: launchctl print $service)
  checks:  $agent doctor
  logs:    tail -f "$log_dir/agent.log"
           $agent logs NAMESPACE/NAME -f
  remove:  make uninstall-metal-agent   (STOP_MODELS=1 also stops the llama-servers)
EOF

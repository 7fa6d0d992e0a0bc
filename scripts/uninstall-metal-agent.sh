#!/usr/bin/env bash
# Remove the metal-agent LaunchAgent installed by install-metal-agent.sh:
# unload it (launchctl bootout), delete its plist and its venv. A LaunchDaemon
# (install MODE=daemon) is unloaded and deleted too, through sudo.
#
# llama-servers keep running by default (as on any agent restart), and the
# process records and logs stay, so a later install adopts them without
# reloading any model. STOP_MODELS=1 stops them too, via `metal-agent
# stop-all`, which signals only processes it can prove the agent started.
#
# In a fleet (`run --fleet`) the Mac is drained first: every replica it
# serves starts on another Mac before it stops here (`metal-agent drain`);
# if no other Mac can take one, nothing is uninstalled (DRAIN=0 skips it:
# the other Macs then take over once this Mac's lease expires).
#
# Environment: STOP_MODELS=1; DRAIN=0; METAL_AGENT_LISTEN (the agent's
# --listen, for the drain); METAL_AGENT_VENV (the venv an install was told
# to use: used for drain and stop-all, never deleted); METAL_AGENT_INSTALL_ROOT,
# LAUNCHCTL and SUDO as for install-metal-agent.sh (the first two required
# off macOS).
set -euo pipefail

case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,20s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
  *) echo "unknown argument: $1" >&2; exit 2 ;;
esac

action=uninstall
# shellcheck source=lib/launchagent-env.sh
source "$(dirname "$0")/lib/launchagent-env.sh"
service="gui/$uid/$label"
state_dir="$home/Library/Application Support/metal-agent"
log_dir="$home/Library/Logs/metal-agent"
plist="$home/Library/LaunchAgents/$label.plist"
own_venv="$state_dir/venv"
agent="${METAL_AGENT_VENV:-$own_venv}/bin/metal-agent"

stop_models="${STOP_MODELS:-0}"
if [[ "$stop_models" == 1 && ! -x "$agent" ]]; then
  echo "STOP_MODELS=1 needs $agent to find the llama-servers safely; it is missing, so nothing was changed" >&2
  exit 1
fi

# Drain before unloading: the agent is what hands its replicas over.
if [[ "${DRAIN:-1}" == 1 && -x "$agent" ]]; then
  drain_rc=0
  "$agent" drain || drain_rc=$?
  case "$drain_rc" in
    0) ;;
    3) echo "nothing was uninstalled: the Mac still serves what no other Mac can take (DRAIN=0 uninstalls anyway)" >&2
       exit 1 ;;
    *) echo "no drain: the agent is not running, or not with --fleet" ;;
  esac
fi

# Unload first, so the agent cannot start anything again meanwhile.
daemon_plist="$install_root/Library/LaunchDaemons/$label.plist"  # /Library/LaunchDaemons outside prefix mode
if [[ -e "$daemon_plist" ]]; then
  sudo_cmd="${SUDO-}"
  if [[ -z "$install_root" && -z "$sudo_cmd" ]]; then sudo_cmd=sudo; fi
  as_root() { if [[ -n "$sudo_cmd" ]]; then "$sudo_cmd" "$@"; else "$@"; fi; }
  if bootout_err="$(as_root "$launchctl" bootout "system/$label" 2>&1)"; then
    echo "unloaded system/$label"
  elif "$launchctl" print "system/$label" >/dev/null 2>&1; then
    echo "launchctl bootout system/$label failed and the daemon is still loaded: $bootout_err" >&2
    exit 1
  fi
  as_root rm -f -- "$daemon_plist"
  echo "removed $daemon_plist"
fi
if bootout_err="$("$launchctl" bootout "$service" 2>&1)"; then
  echo "unloaded $service"
elif "$launchctl" print "$service" >/dev/null 2>&1; then
  echo "launchctl bootout $service failed and the job is still loaded: $bootout_err" >&2
  exit 1
else
  echo "$service was not loaded"
fi

if [[ "$stop_models" == 1 ]]; then
  "$agent" stop-all --state-dir "$state_dir"
fi

rm -f -- "$plist"
echo "removed $plist"
# Only the venv the installer made, and only if it is one.
if [[ -f "$own_venv/pyvenv.cfg" && "${METAL_AGENT_VENV:-}" != "$own_venv" ]]; then
  rm -rf -- "$own_venv"
  echo "removed $own_venv"
fi

if [[ "$stop_models" == 1 ]]; then
  echo "kept logs in $log_dir"
else
  echo "llama-servers left running are adopted by a later install; STOP_MODELS=1 stops them"
  echo "kept process records in $state_dir and logs in $log_dir"
fi

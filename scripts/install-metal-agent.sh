#!/usr/bin/env bash
# Install metal-agent as a LaunchAgent (com.llmkube.metal-agent) for this user:
#   venv       ~/Library/Application Support/metal-agent/venv  (this checkout, pip-installed)
#   plist      ~/Library/LaunchAgents/com.llmkube.metal-agent.plist
#   logs       ~/Library/Logs/metal-agent/agent.log (+ one log per llama-server)
# then loads it (launchctl bootstrap) and restarts it (launchctl kickstart -k),
# so running this again upgrades a running agent to this checkout's code.
#
# Usage: scripts/install-metal-agent.sh [--mode agent|daemon] [-- RUN_ARG...]
#   RUN_ARGs are appended to `metal-agent run` in the plist, e.g. -- --threads 8
#   --mode daemon (make install-metal-agent MODE=daemon): a LaunchDaemon,
#     /Library/LaunchDaemons/com.llmkube.metal-agent.plist in the system domain,
#     run as you (UserName) with your files, started at boot with nobody logged
#     in (headless Macs, installs over SSH); its steps that need root use sudo.
#     Installing one mode removes the other: the agent never runs twice.
#   Finding LLMKube's Go agent (its LaunchAgent, same label), it migrates it
#     first: `metal-agent migrate` translates its flags and adopts its models;
#     the translated flags, kept in the state directory's migrated-run-args,
#     apply to every later install (delete that file to drop them).
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
#   SUDO                      daemon mode's sudo (default sudo; none in prefix mode)
#   METAL_AGENT_USER          prefix mode only: the daemon's user (default: you)
#   Off macOS both must be set. Nothing is installed outside the root.
set -euo pipefail

usage() { sed -n '2,/^set /s/^# \{0,1\}//p' "$0" >&2; exit 2; }

run_args=()
mode=agent
while [[ $# -gt 0 ]]; do
  case "$1" in
    --mode) [[ $# -ge 2 ]] || usage; mode="$2"; shift 2 ;;
    --mode=*) mode="${1#--mode=}"; shift ;;
    --) shift; run_args=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1 (arguments for the agent go after --)" >&2; usage ;;
  esac
done

action=install
# shellcheck source=lib/launchagent-env.sh
source "$(dirname "$0")/lib/launchagent-env.sh"
repo="$(cd "$(dirname "$0")/.." && pwd)"
state_dir="$home/Library/Application Support/metal-agent"
log_dir="$home/Library/Logs/metal-agent"
agents_dir="$home/Library/LaunchAgents"
daemons_dir="$install_root/Library/LaunchDaemons"  # /Library/LaunchDaemons outside prefix mode
agent_plist="$agents_dir/$label.plist"
daemon_plist="$daemons_dir/$label.plist"
# The daemon's root steps (its plist, the system domain) go through sudo; the
# script itself runs as the user the daemon will run as.
run_as="$(id -un)"
if [[ -n "$install_root" ]]; then run_as="${METAL_AGENT_USER:-$run_as}"; fi
sudo_cmd="${SUDO-}"
if [[ -z "$install_root" && -z "$sudo_cmd" ]]; then sudo_cmd=sudo; fi
as_root() { if [[ -n "$sudo_cmd" ]]; then "$sudo_cmd" "$@"; else "$@"; fi; }
case "$mode" in
  agent) service="gui/$uid/$label"; domain="gui/$uid"; jobs_dir="$agents_dir"; plist="$agent_plist"
         job_cmd() { "$@"; } ;;
  daemon) service="system/$label"; domain=system; jobs_dir="$daemons_dir"; plist="$daemon_plist"
          job_cmd() { as_root "$@"; } ;;
  *) echo "--mode must be agent or daemon, got '$mode'" >&2; exit 2 ;;
esac

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

# 2. The job definition, rendered by the agent itself (metal_agent/core/launchd.py).
mkdir -p "$log_dir" "$state_dir" "$agents_dir"  # launchd opens the log and chdirs before exec
render=("$agent" render-plist --agent-path "$agent" --log-dir "$log_dir" --state-dir "$state_dir" --mode "$mode")
if [[ "$mode" == daemon ]]; then
  render+=(--user-name "$run_as" --home "$home")
  # launchd (root) opens StandardOutPath for a daemon: an existing file stays
  # the user's, so the agent can still cap it; a new one would be root's.
  touch "$log_dir/agent.log"
fi
if [[ -n "${METAL_AGENT_KUBECONFIG:-}" ]]; then render+=(--kubeconfig "$METAL_AGENT_KUBECONFIG"); fi
if [[ -n "${METAL_AGENT_LLAMA_SERVER:-}" ]]; then render+=(--llama-server "$METAL_AGENT_LLAMA_SERVER"); fi
# ${a[@]+"${a[@]}"}: macOS's bash 3.2 calls an empty array unbound under set -u.
IFS=, read -r -a namespaces <<<"${METAL_AGENT_NAMESPACES:-}"
for ns in ${namespaces[@]+"${namespaces[@]}"}; do
  if [[ -n "$ns" ]]; then render+=(--namespace "$ns"); fi
done
# Coming from LLMKube's Go agent (a LaunchAgent with our label running its
# binary): `metal-agent migrate` translates its arguments and adopts its models
# (hard links, never a download) before anything is unloaded. The translated
# arguments are kept and used by every later install too; the settings above
# replace theirs, and RUN_ARGs come last and win.
migrated="$state_dir/migrated-run-args"
if [[ -e "$agent_plist" ]] && "$agent" migrate --check --plist "$agent_plist" >/dev/null 2>&1; then
  echo "found LLMKube's Go agent in $agent_plist: migrating it"
  migrate=("$agent" migrate --plist "$agent_plist" --state-dir "$state_dir" --run-args-file "$migrated.new")
  if [[ -n "${METAL_AGENT_KUBECONFIG:-}" ]]; then migrate+=(--kubeconfig "$METAL_AGENT_KUBECONFIG"); fi
  if [[ -n "${METAL_AGENT_LLAMA_SERVER:-}" ]]; then migrate+=(--llama-server "$METAL_AGENT_LLAMA_SERVER"); fi
  for ns in ${namespaces[@]+"${namespaces[@]}"}; do
    if [[ -n "$ns" ]]; then migrate+=(--namespace "$ns"); fi
  done
  # HOME: its defaults (our model directory, ~/.kube/config) are this install's, under the root in prefix mode.
  HOME="$home" "${migrate[@]}" || { rm -f "$migrated.new"; exit 1; }
  mv -f "$migrated.new" "$migrated"
fi
if [[ -f "$migrated" ]]; then
  while IFS= read -r arg; do
    case "$arg" in
      --kubeconfig=*) if [[ -n "${METAL_AGENT_KUBECONFIG:-}" ]]; then continue; fi ;;
      --namespace=*) if [[ -n "${METAL_AGENT_NAMESPACES:-}" ]]; then continue; fi ;;
      --llama-server=*) if [[ -n "${METAL_AGENT_LLAMA_SERVER:-}" ]]; then continue; fi ;;
    esac
    render+=("--extra-arg=$arg")
  done <"$migrated"
fi
for arg in ${run_args[@]+"${run_args[@]}"}; do
  render+=("--extra-arg=$arg")
done
staged="$(mktemp "$agents_dir/.$label.XXXXXX")"
trap 'rm -f "$staged"' EXIT
"${render[@]}" --output "$staged"

# Put the plist in place in one rename, so launchd never reads half a file. A
# LaunchDaemon's plist must be root's and not writable by others, or launchd
# refuses it; it is staged as the user and moved into place with sudo.
place_plist() {
  if [[ "$mode" == agent ]]; then mv -f "$staged" "$plist"; return; fi
  local tmp="$daemons_dir/.$label.new"
  as_root mkdir -p "$daemons_dir"
  as_root cp "$staged" "$tmp"
  as_root chmod 644 "$tmp"
  if [[ -z "$install_root" ]]; then as_root chown root:wheel "$tmp"; fi
  as_root mv -f "$tmp" "$plist"
  rm -f "$staged"
}

# One agent per Mac: installing one mode first removes the other, or both
# would supervise (and restart) the same llama-servers. A LaunchAgent plist
# left behind would also start a second agent at the next GUI login.
if [[ "$mode" == daemon ]]; then
  if "$launchctl" print "gui/$uid/$label" >/dev/null 2>&1; then
    echo "switching to daemon mode: unloading the LaunchAgent gui/$uid/$label (llama-servers keep running and are adopted)"
    "$launchctl" bootout "gui/$uid/$label" || true
  fi
  if [[ -e "$agent_plist" ]]; then rm -f "$agent_plist"; echo "removed $agent_plist"; fi
elif [[ -e "$daemon_plist" ]]; then
  echo "switching to agent mode: unloading the LaunchDaemon system/$label (llama-servers keep running and are adopted)"
  as_root "$launchctl" bootout "system/$label" || true
  as_root rm -f "$daemon_plist"
  echo "removed $daemon_plist"
fi

# 3. Load it. `print` tells whether launchd already has the job: bootstrapping
# a loaded job fails ("Bootstrap failed: 5: Input/output error"), and a loaded
# job keeps its old definition until booted out, so a changed plist needs
# bootout + bootstrap while an unchanged one only needs the restart below.
loaded=0
if "$launchctl" print "$service" >/dev/null 2>&1; then loaded=1; fi
changed=1
if cmp -s "$staged" "$plist"; then changed=0; fi
place_plist
if [[ $loaded -eq 1 && $changed -eq 1 ]]; then
  echo "job definition changed: unloading the old one (llama-servers keep running and are adopted)"
  job_cmd "$launchctl" bootout "$service" || true
  loaded=0
fi

# `Bootstrap failed: 125: Domain does not support specified action`: gui/UID
# exists only while the user is logged in at the GUI, so a LaunchAgent cannot
# be loaded from SSH or on a Mac nobody has logged in to since it booted.
no_gui_session() {
  cat >&2 <<EOF
launchctl bootstrap $domain failed: $1
There is no GUI login session for $(id -un) on this Mac (an SSH session, or nobody
logged in since boot), and a LaunchAgent only runs inside one. Either:
  - install the agent as a LaunchDaemon, which starts at boot with nobody logged in
    and runs as $(id -un):   make install-metal-agent MODE=daemon
  - or log in to this Mac at its screen (or with Screen Sharing) and run
    make install-metal-agent again; until then the agent does not run.
EOF
  exit 1
}

if [[ $loaded -eq 0 ]]; then
  tries=0
  while true; do
    rc=0
    out="$(job_cmd "$launchctl" bootstrap "$domain" "$plist" 2>&1)" || rc=$?
    if [[ $rc -eq 0 ]]; then break; fi
    if [[ "$mode" == agent && ( $rc -eq 125 || "$out" == *"Bootstrap failed: 125"* ) ]]; then
      no_gui_session "$out"
    fi
    # A just-booted-out job can take a moment to go; a job loaded meanwhile is fine.
    if "$launchctl" print "$service" >/dev/null 2>&1; then break; fi
    tries=$((tries + 1))
    if [[ $tries -ge 10 ]]; then
      echo "launchctl bootstrap $domain $plist keeps failing: $out" >&2
      echo "see: log show --last 5m --predicate 'process == \"launchd\"'" >&2
      exit 1
    fi
    sleep 1
  done
fi
# 4. Restart, so the agent now running is this install's code and flags.
job_cmd "$launchctl" kickstart -k "$service"

if [[ "$mode" == daemon ]]; then
  echo "LaunchDaemon $daemon_plist: starts at boot, runs as $run_as with the files in $home/Library"
fi
cat <<EOF
metal-agent is installed and running as $service
  status:  $agent status        (or: launchctl print $service)
  checks:  $agent doctor
  logs:    tail -f "$log_dir/agent.log"
           $agent logs NAMESPACE/NAME -f
  remove:  make uninstall-metal-agent   (STOP_MODELS=1 also stops the llama-servers)
EOF

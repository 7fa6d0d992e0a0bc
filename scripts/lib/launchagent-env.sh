# Shared preamble of install-metal-agent.sh and uninstall-metal-agent.sh
# (sourced, not run): which launchctl and home to use, and the refusals.
#
# Off macOS both scripts refuse to run unless METAL_AGENT_INSTALL_ROOT (every
# path lives under it) and LAUNCHCTL (a stand-in) are set: that is the
# documented dry-run mode the tests use. A real install never runs as root:
# a LaunchAgent lives in a user's gui/UID domain.
# Sets: label, install_root, launchctl, home, uid. Expects: action (install|uninstall).

label=com.llmkube.metal-agent
install_root="${METAL_AGENT_INSTALL_ROOT:-}"
launchctl="${LAUNCHCTL:-/bin/launchctl}"
if [[ "$(uname -s)" != Darwin && ( -z "$install_root" || -z "${LAUNCHCTL:-}" ) ]]; then
  echo "metal-agent installs as a macOS LaunchAgent; this is $(uname -s)." >&2
  echo "To try the ${action} elsewhere, set METAL_AGENT_INSTALL_ROOT=DIR and LAUNCHCTL=STAND-IN." >&2
  exit 1
fi

if [[ -z "$install_root" && "$(id -u)" -eq 0 ]]; then
  echo "run this as the user the agent runs as, not root (a LaunchAgent lives in a user's gui/UID domain)" >&2
  exit 1
fi

home="${install_root:-${HOME:-}}"
if [[ -z "$home" || "$home" != /* ]]; then
  echo "need an absolute HOME (or METAL_AGENT_INSTALL_ROOT), got '${home}'" >&2
  exit 1
fi
uid="$(id -u)"

"""The launchd job that runs `metal-agent run` and restarts it on failure.

Two modes, one job (label ``com.llmkube.metal-agent``, never both at once):

- **agent** (default): a LaunchAgent in ``~/Library/LaunchAgents``, loaded
  into ``gui/<uid>``. It runs only while the user is logged in at the GUI,
  and ``launchctl bootstrap gui/<uid>`` fails over SSH with no GUI session
  (``Bootstrap failed: 125: Domain does not support specified action``).
- **daemon**: a LaunchDaemon in ``/Library/LaunchDaemons``, loaded into the
  ``system`` domain at boot, before anyone logs in (a Mac Studio that
  reboots after a power cut with FileVault and no auto-login). ``UserName``
  makes launchd run it as the installing user, never as root, so its
  files, models and kubeconfig stay in that user's ``~/Library`` and the
  agent keeps least privilege; ``HOME`` is set to that user's home so every
  ``~`` default resolves there too (launchd.plist(5): ``UserName`` applies
  only to jobs in the system domain; without ``GroupName`` the job runs
  with the user's primary group).

The plist is built here with `plistlib`, the single source of truth: the
install script renders it through `metal-agent render-plist`, and
`launchd/com.llmkube.metal-agent.plist.example` (agent) and
`launchd/com.llmkube.metal-agent.daemon.plist.example` (daemon) are only
rendered copies for readers (unit tests keep them in sync; regenerate them
with the commands in those tests' docstrings). Building the dictionary in code rather than filling
a text template means paths with spaces, `&` or `<` can never produce a
broken or different plist.

Why each key (see launchd.plist(5)):

- ``KeepAlive = {SuccessfulExit: false}``: restart only after a failure. The
  agent exits non-zero when a subsystem fails for good (e.g. the API server
  unreachable for too long), and zero when asked to stop, which must stick.
- ``ThrottleInterval = 30``: a crash loop (bad kubeconfig) costs one attempt
  every 30 s instead of launchd's 10 s default, and keeps agent.log readable.
- ``AbandonProcessGroup = true``: when the agent exits, launchd must not kill
  what it started. llama-servers outlive the agent on purpose, so the next
  agent adopts them instead of reloading a 40 GB model.
- ``ProcessType = Interactive``: without it (or with ``Standard``, which is
  the same) launchd applies "light resource limits, throttling CPU usage and
  I/O bandwidth" to the job, and llama-server inherits them: slower model
  loads (I/O) and fewer tokens per second (CPU scheduling). ``Interactive``
  runs with an app's limits, i.e. none. ``Adaptive`` needs XPC activity,
  which this job has none of.
- ``EnvironmentVariables.PATH``: launchd's default PATH lacks Homebrew's
  prefixes, where llama-server lives.
- ``METAL_AGENT_LOG_FORMAT=json``: stdout is a file, not a TTY; JSON lines
  are what log shippers parse.
- ``WorkingDirectory``: the state directory, never ``/`` (launchd's default),
  so nothing stray is written at the root of the disk.
- Daemon only: ``UserName`` and ``HOME``/``USER``/``LOGNAME`` (see above).
"""

from __future__ import annotations

import enum
import plistlib
from dataclasses import dataclass
from pathlib import PurePosixPath

from metal_agent.core.names import is_dns1123_label

LABEL = "com.llmkube.metal-agent"
PLIST_NAME = f"{LABEL}.plist"
LAUNCH_AGENTS_DIR = "Library/LaunchAgents"  # under the user's home
LAUNCH_DAEMONS_DIR = "/Library/LaunchDaemons"
AGENT_LOG_NAME = "agent.log"
THROTTLE_INTERVAL_S = 30
# Homebrew on Apple Silicon, then Intel, then the system directories.
LAUNCHD_PATH = "/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"



class LaunchdConfigError(ValueError):
    """Settings that would give launchd a job it cannot run as intended."""


class Mode(enum.Enum):
    """Where launchd keeps the job: the user's GUI session, or the system domain."""

    AGENT = "agent"
    DAEMON = "daemon"


def service_target(mode: Mode, uid: int) -> str:
    """The launchctl service target of the job in `mode` (``gui/501/com.llmkube.metal-agent``)."""
    return f"system/{LABEL}" if mode is Mode.DAEMON else f"gui/{uid}/{LABEL}"


def plist_path(mode: Mode, home: str) -> str:
    """Where the job's plist lives in `mode`; `home` is the installing user's home."""
    if mode is Mode.DAEMON:
        return str(PurePosixPath(LAUNCH_DAEMONS_DIR) / PLIST_NAME)
    return str(PurePosixPath(home) / LAUNCH_AGENTS_DIR / PLIST_NAME)


@dataclass(frozen=True)
class LaunchAgentSettings:
    """What differs between installations; everything else is fixed policy.

    Paths must be absolute: launchd expands neither ``~`` nor relative paths
    (the working directory is the state directory, not the installer's).
    """

    agent_path: str
    log_dir: str
    state_dir: str
    kubeconfig: str | None = None
    namespaces: tuple[str, ...] = ()
    llama_server: str | None = None
    extra_args: tuple[str, ...] = ()
    mode: Mode = Mode.AGENT
    # Daemon mode only: the user launchd runs the job as, and that user's home.
    user_name: str | None = None
    home: str | None = None

    def __post_init__(self) -> None:
        for flag, value in (
            ("--agent-path", self.agent_path),
            ("--log-dir", self.log_dir),
            ("--state-dir", self.state_dir),
            ("--kubeconfig", self.kubeconfig),
            ("--llama-server", self.llama_server),
            ("--home", self.home),
        ):
            if value is not None and not PurePosixPath(value).is_absolute():
                raise LaunchdConfigError(f"{flag} must be an absolute path (launchd does not expand ~), got {value!r}")
        for namespace in self.namespaces:
            if not is_dns1123_label(namespace):
                raise LaunchdConfigError(f"--namespace {namespace!r} is not a valid namespace name")
        for value in (self.agent_path, self.log_dir, self.state_dir, self.kubeconfig, self.llama_server,
                      self.user_name, self.home, *self.namespaces, *self.extra_args):
            if value is not None and "\0" in value:
                raise LaunchdConfigError("arguments cannot contain NUL characters")
        if self.mode is Mode.DAEMON:
            # A daemon without UserName runs as root: the agent would then own
            # root's files and run every llama-server as root. Never.
            if not self.user_name or self.user_name == "root":
                raise LaunchdConfigError("daemon mode needs --user-name, a user other than root, to run the agent as")
            if not self.home:
                raise LaunchdConfigError("daemon mode needs --home, the home of the user it runs as")
        elif self.user_name is not None:
            raise LaunchdConfigError("--user-name applies only to daemon mode (a LaunchAgent runs as its user)")


def agent_log_path(settings: LaunchAgentSettings) -> str:
    return str(PurePosixPath(settings.log_dir) / AGENT_LOG_NAME)


def program_arguments(settings: LaunchAgentSettings) -> list[str]:
    """`metal-agent run` with explicit directories, so the agent and launchd agree on them."""
    argv = [settings.agent_path, "run", "--log-dir", settings.log_dir, "--state-dir", settings.state_dir]
    if settings.kubeconfig:
        argv += ["--kubeconfig", settings.kubeconfig]
    for namespace in settings.namespaces:
        argv += ["--namespace", namespace]
    if settings.llama_server:
        argv += ["--llama-server", settings.llama_server]
    return argv + list(settings.extra_args)


def job(settings: LaunchAgentSettings) -> dict[str, object]:
    """The job as a dictionary (what `render_plist` serialises)."""
    log_path = agent_log_path(settings)
    env = {"PATH": LAUNCHD_PATH, "METAL_AGENT_LOG_FORMAT": "json"}
    extra: dict[str, object] = {}
    if settings.mode is Mode.DAEMON:
        assert settings.user_name is not None and settings.home is not None  # checked in __post_init__
        extra["UserName"] = settings.user_name
        env.update(HOME=settings.home, USER=settings.user_name, LOGNAME=settings.user_name)
    return {
        **extra,
        "Label": LABEL,
        "ProgramArguments": program_arguments(settings),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": THROTTLE_INTERVAL_S,
        "AbandonProcessGroup": True,
        "ProcessType": "Interactive",
        "WorkingDirectory": settings.state_dir,
        "StandardOutPath": log_path,
        "StandardErrorPath": log_path,
        "EnvironmentVariables": env,
    }


def render_plist(settings: LaunchAgentSettings) -> bytes:
    """The job's plist as XML bytes (deterministic: keys sorted)."""
    return plistlib.dumps(job(settings), fmt=plistlib.FMT_XML, sort_keys=True)

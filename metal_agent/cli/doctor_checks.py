"""The checks behind `metal-agent doctor`: everything the agent needs, and how to fix what is missing.

Each check is a small async function returning a `CheckResult`, so it can
be tested on its own; `run_checks` runs them concurrently and returns them
in a fixed order. Checks that only make sense on a Mac (Apple Silicon,
Metal, launchd, the powermetrics grant) are *skipped* elsewhere, never
failed: developers run the agent on Linux against a CPU llama-server.

The checks of this Mac and its install live here; the cluster's in
`cli.doctor_cluster`, the MLX engine's in `cli.doctor_mlx`, and what they
all return (and `run_command`: no shell, a timeout) in `cli.doctor_base`.

This module imports (through those) the Kubernetes client and the agent's adapters, so it is
kept apart from the command (`metal_agent.cli.doctor`), which imports it only
when the doctor actually runs: `metal-agent --help` must not pay for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import plistlib
import pwd
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Sequence

from metal_agent.adapters import llama_binary
from metal_agent.adapters.sudo_grant import check_sudo_grant
from metal_agent.cli.agent_client import fetch_services
from metal_agent.cli.doctor_base import CheckResult, fail, is_mac, not_mac, ok, run_command, skip
from metal_agent.cli.doctor_cluster import cluster_checks
from metal_agent.cli.doctor_mac_host import mac_host_checks
from metal_agent.cli.doctor_mlx import check_mlx_server
from metal_agent.cli.status import AgentUnreachable
from metal_agent.core.launchd import LAUNCH_DAEMONS_DIR, LAUNCHD_PATH, Mode, plist_path, service_target
from metal_agent.paths import HOMEBREW_BIN_DIRS, find_llama_server

__all__ = [
    "check_agent", "check_apple_silicon", "check_launchd", "check_llama_server", "check_memory", "check_metal",
    "check_sudo", "memory_result", "run_checks",
    "check_firewall", "check_metal_device", "parse_app_blocked", "parse_global_state", "parse_list_devices",
]

LAUNCHCTL = "/bin/launchctl"
SOCKETFILTERFW = "/usr/libexec/ApplicationFirewall/socketfilterfw"
# llama-server compiles Metal's shaders at its first run on a Mac: seconds.
LIST_DEVICES_TIMEOUT_S = 60.0
SYSCTL = "/usr/sbin/sysctl"
SYSTEM_PROFILER = "/usr/sbin/system_profiler"
SYSTEM_PROFILER_TIMEOUT_S = 30.0  # it enumerates displays and GPUs; slow on a busy machine
GiB = 1024**3
# Smallest useful quantized model plus its KV cache: less free than this and nothing will load.
MIN_MODEL_BYTES = 2 * GiB


# --- the Mac itself ----------------------------------------------------------


async def check_apple_silicon(system: str | None = None) -> CheckResult:
    name = "Apple Silicon"
    if not is_mac(system):
        return not_mac(name, system)
    try:
        rc, arm64 = await run_command([SYSCTL, "-n", "hw.optional.arm64"])
        _, brand = await run_command([SYSCTL, "-n", "machdep.cpu.brand_string"])
    except (OSError, TimeoutError) as exc:
        return fail(name, f"cannot ask sysctl: {exc}", "run the doctor on the Mac itself, as a normal user")
    if rc != 0 or arm64.strip() != "1":
        return fail(name, f"{brand.strip() or 'this CPU'} is not Apple Silicon",
                    "metal-agent serves models from Apple Silicon (M1 or later) GPUs; use such a Mac")
    detail = brand.strip()
    if platform.machine() != "arm64":
        detail += f" (this Python runs as {platform.machine()} under Rosetta; prefer a native arm64 Python)"
    return ok(name, detail)


async def check_metal(system: str | None = None) -> CheckResult:
    name = "Metal"
    if not is_mac(system):
        return not_mac(name, system)
    try:
        _, out = await run_command([SYSTEM_PROFILER, "SPDisplaysDataType"], SYSTEM_PROFILER_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        return fail(name, f"cannot run system_profiler: {exc}", "run `system_profiler SPDisplaysDataType` by hand")
    lines = [ln.strip() for ln in out.splitlines() if "Metal" in ln]
    if not lines:
        return fail(name, "system_profiler reports no Metal support", "metal-agent needs a Metal-capable GPU")
    return ok(name, lines[0])


def memory_result(total: int, available: int) -> CheckResult:
    """How much a model can use now: the free memory, capped by Metal's GPU working-set budget.

    macOS lets the GPU wire about two thirds of RAM on machines up to 36 GiB
    and about three quarters above, whatever is free.
    """
    name = "Memory"
    fraction = 0.75 if total > 36 * GiB else 0.67
    budget = int(total * fraction)
    room = min(available, budget)
    detail = (f"{available / GiB:.1f} GiB available of {total / GiB:.1f} GiB; Metal budget "
              f"{budget / GiB:.1f} GiB ({fraction:.2f} x total); models can use up to {room / GiB:.1f} GiB now")
    if room < MIN_MODEL_BYTES:
        return fail(name, detail, "quit memory-hungry apps, or serve a smaller (more quantized) model")
    return ok(name, detail)


async def check_memory() -> CheckResult:
    """The same reading the agent's admission and watchdog use (on macOS: the kernel's pages
    counted as LLMKube does, not psutil's under-read), so the doctor and the agent agree."""
    from metal_agent.adapters.memory_watchdog import read_system_memory

    reading = read_system_memory()
    return memory_result(reading.total_bytes, reading.available_bytes)


# --- llama-server --------------------------------------------------------------


async def check_llama_server(explicit: str | None) -> CheckResult:
    name = "llama-server"
    fix = "install llama.cpp (brew install llama.cpp) or pass --llama-server PATH"
    path = find_llama_server(explicit)
    if path is None:
        return fail(name, "not found in Homebrew's bin directories or PATH", fix)
    try:
        info = await llama_binary.probe(path)
    except llama_binary.LlamaServerMissing as exc:
        return fail(name, str(exc), fix)
    except (OSError, asyncio.TimeoutError) as exc:
        return fail(name, f"{path} did not answer --version: {exc!r}", f"run `{path} --version` by hand; {fix}")
    return ok(name, f"{info.path} (version {info.version})")


# --- this install ----------------------------------------------------------------


async def check_sudo(interval_ms: int, system: str | None = None) -> CheckResult:
    name = "powermetrics grant"
    if not is_mac(system):
        return not_mac(name, system)
    grant = await check_sudo_grant(interval_ms)
    if grant.ok:
        return ok(name, f"{grant.user} may run `{grant.command}`")
    return fail(name, grant.detail, grant.fix or "run `make install-powermetrics-sudo`")


def _job_file(mode: Mode, home: Path, daemons_dir: str) -> Path:
    if mode is Mode.DAEMON:
        return Path(daemons_dir) / Path(plist_path(Mode.DAEMON, str(home))).name
    return Path(plist_path(Mode.AGENT, str(home)))


def _read_job(path: Path) -> dict | None:
    try:
        with path.open("rb") as f:
            job = plistlib.load(f)
    except (OSError, plistlib.InvalidFileException, ValueError):
        return None
    return job if isinstance(job, dict) else None


def installed_job(home: Path | None = None, daemons_dir: str = LAUNCH_DAEMONS_DIR) -> tuple[Mode, dict] | None:
    """The installed job's mode and plist (the daemon's first: it runs whoever is logged in), or None."""
    home = home or Path.home()
    for mode in (Mode.DAEMON, Mode.AGENT):
        job = _read_job(_job_file(mode, home, daemons_dir))
        if job is not None:
            return mode, job
    return None


async def check_launchd(system: str | None = None, launchctl: str = LAUNCHCTL, home: Path | None = None,
                        daemons_dir: str = LAUNCH_DAEMONS_DIR) -> CheckResult:
    """Which mode is installed and loaded: a LaunchAgent (gui/UID) or a LaunchDaemon (system).

    The system domain is asked only when a LaunchDaemon plist exists (anyone
    may read it). Both loaded at once means two agents supervising the same
    llama-servers, a failure; a plist that is not loaded says why in its mode.
    """
    name = "launchd job"
    if not is_mac(system):
        return not_mac(name, system)
    home = home or Path.home()
    uid = os.getuid()
    fix = "run `make install-metal-agent` in the metal-agent checkout (MODE=daemon on a headless Mac)"
    agent_file, daemon_file = _job_file(Mode.AGENT, home, daemons_dir), _job_file(Mode.DAEMON, home, daemons_dir)

    async def loaded(mode: Mode) -> tuple[bool, str]:
        rc, out = await run_command([launchctl, "print", service_target(mode, uid)])
        fields = dict(re.findall(r"^\s*(state|pid|last exit code) = (.+)$", out, re.MULTILINE))
        return rc == 0, ", ".join(f"{k} {v.strip()}" for k, v in fields.items())

    try:
        agent_loaded, agent_shown = await loaded(Mode.AGENT)
        daemon_loaded, daemon_shown = await loaded(Mode.DAEMON) if daemon_file.exists() else (False, "")
    except (OSError, TimeoutError) as exc:
        return fail(name, f"cannot run launchctl: {exc}", fix)
    agent_target, daemon_target = service_target(Mode.AGENT, uid), service_target(Mode.DAEMON, uid)
    if agent_loaded and daemon_loaded:
        return fail(name, f"both {agent_target} (LaunchAgent) and {daemon_target} (LaunchDaemon) are loaded: "
                    "two agents supervise the same llama-servers",
                    "run `make uninstall-metal-agent`, then `make install-metal-agent` with the one MODE you want")
    if daemon_loaded:
        user = (_read_job(daemon_file) or {}).get("UserName", "?")
        return ok(name, f"LaunchDaemon {daemon_target} loaded, runs as {user} from boot"
                  + (f" ({daemon_shown})" if daemon_shown else ""))
    if agent_loaded:
        return ok(name, f"LaunchAgent {agent_target} loaded" + (f" ({agent_shown})" if agent_shown else "")
                  + "; it runs only while you are logged in at the GUI (headless Mac: "
                  "`make install-metal-agent MODE=daemon`)")
    if daemon_file.exists():
        return fail(name, f"LaunchDaemon {daemon_file} is installed but {daemon_target} is not loaded",
                    f"sudo launchctl bootstrap system {shlex.quote(str(daemon_file))}, or run "
                    "`make install-metal-agent MODE=daemon` again")
    if agent_file.exists():
        return fail(name, f"LaunchAgent {agent_file} is installed but {agent_target} is not loaded",
                    "a LaunchAgent runs only inside a GUI login session: log in at this Mac's screen (or Screen "
                    "Sharing), or for a headless Mac run `make install-metal-agent MODE=daemon`")
    return fail(name, f"{agent_target} is not loaded", fix)


async def check_agent(listen: str) -> CheckResult:
    name = "Agent"
    try:
        payload = await fetch_services(listen)
    except ValueError as exc:
        return fail(name, str(exc), "pass --listen HOST:PORT, as given to `metal-agent run`")
    except AgentUnreachable as exc:
        return fail(name, str(exc), "start it: `make install-metal-agent` (launchd) or `metal-agent run`; "
                    "if it runs elsewhere, pass its --listen address")
    return ok(name, f"version {payload.get('version', '?')} answers on {listen}, "
                    f"managing {len(payload['services'])} llama-server(s)")


# --- llama-server as the agent runs it ------------------------------------------------


def parse_list_devices(text: str) -> list[tuple[str, str]]:
    """(name, description) of each device `llama-server --list-devices` lists.

    Its output: ``Available devices:`` then one indented ``NAME: DESCRIPTION``
    line per device (``MTL0: Apple M2 Pro (16384 MiB, ...)``, older builds
    ``Metal: Apple M4 Max (...)``, ``BLAS: Accelerate (...)``), or
    ``  (none)``; Metal's own initialisation lines may come first. The CPU
    is never listed.
    """
    devices: list[tuple[str, str]] = []
    listing = False
    for line in text.splitlines():
        if line.strip() == "Available devices:":
            listing, devices = True, []
            continue
        if not listing:
            continue
        if not line[:1].isspace() or not line.strip():
            listing = False
            continue
        name, sep, description = line.strip().partition(": ")
        if sep:
            devices.append((name, description))
    return devices


def is_metal_device(name: str) -> bool:
    return name == "Metal" or re.fullmatch(r"MTL\d+", name) is not None


@dataclass(frozen=True)
class AgentContext:
    """How the installed agent would start llama-server: binary, environment, directory, user."""

    llama_server: str | None
    env: dict[str, str]
    cwd: str | None
    user: str | None  # the job's UserName (daemon mode)
    how: str


def agent_context(explicit: str | None, home: Path | None = None,
                  daemons_dir: str = LAUNCH_DAEMONS_DIR) -> AgentContext:
    """The installed job's view: launchd gives the agent the plist's environment (not your
    shell's), its working directory and, for a daemon, its UserName; the agent passes
    that environment, minus LLAMA_ARG_* and LLAMA_API_KEY, to llama-server."""
    from metal_agent.adapters.process.supervisor import child_environment

    home = home or Path.home()
    found = installed_job(home, daemons_dir)
    mode, job = found if found else (None, {})
    user = job.get("UserName") if mode is Mode.DAEMON else None
    env_home = home
    if user:
        with contextlib.suppress(KeyError):
            env_home = Path(pwd.getpwnam(user).pw_dir)
    env = {"PATH": LAUNCHD_PATH, "HOME": str(env_home)}
    env.update({k: str(v) for k, v in (job.get("EnvironmentVariables") or {}).items()})
    env = child_environment(env)
    args = [str(a) for a in job.get("ProgramArguments") or []]
    llama = explicit
    if llama is None and "--llama-server" in args[:-1]:
        llama = args[args.index("--llama-server") + 1]
    if llama is None:
        # The agent's own search (paths.find_llama_server), with launchd's PATH.
        llama = next((str(Path(d) / "llama-server") for d in HOMEBREW_BIN_DIRS
                      if os.access(Path(d) / "llama-server", os.X_OK)), None)
        llama = llama or shutil.which("llama-server", path=env.get("PATH"))
    cwd = job.get("WorkingDirectory")
    how = {Mode.DAEMON: f"as the LaunchDaemon runs it (user {user}, the plist's environment)",
           Mode.AGENT: "as the LaunchAgent runs it (the plist's environment)",
           None: "with launchd's environment (no job installed)"}[mode]
    return AgentContext(llama, env, cwd if cwd and os.path.isdir(cwd) else None, user, how)


async def check_metal_device(explicit: str | None, system: str | None = None, home: Path | None = None,
                             daemons_dir: str = LAUNCH_DAEMONS_DIR,
                             timeout: float = LIST_DEVICES_TIMEOUT_S) -> CheckResult:
    """`llama-server --list-devices` run the way the installed agent runs it: does it see Metal?

    The Metal check above asks system_profiler about the hardware; this one
    asks the binary the agent will start, with the agent's environment,
    working directory and (when the doctor runs as root) the daemon's user.
    An x86_64 build under Rosetta, or a CPU-only build, lists no Metal device
    and would serve every model on the CPU.
    """
    name = "llama-server Metal device"
    if not is_mac(system):
        return not_mac(name, system)
    ctx = agent_context(explicit, home, daemons_dir)
    fix = ("install an Apple Silicon build of llama.cpp with Metal (`brew install llama.cpp` with Homebrew in "
           "/opt/homebrew, not an x86_64 Homebrew under Rosetta), or pass the agent --llama-server PATH")
    if ctx.llama_server is None:
        return fail(name, "no llama-server in the agent's PATH or Homebrew", fix)
    kwargs: dict = {}
    if ctx.user and os.geteuid() == 0 and ctx.user != "root":
        kwargs["user"] = ctx.user
    try:
        code, text = await run_command([ctx.llama_server, "--list-devices"], timeout, env=ctx.env, cwd=ctx.cwd,
                             start_new_session=True, **kwargs)
    except TimeoutError:  # before OSError, whose subclass it is
        return fail(name, f"`{ctx.llama_server} --list-devices` did not finish within {timeout:.0f}s",
                    f"run `{shlex.quote(ctx.llama_server)} --list-devices` by hand")
    except OSError as exc:
        return fail(name, f"cannot run {ctx.llama_server}: {exc.strerror or exc}", fix)
    devices = parse_list_devices(text)
    metal = [(n, d) for n, d in devices if is_metal_device(n)]
    if metal:
        return ok(name, f"{ctx.llama_server} sees {metal[0][0]}: {metal[0][1]} (run {ctx.how})")
    if code != 0:
        last = text.strip().splitlines()[-1] if text.strip() else f"exit status {code}"
        return fail(name, f"`{ctx.llama_server} --list-devices` failed: {last}", fix)
    listed = ", ".join(n for n, _ in devices) or "none"
    return fail(name, f"{ctx.llama_server} lists no Metal device (devices: {listed}; run {ctx.how}): "
                "every model would run on the CPU", fix)


# --- the Application Firewall -------------------------------------------------------------


def parse_global_state(text: str) -> int | None:
    """`socketfilterfw --getglobalstate`: "Firewall is enabled. (State = 1)" -> 1; 0 off, 2 block all."""
    match = re.search(r"\(State = (\d+)\)", text)
    return int(match.group(1)) if match else None


def parse_app_blocked(text: str) -> str | None:
    """`socketfilterfw --getappblocked PATH`: "permitted", "blocked", "unlisted" or None (unrecognised)."""
    lowered = text.lower()
    if "not part of the firewall" in lowered:
        return "unlisted"
    if re.search(r"\bis (blocked|blocking)\b", lowered):
        return "blocked"
    if "permitted" in lowered:
        return "permitted"
    return None


async def check_firewall(explicit: str | None, system: str | None = None, socketfilterfw: str = SOCKETFILTERFW,
                         home: Path | None = None, daemons_dir: str = LAUNCH_DAEMONS_DIR) -> CheckResult:
    """Does macOS's Application Firewall let the cluster reach llama-server?

    With the firewall on, it approves binaries by path, and Homebrew puts
    every llama.cpp version at a new path (Cellar/llama.cpp/VERSION/...): after
    a `brew upgrade` the new binary is unapproved, the approval dialog shows
    on a screen nobody watches, and incoming connections are dropped, while
    the agent's own /health probe (from this Mac) still succeeds. Loopback
    traffic is never filtered, so only this check tells.
    """
    name = "Application Firewall"
    if not is_mac(system):
        return not_mac(name, system)
    if not os.access(socketfilterfw, os.X_OK):
        return skip(name, f"{socketfilterfw} not found")
    try:
        _, out = await run_command([socketfilterfw, "--getglobalstate"])
    except (OSError, TimeoutError) as exc:
        return skip(name, f"cannot run socketfilterfw: {exc}")
    state = parse_global_state(out)
    if state is None:
        return skip(name, f"socketfilterfw --getglobalstate said: {out.strip()!r}")
    if state == 0:
        return ok(name, "off: it blocks nothing")
    tool = shlex.quote(socketfilterfw)
    if state == 2:
        return fail(name, "on and blocking all incoming connections (State = 2): the cluster cannot reach llama-server",
                    f"sudo {tool} --setblockall off   (then check this again)")
    ctx = agent_context(explicit, home, daemons_dir)
    if ctx.llama_server is None:
        return skip(name, "on, but no llama-server to ask about (see the llama-server checks)")
    real = os.path.realpath(ctx.llama_server)  # the firewall approves the binary itself, not a link to it
    binary = shlex.quote(real)
    allow = (f"sudo {tool} --add {binary} && sudo {tool} --unblockapp {binary}   "
             "(again after every `brew upgrade llama.cpp`: each version is a new path)")
    try:
        _, out = await run_command([socketfilterfw, "--getappblocked", real])
    except (OSError, TimeoutError) as exc:
        return fail(name, f"on; cannot ask about {real}: {exc}", allow)
    verdict = parse_app_blocked(out)
    if verdict == "permitted":
        return ok(name, f"on; {real} may accept incoming connections")
    if verdict == "blocked":
        return fail(name, f"on and blocking {real}: the cluster's connections to llama-server are dropped", allow)
    if verdict == "unlisted":
        return fail(name, f"on, and {real} is not in its list: its connections wait for an approval dialog "
                    "nobody sees on a headless Mac, and are dropped", allow)
    return fail(name, f"on; socketfilterfw --getappblocked said: {out.strip()!r}", allow)


# --- the command -------------------------------------------------------------------


async def run_checks(
    *, kubeconfig: str | None, context: str | None, namespaces: Sequence[str], llama_server: str | None,
    listen: str, power_interval_ms: int, system: str | None = None, mlx_server: str | None = None,
    fleet_namespace: str | None = None,
) -> list[CheckResult]:
    """All checks, concurrently; results in a fixed order."""
    groups: list[Awaitable[CheckResult | list[CheckResult]]] = [
        check_apple_silicon(system),
        check_metal(system),
        check_memory(),
        check_llama_server(llama_server),
        check_mlx_server(mlx_server),
        cluster_checks(kubeconfig, context, namespaces, fleet_namespace),
        check_sudo(power_interval_ms, system),
        check_launchd(system),
        check_agent(listen),
        check_metal_device(llama_server, system),
        check_firewall(llama_server, system),
        mac_host_checks(listen, system=system),
    ]
    results: list[CheckResult] = []
    for item in await asyncio.gather(*groups):
        results.extend(item if isinstance(item, list) else [item])
    return results



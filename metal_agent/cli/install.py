"""`metal-agent render-plist` and `metal-agent stop-all`: the install lifecycle's Python half.

``scripts/install-metal-agent.sh`` renders the launchd plist (a LaunchAgent,
or with ``--mode daemon`` a LaunchDaemon that runs as the installing user)
through ``render-plist`` (so the plist is built in one place, `metal_agent.core.launchd`,
never by shell string pasting), and ``scripts/uninstall-metal-agent.sh``
with ``STOP_MODELS=1`` calls ``stop-all``. Both are also usable by hand:
``render-plist`` shows exactly what would be installed.

Stopping runs the process adapters (`metal_agent.cli.stop_records`), which
are imported only when `stop-all` runs: this module is imported by every
`metal-agent` invocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from metal_agent.core.launchd import LaunchAgentSettings, LaunchdConfigError, Mode
from metal_agent.core.launchd import render_plist as _render_plist
from metal_agent.paths import default_paths

__all__ = ["render_plist", "stop_all"]


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _absolute(path: Path) -> str:
    """Expand ~ and make absolute now: launchd would do neither."""
    return os.path.abspath(path.expanduser())


def _default_agent_path() -> Path:
    # The `metal-agent` script installed beside this interpreter (the venv's bin).
    # sys.executable is not resolved: a venv's python is a symlink out of the venv.
    return Path(os.path.abspath(sys.executable)).parent / "metal-agent"


def _write_atomically(target: Path, data: bytes) -> None:
    """Replace `target` in one step: launchd must never read a half-written plist."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # launchd refuses group/world-writable job files
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def render_plist(
    agent_path: Annotated[Path | None, typer.Option(help="The metal-agent executable launchd runs (default: the one beside this Python).")] = None,
    kubeconfig: Annotated[Path | None, typer.Option(help="Kubeconfig the agent uses (default: the agent's own default, ~/.kube/config).")] = None,
    namespace: Annotated[list[str] | None, typer.Option("--namespace", "-n", help="Namespace to watch (repeat for several; default: all).")] = None,
    llama_server: Annotated[Path | None, typer.Option(help="llama-server binary (default: the agent finds Homebrew's).")] = None,
    extra_arg: Annotated[list[str] | None, typer.Option("--extra-arg", help="Another argument for `metal-agent run`, e.g. --extra-arg=--threads=8 (repeatable, kept in order).")] = None,
    log_dir: Annotated[Path | None, typer.Option(help="Agent and llama-server logs (default: ~/Library/Logs/metal-agent).")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Process records and working directory (default: ~/Library/Application Support/metal-agent).")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="File to write (atomically), or '-' for stdout.")] = "-",
    mode: Annotated[Mode, typer.Option(help="agent: a LaunchAgent (runs while you are logged in at the GUI); daemon: a LaunchDaemon that starts at boot and runs as --user-name.")] = Mode.AGENT,
    user_name: Annotated[str | None, typer.Option(help="Daemon mode: the user the agent runs as (default: you).")] = None,
    home: Annotated[Path | None, typer.Option(help="Daemon mode: that user's home, where the agent's files live (default: yours).")] = None,
) -> None:
    """Print the launchd plist (com.llmkube.metal-agent) that runs `metal-agent run`.

    Directories default to the macOS layout whatever the host, since only
    launchd reads this file. With ``--mode daemon`` the job is a LaunchDaemon
    for /Library/LaunchDaemons that launchd runs as ``--user-name`` (never
    root), with that user's home, so files and models stay in their ~/Library.
    """
    daemon = mode is Mode.DAEMON
    if not daemon and (user_name is not None or home is not None):
        typer.echo("error: --user-name and --home apply only to --mode daemon", err=True)
        raise typer.Exit(2)
    home_dir = _absolute(home) if home else str(Path.home())
    mac = default_paths(home=Path(home_dir), platform="darwin")
    if agent_path is None:
        agent_path = _default_agent_path()
        if not os.access(agent_path, os.X_OK):
            typer.echo(f"error: no metal-agent executable at {agent_path}; pass --agent-path", err=True)
            raise typer.Exit(2)
    try:
        settings = LaunchAgentSettings(
            agent_path=_absolute(agent_path),
            log_dir=_absolute(log_dir or mac.logs),
            state_dir=_absolute(state_dir or mac.state),
            kubeconfig=_absolute(kubeconfig) if kubeconfig else None,
            namespaces=tuple(namespace or ()),
            llama_server=_absolute(llama_server) if llama_server else None,
            extra_args=tuple(extra_arg or ()),
            mode=mode,
            user_name=(user_name or _current_user()) if daemon else None,
            home=home_dir if daemon else None,
        )
    except LaunchdConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    data = _render_plist(settings)
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        _write_atomically(Path(output), data)
    except OSError as exc:
        typer.echo(f"error: cannot write {output}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None


def stop_all(
    state_dir: Annotated[Path | None, typer.Option(envvar="METAL_AGENT_STATE_DIR", help="The agent's state directory (default: the platform's).")] = None,
    grace: Annotated[float, typer.Option(min=0, help="Seconds between SIGTERM and SIGKILL.")] = 10.0,
) -> None:
    """Stop the llama-servers (and the front door) an agent left running (e.g. before uninstalling).

    Reads the agent's process records and signals only processes whose pid,
    start time and command line still match a record, so a reused pid is
    never hit. Stop the agent first, or it starts them again.
    """
    from metal_agent.cli.stop_records import stop_front_door, stop_recorded

    state = state_dir or default_paths().state

    async def stop_everything() -> bool:
        engines, door = await asyncio.gather(stop_recorded(state / "processes", grace), stop_front_door(state, grace))
        return engines and door

    if not asyncio.run(stop_everything()):
        raise typer.Exit(1)

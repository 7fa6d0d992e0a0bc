"""`metal-agent power ...` and `metal-agent render-sudoers`: the Apple power tooling.

``power serve`` serves the power metrics alone (no cluster at all), for a
Mac whose only job is to report its power. ``power parse`` runs recorded or live powermetrics text through the same
parser the daemon uses, which is how one checks a new macOS release or chip
before trusting its gauges (``sudo powermetrics --samplers cpu_power,gpu_power
-i 1000 | metal-agent power parse -``). ``render-sudoers`` prints the grant
the install script checks with visudo and installs; printing it separately
lets an admin read exactly what they are about to grant.

Deliberately absent: any way to run the sampler against another binary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

import typer

from metal_agent import __version__
from metal_agent.core.powermetrics import PowerParser, PowerSample
from metal_agent.core.sudoers import SudoersError, render_sudoers as _render

__all__ = ["power_app", "render_sudoers", "sample_to_json"]

power_app = typer.Typer(
    help="Apple SoC power readings from powermetrics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def sample_to_json(sample: PowerSample) -> str:
    """One sample as a JSON object (one line).

    Keys: ``timestamp`` (the sample date exactly as powermetrics printed it),
    ``elapsed_ms`` (length of the sample window), and ``cpu_watts``,
    ``gpu_watts``, ``ane_watts``, ``combined_watts`` (power in watts, the
    values the ``llmkube_metal_agent_apple_power_*_watts`` gauges get), and
    ``gpu_active_ratio`` (0..1) and ``gpu_active_frequency_hertz``, the values
    of the ``llmkube_metal_agent_apple_gpu_*`` gauges (null when the sample
    had no such line: what to look for on a new macOS release).
    """
    return json.dumps(
        {
            "timestamp": sample.timestamp,
            "elapsed_ms": sample.elapsed_ms,
            "cpu_watts": sample.cpu_w,
            "gpu_watts": sample.gpu_w,
            "ane_watts": sample.ane_w,
            "combined_watts": sample.combined_w,
            "gpu_active_ratio": sample.gpu_active_ratio,
            "gpu_active_frequency_hertz": sample.gpu_active_hz,
        }
    )


def _stream(source: TextIO) -> None:
    parser = PowerParser()
    for line in source:
        for sample in parser.feed(line):
            typer.echo(sample_to_json(sample))
            sys.stdout.flush()  # live input: show each sample as it completes
    parser.finish()


@power_app.command("parse")
def parse(
    source: str = typer.Argument(..., metavar="FILE|-", help="powermetrics text output; '-' reads stdin."),
) -> None:
    """Print one JSON object per complete sample (keys: timestamp, elapsed_ms,
    cpu_watts, gpu_watts, ane_watts, combined_watts, power in watts; and
    gpu_active_ratio, gpu_active_frequency_hertz).

    A sample cut off at the end of the input is not printed.
    """
    if source == "-":
        _stream(sys.stdin)
        return
    try:
        with Path(source).open(encoding="utf-8", errors="replace") as handle:
            _stream(handle)
    except OSError as exc:
        typer.echo(f"error: cannot read {source}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None


def render_sudoers(
    user: str = typer.Option(..., "--user", help="The user the agent runs as (not root)."),
    interval_ms: int = typer.Option(1000, "--interval-ms", help="Sampling interval; the grant pins this exact value."),
) -> None:
    """Print the sudoers fragment that lets USER run the agent's powermetrics command.

    Install it with `make install-powermetrics-sudo` (visudo-checked, mode 0440)
    as /etc/sudoers.d/llmkube-powermetrics rather than by hand.
    """
    try:
        text = _render(user, interval_ms, version=__version__)
    except SudoersError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(text, nl=False)


@power_app.command("serve")
def serve(
    listen: str = typer.Option("127.0.0.1:9090", envvar="METAL_AGENT_LISTEN", help="host:port for /metrics, /healthz and /readyz (not authenticated: keep it on loopback unless the network is yours)."),
    interval_ms: int = typer.Option(1000, "--interval-ms", min=100, max=60000, envvar="METAL_AGENT_POWER_INTERVAL_MS", help="powermetrics sample interval; must equal the interval in the sudoers grant."),
    log_level: str = typer.Option("info", envvar="METAL_AGENT_LOG_LEVEL", help="debug, info, warning or error."),
    log_format: str = typer.Option("auto", envvar="METAL_AGENT_LOG_FORMAT", help="auto (text on a TTY, else JSON), json or text."),
) -> None:
    """Serve only the Apple power metrics (gauges, energy counter, host_info): no cluster, no models.

    Runs the same pinned `sudo powermetrics` sampler as `metal-agent run`
    (grant it with `make install-powermetrics-sudo`).
    """
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise typer.BadParameter("expected host:port, e.g. 127.0.0.1:9090", param_hint="--listen")
    # Imported here: every `metal-agent` invocation imports this module to build its command table.
    import asyncio

    from metal_agent.logging_setup import configure_logging
    from metal_agent.power_service import serve_power

    try:
        configure_logging(log_level, log_format)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--log-level")
    try:
        asyncio.run(serve_power(host.strip("[]"), int(port), interval_ms))
    except OSError as err:
        typer.echo(f"error: cannot listen on {listen} ({err.strerror or err})", err=True)
        raise typer.Exit(2) from None

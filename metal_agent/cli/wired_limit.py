"""`metal-agent render-wired-limit`: the LaunchDaemon plist that sets iogpu.wired_limit_mb at boot.

Rendered unprivileged, printed to stdout, installed by
`scripts/install-wired-limit.sh` (which is what `make install-wired-limit`
runs): the script never writes the plist's text itself, so the one fixed
command lives in `core.wired_limit_job` only.
"""

from __future__ import annotations

import typer


def render_wired_limit(
    limit_mb: str = typer.Option(..., "--limit-mb", help="The ceiling in MB (whole number, at least 1024, at most this Mac's RAM when --ram-bytes is given)."),
    ram_bytes: int = typer.Option(0, "--ram-bytes", min=0, help="This Mac's RAM (sysctl -n hw.memsize) to bound the value by; 0: not bounded."),
) -> None:
    """Print the LaunchDaemon plist that runs `/usr/sbin/sysctl iogpu.wired_limit_mb=N` at every boot."""
    from metal_agent.core.wired_limit_job import render_job

    try:
        text = render_job(limit_mb, ram_bytes or None)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(text.decode(), nl=False)

"""The `metal-agent` command. Sub-commands live in sibling modules and are registered here."""

from __future__ import annotations

import typer

from metal_agent import __version__
from metal_agent.cli.doctor import doctor
from metal_agent.cli.fleet import drain, fleet, uncordon
from metal_agent.cli.front_door import front_door
from metal_agent.cli.install import render_plist, stop_all
from metal_agent.cli.migrate import migrate
from metal_agent.cli.power import power_app, render_sudoers
from metal_agent.cli.render import render
from metal_agent.cli.reference import config_reference
from metal_agent.cli.run import GoCompatCommand, run
from metal_agent.cli.status import logs, status
from metal_agent.cli.wired_limit import render_wired_limit

app = typer.Typer(
    name="metal-agent",
    help="Serve LLMs from this Mac's Metal GPU into a Kubernetes cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(power_app, name="power")
app.command("render-sudoers")(render_sudoers)
app.command("render-wired-limit")(render_wired_limit)
app.command("render")(render)
app.command("run", cls=GoCompatCommand)(run)
app.command("config-reference", hidden=True)(config_reference)
app.command("render-plist")(render_plist)
app.command("stop-all")(stop_all)
app.command("migrate")(migrate)
app.command("doctor")(doctor)
app.command("status")(status)
app.command("logs")(logs)
app.command("fleet")(fleet)
app.command("drain")(drain)
app.command("uncordon")(uncordon)
app.command("front-door", hidden=True)(front_door)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"metal-agent {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Serve LLMs from this Mac's Metal GPU into a Kubernetes cluster."""


def main() -> None:
    app()

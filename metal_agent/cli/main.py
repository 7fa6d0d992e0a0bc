"""The `metal-agent` command. Sub-commands live in sibling modules and are registered here."""

from __future__ import annotations

import typer

from metal_agent import __version__

app = typer.Typer(
    name="metal-agent",
    help="Serve LLMs from this Mac's Metal GPU into a Kubernetes cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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

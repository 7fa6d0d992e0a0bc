"""`metal-agent doctor`: check everything the agent needs, and say how to fix what is missing.

Only the command's options live here; the checks (`metal_agent.cli.doctor_checks`)
import the Kubernetes client and the agent's adapters, and are imported when
the doctor runs, so that `metal-agent --help` and the other commands stay fast.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from metal_agent.app.config import FleetConfig
from metal_agent.cli.status import DEFAULT_LISTEN

__all__ = ["DEFAULT_POWER_INTERVAL_MS", "doctor"]

#: The agent's default `--power-interval-ms` (adapters.powermetrics.DEFAULT_INTERVAL_MS,
#: which is not imported here because that module pulls in the metrics stack;
#: a unit test holds the two equal).
DEFAULT_POWER_INTERVAL_MS = 1000


def doctor(
    kubeconfig: Annotated[Path | None, typer.Option(envvar=["METAL_AGENT_KUBECONFIG", "KUBECONFIG"], help="Kubeconfig file (default: ~/.kube/config).")] = None,
    context: Annotated[str | None, typer.Option(envvar="METAL_AGENT_CONTEXT", help="Kubeconfig context to use.")] = None,
    namespace: Annotated[list[str] | None, typer.Option("--namespace", "-n", envvar="METAL_AGENT_NAMESPACES", help="Namespace the agent watches (repeat; default: all).")] = None,
    llama_server: Annotated[str | None, typer.Option(envvar="METAL_AGENT_LLAMA_SERVER", help="llama-server binary (default: Homebrew's, then PATH).")] = None,
    mlx_server: Annotated[str | None, typer.Option(envvar="METAL_AGENT_MLX_SERVER", help="mlx_lm.server for MLX Models (default: the agent's venv, Homebrew, then PATH).")] = None,
    listen: Annotated[str, typer.Option(envvar="METAL_AGENT_LISTEN", help="The agent's --listen address.")] = DEFAULT_LISTEN,
    fleet: Annotated[bool, typer.Option("--fleet/--no-fleet", envvar="METAL_AGENT_FLEET", help="The agent runs with --fleet: check its Lease permissions too.")] = False,
    fleet_namespace: Annotated[str, typer.Option(envvar="METAL_AGENT_FLEET_NAMESPACE", help="The agent's --fleet-namespace.")] = FleetConfig.namespace,
    power_interval_ms: Annotated[int, typer.Option(envvar="METAL_AGENT_POWER_INTERVAL_MS", help="The agent's power sampling interval (the sudoers grant pins it).")] = DEFAULT_POWER_INTERVAL_MS,
) -> None:
    """Check this Mac, llama-server, the cluster and the install; print a fix for each problem.

    Exits 1 when any check fails. Mac-only checks are skipped elsewhere.
    """
    from metal_agent.cli.doctor_base import Status, format_result
    from metal_agent.cli.doctor_checks import run_checks

    namespaces = tuple(n for item in namespace or () for n in item.split(",") if n)
    results = asyncio.run(run_checks(
        kubeconfig=str(kubeconfig) if kubeconfig else None, context=context, namespaces=namespaces,
        llama_server=llama_server, listen=listen, power_interval_ms=power_interval_ms, mlx_server=mlx_server,
        fleet_namespace=fleet_namespace if fleet else None,
    ))
    for result in results:
        typer.echo(format_result(result))
    counts = {s: sum(r.status is s for r in results) for s in Status}
    typer.echo(f"\n{counts[Status.OK]} passed, {counts[Status.FAIL]} failed, {counts[Status.SKIP]} skipped")
    if counts[Status.FAIL]:
        raise typer.Exit(1)

"""`metal-agent migrate`: take over from LLMKube's Go Metal Agent, its launchd job and its models.

Reads the Go agent's plist, translates its arguments (`core.go_flags`),
adopts the models in its store into ours (`metal_agent.adapters.go_migration`: hard
links, or a move across filesystems, never a download), and writes our job
under the same label in its place. `scripts/install-metal-agent.sh` uses
`--run-args-file` instead: it takes the translated arguments and renders the
job with its own settings. `--dry-run` prints the plan and changes nothing;
a failure before the writes (the Models cannot be read, say) changes
nothing either.

The implementation (and the Kubernetes client, to read the Models) is
imported only when the command runs: this module is imported by every
`metal-agent` invocation.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from metal_agent.core.launchd import LABEL, PLIST_NAME
from metal_agent.paths import default_paths

EXIT_NOTHING_DONE = 1


def _say(line: str = "") -> None:
    typer.echo(line)


async def _list_models(kubeconfig: str | None, context: str | None, namespaces: tuple[str, ...]) -> list[dict]:
    """Every Model the new agent will watch (all namespaces when none are named)."""
    from kubernetes_asyncio import client, config

    from metal_agent.adapters.kube.client import api_client
    from metal_agent.core.names import GROUP, MODEL_PLURAL, VERSION

    configuration = client.Configuration()
    # persist_config=False: reading Models must not rewrite the user's kubeconfig (token refresh).
    await config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration,
                                  persist_config=False)
    async with api_client(configuration) as api:
        custom = client.CustomObjectsApi(api)
        if not namespaces:
            return (await custom.list_cluster_custom_object(GROUP, VERSION, MODEL_PLURAL))["items"]
        items: list[dict] = []
        for namespace in namespaces:
            items += (await custom.list_namespaced_custom_object(GROUP, VERSION, namespace, MODEL_PLURAL))["items"]
        return items


def _models(raw: list[dict]) -> list:
    """The Models that parse (an invalid one is named: the new agent will not serve it either)."""
    from metal_agent.core.model_validation import parse_model
    from metal_agent.core.result import Invalid

    models = []
    for item in raw:
        parsed = parse_model(item)
        if isinstance(parsed, Invalid):
            meta = item.get("metadata") or {}
            _say(f"  skipped  Model {meta.get('namespace')}/{meta.get('name')}: invalid "
                 f"({'; '.join(e.message for e in parsed.errors)})")
        else:
            models.append(parsed.value)
    return models


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser()))


def migrate(
    plist: Annotated[Optional[Path], typer.Option(help=f"The Go agent's job (default: ~/Library/LaunchAgents/{PLIST_NAME}).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Only tell whether the plist is the Go agent's job: exit 0 if it is, 1 if not.")] = False,
    model_dir: Annotated[Optional[Path], typer.Option(help="Our model directory, where the models go (default: the Go store itself, unless it is under /tmp: then ~/Library/Caches/metal-agent/models).")] = None,
    kubeconfig: Annotated[Optional[Path], typer.Option(help="Kubeconfig to read the Models with and for the agent (default: the Go job's, else ~/.kube/config).")] = None,
    context: Annotated[Optional[str], typer.Option(help="Kubeconfig context to read the Models with.")] = None,
    namespace: Annotated[Optional[list[str]], typer.Option("--namespace", "-n", help="Namespace for the agent, instead of the Go job's (repeat for several).")] = None,
    llama_server: Annotated[Optional[Path], typer.Option(help="llama-server for the agent, instead of the Go job's.")] = None,
    skip_models: Annotated[bool, typer.Option("--skip-models", help="Leave the Go agent's models alone (the agent downloads them again).")] = False,
    run_args_file: Annotated[Optional[Path], typer.Option(help="Write the translated `metal-agent run` arguments here, one per line, instead of writing the job (the install script's way).")] = None,
    agent_path: Annotated[Optional[Path], typer.Option(help="The metal-agent executable the job runs (default: the one beside this Python).")] = None,
    log_dir: Annotated[Optional[Path], typer.Option(help="Agent logs (default: ~/Library/Logs/metal-agent).")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(help="State directory; the Go job's plist is kept there (default: ~/Library/Application Support/metal-agent).")] = None,
) -> None:
    """Switch from LLMKube's Go Metal Agent: translate its launchd job, keep its label, adopt its models.

    Models are hard-linked into ours (moved when on another filesystem),
    never downloaded again; the Models are read from the cluster to learn
    each file's URL. Without --run-args-file the new job replaces the old
    plist; reload it with launchctl (or run `make install-metal-agent`,
    which does all of this).
    """
    from metal_agent.adapters import go_migration as m

    mac = default_paths(platform="darwin")
    plist = _absolute(plist) if plist else Path.home() / "Library" / "LaunchAgents" / PLIST_NAME
    try:
        job = m.read_go_job(plist)
    except m.MigrationError as err:
        typer.echo(str(err), err=not isinstance(err, m.NotTheGoAgent))
        raise typer.Exit(EXIT_NOTHING_DONE) from None
    if check:
        _say(f"{plist} runs LLMKube's Go agent ({job.program[0]})")
        return

    overrides = {"kubeconfig": str(_absolute(kubeconfig)) if kubeconfig else None,
                 "namespaces": tuple(namespace) if namespace else None,
                 "llama_server": str(_absolute(llama_server)) if llama_server else None}
    settings = m.job_settings(job, default_model_dir=mac.models,
                              model_dir=_absolute(model_dir) if model_dir else None, **overrides)
    model_dir = _absolute(settings.model_dir)

    run_args = _translate(plist, job, settings, model_dir)
    state = _absolute(state_dir) if state_dir else mac.state
    launch = None if run_args_file is not None else _launch_settings(
        settings, run_args, agent_path, _absolute(log_dir) if log_dir else mac.logs, state)
    try:
        plan = _plan(m, job, settings, model_dir, context, skip_models)
    except m.MigrationError as err:
        typer.echo(f"error: {err}\nnothing was changed", err=True)
        raise typer.Exit(EXIT_NOTHING_DONE) from None
    if dry_run:
        _say("dry run: nothing was changed")
        return

    _adopt(m, plan)
    state.mkdir(parents=True, exist_ok=True)
    backup = state / "llmkube-go-agent.plist"
    backup.write_bytes(plist.read_bytes())
    _say(f"the Go agent's job is kept in {backup}")

    if run_args_file is not None:
        run_args_file.write_text("".join(f"{a}\n" for a in run_args))
        return
    _write_job(plist, launch)


def _translate(plist: Path, job, settings, model_dir: Path) -> list[str]:
    """The `metal-agent run` arguments the Go job becomes, printed with what is ignored and why."""
    _say(f"LLMKube's Go agent job {plist} (label {LABEL}, kept):")
    _say(f"  {shlex.join(job.program)}")
    run_args = [*settings.run_args, f"--model-dir={model_dir}"]
    if settings.kubeconfig:
        run_args.append(f"--kubeconfig={settings.kubeconfig}")
    run_args += [f"--namespace={ns}" for ns in settings.namespaces]
    if settings.llama_server:
        run_args.append(f"--llama-server={settings.llama_server}")
    _say("becomes:")
    _say(f"  metal-agent run {shlex.join(run_args)}")
    if settings.ignored:
        from metal_agent.core.go_flags import describe_ignored

        _say(f"ignored (metal-agent has no use for them): {describe_ignored(settings.ignored)}")
    for note in settings.notes:
        _say(f"note: {note}")
    return run_args


def _adopt(m, plan) -> None:
    """Every planned adoption, or none past the first failure (exit, the job left unchanged)."""
    for adoption in plan.adoptions:
        try:
            m.adopt(adoption)
        except OSError as err:
            typer.echo(f"error: adopting {adoption.source} for Model {adoption.model} failed: {err}; "
                       f"the job was not changed (run migrate again once fixed)", err=True)
            raise typer.Exit(EXIT_NOTHING_DONE) from None
    done = [a.action for a in plan.adoptions]
    if done:
        _say(f"adopted {len(done)} model file(s): {done.count('link')} hard-linked, {done.count('move')} moved, "
             f"{done.count('present')} already in place")


def _plan(m, job, settings, model_dir: Path, context: str | None, skip_models: bool):
    """The adoptions, printed; the Models are read only when the store holds a file."""
    contents = m.scan_store(job.store)
    if skip_models or not contents.files:
        why = "--skip-models" if skip_models else "it holds no model file"
        _say(f"models: none adopted from {job.store} ({why})")
        return m.AdoptionPlan((), ())
    _say(f"models: from {job.store} into {model_dir}")
    kubeconfig = settings.kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if os.pathsep not in kubeconfig and not os.path.exists(kubeconfig):
        raise m.MigrationError(
            f"no kubeconfig at {kubeconfig} to read the Models that match the {len(contents.files)} file(s) in "
            f"{job.store} with their URLs: pass --kubeconfig, or --skip-models to let the agent download them again")
    try:
        raw = asyncio.run(_list_models(settings.kubeconfig, context, settings.namespaces))
    except Exception as err:  # noqa: BLE001 - kubeconfig, network, RBAC: all mean "cannot learn the URLs"
        where = " ".join(settings.namespaces) or "all namespaces"
        raise m.MigrationError(
            f"cannot read the Models ({where}) to match the {len(contents.files)} file(s) in {job.store} "
            f"with their URLs: {type(err).__name__}: {err}. Fix the kubeconfig (--kubeconfig), or pass "
            "--skip-models and let the agent download them again") from None
    plan = m.plan_adoptions(contents, _models(raw), model_dir)
    verbs = {"link": "link", "move": "move", "present": "in place"}
    for adoption in plan.adoptions:
        _say(f"  {verbs[adoption.action]:<8} {adoption.model}: {adoption.source} -> {adoption.target}")
    for path in plan.left:
        _say(f"  left     {path} (no Model names it; it stays in the Go store)")
    return plan


def _launch_settings(settings, run_args: list[str], agent_path: Path | None, log_dir: Path, state: Path):
    """Our job's settings, checked before anything is changed."""
    from metal_agent.core.launchd import LaunchAgentSettings, LaunchdConfigError

    agent = _absolute(agent_path) if agent_path else Path(os.path.abspath(sys.executable)).parent / "metal-agent"
    if not os.access(agent, os.X_OK):
        typer.echo(f"error: no metal-agent executable at {agent}; pass --agent-path\nnothing was changed", err=True)
        raise typer.Exit(EXIT_NOTHING_DONE)
    # kubeconfig, namespaces and llama-server go in as the job's own settings; the rest as run arguments.
    own = ("--kubeconfig=", "--namespace=", "--llama-server=")
    try:
        return LaunchAgentSettings(agent_path=str(agent), log_dir=str(log_dir), state_dir=str(state),
                                   kubeconfig=settings.kubeconfig, namespaces=settings.namespaces,
                                   llama_server=settings.llama_server,
                                   extra_args=tuple(a for a in run_args if not a.startswith(own)))
    except LaunchdConfigError as err:
        typer.echo(f"error: {err}\nnothing was changed", err=True)
        raise typer.Exit(EXIT_NOTHING_DONE) from None


def _write_job(plist: Path, launch) -> None:
    """Our job, same label, in place of the Go agent's plist."""
    from metal_agent.cli.install import _write_atomically
    from metal_agent.core.launchd import render_plist

    Path(launch.log_dir).mkdir(parents=True, exist_ok=True)  # launchd opens the log before exec
    _write_atomically(plist, render_plist(launch))
    uid = os.getuid()
    _say(f"wrote {plist}: launchd runs the Go agent until the job is reloaded:")
    _say(f"  launchctl bootout gui/{uid}/{LABEL}; launchctl bootstrap gui/{uid} {shlex.quote(str(plist))}")

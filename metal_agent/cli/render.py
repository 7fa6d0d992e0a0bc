"""`metal-agent render`: show the command line (llama-server, or mlx_lm.server for MLX Models) for a manifest, offline.

Runs the same claim, validation and argv code as the daemon, on YAML files
instead of a cluster, so a manifest can be checked (and its command line
reviewed) before it is applied. It refuses exactly what the agent refuses,
with the agent's defaults: the same extraArgs allowlist and model roots,
widened by the same flags (`--allow-extra-arg`, `--allowed-model-roots`,
`--model-dir`: `cli.spec_policy_flags`); a refusal's line starts with its
reason (ExtraArgRefused, SourceNotAllowed). Output is a JSON array on stdout; problems
go to stderr, one per line, and exit with status 2.

YAML and the host and binary probes are imported when `render` runs, not
with this module: every `metal-agent` invocation imports it to build its
command table.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, List, NoReturn, Optional

import typer

from metal_agent.cli.spec_policy_flags import allow_extra_arg_option, allowed_model_roots_option, build_policy
from metal_agent.core.api import ModelSource
from metal_agent.core.claim import evaluate, wanted_model
from metal_agent.core.engine_name import EngineName
from metal_agent.core.engines import engine_for
from metal_agent.core.flags import Dialect
from metal_agent.core.launch import Instance, LaunchSettings
from metal_agent.core.mlx_dialect import MlxDialect
from metal_agent.core.result import Invalid, NotOurs, Parsed
from metal_agent.core.spec_policy import SpecPolicy
from metal_agent.core.workload import Workload

API_GROUP = "inference.llmkube.dev/"
EXIT_INVALID = 2

#: Where downloaded models are shown to live; a display placeholder only.
MODEL_CACHE_DISPLAY = "~/Library/Caches/metal-agent/models"


class _Usage(Exception):
    """A problem with the input files themselves, reported as one line."""


def render(
    model: Annotated[
        list[Path] | None,
        typer.Option("--model", "-m", help="YAML file with the Model.", dir_okay=False, exists=True),
    ] = None,
    isvc: Annotated[
        list[Path] | None,
        typer.Option(
            "--isvc", "-i", help="YAML file with the InferenceService.", dir_okay=False, exists=True
        ),
    ] = None,
    file: Annotated[
        list[Path] | None,
        typer.Option(
            "--file", "-f", help="Multi-document YAML with both objects.", dir_okay=False, exists=True
        ),
    ] = None,
    model_path: Annotated[
        str | None,
        typer.Option(help="Model file to pass to --model (default: derived from spec.source)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address llama-server listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port llama-server listens on.", min=1, max=65535)] = 8080,
    threads: Annotated[
        int | None,
        typer.Option(help="--threads value (default: this host's performance cores).", min=1),
    ] = None,
    llama_server: Annotated[
        str | None,
        typer.Option(
            help="llama-server binary for argv[0]; its --help decides how mlock is spelled."
        ),
    ] = None,
    mlock: Annotated[bool, typer.Option(help="Lock the model in RAM.")] = True,
    mlx_server: Annotated[
        str | None,
        typer.Option(help="mlx_lm.server for MLX Models' argv (a Python script is shown run by its interpreter)."),
    ] = None,
    default_runtime: Annotated[
        str, typer.Option(help="Engine for Models whose format names none (custom): llama-server or mlx-lm.")
    ] = "llama-server",
    model_dir: Optional[Path] = typer.Option(None, envvar="METAL_AGENT_MODEL_DIR",
                                             help="The agent's model store: the default --allowed-model-roots."),
    allow_extra_arg: List[str] = allow_extra_arg_option(),
    allowed_model_roots: List[str] = allowed_model_roots_option(),
) -> None:
    """Print the argv (llama-server, or mlx_lm.server for MLX Models) for an InferenceService and its Model as JSON."""
    from metal_agent.adapters.host_cpu import performance_core_count

    paths = [*(model or []), *(isvc or []), *(file or [])]
    workload, policy = _accepted(paths, default_runtime, allow_extra_arg, allowed_model_roots, model_dir)

    engine_name = EngineName(default_runtime)
    engine = engine_for(workload, engine_name)
    llama, mlx, dialect, mlx_dialect = llama_server or "llama-server", (), Dialect(), MlxDialect()
    if engine.name is EngineName.MLX_LM:
        mlx, mlx_dialect = _probe_mlx(mlx_server)
    else:
        dialect = _probe_dialect(llama_server)
    settings = LaunchSettings(
        llama_server=llama, mlx_server=mlx, host=host, mlock=mlock, dialect=dialect,
        threads=threads if threads is not None else asyncio.run(performance_core_count()),
        default_engine=engine_name, policy=policy, mlx_dialect=mlx_dialect,
    )
    if refused := engine.server_refusals(workload, settings):
        _fail([_described(error) for error in refused])  # the agent on this Mac would refuse it too
    instance = Instance(model_path or placeholder_model_path(workload.model.spec.source, workload.model.spec.files),
                        port)
    typer.echo(json.dumps(list(engine.argv(workload, settings, instance))))


def _accepted(paths: list[Path], default_runtime: str, allow_extra_arg: List[str], allowed_model_roots: List[str],
              model_dir: Optional[Path]) -> tuple[Workload, SpecPolicy]:
    """The Workload the manifests describe, held to the policy the agent would apply; exits saying why not."""
    if not paths:
        _fail(["give the manifests with --model and --isvc, or -f"])
    try:
        isvc_doc, model_doc = _pick(_load(paths))
    except _Usage as problem:
        _fail([str(problem)])

    if default_runtime not in ("llama-server", "mlx-lm"):
        _fail(["--default-runtime: expected llama-server or mlx-lm"])
    from metal_agent.adapters.model_roots import workload_refusals
    from metal_agent.paths import default_paths

    try:
        policy = build_policy(allow_extra_arg, allowed_model_roots, model_dir or default_paths().models)
    except ValueError as err:
        _fail([str(err)])
    outcome = evaluate(isvc_doc, model_doc, default_engine=default_runtime, policy=policy)
    if isinstance(outcome, NotOurs):
        _fail([f"InferenceService {_key(isvc_doc)} is not served by metal-agent: {outcome.reason}"])
    if isinstance(outcome, Parsed) and (refused := workload_refusals(outcome.value, model_doc, policy.model_roots)):
        outcome = Invalid(refused)
    if isinstance(outcome, Invalid):
        _fail([_described(error) for error in outcome.errors])
    assert isinstance(outcome, Parsed)
    return outcome.value, policy


def placeholder_model_path(source: ModelSource, files: tuple[str, ...] = ()) -> str:
    """The file llama-server would be given, as far as we can tell offline.

    Local sources are their own path; anything downloaded is shown under the
    agent's cache with its file name, marked by the unexpanded `~` as a
    placeholder rather than a file that exists. A file set (`spec.files`) is
    loaded from its first file, below the source (or the set's cache directory).
    """
    if files:
        return f"{source.local_path or MODEL_CACHE_DISPLAY}/{files[0]}"
    return source.local_path or f"{MODEL_CACHE_DISPLAY}/{source.file_name or 'model.gguf'}"


def _described(error) -> str:
    """The error as the agent's status says it, with the reason of a refusal first."""
    return f"{error.reason}: {error.describe()}" if error.reason else error.describe()


def _fail(lines: Iterable[str]) -> NoReturn:
    for line in lines:
        typer.echo(line, err=True)
    raise typer.Exit(EXIT_INVALID)


def _load(paths: list[Path]) -> list[dict[str, Any]]:
    import yaml

    docs: list[dict[str, Any]] = []
    for path in paths:
        try:
            loaded = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise _Usage(f"{path}: cannot read YAML: {exc}") from exc
        for index, doc in enumerate(loaded):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise _Usage(f"{path}: document {index + 1} is not a mapping")
            docs.append(doc)
    return docs


def _kind(doc: dict[str, Any]) -> str | None:
    api_version = doc.get("apiVersion")
    if not isinstance(api_version, str) or not api_version.startswith(API_GROUP):
        return None
    kind = doc.get("kind")
    return kind if isinstance(kind, str) else None


def _pick(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The one InferenceService, and the Model it names (or the only Model given)."""
    isvcs = [doc for doc in docs if _kind(doc) == "InferenceService"]
    models = [doc for doc in docs if _kind(doc) == "Model"]
    if len(isvcs) != 1:
        raise _Usage(f"expected exactly one InferenceService ({API_GROUP}v1alpha1), found {len(isvcs)}")
    isvc = isvcs[0]
    wanted = wanted_model(isvc)
    named = [m for m in models if wanted is not None and _namespace_name(m) == wanted]
    if named:
        return isvc, named[0]
    return isvc, models[0] if len(models) == 1 else None


def _namespace_name(doc: dict[str, Any]) -> tuple[Any, Any]:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return (meta.get("namespace") or "default", meta.get("name"))


def _key(doc: dict[str, Any]) -> str:
    namespace, name = _namespace_name(doc)
    return f"{namespace}/{name}"


def _probe_mlx(explicit: str | None) -> tuple[tuple[str, ...], MlxDialect]:
    """How the agent would start mlx_lm.server here and what that server accepts, probed as the
    agent probes it at start-up (its source's option list, else `--help`), so that `render`
    refuses what this Mac's mlx-lm is too old for and prints the argv it can parse.
    Without a runnable server, a current mlx-lm is assumed."""
    from metal_agent.adapters.mlx_binary import exec_form, find_mlx_server, probe, probe_dialect

    path = find_mlx_server(explicit)
    if not path:
        return ("python3", "mlx_lm.server"), MlxDialect()
    found = asyncio.run(probe(path))
    if isinstance(found, str):  # not runnable here: shown as given, a current mlx-lm assumed
        return exec_form(path), MlxDialect()
    return found.command, asyncio.run(probe_dialect(found))


def _probe_dialect(binary: str | None) -> Dialect:
    """Ask the binary how it spells its flags (mlock, verbosity, --no-jinja), as the agent
    does, so `render` prints the command line the agent would run; the defaults if it cannot say."""
    if not binary:
        return Dialect()
    from metal_agent.adapters.llama_binary import LlamaServerMissing, probe

    try:
        return asyncio.run(probe(binary)).dialect
    except (LlamaServerMissing, OSError, TimeoutError):
        return Dialect()

"""Switching from LLMKube's Go Metal Agent: its launchd job and the models it downloaded.

Why this exists: a user of the Go agent has a LaunchAgent with our label
(`com.llmkube.metal-agent`) running `llmkube-metal-agent --namespace ...
--model-store /tmp/llmkube-models ...`, and tens of GB of models in that
store. Swapping agents must keep what the job meant (its flags, translated
by `core.go_flags`) and must not download those models again.

The two stores are laid out differently:

* Go agent (`pkg/agent/executor.go`, `ensureModel`): `<store>/<Model name>/<base
  name of spec.source>`, the base name taken from the raw source string as
  Go's `filepath.Base` does (a query string stays in it); a file is used
  when it exists and is not empty; `<file>.partial` is a download in
  progress. The Model's namespace is not part of the path.
* metal-agent (`adapters.model_cache`): `<model dir>/<sha256(url)[:16]>/<file
  name>`, keyed by the URL, which the store does not record.

So the files are matched to the URLs through the Models themselves (the
caller lists them): for each downloadable Model whose Go path exists, the
file is hard-linked into our path when both are on one filesystem (no bytes
copied, and the Go agent's copy stays usable for a rollback), or else moved
(copied beside the target, renamed into place whole, then removed from the
store). Our agent then finds the file where it looks, hashes it once, and
sends no request. Anything else in the store is left where it is and named.
"""

from __future__ import annotations

import os
import plistlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from metal_agent.adapters.model_cache import CachePaths, safe_file_name
from metal_agent.core.api import Model, SourceKind
from metal_agent.core.go_flags import MLX_LM_INSTALL, GoCommandLine, Ignored, parse_go_argv, translate
from metal_agent.core.go_values import GoFlagError
from metal_agent.core.launchd import LABEL
from metal_agent.core.model_urls import HF_ENDPOINT, resolve_source

#: The Go agent's default `--model-store`.
GO_DEFAULT_STORE = "/tmp/llmkube-models"
#: Directories macOS empties on its own (the daily periodic job removes files in /tmp unused for 3 days;
#: /var/folders is the per-user temporary area). A store there is not kept as our model directory.
_TEMPORARY_ROOTS = ("/tmp", "/private/tmp", "/var/folders", "/private/var/folders")
#: Flags `migrate` settles itself rather than through the flag table.
_SETTLED_HERE = ("model-store", "kubeconfig", "namespace", "llama-server")


class MigrationError(Exception):
    """Something that stops the migration before it changes anything; the message says what to do."""


class NotTheGoAgent(MigrationError):
    """The job is not the Go agent's (absent, another label, or already metal-agent's own)."""


# -- the launchd job ----------------------------------------------------------------------


@dataclass(frozen=True)
class GoJob:
    """The Go agent's launchd job as it ran: its arguments as Go read them, and its environment."""

    path: Path
    program: tuple[str, ...]
    cmdline: GoCommandLine
    environment: dict[str, str]
    working_directory: str = "/"  # launchd's default; a relative --model-store was relative to it

    @property
    def store(self) -> Path:
        return Path(self.working_directory) / (self.cmdline.value("model-store") or GO_DEFAULT_STORE)


def is_metal_agent_argv(argv: Sequence[str]) -> bool:
    """Our own job runs `metal-agent run ...` (or `python -m metal_agent run ...`)."""
    return len(argv) >= 2 and (argv[1] == "run" or (argv[1:3] == ["-m", "metal_agent"]))


def read_go_job(path: Path) -> GoJob:
    """The Go agent's job at `path`; NotTheGoAgent when it is not one, MigrationError when it is unreadable."""
    try:
        data = plistlib.loads(path.read_bytes())
    except FileNotFoundError:
        raise NotTheGoAgent(f"{path} does not exist: there is no launchd job to migrate") from None
    except (OSError, plistlib.InvalidFileException, ValueError) as err:
        raise MigrationError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict) or data.get("Label") != LABEL:
        label = data.get("Label") if isinstance(data, dict) else None
        raise NotTheGoAgent(f"{path} is not LLMKube's metal agent job (its Label is {label!r}, not {LABEL!r})")
    argv = data.get("ProgramArguments")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise MigrationError(f"{path} has no ProgramArguments list of strings")
    if is_metal_agent_argv(argv):
        raise NotTheGoAgent(f"{path} already runs metal-agent: nothing to migrate")
    try:
        cmdline = parse_go_argv(argv[1:])
    except GoFlagError as err:
        raise MigrationError(f"{path}: the Go agent itself would refuse its arguments ({err}), so it cannot "
                             "have been running; fix the job or install metal-agent without migrating") from None
    env = data.get("EnvironmentVariables")
    environment = {k: v for k, v in env.items() if isinstance(v, str)} if isinstance(env, dict) else {}
    workdir = data.get("WorkingDirectory")
    return GoJob(path, tuple(argv), cmdline, environment, workdir if isinstance(workdir, str) and workdir else "/")


@dataclass(frozen=True)
class JobSettings:
    """What our job runs with, from the Go job and the caller's choices (which win)."""

    run_args: tuple[str, ...]  # everything but the four below, translated
    kubeconfig: str | None
    namespaces: tuple[str, ...]
    llama_server: str | None
    model_dir: Path
    ignored: tuple[Ignored, ...]
    notes: tuple[str, ...]


#: The Go agent's MLX runtime is a Swift binary that cannot run our command line: say what runs instead.
_MLX_NOTE = ("MLX: the Go job's {binary} (the Swift mlx-server) is not used; metal-agent serves MLX Models with "
             "mlx-lm's mlx_lm.server. Install it with " + MLX_LM_INSTALL + "; `metal-agent doctor` says whether "
             "it is found. Without it MLX services wait (RuntimeMissing); GGUF Models run anyway")


def is_temporary(path: Path) -> bool:
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root + "/") for root in _TEMPORARY_ROOTS)


def job_settings(job: GoJob, *, default_model_dir: Path, model_dir: Path | None = None,
                 kubeconfig: str | None = None, namespaces: Sequence[str] | None = None,
                 llama_server: str | None = None) -> JobSettings:
    """Translate the Go job. Keyword arguments given by the caller replace the Go job's values.

    The model directory: the caller's; else the Go store itself when it is
    somewhere the user chose (a big external disk stays in use, and linking
    within it is free); else (the Go default, under /tmp, which macOS cleans)
    `default_model_dir`.
    """
    translation = translate(job.cmdline, skip=_SETTLED_HERE)
    notes: list[str] = []
    values = job.cmdline.values

    if kubeconfig is None:
        kubeconfig = values.get("kubeconfig") or None
        env_kubeconfig = job.environment.get("KUBECONFIG")
        if kubeconfig is None and env_kubeconfig:
            if os.pathsep in env_kubeconfig:
                notes.append(f"KUBECONFIG={env_kubeconfig} lists several files; metal-agent reads one: "
                             "pass --kubeconfig (it now uses ~/.kube/config)")
            else:
                kubeconfig = env_kubeconfig
    if namespaces is None:
        namespace = job.cmdline.value("namespace")
        namespaces = (namespace,) if namespace else ()
    if llama_server is None:
        llama_server = values.get("llama-server") or None

    store = job.store
    if model_dir is None:
        if is_temporary(store):
            model_dir = default_model_dir
            notes.append(f"models move out of {store}: macOS empties temporary directories on its own")
        else:
            model_dir = store
    if values.get("mlx-server-bin") or job.cmdline.value("runtime") == "mlx-server":
        notes.append(_MLX_NOTE.format(binary=values.get("mlx-server-bin") or "defilantech's mlx-server"))
    if job.cmdline.unread:
        notes.append("the Go agent stopped reading its arguments at " + " ".join(job.cmdline.unread)
                     + " (a non-flag), so those were never in effect and are not carried over")
    for name in sorted(set(job.environment) - {"PATH", "KUBECONFIG"}):
        notes.append(f"environment variable {name} of the Go job is not carried over")
    return JobSettings(translation.args, kubeconfig, tuple(namespaces), llama_server, model_dir,
                       translation.ignored, tuple(notes))


# -- the model store -----------------------------------------------------------------------


def go_file_name(source: str) -> str:
    """Go's `filepath.Base(source)`: the last element after trailing slashes are dropped."""
    trimmed = source.rstrip("/")
    if not trimmed:
        return "/" if source else "."
    return trimmed.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class StoreFile:
    model_name: str  # the directory: the Model's name, in any namespace
    path: Path


@dataclass(frozen=True)
class StoreContents:
    files: tuple[StoreFile, ...]  # complete model files, `<store>/<dir>/<file>`
    other: tuple[Path, ...]  # partial downloads, empty files, directories, logs: never adopted


def scan_store(store: Path) -> StoreContents:
    """What the Go agent's store holds; an absent store holds nothing."""
    files: list[StoreFile] = []
    other: list[Path] = []
    try:
        entries = sorted(store.iterdir())
    except FileNotFoundError:
        return StoreContents((), ())
    except OSError as err:
        raise MigrationError(f"cannot list the Go agent's model store {store}: {err.strerror or err}") from None
    for entry in entries:
        if not entry.is_dir() or entry.is_symlink():
            other.append(entry)
            continue
        for item in sorted(entry.iterdir()):
            complete = (item.is_file() and not item.is_symlink() and not item.name.endswith(".partial")
                        and item.stat().st_size > 0)
            (files.append(StoreFile(entry.name, item)) if complete else other.append(item))
    return StoreContents(tuple(files), tuple(other))


@dataclass(frozen=True)
class Adoption:
    """One Model's file going from the Go store into ours.

    action: `link` (same filesystem), `move` (another filesystem), `present`
    (our cache already has that file: nothing to do).
    """

    model: str  # namespace/name
    source: Path
    target: Path
    action: str


@dataclass(frozen=True)
class AdoptionPlan:
    adoptions: tuple[Adoption, ...]
    left: tuple[Path, ...]  # store files no Model names, and everything else in the store


def _device(path: Path) -> int:
    """The filesystem `path` is on, or would be on once created (its nearest existing ancestor's)."""
    for candidate in (path, *path.parents):
        try:
            return candidate.stat().st_dev
        except FileNotFoundError:
            continue
    raise MigrationError(f"no existing directory above {path}")


def plan_adoptions(contents: StoreContents, models: Iterable[Model], model_dir: Path,
                   hf_endpoint: str = HF_ENDPOINT) -> AdoptionPlan:
    """Which store file each downloadable Model would use, and where it goes in ours.

    A file several Models share (same name and source, several namespaces)
    is moved at most once; the others link to where it went.
    """
    by_key = {(f.model_name, f.path.name): f for f in contents.files}
    used: dict[Path, Path] = {}  # store file -> our first target for it
    adoptions: list[Adoption] = []
    for model in models:
        source = model.spec.source
        if source.kind not in (SourceKind.HTTP, SourceKind.HUGGINGFACE):
            continue  # local files are used in place; other kinds are never downloaded
        found = by_key.get((model.meta.name, go_file_name(source.raw)))
        url = resolve_source(source, hf_endpoint)
        if found is None or not isinstance(url, str) or not safe_file_name(source.file_name):
            continue
        target = CachePaths.for_url(model_dir, url, source.file_name).final
        key = f"{model.meta.namespace}/{model.meta.name}"
        if target.exists():
            adoptions.append(Adoption(key, found.path, target, "present"))
            continue
        first = used.get(found.path)
        if first is not None:
            adoptions.append(Adoption(key, first, target, "link"))
            continue
        used[found.path] = target
        same_fs = _device(found.path) == _device(target.parent)
        adoptions.append(Adoption(key, found.path, target, "link" if same_fs else "move"))
    named = {a.source for a in adoptions} | set(used)
    left = [f.path for f in contents.files if f.path not in named]
    return AdoptionPlan(tuple(adoptions), (*left, *contents.other))


def adopt(adoption: Adoption) -> None:
    """Carry out one adoption. The target only ever appears whole (a link, or a rename of a full copy)."""
    if adoption.action == "present":
        return
    target = adoption.target
    target.parent.mkdir(parents=True, exist_ok=True)
    if adoption.action == "link":
        os.link(adoption.source, target)
        return
    staging = target.with_name(target.name + ".adopting")
    try:
        with adoption.source.open("rb") as src, staging.open("wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        shutil.copystat(adoption.source, staging)
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    adoption.source.unlink()

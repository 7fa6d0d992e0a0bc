"""The checks behind `metal-agent doctor`: everything the agent needs, and how to fix what is missing.

Each check is a small async function returning a `CheckResult`, so it can
be tested on its own; `run_checks` runs them concurrently and returns them
in a fixed order. Checks that only make sense on a Mac (Apple Silicon,
Metal, launchd, the powermetrics grant) are *skipped* elsewhere, never
failed: developers run the agent on Linux against a CPU llama-server.

Every external command runs through `asyncio.create_subprocess_exec` (no
shell) with a timeout: a hung `system_profiler` must not hang the doctor.

This module imports the Kubernetes client and the agent's adapters, so it is
kept apart from the command (`metal_agent.cli.doctor`), which imports it only
when the doctor actually runs: `metal-agent --help` must not pay for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
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

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.adapters import llama_binary
from metal_agent.adapters.sudo_grant import check_sudo_grant
from metal_agent.cli.agent_client import fetch_services
from metal_agent.cli.status import AgentUnreachable
from metal_agent.core.names import GROUP, ISVC_PLURAL, MODEL_PLURAL, VERSION
from metal_agent.core.claim import evaluate, wanted_model
from metal_agent.core.permissions import AGENT_PERMISSIONS, FLEET_PERMISSIONS, Permission
from metal_agent.core.result import NotOurs
from metal_agent.core.status_owner import StatusMode, decide, shows_controller
from metal_agent.core.launchd import LAUNCH_DAEMONS_DIR, LAUNCHD_PATH, Mode, plist_path, service_target
from metal_agent.paths import HOMEBREW_BIN_DIRS, find_llama_server
from metal_agent.tasks import within

__all__ = [
    "CheckResult", "Status", "check_agent", "check_apple_silicon", "check_crds", "check_kube", "check_launchd",
    "check_llama_server", "check_memory", "check_metal", "check_permissions", "check_sudo", "cluster_checks",
    "format_result", "memory_result", "run_checks",
    "check_firewall", "check_metal_device", "parse_app_blocked", "parse_global_state", "parse_list_devices",
]

LAUNCHCTL = "/bin/launchctl"
SOCKETFILTERFW = "/usr/libexec/ApplicationFirewall/socketfilterfw"
# llama-server compiles Metal's shaders at its first run on a Mac: seconds.
LIST_DEVICES_TIMEOUT_S = 60.0
SYSCTL = "/usr/sbin/sysctl"
SYSTEM_PROFILER = "/usr/sbin/system_profiler"
COMMAND_TIMEOUT_S = 10.0
SYSTEM_PROFILER_TIMEOUT_S = 30.0  # it enumerates displays and GPUs; slow on a busy machine
API_TIMEOUT_S = 10.0
GiB = 1024**3
# Smallest useful quantized model plus its KV cache: less free than this and nothing will load.
MIN_MODEL_BYTES = 2 * GiB
RBAC_FIX = (
    "kubectl apply -f manifests/rbac/metal-agent.yaml (from the metal-agent checkout) and make sure the "
    "kubeconfig's identity is bound to it (ServiceAccount metal-agent/metal-agent or user metal-agent)"
)


class Status(enum.Enum):
    OK = "✓"
    FAIL = "✗"
    SKIP = "–"


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    fix: str | None = None


def ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.OK, detail)


def fail(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, Status.FAIL, detail, fix)


def skip(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.SKIP, detail)


def _is_mac(system: str | None) -> bool:
    return (system or platform.system()) == "Darwin"


def _not_mac(name: str, system: str | None) -> CheckResult:
    return skip(name, f"only on macOS (this is {system or platform.system()})")


async def _run(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT_S, **how) -> tuple[int, str]:
    """Exit status and stdout+stderr of a command; kills it on timeout (TimeoutError).

    `how` goes to `create_subprocess_exec` (env, cwd, user, start_new_session); the
    environment defaults to ours with `LC_ALL=C`, so output is parsed in one language.
    """
    how.setdefault("env", {**os.environ, "LC_ALL": "C"})
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        **how,
    )
    try:
        out, _ = await within(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise TimeoutError(f"{argv[0]} did not finish within {timeout:.0f}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


# --- the Mac itself ----------------------------------------------------------


async def check_apple_silicon(system: str | None = None) -> CheckResult:
    name = "Apple Silicon"
    if not _is_mac(system):
        return _not_mac(name, system)
    try:
        rc, arm64 = await _run([SYSCTL, "-n", "hw.optional.arm64"])
        _, brand = await _run([SYSCTL, "-n", "machdep.cpu.brand_string"])
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
    if not _is_mac(system):
        return _not_mac(name, system)
    try:
        _, out = await _run([SYSTEM_PROFILER, "SPDisplaysDataType"], SYSTEM_PROFILER_TIMEOUT_S)
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


# --- the cluster -----------------------------------------------------------------


async def _load_api(kubeconfig: str | None, context: str | None) -> client.ApiClient:
    configuration = client.Configuration()
    # persist_config=False: a doctor must not rewrite the user's kubeconfig (token refresh).
    await config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration,
                                  persist_config=False)
    return client.ApiClient(configuration)


async def check_kube(api: client.ApiClient) -> CheckResult:
    name = "Kubernetes API"
    host = api.configuration.host
    try:
        info = await client.VersionApi(api).get_code(_request_timeout=API_TIMEOUT_S)
    except ApiException as exc:
        return fail(name, f"{host} answered {exc.status} {exc.reason}",
                    "the kubeconfig's credentials are not accepted: renew the token or certificate")
    except Exception as exc:  # noqa: BLE001 - connection, TLS and timeout errors all mean "no answer"
        return fail(name, f"no answer from {host}: {type(exc).__name__}: {exc}",
                    "check the server address in the kubeconfig (--kubeconfig, --context) and that this Mac "
                    "can reach it (VPN, firewall)")
    return ok(name, f"{host} answers (Kubernetes {info.git_version})")


async def check_crds(api: client.ApiClient) -> CheckResult:
    """Asked through discovery, which every authenticated identity may read.

    Reading the CustomResourceDefinition objects themselves would need
    apiextensions access the least-privilege agent role does not have, and
    discovery answers the real question: does the server serve the version
    the agent speaks.
    """
    name = "CRDs"
    group_version = f"{GROUP}/{VERSION}"
    fix = f"install LLMKube, or this checkout's CRDs: kubectl apply -k manifests/ (serves {group_version})"
    try:
        listing = await client.CustomObjectsApi(api).get_api_resources(GROUP, VERSION, _request_timeout=API_TIMEOUT_S)
    except ApiException as exc:
        if exc.status == 404:
            return fail(name, f"the API server does not serve {group_version}", fix)
        return fail(name, f"discovery of {group_version} failed: {exc.status} {exc.reason}", fix)
    except Exception as exc:  # noqa: BLE001
        return fail(name, f"discovery of {group_version} failed: {type(exc).__name__}: {exc}", fix)
    served = {r.name for r in listing.resources or ()}
    missing = [p for p in (MODEL_PLURAL, ISVC_PLURAL) if p not in served]
    if missing:
        return fail(name, f"{group_version} does not serve {', '.join(missing)}", fix)
    return ok(name, f"{MODEL_PLURAL}.{GROUP} and {ISVC_PLURAL}.{GROUP} served at {VERSION}")


async def _allowed(api: client.ApiClient, perm: Permission, namespace: str) -> bool:
    review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
        resource_attributes=client.V1ResourceAttributes(
            verb=perm.verb, group=perm.group, resource=perm.resource, subresource=perm.subresource or None,
            namespace=namespace or None,
        )
    ))
    answer = await client.AuthorizationV1Api(api).create_self_subject_access_review(
        review, _request_timeout=API_TIMEOUT_S)
    return bool(answer.status.allowed)


async def check_permissions(api: client.ApiClient, namespaces: Sequence[str] = (),
                            fleet_namespace: str | None = None) -> CheckResult:
    """A SelfSubjectAccessReview per entry of the agent's permission table: the authorizer's own answer.

    The table (`metal_agent.core.permissions`) is the one the code and the
    RBAC manifest are held to, so the doctor checks exactly what the agent
    will do. Without --namespace the agent watches every namespace, so each
    permission is asked cluster-wide (an empty namespace means all). A
    denial names the permission and what the agent needs it for.
    """
    name = "Permissions"
    scopes = list(namespaces) or [""]
    asks = [(perm, ns) for ns in scopes for perm in AGENT_PERMISSIONS]
    if fleet_namespace:  # run --fleet: the Leases, in their one namespace (the Role metal-agent-fleet)
        asks += [(perm, fleet_namespace) for perm in FLEET_PERMISSIONS]
    limit = asyncio.Semaphore(8)

    async def ask(perm: Permission, ns: str) -> bool:
        async with limit:
            return await _allowed(api, perm, ns)

    try:
        answers = await asyncio.gather(*(ask(p, ns) for p, ns in asks))
    except ApiException as exc:
        return fail(name, f"SelfSubjectAccessReview failed: {exc.status} {exc.reason}", RBAC_FIX)
    except Exception as exc:  # noqa: BLE001
        return fail(name, f"SelfSubjectAccessReview failed: {type(exc).__name__}: {exc}", RBAC_FIX)
    denied = [f"{p}" + (f" in {ns}" if ns else "") + f" ({p.why})"
              for (p, ns), allowed in zip(asks, answers) if not allowed]
    where = ", ".join(namespaces) if namespaces else "all namespaces"
    if denied:
        return fail(name, f"denied ({where}): {'; '.join(denied)}", RBAC_FIX)
    if fleet_namespace:
        where += f"; fleet Leases in {fleet_namespace}"
    count = len(AGENT_PERMISSIONS) + (len(FLEET_PERMISSIONS) if fleet_namespace else 0)
    return ok(name, f"all {count} permissions granted ({where})")


async def _list(api: client.ApiClient, plural: str, namespaces: Sequence[str]) -> list[dict]:
    custom = client.CustomObjectsApi(api)
    if not namespaces:
        return (await custom.list_cluster_custom_object(GROUP, VERSION, plural, _request_timeout=API_TIMEOUT_S))["items"]
    items: list[dict] = []
    for ns in namespaces:
        items += (await custom.list_namespaced_custom_object(GROUP, VERSION, ns, plural,
                                                             _request_timeout=API_TIMEOUT_S))["items"]
    return items


def ownership_result(isvcs: list[dict], models: list[dict]) -> CheckResult:
    """What `--status-mode auto` decides for the Metal services the cluster holds, and why."""
    name = "Status ownership"
    by_key = {f"{m['metadata'].get('namespace')}/{m['metadata'].get('name')}": m for m in models}

    def model_of(isvc: dict) -> dict | None:
        ref = wanted_model(isvc)
        return by_key.get(f"{ref[0]}/{ref[1]}") if ref else None

    ours = [i for i in isvcs if not isinstance(evaluate(i, model_of(i)), NotOurs)]
    seen = any(shows_controller(i, None) for i in isvcs) or any(shows_controller(None, m) for m in models)
    if not ours:
        why = "LLMKube's controller is at work here" if seen else "no LLMKube controller seen"
        return ok(name, f"no Metal InferenceService yet ({why}); --status-mode auto decides per service")
    owners = [decide(StatusMode.AUTO, i, model_of(i), controller_seen=seen) for i in ours]
    shared = [o for o in owners if o.shared]
    if shared:
        detail = (f"shared with LLMKube's controller for {len(shared)} of {len(ours)} Metal service(s) "
                  f"({shared[0].why}): the agent writes only its own fields")
    else:
        detail = f"full for {len(ours)} Metal service(s): no LLMKube controller writes status (CRDs only)"
    return ok(name, detail + "; force with `metal-agent run --status-mode full|shared`")


async def check_status_ownership(api: client.ApiClient, namespaces: Sequence[str] = ()) -> CheckResult:
    try:
        isvcs, models = await asyncio.gather(_list(api, ISVC_PLURAL, namespaces), _list(api, MODEL_PLURAL, namespaces))
    except Exception as exc:  # noqa: BLE001 - the permission check names what is missing
        return skip("Status ownership", f"cannot list InferenceServices and Models: {type(exc).__name__}")
    return ownership_result(isvcs, models)


def _kubeconfig_files(kubeconfig: str | None) -> list[str]:
    """The files the client would read: the flag, else $KUBECONFIG (a path list), else ~/.kube/config."""
    value = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    return [os.path.expanduser(p) for p in value.split(os.pathsep) if p]


async def cluster_checks(kubeconfig: str | None, context: str | None, namespaces: Sequence[str],
                         fleet_namespace: str | None = None) -> list[CheckResult]:
    """API, CRDs and permissions; the last two are skipped when the API does not answer."""
    needs_api = [skip("CRDs", "needs the Kubernetes API"), skip("Permissions", "needs the Kubernetes API"),
                 skip("Status ownership", "needs the Kubernetes API")]
    load_fix = "pass --kubeconfig FILE (and --context NAME) for the metal-agent identity"
    files = _kubeconfig_files(kubeconfig)
    if not any(os.path.isfile(f) for f in files):
        return [fail("Kubernetes API", f"no kubeconfig file at {os.pathsep.join(files)}", load_fix), *needs_api]
    try:
        api = await _load_api(kubeconfig, context)
    except Exception as exc:  # noqa: BLE001 - bad YAML, unknown context, exec plugin failure
        return [fail("Kubernetes API", f"cannot load {os.pathsep.join(files)}: {type(exc).__name__}: {exc}",
                     load_fix), *needs_api]
    try:
        api_result = await check_kube(api)
        if api_result.status is not Status.OK:
            return [api_result, *needs_api]
        crds, perms, owner = await asyncio.gather(check_crds(api), check_permissions(api, namespaces, fleet_namespace),
                                                  check_status_ownership(api, namespaces))
        return [api_result, crds, perms, owner]
    finally:
        await api.close()


# --- this install ----------------------------------------------------------------


async def check_sudo(interval_ms: int, system: str | None = None) -> CheckResult:
    name = "powermetrics grant"
    if not _is_mac(system):
        return _not_mac(name, system)
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
    if not _is_mac(system):
        return _not_mac(name, system)
    home = home or Path.home()
    uid = os.getuid()
    fix = "run `make install-metal-agent` in the metal-agent checkout (MODE=daemon on a headless Mac)"
    agent_file, daemon_file = _job_file(Mode.AGENT, home, daemons_dir), _job_file(Mode.DAEMON, home, daemons_dir)

    async def loaded(mode: Mode) -> tuple[bool, str]:
        rc, out = await _run([launchctl, "print", service_target(mode, uid)])
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
    if not _is_mac(system):
        return _not_mac(name, system)
    ctx = agent_context(explicit, home, daemons_dir)
    fix = ("install an Apple Silicon build of llama.cpp with Metal (`brew install llama.cpp` with Homebrew in "
           "/opt/homebrew, not an x86_64 Homebrew under Rosetta), or pass the agent --llama-server PATH")
    if ctx.llama_server is None:
        return fail(name, "no llama-server in the agent's PATH or Homebrew", fix)
    kwargs: dict = {}
    if ctx.user and os.geteuid() == 0 and ctx.user != "root":
        kwargs["user"] = ctx.user
    try:
        code, text = await _run([ctx.llama_server, "--list-devices"], timeout, env=ctx.env, cwd=ctx.cwd,
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
    if not _is_mac(system):
        return _not_mac(name, system)
    if not os.access(socketfilterfw, os.X_OK):
        return skip(name, f"{socketfilterfw} not found")
    try:
        _, out = await _run([socketfilterfw, "--getglobalstate"])
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
        _, out = await _run([socketfilterfw, "--getappblocked", real])
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
        _check_mlx_server(mlx_server),
        cluster_checks(kubeconfig, context, namespaces, fleet_namespace),
        check_sudo(power_interval_ms, system),
        check_launchd(system),
        check_agent(listen),
        check_metal_device(llama_server, system),
        check_firewall(llama_server, system),
    ]
    results: list[CheckResult] = []
    for item in await asyncio.gather(*groups):
        results.extend(item if isinstance(item, list) else [item])
    return results


async def _check_mlx_server(explicit: str | None) -> CheckResult:
    from metal_agent.cli.doctor_mlx import check_mlx_server  # its own module: it imports this one

    return await check_mlx_server(explicit)


def format_result(result: CheckResult) -> str:
    line = f"{result.status.value} {result.name}: {result.detail}"
    if result.status is Status.SKIP:
        line = f"{result.status.value} {result.name}: skipped, {result.detail}"
    if result.fix and result.status is Status.FAIL:
        line += f"\n    fix: {result.fix}"
    return line


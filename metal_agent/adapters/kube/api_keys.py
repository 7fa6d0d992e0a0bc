"""Per-service API keys: the Secret an InferenceService names, watched, turned into digests at once.

An InferenceService opts in with the annotation

    metal-agent.llmkube.dev/api-key-secret: <secret>[/<key>]     (key defaults to `api-key`)

The Secret is always read in the InferenceService's own namespace: the
grammar has no place for a namespace (`a/b` is Secret `a`, key `b`; a second
slash is refused), so a spec can never point the agent at someone else's
Secret. The key's value holds one API key per line (two during a rotation:
add the new one, move clients, remove the old one); each is at least
`MIN_KEY_LENGTH` characters with no whitespace.

The agent's ClusterRole grants nothing on Secrets. The owner grants `get`,
`list` and `watch` on the named Secret only (resourceNames:
manifests/rbac/optional-api-key-reader.yaml); the agent watches that one
Secret (a list and watch with `metadata.name=<secret>`, which the API server
authorizes by name), so a rotated key works within a watch event. Only
sha256 digests are kept (core.access.ServiceKeys): the key itself is dropped
as the event is read and never logged.

A missing or unreadable Secret means no key works for that service (a
token or the cluster's networks still may), and a reason the controller can
show (`problem(key)`). While the API server is away, the last digests read
stay in force.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass
from typing import Callable

import structlog
from kubernetes_asyncio import client

from metal_agent.adapters.kube.informer import BuiltinInformer
from metal_agent.core.access import MAX_KEYS, NO_KEYS, ServiceKeys

log = structlog.get_logger(__name__)

ANNOTATION = "metal-agent.llmkube.dev/api-key-secret"
DEFAULT_KEY = "api-key"
MIN_KEY_LENGTH = 16
RBAC_HINT = "manifests/rbac/optional-api-key-reader.yaml"
FORBIDDEN_RETRY_S = 60.0

_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DATA_KEY = re.compile(r"[-._a-zA-Z0-9]+")

INVALID = "ApiKeySecretInvalid"
NOT_FOUND = "ApiKeySecretNotFound"
FORBIDDEN = "ApiKeySecretForbidden"


@dataclass(frozen=True)
class Problem:
    reason: str  # a condition/Event reason
    message: str  # names the Secret and key, never a value


@dataclass(frozen=True)
class KeyRef:
    secret: str
    key: str = DEFAULT_KEY


def parse_ref(value: str) -> KeyRef | Problem:
    """The annotation's `<secret>[/<key>]`, or why it cannot be read."""
    text = value.strip()
    secret, slash, key = text.partition("/")
    if not slash:
        key = DEFAULT_KEY
    if "/" in key:
        return Problem(INVALID, f"annotation {ANNOTATION} is `<secret>[/<key>]` in the InferenceService's own "
                                f"namespace; {text[:100]!r} has more than one `/`")
    if len(secret) > 253 or not _SECRET_NAME.fullmatch(secret):
        return Problem(INVALID, f"annotation {ANNOTATION}: {secret[:100]!r} is not a Secret name")
    if len(key) > 253 or not _DATA_KEY.fullmatch(key):
        return Problem(INVALID, f"annotation {ANNOTATION}: {key[:100]!r} is not a key of a Secret")
    return KeyRef(secret, key)


def digests_of(encoded: str, where: str) -> ServiceKeys | Problem:
    """The digests of the keys in one base64 Secret value (one key per line)."""
    try:
        text = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError):
        return Problem(INVALID, f"{where} is not UTF-8 text")
    keys = [line.strip() for line in text.splitlines() if line.strip()]
    if not keys:
        return Problem(INVALID, f"{where} is empty")
    if len(keys) > MAX_KEYS:
        return Problem(INVALID, f"{where} holds more than {MAX_KEYS} keys")
    for number, key in enumerate(keys, 1):
        if any(ch.isspace() or not ch.isprintable() for ch in key):
            return Problem(INVALID, f"{where}: key on line {number} holds whitespace or control characters")
        if len(key) < MIN_KEY_LENGTH:
            return Problem(INVALID, f"{where}: key on line {number} is shorter than {MIN_KEY_LENGTH} characters")
    return ServiceKeys.of(keys)


def _slim_secret(secret: dict) -> dict:
    """Digests per data key; the values themselves are dropped here, as the event is read."""
    meta = secret.get("metadata") or {}
    name = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    return {"metadata": {k: meta[k] for k in ("name", "namespace", "resourceVersion") if k in meta},
            "keys": {k: digests_of(v or "", f"key {k!r} of Secret {name}")
                     for k, v in (secret.get("data") or {}).items()}}


class _SecretWatch(BuiltinInformer):
    def __init__(self, owner: "ApiKeys", namespace: str, name: str) -> None:
        core = client.CoreV1Api(owner.api)
        selector = f"metadata.name={name}"
        super().__init__(owner.api, lambda scope, **kw: core.list_namespaced_secret(scope, field_selector=selector, **kw),
                         "secrets", lambda old, new: owner._changed((namespace, name)),
                         namespaces=[namespace], slim=_slim_secret)
        self._owner, self.where = owner, (namespace, name)

    async def _relist(self, scope: str | None) -> str:
        version = await super()._relist(scope)
        self._owner._changed(self.where)  # also when nothing changed: "read, and not there" is news
        return version

    async def _failed(self, scope: str | None, error: str) -> None:
        if self.last_status != 403:
            return await super()._failed(scope, error)
        self._owner._changed(self.where)
        await asyncio.sleep(self._owner.forbidden_retry)


class ApiKeys:
    """The API-key digests of every service whose InferenceService names a Secret.

    `update(service, annotations)` on every InferenceService change (None: deleted);
    `keys(service)`, `problem(service)`; `on_change(service)` when either changes."""

    def __init__(self, api: client.ApiClient, on_change: Callable[[str], None] = lambda key: None, *,
                 forbidden_retry: float = FORBIDDEN_RETRY_S) -> None:
        self.api = api
        self.on_change = on_change
        self.forbidden_retry = forbidden_retry
        self._refs: dict[str, KeyRef | Problem] = {}  # service key -> what its annotation says
        self._watches: dict[tuple[str, str], tuple[_SecretWatch, asyncio.Task | None]] = {}
        self._state: dict[str, tuple[ServiceKeys, Problem | None]] = {}
        self._running = False

    def keys(self, service: str) -> ServiceKeys:
        return self._state.get(service, (NO_KEYS, None))[0]

    def problem(self, service: str) -> Problem | None:
        return self._state.get(service, (NO_KEYS, None))[1]

    def secret_of(self, service: str) -> str | None:
        """`namespace/name` of the Secret the service's annotation names (None: no annotation, or
        one that names none)."""
        found = self._secret_of(service)
        return f"{found[0]}/{found[1]}" if found else None

    def annotated(self, service: str) -> bool:
        return service in self._refs

    def update(self, service: str, annotations: dict | None) -> None:
        value = (annotations or {}).get(ANNOTATION)
        ref = parse_ref(value) if isinstance(value, str) else None
        if ref is None:
            self._refs.pop(service, None)
        else:
            self._refs[service] = ref
        self._reconcile_watches()
        self._judge(service)

    async def run(self) -> None:
        self._running = True
        try:
            self._reconcile_watches()
            await asyncio.Event().wait()
        finally:
            self._running = False
            for _, task in self._watches.values():
                if task is not None:
                    task.cancel()

    # -- internals ------------------------------------------------------------------------------------

    def _secret_of(self, service: str) -> tuple[str, str] | None:
        ref = self._refs.get(service)
        return (service.partition("/")[0], ref.secret) if isinstance(ref, KeyRef) else None

    def _reconcile_watches(self) -> None:
        wanted = {where for s in self._refs if (where := self._secret_of(s)) is not None}
        for where in list(self._watches):
            if where not in wanted:
                _, task = self._watches.pop(where)
                if task is not None:
                    task.cancel()
        for where in wanted:
            watch, task = self._watches.get(where) or (_SecretWatch(self, *where), None)
            if task is None and self._running:
                task = asyncio.ensure_future(watch.run())
                task.add_done_callback(_report_crash)
            self._watches[where] = (watch, task)

    def _changed(self, where: tuple[str, str]) -> None:
        for service in [s for s in self._refs if self._secret_of(s) == where]:
            self._judge(service)

    def _judge(self, service: str) -> None:
        found = self._current(service)
        if found == self._state.get(service, (NO_KEYS, None)):
            return
        before = self._state.get(service, (NO_KEYS, None))[1]
        if found == (NO_KEYS, None):
            self._state.pop(service, None)
        else:
            self._state[service] = found
        problem = found[1]
        if problem is not None and problem != before:
            log.warning("no API key works for this service", service=service, reason=problem.reason,
                        detail=problem.message)
        elif problem is None and before is not None:
            log.info("API keys readable again", service=service)
        self.on_change(service)

    def _current(self, service: str) -> tuple[ServiceKeys, Problem | None]:
        ref = self._refs.get(service)
        if ref is None:
            return NO_KEYS, None
        if isinstance(ref, Problem):
            return NO_KEYS, ref
        namespace = service.partition("/")[0]
        where = f"Secret {namespace}/{ref.secret}"
        watch = self._watches[(namespace, ref.secret)][0]
        if watch.last_status == 403:
            return NO_KEYS, Problem(FORBIDDEN, f"the agent may not read {where} (named by {ANNOTATION}); grant "
                                               f"get, list and watch on it by name, see {RBAC_HINT}")
        if not watch.synced.is_set():
            return self._state.get(service, (NO_KEYS, None))  # not read yet, or the API server is away: as before
        secret = watch.get(f"{namespace}/{ref.secret}")
        if secret is None:
            return NO_KEYS, Problem(NOT_FOUND, f"{where} named by {ANNOTATION} does not exist")
        found = secret["keys"].get(ref.key)
        if found is None:
            return NO_KEYS, Problem(INVALID, f"{where} has no key {ref.key!r} (named by {ANNOTATION})")
        return (NO_KEYS, found) if isinstance(found, Problem) else (found, None)


def _report_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the watch of an API-key Secret stopped", error=repr(task.exception()))

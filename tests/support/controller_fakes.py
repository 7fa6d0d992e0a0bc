"""Fakes for the ports the controller's parts are handed, for unit tests of each part alone.

Each fake does what the real port promises in the little the part uses, and
records what it was asked, so a test asserts behaviour (what was started,
written, emitted), not calls it made up.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from metal_agent.core.process import Snapshot, State
from metal_agent.core.status import Blocker
from metal_agent.adapters.model_files import ModelReady
from metal_agent.memory.guard import Waiting


def isvc(name: str = "chat", *, model: str = "qwen", generation: int = 1, uid: str = "u1", **spec) -> dict:
    return {"metadata": {"namespace": "ml", "name": name, "uid": uid, "generation": generation,
                         "resourceVersion": str(generation)},
            "spec": {"modelRef": model, "contextSize": 256, **spec}}


def model(name: str = "qwen", source: str = "file:///models/qwen.gguf") -> dict:
    return {"metadata": {"namespace": "ml", "name": name},
            "spec": {"source": source, "format": "gguf", "hardware": {"accelerator": "metal"}}}


class FakeInformer:
    """An informer's cache: `get`, `items`, `synced`."""

    def __init__(self, *objects: dict, synced: bool = True) -> None:
        self.cache = {f"{o['metadata']['namespace']}/{o['metadata']['name']}": o for o in objects}
        self.synced = asyncio.Event()
        if synced:
            self.synced.set()

    def get(self, key: str) -> dict | None:
        return self.cache.get(key)

    def items(self) -> list[dict]:
        return list(self.cache.values())


@dataclass
class FakeSupervisor:
    plan: object
    snapshot: Snapshot
    failed: BaseException | None = None


class FakeProcesses:
    """The process manager: `start` makes a supervisor that is at once ready on port 8081."""

    def __init__(self) -> None:
        self.supervisors: dict[str, FakeSupervisor] = {}
        self.started: list[object] = []
        self.stopped: list[str] = []

    def get(self, key: str) -> FakeSupervisor | None:
        return self.supervisors.get(key)

    async def start(self, plan) -> None:
        self.started.append(plan)
        self.supervisors[plan.key] = FakeSupervisor(plan, Snapshot(key=plan.key, spec_hash=plan.spec_hash,
                                                                   state=State.READY, pid=4242, port=8081,
                                                                   host=plan.host))

    async def stop(self, key: str) -> None:
        self.stopped.append(key)
        self.supervisors.pop(key, None)

    def has_record(self, key: str) -> bool:
        return key in self.supervisors

    def adopt_as_recorded(self, key: str, uid: str) -> bool:
        return False


class FakeModelFiles:
    """The model store: every Model is at `answer` (a ModelReady, ModelPending or Blocker)."""

    def __init__(self, answer=None) -> None:
        self.answer = answer or ModelReady(Path("/models/qwen.gguf"))
        self.forgotten: list[str] = []

    def lookup(self, model, key, secret_ref=None):
        return self.answer

    def forget(self, key: str) -> None:
        self.forgotten.append(key)

    def retry(self, model) -> None:
        pass


class FakeGuard:
    """Memory admission: admits everything unless `refuse` is set or the key is `blocked`
    (evicted, as the watchdog says); `release` frees `waiting`."""

    def __init__(self) -> None:
        self.refuse: Blocker | None = None
        self.blocked: set[str] = set()
        self.waiting: set[str] = set()
        self.committed: dict[str, int] = {}
        self.capacity: int | None = None  # how many services fit (each counts 1 byte); None: any number

    async def check(self, key, workload, path, draft=None):
        if key in self.blocked:
            return Waiting(Blocker("RespawnBlocked", "evicted under memory pressure"), None)
        others = len(set(self.committed) - {key})
        if self.capacity is not None and others >= self.capacity:
            self.waiting.add(key)
            short = Blocker("InsufficientMemory", f"{others} services hold the memory", phase="Pending")
            return Waiting(short, (short.reason, short.message), others - self.capacity + 1)
        if self.refuse is not None:
            self.waiting.add(key)
            return Waiting(self.refuse, (self.refuse.reason, self.refuse.message))
        self.waiting.discard(key)
        self.committed[key] = 1
        return object()  # an Admit: anything that is not Waiting

    async def commit_running(self, key, workload, path, draft=None) -> None:
        self.committed[key] = 1

    def counts(self, key: str) -> bool:
        return key in self.committed

    def release(self, key: str) -> set[str]:
        freed = self.committed.pop(key, None)
        self.waiting.discard(key)
        return set(self.waiting) if freed else set()

    def forget(self, key: str) -> None:
        self.release(key)


class FakeReporter:
    """The status reporter: remembers the last facts written per key."""

    def __init__(self) -> None:
        self.written: dict[str, dict] = {}
        self.forgotten: list[str] = []

    async def write(self, key: str, raw: dict, wants_process: bool, **facts) -> None:
        self.written[key] = {"wants_process": wants_process, **facts}

    def forget(self, key: str) -> None:
        self.forgotten.append(key)


@dataclass
class FakeEvents:
    emitted: list[tuple[str, str, str]] = field(default_factory=list)

    def emit(self, obj_meta: dict, reason: str, message: str, *, warning: bool = False) -> None:
        self.emitted.append((obj_meta["name"], reason, message))

    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self.emitted]

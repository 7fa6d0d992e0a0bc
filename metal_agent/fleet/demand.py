"""What the cluster asks of the fleet: the Metal services with a valid spec, and the models on this disk.

Read from the informers' caches on every tick, so each object is parsed once
per resourceVersion (`_parsed`): a tick must cost nothing while nothing changes.
A service is judged as the reconciler judges it (the same engine default and
owner's policy), but without any gate: placement decides who serves it.
"""

from __future__ import annotations

from typing import Any, Callable

from metal_agent.core.claim import Allowlist, evaluate, wanted_draft, wanted_model
from metal_agent.core.model_validation import parse_model
from metal_agent.core.placement import Wanted, wanted_from
from metal_agent.core.result import Parsed
from metal_agent.fleet.ports import ModelFilesPort, ObjectCache
from metal_agent.fleet.settings import FleetSettings

EVERY_SERVICE = Allowlist()


class Demand:
    def __init__(self, settings: FleetSettings, *, isvcs: ObjectCache, models: ObjectCache,
                 model_files: ModelFilesPort) -> None:
        self.s = settings
        self.isvcs, self.models = isvcs, models
        self.model_files = model_files
        self._parse_cache: dict[tuple, tuple[tuple, Any]] = {}

    def exists(self, key: str) -> bool:
        return self.isvcs.get(key) is not None

    def raw(self, key: str) -> dict | None:
        return self.isvcs.get(key)

    def wanted_services(self) -> list[tuple[Wanted, Any]]:
        """Every Metal service with a valid spec, as placement reads it, with its workload."""
        return [found for raw in self.isvcs.items() if (found := self.wanted(raw)) is not None]

    def wanted(self, raw: dict) -> tuple[Wanted, Any] | None:
        ref = wanted_model(raw)
        model_raw = self.models.get(f"{ref[0]}/{ref[1]}") if ref else None
        version = tuple((o or {}).get("metadata", {}).get("resourceVersion") for o in (raw, model_raw))
        meta = raw.get("metadata") or {}
        draft_ref = wanted_draft(raw)
        draft = self.models.get(f"{draft_ref[0]}/{draft_ref[1]}") if draft_ref else None
        version += ((draft or {}).get("metadata", {}).get("resourceVersion"),)
        verdict = self._parsed(("isvc", f"{meta.get('namespace', '')}/{meta.get('name', '')}"), version,
                               lambda: evaluate(raw, model_raw, EVERY_SERVICE, self.s.default_engine, draft,
                                                self.s.policy, self.s.launch))
        if not isinstance(verdict, Parsed) or ref is None:
            return None
        spec = verdict.value.isvc.spec
        return wanted_from(raw, f"{ref[0]}/{ref[1]}", spec.replicas if spec.wants_process else 0), verdict.value

    def replicas_now(self, key: str) -> int | None:
        """The replicas `key` wants per the informer now (None: not a valid Metal service now)."""
        raw = self.isvcs.get(key)
        found = self.wanted(raw) if raw is not None else None
        return found[0].replicas if found else None

    def models_present(self) -> set[str]:
        """The Metal Models whose file is on this disk (a stat each; parsed once per version)."""
        present = set()
        for raw in self.models.items():
            meta = raw.get("metadata") or {}
            key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
            model = self._parsed(("model", key), (meta.get("resourceVersion"),), lambda: parse_model(raw))
            if isinstance(model, Parsed) and model.value.spec.hardware.accelerator.value == "metal" and \
                    self.model_files.present(model.value) is not None:
                present.add(key)
        return present

    def _parsed(self, key: tuple, version: tuple, parse: Callable[[], Any]) -> Any:
        """`parse()` once per object version."""
        if len(self._parse_cache) > 2 * (len(self.isvcs.cache) + len(self.models.cache)) + 64:
            self._parse_cache.clear()  # deleted objects' entries: start over now and then
        cached = self._parse_cache.get(key)
        if cached is None or cached[0] != version:
            cached = self._parse_cache[key] = (version, parse())
        return cached[1]

"""Which InferenceServices this agent serves, and the full check of one that it does.

The claim is decided on the *raw* objects, before validation, on purpose:
a vLLM service whose `extraArgs` legitimately contain `--port` is not ours
and must be left alone silently, not reported as invalid. Only once an
object is ours do we hold it to every rule (see `evaluate`).

Rule (LLMKube's): an InferenceService is ours when its `spec.modelRef`
names a Model in the same namespace whose `spec.hardware.accelerator` is
`metal`, and its `spec.runtime` is `llamacpp` or empty/absent. An agent run
with `--inference-service-allowlist` (LLMKube's #524: several Macs sharing
one cluster, each serving its own services instead of all racing for every
Metal one) also requires the service to be on its list; a service off the
list is another Mac's, so it is left alone like any other not-ours.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from metal_agent.core.api import Accelerator, Model, Runtime
from metal_agent.core.engine_name import EngineName
from metal_agent.core.engines import engine_for
from metal_agent.core.extra_args import EXTRA_ARG_REFUSED, check_extra_args, with_checked_args
from metal_agent.core.isvc_validation import parse_inference_service
from metal_agent.core.launch import LaunchSettings
from metal_agent.core.model_validation import check_servable, parse_model
from metal_agent.core.object_meta import DEFAULT_NAMESPACE
from metal_agent.core.result import FieldError, Invalid, NotOurs, Parsed
from metal_agent.core.spec_policy import SpecPolicy
from metal_agent.core.workload import Workload


@dataclass(frozen=True, slots=True)
class Ours:
    """The InferenceService is served by this agent (validity not yet checked)."""


@dataclass(frozen=True, slots=True)
class Allowlist:
    """The InferenceServices this agent may claim; empty admits every one (the default).

    An entry is a name, matching that name in every watched namespace (the
    Go agent's meaning), or `namespace/name`, matching one service.
    """

    entries: tuple[str, ...] = ()

    @classmethod
    def parse(cls, values: Iterable[str]) -> Allowlist:
        """From flag values, each comma-separated; blanks are dropped. Raises ValueError on a malformed entry."""
        entries: set[str] = set()
        for value in values:
            for entry in (e.strip() for e in value.split(",")):
                if not entry:
                    continue
                parts = entry.split("/")
                if len(parts) > 2 or not all(parts):
                    raise ValueError(f"{entry!r} is neither NAME nor NAMESPACE/NAME")
                entries.add(entry)
        return cls(tuple(sorted(entries)))

    def admits(self, namespace: str, name: str) -> bool:
        return not self.entries or name in self.entries or f"{namespace}/{name}" in self.entries

    def refusal(self, namespace: str, name: str) -> str | None:
        """Why the service is not this agent's (None: it is)."""
        if self.admits(namespace, name):
            return None
        return (f"InferenceService {namespace}/{name} is not in this agent's "
                f"--inference-service-allowlist ({', '.join(self.entries)})")


class ClaimFilter(Protocol):
    """The one question the claim rule asks beyond the objects themselves: may this agent
    take the service? An `Allowlist` answers it from the flag; the controller's gate
    (`metal_agent.controller.gate`: a fleet's Leases, or the allowlist) answers it too."""

    def refusal(self, namespace: str, name: str) -> str | None:
        """Why the service is not this agent's (None: it is)."""


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _namespace(obj: Any) -> str:
    namespace = _get(obj, "metadata", "namespace")
    return namespace if isinstance(namespace, str) and namespace else DEFAULT_NAMESPACE


def wanted_model(isvc: Any) -> tuple[str, str] | None:
    """(namespace, name) of the Model to fetch for `isvc`, or None if it names none."""
    ref = _get(isvc, "spec", "modelRef")
    if not isinstance(ref, str) or not ref:
        return None
    return _namespace(isvc), ref


def claim(isvc: Any, model: Any | None, allowlist: ClaimFilter = Allowlist()) -> Ours | NotOurs:
    """Decide whether `isvc` is ours, given the Model it refers to (None if not found).

    Never raises and never reports errors: anything we cannot read as ours
    is simply not ours, with a reason for logs and `metal-agent render`.
    A missing Model is "not ours" too; whether that should stop a process
    already running is the caller's decision (a transient lookup failure
    must not be read as a delete).
    """
    name = _get(isvc, "metadata", "name")
    if why := allowlist.refusal(_namespace(isvc), name if isinstance(name, str) else ""):
        return NotOurs(why)

    runtime = _get(isvc, "spec", "runtime")
    if runtime not in (None, "", Runtime.LLAMACPP.value):
        return NotOurs(f"spec.runtime is {runtime!r}; metal-agent only runs llamacpp")

    wanted = wanted_model(isvc)
    if wanted is None:
        return NotOurs("spec.modelRef is missing, so it names no Model")
    namespace, ref = wanted
    if model is None:
        return NotOurs(f"Model {namespace}/{ref} was not found")

    model_name = _get(model, "metadata", "name")
    model_key = (_namespace(model), model_name)
    if model_key != wanted:
        return NotOurs(
            f"spec.modelRef names Model {namespace}/{ref}, "
            f"but the Model given is {model_key[0]}/{model_name}"
        )

    accelerator = _get(model, "spec", "hardware", "accelerator")
    if accelerator in (None, ""):
        accelerator = Accelerator.CPU.value
    if accelerator != Accelerator.METAL.value:
        return NotOurs(f"Model {namespace}/{ref} has accelerator {accelerator!r}, not 'metal'")
    return Ours()


def wanted_draft(isvc: Any) -> tuple[str, str] | None:
    """(namespace, name) of the draft Model `isvc`'s speculative decoding names, if any."""
    ref = _get(isvc, "spec", "speculativeDecoding", "draftModelRef")
    if not isinstance(ref, str) or not ref:
        return None
    return _namespace(isvc), ref


def evaluate(isvc: Any, model: Any | None, allowlist: ClaimFilter = Allowlist(),
             default_engine: str = "llama-server", draft: Any | None = None,
             policy: SpecPolicy = SpecPolicy(),
             settings: LaunchSettings | None = None) -> NotOurs | Invalid | Parsed[Workload]:
    """Claim, then validate both objects; every error of both is reported.

    This is the one call the reconciler and `metal-agent render` need:
    `NotOurs` -> ignore, `Invalid` -> report on the InferenceService's
    status, `Parsed` -> build the argv and run it. The engine that will
    serve the Model (its format, else `default_engine`) adds what it cannot
    honour (`core.engine`, picked by `core.engines`). `draft` is the Model `wanted_draft` names (None if
    not found), checked when that engine does speculative decoding with it.
    `extraArgs` are checked against that engine's allowlist, widened by what
    the Mac's owner allows in `policy` (refusals carry ExtraArgRefused), and
    come back as they go on the command line (`core.extra_args`). With the
    agent's `settings` (the servers found on this Mac), the engine also refuses
    what the installed server is too old for; without them, current servers are assumed.
    """
    verdict = claim(isvc, model, allowlist)
    if isinstance(verdict, NotOurs):
        return verdict

    errors: list[FieldError] = []
    parsed_model = parse_model(model)
    parsed_isvc = parse_inference_service(isvc)
    if isinstance(parsed_model, Invalid):
        errors.extend(parsed_model.errors)
    else:
        errors.extend(check_servable(parsed_model.value))
    if isinstance(parsed_isvc, Invalid):
        errors.extend(parsed_isvc.errors)
    if not errors and isinstance(parsed_model, Parsed) and isinstance(parsed_isvc, Parsed):
        workload = Workload(isvc=parsed_isvc.value, model=parsed_model.value)
        engine = engine_for(workload, EngineName(default_engine))
        errors.extend(engine.refusals(workload))
        spec = workload.isvc.spec
        checked = check_extra_args(engine.options, spec.extra_args, policy.extra_args)
        errors.extend(FieldError(f"spec.extraArgs[{r.index}]", r.message, "InferenceService", workload.isvc.meta.key,
                                 EXTRA_ARG_REFUSED, r.security) for r in checked.refusals)
        workload = replace(workload, isvc=replace(workload.isvc, spec=with_checked_args(spec, checked.tokens)))
        if settings is not None:
            errors.extend(engine.server_refusals(workload, settings))
        if not errors and engine.wants_draft(workload.isvc.spec):
            parsed_draft = _parse_draft(isvc, draft)
            if isinstance(parsed_draft, Invalid):
                errors.extend(parsed_draft.errors)
            else:
                errors.extend(engine.draft_refusals(parsed_draft.value))
                workload = Workload(isvc=workload.isvc, model=workload.model, draft=parsed_draft.value)
    if errors or not isinstance(parsed_model, Parsed) or not isinstance(parsed_isvc, Parsed):
        return Invalid(tuple(errors))
    return Parsed(workload)


def _parse_draft(isvc: Any, draft: Any | None) -> Parsed[Model] | Invalid:
    path = "spec.speculativeDecoding.draftModelRef"
    namespace, ref = wanted_draft(isvc) or (_namespace(isvc), "")
    name = f"{_namespace(isvc)}/{_get(isvc, 'metadata', 'name')}"
    if draft is None or (_namespace(draft), _get(draft, "metadata", "name")) != (namespace, ref):
        return Invalid((FieldError(path, f"Model {namespace}/{ref} was not found; the draft model must be a Model"
                                   " in the same namespace", "InferenceService", name),))
    return parse_model(draft)

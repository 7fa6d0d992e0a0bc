"""Every field of LLMKube's `InferenceService` and `Model` specs, and what metal-agent does with it.

Why a table: LLMKube adds fields faster than any agent follows, and a field a
user sets must either do what LLMKube documents or be refused with a
condition that says so, never be dropped without a word. One row per field
(or per Kubernetes-standard subtree, such as `affinity`) says which:

* `HONOURED`: how (the engine flag, or the agent's behaviour);
* `REFUSED`: setting it makes the spec refused (`MetalSpecAccepted=False`,
  reason `UnsupportedField`, the message naming the field and why), because
  it means something on a Mac that the agent does not do;
* `NOT_APPLICABLE`: it configures what a Mac has no counterpart of (a pod,
  a container image, a GPU device plugin, another runtime), so it is
  ignored, as LLMKube's own Go Metal agent ignores it. LLMKube's samples set
  several of these routinely (`image`, `resources`, `endpoint`), which is
  why they are not refused.

A row with `refuse_when` turns into a refusal by itself (`refusals`, called
by `core.model_validation` and `core.isvc_validation`): the table and the behaviour cannot drift apart. Rows
whose refusal depends on the engine (e.g. `speculativeDecoding`, honoured by
mlx_lm.server) are enforced by that engine's `refusals` and say so.

tests/unit/test_fields.py walks LLMKube's CRD schemas (vendored tarball) and
fails on a field without a row, and on a row whose field no longer exists;
scripts/update_readme.py renders the table into README.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from metal_agent.core.result import FieldError

UNSUPPORTED_FIELD = "UnsupportedField"
ISVC = "InferenceService"
MODEL = "Model"


class Treatment(StrEnum):
    HONOURED = "honoured"
    REFUSED = "refused"
    NOT_APPLICABLE = "not applicable"


def is_set(value: Any) -> bool:
    """A value that asks for something: not null, false, "", nor an empty list or object."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return True
    return value not in (None, "", [], {})


def _not(expected: Any) -> Callable[[Any], bool]:
    """Refuse any value but `expected` (LLMKube's default, which is what the agent does anyway)."""
    return lambda value: value is not None and value != expected


@dataclass(frozen=True, slots=True)
class FieldRow:
    """What the agent does with one field (`path` like `spec.speculativeDecoding.nDraftMax`,
    `[]` for a list's items). `subtree` rows cover every field below theirs (Kubernetes types,
    other runtimes' blocks). `refuse_when(value)` makes the row a refusal the validator enforces."""

    kind: str
    path: str
    treatment: Treatment
    text: str
    subtree: bool = False
    refuse_when: Callable[[Any], bool] | None = None
    by_engine: bool = False  # refused (or honoured) by the engine's own `refusals`, not by the table


def _h(kind: str, path: str, text: str, when: Callable[[Any], bool] | None = None) -> FieldRow:
    """Honoured; `when` names the values it cannot honour, refused like a refused field."""
    return FieldRow(kind, path, Treatment.HONOURED, text, refuse_when=when)


def _na(kind: str, path: str, text: str, subtree: bool = False) -> FieldRow:
    return FieldRow(kind, path, Treatment.NOT_APPLICABLE, text, subtree=subtree)


def _refused(kind: str, path: str, text: str, when: Callable[[Any], bool] | None = is_set,
             subtree: bool = False) -> FieldRow:
    return FieldRow(kind, path, Treatment.REFUSED, text, subtree=subtree, refuse_when=when, by_engine=when is None)


_POD = "configures the Kubernetes pod LLMKube's operator would create; on a Mac the agent runs the engine as a process"
_OTHER_RUNTIME = "settings of another runtime (`spec.runtime`), whose services metal-agent leaves alone"
_SCHEDULING = ("pod scheduling; which Mac serves a service is decided by the Model's `accelerator: metal`, "
               "`--inference-service-allowlist` and fleets")
_GPU_NODE = "a GPU device plugin or node setting; a Mac's GPU is always there and Metal needs no device"

FIELDS: tuple[FieldRow, ...] = (
    # -- InferenceService: what runs ---------------------------------------------
    _h(ISVC, "spec.modelRef", "the Model served (same namespace); a Model with `accelerator: metal` makes the service ours"),
    _h(ISVC, "spec.runtime", "`llamacpp` (or unset) is served; any other value is left to its own agent"),
    _h(ISVC, "spec.replicas", "0 stops the process (`Stopped`); more run one process per Mac (fleets spread them)"),
    _h(ISVC, "spec.suspend", "`true` stops the process (`Suspended`), replicas kept"),
    _h(ISVC, "spec.contextSize", "`--ctx-size` (mlx_lm.server: the KV cache the memory estimate reserves)"),
    _h(ISVC, "spec.ropeScaling.type", "`--rope-scaling` `linear` or `yarn`; `longrope` is refused (llama-server "
                                      "reads LongRoPE from the GGUF and accepts only none/linear/yarn)"),
    _h(ISVC, "spec.ropeScaling.factor", "`--rope-scale`"),
    _h(ISVC, "spec.ropeScaling.originalContext", "`--yarn-orig-ctx`"),
    _h(ISVC, "spec.parallelSlots", "`--parallel N`, 1 included (unsaid, llama-server runs 4 slots sharing one "
       "unified KV cache); mlx_lm.server: `--decode-concurrency`, `--prompt-cache-size`"),
    _h(ISVC, "spec.flashAttention", "`--flash-attn on|off` (on when unset); off with a quantized V cache is refused"),
    _h(ISVC, "spec.jinja", "`--jinja` / `--no-jinja`; unset keeps the build's default"),
    _h(ISVC, "spec.cacheTypeK", "`--cache-type-k` (mlx_lm.server: `--kv-bits` for q8_0/q4_0)"),
    _h(ISVC, "spec.cacheTypeV", "`--cache-type-v` (mlx_lm.server: `--kv-bits`, equal to K)"),
    _h(ISVC, "spec.cacheTypeCustomK", "`--cache-type-k`, winning over `cacheTypeK` (e.g. TurboQuant `turbo3`)"),
    _h(ISVC, "spec.cacheTypeCustomV", "`--cache-type-v`, winning over `cacheTypeV`"),
    _h(ISVC, "spec.moeCPUOffload", "`--cpu-moe`"),
    _h(ISVC, "spec.moeCPULayers", "`--n-cpu-moe N`"),
    _h(ISVC, "spec.noKvOffload", "`--no-kv-offload`"),
    _h(ISVC, "spec.noWarmup", "`--no-warmup`"),
    _h(ISVC, "spec.reasoningBudget", "`--reasoning-budget N` (0 included: no visible thinking, as LLMKube's controller)"),
    _h(ISVC, "spec.reasoningBudgetMessage", "`--reasoning-budget-message` (with `reasoningBudget` only, as LLMKube)"),
    _h(ISVC, "spec.metadataOverrides", "one `--override-kv`, entries joined with commas (a `str:` value holding a comma is quoted); an entry llama-server would misread (a non-numeric `int:`, `bool:` other than true/false, a key or `str:` value over 127 bytes) is refused"),
    _h(ISVC, "spec.tensorOverrides", "one `--override-tensor`, entries joined with commas; an entry holding a comma or a second `=` is refused (llama-server would split it)"),
    _h(ISVC, "spec.batchSize", "`--batch-size` (mlx_lm.server: `--prefill-step-size`)"),
    _h(ISVC, "spec.uBatchSize", "`--ubatch-size`"),
    _h(ISVC, "spec.extraArgs", "appended last, each option checked against the engine's allowlist "
                               "(`ExtraArgRefused` otherwise)"),
    _h(ISVC, "spec.mode", "`embedding`: `--embedding --pooling last`; `rerank`: `--reranking`; both with "
       "`--cache-ram 0` (no host prompt cache; chat gets 1024 MiB, counted in memory admission)"),
    _h(ISVC, "spec.priority", "eviction order under memory pressure (batch first, critical last)"),
    _h(ISVC, "spec.evictionProtection", "never evicted under memory pressure"),
    _h(ISVC, "spec.speculativeDecoding.type", "llama-server: `--spec-type` (LLMKube's aliases resolved: `draft` "
       "is `draft-simple`, `mtp` `draft-mtp`, `disabled` `none`); mlx_lm.server: `draft` with a draft Model "
       "(`--draft-model`), other types refused"),
    _h(ISVC, "spec.speculativeDecoding.draftModelRef", "the draft Model (GGUF for llama-server, `-md`; MLX for "
       "mlx_lm.server), fetched, verified, counted in memory admission and part of the spec hash"),
    _h(ISVC, "spec.speculativeDecoding.draftModel", "llama-server: `-md` with that file of the Model's "
       "`spec.files` (it must be listed there, so it is fetched with the model, counted in memory admission); "
       "refused with `draftModelRef` too, and by mlx_lm.server"),
    _h(ISVC, "spec.speculativeDecoding.nDraftMax", "llama-server: `--spec-draft-n-max`; mlx_lm.server: "
       "`--num-draft-tokens`"),
    _h(ISVC, "spec.speculativeDecoding.pMin", "llama-server: `--spec-draft-p-min`; refused by mlx_lm.server, "
       "which has no such option"),
    # -- InferenceService: when a running process is replaced (core/lifecycle.py) --------
    _h(ISVC, "spec.rolloutPolicy.waitForIdle", "a changed spec respawns only once the front door sees no "
       "request in flight or queued (`RolloutDeferred` while it waits); without `--front-door` idleness "
       "cannot be seen, so it waits for `idleTimeoutSeconds` (fail closed, as LLMKube)"),
    _h(ISVC, "spec.rolloutPolicy.idleTimeoutSeconds", "bounds that wait (0 or unset: 300 s), counted from "
       "the first deferral; then the respawn goes ahead"),
    _h(ISVC, "spec.rolloutPolicy.force", "respawn at once, `waitForIdle` ignored"),
    _h(ISVC, "spec.maxPodLifetimeSeconds", "the engine process is recycled (stopped, started again) once "
       "older than this; with `waitForIdle`, when idle"),
    _h(ISVC, "spec.maxPodLifetimeIdleTimeoutSeconds", "with `waitForIdle`: how long past its lifetime a busy "
       "process waits for idle before it is recycled anyway (0: no wait; unset: as long as it takes)"),
    _refused(ISVC, "spec.autoscaling", "refused: no autoscaler scales processes on a Mac; set `replicas`",
             subtree=True),
    _refused(ISVC, "spec.turboQuantBits", "refused: oMLX's KV cache setting; with llama-server use "
             "`cacheTypeCustomK/V` (a TurboQuant build's `turbo3`), with mlx_lm.server `cacheTypeK/V` q8_0/q4_0"),
    _refused(ISVC, "spec.pagedSSDCacheDir", "refused: an oMLX cache option; neither engine the agent runs has it"),
    _refused(ISVC, "spec.pagedSSDCacheMaxSize", "refused: an oMLX cache option; neither engine the agent runs has it"),
    _refused(ISVC, "spec.hotCacheMaxSize", "refused: an oMLX cache option; neither engine the agent runs has it"),
    _refused(ISVC, "spec.args", "refused: replaces a container's arguments; with llamacpp LLMKube ignores it too; "
             "use `extraArgs`"),
    _refused(ISVC, "spec.command", "refused: the agent starts the engine binary the Mac's owner installed"),
    _refused(ISVC, "spec.env", "refused: the agent passes no environment to the engine (variables such as "
             "`LLAMA_ARG_*` would bypass the `extraArgs` allowlist)", subtree=True),
    _refused(ISVC, "spec.bindAddress", "refused: where the engine listens is the Mac owner's choice (the "
             "registered address, or `--bind-all`)"),
    # -- InferenceService: the Service ---------------------------------------------
    _h(ISVC, "spec.endpoint.port", "the registered Service's port (8080 when unset) and the port in "
       "`status.endpoint`, as LLMKube's operator gives its Services; the Service forwards it to the engine's "
       "port (LLMKube's Go agent always registered 8080)"),
    _h(ISVC, "spec.endpoint.type", "`ClusterIP` (the default) is the registered Service's type; NodePort and "
             "LoadBalancer are refused", when=_not("ClusterIP")),
    _refused(ISVC, "spec.endpoint.nodePort", "refused: the registered Service is a ClusterIP one"),
    _h(ISVC, "spec.endpoint.path", "the path `status.endpoint` ends with, as LLMKube's operator writes it (the "
       "engine serves every OpenAI path whatever it says)"),
    _na(ISVC, "spec.endpoint.gateway", "Gateway API routes are the operator's; the agent registers the Service",
        subtree=True),
    _na(ISVC, "spec.containerPort", "the agent picks a free port for the engine; the Service's port "
        "(`endpoint.port`) maps to it"),
    # -- InferenceService: pods, images and other runtimes -----------------------------
    _na(ISVC, "spec.image", f"{_POD} (the engine binary is the Mac's)"),
    _na(ISVC, "spec.imagePullSecrets", _POD, subtree=True),
    _na(ISVC, "spec.resources", f"{_POD}; memory is admitted from the model's own estimate and the Model's "
        "`memoryBudget`", subtree=True),
    _na(ISVC, "spec.affinity", _SCHEDULING, subtree=True),
    _na(ISVC, "spec.nodeSelector", _SCHEDULING, subtree=True),
    _na(ISVC, "spec.tolerations", _SCHEDULING, subtree=True),
    _na(ISVC, "spec.topologySpreadConstraints", _SCHEDULING, subtree=True),
    _na(ISVC, "spec.priorityClassName", f"{_SCHEDULING}; on a Mac `priority` orders evictions"),
    _na(ISVC, "spec.runtimeClassName", _POD),
    _na(ISVC, "spec.securityContext", _POD, subtree=True),
    _na(ISVC, "spec.podSecurityContext", _POD, subtree=True),
    _na(ISVC, "spec.extraVolumes", _POD, subtree=True),
    _na(ISVC, "spec.extraVolumeMounts", _POD, subtree=True),
    _na(ISVC, "spec.podAnnotations", _POD, subtree=True),
    _na(ISVC, "spec.podLabels", _POD, subtree=True),
    _na(ISVC, "spec.probeOverrides", f"{_POD}; the agent probes the engine's own health and readiness",
        subtree=True),
    _na(ISVC, "spec.revisionHistoryLimit", "Deployment revisions; a Mac keeps no ReplicaSets"),
    _na(ISVC, "spec.skipModelInit", "the pod's download init container; the agent fetches a model itself "
        "(or uses a local file) before starting"),
    _na(ISVC, "spec.modelCache", "the pod's cache volume; a Mac has one model store (`--model-dir`)", subtree=True),
    _na(ISVC, "spec.disruption", "Karpenter/Cluster Autoscaler annotations on pods; use `evictionProtection`",
        subtree=True),
    _na(ISVC, "spec.slo", "a Pyrra objective the operator creates from the cluster's metrics", subtree=True),
    _na(ISVC, "spec.vllmConfig", _OTHER_RUNTIME, subtree=True),
    _na(ISVC, "spec.sglangConfig", _OTHER_RUNTIME, subtree=True),
    _na(ISVC, "spec.tgiConfig", _OTHER_RUNTIME, subtree=True),
    _na(ISVC, "spec.personaPlexConfig", _OTHER_RUNTIME, subtree=True),
    # -- Model -------------------------------------------------------------------
    _h(MODEL, "spec.source", "fetched into the model store (http(s), hf://) or used in place (file://, a path "
       "under `--allowed-model-roots`); with `files`, the repository, prefix or directory they come from"),
    _h(MODEL, "spec.sha256", "a downloaded file (with `files`: `files[0]`) is verified against it before the "
       "first start; a local source (file://, a path) is served as it is, not hashed; part of the spec hash"),
    _h(MODEL, "spec.format", "`gguf` (llama-server) or `mlx` (mlx_lm.server); safetensors and pytorch refused"),
    _h(MODEL, "spec.sourceSecretRef.name", "the Secret whose `token` key authorises the download"),
    _h(MODEL, "spec.hardware.accelerator", "`metal` makes services of this Model ours"),
    _h(MODEL, "spec.hardware.gpu.layers", "`--n-gpu-layers` (0 or unset: all layers, sent as 999; -1: llama.cpp "
       "fits the layers to the free memory)"),
    _h(MODEL, "spec.hardware.gpu.sharding.strategy", "`--split-mode`"),
    _h(MODEL, "spec.hardware.gpu.sharding.layerSplit", "`--tensor-split`"),
    _h(MODEL, "spec.hardware.gpu.count", "checked against `layerSplit`'s length; a Mac has one GPU"),
    _h(MODEL, "spec.hardware.memoryBudget", "the memory admission budget"),
    _h(MODEL, "spec.hardware.memoryFraction", "the budget as a fraction of RAM"),
    _h(MODEL, "spec.refreshPolicy", "`IfNotPresent` (the default) is what the agent does; `OnChange` is refused "
       "(a cached model is never fetched again: change the source or sha256)", when=_not("IfNotPresent")),
    _h(MODEL, "spec.files", "the files fetched from `source` (then a repository, prefix or directory) into one "
       "directory, each checked (relative, no `..`, no glob, at most 64); `files[0]` is loaded, a split GGUF's "
       "other parts (`-0000N-of-0000M.gguf`, all required) beside it; `sha256` verifies `files[0]`; every file "
       "counted in memory admission and part of the spec hash"),
    _h(MODEL, "spec.mmproj", "fetched with `files` (which must be set, as LLMKube requires) and passed as "
       "`--mmproj`; counted in memory admission"),
    _na(MODEL, "spec.hardware.gpu.enabled", "Metal is always there; `layers` says how much runs on it"),
    _na(MODEL, "spec.hardware.gpu.memory", f"{_GPU_NODE}; memory admission reads the model itself"),
    _na(MODEL, "spec.hardware.gpu.vendor", _GPU_NODE),
    _na(MODEL, "spec.hardware.gpu.runtime", _GPU_NODE),
    _na(MODEL, "spec.hardware.gpu.resourceName", _GPU_NODE),
    _na(MODEL, "spec.hardware.gpu.resourceClaims", _GPU_NODE, subtree=True),
    _na(MODEL, "spec.hardware.gpu.tolerationKey", _GPU_NODE),
    _na(MODEL, "spec.quantization", "a label; the GGUF header says the real type"),
    _na(MODEL, "spec.resources", "requests of LLMKube's pods; the agent admits memory from the model itself",
        subtree=True),
    _na(MODEL, "spec.prefetch", "the operator's pre-download into a cluster volume; the agent downloads into "
        "the Mac's store when a service needs the model"),
    _na(MODEL, "spec.prefetchTolerations", "tolerations of the operator's prefetch Job", subtree=True),
)

def rows(kind: str) -> tuple[FieldRow, ...]:
    return tuple(row for row in FIELDS if row.kind == kind)


def row_for(kind: str, path: str) -> FieldRow | None:
    """The row that accounts for `path` (its own, or a subtree row above it)."""
    for row in rows(kind):
        if row.path == path or (row.subtree and (path.startswith(row.path + ".") or path.startswith(row.path + "[]"))):
            return row
    return None


def _values(obj: Any, parts: list[str]) -> Iterator[Any]:
    """Every value at `parts` below `obj` (`x[]` walks each item of list `x`)."""
    if not parts:
        yield obj
        return
    head, rest = parts[0], parts[1:]
    each = head.endswith("[]")
    key = head.removesuffix("[]")
    if not isinstance(obj, Mapping) or key not in obj:
        return
    value = obj[key]
    if each:
        for item in value if isinstance(value, list) else ():
            yield from _values(item, rest)
    else:
        yield from _values(value, rest)


def refusals(kind: str, raw_spec: Any, name: str) -> tuple[FieldError, ...]:
    """A FieldError (reason `UnsupportedField`) for every field of `raw_spec` the table refuses."""
    errors: list[FieldError] = []
    for row in rows(kind):
        when = row.refuse_when
        if when is None:
            continue
        parts = row.path.removeprefix("spec.").split(".")
        for value in _values(raw_spec, parts):
            if when(value):
                why = _REFUSED_PREFIX.sub("", row.text)
                errors.append(FieldError(row.path, f"{_describe(value)}cannot be honoured by metal-agent: {why}",
                                         kind, name, UNSUPPORTED_FIELD))
                break
    return tuple(errors)


_REFUSED_PREFIX = re.compile(r"^refused(?: when \w+)?: ")


def _describe(value: Any) -> str:
    """The offending value and a space, when short enough to quote ("" for lists and objects)."""
    if isinstance(value, bool):
        return f"{str(value).lower()} "
    if isinstance(value, int | float) or (isinstance(value, str) and len(value) <= 40):
        return f"{value!r} "
    return ""


def markdown_table(kind: str) -> str:
    lines = ["| Field | Treatment | How, or why |", "|---|---|---|"]
    for row in sorted(rows(kind), key=lambda r: (list(Treatment).index(r.treatment), r.path)):
        field = f"`{row.path}`" + (" (and below)" if row.subtree else "")
        text = row.text.removeprefix("refused").lstrip(": ") if row.treatment is Treatment.REFUSED else row.text
        lines.append(f"| {field} | {row.treatment.value} | {text.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


BEGIN = "<!-- BEGIN spec-fields (generated by scripts/update_readme.py from metal_agent.core.fields) -->"
END = "<!-- END spec-fields -->"


def render_block() -> str:
    intro = ("Every field of LLMKube's CRDs, and what the agent does with it. Setting a refused field (or a"
             " refused value) refuses the spec: `MetalSpecAccepted=False`, reason `UnsupportedField`, and the"
             " message names the field and why. Not applicable fields configure what a Mac has no counterpart of"
             " and are ignored, as LLMKube's Go agent ignores them.")
    return (f"{BEGIN}\n{intro}\n\n**InferenceService**\n\n{markdown_table(ISVC)}\n\n"
            f"**Model**\n\n{markdown_table(MODEL)}\n{END}")

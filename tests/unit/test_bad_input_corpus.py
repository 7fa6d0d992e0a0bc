"""A corpus of bad manifests: each is refused with the exact field path, and nothing raises."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from metal_agent.core.claim import evaluate
from metal_agent.core.isvc_validation import parse_inference_service
from metal_agent.core.model_validation import parse_model
from metal_agent.core.result import Invalid, NotOurs, Parsed
from tests.support.manifests import gpu, isvc_doc, model_doc

Doc = dict[str, Any]


def spec(**fields: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        doc["spec"].update(fields)

    return mutate


def meta(**fields: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        doc["metadata"].update(fields)

    return mutate


def drop(*path: str) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


class Replacement:
    """Returned by a mutation that swaps the whole document for `value`."""

    def __init__(self, value: Any) -> None:
        self.value = value


def replace(value: Any) -> Callable[[Doc], Replacement]:
    return lambda doc: Replacement(value)


def isvc_case(case_id: str, mutate: Callable[[Doc], Any], *paths: str):
    return pytest.param("InferenceService", mutate, paths, id=f"isvc-{case_id}")


def model_case(case_id: str, mutate: Callable[[Doc], Any], *paths: str):
    return pytest.param("Model", mutate, paths, id=f"model-{case_id}")


def hw(**gpu_fields: Any) -> Callable[[Doc], None]:
    return spec(hardware=gpu(**gpu_fields))


def sharding(**fields: Any) -> Callable[[Doc], None]:
    return spec(hardware=gpu(sharding=fields))


OWNED_SPELLINGS = [
    "--model", "-m", "-m=x.gguf", "--model=x.gguf", "--MODEL", "-mu", "--model-url",
    "-hf", "-hfr", "--hf-repo", "--hf-repo=org/repo", "-hff", "--hf_file", "--hf-token", "-dr",
    "--host", "--host=0.0.0.0", "--port", "--port=123", "--port 123", "-port", "--Port",
    "--api-key", "--api_key", "--api-key=secret", "--api-key-file", "--log-file", "--log-disable",
    "--metrics", "--mlock", "--load-mode", "-lm", "--path", "--media-path", "--slot-save-path",
    "--tools", "--tools=all", "--mcp-servers-config", "--ssl-key-file", "--ssl-cert-file",
    "--api-prefix", "--reuse-port", "--models-dir", "--models-preset", "--help", "-h", "--version",
    "--list-devices", "-lv", "--verbosity", "--log-verbosity=5",
]  # fmt: skip

CORPUS = [
    # --- InferenceService: numbers out of range or of the wrong type -------
    isvc_case("replicas-negative", spec(replicas=-1), "spec.replicas"),
    isvc_case("replicas-too-many", spec(replicas=11), "spec.replicas"),
    isvc_case("replicas-bool", spec(replicas=True), "spec.replicas"),
    isvc_case("replicas-string", spec(replicas="1"), "spec.replicas"),
    isvc_case("contextSize-too-small", spec(contextSize=127), "spec.contextSize"),
    isvc_case("contextSize-too-big", spec(contextSize=2_097_153), "spec.contextSize"),
    isvc_case("contextSize-float", spec(contextSize=4096.0), "spec.contextSize"),
    isvc_case("contextSize-null", spec(contextSize=None), "spec.contextSize"),
    isvc_case("parallelSlots-zero", spec(parallelSlots=0), "spec.parallelSlots"),
    isvc_case("parallelSlots-65", spec(parallelSlots=65), "spec.parallelSlots"),
    isvc_case("batchSize-zero", spec(batchSize=0), "spec.batchSize"),
    isvc_case("batchSize-too-big", spec(batchSize=16385), "spec.batchSize"),
    isvc_case("uBatchSize-zero", spec(uBatchSize=0), "spec.uBatchSize"),
    isvc_case("uBatchSize-beyond-int32", spec(uBatchSize=2**31), "spec.uBatchSize"),
    isvc_case("moeCPULayers-negative", spec(moeCPULayers=-1), "spec.moeCPULayers"),
    isvc_case("reasoningBudget-negative", spec(reasoningBudget=-5), "spec.reasoningBudget"),
    isvc_case("flashAttention-string", spec(flashAttention="yes"), "spec.flashAttention"),
    isvc_case("jinja-int", spec(jinja=1), "spec.jinja"),
    isvc_case("jinja-string", spec(jinja="false"), "spec.jinja"),
    isvc_case("jinja-null", spec(jinja=None), "spec.jinja"),
    # --- flashAttention false with a quantized V cache: llama-server exits ------
    isvc_case("flash-off-v-q8_0", spec(flashAttention=False, cacheTypeV="q8_0"), "spec.flashAttention"),
    isvc_case("flash-off-v-q4_0-k-f16", spec(flashAttention=False, cacheTypeK="f16", cacheTypeV="q4_0"), "spec.flashAttention"),
    isvc_case("flash-off-v-iq4_nl", spec(flashAttention=False, cacheTypeV="iq4_nl"), "spec.flashAttention"),
    isvc_case("flash-off-custom-v-turbo3", spec(flashAttention=False, cacheTypeCustomV="turbo3"), "spec.flashAttention"),
    isvc_case("flash-off-custom-v-wins-over-f16", spec(flashAttention=False, cacheTypeV="f16", cacheTypeCustomV="q8_0"),
              "spec.flashAttention"),
    isvc_case("suspend-string", spec(suspend="false"), "spec.suspend"),
    isvc_case("evictionProtection-null", spec(evictionProtection=None), "spec.evictionProtection"),
    # --- enums ---------------------------------------------------------------
    isvc_case("cacheTypeK-unknown", spec(cacheTypeK="q9_0"), "spec.cacheTypeK"),
    isvc_case("cacheTypeV-upper-case", spec(cacheTypeV="F16"), "spec.cacheTypeV"),
    isvc_case("cacheTypeK-not-string", spec(cacheTypeK=8), "spec.cacheTypeK"),
    isvc_case("mode-unknown", spec(mode="completion"), "spec.mode"),
    isvc_case("priority-unknown", spec(priority="urgent"), "spec.priority"),
    isvc_case("rope-type-unknown", spec(ropeScaling={"type": "ntk"}), "spec.ropeScaling.type"),
    # --- custom cache types: identifiers only --------------------------------
    isvc_case("custom-cache-space", spec(cacheTypeCustomK="turbo 3"), "spec.cacheTypeCustomK"),
    isvc_case("custom-cache-quote", spec(cacheTypeCustomK='turbo3"'), "spec.cacheTypeCustomK"),
    isvc_case("custom-cache-semicolon", spec(cacheTypeCustomK="turbo3;reboot"), "spec.cacheTypeCustomK"),
    isvc_case("custom-cache-subshell", spec(cacheTypeCustomV="$(reboot)"), "spec.cacheTypeCustomV"),
    isvc_case("custom-cache-newline", spec(cacheTypeCustomV="turbo3\n--port"), "spec.cacheTypeCustomV"),
    isvc_case("custom-cache-flag", spec(cacheTypeCustomK="--port"), "spec.cacheTypeCustomK"),
    isvc_case("custom-cache-upper", spec(cacheTypeCustomK="TURBO3"), "spec.cacheTypeCustomK"),
    isvc_case("custom-cache-too-long", spec(cacheTypeCustomK="t" * 33), "spec.cacheTypeCustomK"),
    isvc_case("custom-cache-not-string", spec(cacheTypeCustomV=["turbo3"]), "spec.cacheTypeCustomV"),
    # --- rope scaling ------------------------------------------------------------
    isvc_case("rope-factor-number", spec(ropeScaling={"factor": 4}), "spec.ropeScaling.factor"),
    isvc_case("rope-factor-negative", spec(ropeScaling={"factor": "-1"}), "spec.ropeScaling.factor"),
    isvc_case("rope-factor-zero", spec(ropeScaling={"factor": "0.0"}), "spec.ropeScaling.factor"),
    isvc_case("rope-factor-exponent", spec(ropeScaling={"factor": "1e3"}), "spec.ropeScaling.factor"),
    isvc_case("rope-factor-nan", spec(ropeScaling={"factor": "nan"}), "spec.ropeScaling.factor"),
    isvc_case("rope-originalContext-small", spec(ropeScaling={"originalContext": 64}), "spec.ropeScaling.originalContext"),
    isvc_case("rope-not-object", spec(ropeScaling="yarn"), "spec.ropeScaling"),
    # --- lists -------------------------------------------------------------------
    isvc_case("extraArgs-null", spec(extraArgs=None), "spec.extraArgs"),
    isvc_case("extraArgs-string", spec(extraArgs="--temp 0.2"), "spec.extraArgs"),
    isvc_case("extraArgs-number-item", spec(extraArgs=["--temp", 0.2]), "spec.extraArgs[1]"),
    isvc_case("extraArgs-empty-item", spec(extraArgs=["--temp", ""]), "spec.extraArgs[1]"),
    isvc_case("extraArgs-nul", spec(extraArgs=["--alias", "a\x00b"]), "spec.extraArgs[1]"),
    isvc_case("extraArgs-newline", spec(extraArgs=["--alias", "a\nb"]), "spec.extraArgs[1]"),
    isvc_case("extraArgs-carriage-return", spec(extraArgs=["--alias\r"]), "spec.extraArgs[0]"),
    isvc_case("metadataOverrides-null", spec(metadataOverrides=None), "spec.metadataOverrides"),
    isvc_case("metadataOverrides-no-type", spec(metadataOverrides=["a=1"]), "spec.metadataOverrides[0]"),
    isvc_case("metadataOverrides-bad-type", spec(metadataOverrides=["k=int:1", "k=long:1"]), "spec.metadataOverrides[1]"),
    isvc_case("tensorOverrides-no-pattern", spec(tensorOverrides=["=CPU"]), "spec.tensorOverrides[0]"),
    # What llama-server (build 11434) would split, misread or reject: core.llama_overrides.
    isvc_case("tensorOverrides-comma", spec(tensorOverrides=["exps=CPU", "blk\\.{1,3}=CPU"]), "spec.tensorOverrides[1]"),
    isvc_case("tensorOverrides-two-equals", spec(tensorOverrides=["a=b=CPU"]), "spec.tensorOverrides[0]"),
    isvc_case("metadataOverrides-int-text", spec(metadataOverrides=["k=int:ten"]), "spec.metadataOverrides[0]"),
    isvc_case("metadataOverrides-float-text", spec(metadataOverrides=["k=float:1.5x"]), "spec.metadataOverrides[0]"),
    isvc_case("metadataOverrides-bool-1", spec(metadataOverrides=["k=bool:1"]), "spec.metadataOverrides[0]"),
    isvc_case("metadataOverrides-long-str", spec(metadataOverrides=["k=str:" + "x" * 128]), "spec.metadataOverrides[0]"),
    isvc_case("metadataOverrides-long-key", spec(metadataOverrides=["k" * 128 + "=int:1"]), "spec.metadataOverrides[0]"),
    isvc_case("tensorOverrides-object", spec(tensorOverrides={"exps": "CPU"}), "spec.tensorOverrides"),
    isvc_case("reasoningBudgetMessage-nul", spec(reasoningBudgetMessage="stop\x00"), "spec.reasoningBudgetMessage"),
    isvc_case("reasoningBudgetMessage-number", spec(reasoningBudgetMessage=5), "spec.reasoningBudgetMessage"),
    # --- names and structure ----------------------------------------------------
    isvc_case("modelRef-missing", drop("spec", "modelRef"), "spec.modelRef"),
    isvc_case("modelRef-empty", spec(modelRef=""), "spec.modelRef"),
    isvc_case("modelRef-invalid", spec(modelRef="Qwen_3"), "spec.modelRef"),
    isvc_case("modelRef-number", spec(modelRef=42), "spec.modelRef"),
    isvc_case("name-unicode", meta(name="modèle"), "metadata.name"),
    isvc_case("name-too-long", meta(name="a" * 254), "metadata.name"),
    isvc_case("name-upper-case", meta(name="Chat"), "metadata.name"),
    isvc_case("name-missing", drop("metadata", "name"), "metadata.name"),
    isvc_case("namespace-with-dot", meta(namespace="team.a"), "metadata.namespace"),
    isvc_case("namespace-too-long", meta(namespace="n" * 64), "metadata.namespace"),
    isvc_case("generation-string", meta(generation="3"), "metadata.generation"),
    isvc_case("metadata-missing", drop("metadata"), "metadata"),
    isvc_case("spec-missing", drop("spec"), "spec"),
    isvc_case("spec-list", replace({"metadata": {"name": "x"}, "spec": ["modelRef"]}), "spec"),
    isvc_case("root-list", replace([{"spec": {}}]), "<root>"),
    isvc_case("root-null", replace(None), "<root>"),
    # --- Model: source ---------------------------------------------------------------
    model_case("source-missing", drop("spec", "source"), "spec.source"),
    model_case("source-empty", spec(source=""), "spec.source"),
    model_case("source-blank", spec(source="   "), "spec.source"),
    model_case("source-number", spec(source=42), "spec.source"),
    model_case("source-list", spec(source=["https://x/m.gguf"]), "spec.source"),
    model_case("source-dotdot-url", spec(source="https://example.com/a/../../etc/passwd"), "spec.source"),
    model_case("source-dotdot-relative", spec(source="../models/m.gguf"), "spec.source"),
    model_case("source-dotdot-absolute", spec(source="/Users/me/../secret.gguf"), "spec.source"),
    model_case("source-dotdot-hf", spec(source="hf://org/../repo"), "spec.source"),
    model_case("source-dotdot-percent-encoded", spec(source="https://x/a/%2E%2e/m.gguf"), "spec.source"),
    model_case("source-unknown-scheme", spec(source="ftp://host/m.gguf"), "spec.source"),
    model_case("source-relative-file-url", spec(source="file://relative/m.gguf"), "spec.source"),
    model_case("source-url-without-host", spec(source="https:///m.gguf"), "spec.source"),
    model_case("source-directory", spec(source="https://example.com/models/"), "spec.source"),
    model_case("source-bare-host", spec(source="https://example.com"), "spec.source"),
    model_case("source-newline", spec(source="https://x/m.gguf\n--port"), "spec.source"),
    model_case("source-control-char", spec(source="https://x/m\x1b.gguf"), "spec.source"),
    model_case("source-padded", spec(source=" https://x/m.gguf"), "spec.source"),
    # --- Model: other fields -----------------------------------------------------------
    model_case("sha256-short", spec(sha256="a" * 63), "spec.sha256"),
    model_case("sha256-not-hex", spec(sha256="g" * 64), "spec.sha256"),
    model_case("sha256-number", spec(sha256=42), "spec.sha256"),
    model_case("format-unknown", spec(format="onnx"), "spec.format"),
    model_case("accelerator-unknown", spec(hardware={"accelerator": "tpu"}), "spec.hardware.accelerator"),
    model_case("hardware-list", spec(hardware=["metal"]), "spec.hardware"),
    model_case("gpu-string", spec(hardware={"accelerator": "metal", "gpu": "all"}), "spec.hardware.gpu"),
    model_case("gpu-layers-below-minus-one", hw(layers=-2), "spec.hardware.gpu.layers"),
    model_case("gpu-layers-all-string", hw(layers="all"), "spec.hardware.gpu.layers"),
    model_case("gpu-count-nine", hw(count=9), "spec.hardware.gpu.count"),
    model_case("gpu-count-negative", hw(count=-1), "spec.hardware.gpu.count"),
    model_case("memoryBudget-garbage", spec(hardware={"accelerator": "metal", "memoryBudget": "lots"}), "spec.hardware.memoryBudget"),
    model_case("memoryBudget-unit-typo", spec(hardware={"accelerator": "metal", "memoryBudget": "48GB"}), "spec.hardware.memoryBudget"),
    model_case("memoryBudget-negative", spec(hardware={"accelerator": "metal", "memoryBudget": "-1Gi"}), "spec.hardware.memoryBudget"),
    model_case("memoryBudget-zero", spec(hardware={"accelerator": "metal", "memoryBudget": "0"}), "spec.hardware.memoryBudget"),
    model_case("memoryBudget-bool", spec(hardware={"accelerator": "metal", "memoryBudget": True}), "spec.hardware.memoryBudget"),
    model_case("memoryFraction-zero", spec(hardware={"accelerator": "metal", "memoryFraction": 0}), "spec.hardware.memoryFraction"),
    model_case("memoryFraction-above-one", spec(hardware={"accelerator": "metal", "memoryFraction": 1.5}), "spec.hardware.memoryFraction"),
    model_case("memoryFraction-string", spec(hardware={"accelerator": "metal", "memoryFraction": "0.5"}), "spec.hardware.memoryFraction"),
    model_case("memoryFraction-nan", spec(hardware={"accelerator": "metal", "memoryFraction": float("nan")}), "spec.hardware.memoryFraction"),
    # --- Model: sharding ---------------------------------------------------------------
    model_case("strategy-unknown", sharding(strategy="diagonal"), "spec.hardware.gpu.sharding.strategy"),
    model_case("sharding-string", hw(sharding="layer"), "spec.hardware.gpu.sharding"),
    model_case("layerSplit-non-numeric", sharding(layerSplit=["1", "a"]), "spec.hardware.gpu.sharding.layerSplit[1]"),
    model_case("layerSplit-negative", sharding(layerSplit=["1", "-1"]), "spec.hardware.gpu.sharding.layerSplit[1]"),
    model_case("layerSplit-all-zero", sharding(layerSplit=["0", "0.0"]), "spec.hardware.gpu.sharding.layerSplit"),
    model_case("layerSplit-inf", sharding(layerSplit=["inf"]), "spec.hardware.gpu.sharding.layerSplit[0]"),
    model_case("layerSplit-exponent", sharding(layerSplit=["1e2"]), "spec.hardware.gpu.sharding.layerSplit[0]"),
    model_case("layerSplit-numbers-not-strings", sharding(layerSplit=[1, 1]),
               "spec.hardware.gpu.sharding.layerSplit[0]", "spec.hardware.gpu.sharding.layerSplit[1]"),
    model_case("layerSplit-null", sharding(layerSplit=None), "spec.hardware.gpu.sharding.layerSplit"),
    model_case("layerSplit-comma-string", sharding(layerSplit="1,1"), "spec.hardware.gpu.sharding.layerSplit"),
    model_case("layerSplit-wrong-length", hw(count=2, sharding={"layerSplit": ["1", "1", "1"]}),
               "spec.hardware.gpu.sharding.layerSplit"),
    model_case("layerSplit-wrong-length-and-bad-entry", hw(count=2, sharding={"layerSplit": ["x", "1", "1"]}),
               "spec.hardware.gpu.sharding.layerSplit[0]", "spec.hardware.gpu.sharding.layerSplit"),
]  # fmt: skip

OWNED_CASES = [
    isvc_case(f"owned-{token}", spec(extraArgs=["--top-k", "40", token]), "spec.extraArgs[2]")
    for token in OWNED_SPELLINGS
]


def build(kind: str, mutate: Callable[[Doc], Any]) -> Any:
    doc = isvc_doc() if kind == "InferenceService" else model_doc()
    replaced = mutate(doc)
    return replaced.value if isinstance(replaced, Replacement) else doc


def parse(kind: str, raw: Any):
    return parse_inference_service(raw) if kind == "InferenceService" else parse_model(raw)


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize(("kind", "mutate", "paths"), OWNED_CASES)
def test_agent_owned_options_are_refused_in_every_spelling(kind, mutate, paths):
    # The engine's allowlist runs in evaluate, once the engine is known (core.extra_args).
    outcome = evaluate(build(kind, mutate), model_doc())
    assert isinstance(outcome, Invalid), outcome
    assert outcome.paths() == paths, [str(e) for e in outcome.errors]
    assert outcome.errors[0].reason == "ExtraArgRefused"


@pytest.mark.parametrize(("kind", "mutate", "paths"), CORPUS)
def test_bad_input_is_refused_with_its_field_path(kind, mutate, paths):
    raw = build(kind, mutate)
    outcome = parse(kind, raw)
    assert isinstance(outcome, Invalid), outcome
    assert outcome.paths() == paths, [str(e) for e in outcome.errors]
    assert all(error.kind == kind for error in outcome.errors)
    assert all(error.message for error in outcome.errors)


@pytest.mark.parametrize(("kind", "mutate", "paths"), CORPUS + OWNED_CASES)
def test_bad_input_never_becomes_a_workload(kind, mutate, paths):
    raw = build(kind, mutate)
    isvc, model = (raw, model_doc()) if kind == "InferenceService" else (isvc_doc(), raw)
    assert not isinstance(evaluate(isvc, model), Parsed)


def test_owned_flag_error_names_the_flag_and_the_reason():
    outcome = evaluate(isvc_doc(extraArgs=["--threads", "4", "--port=9000"]), model_doc())
    assert isinstance(outcome, Invalid)
    (error,) = outcome.errors
    assert error.path == "spec.extraArgs[2]"
    assert "'--port' is refused" in error.message and "where it listens" in error.message
    assert error.describe().startswith("InferenceService default/chat: spec.extraArgs[2]: ")


def test_every_error_in_one_object_is_reported():
    doc = isvc_doc(
        replicas=-1,
        contextSize="big",
        cacheTypeK="q9",
        cacheTypeCustomV="turbo 3",
        extraArgs=["--ok", "--host", "--port=1"],
        ropeScaling={"type": "ntk", "factor": "-2", "originalContext": 1},
        mode=None,
    )
    doc["metadata"]["name"] = "Bad_Name"
    outcome = parse_inference_service(doc)
    assert isinstance(outcome, Invalid)
    assert set(outcome.paths()) == {
        "metadata.name",
        "spec.replicas",
        "spec.contextSize",
        "spec.cacheTypeK",
        "spec.cacheTypeCustomV",
        "spec.ropeScaling.type",
        "spec.ropeScaling.factor",
        "spec.ropeScaling.originalContext",
        "spec.mode",
    }


def test_errors_of_a_model_are_all_reported():
    outcome = parse_model(
        model_doc(
            source="ftp://x/m.gguf",
            sha256="nope",
            format="onnx",
            hardware={"accelerator": "metal", "gpu": {"layers": -5, "count": 10}, "memoryFraction": 2},
        )
    )
    assert isinstance(outcome, Invalid)
    assert set(outcome.paths()) == {
        "spec.source",
        "spec.sha256",
        "spec.format",
        "spec.hardware.gpu.layers",
        "spec.hardware.gpu.count",
        "spec.hardware.memoryFraction",
    }


def test_unserviceable_runtime_is_not_ours_even_with_bad_fields():
    outcome = evaluate(isvc_doc(runtime="tgi", replicas=-4), model_doc())
    assert isinstance(outcome, NotOurs)


# Values of every JSON type, plus a few that are traps in Python.
WEIRD_VALUES = [None, True, False, -1, 0, 2**63, 1.5, float("nan"), "", "x", "\x00", "-", [], [None], {}, {"a": [1]}]

ISVC_KEYS = [
    "modelRef", "replicas", "suspend", "runtime", "contextSize", "ropeScaling", "parallelSlots",
    "flashAttention", "jinja", "cacheTypeK", "cacheTypeV", "cacheTypeCustomK", "cacheTypeCustomV",
    "moeCPUOffload", "moeCPULayers", "noKvOffload", "noWarmup", "reasoningBudget",
    "reasoningBudgetMessage", "metadataOverrides", "tensorOverrides", "batchSize", "uBatchSize",
    "extraArgs", "mode", "priority", "evictionProtection",
]  # fmt: skip
MODEL_PATHS = [
    ("spec", "source"), ("spec", "sha256"), ("spec", "format"), ("spec", "hardware"),
    ("spec", "hardware", "accelerator"), ("spec", "hardware", "gpu"), ("spec", "hardware", "memoryBudget"),
    ("spec", "hardware", "memoryFraction"), ("spec", "hardware", "gpu", "layers"),
    ("spec", "hardware", "gpu", "count"), ("spec", "hardware", "gpu", "sharding"),
    ("spec", "hardware", "gpu", "sharding", "strategy"), ("spec", "hardware", "gpu", "sharding", "layerSplit"),
    ("metadata",), ("metadata", "name"), ("metadata", "namespace"), ("spec",),
]  # fmt: skip
ROPE_KEYS = ["type", "factor", "originalContext"]


def _set(doc: Doc, path: tuple[str, ...], value: Any) -> None:
    target = doc
    for key in path[:-1]:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    target[path[-1]] = value


def test_no_value_of_any_type_in_any_field_raises():
    outcomes = 0
    for key, value in itertools.product(ISVC_KEYS, WEIRD_VALUES):
        outcomes += _check(isvc_doc(**{key: copy.deepcopy(value)}), model_doc())
    for key, value in itertools.product(ROPE_KEYS, WEIRD_VALUES):
        outcomes += _check(isvc_doc(ropeScaling={key: copy.deepcopy(value)}), model_doc())
    for path, value in itertools.product(MODEL_PATHS, WEIRD_VALUES):
        model = model_doc(hardware=gpu(layers=1, sharding={"layerSplit": ["1"]}))
        _set(model, path, copy.deepcopy(value))
        outcomes += _check(isvc_doc(), model)
    assert outcomes == (len(ISVC_KEYS) + len(ROPE_KEYS) + len(MODEL_PATHS)) * len(WEIRD_VALUES)


def _check(isvc: Any, model: Any) -> int:
    """Run every entry point; each must return a result, never raise."""
    for outcome in (parse_inference_service(isvc), parse_model(model), evaluate(isvc, model)):
        assert isinstance(outcome, Parsed | Invalid | NotOurs)
    return 1


def test_flash_attention_off_with_quantized_v_says_why_and_how_to_fix():
    outcome = parse_inference_service(isvc_doc(flashAttention=False, cacheTypeK="q8_0", cacheTypeCustomV="turbo3"))
    assert isinstance(outcome, Invalid)
    (error,) = outcome.errors
    assert error.path == "spec.flashAttention"
    # The field that conflicts, llama-server's own words, and the way out.
    assert "spec.cacheTypeCustomV: turbo3" in error.message
    assert "quantized V cache requires flash_attn to be enabled" in error.message
    assert "f16, bf16 or f32" in error.message


@pytest.mark.parametrize("cache_v", ["f16", "f32", "bf16"])
def test_flash_attention_off_with_a_float_v_cache_is_valid(cache_v):
    outcome = parse_inference_service(isvc_doc(flashAttention=False, cacheTypeK="q8_0", cacheTypeCustomV=cache_v))
    assert isinstance(outcome, Parsed), outcome

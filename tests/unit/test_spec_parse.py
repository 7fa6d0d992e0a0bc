"""Parsing raw LLMKube objects into typed specs, LLMKube's defaults, and the claim rule."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest

from metal_agent.core.api import (
    Accelerator,
    CacheType,
    InferenceServiceSpec,
    Mode,
    ModelFormat,
    Priority,
    RopeScaling,
    RopeScalingType,
    Runtime,
    ShardingStrategy,
    SourceKind,
)
from metal_agent.core.claim import Ours, claim, evaluate, wanted_model
from metal_agent.core.extra_args import check_extra_args
from metal_agent.core.flags import Dialect, MlockStyle, dialect_from_help, mlock_style_from_help
from metal_agent.core.llama_options import LLAMA_SERVER_OPTIONS
from metal_agent.core.quantity import quantity_to_bytes
from metal_agent.core.isvc_validation import parse_inference_service
from metal_agent.core.model_validation import parse_model
from metal_agent.core.result import Invalid, NotOurs, Parsed
from tests.support.manifests import gpu, isvc_doc, model_doc


def parsed_isvc(**spec):
    outcome = parse_inference_service(isvc_doc(**spec))
    assert isinstance(outcome, Parsed), outcome
    return outcome.value


def parsed_model(**spec):
    outcome = parse_model(model_doc(**spec))
    assert isinstance(outcome, Parsed), outcome
    return outcome.value


# ---------------------------------------------------------------------------
# InferenceService fields -> typed values
# ---------------------------------------------------------------------------


def test_defaults_are_llmkubes():
    spec = parsed_isvc().spec
    assert spec == InferenceServiceSpec(model_ref="tiny")
    assert (spec.replicas, spec.context_size, spec.batch_size, spec.parallel_slots) == (1, 2048, 2048, 1)
    # jinja unset is None, not False: false now asks for --no-jinja, unset keeps llama-server's default.
    assert spec.flash_attention is True and spec.jinja is None
    assert (spec.runtime, spec.mode, spec.priority) == (Runtime.LLAMACPP, Mode.CHAT, Priority.NORMAL)
    assert spec.ubatch_size is None and spec.rope_scaling is None
    assert spec.effective_cache_type_k is None and spec.effective_cache_type_v is None


@pytest.mark.parametrize(
    ("raw", "attr", "expected"),
    [
        pytest.param({"replicas": 0}, "replicas", 0, id="replicas"),
        pytest.param({"suspend": True}, "suspend", True, id="suspend"),
        pytest.param({"runtime": ""}, "runtime", Runtime.LLAMACPP, id="runtime-empty"),
        pytest.param({"runtime": "llamacpp"}, "runtime", Runtime.LLAMACPP, id="runtime"),
        pytest.param({"contextSize": 262144}, "context_size", 262144, id="contextSize"),
        pytest.param({"parallelSlots": 64}, "parallel_slots", 64, id="parallelSlots"),
        pytest.param({"flashAttention": False}, "flash_attention", False, id="flashAttention"),
        pytest.param({"jinja": True}, "jinja", True, id="jinja"),
        pytest.param({"jinja": False}, "jinja", False, id="jinja-false"),
        pytest.param({"flashAttention": False, "cacheTypeK": "q4_0", "cacheTypeV": "f16"}, "flash_attention", False,
                     id="flashAttention-off-quantized-K-only"),
        pytest.param({"flashAttention": False, "cacheTypeCustomV": "bf16"}, "cache_type_custom_v", "bf16",
                     id="flashAttention-off-bf16-V"),
        pytest.param({"cacheTypeK": "q8_0"}, "cache_type_k", CacheType.Q8_0, id="cacheTypeK"),
        pytest.param({"cacheTypeV": "iq4_nl"}, "cache_type_v", CacheType.IQ4_NL, id="cacheTypeV"),
        pytest.param({"cacheTypeK": ""}, "cache_type_k", None, id="cacheTypeK-empty"),
        pytest.param({"cacheTypeCustomK": "turbo3"}, "cache_type_custom_k", "turbo3", id="cacheTypeCustomK"),
        pytest.param({"cacheTypeCustomV": "tbqp3"}, "cache_type_custom_v", "tbqp3", id="cacheTypeCustomV"),
        pytest.param({"cacheTypeCustomV": ""}, "cache_type_custom_v", None, id="cacheTypeCustomV-empty"),
        pytest.param({"moeCPUOffload": True}, "moe_cpu_offload", True, id="moeCPUOffload"),
        pytest.param({"moeCPULayers": 12}, "moe_cpu_layers", 12, id="moeCPULayers"),
        pytest.param({"noKvOffload": True}, "no_kv_offload", True, id="noKvOffload"),
        pytest.param({"noWarmup": True}, "no_warmup", True, id="noWarmup"),
        pytest.param({"reasoningBudget": 512}, "reasoning_budget", 512, id="reasoningBudget"),
        pytest.param({"reasoningBudget": 0}, "reasoning_budget", 0, id="reasoningBudget-0"),
        pytest.param({}, "reasoning_budget", None, id="reasoningBudget-unset"),
        pytest.param({"reasoningBudgetMessage": "wrap up"}, "reasoning_budget_message", "wrap up", id="reasoningBudgetMessage"),
        pytest.param({"reasoningBudgetMessage": ""}, "reasoning_budget_message", None, id="reasoningBudgetMessage-empty"),
        pytest.param({"metadataOverrides": ["a.b=int:1", "c=str:x"]}, "metadata_overrides", ("a.b=int:1", "c=str:x"), id="metadataOverrides"),
        pytest.param({"tensorOverrides": ["exps=CPU"]}, "tensor_overrides", ("exps=CPU",), id="tensorOverrides"),
        pytest.param({"batchSize": 16384}, "batch_size", 16384, id="batchSize"),
        pytest.param({"uBatchSize": 512}, "ubatch_size", 512, id="uBatchSize"),
        pytest.param({"extraArgs": ["--temp", "0.2"]}, "extra_args", ("--temp", "0.2"), id="extraArgs"),
        pytest.param({"mode": "rerank"}, "mode", Mode.RERANK, id="mode"),
        pytest.param({"priority": "critical"}, "priority", Priority.CRITICAL, id="priority"),
        pytest.param({"evictionProtection": True}, "eviction_protection", True, id="evictionProtection"),
        pytest.param(
            {"ropeScaling": {"type": "yarn", "factor": "4.0", "originalContext": 32768}},
            "rope_scaling",
            RopeScaling(RopeScalingType.YARN, "4", 32768),
            id="ropeScaling",
        ),
        pytest.param({"ropeScaling": {}}, "rope_scaling", None, id="ropeScaling-empty"),
    ],
)
def test_isvc_field_is_parsed(raw, attr, expected):
    assert getattr(parsed_isvc(**raw).spec, attr) == expected


def test_custom_cache_type_wins_over_enum():
    spec = parsed_isvc(cacheTypeK="q8_0", cacheTypeCustomK="turbo4", cacheTypeV="q4_0").spec
    assert spec.effective_cache_type_k == "turbo4"
    assert spec.effective_cache_type_v == "q4_0"


@pytest.mark.parametrize(
    ("replicas", "suspend", "wanted"),
    [(1, False, True), (3, False, True), (0, False, False), (2, True, False)],
    ids=["one", "three", "zero", "suspended"],
)
def test_wants_process_only_cares_about_zero_and_suspend(replicas, suspend, wanted):
    assert parsed_isvc(replicas=replicas, suspend=suspend).spec.wants_process is wanted


def test_identity_is_read_from_metadata():
    meta = parsed_isvc().meta
    assert (meta.namespace, meta.name, meta.uid, meta.generation, meta.resource_version) == (
        "default", "chat", "i-uid", 3, "4711"
    )
    assert meta.key == "default/chat"


def test_missing_namespace_means_default_like_kubectl():
    doc = isvc_doc()
    del doc["metadata"]["namespace"]
    outcome = parse_inference_service(doc)
    assert isinstance(outcome, Parsed) and outcome.value.meta.namespace == "default"


def test_unknown_fields_are_ignored():
    doc = isvc_doc(futureField={"anything": [1, 2]}, resources={"gpu": 1}, image="x")
    doc["status"] = {"phase": "Ready"}
    doc["metadata"]["labels"] = {"a": "b"}
    assert parse_inference_service(doc) == Parsed(parsed_isvc())


def test_parsed_values_are_immutable():
    spec = parsed_isvc(extraArgs=["--temp", "0.2"]).spec
    assert isinstance(spec.extra_args, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.context_size = 1  # type: ignore[misc]
    hash(spec)  # usable as a dict key


# ---------------------------------------------------------------------------
# Model fields -> typed values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "kind", "local_path", "file_name"),
    [
        ("https://hf.co/org/repo/resolve/main/m.Q4.gguf?download=true", SourceKind.HTTP, None, "m.Q4.gguf"),
        ("http://10.0.0.5:8000/m.gguf", SourceKind.HTTP, None, "m.gguf"),
        ("file:///Users/me/models/m.gguf", SourceKind.FILE, "/Users/me/models/m.gguf", "m.gguf"),
        ("file:///Users/me/My%20Models/m.gguf", SourceKind.FILE, "/Users/me/My Models/m.gguf", "m.gguf"),
        ("/Volumes/ssd/m.gguf", SourceKind.PATH, "/Volumes/ssd/m.gguf", "m.gguf"),
        ("hf://org/repo/m.gguf", SourceKind.HUGGINGFACE, None, "m.gguf"),
        ("pvc://models/m.gguf", SourceKind.PVC, None, "m.gguf"),
        ("s3://bucket/dir/m.gguf", SourceKind.S3, None, "m.gguf"),
        ("llama-3.1-8b", SourceKind.NAME, None, "llama-3.1-8b"),
    ],
    ids=["https", "http", "file", "file-percent-encoded", "absolute", "hf", "pvc", "s3", "bare-name"],
)
def test_model_source_is_classified(source, kind, local_path, file_name):
    parsed = parsed_model(source=source).spec.source
    assert (parsed.raw, parsed.kind, parsed.local_path, parsed.file_name) == (source, kind, local_path, file_name)


def test_model_fields_are_parsed():
    digest = "AB" * 32
    model = parsed_model(
        sha256=digest,
        format="gguf",
        hardware={
            "accelerator": "metal",
            "gpu": {"layers": 40, "count": 2, "sharding": {"strategy": "pipeline", "layerSplit": ["3", "1.50"]}},
            "memoryBudget": "48Gi",
            "memoryFraction": 0.5,
        },
    )
    spec = model.spec
    assert spec.sha256 == digest.lower()
    assert spec.format is ModelFormat.GGUF
    hw = spec.hardware
    assert hw.accelerator is Accelerator.METAL
    assert (hw.gpu.layers, hw.gpu.count) == (40, 2)
    assert hw.gpu.sharding is not None
    assert hw.gpu.sharding.strategy is ShardingStrategy.PIPELINE
    assert hw.gpu.sharding.layer_split == (Decimal(3), Decimal("1.5"))
    assert hw.memory_budget_bytes == 48 * 2**30
    assert hw.memory_fraction == 0.5


def test_model_defaults():
    spec = parsed_model().spec
    assert spec.format is ModelFormat.GGUF and spec.sha256 is None
    assert (spec.hardware.gpu.layers, spec.hardware.gpu.count, spec.hardware.gpu.sharding) == (0, None, None)


def test_memory_fraction_accepts_integer_one():
    assert parsed_model(hardware={"accelerator": "metal", "memoryFraction": 1}).spec.hardware.memory_fraction == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48Gi", 48 * 2**30),
        ("512Mi", 512 * 2**20),
        ("1.5G", 1_500_000_000),
        ("64", 64),
        ("1e9", 1_000_000_000),
        ("100k", 100_000),
        ("1500m", 2),  # rounded up, like Kubernetes' Value()
        ("12Gb", None),
        ("G", None),
        ("", None),
        ("1e999", None),
    ],
)
def test_quantity(text, expected):
    assert quantity_to_bytes(text) == expected


# ---------------------------------------------------------------------------
# The claim rule
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("isvc", "model"),
    [
        pytest.param(isvc_doc(), model_doc(), id="runtime-absent"),
        pytest.param(isvc_doc(runtime=""), model_doc(), id="runtime-empty"),
        pytest.param(isvc_doc(runtime="llamacpp"), model_doc(), id="runtime-llamacpp"),
    ],
)
def test_metal_llamacpp_services_are_ours(isvc, model):
    assert claim(isvc, model) == Ours()


@pytest.mark.parametrize(
    ("isvc", "model", "reason_part"),
    [
        pytest.param(isvc_doc(runtime="vllm"), model_doc(), "'vllm'", id="runtime-vllm"),
        pytest.param(isvc_doc(runtime="llamacpp-router"), model_doc(), "llamacpp-router", id="runtime-router"),
        pytest.param(isvc_doc(runtime=7), model_doc(), "7", id="runtime-not-a-string"),
        pytest.param(isvc_doc(), model_doc(hardware={"accelerator": "cuda"}), "'cuda'", id="accelerator-cuda"),
        pytest.param(isvc_doc(), model_doc(hardware={}), "'cpu'", id="accelerator-default-cpu"),
        pytest.param(isvc_doc(), model_doc(hardware=None), "'cpu'", id="hardware-null"),
        pytest.param(isvc_doc(), None, "not found", id="model-missing"),
        pytest.param(isvc_doc(), model_doc(namespace="other"), "other/tiny", id="model-other-namespace"),
        pytest.param(isvc_doc(model_ref="other"), model_doc(), "default/other", id="model-other-name"),
        pytest.param(isvc_doc(model_ref=""), model_doc(), "modelRef", id="modelRef-empty"),
        pytest.param({"spec": None}, model_doc(), "modelRef", id="spec-null"),
        pytest.param("not an object", model_doc(), "modelRef", id="isvc-not-an-object"),
    ],
)
def test_everything_else_is_not_ours(isvc, model, reason_part):
    verdict = claim(isvc, model)
    assert isinstance(verdict, NotOurs)
    assert reason_part in verdict.reason


def test_foreign_service_with_owned_flags_is_not_ours_rather_than_invalid():
    # A vLLM service may well pass --port in extraArgs; that is not our business.
    foreign = isvc_doc(runtime="vllm", extraArgs=["--port", "9000"], contextSize="huge")
    assert isinstance(evaluate(foreign, model_doc()), NotOurs)


def test_wanted_model_names_the_model_to_fetch():
    assert wanted_model(isvc_doc(namespace="team-a", model_ref="qwen")) == ("team-a", "qwen")
    assert wanted_model({"spec": {}}) is None


def test_evaluate_reports_errors_of_both_objects():
    outcome = evaluate(
        isvc_doc(contextSize=1), model_doc(sha256="zz", hardware={"accelerator": "metal", "gpu": {"layers": -2}})
    )
    assert isinstance(outcome, Invalid)
    described = {(e.kind, e.name, e.path) for e in outcome.errors}
    assert described == {
        ("Model", "default/tiny", "spec.sha256"),
        ("Model", "default/tiny", "spec.hardware.gpu.layers"),
        ("InferenceService", "default/chat", "spec.contextSize"),
    }


@pytest.mark.parametrize("fmt", ["mlx", "safetensors", "pytorch"])
def test_formats_llama_server_cannot_load_are_rejected(fmt):
    outcome = evaluate(isvc_doc(), model_doc(format=fmt))
    assert isinstance(outcome, Invalid)
    assert outcome.paths() == ("spec.format",)
    assert outcome.errors[0].kind == "Model"


@pytest.mark.parametrize("fmt", ["gguf", "custom"])
def test_gguf_and_custom_formats_are_served(fmt):
    assert isinstance(evaluate(isvc_doc(), model_doc(format=fmt)), Parsed)


def test_evaluate_returns_the_workload():
    outcome = evaluate(isvc_doc(contextSize=4096), model_doc(hardware=gpu(layers=10)))
    assert isinstance(outcome, Parsed)
    assert outcome.value.isvc.spec.context_size == 4096
    assert outcome.value.model.spec.hardware.gpu.layers == 10


# ---------------------------------------------------------------------------
# llama-server flag knowledge
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("help_text", "style"),
    [
        ("  --mlock      force system to keep model in RAM", MlockStyle.FLAG),
        ("-lm,  --load-mode MODE   model loading mode\n - mlock: force system ...", MlockStyle.LOAD_MODE),
        # Unreadable help: the pinned (current) build's spelling, which rejects --mlock.
        ("", MlockStyle.LOAD_MODE),
    ],
    ids=["classic", "load-mode", "unknown"],
)
def test_mlock_style_from_help(help_text, style):
    assert mlock_style_from_help(help_text) is style


@pytest.mark.parametrize(
    "args",
    [["--temp", "0.2"], ["-ngl", "5"], ["--min-p=0.05"], ["--top-k", "-1"], ["--repeat-penalty", "1.1"], ["--no-warmup"]],
)
def test_ordinary_flags_and_values_pass(args):
    assert check_extra_args(LLAMA_SERVER_OPTIONS, args).refusals == ()


# Lines of `llama-server --help` from build 11434 (the binary the tests build), each verbatim.
HELP_11434 = """\
-lv,   --verbosity, --log-verbosity N   Set the verbosity threshold. Messages with a higher verbosity will be
                                        ignored. Values:
--jinja, --no-jinja                     whether to use jinja template engine for chat (default: enabled)
                                        (env: LLAMA_ARG_JINJA)
-lm,   --load-mode MODE                 model loading mode (default: auto)
"""


@pytest.mark.parametrize(
    ("help_text", "dialect"),
    [
        pytest.param(HELP_11434, Dialect(MlockStyle.LOAD_MODE, "--verbosity", True, True), id="build-11434"),
        pytest.param("--log-verbosity N  Set the verbosity threshold\n--jinja  use jinja template for chat\n--mlock",
                     Dialect(MlockStyle.FLAG, "--log-verbosity", False, True), id="old-spelling-jinja-off-by-default"),
        pytest.param("--slots   expose slots monitoring endpoint", Dialect(no_slots=False), id="slots-off-by-default"),
        pytest.param("--slots, --no-slots   expose slots", Dialect(no_slots=True), id="slots-switch"),
        pytest.param("", Dialect(MlockStyle.LOAD_MODE, None, True), id="unknown"),
        pytest.param("-v, --verbose, --log-verbose   Set verbosity level to infinity", Dialect(), id="only-verbose"),
    ],
)
def test_dialect_from_help(help_text, dialect):
    assert dialect_from_help(help_text) == dialect


@pytest.mark.parametrize("args", [["-lv", "1"], ["--verbosity", "1"], ["--log-verbosity", "1"], ["--log_verbosity", "1"],
                                  ["-lv=1"], ["--verbosity=2"]])
def test_log_verbosity_is_refused_because_the_agent_reads_the_log(args):
    refusals = check_extra_args(LLAMA_SERVER_OPTIONS, args).refusals
    assert refusals and ("the log it reads" in refusals[0].message or "not an option" in refusals[0].message)

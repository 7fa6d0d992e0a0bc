"""The runtime seam and the MLX engine: choice by format, spec mapping, refusals, estimate, owned flags."""

from __future__ import annotations

import json
import os
import struct
from fractions import Fraction
from pathlib import Path

import pytest

from metal_agent.adapters.mlx_binary import exec_form
from metal_agent.adapters.local_models import LocalModel
from metal_agent.core.api import CacheType, InferenceServiceSpec
from metal_agent.core.claim import evaluate
from metal_agent.core.engine_name import EngineName
from metal_agent.core.engines import engine_for
from metal_agent.core.engines.llama_server import LLAMA_SERVER
from metal_agent.core.engines.mlx_lm import MLX_LM, ONE_MODEL
from metal_agent.core.extra_args import check_extra_args
from metal_agent.core.mlx_options import MLX_LM_OPTIONS
from metal_agent.core.go_flags import normalize_run_argv
from metal_agent.core.launch import Instance, LaunchSettings
from metal_agent.core.result import Invalid, Parsed
from metal_agent.core.spec_hash import spec_hash
from tests.support.manifests import isvc_doc, model_doc
from tests.support.tiny_mlx_model import write_safetensors

MLX_SOURCE = "/Users/me/models/Qwen3-4B-4bit"
SETTINGS = LaunchSettings(llama_server="/opt/homebrew/bin/llama-server",
                          mlx_server=("/venv/bin/python3", "/venv/bin/mlx_lm.server"), host="10.0.0.5")
INSTANCE = Instance(model_path=MLX_SOURCE, port=8123)


def mlx(isvc: dict | None = None, **model) -> Parsed | Invalid:
    model.setdefault("source", MLX_SOURCE)
    return evaluate(isvc or isvc_doc(), model_doc(format="mlx", **model))


def workload(**spec):
    outcome = mlx(isvc_doc(**spec))
    assert isinstance(outcome, Parsed), outcome
    return outcome.value


# -- choice per model ---------------------------------------------------------------


@pytest.mark.parametrize("fmt, default, engine", [
    ("gguf", "llama-server", EngineName.LLAMA_SERVER), ("mlx", "llama-server", EngineName.MLX_LM),
    ("custom", "llama-server", EngineName.LLAMA_SERVER), ("custom", "mlx-lm", EngineName.MLX_LM),
    ("gguf", "mlx-lm", EngineName.LLAMA_SERVER),
])
def test_the_format_chooses_the_engine_and_the_default_only_for_custom(fmt, default, engine):
    source = MLX_SOURCE if fmt != "gguf" else "/m/model.gguf"
    outcome = evaluate(isvc_doc(), model_doc(format=fmt, source=source), default_engine=default)
    assert isinstance(outcome, Parsed)
    assert engine_for(outcome.value, EngineName(default)).name is engine


def test_each_engine_starts_with_its_own_command_from_the_same_settings():
    w = evaluate(isvc_doc(contextSize=4096, cacheTypeK="q8_0"), model_doc()).value
    argv = LLAMA_SERVER.argv(w, SETTINGS, Instance(model_path="/m.gguf", port=9))
    assert argv[:7] == ("/opt/homebrew/bin/llama-server", "--model", "/m.gguf", "--host", "10.0.0.5", "--port", "9")
    assert "/venv/bin/python3" not in argv
    assert MLX_LM.argv(workload(), SETTINGS, INSTANCE)[0] == "/venv/bin/python3"
    assert LLAMA_SERVER.probe.ready_path is None and LLAMA_SERVER.runtime_label == "llamacpp"


def test_no_mlx_command_line_without_mlx_lm():
    # The reconciler holds MLX services as RuntimeMissing before asking; asking anyway is a bug.
    with pytest.raises(ValueError, match="mlx_lm.server was not found"):
        MLX_LM.argv(workload(), LaunchSettings(llama_server="/opt/homebrew/bin/llama-server"), INSTANCE)


def test_gguf_digests_do_not_move_and_the_format_is_part_of_an_mlx_digest():
    gguf = evaluate(isvc_doc(), model_doc(source=MLX_SOURCE)).value
    as_mlx = mlx().value
    assert spec_hash(gguf) != spec_hash(as_mlx)
    # A llama-server spec whose speculativeDecoding asks for none keeps its digest.
    with_spec = evaluate(isvc_doc(speculativeDecoding={"type": "none", "nDraftMax": 4}),
                         model_doc(source=MLX_SOURCE)).value
    assert spec_hash(with_spec) == spec_hash(gguf)


# -- the command line ----------------------------------------------------------------


def test_mlx_argv_maps_the_spec():
    argv = MLX_LM.argv(workload(contextSize=8192, parallelSlots=4, batchSize=512,
                                extraArgs=["--temp", "0.7", "--chat-template-args", '{"enable_thinking":false}']),
                       SETTINGS, INSTANCE)
    assert argv == (
        "/venv/bin/python3", "-c", ONE_MODEL, "--model", MLX_SOURCE, "--host", "10.0.0.5", "--port", "8123",
        "--log-level", "INFO", "--decode-concurrency", "4", "--prompt-cache-size", "4", "--prefill-step-size", "512",
        "--temp", "0.7", "--chat-template-args", '{"enable_thinking":false}',
    )


@pytest.mark.parametrize("cache, bits", [("q8_0", "8"), ("q4_0", "4")])
def test_quantized_kv_cache_becomes_kv_bits_from_the_first_token(cache, bits):
    argv = MLX_LM.argv(workload(cacheTypeK=cache, cacheTypeV=cache), SETTINGS, INSTANCE)
    i = argv.index("--kv-bits")
    assert argv[i:i + 6] == ("--kv-bits", bits, "--kv-group-size", "64", "--quantized-kv-start", "0")


def test_an_unquantized_cache_adds_no_flag():
    assert "--kv-bits" not in MLX_LM.argv(workload(cacheTypeK="f16", cacheTypeV="f16"), SETTINGS, INSTANCE)


# -- what MLX refuses -----------------------------------------------------------------


@pytest.mark.parametrize("spec, path, words", [
    ({"cacheTypeK": "q4_1", "cacheTypeV": "q4_1"}, "spec.cacheTypeK", "8 or 4 bits"),
    ({"cacheTypeK": "f32"}, "spec.cacheTypeK", "model's own dtype"),
    ({"cacheTypeCustomV": "turbo3", "cacheTypeCustomK": "turbo3"}, "spec.cacheTypeCustomV", "8 or 4 bits"),
    ({"cacheTypeK": "q8_0"}, "spec.cacheTypeV", "together"),
    ({"cacheTypeK": "q8_0", "cacheTypeV": "q8_0", "parallelSlots": 2}, "spec.parallelSlots", "disables batching"),
    ({"ropeScaling": {"type": "yarn", "factor": "4"}}, "spec.ropeScaling", "config.json"),
    ({"flashAttention": False}, "spec.flashAttention", "fused attention"),
    ({"jinja": False}, "spec.jinja", "chat template"),
    ({"mode": "embedding"}, "spec.mode", "chat and text completions"),
    ({"moeCPUOffload": True}, "spec.moeCPUOffload", "llama-server option"),
    ({"moeCPULayers": 3}, "spec.moeCPULayers", "llama-server option"),
    ({"noKvOffload": True}, "spec.noKvOffload", "llama-server option"),
    ({"tensorOverrides": ["a=CPU"]}, "spec.tensorOverrides", "llama-server option"),
    ({"metadataOverrides": ["a=int:1"]}, "spec.metadataOverrides", "llama-server option"),
    ({"reasoningBudget": 10}, "spec.reasoningBudget", "llama-server option"),
    ({"reasoningBudget": 0}, "spec.reasoningBudget", "llama-server option"),  # 0 means "no thinking": not dropped
    ({"uBatchSize": 64}, "spec.uBatchSize", "llama-server option"),
    ({"speculativeDecoding": {"type": "mtp"}}, "spec.speculativeDecoding.type", "draft model only"),
    ({"speculativeDecoding": {"type": "draft", "draftModel": "d.gguf"}}, "spec.speculativeDecoding.draftModel",
     "its own MLX Model"),
    ({"speculativeDecoding": {"type": "draft-simple"}}, "spec.speculativeDecoding.draftModelRef", "needs a draft"),
    ({"speculativeDecoding": {"type": "draft", "draftModelRef": "small"}, "parallelSlots": 2}, "spec.parallelSlots",
     "draft model"),
    ({"speculativeDecoding": {"type": "draft", "draftModelRef": "small"}}, "spec.speculativeDecoding.draftModelRef",
     "was not found"),
    ({"extraArgs": ["--kv-bits", "8"]}, "spec.extraArgs[0]", "cacheTypeK"),
    ({"extraArgs": ["--trust-remote-code"]}, "spec.extraArgs[0]", "Python code"),
    ({"extraArgs": ["--mod", "/other"]}, "spec.extraArgs[0]", "reads it as --model"),
    ({"extraArgs": ["--decode-concurrency=8"]}, "spec.extraArgs[0]", "parallelSlots"),
    ({"extraArgs": ["--port", "1"]}, "spec.extraArgs[0]", "listens"),
])
def test_what_mlx_cannot_honour_is_refused_by_path(spec, path, words):
    outcome = mlx(isvc_doc(**spec))
    assert isinstance(outcome, Invalid)
    matching = [e for e in outcome.errors if e.path == path]
    assert matching and words in matching[0].message, outcome.errors


@pytest.mark.parametrize("model, path, words", [
    ({"source": "https://example.com/models/tiny-llama.gguf"}, "spec.format", "GGUF file"),
    ({"source": "file:///m/model.GGUF"}, "spec.format", "use format gguf"),
    ({"source": "https://example.com/mlx-dir"}, "spec.source", "directory"),
    ({"source": "hf://org/repo/model.safetensors"}, "spec.source", "whole repository"),
    ({"sha256": "a" * 64}, "spec.sha256", "no single sha256"),
    ({"hardware": {"accelerator": "metal", "gpu": {"layers": 10}}}, "spec.hardware.gpu.layers", "every layer"),
])
def test_model_fields_mlx_cannot_honour_are_refused(model, path, words):
    outcome = mlx(**model)
    assert isinstance(outcome, Invalid)
    assert [e.path for e in outcome.errors] == [path] and words in outcome.errors[0].message
    assert outcome.errors[0].kind == "Model"


@pytest.mark.parametrize("source", ["hf://org/repo", "hf://org/repo@v1.0", "file:///models/qwen/", "/models/qwen/"])
def test_mlx_sources_may_name_a_directory(source):
    assert isinstance(mlx(source=source), Parsed)


def test_sampling_and_chat_template_options_pass_through_extra_args():
    args = ["--temp", "0.7", "--top-p", "0.8", "--top-k", "40", "--min-p", "0.05", "--max-tokens", "512",
            "--chat-template", "{{ messages }}", "--chat-template-args", '{"enable_thinking":false}',
            "--num-draft-tokens", "3", "--use-default-chat-template"]
    assert check_extra_args(MLX_LM_OPTIONS, args).refusals == ()


# -- memory ----------------------------------------------------------------------------


def _model_dir(tmp_path: Path, config: dict, tensor_bytes: int = 4096) -> Path:
    import numpy as np

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    write_safetensors(d / "model.safetensors", {"w": np.zeros(tensor_bytes // 4, dtype=np.float32)})
    return d


CONFIG = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
          "torch_dtype": "bfloat16", "max_position_embeddings": 32768}


def test_estimate_reads_safetensors_headers_and_sizes_the_kv_cache(tmp_path):
    d = _model_dir(tmp_path, CONFIG, tensor_bytes=1 << 20)
    spec = InferenceServiceSpec(model_ref="m", context_size=8000, parallel_slots=2)
    est = MLX_LM.estimate(LocalModel(d), spec)
    assert est.weights_bytes == 1 << 20
    # 32 layers x 8 kv heads x (128 + 128) x 2 bytes x 8192 tokens (256-step) x 2 slots x 2 (active + kept)
    assert est.context == 8192 and est.kv_bytes == 32 * 8 * 256 * 2 * 8192 * 2 * 2
    assert (est.cache_type_k, est.cache_type_v) == ("bf16", "bf16")
    assert est.overhead_bytes == 256 << 20


def test_a_quantized_cache_costs_its_bits_plus_scales_and_biases(tmp_path):
    d = _model_dir(tmp_path, CONFIG)
    plain = MLX_LM.estimate(LocalModel(d), InferenceServiceSpec(model_ref="m", context_size=4096))
    q8 = MLX_LM.estimate(LocalModel(d), InferenceServiceSpec(model_ref="m", context_size=4096,
                                                              cache_type_k=CacheType.Q8_0, cache_type_v=CacheType.Q8_0))
    assert Fraction(q8.kv_bytes, plain.kv_bytes) == Fraction(1 + Fraction(4, 64), 2)
    assert q8.cache_type_k == "q8_0"


def test_estimate_notes_a_context_beyond_the_trained_one(tmp_path):
    est = MLX_LM.estimate(LocalModel(_model_dir(tmp_path, CONFIG)), InferenceServiceSpec(model_ref="m", context_size=65536))
    assert est.notes and "trained context 32768" in est.notes[0]


@pytest.mark.parametrize("change, words", [
    ({"drop": "config.json"}, "has no config.json"),
    ({"config": {"num_attention_heads": 8}}, "num_hidden_layers"),
    ({"weights": b"\xff" * 16}, "not a safetensors file"),
    ({"weights": struct.pack("<Q", 10) + b"not json!!"}, "not a JSON object"),
    ({"weights": struct.pack("<Q", 2) + b"{}" + b""}, None),
])
def test_estimate_failures_say_what_is_wrong(tmp_path, change, words):
    d = _model_dir(tmp_path, CONFIG)
    if "drop" in change:
        (d / change["drop"]).unlink()
    if "config" in change:
        (d / "config.json").write_text(json.dumps(change["config"]))
    if "weights" in change:
        (d / "model.safetensors").write_bytes(change["weights"])
    est = MLX_LM.estimate(LocalModel(d), InferenceServiceSpec(model_ref="m"))
    if words is None:
        assert est.weights_bytes == 0  # an empty shard is a valid file with no tensors
    else:
        assert words in est.message


# -- logs, probes, flags, binary -----------------------------------------------------------


def test_problem_lines_find_the_traceback_and_the_dead_generation_thread():
    log = ("UserWarning: mlx_lm.server is not recommended for production\n"
           "2026-11-30 11:38:57,561 - INFO - Starting httpd at 127.0.0.1 on port 18555...\n"
           "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
           "FileNotFoundError: No safetensors found in /models/broken\n"
           "2026-11-30 11:38:58,000 - ERROR - mlx_lm.server generation thread died: boom\n")
    lines = MLX_LM.problem_lines(log)
    assert lines[-2].startswith("FileNotFoundError") and "generation thread died" in lines[-1]
    assert not any("UserWarning" in ln for ln in lines)
    assert MLX_LM.acceleration(log) is None


def test_readiness_waits_for_the_model_not_for_the_http_server():
    probe = MLX_LM.probe
    assert probe.health_path == "/health" and probe.ready_path == "/v1/completions"
    assert json.loads(probe.ready_body) == {"prompt": "ok", "max_tokens": 1}


def test_go_runtime_flags_become_the_default_engine_and_the_swift_binary_is_not_run():
    assert normalize_run_argv(["--runtime", "mlx-server"], set()).argv == ["--default-runtime=mlx-lm"]
    # The Go agent's --mlx-server-bin is defilantech's Swift mlx-server: handed mlx_lm.server's argv it would
    # exit, so it is ignored out loud and the agent finds mlx_lm.server itself.
    swift = normalize_run_argv(["--mlx-server-bin", "/opt/homebrew/bin/mlx-server"], set())
    assert swift.argv == [] and "Swift mlx-server" in swift.ignored[0].reason
    assert normalize_run_argv(["--runtime", "llama-server"], set()).argv == []
    assert normalize_run_argv(["--runtime=omlx"], set()).ignored


def test_a_python_script_is_run_through_its_interpreter(tmp_path):
    script = tmp_path / "mlx_lm.server"
    script.write_text("#!/venv/bin/python3.11\nimport sys\n")
    assert exec_form(str(script)) == ("/venv/bin/python3.11", str(script))
    env_script = tmp_path / "other"
    env_script.write_text("#!/usr/bin/env sh\n")
    assert exec_form(str(env_script))[1:] == (str(env_script),)
    assert os.path.basename(exec_form(str(env_script))[0]) == "sh"
    binary = tmp_path / "bin"
    binary.write_bytes(b"\x7fELF...")
    assert exec_form(str(binary)) == (str(binary),)


def test_the_mlx_sample_renders_the_mlx_command_line():
    from typer.testing import CliRunner

    from metal_agent.cli.main import app

    sample = Path(__file__).resolve().parents[2] / "manifests" / "samples" / "mlx.yaml"
    result = CliRunner().invoke(app, ["render", "-f", str(sample)])
    assert result.exit_code == 0, result.output
    argv = json.loads(result.output)
    assert argv[1:3] == ["-c", ONE_MODEL] and argv[argv.index("--decode-concurrency") + 1] == "2"
    assert argv[-6:] == ["--temp", "0.7", "--top-p", "0.8", "--max-tokens", "2048"]


# -- speculative decoding with a draft Model ----------------------------------------------


DRAFT = {"type": "draft", "draftModelRef": "small", "nDraftMax": 3}


def test_a_draft_model_is_found_checked_and_passed_with_its_token_count():
    draft = model_doc("small", format="mlx", source="/models/small-mlx")
    outcome = evaluate(isvc_doc(speculativeDecoding=DRAFT), model_doc(format="mlx", source=MLX_SOURCE), draft=draft)
    assert isinstance(outcome, Parsed) and outcome.value.draft.spec.source.raw == "/models/small-mlx"
    argv = MLX_LM.argv(outcome.value, SETTINGS, Instance(model_path=MLX_SOURCE, port=1,
                                                         draft_model_path="/models/small-mlx"))
    assert argv[-4:] == ("--draft-model", "/models/small-mlx", "--num-draft-tokens", "3")
    without = evaluate(isvc_doc(), model_doc(format="mlx", source=MLX_SOURCE)).value
    assert spec_hash(outcome.value) != spec_hash(without)


def test_a_draft_that_mlx_cannot_load_is_refused_on_the_draft_model():
    draft = model_doc("small", source="/models/small.gguf")
    outcome = evaluate(isvc_doc(speculativeDecoding=DRAFT), model_doc(format="mlx", source=MLX_SOURCE), draft=draft)
    assert isinstance(outcome, Invalid)
    assert [(e.kind, e.name, e.path) for e in outcome.errors] == [("Model", "default/small", "spec.format")]


def test_llama_server_takes_a_gguf_draft_and_refuses_an_mlx_one():
    gguf_draft = model_doc("small", source="/models/small.gguf")
    outcome = evaluate(isvc_doc(speculativeDecoding=DRAFT), model_doc(), draft=gguf_draft)
    assert isinstance(outcome, Parsed) and outcome.value.draft.meta.name == "small"
    mlx_draft = model_doc("small", format="mlx", source="/models/small-mlx")
    outcome = evaluate(isvc_doc(speculativeDecoding=DRAFT), model_doc(), draft=mlx_draft)
    assert isinstance(outcome, Invalid) and outcome.paths() == ("spec.format",)
    assert isinstance(evaluate(isvc_doc(speculativeDecoding={"type": "disabled"}), model_doc()), Parsed)


def test_mlx_refuses_a_minimum_draft_probability_it_has_no_option_for():
    outcome = mlx(isvc_doc(speculativeDecoding={**DRAFT, "pMin": 0.75}))
    assert isinstance(outcome, Invalid) and outcome.paths() == ("spec.speculativeDecoding.pMin",)


def test_process_records_name_their_engine_and_older_ones_are_llama_servers(tmp_path):
    from metal_agent.adapters.process.manager import _engine_of
    from metal_agent.adapters.process.records import ProcessRecord, RecordStore

    store = RecordStore(tmp_path)
    store.save(ProcessRecord("ns/a", "u", 1, 1.0, "h", 8080, "127.0.0.1", "d", engine="mlx-lm"))
    old = ProcessRecord("ns/b", "u", 2, 1.0, "h", 8081, "127.0.0.1", "d")
    (tmp_path / "ns__b.json").write_text(json.dumps({k: v for k, v in old.__dict__.items() if k != "engine"}))
    records = {r.key: r for r in store.load_all()}
    assert _engine_of(records["ns/a"]) is MLX_LM and _engine_of(records["ns/b"]) is LLAMA_SERVER
    assert _engine_of(ProcessRecord("ns/c", "u", 3, 1.0, "h", 1, "h", "d", engine="vllm-swift")) is LLAMA_SERVER


def test_one_model_wrapper_makes_every_request_use_the_served_model(monkeypatch):
    """Run the wrapper's code against mlx_lm's real ModelProvider class, with its loader stubbed."""
    import mlx_lm.server as server

    calls = []
    monkeypatch.setattr(server.ModelProvider, "load", lambda self, m, a=None, d=None: calls.append((m, a, d)))
    monkeypatch.setattr(server, "main", lambda: None)
    monkeypatch.setattr("sys.argv", ["-c"])
    exec(ONE_MODEL, {})
    server.ModelProvider.load(object(), "someone/another-model", "/tmp/adapters", "other/draft")
    assert calls == [("default_model", None, "default_model")]
    import sys
    assert sys.argv[0] == "mlx_lm.server"


def test_hostile_mlx_files_are_refused_not_raised_or_parsed_at_length(tmp_path):
    """A config nested past the stack, and shards whose JSON headers add up past the budget
    (each one C call holding the GIL: the event loop would wait for them)."""
    import struct as st

    from metal_agent.core.engines import mlx_lm
    from metal_agent.core.memory import EstimateFailed

    d = _model_dir(tmp_path, CONFIG)
    (d / "config.json").write_text("[" * 200_000)
    failed = MLX_LM.estimate(LocalModel(d), InferenceServiceSpec(model_ref="m"))
    assert isinstance(failed, EstimateFailed) and "not a JSON object" in failed.message

    (d / "config.json").write_text(json.dumps(CONFIG))
    header = json.dumps({"__metadata__": {"pad": "x" * (mlx_lm.MAX_SAFETENSORS_HEADER - 64)}}).encode()
    for i in range(mlx_lm.MAX_SAFETENSORS_HEADERS // len(header) + 1):
        (d / f"s{i:03d}.safetensors").write_bytes(st.pack("<Q", len(header)) + header)
    failed = MLX_LM.estimate(LocalModel(d), InferenceServiceSpec(model_ref="m"))
    assert isinstance(failed, EstimateFailed) and "more than 64 MiB" in failed.message, failed


def test_files_of_a_custom_format_model_run_by_mlx_are_refused_not_dropped():
    """`format: custom` goes to the default engine; with `--default-runtime mlx-lm` a file set would
    otherwise be ignored (an MLX model is fetched whole), so it is refused on the Model."""
    doc = model_doc(format="custom", source="hf://org/Repo-GGUF", files=["m.gguf"], mmproj="mm.gguf")
    outcome = evaluate(isvc_doc(), doc, default_engine="mlx-lm")
    assert isinstance(outcome, Invalid)
    assert [(e.kind, e.path) for e in outcome.errors] == [("Model", "spec.files")]
    assert "whole directory or repository" in outcome.errors[0].message

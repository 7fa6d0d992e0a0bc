"""The argv builder's output, run by the real llama-server on a tiny real model."""

from __future__ import annotations

import json
import re
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from metal_agent.core.argv import build_argv, prompt_cache_mib, spec_type
from metal_agent.core.claim import evaluate
from metal_agent.core.extra_args import ExtraArgsPolicy
from metal_agent.core.flags import Dialect, MlockStyle, dialect_from_help, mlock_style_from_help
from metal_agent.core.launch import Instance, LaunchSettings
from metal_agent.core.llama_log import Acceleration, parse_acceleration
from metal_agent.core.result import Invalid
from metal_agent.core.spec_policy import SpecPolicy
from tests.support.llama import LlamaServerExited, running_llama_server
from tests.support.manifests import gpu, isvc_doc, model_doc, workload
from tests.support.ports import free_port
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def help_text(llama_server_bin: Path) -> str:
    result = subprocess.run(
        [str(llama_server_bin), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def mlock_style(help_text: str) -> MlockStyle:
    return mlock_style_from_help(help_text)


@pytest.fixture(scope="module")
def dialect(help_text: str) -> Dialect:
    return dialect_from_help(help_text)


def options(binary: Path, model: Path, port: int, style: MlockStyle,
            dialect: Dialect | None = None) -> tuple[LaunchSettings, Instance]:
    """The settings the agent would use; with `dialect`, everything it reads from this binary's --help."""
    extra = {"verbosity_flag": dialect.verbosity_flag, "no_jinja": dialect.no_jinja} if dialect else {}
    settings = LaunchSettings(llama_server=str(binary), host="127.0.0.1", threads=2,
                              dialect=Dialect(mlock_style=style, **extra))
    return settings, Instance(model_path=str(model), port=port)


def test_this_build_has_the_options_the_agent_relies_on(dialect):
    # Build 11434 logs libllama's load lines at level 4 and enables Jinja by default:
    # the agent must find -lv and --no-jinja in its help, or it would run it blind.
    assert dialect.verbosity_flag == "--verbosity"
    assert dialect.no_jinja is True
    assert dialect.no_slots is True  # /slots is on by default in this build: the agent turns it off


def test_every_flag_the_builder_emits_is_known_to_this_build(help_text, mlock_style, dialect):
    # One spec that switches on every flag-producing field at once.
    everything = workload(
        {
            "contextSize": 4096,
            "ropeScaling": {"type": "yarn", "factor": "2", "originalContext": 2048},
            "parallelSlots": 2,
            "jinja": True,
            "cacheTypeK": "q8_0",
            "cacheTypeV": "q8_0",
            "moeCPUOffload": True,
            "moeCPULayers": 1,
            "noKvOffload": True,
            "noWarmup": True,
            "reasoningBudget": 10,
            "reasoningBudgetMessage": "done",
            "metadataOverrides": ["a=int:1"],
            "tensorOverrides": ["exps=CPU"],
            "uBatchSize": 64,
            "mode": "rerank",
        },
        hardware=gpu(layers=2, count=1, sharding={"strategy": "layer", "layerSplit": ["1"]}),
    )
    opts = options(Path("llama-server"), Path("m.gguf"), 1, mlock_style, dialect)
    argv = build_argv(everything, *opts) + build_argv(workload({"jinja": False}), *opts)
    flags = {arg for arg in argv[1:] if re.fullmatch(r"--[a-z][a-z-]*", arg)}
    known = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text))
    assert flags - known == set()
    assert {"--no-jinja", "--verbosity"} <= flags
    assert len(flags) >= 32


CASES = [
    pytest.param({}, id="defaults"),
    pytest.param({"cacheTypeK": "q8_0", "cacheTypeV": "q8_0", "flashAttention": True}, id="kv-q8_0"),
    pytest.param({"cacheTypeK": "q4_0", "cacheTypeV": "q4_0", "flashAttention": True}, id="kv-q4_0"),
    pytest.param({"parallelSlots": 4, "contextSize": 4096}, id="parallel-4"),
    pytest.param({"batchSize": 256, "uBatchSize": 64}, id="batch-ubatch"),
    pytest.param({"jinja": True}, id="jinja"),
    pytest.param({"jinja": False}, id="no-jinja"),
    pytest.param({"flashAttention": False}, id="flash-attention-off"),
    pytest.param({"noWarmup": True, "metadataOverrides": ["general.name=str:tiny"]}, id="no-warmup-override-kv"),
    pytest.param({"mode": "embedding"}, id="embedding"),
    pytest.param({"parallelSlots": 1, "contextSize": 4096}, id="parallel-1"),
    # `--reasoning-budget 0` ("0 for immediate end" in this build's help), said as LLMKube's controller says it.
    pytest.param({"reasoningBudget": 0, "reasoningBudgetMessage": "Stop.", "jinja": True}, id="reasoning-budget-0"),
]


@pytest.mark.parametrize("isvc_spec", CASES)
async def test_llama_server_serves_the_built_argv(isvc_spec, llama_server_bin, tiny_model, mlock_style, dialect):
    spec = workload(isvc_spec)
    port = free_port()
    argv = build_argv(spec, *options(llama_server_bin, tiny_model, port, mlock_style, dialect))

    async with running_llama_server(list(argv), port=port) as server, aiohttp.ClientSession() as http:
        async with http.get(f"{server.base_url}/health") as resp:
            assert resp.status == 200
        async with http.get(f"{server.base_url}/props") as resp:
            props = await resp.json()
        context, slots = spec.isvc.spec.context_size, spec.isvc.spec.parallel_slots
        # --parallel N, 1 included, splits --ctx-size into N slots (unsaid, this build would
        # run 4 slots sharing one unified cache).
        assert (props["total_slots"], props["default_generation_settings"]["n_ctx"]) == (slots, context // slots)
        assert props["endpoint_metrics"] is True
        # The host prompt cache the agent counts in memory admission is the one llama-server keeps.
        cache = prompt_cache_mib(spec.isvc.spec)
        logged = ("prompt cache is disabled" if cache == 0
                  else f"prompt cache is enabled, size limit: {cache} MiB")
        assert logged in server.stderr_text()
        async with http.get(f"{server.base_url}/metrics") as resp:
            assert resp.status == 200
        if spec.isvc.spec.mode == "embedding":
            async with http.post(f"{server.base_url}/v1/embeddings", json={"input": "hello"}) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            assert len(body["data"][0]["embedding"]) == 64  # n_embd of the tiny model


async def test_overrides_are_said_once_and_a_comma_in_a_str_value_survives(llama_server_bin, tiny_model, mlock_style,
                                                                           dialect):
    """Build 11434 warns "only last value will be used" for a repeated -ot/--override-kv and splits
    --override-kv at commas (quotes keep them): one joined, quoted value of each reaches the model."""
    spec = workload({"tensorOverrides": ["token_embd=CPU", "output=CPU"],
                     "metadataOverrides": ["general.name=str:Tiny, v2", "tokenizer.ggml.add_bos_token=bool:false"]})
    port = free_port()
    argv = build_argv(spec, *options(llama_server_bin, tiny_model, port, mlock_style, dialect))
    assert argv.count("--override-kv") == 1 and argv.count("--override-tensor") == 1
    async with running_llama_server(list(argv), port=port) as server:
        log = server.stderr_text()
    assert "DEPRECATED" not in log
    assert re.search(r"print_info: general\.name\s+= Tiny, v2\n", log), log
    assert "Using metadata override ( bool) 'tokenizer.ggml.add_bos_token'" in log


@pytest.mark.parametrize(("extra", "error"), [
    pytest.param(["--rope-scaling", "longrope"], 'error while handling argument "--rope-scaling": invalid value',
                 id="longrope-so-the-agent-refuses-it"),
    pytest.param(["--mlock"], "--mlock", id="mlock-so-unreadable-help-means-load-mode"),
])
async def test_what_this_build_rejects_stops_llama_server(extra, error, llama_server_bin, tiny_model, dialect):
    """Why the agent refuses `ropeScaling.type: longrope` and never falls back to `--mlock`."""
    port = free_port()
    argv = [*build_argv(workload(), *options(llama_server_bin, tiny_model, port, MlockStyle.LOAD_MODE, dialect)), *extra]
    with pytest.raises(LlamaServerExited) as exited:
        async with running_llama_server(argv, port=port, startup_timeout=30):
            pytest.fail(f"llama-server became healthy with {extra}")
    assert exited.value.returncode != 0 and error in exited.value.stderr


async def test_custom_cache_type_unknown_to_the_build_stops_llama_server(llama_server_bin, tiny_model, mlock_style):
    port = free_port()
    argv = build_argv(
        workload({"cacheTypeCustomK": "turbo3", "cacheTypeCustomV": "turbo3"}),
        *options(llama_server_bin, tiny_model, port, mlock_style),
    )
    with pytest.raises(LlamaServerExited) as exited:
        async with running_llama_server(list(argv), port=port, startup_timeout=30):
            pytest.fail("llama-server became healthy with a cache type it does not have")
    assert exited.value.returncode != 0
    assert re.search(r'error while handling argument "--cache-type-k": Unsupported cache type: turbo3', exited.value.stderr)


def test_render_speaks_the_dialect_of_the_given_binary(llama_server_bin, mlock_style):
    manifest = Path(__file__).resolve().parent.parent / "fixtures" / "manifests" / "turboquant.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "metal_agent", "render", "-f", str(manifest), "--threads", "2",
         "--llama-server", str(llama_server_bin)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    assert argv[0] == str(llama_server_bin)
    style_args = list(mlock_style.args())
    assert any(argv[i : i + len(style_args)] == style_args for i in range(len(argv)))


# --- status.acceleration from the real log (issue 13, item 1) ----------------------


async def test_acceleration_is_read_from_the_real_log_at_the_agents_verbosity(
    llama_server_bin, tiny_model, mlock_style, dialect
):
    """The argv the agent builds makes llama-server log its load, and the agent's parser reads it.

    This build has no GPU backend, so it reports the CPU (and prints no layer
    count); what matters is that the load lines exist at all: at the default
    verbosity build 11434 prints none of them (checked below), which left
    status.acceleration empty on every Mac.
    """
    port = free_port()
    argv = build_argv(workload(), *options(llama_server_bin, tiny_model, port, mlock_style, dialect))
    assert ("--verbosity", "4") in zip(argv, argv[1:])
    async with running_llama_server(list(argv), port=port) as server:
        log = server.stderr_text()
    assert re.search(r"load_tensors:\s+CPU_Mapped model buffer size", log)
    accel = parse_acceleration(log)
    assert accel == Acceleration("CPU", 0, 0)
    assert accel.as_status() == {"device": "CPU", "layersOffloaded": 0}
    assert not accel.partial


async def test_without_verbosity_4_the_load_lines_are_missing(llama_server_bin, tiny_model, mlock_style):
    """Why the agent passes --verbosity: the same server at the default level hides its load."""
    port = free_port()
    argv = build_argv(workload(), *options(llama_server_bin, tiny_model, port, mlock_style))
    assert "--verbosity" not in argv
    async with running_llama_server(list(argv), port=port) as server:
        log = server.stderr_text()
    assert "model buffer size" not in log and "load_tensors" not in log


# --- spec fields whose meaning moved (issue 13, item 8) ----------------------------


async def test_flash_attention_off_with_a_quantized_v_cache_is_refused_by_llama_server(
    llama_server_bin, tiny_model, mlock_style, dialect
):
    """The real binary refuses what validation refuses, with the words validation quotes."""
    refused = evaluate(isvc_doc(flashAttention=False, cacheTypeV="q8_0"), model_doc())
    assert isinstance(refused, Invalid)
    (error,) = refused.errors
    quoted = re.search(r'"([^"]+)"', error.message).group(1)
    # The same combination, through extraArgs a Mac owner allowed (--allow-extra-arg, which
    # validation does not interpret), reaches llama-server through the agent's own builder.
    port = free_port()
    owner = SpecPolicy(extra_args=ExtraArgsPolicy(frozenset({"--cache-type-v"})))
    argv = build_argv(
        workload({"flashAttention": False, "extraArgs": ["--cache-type-v", "q8_0"]}, policy=owner),
        *options(llama_server_bin, tiny_model, port, mlock_style, dialect),
    )
    with pytest.raises(LlamaServerExited) as exited:
        async with running_llama_server(list(argv), port=port, startup_timeout=30):
            pytest.fail("llama-server served a quantized V cache without flash attention")
    assert exited.value.returncode != 0
    assert quoted in exited.value.stderr
    assert quoted == "quantized V cache requires flash_attn to be enabled"


async def test_flash_attention_off_with_quantized_k_only_serves(llama_server_bin, tiny_model, mlock_style, dialect):
    """Only V is affected: validation lets a quantized K cache through, and so does llama-server."""
    port = free_port()
    argv = build_argv(workload({"flashAttention": False, "cacheTypeK": "q8_0"}),
                      *options(llama_server_bin, tiny_model, port, mlock_style, dialect))
    async with running_llama_server(list(argv), port=port, startup_timeout=30):
        pass


TOOLS_REQUEST = {
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 2,
    "tools": [{"type": "function", "function": {"name": "f", "description": "d",
                                                "parameters": {"type": "object", "properties": {}}}}],
}  # fmt: skip


@pytest.mark.parametrize(("jinja", "engine_on"), [(None, True), (False, False), (True, True)],
                         ids=["unset", "false", "true"])
async def test_jinja_false_turns_the_template_engine_off(jinja, engine_on, llama_server_bin, tiny_model,
                                                          mlock_style, dialect):
    """Unset now means "on" (the build's default), so false must be said: --no-jinja.

    Tool calls need the Jinja engine; llama-server refuses them without it
    ("tools param requires --jinja flag"), which shows which way it runs.
    """
    spec = {} if jinja is None else {"jinja": jinja}
    port = free_port()
    argv = build_argv(workload(spec), *options(llama_server_bin, tiny_model, port, mlock_style, dialect))
    async with running_llama_server(list(argv), port=port) as server, aiohttp.ClientSession() as http:
        async with http.post(f"{server.base_url}/v1/chat/completions", json=TOOLS_REQUEST) as resp:
            body = await resp.text()
            status = resp.status
    if engine_on:
        assert status == 200, body
    else:
        assert status != 200 and "tools param requires --jinja flag" in body


SPECULATION = [
    pytest.param({"type": "ngram-simple", "nDraftMax": 4}, id="ngram"),
    # The draft is the tiny model itself: a GGUF sharing the target's vocabulary, as llama-server requires.
    pytest.param({"type": "draft", "draftModelRef": "draft", "nDraftMax": 3, "pMin": 0.5}, id="draft-model"),
]


@pytest.mark.parametrize("block", SPECULATION)
async def test_llama_server_runs_the_speculative_decoding_the_spec_asks_for(block, llama_server_bin, tiny_model, dialect):
    outcome = evaluate(isvc_doc(speculativeDecoding=block, contextSize=512), model_doc(),
                       draft=model_doc("draft", source=f"file://{tiny_model}"))
    assert not isinstance(outcome, Invalid), outcome
    port = free_port()
    settings, instance = options(llama_server_bin, tiny_model, port, MlockStyle.LOAD_MODE, dialect)
    argv = build_argv(outcome.value, settings, replace(instance, draft_model_path=str(tiny_model)))
    assert ("-md" in argv) is (outcome.value.draft is not None)
    async with running_llama_server(list(argv), port=port) as server, aiohttp.ClientSession() as http:
        body = {"prompt": "hello hello hello hello", "n_predict": 8, "temperature": 0}
        async with http.post(f"{server.base_url}/completion", json=body) as resp:
            assert resp.status == 200, await resp.text()
            reply = await resp.json()
        assert reply["tokens_predicted"] > 0
        # llama-server reports each speculative method it ran, by its own name (LLMKube's alias resolved).
        ran = re.compile(rf"statistics\s+{spec_type(outcome.value.isvc.spec)}: #calls")
        await wait_for(lambda: ran.search(server.stderr_text()), timeout=10, what="speculation statistics",
                       on_timeout=lambda: server.stderr_text()[-2000:])

async def test_a_split_gguf_and_a_draft_file_of_the_set_run(llama_server_bin, tiny_split_model, tiny_model, dialect,
                                                           tmp_path):
    """A Model of `spec.files`: llama-server is given the first part and finds the second beside it;
    `draftModel` names another file of the set, passed as `-md` from the same base directory."""
    for part in tiny_split_model:
        (tmp_path / part.name).symlink_to(part)
    (tmp_path / "draft").mkdir()
    (tmp_path / "draft" / "tiny.gguf").symlink_to(tiny_model)
    files = [p.name for p in tiny_split_model] + ["draft/tiny.gguf"]
    outcome = evaluate(isvc_doc(speculativeDecoding={"type": "draft", "draftModel": "draft/tiny.gguf", "nDraftMax": 3},
                                contextSize=512),
                       model_doc(source=f"file://{tmp_path}", files=files))
    assert not isinstance(outcome, Invalid), outcome
    port = free_port()
    settings, instance = options(llama_server_bin, tmp_path / files[0], port, MlockStyle.LOAD_MODE, dialect)
    argv = build_argv(outcome.value, settings, instance)
    assert argv[argv.index("--model") + 1] == str(tmp_path / files[0])
    assert argv[argv.index("-md") + 1] == str(tmp_path / "draft" / "tiny.gguf")
    async with running_llama_server(list(argv), port=port) as server, aiohttp.ClientSession() as http:
        body = {"prompt": "hello hello hello hello", "n_predict": 8, "temperature": 0}
        async with http.post(f"{server.base_url}/completion", json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["tokens_predicted"] > 0
        # Both parts were loaded: llama.cpp names the split it reads the tensors from.
        assert re.search(r"additional 1 GGUFs metadata loaded", server.stderr_text()), server.stderr_text()[-3000:]

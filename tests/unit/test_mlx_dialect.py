"""The installed mlx_lm.server's options, read from its --help: pass only those, refuse what a spec needs more."""

from __future__ import annotations

import subprocess
import sys

from dataclasses import replace

import pytest

from metal_agent.core.api import InferenceServiceSpec
from metal_agent.core.claim import evaluate
from metal_agent.core.engines.mlx_lm import MLX_LM
from metal_agent.core.launch import Instance, LaunchSettings
from metal_agent.core.mlx_dialect import MlxDialect, mlx_dialect_from_help, refusals, supported
from metal_agent.core.result import Invalid
from tests.support.manifests import isvc_doc, model_doc

#: `mlx_lm.server --help` usage of mlx-lm 0.30.5 (from its wheel's server.py: no --decode-concurrency,
#: --prompt-cache-size, --prefill-step-size nor --kv-bits).
HELP_0_30_5 = """usage: server.py [-h] [--model MODEL] [--adapter-path ADAPTER_PATH] [--host HOST] [--port PORT]
  [--draft-model DRAFT_MODEL] [--num-draft-tokens NUM_DRAFT_TOKENS] [--trust-remote-code]
  [--log-level {DEBUG,INFO,WARNING,ERROR,CRITICAL}] [--chat-template CHAT_TEMPLATE]
  [--use-default-chat-template] [--temp TEMP] [--top-p TOP_P] [--top-k TOP_K] [--min-p MIN_P]
  [--max-tokens MAX_TOKENS] [--chat-template-args CHAT_TEMPLATE_ARGS]
"""
OLD = mlx_dialect_from_help(HELP_0_30_5, "0.30.5")
SOURCE = "/Users/me/models/Qwen3-4B-4bit"
LAUNCH = (LaunchSettings(llama_server="llama-server", mlx_server=("/venv/bin/python3", "/venv/bin/mlx_lm.server"), host="h"),
          Instance(model_path=SOURCE, port=1))


def argv_for(**isvc) -> tuple[str, ...]:
    return MLX_LM.argv(evaluate(isvc_doc(**isvc), model_doc(format="mlx", source=SOURCE)).value, *LAUNCH)


def test_the_installed_mlx_lm_lists_every_option_the_engine_passes():
    help_text = subprocess.run([sys.executable, "-m", "mlx_lm.server", "--help"], capture_output=True, text=True,
                               timeout=120).stdout
    current = mlx_dialect_from_help(help_text, "installed")
    argv = argv_for(parallelSlots=1, cacheTypeK="q8_0", cacheTypeV="q8_0")
    assert supported(argv, current) == argv
    assert {a for a in argv if a.startswith("--")} <= current.options


def test_an_older_server_gets_only_the_options_it_has():
    argv = supported(argv_for(), OLD)
    for option in ("--decode-concurrency", "--prompt-cache-size", "--prefill-step-size"):
        assert option not in argv
    assert argv[argv.index("--model") + 1] == SOURCE and argv[-2:] == ("--log-level", "INFO")


def old_settings() -> LaunchSettings:
    return replace(LAUNCH[0], mlx_dialect=OLD)


def test_the_engine_cuts_its_command_line_to_the_installed_server_and_keeps_the_owners_extra_args():
    workload = evaluate(isvc_doc(extraArgs=["--temp", "0.2"]), model_doc(format="mlx", source=SOURCE)).value
    argv = MLX_LM.argv(workload, old_settings(), LAUNCH[1])
    assert argv == (*supported(argv_for(extraArgs=["--temp", "0.2"])[:-2], OLD), "--temp", "0.2")
    assert "--decode-concurrency" not in argv and argv[-2:] == ("--temp", "0.2")
    # A current server (or help unread) gets the whole command line.
    assert MLX_LM.argv(workload, LAUNCH[0], LAUNCH[1]) == argv_for(extraArgs=["--temp", "0.2"])


def test_evaluate_refuses_what_the_installed_server_is_too_old_for_only_when_it_knows_the_server():
    mlx = model_doc(format="mlx", source=SOURCE)
    slots = isvc_doc(parallelSlots=2)
    assert not isinstance(evaluate(slots, mlx), Invalid)  # no settings: current servers assumed
    assert not isinstance(evaluate(slots, mlx, settings=LAUNCH[0]), Invalid)
    [error] = evaluate(slots, mlx, settings=old_settings()).errors
    assert error.path == "spec.parallelSlots" and "0.30.6" in error.message and "0.30.5" in error.message
    quantized = evaluate(isvc_doc(cacheTypeK="q8_0", cacheTypeV="q8_0"), mlx, settings=old_settings())
    assert [e.path for e in quantized.errors] == ["spec.cacheTypeK"] and "0.32.0" in quantized.errors[0].message
    # llama-server services do not depend on mlx-lm's release.
    assert not isinstance(evaluate(slots, model_doc(), settings=old_settings()), Invalid)


def test_unreadable_help_passes_everything():
    assert mlx_dialect_from_help("") == MlxDialect() and supported(argv_for(), MlxDialect()) == argv_for()


@pytest.mark.parametrize(("spec", "path", "release"), [
    pytest.param({"parallel_slots": 4}, "spec.parallelSlots", "0.30.6", id="slots"),
    pytest.param({"batch_size": 512}, "spec.batchSize", "0.31.0", id="prefill-step"),
])
def test_a_spec_needing_a_newer_server_is_refused_naming_the_release(spec, path, release):
    [error] = refusals(InferenceServiceSpec(model_ref="m", **spec), OLD, "ns/a", quantized_cache=False)
    assert error.path == path and f"mlx-lm {release} or newer" in error.message and "0.30.5" in error.message


def test_a_quantized_cache_needs_kv_bits():
    [error] = refusals(InferenceServiceSpec(model_ref="m"), OLD, "ns/a", quantized_cache=True)
    assert error.path == "spec.cacheTypeK" and "0.32.0" in error.message
    assert refusals(InferenceServiceSpec(model_ref="m", parallel_slots=1), OLD, "ns/a", quantized_cache=False) == ()


async def test_the_probe_reads_the_installed_servers_options():
    """The adapter asks the real mlx_lm.server script (this venv's) for its --help."""
    import shutil
    from pathlib import Path

    from metal_agent.adapters.mlx_binary import probe, probe_dialect

    script = Path(sys.executable).parent / "mlx_lm.server"
    if not script.exists():
        script = Path(shutil.which("mlx_lm.server") or script)
    info = await probe(str(script), timeout=120)
    assert not isinstance(info, str), info
    dialect = await probe_dialect(info, timeout=120)
    assert dialect.version == info.version != "unknown"
    assert {"--model", "--decode-concurrency", "--kv-bits"} <= dialect.options
    # Read from the source by its interpreter (no MLX import) or from --help (the script run as it is):
    # the same options.
    assert len(info.command) == 2
    by_help = await probe_dialect(replace(info, command=(info.command[1],)), timeout=120)
    assert by_help.options - {"--help"} == dialect.options

"""Every spec field -> llama-server flag mapping, and the agent-level options."""

from __future__ import annotations

import pytest

from metal_agent.core.argv import build_argv
from metal_agent.core.flags import VERBOSITY_FLAGS, Dialect, MlockStyle
from metal_agent.core.launch import Instance, LaunchSettings
from tests.support.manifests import gpu, workload


def launch(binary="b", model_path="m", host="h", port=1, threads=None, mlock=True,
           **dialect) -> tuple[LaunchSettings, Instance]:
    """The agent's settings (binary, host, threads, mlock, the binary's dialect) and one process's."""
    return (LaunchSettings(llama_server=binary, host=host, threads=threads, mlock=mlock, dialect=Dialect(**dialect)),
            Instance(model_path=model_path, port=port))


OPTIONS = launch(binary="/opt/homebrew/bin/llama-server", model_path="/cache/tiny-llama.gguf", host="127.0.0.1",
                 port=18080, threads=8)


def argv_for(isvc_spec=None, options=OPTIONS, **model_spec) -> tuple[str, ...]:
    return build_argv(workload(isvc_spec, **model_spec), *options)


def has_run(argv, run) -> bool:
    """`run` appears in `argv` as consecutive elements."""
    n = len(run)
    return any(tuple(argv[i : i + n]) == tuple(run) for i in range(len(argv) - n + 1))


def test_defaults():
    assert argv_for() == (
        "/opt/homebrew/bin/llama-server",
        "--model", "/cache/tiny-llama.gguf",
        "--host", "127.0.0.1",
        "--port", "18080",
        "--n-gpu-layers", "999",
        "--ctx-size", "2048",
        "--parallel", "1",
        "--flash-attn", "on",
        "--load-mode", "mmap+mlock",
        "--threads", "8",
        "--batch-size", "2048",
        "--cache-ram", "1024",
        "--no-slots",
        "--metrics",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("isvc_spec", "model_spec", "expected"),
    [
        pytest.param({"contextSize": 131072}, {}, ["--ctx-size", "131072"], id="contextSize"),
        pytest.param({"parallelSlots": 4}, {}, ["--parallel", "4"], id="parallelSlots"),
        # Unsaid, llama-server picks "auto": 4 slots sharing one unified KV cache.
        pytest.param({"parallelSlots": 1}, {}, ["--parallel", "1"], id="parallelSlots-1-is-said"),
        pytest.param({}, {}, ["--cache-ram", "1024"], id="chat-prompt-cache-bounded"),
        pytest.param({"mode": "embedding"}, {}, ["--pooling", "last", "--cache-ram", "0"], id="embedding-no-prompt-cache"),
        pytest.param({"mode": "rerank"}, {}, ["--pooling", "rank", "--cache-ram", "0"], id="rerank-no-prompt-cache"),
        pytest.param({"flashAttention": True}, {}, ["--flash-attn", "on"], id="flashAttention-true"),
        pytest.param({"flashAttention": False}, {}, ["--flash-attn", "off"], id="flashAttention-false"),
        pytest.param({"jinja": True}, {}, ["--jinja"], id="jinja"),
        pytest.param({"jinja": False}, {}, ["--no-jinja"], id="jinja-false-is-no-jinja"),
        pytest.param({"cacheTypeK": "q8_0"}, {}, ["--cache-type-k", "q8_0"], id="cacheTypeK"),
        pytest.param({"cacheTypeV": "q4_0"}, {}, ["--cache-type-v", "q4_0"], id="cacheTypeV"),
        pytest.param({"cacheTypeCustomK": "turbo3"}, {}, ["--cache-type-k", "turbo3"], id="cacheTypeCustomK"),
        pytest.param({"cacheTypeCustomV": "turbo4"}, {}, ["--cache-type-v", "turbo4"], id="cacheTypeCustomV"),
        pytest.param({"cacheTypeK": "q8_0", "cacheTypeCustomK": "tbq3"}, {}, ["--cache-type-k", "tbq3"], id="custom-K-wins"),
        pytest.param({"cacheTypeV": "f16", "cacheTypeCustomV": "tbqp3"}, {}, ["--cache-type-v", "tbqp3"], id="custom-V-wins"),
        pytest.param({"moeCPUOffload": True}, {}, ["--cpu-moe"], id="moeCPUOffload"),
        pytest.param({"moeCPULayers": 7}, {}, ["--n-cpu-moe", "7"], id="moeCPULayers"),
        pytest.param({"noKvOffload": True}, {}, ["--no-kv-offload"], id="noKvOffload"),
        pytest.param({"noWarmup": True}, {}, ["--no-warmup"], id="noWarmup"),
        pytest.param({"reasoningBudget": 1024}, {}, ["--reasoning-budget", "1024"], id="reasoningBudget"),
        # LLMKube's controller: set means said, 0 included (its API: "disables visible thinking").
        pytest.param({"reasoningBudget": 0}, {}, ["--reasoning-budget", "0"], id="reasoningBudget-0"),
        pytest.param({"reasoningBudget": 0, "reasoningBudgetMessage": "Stop."}, {},
                     ["--reasoning-budget", "0", "--reasoning-budget-message", "Stop."], id="reasoningBudget-0-message"),
        pytest.param(
            {"reasoningBudget": 8, "reasoningBudgetMessage": "Time is up.\nAnswer now."},
            {},
            ["--reasoning-budget-message", "Time is up.\nAnswer now."],
            id="reasoningBudgetMessage",
        ),
        pytest.param(
            {"metadataOverrides": ["a.b=int:1", "c=bool:false"]},
            {},
            ["--override-kv", "a.b=int:1,c=bool:false"],  # once: build 11434 warns on a repeated option
            id="metadataOverrides",
        ),
        pytest.param(
            {"metadataOverrides": ["general.name=str:Tiny, v2", 'q=str:say "hi"', "n=int:-3"]},
            {},
            ["--override-kv", '"general.name=str:Tiny, v2","q=str:say ""hi""",n=int:-3'],  # parse_csv_row quoting
            id="metadataOverrides-commas-quoted",
        ),
        pytest.param(
            {"tensorOverrides": ["blk\\.[0-9]+\\.ffn_.*_exps=CPU", "token_embd=CPU"]},
            {},
            ["--override-tensor", "blk\\.[0-9]+\\.ffn_.*_exps=CPU,token_embd=CPU"],
            id="tensorOverrides",
        ),
        pytest.param({"batchSize": 512}, {}, ["--batch-size", "512"], id="batchSize"),
        pytest.param({"uBatchSize": 256}, {}, ["--ubatch-size", "256"], id="uBatchSize"),
        pytest.param({"mode": "embedding"}, {}, ["--embedding", "--pooling", "last"], id="mode-embedding"),
        pytest.param(
            {"mode": "rerank"}, {}, ["--reranking", "--embedding", "--pooling", "rank"], id="mode-rerank"
        ),
        pytest.param({"ropeScaling": {"type": "yarn"}}, {}, ["--rope-scaling", "yarn"], id="ropeScaling-type"),
        pytest.param({"ropeScaling": {"type": "linear"}}, {}, ["--rope-scaling", "linear"], id="ropeScaling-linear"),
        pytest.param({"ropeScaling": {"factor": "4.0"}}, {}, ["--rope-scale", "4"], id="ropeScaling-factor"),
        pytest.param({"ropeScaling": {"factor": "0.50"}}, {}, ["--rope-scale", "0.5"], id="ropeScaling-factor-fraction"),
        pytest.param(
            {"ropeScaling": {"originalContext": 32768}}, {}, ["--yarn-orig-ctx", "32768"], id="ropeScaling-originalContext"
        ),
        pytest.param({"extraArgs": ["--temp", "0.2"]}, {}, ["--temp", "0.2"], id="extraArgs"),
        pytest.param({}, {"hardware": gpu(layers=0)}, ["--n-gpu-layers", "999"], id="gpu-layers-0-is-all"),
        pytest.param({}, {"hardware": gpu(layers=33)}, ["--n-gpu-layers", "33"], id="gpu-layers-33"),
        pytest.param({}, {"hardware": gpu(layers=-1)}, ["--n-gpu-layers", "-1"], id="gpu-layers-auto"),
        pytest.param({}, {"hardware": gpu(sharding={"strategy": "layer"})}, ["--split-mode", "layer"], id="split-layer"),
        pytest.param({}, {"hardware": gpu(sharding={"strategy": "pipeline"})}, ["--split-mode", "layer"], id="split-pipeline"),
        pytest.param({}, {"hardware": gpu(sharding={"strategy": "row"})}, ["--split-mode", "row"], id="split-row"),
        pytest.param({}, {"hardware": gpu(sharding={"strategy": "tensor"})}, ["--split-mode", "tensor"], id="split-tensor"),
        pytest.param({}, {"hardware": gpu(sharding={"strategy": "none"})}, ["--split-mode", "none"], id="split-none"),
        pytest.param(
            {},
            {"hardware": gpu(count=3, sharding={"layerSplit": ["3", "1.0", "0"]})},
            ["--tensor-split", "3,1,0"],
            id="layerSplit",
        ),
        pytest.param(
            {}, {"hardware": gpu(sharding={"layerSplit": ["100", "0.25"]})}, ["--tensor-split", "100,0.25"], id="layerSplit-no-exponent"
        ),
    ],
)
def test_field_maps_to_flag(isvc_spec, model_spec, expected):
    argv = argv_for(isvc_spec, **model_spec)
    assert has_run(argv, expected), argv


@pytest.mark.parametrize(
    ("isvc_spec", "absent"),
    [
        pytest.param({}, "--cache-type-k", id="no-cacheTypeK"),
        pytest.param({}, "--cache-type-v", id="no-cacheTypeV"),
        pytest.param({}, "--ubatch-size", id="no-uBatchSize"),
        pytest.param({}, "--reasoning-budget", id="no-reasoningBudget"),
        pytest.param({}, "--reasoning-budget-message", id="no-message"),
        # The message only qualifies a budget (LLMKube: "ignored unless ReasoningBudget is also set").
        pytest.param({"reasoningBudgetMessage": "Stop."}, "--reasoning-budget-message", id="message-without-budget"),
        pytest.param({"jinja": False}, "--jinja", id="jinja-false"),
        pytest.param({}, "--no-jinja", id="jinja-unset-keeps-the-build-default"),
        pytest.param({"jinja": True}, "--no-jinja", id="jinja-true"),
        pytest.param({"moeCPULayers": 0}, "--n-cpu-moe", id="moeCPULayers-0"),
        pytest.param({}, "--cpu-moe", id="no-moe"),
        pytest.param({}, "--rope-scaling", id="no-rope"),
        pytest.param({"ropeScaling": {"factor": "2"}}, "--rope-scaling", id="rope-factor-only"),
        pytest.param({"mode": "chat"}, "--embedding", id="chat-no-embedding"),
        pytest.param({}, "--split-mode", id="no-split"),
        pytest.param({}, "--tensor-split", id="no-tensor-split"),
    ],
)
def test_unset_fields_emit_nothing(isvc_spec, absent):
    assert absent not in argv_for(isvc_spec)


def test_metrics_appears_exactly_once_and_extra_args_come_last():
    argv = argv_for({"extraArgs": ["--temp", "0.2", "--top-k", "40"], "mode": "rerank"})
    assert argv.count("--metrics") == 1
    assert argv[-4:] == ("--temp", "0.2", "--top-k", "40")
    assert argv.index("--metrics") == len(argv) - 5


def test_agent_owned_flags_come_first():
    argv = argv_for({"extraArgs": ["--alias", "x"]})
    assert argv[:7] == (
        OPTIONS[0].llama_server, "--model", OPTIONS[1].model_path, "--host", "127.0.0.1", "--port", "18080"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("options", "present", "absent"),
    [
        pytest.param(
            launch(binary="b", model_path="m", host="0.0.0.0", port=1, threads=None),
            ["--host", "0.0.0.0"],
            "--threads",
            id="threads-unset",
        ),
        pytest.param(
            launch(binary="b", model_path="m", host="h", port=65535, mlock=False),
            ["--port", "65535"],
            "--mlock",
            id="mlock-opt-out",
        ),
        pytest.param(
            launch(binary="b", model_path="m", host="h", port=2, mlock_style=MlockStyle.LOAD_MODE),
            ["--load-mode", "mmap+mlock"],
            "--mlock",
            id="mlock-load-mode",
        ),
        pytest.param(
            launch(binary="b", model_path="/p/m.gguf", host="h", port=3, threads=6),
            ["--threads", "6"],
            "--mlock",  # the default dialect (help unread) is the pinned build's --load-mode
            id="threads",
        ),
        pytest.param(
            launch(binary="b", model_path="m", host="h", port=4, mlock_style=MlockStyle.FLAG),
            ["--mlock"],
            "--load-mode",
            id="mlock-flag-for-a-build-that-lists-it",
        ),
    ],
)
def test_agent_options(options, present, absent):
    argv = argv_for(options=options)
    assert argv[0] == "b"
    assert has_run(argv, present)
    assert absent not in argv


def test_mlock_opt_out_removes_load_mode_too():
    options = launch(binary="b", model_path="m", host="h", port=1, mlock=False, mlock_style=MlockStyle.LOAD_MODE)
    argv = argv_for(options=options)
    assert "--load-mode" not in argv and "--mlock" not in argv


@pytest.mark.parametrize(
    "bad",
    [
        {"port": 0},
        {"port": 70000},
        {"threads": 0},
        {"model_path": ""},
        {"binary": "llama\x00server"},
    ],
    ids=["port-0", "port-too-big", "threads-0", "empty-model-path", "nul-in-binary"],
)
def test_options_reject_programming_errors(bad):
    fields = {"binary": "b", "model_path": "m", "host": "h", "port": 1} | bad
    with pytest.raises(ValueError):
        launch(**fields)


def test_turboquant_sample():
    argv = argv_for(
        {
            "runtime": "llamacpp",
            "contextSize": 262144,
            "parallelSlots": 2,
            "jinja": True,
            "flashAttention": True,
            "cacheTypeCustomK": "turbo3",
            "cacheTypeCustomV": "turbo3",
        }
    )
    assert argv[1:] == (
        "--model", "/cache/tiny-llama.gguf",
        "--host", "127.0.0.1",
        "--port", "18080",
        "--n-gpu-layers", "999",
        "--ctx-size", "262144",
        "--parallel", "2",
        "--flash-attn", "on",
        "--load-mode", "mmap+mlock",
        "--cache-type-k", "turbo3",
        "--cache-type-v", "turbo3",
        "--threads", "8",
        "--batch-size", "2048",
        "--jinja",
        "--cache-ram", "1024",
        "--no-slots",
        "--metrics",
    )  # fmt: skip


@pytest.mark.parametrize("extra", [["--cache-ram", "256"], ["-cram", "256"], ["--cache-ram=256"]])
def test_a_prompt_cache_size_the_owner_allows_in_extra_args_is_the_only_one_said_and_the_one_counted(extra):
    from metal_agent.core.argv import prompt_cache_mib
    from metal_agent.core.claim import evaluate
    from metal_agent.core.extra_args import ExtraArgsPolicy
    from metal_agent.core.spec_policy import SpecPolicy
    from tests.support.manifests import isvc_doc, model_doc

    owner = SpecPolicy(extra_args=ExtraArgsPolicy(frozenset({"--cache-ram"})))
    assert "ExtraArgRefused" in {e.reason for e in evaluate(isvc_doc(extraArgs=extra), model_doc()).errors}
    w = evaluate(isvc_doc(mode="embedding", extraArgs=extra), model_doc(), policy=owner).value
    argv = build_argv(w, *OPTIONS)
    assert [t for t in argv if t in ("--cache-ram", "-cram")] == [extra[0].split("=")[0]]
    assert argv[-2:] == (extra[0].split("=")[0], "256")
    assert prompt_cache_mib(w.isvc.spec) == 256


VERBOSE = launch(binary="b", model_path="m", host="h", port=1, verbosity_flag="--verbosity")


def test_verbosity_4_is_passed_when_the_binary_has_the_option():
    # Level 4 is where build 11434 logs the offload and buffer lines status.acceleration reads.
    argv = argv_for({"extraArgs": ["--temp", "0.2"]}, options=VERBOSE)
    assert has_run(argv, ["--metrics", "--verbosity", "4", "--temp", "0.2"])
    assert argv.count("--verbosity") == 1


def test_no_verbosity_flag_when_the_binary_lacks_it():
    # An option the binary does not list would stop it at start-up.
    assert not set(argv_for()) & set(VERBOSITY_FLAGS)


def test_the_verbosity_flag_cannot_be_overridden_from_extra_args():
    # The builder would append extraArgs after it; validation refuses every spelling first.
    from metal_agent.core.claim import evaluate
    from metal_agent.core.result import Invalid
    from tests.support.manifests import isvc_doc, model_doc

    for spelling in ("-lv", "--verbosity", "--log-verbosity", "--log_verbosity=1"):
        assert isinstance(evaluate(isvc_doc(extraArgs=[spelling, "1"]), model_doc()), Invalid)


def test_no_jinja_is_left_out_for_a_build_without_it():
    # Such builds have the template engine off by default: saying nothing already means false.
    old_build = launch(binary="b", model_path="m", host="h", port=1, no_jinja=False)
    argv = argv_for({"jinja": False}, options=old_build)
    assert "--no-jinja" not in argv and "--jinja" not in argv
    assert "--jinja" in argv_for({"jinja": True}, options=old_build)


@pytest.mark.parametrize("flag", ["--port", "--verbose", "-v", "4", ""])
def test_verbosity_flag_must_be_a_verbosity_spelling(flag):
    with pytest.raises(ValueError):
        launch(binary="b", model_path="m", host="h", port=1, verbosity_flag=flag)


def test_an_unbounded_prompt_cache_is_refused_even_when_the_owner_allows_the_option():
    from metal_agent.core.claim import evaluate
    from metal_agent.core.extra_args import ExtraArgsPolicy
    from metal_agent.core.spec_policy import SpecPolicy
    from tests.support.manifests import isvc_doc, model_doc

    owner = SpecPolicy(extra_args=ExtraArgsPolicy(frozenset({"--cache-ram"})))
    outcome = evaluate(isvc_doc(extraArgs=["--temp", "0.2", "--cache-ram=-1"]), model_doc(), policy=owner)
    [error] = outcome.errors
    assert error.path == "spec.extraArgs[2]" and "no limit" in error.message


def test_longrope_is_refused_since_llama_server_would_exit_on_it():
    """`common/arg.cpp`: --rope-scaling takes none, linear or yarn and throws on anything else."""
    from metal_agent.core.claim import evaluate
    from tests.support.manifests import isvc_doc, model_doc

    [error] = evaluate(isvc_doc(ropeScaling={"type": "longrope", "factor": "4"}), model_doc()).errors
    assert (error.path, error.reason) == ("spec.ropeScaling.type", "UnsupportedField")


# -- speculative decoding (llama-server) ---------------------------------------------------

SPEC_OPTIONS = (LaunchSettings(llama_server="b", host="h"),
                Instance(model_path="m", port=1, draft_model_path="/cache/draft.gguf"))


@pytest.mark.parametrize(("block", "expected"), [
    pytest.param({"type": "ngram-simple"}, ["--spec-type", "ngram-simple"], id="ngram"),
    pytest.param({"type": "ngram-mod", "nDraftMax": 8, "pMin": 0.75},
                 ["--spec-type", "ngram-mod", "--spec-draft-n-max", "8", "--spec-draft-p-min", "0.75"], id="ngram-tuned"),
    pytest.param({"type": "draft", "draftModelRef": "small", "nDraftMax": 3},
                 ["--spec-type", "draft-simple", "-md", "/cache/draft.gguf", "--spec-draft-n-max", "3"], id="alias-draft"),
    pytest.param({"type": "mtp"}, ["--spec-type", "draft-mtp"], id="alias-mtp-without-weights"),
    pytest.param({"type": "draft-eagle3", "draftModelRef": "small", "pMin": 1},
                 ["--spec-type", "draft-eagle3", "-md", "/cache/draft.gguf", "--spec-draft-p-min", "1"], id="eagle3"),
])
def test_speculative_decoding_maps_to_llama_servers_flags(block, expected):
    from metal_agent.core.claim import evaluate
    from tests.support.manifests import isvc_doc, model_doc

    draft = model_doc("small", source="/models/small.gguf")
    outcome = evaluate(isvc_doc(speculativeDecoding=block), model_doc(), draft=draft)
    argv = build_argv(outcome.value, *SPEC_OPTIONS)
    assert has_run(argv, expected), argv
    assert argv.count("--spec-type") == 1


@pytest.mark.parametrize("kind", ["none", "disabled"])
def test_no_speculation_says_nothing(kind):
    from metal_agent.core.claim import evaluate
    from tests.support.manifests import isvc_doc, model_doc

    argv = build_argv(evaluate(isvc_doc(speculativeDecoding={"type": kind, "nDraftMax": 4}), model_doc()).value,
                      *SPEC_OPTIONS)
    assert not any(a.startswith("--spec") or a == "-md" for a in argv)


@pytest.mark.parametrize(("block", "path", "reason"), [
    pytest.param({"type": "medusa"}, "spec.speculativeDecoding.type", "", id="unknown-type"),
    pytest.param({"type": "draft-simple", "draftModel": "drafter.gguf"}, "spec.speculativeDecoding.draftModel",
                 "", id="draft-file-not-in-spec-files"),
    pytest.param({"type": "draft-simple", "draftModel": "drafter.gguf", "draftModelRef": "small"},
                 "spec.speculativeDecoding.draftModel", "", id="draft-file-and-draft-model"),
    pytest.param({"type": "draft-simple"}, "spec.speculativeDecoding.draftModelRef", "", id="draft-type-without-weights"),
    pytest.param({"type": "ngram-simple", "draftModelRef": "small"}, "spec.speculativeDecoding.draftModelRef", "",
                 id="ngram-with-weights"),
    pytest.param({"type": "ngram-simple", "pMin": 1.5}, "spec.speculativeDecoding.pMin", "", id="p-min-above-1"),
])
def test_speculative_decoding_llama_server_cannot_run_is_refused_by_field(block, path, reason):
    from metal_agent.core.claim import evaluate
    from tests.support.manifests import isvc_doc, model_doc

    [error] = evaluate(isvc_doc(speculativeDecoding=block), model_doc()).errors
    assert (error.path, error.reason) == (path, reason)


def test_a_draft_file_of_the_models_set_is_passed_from_beside_the_model():
    """LLMKube's `draftModel`: a file of the Model's `spec.files`, staged beside the model file."""
    from metal_agent.core.claim import evaluate
    from metal_agent.core.launch import Instance
    from tests.support.manifests import isvc_doc, model_doc

    model = model_doc(source="hf://org/Repo-GGUF", files=["big/m.gguf", "small/d.gguf"])
    got = evaluate(isvc_doc(speculativeDecoding={"type": "draft", "draftModel": "small/d.gguf"}), model)
    argv = build_argv(got.value, SPEC_OPTIONS[0], Instance("/cache/x/big/m.gguf", 1))
    assert has_run(argv, ["--spec-type", "draft-simple", "-md", "/cache/x/small/d.gguf"])
    [error] = evaluate(isvc_doc(speculativeDecoding={"type": "ngram-simple", "draftModel": "small/d.gguf"}),
                       model).errors
    assert error.path == "spec.speculativeDecoding.draftModel" and "takes no draft model" in error.message


def test_speculative_decoding_is_part_of_the_digest_and_aliases_hash_alike():
    from metal_agent.core.claim import evaluate
    from metal_agent.core.spec_hash import spec_hash
    from tests.support.manifests import isvc_doc, model_doc

    def digest(block):
        return spec_hash(evaluate(isvc_doc(speculativeDecoding=block), model_doc()).value)

    plain = spec_hash(evaluate(isvc_doc(), model_doc()).value)
    assert digest({"type": "none", "nDraftMax": 3}) == plain  # no speculation: the same process
    assert len({plain, digest({"type": "ngram-simple"}), digest({"type": "ngram-simple", "nDraftMax": 3}),
                digest({"type": "ngram-simple", "pMin": 0.5})}) == 4
    assert digest({"type": "mtp"}) == digest({"type": "draft-mtp"})

"""The spec hash moves with exactly what changes the llama-server process."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from metal_agent.core.argv import build_argv
from metal_agent.core.claim import evaluate
from metal_agent.core.launch import Instance, LaunchSettings
from metal_agent.core.result import Parsed
from metal_agent.core.spec_hash import spec_hash
from tests.support.manifests import gpu, isvc_doc, model_doc, workload

OPTIONS = (LaunchSettings(llama_server="llama-server", host="127.0.0.1", threads=4), Instance(model_path="/m.gguf", port=8000))
DIGEST = "ab" * 32


def digest_of(isvc: dict, model: dict) -> str:
    outcome = evaluate(isvc, model)
    assert isinstance(outcome, Parsed), outcome
    return spec_hash(outcome.value).value


BASE_ISVC = {"contextSize": 8192, "cacheTypeK": "q8_0", "extraArgs": ["--temp", "0.3"]}
BASE_MODEL = {"sha256": DIGEST, "hardware": gpu(layers=20, sharding={"strategy": "row", "layerSplit": ["1"]})}


def base_digest() -> str:
    return digest_of(isvc_doc(**BASE_ISVC), model_doc(**BASE_MODEL))


def test_digest_shape():
    digest = spec_hash(workload())
    assert re.fullmatch(r"[0-9a-f]{64}", digest.value)
    assert digest.short == digest.value[:12]
    assert str(digest) == digest.value


def test_digest_is_sha256_of_the_documented_payload():
    # The payload is part of the agent's persistent state (digests are stored
    # with running processes): changing it restarts every model the first time
    # a new agent version adopts them, so it is spelled out here on purpose.
    payload = {
        "schema": 1,
        "model.source": "https://example.com/models/tiny-llama.gguf",
        "model.gpuLayers": 0,
        "contextSize": 2048,
        "parallelSlots": 1,
        "flashAttention": True,
        "jinja": False,
        "moeCPUOffload": False,
        "moeCPULayers": 0,
        "noKvOffload": False,
        "noWarmup": False,
        "reasoningBudget": 0,
        "batchSize": 2048,
        "mode": "chat",
        "llamaArgv": 2,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    assert spec_hash(workload()).value == hashlib.sha256(canonical).hexdigest()


def test_key_order_does_not_matter():
    isvc = isvc_doc(**BASE_ISVC)
    model = model_doc(**BASE_MODEL)
    reordered_isvc = {k: isvc[k] for k in reversed(list(isvc))}
    reordered_isvc["spec"] = {k: isvc["spec"][k] for k in reversed(list(isvc["spec"]))}
    reordered_model = {k: model[k] for k in reversed(list(model))}
    reordered_model["spec"] = {k: model["spec"][k] for k in reversed(list(model["spec"]))}
    assert digest_of(reordered_isvc, reordered_model) == base_digest()


def test_defaults_written_out_hash_like_defaults_left_implicit():
    explicit_isvc = isvc_doc(
        replicas=1,
        runtime="llamacpp",
        contextSize=2048,
        parallelSlots=1,
        flashAttention=True,
        cacheTypeK="",
        cacheTypeCustomV="",
        moeCPUOffload=False,
        moeCPULayers=0,
        noKvOffload=False,
        noWarmup=False,
        reasoningBudgetMessage="",
        metadataOverrides=[],
        tensorOverrides=[],
        batchSize=2048,
        extraArgs=[],
        mode="chat",
        priority="normal",
        ropeScaling={},
    )
    explicit_model = model_doc(format="gguf", hardware=gpu(layers=0))
    assert digest_of(explicit_isvc, explicit_model) == digest_of(isvc_doc(), model_doc())


@pytest.mark.parametrize(
    ("isvc_change", "model_change"),
    [
        pytest.param({"replicas": 2}, {}, id="replicas-1-to-2"),
        pytest.param({"replicas": 10}, {}, id="replicas-10"),
        pytest.param({"priority": "critical"}, {}, id="priority"),
        pytest.param({"evictionProtection": True}, {}, id="evictionProtection"),
        pytest.param({"suspend": True}, {}, id="suspend"),
        pytest.param({"cacheTypeK": "", "cacheTypeCustomK": "q8_0"}, {}, id="same-cache-type-via-custom-field"),
        pytest.param({}, {"hardware": {**BASE_MODEL["hardware"], "memoryBudget": "8Gi"}}, id="memoryBudget"),
        pytest.param({}, {"hardware": {**BASE_MODEL["hardware"], "memoryFraction": 0.4}}, id="memoryFraction"),
        pytest.param({}, {"sha256": DIGEST.upper()}, id="sha256-case"),
    ],
)
def test_fields_that_do_not_change_the_process_keep_the_digest(isvc_change, model_change):
    changed = digest_of(isvc_doc(**(BASE_ISVC | isvc_change)), model_doc(**(BASE_MODEL | model_change)))
    assert changed == base_digest()


def test_labels_annotations_and_revision_keep_the_digest():
    isvc = isvc_doc(**BASE_ISVC)
    isvc["metadata"].update(labels={"team": "a"}, annotations={"x": "y"}, generation=99, resourceVersion="1")
    model = model_doc(**BASE_MODEL)
    model["metadata"]["labels"] = {"tier": "gold"}
    assert digest_of(isvc, model) == base_digest()


# Every change below alters the command line; the digest must follow.
ARGV_CHANGES = [
    pytest.param({"contextSize": 16384}, {}, id="contextSize"),
    pytest.param({"cacheTypeK": "q4_0"}, {}, id="cacheTypeK"),
    pytest.param({"cacheTypeCustomK": "turbo3"}, {}, id="cacheTypeCustomK"),
    pytest.param({"cacheTypeV": "q8_0"}, {}, id="cacheTypeV"),
    pytest.param({"cacheTypeCustomV": "turbo4"}, {}, id="cacheTypeCustomV"),
    pytest.param({"parallelSlots": 2}, {}, id="parallelSlots"),
    pytest.param({"flashAttention": False}, {}, id="flashAttention"),
    pytest.param({"jinja": True}, {}, id="jinja"),
    pytest.param({"jinja": False}, {}, id="jinja-false-is-no-jinja"),
    pytest.param({"moeCPUOffload": True}, {}, id="moeCPUOffload"),
    pytest.param({"moeCPULayers": 3}, {}, id="moeCPULayers"),
    pytest.param({"noKvOffload": True}, {}, id="noKvOffload"),
    pytest.param({"noWarmup": True}, {}, id="noWarmup"),
    pytest.param({"reasoningBudget": 100}, {}, id="reasoningBudget"),
    pytest.param({"reasoningBudget": 0}, {}, id="reasoningBudget-0-is-said"),
    pytest.param({"reasoningBudget": 100, "reasoningBudgetMessage": "stop"}, {}, id="reasoningBudgetMessage"),
    pytest.param({"metadataOverrides": ["k=int:1"]}, {}, id="metadataOverrides"),
    pytest.param({"tensorOverrides": ["exps=CPU"]}, {}, id="tensorOverrides"),
    pytest.param({"batchSize": 1024}, {}, id="batchSize"),
    pytest.param({"uBatchSize": 128}, {}, id="uBatchSize"),
    pytest.param({"mode": "embedding"}, {}, id="mode"),
    pytest.param({"extraArgs": ["--temp", "0.4"]}, {}, id="extraArgs"),
    pytest.param({"extraArgs": ["--top-p", "0.3"]}, {}, id="extraArgs-option"),
    pytest.param({"ropeScaling": {"type": "yarn"}}, {}, id="rope-type"),
    pytest.param({"ropeScaling": {"factor": "2"}}, {}, id="rope-factor"),
    pytest.param({"ropeScaling": {"originalContext": 4096}}, {}, id="rope-originalContext"),
    pytest.param({}, {"hardware": gpu(layers=21, sharding={"strategy": "row", "layerSplit": ["1"]})}, id="gpu-layers"),
    pytest.param({}, {"hardware": gpu(layers=20, sharding={"strategy": "tensor", "layerSplit": ["1"]})}, id="split-mode"),
    pytest.param({}, {"hardware": gpu(layers=20, sharding={"strategy": "row", "layerSplit": ["2", "1"]})}, id="layerSplit"),
]


@pytest.mark.parametrize(("isvc_change", "model_change"), ARGV_CHANGES)
def test_every_argv_change_changes_the_digest(isvc_change, model_change):
    before = workload(BASE_ISVC, **BASE_MODEL)
    after = workload(BASE_ISVC | isvc_change, **(BASE_MODEL | model_change))
    assert build_argv(after, *OPTIONS) != build_argv(before, *OPTIONS), "test case must change the argv"
    assert spec_hash(after) != spec_hash(before)


@pytest.mark.parametrize(
    "model_change",
    [
        pytest.param({"sha256": "cd" * 32}, id="sha256"),
        pytest.param({"sha256": None}, id="sha256-removed"),
        pytest.param({"source": "https://example.com/models/other.gguf"}, id="source"),
    ],
)
def test_new_weights_change_the_digest(model_change):
    model = {k: v for k, v in (BASE_MODEL | model_change).items() if v is not None}
    assert digest_of(isvc_doc(**BASE_ISVC), model_doc(**model)) != base_digest()


def test_equivalent_spellings_hash_alike():
    a = digest_of(
        isvc_doc(ropeScaling={"factor": "4.0"}),
        model_doc(hardware=gpu(count=2, sharding={"layerSplit": ["1.0", "0.50"]})),
    )
    b = digest_of(
        isvc_doc(ropeScaling={"factor": "4"}),
        model_doc(hardware=gpu(count=2, sharding={"layerSplit": ["1", ".5"]})),
    )
    assert a == b


# Digests computed by the agent before `jinja: false` started to render
# `--no-jinja` (commit 31a9673), and until llama-server's command line gained
# `--parallel 1` and `--cache-ram` (llama argv revision 2). They are stored with
# every running llama-server; a spec whose command line did not change must keep
# its digest, or upgrading the agent would reload every model on the Mac for
# nothing. Revision 2 changed every llama-server command line, so each moves once.
PINNED_DIGESTS = [
    pytest.param({}, "0e228c6067608638aa66b4f6666755d731f7f6c8d64aef56bd5fc22cbe5d613b", id="defaults"),
    pytest.param({"jinja": True}, "dfc640acde1a15786409cd9f6bf2bc9ac494102cb3a4a297ce9192d3318f26cb", id="jinja-true"),
    pytest.param({"flashAttention": False}, "7792913f1545f2badeaeec720ea12feb6e75de5ed74cc0a6c4842f4af37e9944",
                 id="flash-attention-off"),
    pytest.param({"flashAttention": False, "cacheTypeK": "q8_0"},
                 "e4ccbcf8b639056f745fad2422c539dd6e592e302eb644a9f6577ae8e48c272b", id="flash-off-quantized-k-only"),
    pytest.param({"contextSize": 8192, "cacheTypeK": "q8_0", "cacheTypeV": "q8_0", "jinja": True, "parallelSlots": 2},
                 "ad462ec4780f4f34a5b28540a9edfb0ac67fed67935dfa74c46ed1bb900f6ec6", id="typical"),
]  # fmt: skip


@pytest.mark.parametrize(("isvc_spec", "digest"), PINNED_DIGESTS)
def test_the_previous_agents_digests_move_only_by_the_llama_argv_revision(isvc_spec, digest):
    """Each old digest is the new payload without its `llamaArgv` key: nothing else moved."""
    from metal_agent.core.spec_hash import _payload

    w = workload(isvc_spec)
    assert spec_hash(w).value != digest
    payload = {k: v for k, v in _payload(w.model.spec, w.isvc.spec).items() if k != "llamaArgv"}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    assert hashlib.sha256(canonical).hexdigest() == digest


def test_explicit_jinja_false_leaves_the_old_digest_because_its_process_changed():
    # Before, `jinja: false` hashed like the defaults (both rendered no flag);
    # now it renders --no-jinja, so the process it asks for is a different one.
    unset, off, on = workload(), workload({"jinja": False}), workload({"jinja": True})
    assert "--no-jinja" in build_argv(off, *OPTIONS) and "--no-jinja" not in build_argv(unset, *OPTIONS)
    assert len({spec_hash(unset), spec_hash(off), spec_hash(on)}) == 3
    assert spec_hash(off).value != "0e228c6067608638aa66b4f6666755d731f7f6c8d64aef56bd5fc22cbe5d613b"

"""Attacks through `spec.extraArgs`: a namespace user tries to make llama-server or mlx_lm.server
read or write files, connect out, or expose endpoints. Each runs through the agent's own
`evaluate` (what the reconciler runs) and through `metal-agent render` (the CLI, as a process),
and asserts the refusal and that no command line carrying it was produced."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metal_agent.core.claim import evaluate
from metal_agent.core.extra_args import EXTRA_ARG_REFUSED, ExtraArgsPolicy, check_extra_args
from metal_agent.core.llama_options import LLAMA_SERVER_OPTIONS
from metal_agent.core.mlx_options import MLX_LM_OPTIONS
from metal_agent.core.result import Invalid, Parsed
from metal_agent.core.spec_policy import SpecPolicy
from tests.support.manifests import isvc_doc, model_doc

SECRET = "/etc/passwd"

# (attack, extraArgs): each from issue 20 and its variants, in every spelling llama-server accepts.
LLAMA_ATTACKS = [
    ("template file read", ["--chat-template-file", SECRET]),
    ("template file read, underscores", ["--chat_template_file", SECRET]),
    ("template file read, =value", [f"--chat-template-file={SECRET}"]),
    ("template file read, upper case", ["--CHAT-TEMPLATE-FILE", SECRET]),
    ("mcp cors proxy", ["--webui-mcp-proxy"]),
    ("mcp cors proxy, ui spelling", ["--ui-mcp-proxy"]),
    ("mcp cors proxy, underscores", ["--ui_mcp_proxy"]),
    ("agent mode: proxy and tools", ["-ag"]),
    ("agent mode, long", ["--agent"]),
    ("tools", ["--tools", "all"]),
    ("rpc to another host", ["--rpc", "evil.example:50052"]),
    ("rpc, =value", ["--rpc=evil.example:50052"]),
    ("prompt log dir", ["--log-prompts-dir", "/tmp/stolen"]),
    ("log file", ["--log-file", "/tmp/stolen.log"]),
    ("lora", ["--lora", SECRET]),
    ("lora scaled", ["--lora-scaled", f"{SECRET}:1"]),
    ("draft model short", ["-md", SECRET]),
    ("draft model long", ["--model-draft", SECRET]),
    ("draft model spec spelling", ["--spec-draft-model", SECRET]),
    ("control vector", ["--control-vector", SECRET]),
    ("control vector scaled", ["--control-vector-scaled", f"{SECRET}:1"]),
    ("grammar file", ["--grammar-file", SECRET]),
    ("json schema file short", ["-jf", SECRET]),
    ("json schema file long", ["--json-schema-file", SECRET]),
    ("ui config file", ["--ui-config-file", SECRET]),
    ("webui config file", ["--webui-config-file", SECRET]),
    ("mmproj download", ["-mmu", "http://evil.example/p.gguf"]),
    ("mmproj download long", ["--mmproj-url", "http://evil.example/p.gguf"]),
    ("mmproj file", ["-mm", SECRET]),
    ("props writes", ["--props"]),
    ("slots endpoint", ["--slots"]),
    ("static files", ["--path", "/"]),
    ("media files", ["--media-path", "/"]),
    ("slot save", ["--slot-save-path", "/tmp"]),
    ("lookup cache read", ["-lcs", SECRET]),
    ("lookup cache write", ["-lcd", "/tmp/x"]),
    ("ffmpeg dir (runs binaries)", ["--video-ffmpeg-dir", "/tmp"]),
    ("api key file", ["--api-key-file", SECRET]),
    ("mcp servers config", ["--mcp-servers-config", SECRET]),
    ("hf download", ["-hf", "evil/repo"]),
    ("preset download", ["--fim-qwen-7b-default"]),
    ("default spec download", ["--spec-default"]),
    ("move the port", ["--port", "1"]),
    ("CORS open", ["--cors-origins", "*"]),
    ("unknown option", ["--definitely-not-an-option"]),
    # Values smuggling options: llama.cpp gives a value-taking option the next token, whatever it is.
    ("option as a number's value", ["--temp", "--chat-template-file", SECRET]),
    ("option after a switch", ["--no-warmup", "--rpc", "evil.example:1"]),
    ("stray value", ["--top-k", "40", SECRET]),
    ("path as an identifier value", ["-ngl", SECRET]),
    ("path in an override", ["--override-kv", f"x=str:{SECRET}"]),
    ("missing value", ["--grammar"]),
    ("one token with a space", ["--rpc evil.example:1"]),
]


def _refused(outcome) -> list:
    assert isinstance(outcome, Invalid), f"accepted: {outcome}"
    errors = [e for e in outcome.errors if e.path.startswith("spec.extraArgs")]
    assert errors and all(e.reason == EXTRA_ARG_REFUSED for e in errors), outcome.errors
    return errors


@pytest.mark.parametrize("attack, args", LLAMA_ATTACKS, ids=[a for a, _ in LLAMA_ATTACKS])
def test_llama_server_attack_is_refused(attack, args):
    errors = _refused(evaluate(isvc_doc(extraArgs=args), model_doc()))
    assert any(e.kind == "InferenceService" for e in errors)
    # The option (or the offending value) is named, and why.
    named = {repr(token.split("=")[0]) for token in args} | {repr(token) for token in args}
    assert any(any(n in e.message for n in named) or "needs a value" in e.message for e in errors), errors


@pytest.mark.parametrize("args, words", [
    (["--chat-template-file", SECRET], "read or load"),
    (["--rpc", "h:1"], "connect to another host"),
    (["--log-prompts-dir", "/tmp"], "write files"),
    (["--slots"], "endpoint"),
])
def test_refusal_says_why(args, words):
    (error,) = _refused(evaluate(isvc_doc(extraArgs=args), model_doc()))
    assert words in error.message and "--allow-extra-arg" in error.message


MLX_ATTACKS = [
    ("adapter", ["--adapter-path", SECRET]),
    ("adapter, argparse prefix", ["--adapter", SECRET]),
    ("adapter, prefix and =value", [f"--adap={SECRET}"]),
    ("draft model", ["--draft-model", "/Users/x/other"]),
    ("model, prefix", ["--mod", "/Users/x/other"]),
    ("remote code", ["--trust-remote-code"]),
    ("remote code, prefix", ["--trust"]),
    ("CORS", ["--allowed-origins", "*"]),
    ("option as a value", ["--temp", "--model"]),
    ("unknown", ["--definitely-not"]),
]


@pytest.mark.parametrize("attack, args", MLX_ATTACKS, ids=[a for a, _ in MLX_ATTACKS])
def test_mlx_attack_is_refused(attack, args):
    _refused(evaluate(isvc_doc(extraArgs=args), model_doc(format="mlx", source="/Users/me/models/q")))


BENIGN = [
    (["--top-k", "40"], ["--top-k", "40"]),
    (["--temp=0.7"], ["--temp", "0.7"]),  # llama.cpp has no =value spelling: split for it
    (["--min-p", "0.05"], ["--min-p", "0.05"]),
    (["--repeat-penalty", "1.1", "--presence-penalty", "0.5"], ["--repeat-penalty", "1.1", "--presence-penalty", "0.5"]),
    (["--cache-reuse", "256", "--no-context-shift"], ["--cache-reuse", "256", "--no-context-shift"]),
    (["--seed", "-1", "-ngl", "auto"], ["--seed", "-1", "-ngl", "auto"]),
    (["--grammar", 'root ::= "yes" | "no"'], ["--grammar", 'root ::= "yes" | "no"']),
    (["-ot", r"blk\.\d+\.ffn_.*_exps=CPU"], ["-ot", r"blk\.\d+\.ffn_.*_exps=CPU"]),
]


@pytest.mark.parametrize("args, emitted", BENIGN)
def test_benign_extra_args_still_pass(args, emitted):
    outcome = evaluate(isvc_doc(extraArgs=args), model_doc())
    assert isinstance(outcome, Parsed), outcome
    assert list(outcome.value.isvc.spec.extra_args) == emitted


def test_mlx_keeps_argparse_spellings():
    outcome = evaluate(isvc_doc(extraArgs=["--temp=0.7", "--top-k", "40"]),
                       model_doc(format="mlx", source="/Users/me/models/q"))
    assert isinstance(outcome, Parsed), outcome
    assert list(outcome.value.isvc.spec.extra_args) == ["--temp=0.7", "--top-k", "40"]


def test_only_the_owner_widens_the_allowlist():
    args = ["--chat_template_file", "/Users/me/templates/t.jinja"]
    assert isinstance(evaluate(isvc_doc(extraArgs=args), model_doc()), Invalid)
    owner = SpecPolicy(extra_args=ExtraArgsPolicy(frozenset({"--chat-template-file"})))
    outcome = evaluate(isvc_doc(extraArgs=args), model_doc(), policy=owner)
    assert isinstance(outcome, Parsed), outcome
    # Widening one option widens nothing else.
    assert isinstance(evaluate(isvc_doc(extraArgs=["--rpc", "h:1"]), model_doc(), policy=owner), Invalid)


def test_every_refused_category_has_a_reason_and_every_option_one_category():
    for table in (LLAMA_SERVER_OPTIONS, MLX_LM_OPTIONS):
        for option in table.options:
            assert option.category.allowed or option.category.why, option
        spellings = [s for o in table.options for s in o.spellings]
        assert len(spellings) == len(set(spellings)), "a spelling in two rows"


def test_a_refusal_never_leaks_into_the_tokens():
    checked = check_extra_args(LLAMA_SERVER_OPTIONS, ["--top-k", "40", "--rpc", "h:1"])
    assert checked.refusals


# -- render: the same refusals, from the CLI -------------------------------------------


def _render(tmp_path: Path, args: list[str], *flags: str) -> subprocess.CompletedProcess:
    docs = [isvc_doc(extraArgs=args), model_doc()]
    (tmp_path / "all.yaml").write_text(yaml.safe_dump_all(docs))
    return subprocess.run([sys.executable, "-m", "metal_agent", "render", "-f", str(tmp_path / "all.yaml"),
                           "--threads", "2", *flags], capture_output=True, text=True, timeout=120)


def test_render_refuses_what_the_agent_refuses(tmp_path):
    result = _render(tmp_path, ["--chat-template-file", SECRET])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("ExtraArgRefused: InferenceService default/chat: spec.extraArgs[0]")


def test_render_takes_the_owners_flag(tmp_path):
    result = _render(tmp_path, ["--chat-template-file", "/Users/me/t.jinja"],
                     "--allow-extra-arg=--chat-template-file")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[-2:] == ["--chat-template-file", "/Users/me/t.jinja"]


@pytest.mark.parametrize("tokens", [
    ["-c", "1000000"], ["--ctx-size=1000000"], ["--ctx_size", "1000000"], ["-np", "64"], ["--parallel", "64"],
    ["-ctk", "f32"], ["--cache-type-v", "f32"], ["-b", "16384"], ["-ub", "16384"], ["-cram", "100000"],
    ["--swa-full"],
])
def test_options_that_grow_admitted_memory_are_refused_for_their_spec_fields(tokens):
    """Memory admission estimates from the spec's fields; extraArgs last on the command line
    would override them and let one service take memory no estimate counted (others' models,
    the Mac's own work). The refusal names the field to use."""
    (error,) = _refused(evaluate(isvc_doc(extraArgs=tokens), model_doc()))
    assert "admission" in error.message and "spec field" in error.message

"""`metal-agent render` on manifest files, as a user runs it (through typer's runner, in-process)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from metal_agent.cli.main import app

MANIFESTS = Path(__file__).resolve().parent.parent / "fixtures" / "manifests"
TURBOQUANT = MANIFESTS / "turboquant.yaml"

TURBOQUANT_ARGV = [
    "llama-server",
    "--model", "~/Library/Caches/metal-agent/models/Qwen3.5-30B-A3B-Q4_K_M.gguf",
    "--host", "127.0.0.1",
    "--port", "9000",
    "--n-gpu-layers", "999",
    "--ctx-size", "262144",
    "--parallel", "2",
    "--flash-attn", "on",
    "--load-mode", "mmap+mlock",  # no binary to ask: the current spelling
    "--cache-type-k", "turbo3",
    "--cache-type-v", "turbo3",
    "--threads", "8",
    "--batch-size", "2048",
    "--jinja",
    "--cache-ram", "1024",
    "--no-slots",
    "--metrics",
]  # fmt: skip


def render(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The command through the CLI's command table, in-process via Typer's runner:
    the same parsing, stdout and stderr as a user gets, without an interpreter start-up per case
    (the entry point itself, in a real process, is tested in tests/unit/test_cli_imports.py)."""
    result = CliRunner().invoke(app, ["render", *map(str, args)])
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def test_turboquant_sample_renders():
    result = render("-f", TURBOQUANT, "--port", "9000", "--threads", "8")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == TURBOQUANT_ARGV


def test_separate_model_and_isvc_files(tmp_path):
    model, isvc = yaml.safe_load_all(TURBOQUANT.read_text())
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(model))
    (tmp_path / "isvc.yaml").write_text(yaml.safe_dump(isvc))
    result = render(
        "--model", tmp_path / "model.yaml",
        "--isvc", tmp_path / "isvc.yaml",
        "--model-path", "/Volumes/models/q.gguf",
        "--host", "0.0.0.0",
        "--port", "9000",
        "--threads", "8",
        "--llama-server", "/opt/homebrew/bin/llama-server",
        "--no-mlock",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    assert argv[:5] == ["/opt/homebrew/bin/llama-server", "--model", "/Volumes/models/q.gguf", "--host", "0.0.0.0"]
    assert "--mlock" not in argv and "--load-mode" not in argv
    assert argv[5:] == [a for a in TURBOQUANT_ARGV[5:] if a not in ("--load-mode", "mmap+mlock")]


def test_threads_default_to_this_hosts_cores():
    result = render("-f", TURBOQUANT)
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    assert int(argv[argv.index("--threads") + 1]) >= 1


def test_local_source_is_its_own_model_path(tmp_path):
    model, isvc = yaml.safe_load_all(TURBOQUANT.read_text())
    model["spec"]["source"] = "file:///Users/me/models/q.gguf"
    (tmp_path / "all.yaml").write_text(yaml.safe_dump_all([isvc, model]))
    result = render("-f", tmp_path / "all.yaml", "--threads", "2", "--allowed-model-roots", "/Users/me/models")
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    assert argv[1:3] == ["--model", "/Users/me/models/q.gguf"]


def test_a_file_set_renders_its_first_file_and_projector(tmp_path):
    model, isvc = yaml.safe_load_all(TURBOQUANT.read_text())
    model["spec"].update(source="hf://org/Repo-GGUF", mmproj="mmproj-F16.gguf",
                         files=["Q4/m-00001-of-00002.gguf", "Q4/m-00002-of-00002.gguf"])
    (tmp_path / "all.yaml").write_text(yaml.safe_dump_all([isvc, model]))
    result = render("-f", tmp_path / "all.yaml", "--threads", "2")
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    cache = "~/Library/Caches/metal-agent/models"
    assert argv[1:3] == ["--model", f"{cache}/Q4/m-00001-of-00002.gguf"]
    assert argv[argv.index("--mmproj") + 1] == f"{cache}/mmproj-F16.gguf"


def test_invalid_manifest_lists_every_error_with_its_path():
    result = render("-f", MANIFESTS / "invalid.yaml", "--threads", "2")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    prefixes = [line.split(": ", 2)[:2] for line in lines]
    assert prefixes == [
        ["Model default/broken-model", "spec.sha256"],
        ["Model default/broken-model", "spec.hardware.gpu.sharding.layerSplit[1]"],
        ["Model default/broken-model", "spec.hardware.gpu.sharding.layerSplit[2]"],
        ["Model default/broken-model", "spec.hardware.gpu.sharding.layerSplit"],
        ["InferenceService default/broken-service", "spec.contextSize"],
        ["InferenceService default/broken-service", "spec.parallelSlots"],
        ["InferenceService default/broken-service", "spec.cacheTypeK"],
        ["InferenceService default/broken-service", "spec.cacheTypeCustomV"],
    ]  # extraArgs are checked against the engine's allowlist once the rest is valid


def test_not_ours_says_why():
    result = render("-f", MANIFESTS / "not-ours.yaml", "--threads", "2")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        "InferenceService default/llama-cuda is not served by metal-agent: "
        "Model default/llama-cuda has accelerator 'cuda', not 'metal'"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("kind: [unclosed", "cannot read YAML", id="broken-yaml"),
        pytest.param("- a list\n", "not a mapping", id="not-a-mapping"),
        pytest.param("apiVersion: v1\nkind: ConfigMap\n", "exactly one InferenceService", id="no-isvc"),
    ],
)
def test_unusable_files_exit_2(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    result = render("-f", path)
    assert result.returncode == 2
    assert message in result.stderr


def test_isvc_without_its_model_is_not_ours(tmp_path):
    _, isvc = yaml.safe_load_all(TURBOQUANT.read_text())
    (tmp_path / "isvc.yaml").write_text(yaml.safe_dump(isvc))
    result = render("--isvc", tmp_path / "isvc.yaml")
    assert result.returncode == 2
    assert "Model default/qwen3-5-30b-a3b was not found" in result.stderr

"""Rendering of the powermetrics sudoers grant, and the argv it must match."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from metal_agent import __version__
from metal_agent.core.sudoers import (
    SAMPLES_PER_RUN,
    SudoersError,
    legacy_powermetrics_argv,
    powermetrics_argv,
    render_sudoers,
    sampler_argv,
    validate_user,
)

REPO = Path(__file__).resolve().parents[2]


def rules(text: str) -> list[str]:
    """The lines sudo acts on (comments and blank lines dropped)."""
    return [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_the_agent_runs_exactly_this_argv() -> None:
    assert sampler_argv(1000) == [
        "/usr/bin/sudo",
        "-n",
        "/usr/bin/powermetrics",
        "--samplers",
        "cpu_power,gpu_power",
        "-i",
        "1000",
        "-n",
        "3600",
    ]
    assert sampler_argv(250)[2:] == powermetrics_argv(250)
    assert SAMPLES_PER_RUN == 3600  # an hour of samples at the default interval


def test_the_sample_count_is_pinned_and_bounded() -> None:
    """`-n` bounds every run (the agent may not be able to signal it), so it is always present,
    one exact number, and never 0 (which powermetrics reads as "forever")."""
    assert sampler_argv(1000, 3)[-2:] == ["-n", "3"]
    assert legacy_powermetrics_argv(1000) == powermetrics_argv(1000)[:-2] == [
        "/usr/bin/powermetrics", "--samplers", "cpu_power,gpu_power", "-i", "1000"
    ]
    for bad in (0, -1, 1_000_001, 3.0, "3600", True, None):
        with pytest.raises(SudoersError):
            sampler_argv(1000, bad)  # type: ignore[arg-type]
        with pytest.raises(SudoersError):
            render_sudoers("alice", 1000, bad, version=__version__)  # type: ignore[arg-type]


@pytest.mark.parametrize("user", ["alice", "bob.smith", "ci_runner-2", "_metalagent", "a", "x" * 64, "Alice", "u1"])
@pytest.mark.parametrize("interval_ms", [100, 1000, 1500, 60_000])
def test_good_users_and_intervals_render_one_pinned_rule(user: str, interval_ms: int) -> None:
    text = render_sudoers(user, interval_ms, version=__version__)

    assert rules(text) == [
        f"Cmnd_Alias LLMKUBE_POWERMETRICS = /usr/bin/powermetrics --samplers cpu_power\\,gpu_power -i {interval_ms} -n 3600",
        f"{user} ALL = (root) NOPASSWD: LLMKUBE_POWERMETRICS",
    ]
    assert not any("*" in line or "?" in line or "[" in line for line in rules(text))
    assert "pinned" in text and "--output-file" in text and "(-n)" in text  # the comment says why


@pytest.mark.parametrize(
    "user",
    [
        "",
        "root",
        "-alice",
        "--output-file",
        "alice bob",
        "alice,bob",
        "alice:x",
        "alice=1",
        "al*ce",
        "alice\n",
        "alice\nALL ALL=(ALL) NOPASSWD: ALL",
        "#0",
        "%admin",
        "+netgroup",
        "ali\\ce",
        "ALL",
        "ADMINS",
        "x" * 65,
        "élodie",
        "alice!",
    ],
)
def test_bad_users_are_refused(user: str) -> None:
    with pytest.raises(SudoersError):
        render_sudoers(user, 1000, version=__version__)
    with pytest.raises(SudoersError):
        validate_user(user)


@pytest.mark.parametrize("interval_ms", [0, -1000, 99, 60_001, 10**9, 1000.0, "1000", True, None])
def test_bad_intervals_are_refused(interval_ms: object) -> None:
    with pytest.raises(SudoersError):
        render_sudoers("alice", interval_ms, version=__version__)  # type: ignore[arg-type]
    with pytest.raises(SudoersError):
        sampler_argv(interval_ms)  # type: ignore[arg-type]


def test_the_grant_names_the_same_command_the_sampler_runs() -> None:
    # One source of truth: un-escaping the rendered command gives the argv.
    for samples in (SAMPLES_PER_RUN, 3):
        (alias, _) = rules(render_sudoers("alice", 750, samples, version=__version__))
        command = alias.split(" = ", 1)[1].replace("\\,", ",")
        assert command.split(" ") == sampler_argv(750, samples)[2:]


@pytest.mark.skipif(shutil.which("visudo") is None and not Path("/usr/sbin/visudo").exists(), reason="visudo not installed")
@pytest.mark.parametrize("user", ["alice", "bob.smith", "ci_runner-2", "_metalagent", "Alice"])
def test_visudo_accepts_the_rendered_fragment(tmp_path: Path, user: str) -> None:
    fragment = tmp_path / "llmkube-powermetrics"
    fragment.write_text(render_sudoers(user, 1000, version=__version__))
    visudo = shutil.which("visudo") or "/usr/sbin/visudo"
    result = subprocess.run([visudo, "-cf", str(fragment)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_in_the_repo_is_current() -> None:
    # sudoers/ holds a rendered example for readers; the text lives in the module.
    example = REPO / "sudoers" / "llmkube-powermetrics.example"
    assert example.read_text() == render_sudoers("alice", 1000, version=__version__), (
        "regenerate: metal-agent render-sudoers --user alice > sudoers/llmkube-powermetrics.example"
    )

"""The LaunchAgent plist: rendered by `metal_agent.core.launchd`, parsed back with plistlib."""

from __future__ import annotations

import plistlib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from metal_agent.cli.main import app
from metal_agent.core.launchd import LABEL, LaunchAgentSettings, LaunchdConfigError, program_arguments, render_plist

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "launchd" / "com.llmkube.metal-agent.plist.example"
HOME = "/Users/you"
SUPPORT = f"{HOME}/Library/Application Support/metal-agent"
LOGS = f"{HOME}/Library/Logs/metal-agent"
AGENT = f"{SUPPORT}/venv/bin/metal-agent"


def settings(**kw) -> LaunchAgentSettings:
    return LaunchAgentSettings(**{"agent_path": AGENT, "log_dir": LOGS, "state_dir": SUPPORT, **kw})


def parsed(s: LaunchAgentSettings) -> dict:
    return plistlib.loads(render_plist(s))


def test_job_keys():
    job = parsed(settings())
    assert job["Label"] == LABEL == "com.llmkube.metal-agent"
    assert job["RunAtLoad"] is True
    assert job["KeepAlive"] == {"SuccessfulExit": False}  # restart only after a failure
    assert job["ThrottleInterval"] == 30
    assert job["AbandonProcessGroup"] is True  # llama-servers survive an agent restart
    assert job["ProcessType"] == "Interactive"
    assert job["WorkingDirectory"] == SUPPORT
    assert job["StandardOutPath"] == job["StandardErrorPath"] == f"{LOGS}/agent.log"
    assert job["EnvironmentVariables"] == {
        "PATH": "/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "METAL_AGENT_LOG_FORMAT": "json",
    }


def test_program_arguments_minimal():
    assert parsed(settings())["ProgramArguments"] == [AGENT, "run", "--log-dir", LOGS, "--state-dir", SUPPORT]


def test_program_arguments_all_flags_in_order():
    job = parsed(settings(kubeconfig=f"{HOME}/.kube/mac.yaml", namespaces=("llm", "team-a"),
                          llama_server="/opt/homebrew/bin/llama-server", extra_args=("--threads", "8", "--no-mlock")))
    assert job["ProgramArguments"] == [
        AGENT, "run", "--log-dir", LOGS, "--state-dir", SUPPORT,
        "--kubeconfig", f"{HOME}/.kube/mac.yaml",
        "--namespace", "llm", "--namespace", "team-a",
        "--llama-server", "/opt/homebrew/bin/llama-server",
        "--threads", "8", "--no-mlock",
    ]  # fmt: skip


def test_program_arguments_are_accepted_by_run():
    """The flags the plist passes exist on `metal-agent run` (parsed, not run)."""
    argv = program_arguments(settings(kubeconfig="/k", namespaces=("a",), llama_server="/l", extra_args=("--threads", "8")))
    run = typer.main.get_command(app).commands["run"]
    ctx = run.make_context("run", argv[2:])
    assert ctx.params["state_dir"] == Path(SUPPORT) and ctx.params["threads"] == 8


def test_markup_characters_in_paths_round_trip():
    odd = "/Users/a&b <c>/Library/Logs/metal-agent"
    job = parsed(settings(log_dir=odd))
    assert job["StandardOutPath"] == f"{odd}/agent.log"
    assert job["ProgramArguments"][3] == odd


@pytest.mark.parametrize("kw", [
    {"agent_path": "venv/bin/metal-agent"},
    {"log_dir": "~/Library/Logs/metal-agent"},
    {"kubeconfig": "kube.yaml"},
    {"namespaces": ("Bad_NS",)},
    {"namespaces": ("a,b",)},
    {"extra_args": ("a\0b",)},
])  # fmt: skip
def test_rejects_what_launchd_would_misread(kw):
    with pytest.raises(LaunchdConfigError):
        settings(**kw)


def test_example_is_in_sync():
    """Regenerate with:
    metal-agent render-plist --agent-path "/Users/you/Library/Application Support/metal-agent/venv/bin/metal-agent" \
      --log-dir /Users/you/Library/Logs/metal-agent --state-dir "/Users/you/Library/Application Support/metal-agent" \
      --kubeconfig /Users/you/.kube/config --output launchd/com.llmkube.metal-agent.plist.example
    """
    assert EXAMPLE.read_bytes() == render_plist(settings(kubeconfig=f"{HOME}/.kube/config"))


def test_render_plist_command(tmp_path: Path):
    out = tmp_path / "LaunchAgents" / "job.plist"
    result = CliRunner().invoke(app, [
        "render-plist", "--agent-path", AGENT, "--log-dir", LOGS, "--state-dir", SUPPORT,
        "-n", "llm", "--namespace", "ops", "--kubeconfig", "~/.kube/config",
        "--extra-arg", "--threads", "--extra-arg=8", "--output", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    job = plistlib.loads(out.read_bytes())
    assert out.stat().st_mode & 0o777 == 0o644
    assert job["ProgramArguments"][6:] == [
        "--kubeconfig", str(Path.home() / ".kube" / "config"),  # expanded: launchd would not
        "--namespace", "llm", "--namespace", "ops", "--threads", "8",
    ]  # fmt: skip


def test_render_plist_to_stdout_defaults_to_macos_dirs():
    result = CliRunner().invoke(app, ["render-plist", "--agent-path", "/opt/metal-agent"])
    assert result.exit_code == 0, result.output
    job = plistlib.loads(result.stdout_bytes)
    assert job["WorkingDirectory"] == str(Path.home() / "Library" / "Application Support" / "metal-agent")
    assert job["StandardOutPath"] == str(Path.home() / "Library" / "Logs" / "metal-agent" / "agent.log")


def test_render_plist_rejects_bad_namespace():
    result = CliRunner().invoke(app, ["render-plist", "--agent-path", "/opt/metal-agent", "-n", "../x"])
    assert result.exit_code == 2
    assert "not a valid namespace" in result.stderr


# --- daemon mode: a LaunchDaemon in the system domain, run as the installing user ---------

from metal_agent.core.launchd import Mode, plist_path, service_target  # noqa: E402

DAEMON_EXAMPLE = REPO / "launchd" / "com.llmkube.metal-agent.daemon.plist.example"


def daemon(**kw) -> LaunchAgentSettings:
    return settings(**{"mode": Mode.DAEMON, "user_name": "you", "home": HOME, **kw})


def test_daemon_runs_as_the_user_with_their_home():
    """UserName keeps the agent (and every llama-server) off root; HOME puts every ~ default in that user's home."""
    job = parsed(daemon())
    assert job["UserName"] == "you"
    assert "GroupName" not in job  # launchd then uses the user's primary group
    assert job["EnvironmentVariables"] == {
        "PATH": "/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "METAL_AGENT_LOG_FORMAT": "json", "HOME": HOME, "USER": "you", "LOGNAME": "you",
    }  # fmt: skip
    # Everything else is the LaunchAgent's job, key for key.
    agent = parsed(settings())
    assert {k: v for k, v in job.items() if k not in ("UserName", "EnvironmentVariables")} == \
        {k: v for k, v in agent.items() if k != "EnvironmentVariables"}
    assert "UserName" not in agent and "HOME" not in agent["EnvironmentVariables"]


@pytest.mark.parametrize("kw,message", [
    ({"user_name": None}, "needs --user-name"),
    ({"user_name": "root"}, "other than root"),
    ({"user_name": ""}, "needs --user-name"),
    ({"home": None}, "needs --home"),
    ({"home": "~"}, "absolute path"),
])  # fmt: skip
def test_daemon_refuses_root_or_missing_user(kw, message):
    with pytest.raises(LaunchdConfigError, match=message):
        daemon(**kw)


def test_user_name_only_in_daemon_mode():
    with pytest.raises(LaunchdConfigError, match="only to daemon mode"):
        settings(user_name="you")


def test_targets_and_paths_per_mode():
    assert service_target(Mode.AGENT, 501) == "gui/501/com.llmkube.metal-agent"
    assert service_target(Mode.DAEMON, 501) == "system/com.llmkube.metal-agent"
    assert plist_path(Mode.AGENT, HOME) == f"{HOME}/Library/LaunchAgents/com.llmkube.metal-agent.plist"
    assert plist_path(Mode.DAEMON, HOME) == "/Library/LaunchDaemons/com.llmkube.metal-agent.plist"


def test_daemon_example_is_in_sync():
    """Regenerate with:
    metal-agent render-plist --mode daemon --user-name you --home /Users/you \
      --agent-path "/Users/you/Library/Application Support/metal-agent/venv/bin/metal-agent" \
      --kubeconfig /Users/you/.kube/config --output launchd/com.llmkube.metal-agent.daemon.plist.example
    """
    assert DAEMON_EXAMPLE.read_bytes() == render_plist(daemon(kubeconfig=f"{HOME}/.kube/config"))


def test_render_plist_daemon_command_derives_dirs_from_home():
    result = CliRunner().invoke(app, ["render-plist", "--agent-path", "/opt/metal-agent", "--mode", "daemon",
                                      "--user-name", "ops", "--home", "/Users/ops"])
    assert result.exit_code == 0, result.output
    job = plistlib.loads(result.stdout_bytes)
    assert job["UserName"] == "ops" and job["EnvironmentVariables"]["HOME"] == "/Users/ops"
    assert job["WorkingDirectory"] == "/Users/ops/Library/Application Support/metal-agent"
    assert job["StandardOutPath"] == "/Users/ops/Library/Logs/metal-agent/agent.log"


def test_render_plist_refuses_daemon_options_for_an_agent():
    result = CliRunner().invoke(app, ["render-plist", "--agent-path", "/opt/metal-agent", "--user-name", "ops"])
    assert result.exit_code == 2 and "only to --mode daemon" in result.stderr


def test_render_plist_daemon_for_root_is_refused():
    result = CliRunner().invoke(app, ["render-plist", "--agent-path", "/opt/metal-agent", "--mode", "daemon",
                                      "--user-name", "root", "--home", "/var/root"])
    assert result.exit_code == 2 and "other than root" in result.stderr

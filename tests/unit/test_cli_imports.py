"""Commands load only what they use: no Kubernetes client outside `run` and `doctor`.

Every `metal-agent` invocation imports the command table (`metal_agent.cli.main`)
and so every command module; importing the Kubernetes client there cost each
`metal-agent --help` one to two and a half seconds and 89 MB. This is checked
by what a fresh interpreter has in `sys.modules` after each step, not by
timing: one
subprocess imports the CLI, asks for every help text, runs each non-cluster
command for real, and reports which heavy modules were loaded by then.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.ports import free_port

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
HEAVY = ("kubernetes_asyncio", "aiohttp", "structlog", "prometheus_client", "psutil", "yaml", "metal_agent.app.manager")

PROBE = """
import json, sys
from typer.testing import CliRunner

heavy, steps = json.loads(sys.argv[1])
loaded = lambda: sorted(m for m in heavy if m in sys.modules)
report = []
import metal_agent.cli.main as cli
report.append(["import", 0, loaded()])
for argv in steps:
    result = CliRunner().invoke(cli.app, argv)
    report.append([" ".join(argv), result.exit_code, loaded()])
import metal_agent.cli.doctor_checks  # the control: the probe does see the client when it is loaded
report.append(["control", 0, loaded()])
print(json.dumps(report))
"""

HELP = [["--help"], ["--version"], ["power", "--help"], ["power", "serve", "--help"]] + [
    [name, "--help"] for name in
    ("run", "doctor", "status", "logs", "render", "render-plist", "render-sudoers", "stop-all", "config-reference")
]  # fmt: skip


#: Non-cluster commands, run for real: (argv, the exit code that shows the command itself ran).
COMMANDS = [
    (["render", "-f", str(FIXTURES / "manifests" / "turboquant.yaml"), "--threads", "2"], 0),
    (["render-sudoers", "--user", "alice"], 0),
    (["power", "parse", str(FIXTURES / "powermetrics" / "synthetic-watts-and-decimals.txt")], 0),
    (["render-plist", "--agent-path", sys.executable], 0),
    (["config-reference"], 0),
    (["status", "--listen", f"127.0.0.1:{free_port()}"], 1),  # nothing listens there: it asked, and says so
    (["logs", "llm/qwen", "--log-dir", "{tmp}"], 1),  # no such log
    (["stop-all", "--state-dir", "{tmp}"], 0),  # no records
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, tuple[int, list[str]]]:
    tmp = str(tmp_path_factory.mktemp("cli-imports"))
    commands = [[arg.replace("{tmp}", tmp) for arg in argv] for argv, _ in COMMANDS]
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([HEAVY, HELP + commands])],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    labels = ["import", *(" ".join(argv) for argv in HELP), *(argv[0] for argv, _ in COMMANDS), "control"]
    rows = json.loads(out)
    assert len(rows) == len(labels)
    return {label: (code, modules) for label, (_, code, modules) in zip(labels, rows)}


def test_importing_the_cli_loads_nothing_heavy(report):
    assert report["import"] == (0, [])


@pytest.mark.parametrize("argv", HELP, ids=" ".join)
def test_help_texts_load_nothing_heavy(report, argv):
    assert report[" ".join(argv)] == (0, [])


@pytest.mark.parametrize("argv,exit_code", COMMANDS, ids=lambda v: v[0] if isinstance(v, list) else str(v))
def test_non_cluster_commands_do_not_load_the_kubernetes_client(report, argv, exit_code):
    code, modules = report[argv[0]]
    assert code == exit_code
    assert "kubernetes_asyncio" not in modules and "metal_agent.app.manager" not in modules


def test_the_probe_sees_the_client_when_it_is_loaded(report):
    assert "kubernetes_asyncio" in report["control"][1]


def test_help_as_a_user_runs_it_imports_nothing_heavy():
    """The real entry point in a real process; `-X importtime` lists every module it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "metal_agent", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout and "doctor" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert {"typer", "metal_agent.cli.main"} <= imported  # the listing is there to check
    assert not imported & set(HEAVY)


def test_power_serve_runs_without_the_kubernetes_client():
    """`metal-agent power serve` is for a Mac with no cluster: building and serving its app
    (sampler, energy, host_info, HTTP) must not even import the client."""
    probe = (
        "import asyncio, json, sys\n"
        "from metal_agent.power_service import build\n"
        "from metal_agent.adapters.http_server import serve\n"
        "async def main():\n"
        "    app, _ = await build(1000)\n"
        "    async with serve(app, '127.0.0.1', 0):\n"
        "        pass\n"
        "asyncio.run(main())\n"
        "print(json.dumps(sorted(m for m in ('kubernetes_asyncio', 'metal_agent.app.manager') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out) == []

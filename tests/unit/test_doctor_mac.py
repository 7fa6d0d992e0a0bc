"""`metal-agent doctor` on a Mac: install mode, Metal as the agent's llama-server sees it, the firewall.

Linux has no launchctl, socketfilterfw or Metal, so each check is pointed at a
stand-in fed with real macOS output from `tests/fixtures/` (each fixture
names its public source); the checks are told they run on "Darwin". Where
the mechanism exists on Linux it is real: the llama-server built for the
tests is run for its own `--list-devices`, and the daemon's user switch
runs a process as a real other user.
"""

from __future__ import annotations

import json
import os
import plistlib
import pwd
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from metal_agent.cli.doctor_base import Status
from metal_agent.cli.doctor_checks import (
    check_firewall,
    check_launchd,
    check_metal_device,
    parse_app_blocked,
    parse_global_state,
    parse_list_devices,
)
from metal_agent.cli.doctor_checks import is_metal_device

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LABEL = "com.llmkube.metal-agent"
UID = os.getuid()


def recorded(relative: str, **fill: str) -> str:
    """A fixture's output without its '#' source comment, with {placeholders} filled in."""
    text = "".join(line for line in (FIXTURES / relative).read_text().splitlines(keepends=True)
                   if not line.startswith("#"))
    for key, value in fill.items():
        text = text.replace("{" + key + "}", value)
    return text


def executable(path: Path, body: str) -> Path:
    path.write_text(body)
    path.chmod(0o755)
    return path


def write_job(path: Path, **keys) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plistlib.dumps({"Label": LABEL, **keys}))
    return path


# --- llama-server --list-devices ------------------------------------------------------------


def test_parse_list_devices_real_outputs():
    assert parse_list_devices(recorded("llama-list-devices/metal-m4-max.txt")) == [
        ("Metal", "Apple M4 Max (98304 MiB, 98303 MiB free)"),
        ("BLAS", "Accelerate (0 MiB, 0 MiB free)"),
    ]
    assert parse_list_devices(recorded("llama-list-devices/rosetta-x86_64-on-m4.txt")) == []
    assert parse_list_devices(recorded("llama-list-devices/cpu-build-11434.txt")) == []


def test_metal_device_names():
    """`Metal` (older builds) and `MTLn` (ggml's current "MTL%d"); never BLAS, CPU or CUDA."""
    assert all(map(is_metal_device, ["Metal", "MTL0", "MTL1"]))
    assert not any(map(is_metal_device, ["BLAS", "CUDA0", "MTL", "MTLX", "Vulkan0", "RPC[10.0.0.1:50052]"]))


LLAMA_STAND_IN = textwrap.dedent(f"""\
    #!{sys.executable}
    # Stand-in llama-server: records how it was run, prints a recorded --list-devices output.
    import json, os, sys
    with open(os.environ.get("STAND_IN_RECORD") or sys.argv[0] + ".json", "w") as f:
        json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "uid": os.getuid(), "env": dict(os.environ)}}, f)
    sys.stdout.write(open(sys.argv[0] + ".out").read())
""")


def llama_stand_in(directory: Path, output: str) -> Path:
    binary = executable(directory / "llama-server", LLAMA_STAND_IN)
    (directory / "llama-server.out").write_text(output)
    return binary


def ran(binary: Path) -> dict:
    return json.loads(Path(str(binary) + ".json").read_text())


async def test_metal_device_run_as_the_launch_agent_runs_it(tmp_path: Path, monkeypatch):
    """The plist's environment (not the shell's, minus LLAMA_ARG_*), its working directory and its binary."""
    home, state = tmp_path / "home", tmp_path / "home" / "state"
    state.mkdir(parents=True)
    binary = llama_stand_in(tmp_path, recorded("llama-list-devices/metal-m4-max.txt"))
    write_job(home / "Library/LaunchAgents" / f"{LABEL}.plist",
              ProgramArguments=["/venv/bin/metal-agent", "run", "--llama-server", str(binary)],
              WorkingDirectory=str(state),
              EnvironmentVariables={"PATH": "/opt/homebrew/bin:/usr/bin:/bin", "LLAMA_ARG_PORT": "1"})
    monkeypatch.setenv("ONLY_IN_MY_SHELL", "1")
    result = await check_metal_device(None, system="Darwin", home=home, daemons_dir=str(tmp_path / "none"))
    assert result.status is Status.OK, result
    assert "sees Metal: Apple M4 Max (98304 MiB, 98303 MiB free)" in result.detail
    assert "as the LaunchAgent runs it" in result.detail
    how = ran(binary)
    assert how["argv"] == ["--list-devices"] and how["cwd"] == str(state)
    assert how["env"]["PATH"] == "/opt/homebrew/bin:/usr/bin:/bin" and how["env"]["HOME"] == str(home)
    assert "ONLY_IN_MY_SHELL" not in how["env"] and "LLAMA_ARG_PORT" not in how["env"]


async def test_metal_device_missing_under_rosetta(tmp_path: Path):
    binary = llama_stand_in(tmp_path, recorded("llama-list-devices/rosetta-x86_64-on-m4.txt"))
    result = await check_metal_device(str(binary), system="Darwin", home=tmp_path, daemons_dir=str(tmp_path))
    assert result.status is Status.FAIL
    assert "lists no Metal device (devices: none" in result.detail and "on the CPU" in result.detail
    assert "Apple Silicon build" in result.fix and "Rosetta" in result.fix


async def test_metal_device_real_cpu_build(tmp_path: Path, llama_server_bin: Path):
    """The real llama-server built for the tests (CPU only) answers --list-devices: no Metal.
    (`llama_server_bin`: a missing build is a failure under METAL_AGENT_REQUIRE_ASSETS.)"""
    real = llama_server_bin
    result = await check_metal_device(str(real), system="Darwin", home=tmp_path, daemons_dir=str(tmp_path))
    assert result.status is Status.FAIL
    assert f"{real} lists no Metal device (devices: none" in result.detail


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the daemon's user needs root")
async def test_metal_device_as_the_daemon_user():
    """As root (sudo metal-agent doctor), it runs llama-server as the LaunchDaemon's UserName, for real."""
    work = Path(tempfile.mkdtemp(prefix="metal-agent-doctor-"))
    try:
        work.chmod(0o755)  # the daemon's user must reach the binary and its working directory
        # A shell stand-in: this test's Python lives where the other user may not look.
        (work / "out.txt").write_text(recorded("llama-list-devices/metal-m4-max.txt"))
        record = work / "uid"
        record.touch()
        record.chmod(0o666)
        binary = executable(work / "llama-server", f"#!/bin/sh\nid -u > {record}\ncat {work}/out.txt\n")
        write_job(work / "LaunchDaemons" / f"{LABEL}.plist", UserName="nobody", WorkingDirectory=str(work),
                  ProgramArguments=["/venv/bin/metal-agent", "run", "--llama-server", str(binary)],
                  EnvironmentVariables={"PATH": "/usr/bin:/bin"})
        result = await check_metal_device(None, system="Darwin", home=work, daemons_dir=str(work / "LaunchDaemons"))
        assert result.status is Status.OK, result
        assert "as the LaunchDaemon runs it (user nobody" in result.detail
        assert record.read_text().strip() == str(pwd.getpwnam("nobody").pw_uid)
    finally:
        shutil.rmtree(work)


async def test_metal_device_skipped_off_mac():
    if sys.platform == "darwin":
        pytest.skip("checks what a non-Mac reports")
    result = await check_metal_device(None)
    assert result.status is Status.SKIP


# --- which mode is installed ------------------------------------------------------------------

LAUNCHCTL_STAND_IN = textwrap.dedent(f"""\
    #!{sys.executable}
    # Stand-in launchctl print: the targets named in $LOADED are loaded.
    import os, sys
    target = sys.argv[2]
    if sys.argv[1] != "print" or target.split("/")[0] not in os.environ.get("LOADED", "").split():
        print('Could not find service "{LABEL}" in domain for port', file=sys.stderr)
        sys.exit(113)
    print(target + " = {{")
    print("\\tstate = running")
    print("\\tpid = 4242")
    print("}}")
""")


@pytest.fixture
def launchctl(tmp_path: Path) -> Path:
    return executable(tmp_path / "launchctl", LAUNCHCTL_STAND_IN)


def homes(tmp_path: Path) -> tuple[Path, Path, Path]:
    home, daemons = tmp_path / "home", tmp_path / "LaunchDaemons"
    return home, daemons, home / "Library/LaunchAgents" / f"{LABEL}.plist"


async def test_launchd_daemon_mode(tmp_path: Path, launchctl: Path, monkeypatch):
    home, daemons, _ = homes(tmp_path)
    write_job(daemons / f"{LABEL}.plist", UserName="you")
    monkeypatch.setenv("LOADED", "system")
    result = await check_launchd("Darwin", str(launchctl), home, str(daemons))
    assert result.status is Status.OK
    assert result.detail.startswith(f"LaunchDaemon system/{LABEL} loaded, runs as you from boot")
    assert "state running" in result.detail


async def test_launchd_agent_mode_says_it_needs_a_gui_login(tmp_path: Path, launchctl: Path, monkeypatch):
    home, daemons, agent = homes(tmp_path)
    write_job(agent)
    monkeypatch.setenv("LOADED", "gui")
    result = await check_launchd("Darwin", str(launchctl), home, str(daemons))
    assert result.status is Status.OK
    assert f"LaunchAgent gui/{UID}/{LABEL} loaded" in result.detail and "MODE=daemon" in result.detail


async def test_launchd_both_modes_loaded_is_a_failure(tmp_path: Path, launchctl: Path, monkeypatch):
    home, daemons, agent = homes(tmp_path)
    write_job(agent)
    write_job(daemons / f"{LABEL}.plist", UserName="you")
    monkeypatch.setenv("LOADED", "gui system")
    result = await check_launchd("Darwin", str(launchctl), home, str(daemons))
    assert result.status is Status.FAIL and "two agents" in result.detail
    assert "make uninstall-metal-agent" in result.fix


async def test_launchd_agent_installed_but_no_gui_session(tmp_path: Path, launchctl: Path, monkeypatch):
    home, daemons, agent = homes(tmp_path)
    write_job(agent)
    monkeypatch.setenv("LOADED", "")
    result = await check_launchd("Darwin", str(launchctl), home, str(daemons))
    assert result.status is Status.FAIL and f"{agent} is installed but gui/{UID}/{LABEL} is not loaded" in result.detail
    assert "log in at this Mac's screen" in result.fix and "MODE=daemon" in result.fix


async def test_launchd_daemon_installed_but_not_loaded(tmp_path: Path, launchctl: Path, monkeypatch):
    home, daemons, _ = homes(tmp_path)
    plist = write_job(daemons / f"{LABEL}.plist", UserName="you")
    monkeypatch.setenv("LOADED", "")
    result = await check_launchd("Darwin", str(launchctl), home, str(daemons))
    assert result.status is Status.FAIL and f"{plist} is installed but system/{LABEL} is not loaded" in result.detail
    assert f"sudo launchctl bootstrap system {plist}" in result.fix


# --- the Application Firewall -------------------------------------------------------------------

SOCKETFILTERFW_STAND_IN = textwrap.dedent(f"""\
    #!{sys.executable}
    # Stand-in socketfilterfw: answers each option with a recorded output file; logs its argv.
    import json, os, sys
    with open(os.environ["FW_CALLS"], "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    answer = {{"--getglobalstate": os.environ["FW_GLOBAL"], "--getappblocked": os.environ.get("FW_APP", "")}}
    path = answer.get(sys.argv[1])
    if not path:
        sys.exit(2)
    text = "".join(l for l in open(path) if not l.startswith("#"))
    sys.stdout.write(text.replace("{{path}}", sys.argv[2] if len(sys.argv) > 2 else ""))
""")


@pytest.fixture
def firewall(tmp_path: Path, monkeypatch):
    """(socketfilterfw stand-in, llama-server as Homebrew links it, the real binary, calls file)."""
    cellar = tmp_path / "Cellar" / "llama.cpp" / "11434" / "bin"
    cellar.mkdir(parents=True)
    real = executable(cellar / "llama-server", "#!/bin/sh\n")
    linked = tmp_path / "bin" / "llama-server"
    linked.parent.mkdir()
    linked.symlink_to(real)
    calls = tmp_path / "fw.calls"
    monkeypatch.setenv("FW_CALLS", str(calls))
    tool = executable(tmp_path / "socketfilterfw", SOCKETFILTERFW_STAND_IN)
    return tool, linked, real, calls


def use(monkeypatch, state: str, app: str | None = None) -> None:
    monkeypatch.setenv("FW_GLOBAL", str(FIXTURES / "socketfilterfw" / state))
    if app:
        monkeypatch.setenv("FW_APP", str(FIXTURES / "socketfilterfw" / app))


def test_parse_firewall_outputs():
    assert parse_global_state(recorded("socketfilterfw/globalstate-on.txt")) == 1
    assert parse_global_state(recorded("socketfilterfw/globalstate-off.txt")) == 0
    assert parse_global_state(recorded("socketfilterfw/globalstate-block-all.txt")) == 2
    assert parse_global_state("Firewall status unknown") is None
    assert parse_app_blocked(recorded("socketfilterfw/appblocked-not-in-firewall.txt")) == "unlisted"
    assert parse_app_blocked(recorded("socketfilterfw/appblocked-permitted.txt", path="/x")) == "permitted"
    assert parse_app_blocked(recorded("socketfilterfw/appblocked-blocked.txt", path="/x")) == "blocked"
    # --unblockapp's real answer means the same as "permitted".
    assert parse_app_blocked(recorded("socketfilterfw/unblockapp.txt")) == "permitted"
    assert parse_app_blocked("") is None


async def test_firewall_off(firewall, monkeypatch, tmp_path: Path):
    tool, linked, _, calls = firewall
    use(monkeypatch, "globalstate-off.txt")
    result = await check_firewall(str(linked), "Darwin", str(tool), tmp_path, str(tmp_path))
    assert result.status is Status.OK and "off" in result.detail
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [["--getglobalstate"]]


async def test_firewall_blocks_llama_server_after_an_upgrade(firewall, monkeypatch, tmp_path: Path):
    """Asked about the real Cellar binary (what the firewall approves), and the fix names it."""
    tool, linked, real, calls = firewall
    use(monkeypatch, "globalstate-on.txt", "appblocked-blocked.txt")
    result = await check_firewall(str(linked), "Darwin", str(tool), tmp_path, str(tmp_path))
    assert result.status is Status.FAIL and f"blocking {real}" in result.detail
    assert f"sudo {tool} --add {real} && sudo {tool} --unblockapp {real}" in result.fix
    assert "brew upgrade" in result.fix
    assert json.loads(calls.read_text().splitlines()[-1]) == ["--getappblocked", str(real)]


async def test_firewall_unlisted_binary_fails(firewall, monkeypatch, tmp_path: Path):
    tool, linked, real, _ = firewall
    use(monkeypatch, "globalstate-on.txt", "appblocked-not-in-firewall.txt")
    result = await check_firewall(str(linked), "Darwin", str(tool), tmp_path, str(tmp_path))
    assert result.status is Status.FAIL and f"{real} is not in its list" in result.detail
    assert "--unblockapp" in result.fix


async def test_firewall_permits_llama_server(firewall, monkeypatch, tmp_path: Path):
    tool, linked, real, _ = firewall
    use(monkeypatch, "globalstate-on.txt", "appblocked-permitted.txt")
    result = await check_firewall(str(linked), "Darwin", str(tool), tmp_path, str(tmp_path))
    assert result.status is Status.OK and f"{real} may accept incoming connections" in result.detail


async def test_firewall_blocking_everything(firewall, monkeypatch, tmp_path: Path):
    tool, linked, _, _ = firewall
    use(monkeypatch, "globalstate-block-all.txt")
    result = await check_firewall(str(linked), "Darwin", str(tool), tmp_path, str(tmp_path))
    assert result.status is Status.FAIL and "State = 2" in result.detail
    assert "--setblockall off" in result.fix


async def test_firewall_check_skips_without_socketfilterfw(tmp_path: Path):
    result = await check_firewall("/x", "Darwin", str(tmp_path / "missing"), tmp_path, str(tmp_path))
    assert result.status is Status.SKIP

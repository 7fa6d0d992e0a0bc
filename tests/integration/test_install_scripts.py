"""scripts/install-metal-agent.sh and uninstall-metal-agent.sh, run for real in prefix mode.

`METAL_AGENT_INSTALL_ROOT` puts every path under a temporary directory and
`LAUNCHCTL` points at `STAND_IN_LAUNCHCTL`, written below. `METAL_AGENT_VENV`
points the install at this checkout's venv, so no venv is built and no
package downloaded; everything else (argument handling, rendering the plist
through `metal-agent render-plist`, the launchctl sequence, stop-all) is the
real code.
"""

from __future__ import annotations

import json
import os
import plistlib
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from metal_agent.adapters.process.records import ProcessRecord, RecordStore, argv_digest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install-metal-agent.sh"
UNINSTALL = REPO / "scripts" / "uninstall-metal-agent.sh"
LABEL = "com.llmkube.metal-agent"
UID = os.getuid()
SERVICE = f"gui/{UID}/{LABEL}"

STAND_IN_LAUNCHCTL = textwrap.dedent(f'''\
    #!{sys.executable}
    """A stand-in for macOS's launchctl, which cannot exist on Linux.

    It appends its argv to $LAUNCHCTL_CALLS (one JSON list per line) and keeps
    the one thing the scripts depend on, whether the job is loaded, in a
    marker file, answering like launchctl does: `print` exits 113 when the
    job is not loaded, `bootstrap` of a loaded job fails with 5, `bootout` of
    a job that is not loaded fails with 3. `bootstrap` also parses the plist,
    as launchd would.
    """
    import json, os, plistlib, sys
    from pathlib import Path

    args = sys.argv[1:]
    with open(os.environ["LAUNCHCTL_CALLS"], "a") as log:
        log.write(json.dumps(args) + "\\n")
    loaded = Path(os.environ["LAUNCHCTL_CALLS"] + ".loaded")
    service = "gui/{UID}/{LABEL}"
    if args == ["print", service]:
        if not loaded.exists():
            print("Could not find service \\"{LABEL}\\" in domain for port", file=sys.stderr)
            sys.exit(113)
        print(service + " = {{\\n\\tstate = running\\n}}")
    elif args[:2] == ["bootstrap", "gui/{UID}"] and len(args) == 3:
        job = plistlib.loads(Path(args[2]).read_bytes())
        assert job["Label"] == "{LABEL}"
        if loaded.exists():
            print("Bootstrap failed: 5: Input/output error", file=sys.stderr)
            sys.exit(5)
        loaded.write_text(args[2])
    elif args == ["bootout", service]:
        if not loaded.exists():
            print("Boot-out failed: 3: No such process", file=sys.stderr)
            sys.exit(3)
        loaded.unlink()
    elif args == ["kickstart", "-k", service]:
        if not loaded.exists():
            sys.exit(113)
    else:
        print("stand-in launchctl: unexpected call", args, file=sys.stderr)
        sys.exit(64)
''')


class Mac:
    """A prefix-mode "home": the root the scripts install into, and the launchctl calls they made."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        self.root.mkdir()
        self.real_home = tmp_path / "home"  # HOME for the scripts: must stay untouched
        self.real_home.mkdir()
        self.calls_file = tmp_path / "launchctl.calls"
        self.launchctl = tmp_path / "launchctl"
        self.launchctl.write_text(STAND_IN_LAUNCHCTL)
        self.launchctl.chmod(0o755)
        self.plist = self.root / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        self.state = self.root / "Library" / "Application Support" / "metal-agent"
        self.logs = self.root / "Library" / "Logs" / "metal-agent"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"], "HOME": str(self.real_home), "LAUNCHCTL_CALLS": str(self.calls_file),
            "METAL_AGENT_INSTALL_ROOT": str(self.root), "LAUNCHCTL": str(self.launchctl),
            "METAL_AGENT_VENV": sys.prefix, **extra,
        }  # fmt: skip

    def run(self, script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(script), *args], env=self.env() if env is None else env,
                              capture_output=True, text=True, timeout=120, check=False)

    def calls(self) -> list[list[str]]:
        """The launchctl calls made since the last time this was asked."""
        if not self.calls_file.exists():
            return []
        lines = self.calls_file.read_text().splitlines()
        self.calls_file.write_text("")
        return [json.loads(line) for line in lines]

    def job(self) -> dict:
        return plistlib.loads(self.plist.read_bytes())


@pytest.fixture
def mac(tmp_path: Path) -> Mac:
    return Mac(tmp_path)


BOOTSTRAP = ["bootstrap", f"gui/{UID}"]
KICKSTART = ["kickstart", "-k", SERVICE]


def test_install_reinstall_uninstall(mac: Mac):
    agent = f"{sys.prefix}/bin/metal-agent"
    result = mac.run(INSTALL, "--", "--threads", "8")
    assert result.returncode == 0, result.stderr
    assert mac.calls() == [["print", SERVICE], [*BOOTSTRAP, str(mac.plist)], KICKSTART]
    job = mac.job()
    assert job["Label"] == LABEL
    assert job["ProgramArguments"] == [agent, "run", "--log-dir", str(mac.logs), "--state-dir", str(mac.state),
                                       "--threads", "8"]
    assert job["StandardOutPath"] == str(mac.logs / "agent.log")
    assert job["WorkingDirectory"] == str(mac.state)
    assert mac.logs.is_dir() and mac.state.is_dir()
    assert oct(mac.plist.stat().st_mode & 0o777) == oct(0o644)
    assert f"{agent} status" in result.stdout and f'tail -f "{mac.logs}/agent.log"' in result.stdout
    assert [p.name for p in mac.plist.parent.iterdir()] == [mac.plist.name]  # no staging file left

    # Same settings again: launchd already has this definition, so only a restart.
    result = mac.run(INSTALL, "--", "--threads", "8")
    assert result.returncode == 0, result.stderr
    assert mac.calls() == [["print", SERVICE], KICKSTART]

    # Changed settings: the loaded definition is stale; unload and load the new one.
    result = mac.run(INSTALL, env=mac.env(METAL_AGENT_NAMESPACES="llm,team-a", METAL_AGENT_KUBECONFIG="/k/config"))
    assert result.returncode == 0, result.stderr
    assert mac.calls() == [["print", SERVICE], ["bootout", SERVICE], [*BOOTSTRAP, str(mac.plist)], KICKSTART]
    assert mac.job()["ProgramArguments"][6:] == ["--kubeconfig", "/k/config", "--namespace", "llm",
                                                 "--namespace", "team-a"]

    result = mac.run(UNINSTALL)
    assert result.returncode == 0, result.stderr
    assert mac.calls() == [["bootout", SERVICE]]
    assert not mac.plist.exists()
    assert Path(agent).exists()  # a venv the install was given is never removed
    assert mac.state.is_dir() and mac.logs.is_dir()  # records and logs stay for a later install

    result = mac.run(UNINSTALL)  # not loaded any more: fine
    assert result.returncode == 0, result.stderr
    assert mac.calls() == [["bootout", SERVICE], ["print", SERVICE]]
    assert "was not loaded" in result.stdout
    assert list(mac.real_home.iterdir()) == []  # prefix mode touched nothing outside the root


def test_uninstall_removes_the_installers_own_venv(mac: Mac):
    own = mac.state / "venv"
    (own / "bin").mkdir(parents=True)
    (own / "pyvenv.cfg").write_text("home = /usr/bin\n")
    not_a_venv = mac.state / "processes"
    not_a_venv.mkdir()
    result = mac.run(UNINSTALL)
    assert result.returncode == 0, result.stderr
    assert not own.exists() and not_a_venv.is_dir()


@pytest.mark.parametrize("script", [INSTALL, UNINSTALL])
@pytest.mark.parametrize("drop", ["METAL_AGENT_INSTALL_ROOT", "LAUNCHCTL"])
def test_refuses_off_macos_without_prefix_mode(mac: Mac, script: Path, drop: str):
    if os.uname().sysname == "Darwin":
        pytest.skip("macOS is allowed without prefix mode")
    env = mac.env()
    del env[drop]
    result = mac.run(script, env=env)
    assert result.returncode == 1
    assert "macOS LaunchAgent" in result.stderr and "METAL_AGENT_INSTALL_ROOT" in result.stderr
    assert mac.calls() == [] and not mac.plist.exists()


def test_rejects_stray_arguments(mac: Mac):
    result = mac.run(INSTALL, "--threads", "8")
    assert result.returncode == 2 and "after --" in result.stderr
    assert mac.calls() == []


def _sleeper() -> subprocess.Popen:
    """A stand-in llama-server: a process in its own session, as the agent starts them."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)


def _record(key: str, proc: subprocess.Popen, *, create_time: float | None = None) -> ProcessRecord:
    ps = psutil.Process(proc.pid)
    return ProcessRecord(key=key, uid="u-" + key, pid=proc.pid, create_time=create_time or ps.create_time(),
                         spec_hash="h", port=40000, host="127.0.0.1", argv_digest=argv_digest(ps.cmdline()))


def test_uninstall_stop_models_stops_only_verified_processes(mac: Mac):
    store = RecordStore(mac.state / "processes")
    ours, stranger = _sleeper(), _sleeper()
    try:
        store.save(_record("llm/qwen", ours))
        # Same pid as a running process, but another start time: a reused pid. Never signal it.
        store.save(_record("llm/reused", stranger, create_time=psutil.Process(stranger.pid).create_time() - 100))
        result = mac.run(UNINSTALL, env=mac.env(STOP_MODELS="1"))
        assert result.returncode == 0, result.stderr
        assert mac.calls() == [["bootout", SERVICE], ["print", SERVICE]]
        assert f"llm/qwen: stopped pid {ours.pid}" in result.stdout
        assert f"llm/reused: pid {stranger.pid} is not running (or is no longer that process)" in result.stdout
        assert ours.wait(timeout=30) == -signal.SIGTERM
        assert stranger.poll() is None
        assert store.load_all() == []
    finally:
        for proc in (ours, stranger):
            proc.kill()
            proc.wait(timeout=30)


def test_stop_models_needs_the_agent(mac: Mac):
    result = mac.run(UNINSTALL, env=mac.env(STOP_MODELS="1", METAL_AGENT_VENV=str(mac.root / "no-venv")))
    assert result.returncode == 1 and "nothing was changed" in result.stderr
    assert mac.calls() == []

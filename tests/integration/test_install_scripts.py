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

FIXTURES = REPO / "tests" / "fixtures"


def fixture_text(relative: str) -> str:
    """A fixture's recorded output, without its leading '#' source comment."""
    lines = (FIXTURES / relative).read_text().splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith("#"))


# Real launchctl output for a LaunchAgent bootstrapped with no GUI session (SSH):
# see tests/fixtures/launchctl/README.md for its sources.
NO_GUI_BOOTSTRAP = fixture_text("launchctl/bootstrap-125-no-gui-session.txt").strip()

STAND_IN_LAUNCHCTL = textwrap.dedent(f'''\
    #!{sys.executable}
    """A stand-in for macOS's launchctl, which cannot exist on Linux.

    It appends its argv to $LAUNCHCTL_CALLS (one JSON list per line) and keeps
    the one thing the scripts depend on, whether the job is loaded in a
    domain (gui/UID or system), in a marker file per domain, answering like
    launchctl does: `print` exits 113 when the job is not loaded, `bootstrap`
    of a loaded job fails with 5, `bootout` of a job that is not loaded fails
    with 3. `bootstrap` also parses the plist, as launchd would.

    The system domain changes only for root, which here means "came through
    the stand-in sudo" (it sets SUDO_UID, as sudo does). With
    LAUNCHCTL_NO_GUI=1 there is no GUI login session: gui/UID answers as
    macOS does over SSH, `Bootstrap failed: 125` (recorded text, see
    tests/fixtures/launchctl/).
    """
    import json, os, plistlib, sys
    from pathlib import Path

    args = sys.argv[1:]
    with open(os.environ["LAUNCHCTL_CALLS"], "a") as log:
        log.write(json.dumps(args) + "\\n")
    gui, system = "gui/{UID}", "system"
    markers = {{gui: Path(os.environ["LAUNCHCTL_CALLS"] + ".loaded"),
               system: Path(os.environ["LAUNCHCTL_CALLS"] + ".loaded.system")}}
    no_gui = os.environ.get("LAUNCHCTL_NO_GUI") == "1"
    root = "SUDO_UID" in os.environ

    def split(target):
        domain, _, label = target.rpartition("/")
        if domain not in markers or label != "{LABEL}":
            print("stand-in launchctl: unexpected target", target, file=sys.stderr)
            sys.exit(64)
        return domain

    def needs_root(domain):
        if domain == system and not root:
            print("stand-in launchctl: changing the system domain needs root (sudo)", file=sys.stderr)
            sys.exit(1)

    if len(args) == 2 and args[0] == "print":
        domain = split(args[1])
        if domain == gui and no_gui:
            print("Domain does not support specified action", file=sys.stderr)
            sys.exit(125)
        if not markers[domain].exists():
            print("Could not find service \\"{LABEL}\\" in domain for port", file=sys.stderr)
            sys.exit(113)
        print(args[1] + " = {{\\n\\tstate = running\\n}}")
    elif len(args) == 3 and args[0] == "bootstrap" and args[1] in markers:
        domain = args[1]
        needs_root(domain)
        if domain == gui and no_gui:
            print({NO_GUI_BOOTSTRAP!r}, file=sys.stderr)
            sys.exit(125)
        job = plistlib.loads(Path(args[2]).read_bytes())
        assert job["Label"] == "{LABEL}"
        if markers[domain].exists():
            print("Bootstrap failed: 5: Input/output error", file=sys.stderr)
            sys.exit(5)
        markers[domain].write_text(args[2])
    elif len(args) == 2 and args[0] == "bootout":
        domain = split(args[1])
        needs_root(domain)
        if not markers[domain].exists():
            print("Boot-out failed: 3: No such process", file=sys.stderr)
            sys.exit(3)
        markers[domain].unlink()
    elif len(args) == 3 and args[:2] == ["kickstart", "-k"]:
        domain = split(args[2])
        needs_root(domain)
        if not markers[domain].exists():
            sys.exit(113)
    else:
        print("stand-in launchctl: unexpected call", args, file=sys.stderr)
        sys.exit(64)
''')

STAND_IN_SUDO = textwrap.dedent(f'''\
    #!{sys.executable}
    """A stand-in for sudo: records its argv in $SUDO_CALLS and runs it, marked as root (SUDO_UID)."""
    import json, os, sys

    with open(os.environ["SUDO_CALLS"], "a") as log:
        log.write(json.dumps(sys.argv[1:]) + "\\n")
    os.environ["SUDO_UID"] = str(os.getuid())
    os.execvp(sys.argv[1], sys.argv[1:])
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
        self.sudo_calls_file = tmp_path / "sudo.calls"
        self.sudo = tmp_path / "sudo"
        self.sudo.write_text(STAND_IN_SUDO)
        self.sudo.chmod(0o755)
        self.plist = self.root / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        self.daemon_plist = self.root / "Library" / "LaunchDaemons" / f"{LABEL}.plist"
        self.state = self.root / "Library" / "Application Support" / "metal-agent"
        self.logs = self.root / "Library" / "Logs" / "metal-agent"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"], "HOME": str(self.real_home), "LAUNCHCTL_CALLS": str(self.calls_file),
            "METAL_AGENT_INSTALL_ROOT": str(self.root), "LAUNCHCTL": str(self.launchctl),
            "METAL_AGENT_VENV": sys.prefix, "SUDO": str(self.sudo), "SUDO_CALLS": str(self.sudo_calls_file),
            **extra,
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

    def sudo_calls(self) -> list[list[str]]:
        """The commands run through sudo since the last time this was asked."""
        if not self.sudo_calls_file.exists():
            return []
        lines = self.sudo_calls_file.read_text().splitlines()
        self.sudo_calls_file.write_text("")
        return [json.loads(line) for line in lines]

    def job(self, plist: Path | None = None) -> dict:
        return plistlib.loads((plist or self.plist).read_bytes())


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


# --- daemon mode (MODE=daemon): a LaunchDaemon in the system domain, run as the user ---------

SYSTEM_SERVICE = f"system/{LABEL}"


def test_daemon_install_switch_and_uninstall(mac: Mac):
    """The daemon's root steps go through sudo, it runs as the user, and the two modes never coexist."""
    env = mac.env(METAL_AGENT_USER="you")
    launchctl = str(mac.launchctl)
    result = mac.run(INSTALL, "--mode", "daemon", "--", "--threads", "8", env=env)
    assert result.returncode == 0, result.stderr
    assert mac.calls() == [["print", SERVICE], ["print", SYSTEM_SERVICE],
                           ["bootstrap", "system", str(mac.daemon_plist)], ["kickstart", "-k", SYSTEM_SERVICE]]
    sudo = mac.sudo_calls()
    assert [launchctl, "bootstrap", "system", str(mac.daemon_plist)] in sudo
    assert [launchctl, "kickstart", "-k", SYSTEM_SERVICE] in sudo
    staged = str(mac.daemon_plist.parent / f".{LABEL}.new")
    assert ["chmod", "644", staged] in sudo and ["mv", "-f", staged, str(mac.daemon_plist)] in sudo
    job = mac.job(mac.daemon_plist)
    assert job["UserName"] == "you" and job["EnvironmentVariables"]["HOME"] == str(mac.root)
    assert job["ProgramArguments"][-2:] == ["--threads", "8"]
    assert job["StandardOutPath"] == str(mac.logs / "agent.log")
    assert (mac.logs / "agent.log").exists()  # made by the user before launchd (root) opens it
    assert oct(mac.daemon_plist.stat().st_mode & 0o777) == oct(0o644)
    assert not mac.plist.exists()
    assert [p.name for p in mac.daemon_plist.parent.iterdir()] == [mac.daemon_plist.name]
    assert list(mac.plist.parent.iterdir()) == []  # no staging file left
    assert f"running as {SYSTEM_SERVICE}" in result.stdout and "runs as you" in result.stdout

    # Unchanged: only a restart.
    result = mac.run(INSTALL, "--mode", "daemon", "--", "--threads", "8", env=env)
    assert result.returncode == 0, result.stderr
    assert mac.calls() == [["print", SERVICE], ["print", SYSTEM_SERVICE], ["kickstart", "-k", SYSTEM_SERVICE]]

    # Back to a LaunchAgent: the daemon is unloaded and its plist removed first.
    result = mac.run(INSTALL, env=env)
    assert result.returncode == 0, result.stderr
    assert mac.calls() == [["bootout", SYSTEM_SERVICE], ["print", SERVICE], [*BOOTSTRAP, str(mac.plist)], KICKSTART]
    assert [launchctl, "bootout", SYSTEM_SERVICE] in mac.sudo_calls()
    assert not mac.daemon_plist.exists() and mac.plist.exists()
    assert "switching to agent mode" in result.stdout

    # And to a daemon again: the loaded LaunchAgent goes, and so does its plist (or the
    # next GUI login would start a second agent).
    result = mac.run(INSTALL, "--mode=daemon", env=env)
    assert result.returncode == 0, result.stderr
    assert mac.calls() == [["print", SERVICE], ["bootout", SERVICE], ["print", SYSTEM_SERVICE],
                           ["bootstrap", "system", str(mac.daemon_plist)], ["kickstart", "-k", SYSTEM_SERVICE]]
    assert not mac.plist.exists() and mac.daemon_plist.exists()
    assert "switching to daemon mode" in result.stdout

    result = mac.run(UNINSTALL, env=env)
    assert result.returncode == 0, result.stderr
    assert mac.calls() == [["bootout", SYSTEM_SERVICE], ["bootout", SERVICE], ["print", SERVICE]]
    assert [launchctl, "bootout", SYSTEM_SERVICE] in mac.sudo_calls()
    assert not mac.daemon_plist.exists()
    assert f"unloaded {SYSTEM_SERVICE}" in result.stdout and f"removed {mac.daemon_plist}" in result.stdout
    assert list(mac.real_home.iterdir()) == []


def test_agent_install_over_ssh_explains_daemon_mode(mac: Mac):
    """No GUI session: launchctl's real `Bootstrap failed: 125` ends the install at once with both ways out."""
    no_gui = mac.env(LAUNCHCTL_NO_GUI="1", METAL_AGENT_USER="you")
    result = mac.run(INSTALL, env=no_gui)
    assert result.returncode == 1
    assert NO_GUI_BOOTSTRAP in result.stderr
    assert "make install-metal-agent MODE=daemon" in result.stderr
    assert "log in to this Mac at its screen" in result.stderr
    assert mac.calls() == [["print", SERVICE], [*BOOTSTRAP, str(mac.plist)]]  # one try, not ten

    # The way out it names works without a GUI session, and removes the orphaned LaunchAgent plist.
    result = mac.run(INSTALL, "--mode", "daemon", env=no_gui)
    assert result.returncode == 0, result.stderr
    assert mac.calls() == [["print", SERVICE], ["print", SYSTEM_SERVICE],
                           ["bootstrap", "system", str(mac.daemon_plist)], ["kickstart", "-k", SYSTEM_SERVICE]]
    assert not mac.plist.exists() and mac.job(mac.daemon_plist)["UserName"] == "you"


def test_daemon_mode_never_runs_as_root(mac: Mac):
    result = mac.run(INSTALL, "--mode", "daemon", env=mac.env(METAL_AGENT_USER="root"))
    assert result.returncode == 2 and "other than root" in result.stderr
    assert mac.calls() == [] and not mac.daemon_plist.exists()


def test_rejects_an_unknown_mode(mac: Mac):
    result = mac.run(INSTALL, "--mode", "system")
    assert result.returncode == 2 and "--mode must be agent or daemon" in result.stderr
    assert mac.calls() == []


def test_make_passes_mode(tmp_path: Path):
    """`make install-metal-agent MODE=daemon` reaches the script as --mode daemon (dry run)."""
    out = subprocess.run(["make", "-n", "-C", str(REPO), "install-metal-agent", "MODE=daemon"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert 'scripts/install-metal-agent.sh --mode "daemon"' in out


# -- coming from LLMKube's Go agent ------------------------------------------------------------


def _go_agent_job(mac: Mac, store: Path, namespace: str) -> bytes:
    """LLMKube's published job (vendored tarball), installed and loaded as its users have it."""
    from tests.unit.test_go_flags import _tar_member

    job = plistlib.loads(_tar_member("deployment/macos/com.llmkube.metal-agent.plist").encode())
    args = job["ProgramArguments"]
    args[args.index("--model-store") + 1] = str(store)
    args[args.index("--namespace") + 1] = namespace
    data = plistlib.dumps(job)
    mac.plist.parent.mkdir(parents=True, exist_ok=True)
    mac.plist.write_bytes(data)
    Path(f"{mac.calls_file}.loaded").write_text(str(mac.plist))  # launchd runs it
    return data


async def test_install_migrates_the_go_agent(mac: Mac, tmp_path: Path, control_plane, admin_api, namespace):
    from metal_agent.adapters.model_cache import CachePaths
    from metal_agent.adapters.go_migration import is_temporary
    from tests.support.isvc import Cluster

    url = "https://models.example/org/qwen/resolve/main/qwen-q4.gguf"  # the Go agent fetched it; nobody will again
    await Cluster(admin_api, namespace).create_model("qwen", url)
    store = tmp_path / "llmkube-models"
    (store / "qwen").mkdir(parents=True)
    go_copy = store / "qwen" / "qwen-q4.gguf"
    go_copy.write_bytes(b"GGUF weights")
    go_job = _go_agent_job(mac, store, namespace)
    env = mac.env(METAL_AGENT_KUBECONFIG=str(control_plane.agent_kubeconfig))

    result = mac.run(INSTALL, "--", "--threads", "8", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"found LLMKube's Go agent in {mac.plist}: migrating it" in result.stdout
    # The Go job was loaded: unloaded (which stops the Go agent) only after the models were adopted.
    assert mac.calls() == [["print", SERVICE], ["bootout", SERVICE], [*BOOTSTRAP, str(mac.plist)], KICKSTART]
    models = store if not is_temporary(store) else mac.root / "Library" / "Caches" / "metal-agent" / "models"
    adopted = CachePaths.for_url(models, url, "qwen-q4.gguf").final
    assert os.path.samefile(adopted, go_copy)
    assert f"link     {namespace}/qwen: {go_copy} -> {adopted}" in result.stdout
    agent = f"{sys.prefix}/bin/metal-agent"
    job = mac.job()
    assert job["Label"] == LABEL
    assert job["ProgramArguments"] == [
        agent, "run", "--log-dir", str(mac.logs), "--state-dir", str(mac.state),
        "--kubeconfig", str(control_plane.agent_kubeconfig),  # the install's setting wins over the Go job's
        "--no-power", "--listen=127.0.0.1:9090", "--log-level=info", f"--model-dir={models}", f"--namespace={namespace}",
        "--llama-server=/opt/homebrew/bin/llama-server", "--threads", "8"]
    assert not list(mac.state.glob("migrated-run-args.new"))
    assert (mac.state / "llmkube-go-agent.plist").read_bytes() == go_job
    assert list(mac.real_home.iterdir()) == []

    # Installed again (an upgrade): nothing to migrate, and the migrated flags are kept: only a restart.
    result = mac.run(INSTALL, "--", "--threads", "8", env=env)
    assert result.returncode == 0, result.stderr
    assert "Go agent" not in result.stdout and mac.calls() == [["print", SERVICE], KICKSTART]
    # A setting given to a later install replaces the migrated one instead of adding to it.
    result = mac.run(INSTALL, env=mac.env(METAL_AGENT_NAMESPACES="llm"))
    assert result.returncode == 0, result.stderr
    args = mac.job()["ProgramArguments"]
    assert args[args.index("--namespace") + 1] == "llm" and not [a for a in args if a.startswith("--namespace=")]
    assert f"--model-dir={models}" in args and f"--kubeconfig={control_plane.agent_kubeconfig}" in args


def test_install_changes_nothing_when_the_go_agents_models_cannot_be_matched(mac: Mac, tmp_path: Path):
    store = tmp_path / "llmkube-models"
    (store / "qwen").mkdir(parents=True)
    (store / "qwen" / "qwen-q4.gguf").write_bytes(b"GGUF weights")
    go_job = _go_agent_job(mac, store, "default")
    result = mac.run(INSTALL, env=mac.env(METAL_AGENT_KUBECONFIG=str(tmp_path / "missing.kubeconfig")))
    assert result.returncode == 1
    assert "no kubeconfig at" in result.stderr and "nothing was changed" in result.stderr
    assert mac.plist.read_bytes() == go_job and mac.calls() == []  # the Go agent keeps running as it was
    assert not (mac.root / "Library" / "Caches").exists()

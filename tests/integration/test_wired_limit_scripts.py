"""scripts/install-wired-limit.sh and uninstall-wired-limit.sh, run for real in prefix mode.

`LAUNCH_DAEMONS_DIR` puts the plist under a temporary directory, `LAUNCHCTL`
points at a stand-in that logs its argv and parses what it is asked to
bootstrap (launchd would), and `SYSCTL` at the stand-in of
tests/support/mac_stand_ins.py (sysctl -n with the values a test sets:
macOS's, which cannot exist on Linux). Rendering (`metal-agent
render-wired-limit`), validation and the file handling are the real code.
"""

from __future__ import annotations

import json
import os
import plistlib
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import mac_stand_ins

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install-wired-limit.sh"
UNINSTALL = REPO / "scripts" / "uninstall-wired-limit.sh"
LABEL = "com.llmkube.wired-limit"
RAM_32_GIB = 34359738368

STAND_IN_LAUNCHCTL = textwrap.dedent(f"""\
    #!{sys.executable}
    import json, os, plistlib, sys
    args = sys.argv[1:]
    with open(os.environ["LAUNCHCTL_CALLS"], "a") as log:
        log.write(json.dumps(args) + "\\n")
    if args[:1] == ["bootstrap"]:
        plistlib.loads(open(args[2], "rb").read())  # launchd refuses a plist it cannot parse
    """)


class Box:
    def __init__(self, tmp: Path) -> None:
        self.daemons = tmp / "LaunchDaemons"
        self.calls_file = tmp / "launchctl.calls"
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        launchctl = bin_dir / "launchctl"
        launchctl.write_text(STAND_IN_LAUNCHCTL)
        launchctl.chmod(0o755)
        self.sysctl = mac_stand_ins.sysctl(bin_dir, wired_limit_mb=0, memsize=RAM_32_GIB)
        self.env = {**os.environ, "LAUNCH_DAEMONS_DIR": str(self.daemons), "LAUNCHCTL": str(launchctl),
                    "SYSCTL": str(self.sysctl), "LAUNCHCTL_CALLS": str(self.calls_file),
                    "METAL_AGENT": str(Path(sys.executable).parent / "metal-agent")}
        self.plist = self.daemons / f"{LABEL}.plist"

    def run(self, script: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(script), *args], env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=120)

    def calls(self) -> list[list[str]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]


@pytest.fixture
def box(tmp_path: Path) -> Box:
    if not (Path(sys.executable).parent / "metal-agent").exists():
        pytest.skip("metal-agent is not installed in this venv")
    return Box(tmp_path)


def test_install_renders_one_fixed_sysctl_and_loads_it(box: Box):
    result = box.run(INSTALL, "--limit-mb", "27648")
    assert result.returncode == 0, result.stderr
    job = plistlib.loads(box.plist.read_bytes())
    assert job["Label"] == LABEL and job["RunAtLoad"] is True
    assert job["ProgramArguments"] == ["/usr/sbin/sysctl", "iogpu.wired_limit_mb=27648"]
    assert stat.S_IMODE(box.plist.stat().st_mode) == 0o644
    assert box.calls() == [["bootout", f"system/{LABEL}"], ["bootstrap", "system", str(box.plist)]]
    assert "runs /usr/sbin/sysctl iogpu.wired_limit_mb=27648 at every boot" in result.stdout
    assert not list(box.daemons.glob(".*"))  # nothing staged left behind


def test_reinstall_replaces_the_value(box: Box):
    assert box.run(INSTALL, "--limit-mb", "20000").returncode == 0
    assert box.run(INSTALL, env={"WIRED_LIMIT_MB": "24576"}).returncode == 0
    assert plistlib.loads(box.plist.read_bytes())["ProgramArguments"][1] == "iogpu.wired_limit_mb=24576"


@pytest.mark.parametrize("value, said", [
    ("27648; reboot", "whole number"), ("$(id)", "whole number"), ("-1", "whole number"), ("1e5", "whole number"),
    ("512", "at least 1024"), ("40000", "more than this Mac's RAM"), ("", "give the ceiling"),
])
def test_refuses_anything_but_a_sane_value(box: Box, value: str, said: str):
    result = box.run(INSTALL, "--limit-mb", value)
    assert result.returncode == 2 and said in result.stderr
    assert not box.plist.exists() and box.calls() == []


def test_refuses_a_mac_without_the_sysctl(box: Box):
    mac_stand_ins.sysctl(Path(box.env["SYSCTL"]).parent, wired_limit_mb=None, memsize=RAM_32_GIB)
    result = box.run(INSTALL, "--limit-mb", "27648")
    assert result.returncode == 1 and "no iogpu.wired_limit_mb" in result.stderr and not box.plist.exists()


def test_uninstall_removes_it_and_says_what_stays(box: Box):
    assert box.run(INSTALL, "--limit-mb", "27648").returncode == 0
    (box.daemons / f".{LABEL}.plist.new").write_text("interrupted")
    result = box.run(UNINSTALL)
    assert result.returncode == 0 and "stays until reboot" in result.stdout
    assert list(box.daemons.iterdir()) == []
    assert box.calls()[-1] == ["bootout", f"system/{LABEL}"]
    again = box.run(UNINSTALL)
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_refuses_off_macos_without_prefix_mode(box: Box):
    if sys.platform == "darwin":
        pytest.skip("this is macOS")
    env = {k: v for k, v in box.env.items() if k != "LAUNCH_DAEMONS_DIR"}
    result = subprocess.run([str(INSTALL), "--limit-mb", "27648"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "only on macOS" in result.stderr


def test_make_passes_the_value():
    out = subprocess.run(["make", "-n", "-C", str(REPO), "install-wired-limit", "WIRED_LIMIT_MB=27648"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert 'scripts/install-wired-limit.sh --limit-mb "27648"' in out
    out = subprocess.run(["make", "-n", "-C", str(REPO), "uninstall-wired-limit"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "scripts/uninstall-wired-limit.sh" in out


def test_the_example_plist_is_what_render_prints():
    rendered = subprocess.run([sys.executable, "-m", "metal_agent", "render-wired-limit", "--limit-mb", "27648"],
                              capture_output=True, timeout=60, check=True).stdout
    assert (REPO / "launchd" / f"{LABEL}.plist.example").read_bytes() == rendered

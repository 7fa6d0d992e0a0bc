"""The rendered grant, installed by the real script into the real /etc/sudoers.d,
judged by the real sudo: the agent's exact argv runs without a password and
every variation of it is refused by sudo itself.

Needs root and changes the machine (a throw-away user, the sudoers fragment,
a stand-in /usr/bin/powermetrics), so it runs only as root in CI or with
METAL_AGENT_PRIVILEGED_TESTS=1; everything it adds is removed afterwards.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from metal_agent import __version__
from metal_agent.adapters.powermetrics import check_sudo_grant
from metal_agent.core.sudoers import (
    POWERMETRICS_PATH,
    SUDO_PATH,
    SUDOERS_FRAGMENT_PATH,
    legacy_powermetrics_argv,
    powermetrics_argv,
    render_sudoers,
)
from tests.support.fake_powermetrics import exclusive_stand_in_slot

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
INTERVAL_MS = 1000
ENABLED = hasattr(os, "geteuid") and os.geteuid() == 0 and (
    bool(os.environ.get("CI")) or os.environ.get("METAL_AGENT_PRIVILEGED_TESTS") == "1"
)

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(
        not ENABLED,
        reason="changes users and /etc/sudoers.d: runs only as root with CI or METAL_AGENT_PRIVILEGED_TESTS=1 set",
    ),
]

# The stand-in records, as root, the argv it got (NUL-separated) and its uid.
STAND_IN = """#!/bin/sh
# metal-agent test stand-in for powermetrics (Linux has none). Safe to delete.
id -u > '{record}.uid'
printf '%s\\0' "$@" > '{record}'
"""


@dataclass(frozen=True)
class Grant:
    user: str  # holds the grant
    other_user: str  # holds none
    record: Path  # what the stand-in last recorded
    user_dir: Path  # a directory the granted user owns
    legacy_user: str = ""  # holds the grant an older metal-agent installed (no -n)

    def sudo_as(self, user: str, *sudo_args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``/usr/bin/sudo <args>`` as ``user``, non-interactively, like the agent."""
        for stale in (self.record, self.record.with_name(self.record.name + ".uid")):
            stale.unlink(missing_ok=True)
        return subprocess.run(
            [_tool("runuser"), "-u", user, "--", SUDO_PATH, *sudo_args],
            cwd=cwd or self.user_dir,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def recorded(self) -> list[str] | None:
        if not self.record.exists():
            return None
        return self.record.read_text().split("\0")[:-1]


def _tool(name: str) -> str:
    path = shutil.which(name, path=SYSTEM_PATH)
    if path is None:
        pytest.fail(f"{name} is required for the privileged tests", pytrace=False)
    return path


def _run(*argv: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False, **kwargs)


def _new_user() -> str:
    name = "mapm" + secrets.token_hex(4)
    result = _run(_tool("useradd"), "--no-create-home", "--shell", "/usr/sbin/nologin", name)
    assert result.returncode == 0, result.stderr
    return name


# What metal-agent installed before the sample count was pinned (and what
# LLMKube's own install grants): the same rule without "-n 3600". Its alias
# has another name only so that both fragments can be loaded at once.
LEGACY_FRAGMENT = """\
Cmnd_Alias LLMKUBE_POWERMETRICS_BEFORE_N = /usr/bin/powermetrics --samplers cpu_power\\,gpu_power -i {interval}
{user} ALL = (root) NOPASSWD: LLMKUBE_POWERMETRICS_BEFORE_N
"""


@pytest.fixture(scope="module")
def grant() -> Iterator[Grant]:
    fragment = Path(SUDOERS_FRAGMENT_PATH)
    legacy_fragment = fragment.parent / f"metal-agent-test-legacy-{secrets.token_hex(4)}"
    for tool in ("useradd", "userdel", "runuser", "visudo"):
        _tool(tool)

    with exclusive_stand_in_slot():
        if fragment.exists():
            pytest.skip(f"{fragment} already exists; not overwriting a real grant")
        if Path(POWERMETRICS_PATH).exists():
            pytest.skip(f"{POWERMETRICS_PATH} exists; this test only installs a stand-in where there is none")
        users: list[str] = []
        work = Path(tempfile.mkdtemp(prefix="metal-agent-sudoers-"))
        installed_stand_in = False
        try:
            work.chmod(0o755)
            record = work / "argv"
            users += [_new_user(), _new_user(), _new_user()]
            user_dir = work / "user"
            user_dir.mkdir()
            shutil.chown(user_dir, users[0])

            Path(POWERMETRICS_PATH).write_text(STAND_IN.format(record=record))
            installed_stand_in = True
            Path(POWERMETRICS_PATH).chmod(0o755)

            install = _run(
                str(REPO / "scripts" / "install-powermetrics-sudo.sh"), "--user", users[0], "--interval-ms", str(INTERVAL_MS)
            )
            assert install.returncode == 0, install.stdout + install.stderr
            pinned = " ".join(powermetrics_argv(INTERVAL_MS))
            assert pinned.endswith(" -i 1000 -n 3600")
            assert f"installed {fragment} for {users[0]}: {pinned}\n" in install.stdout, install.stdout
            assert f"{users[0]} may run as root without a password: {pinned}" in install.stdout, install.stdout

            staged_legacy = work / "legacy"
            staged_legacy.write_text(LEGACY_FRAGMENT.format(interval=INTERVAL_MS, user=users[2]))
            checked = _run(_tool("visudo"), "-cf", str(staged_legacy))
            assert checked.returncode == 0, checked.stdout + checked.stderr
            shutil.copyfile(staged_legacy, legacy_fragment)
            legacy_fragment.chmod(0o440)

            yield Grant(users[0], users[1], record, user_dir, legacy_user=users[2])

            uninstall = _run(str(REPO / "scripts" / "uninstall-powermetrics-sudo.sh"))
            assert uninstall.returncode == 0 and not fragment.exists(), uninstall.stdout + uninstall.stderr
            after = Grant(users[0], users[1], record, user_dir).sudo_as(users[0], "-n", *powermetrics_argv(INTERVAL_MS))
            assert after.returncode != 0, "the grant outlived its uninstall"
        finally:
            fragment.unlink(missing_ok=True)
            legacy_fragment.unlink(missing_ok=True)
            Path(fragment.parent / ".llmkube-powermetrics.new").unlink(missing_ok=True)
            if installed_stand_in:
                Path(POWERMETRICS_PATH).unlink(missing_ok=True)
            for user in users:
                _run(_tool("userdel"), user)
            shutil.rmtree(work, ignore_errors=True)


def test_installed_fragment_is_the_rendered_one_with_safe_owner_and_mode(grant: Grant) -> None:
    fragment = Path(SUDOERS_FRAGMENT_PATH)
    info = fragment.stat()

    assert fragment.read_text() == render_sudoers(grant.user, INTERVAL_MS, version=__version__)
    assert stat.S_IMODE(info.st_mode) == 0o440
    assert (info.st_uid, info.st_gid) == (0, 0)


def test_the_agents_exact_argv_runs_as_root_without_a_password(grant: Grant) -> None:
    result = grant.sudo_as(grant.user, "-n", *powermetrics_argv(INTERVAL_MS))

    assert result.returncode == 0, result.stderr
    assert grant.recorded() == powermetrics_argv(INTERVAL_MS)[1:]
    assert grant.record.with_name(grant.record.name + ".uid").read_text().strip() == "0"


PM = POWERMETRICS_PATH
SAMPLERS = ["--samplers", "cpu_power,gpu_power"]
N = ["-n", "3600"]
ATTACKS = {
    "extra --output-file after the sample count": [PM, *SAMPLERS, "-i", "1000", *N, "--output-file", "/etc/passwd"],
    "different interval": [PM, *SAMPLERS, "-i", "500", *N],
    "reordered flags": [PM, "-i", "1000", *SAMPLERS, *N],
    "sample count before the interval": [PM, *SAMPLERS, *N, "-i", "1000"],
    "--samplers all": [PM, "--samplers", "all", "-i", "1000", *N],
    "-o after the sample count": [PM, *SAMPLERS, "-i", "1000", *N, "-o", "x"],
    "interval smuggling arguments in one word": [PM, *SAMPLERS, "-i", "1000 --output-file x", *N],
    "sample count smuggling arguments in one word": [PM, *SAMPLERS, "-i", "1000", "-n", "3600 --output-file x"],
    "interval with a leading zero": [PM, *SAMPLERS, "-i", "01000", *N],
    "trailing empty argument": [PM, *SAMPLERS, "-i", "1000", *N, ""],
    "interval given twice": [PM, *SAMPLERS, "-i", "1000", "-i", "1", *N],
    "without the sample count (the command before -n was pinned)": [PM, *SAMPLERS, "-i", "1000"],
    "sample count 0 (run forever)": [PM, *SAMPLERS, "-i", "1000", "-n", "0"],
    "another sample count": [PM, *SAMPLERS, "-i", "1000", "-n", "36000"],
    "sample count given twice": [PM, *SAMPLERS, "-i", "1000", *N, "-n", "0"],
    "no arguments (bare binary)": [PM],
    "--samplers=value form": [PM, "--samplers=cpu_power,gpu_power", "-i", "1000", *N],
    "glued -i1000": [PM, *SAMPLERS, "-i1000", *N],
    "glued -n3600": [PM, *SAMPLERS, "-i", "1000", "-n3600"],
    "literal backslash-comma": [PM, "--samplers", "cpu_power\\,gpu_power", "-i", "1000", *N],
    "relative path to a user-owned powermetrics": ["./powermetrics", *SAMPLERS, "-i", "1000", *N],
    "setting an environment variable": ["LD_PRELOAD=/tmp/x.so", PM, *SAMPLERS, "-i", "1000", *N],
    "running as another user than root": ["-u", "nobody", PM, *SAMPLERS, "-i", "1000", *N],
    "a shell": ["-s"],
    "sudoedit": ["-e", "/etc/passwd"],
}


@pytest.mark.parametrize("argv", list(ATTACKS.values()), ids=list(ATTACKS))
def test_sudo_refuses_every_variation(grant: Grant, argv: list[str]) -> None:
    own_copy = grant.user_dir / "powermetrics"  # same name, user-controlled content
    own_copy.write_text(f"#!/bin/sh\ntouch '{grant.user_dir}/ran-as-root'\n")
    own_copy.chmod(0o755)
    shutil.chown(own_copy, grant.user)

    result = grant.sudo_as(grant.user, "-n", *argv)

    assert result.returncode != 0, f"sudo allowed {argv!r}"
    assert "sudo:" in result.stderr
    assert grant.recorded() is None, "the stand-in ran"
    assert not (grant.user_dir / "ran-as-root").exists()


def test_a_user_without_the_grant_is_refused(grant: Grant) -> None:
    result = grant.sudo_as(grant.other_user, "-n", *powermetrics_argv(INTERVAL_MS))

    assert result.returncode != 0
    assert grant.recorded() is None


async def test_check_sudo_grant_reports_granted_stale_and_missing(grant: Grant) -> None:
    granted = await check_sudo_grant(INTERVAL_MS, user=grant.user)
    stale = await check_sudo_grant(500, user=grant.user)
    missing = await check_sudo_grant(INTERVAL_MS, user=grant.other_user)

    assert granted.ok and granted.status == "granted" and granted.fix is None
    assert stale.status == "stale" and not stale.ok
    assert "-i 1000 -n 3600" in stale.detail and "-i 500 -n 3600" in stale.detail
    assert "make install-powermetrics-sudo INTERVAL_MS=500" in stale.fix
    assert f"render-sudoers --user {grant.user} --interval-ms 500" in stale.fix
    assert missing.status == "missing" and missing.user == grant.other_user
    assert f"--user {grant.other_user}" in missing.fix


async def test_a_grant_installed_before_the_sample_count_was_pinned_is_reported_as_needing_a_reinstall(
    grant: Grant,
) -> None:
    """After an upgrade the old grant (no `-n`) no longer admits the agent's command; sudo itself
    refuses it, and `metal-agent doctor` (through check_sudo_grant) says to re-run the install."""
    refused = grant.sudo_as(grant.legacy_user, "-n", *powermetrics_argv(INTERVAL_MS))
    old_command_still_runs = grant.sudo_as(grant.legacy_user, "-n", *legacy_powermetrics_argv(INTERVAL_MS))

    assert refused.returncode != 0 and "sudo:" in refused.stderr
    assert old_command_still_runs.returncode == 0, old_command_still_runs.stderr  # premise: the grant is live

    stale = await check_sudo_grant(INTERVAL_MS, user=grant.legacy_user)
    assert stale.status == "stale" and not stale.ok
    assert "/usr/bin/powermetrics --samplers cpu_power,gpu_power -i 1000`" in stale.detail
    assert "older metal-agent" in stale.detail and "-i 1000 -n 3600" in stale.detail
    assert stale.fix.startswith("re-run `make install-powermetrics-sudo INTERVAL_MS=1000`")

    # The current grant is not mistaken for the old one (its command merely starts like it).
    assert (await check_sudo_grant(INTERVAL_MS, user=grant.user)).ok

"""`metal-agent doctor` on the Mac itself: idle sleep, the GPU's wired-memory ceiling, the thermal state.

pmset and sysctl cannot run on Linux: the checks are pointed at stand-ins
(tests/support/mac_stand_ins.py) replaying transcribed macOS output from
tests/fixtures/macos/ (each file names its public source) and told they run
on "Darwin". The agent they ask is a real HTTP server answering what the
agent's /v1/services answers.
"""

from __future__ import annotations

import contextlib

import pytest
from aiohttp import web

from metal_agent.cli.doctor_base import Status
from metal_agent.cli.doctor_mac_host import check_sleep_assertion, check_thermal, check_wired_limit
from tests.support import mac_stand_ins
from tests.support.ports import free_port


@contextlib.asynccontextmanager
async def agent_answering(sleep_assertion: dict):
    async def services(_: web.Request) -> web.Response:
        return web.json_response({"version": "test", "services": [], "mac": {"sleep_assertion": sleep_assertion}})

    app = web.Application()
    app.router.add_get("/v1/services", services)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_held_and_listed_by_macos(tmp_path):
    pmset = mac_stand_ins.pmset(tmp_path, pid=4321)
    async with agent_answering({"mode": "auto", "held": True, "pid": 4321, "problem": None}) as listen:
        result = await check_sleep_assertion(listen, str(pmset), system="Darwin")
    assert result.status is Status.OK
    assert "held by the agent's caffeinate (pid 4321" in result.detail and "is among them" in result.detail


async def test_held_by_the_agent_but_not_listed_fails(tmp_path):
    pmset = mac_stand_ins.pmset(tmp_path, assertions="pmset-assertions-no-caffeinate.txt")
    async with agent_answering({"mode": "always", "held": True, "pid": 4321, "problem": None}) as listen:
        result = await check_sleep_assertion(listen, str(pmset), system="Darwin")
    assert result.status is Status.FAIL
    assert "macOS does not list it" in result.detail and "sharingd (pid 483, 'Handoff')" in result.detail


async def test_not_held_when_nothing_serves(tmp_path):
    pmset = mac_stand_ins.pmset(tmp_path, assertions="pmset-assertions-no-caffeinate.txt")
    async with agent_answering({"mode": "auto", "held": False, "pid": None, "problem": None}) as listen:
        result = await check_sleep_assertion(listen, str(pmset), system="Darwin")
    assert result.status is Status.OK and result.detail.startswith("not held (--prevent-sleep=auto")


async def test_wanted_but_caffeinate_cannot_run_fails(tmp_path):
    pmset = mac_stand_ins.pmset(tmp_path)
    problem = "cannot run /usr/bin/caffeinate: No such file or directory"
    async with agent_answering({"mode": "auto", "held": False, "pid": None, "problem": problem}) as listen:
        result = await check_sleep_assertion(listen, str(pmset), system="Darwin")
    assert result.status is Status.FAIL and problem in result.detail


async def test_no_agent_still_says_what_macos_holds(tmp_path):
    pmset = mac_stand_ins.pmset(tmp_path, assertions="pmset-assertions-no-caffeinate.txt")
    result = await check_sleep_assertion(f"127.0.0.1:{free_port()}", str(pmset), system="Darwin")
    assert result.status is Status.OK and "does not answer" in result.detail
    assert "idle system sleep prevented" in result.detail


async def test_default_ceiling_with_the_command_to_raise_it(tmp_path):
    sysctl = mac_stand_ins.sysctl(tmp_path, wired_limit_mb=0, memsize=34359738368)
    result = await check_wired_limit(str(sysctl), system="Darwin")
    assert result.status is Status.OK
    assert result.detail.startswith("21.33 GiB of 32.00 GiB RAM (iogpu.wired_limit_mb=0, macOS's default")
    assert "`sudo /usr/sbin/sysctl iogpu.wired_limit_mb=27648`" in result.detail
    assert "make install-wired-limit WIRED_LIMIT_MB=27648" in result.detail


async def test_configured_ceiling(tmp_path):
    sysctl = mac_stand_ins.sysctl(tmp_path, wired_limit_mb=30000)
    result = await check_wired_limit(str(sysctl), system="Darwin")
    assert "(iogpu.wired_limit_mb=30000)" in result.detail and "to raise it" not in result.detail


async def test_unreadable_ceiling_is_said(tmp_path):
    sysctl = mac_stand_ins.sysctl(tmp_path, wired_limit_mb=None)
    result = await check_wired_limit(str(sysctl), system="Darwin")
    assert result.status is Status.OK and "not readable" in result.detail


@pytest.mark.parametrize("fixture, said", [
    ("pmset-therm-apple-silicon.txt", "no thermal throttling reported"),
    ("pmset-therm-intel-throttled.txt", "macOS is throttling (CPU speed limited to 35%)"),
])
async def test_thermal(tmp_path, fixture, said):
    pmset = mac_stand_ins.pmset(tmp_path, therm=fixture)
    result = await check_thermal(str(pmset), system="Darwin")
    assert result.status is Status.OK and said in result.detail


async def test_skipped_elsewhere():
    for check in (check_wired_limit(system="Linux"), check_thermal(system="Linux"),
                  check_sleep_assertion("127.0.0.1:1", system="Linux")):
        assert (await check).status is Status.SKIP

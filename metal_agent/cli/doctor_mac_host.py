"""`metal-agent doctor` on the Mac itself (issue 23): idle sleep, the GPU's wired-memory ceiling, heat.

Kept apart from `cli.doctor_checks` (the install and llama-server) because
these read what macOS says now, through fixed unprivileged commands
(`pmset -g assertions`, `pmset -g therm`, `sysctl -n`), and compare it with
what the running agent says it holds. Paths are parameters so tests point
them at stand-ins replaying recorded macOS output.
"""

from __future__ import annotations

from dataclasses import dataclass

from metal_agent.adapters.mac_readings import read_thermal, read_wired_ceiling
from metal_agent.cli.agent_client import fetch_services
from metal_agent.cli.doctor_base import CheckResult, fail, is_mac, not_mac, ok, run_command
from metal_agent.cli.status import AgentUnreachable
from metal_agent.core.memory import gib
from metal_agent.core.sleep_assertion import ASSERTION_TYPE, PMSET, describe_held, parse_assertions
from metal_agent.core.wired_limit import MiB, SYSCTL, raise_command, suggested_limit_mb

__all__ = ["MacCommands", "check_sleep_assertion", "check_thermal", "check_wired_limit", "mac_host_checks"]


@dataclass(frozen=True)
class MacCommands:
    pmset: str = PMSET
    sysctl: str = SYSCTL


async def _agent_sleep(listen: str) -> dict | None:
    try:
        payload = await fetch_services(listen)
    except (AgentUnreachable, ValueError):
        return None
    mac = payload.get("mac")
    return mac.get("sleep_assertion") if isinstance(mac, dict) and isinstance(mac.get("sleep_assertion"), dict) else None


async def check_sleep_assertion(listen: str, pmset: str = PMSET, system: str | None = None) -> CheckResult:
    name = "no idle sleep while serving"
    if not is_mac(system):
        return not_mac(name, system)
    agent = await _agent_sleep(listen)
    try:
        code, out = await run_command((pmset, "-g", "assertions"))
    except (OSError, TimeoutError) as err:
        return fail(name, f"cannot run {pmset} -g assertions: {err}", "run it by hand and see what it says")
    if code != 0:
        return fail(name, f"{pmset} -g assertions exited {code}: {out.strip()[:200]}", "run it by hand")
    if agent is None:
        return ok(name, f"the agent does not answer at {listen} (or is older); macOS: {describe_held(out, None)}")
    pid = agent.get("pid")
    seen = describe_held(out, pid if isinstance(pid, int) else None)
    mode = agent.get("mode")
    if agent.get("held"):
        _, owned = parse_assertions(out)
        if any(a.pid == pid and a.type == ASSERTION_TYPE for a in owned):
            return ok(name, f"held by the agent's caffeinate (pid {pid}, --prevent-sleep={mode}); {seen}")
        return fail(name, f"the agent says it holds the assertion (caffeinate pid {pid}) but macOS does not list "
                    f"it: {seen}", "restart the agent; if it persists, report it with the output of "
                    "`pmset -g assertions`")
    if agent.get("problem"):
        return fail(name, f"wanted but not held: {agent['problem']}", "check that /usr/bin/caffeinate exists and runs")
    return ok(name, f"not held (--prevent-sleep={mode}; nothing that needs it is serving); {seen}")


async def check_wired_limit(sysctl: str = SYSCTL, system: str | None = None) -> CheckResult:
    name = "GPU wired-memory ceiling"
    if not is_mac(system):
        return not_mac(name, system)
    limit = await read_wired_ceiling(sysctl)
    if limit is None:
        return ok(name, "iogpu.wired_limit_mb is not readable on this Mac (Intel or an older macOS): "
                  "admission checks only the memory budget")
    suggested = suggested_limit_mb(limit.ram_bytes)
    detail = f"{gib(limit.bytes)} of {gib(limit.ram_bytes)} RAM ({limit.source}); models' weights and KV cache " \
             "are admitted against it"
    if suggested * MiB > limit.bytes:
        detail += (f"; to raise it to {suggested} MB (RAM less 15 %, at least 4 GiB, for macOS and apps): "
                   f"`{raise_command(suggested)}` until reboot, or "
                   f"`make install-wired-limit WIRED_LIMIT_MB={suggested}` at every boot")
    return ok(name, detail)


async def check_thermal(pmset: str = PMSET, system: str | None = None) -> CheckResult:
    name = "thermal state"
    if not is_mac(system):
        return not_mac(name, system)
    state = await read_thermal((pmset, "-g", "therm"))
    if state is None:
        return ok(name, "pmset -g therm reports nothing this agent can read")
    return ok(name, state.describe())


async def mac_host_checks(listen: str, commands: MacCommands = MacCommands(),
                          system: str | None = None) -> list[CheckResult]:
    return [await check_sleep_assertion(listen, commands.pmset, system),
            await check_wired_limit(commands.sysctl, system),
            await check_thermal(commands.pmset, system)]

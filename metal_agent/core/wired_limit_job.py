"""The opt-in LaunchDaemon that sets the GPU's wired-memory ceiling at every boot.

`sudo sysctl iogpu.wired_limit_mb=N` lasts until the next reboot. Owners who
want it for good install a root LaunchDaemon (`make install-wired-limit
WIRED_LIMIT_MB=N`) whose whole job is one fixed command: `/usr/sbin/sysctl
iogpu.wired_limit_mb=N`, absolute, no shell, N a validated integer written
into the plist when it is rendered. Nothing at run time can change what it
runs; `make uninstall-wired-limit` removes it (the value set stays until
the next boot, or `sudo sysctl iogpu.wired_limit_mb=0`).
"""

from __future__ import annotations

import plistlib

from metal_agent.core.wired_limit import SYSCTL, WIRED_LIMIT_KEY, validate_limit_mb

WIRED_LIMIT_LABEL = "com.llmkube.wired-limit"
WIRED_LIMIT_PLIST = f"/Library/LaunchDaemons/{WIRED_LIMIT_LABEL}.plist"


def job_argv(limit_mb: int) -> list[str]:
    return [SYSCTL, f"{WIRED_LIMIT_KEY}={limit_mb}"]


def render_job(value: str, ram_bytes: int | None = None) -> bytes:
    """The plist for `value` (MB, as given); ValueError for anything but a sane whole number."""
    limit_mb = validate_limit_mb(value, ram_bytes)
    return plistlib.dumps({
        "Label": WIRED_LIMIT_LABEL,
        "ProgramArguments": job_argv(limit_mb),
        "RunAtLoad": True,  # at boot, and once when installed
        "LaunchOnlyOnce": True,  # one run per boot: nothing to keep alive
        "StandardErrorPath": f"/var/log/{WIRED_LIMIT_LABEL}.log",
    })

"""The GPU's wired-memory ceiling (`iogpu.wired_limit_mb`): what it is, and whether a model fits under it.

Unified memory is shared, but Metal may wire (pin for the GPU) only part of
it. A model whose weights and KV cache do not fit under that ceiling still
loads, then runs slowly or fails its allocations, so admission counts the
GPU-resident bytes of every service against it as well as against the
memory budget (`core.admission`).

The ceiling is `sysctl iogpu.wired_limit_mb` when the owner set it; 0 means
"macOS's default", which is not exported as a sysctl. The default this
module assumes is the rule llama.cpp's and MLX's users observe from
`MTLDevice.recommendedMaxWorkingSetSize`: about two thirds of RAM up to
36 GiB, three quarters above (the same split as the agent's default memory
budget, `core.admission.default_memory_fraction`). Newer macOS releases
were reported to allow more on large Macs (107.52 GiB of 128 GiB on macOS
26, antirez/ds4#893), so the assumed default is a lower bound: it can refuse
a model the GPU would have taken, never admit one it would not.

The suggested value leaves 15 % of RAM, and at least 4 GiB, to macOS and
the owner's apps, rounded down to a whole GiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from metal_agent.core.memory import GiB, gib

MiB = 1024**2
SMALL_MAC_RAM_BYTES = 36 * GiB
SMALL_MAC_SHARE = 2 / 3
LARGE_MAC_SHARE = 3 / 4
RESERVE_SHARE = 0.15
MIN_RESERVE_BYTES = 4 * GiB
MIN_LIMIT_MB = 1024  # below this the boot-time setter refuses: a typo, not a ceiling
SYSCTL = "/usr/sbin/sysctl"
WIRED_LIMIT_KEY = "iogpu.wired_limit_mb"
WIRED_LIMIT_EXCEEDED = "InsufficientMemory"  # LLMKube's schedulingStatus for "does not fit"


@dataclass(frozen=True, slots=True)
class WiredCeiling:
    """What the GPU may wire on this Mac, and where the number comes from."""

    bytes: int
    configured_mb: int  # the sysctl's value; 0: macOS's default applies
    ram_bytes: int

    @property
    def source(self) -> str:
        if self.configured_mb:
            return f"{WIRED_LIMIT_KEY}={self.configured_mb}"
        return f"{WIRED_LIMIT_KEY}=0, macOS's default of about {default_share(self.ram_bytes):.0%} of {gib(self.ram_bytes)} RAM"


def default_share(ram_bytes: int) -> float:
    return SMALL_MAC_SHARE if ram_bytes <= SMALL_MAC_RAM_BYTES else LARGE_MAC_SHARE


def parse_sysctl_int(text: str) -> int | None:
    """The value of `sysctl -n KEY` (one non-negative integer), or None for anything else."""
    value = text.strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 20 else None


def ceiling(configured_mb: int, ram_bytes: int) -> WiredCeiling:
    """The ceiling for a sysctl value (0: the default for this RAM); never above RAM."""
    if configured_mb > 0:
        limit = min(configured_mb * MiB, ram_bytes)
    else:
        limit = int(ram_bytes * default_share(ram_bytes))
    return WiredCeiling(limit, configured_mb, ram_bytes)


def suggested_limit_mb(ram_bytes: int) -> int:
    """A value to raise the ceiling to on a Mac with this RAM (whole GiB, in MB)."""
    reserve = max(int(ram_bytes * RESERVE_SHARE), MIN_RESERVE_BYTES)
    return max((ram_bytes - reserve) // GiB, 1) * 1024


def raise_command(limit_mb: int) -> str:
    """The exact command that raises the ceiling until the next boot."""
    return f"sudo {SYSCTL} {WIRED_LIMIT_KEY}={limit_mb}"


def validate_limit_mb(value: str, ram_bytes: int | None = None) -> int:
    """A value the boot-time setter may write: digits only, at least 1 GiB, at most RAM. ValueError otherwise."""
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise ValueError(f"WIRED_LIMIT_MB must be a whole number of MB, got {value!r}")
    mb = int(text)
    if mb < MIN_LIMIT_MB:
        raise ValueError(f"WIRED_LIMIT_MB must be at least {MIN_LIMIT_MB} (MB), got {mb}")
    if ram_bytes is not None and mb * MiB > ram_bytes:
        raise ValueError(f"WIRED_LIMIT_MB={mb} is more than this Mac's RAM ({ram_bytes // MiB} MB)")
    return mb


def check_wired(key: str, needed_bytes: int, running: Mapping[str, int], limit: WiredCeiling | None) -> str | None:
    """Why service `key` needing `needed_bytes` on the GPU does not fit under the ceiling, or None.

    `running` maps the other services' keys to their GPU-resident bytes (`key` is ignored:
    a respawn replaces it). None ceiling (not a Mac, sysctl unreadable): no check.
    """
    if limit is None:
        return None
    committed = sum(v for k, v in running.items() if k != key)
    if needed_bytes + committed <= limit.bytes:
        return None
    already = f"; {gib(committed)} already wired by other services" if committed else ""
    suggested = suggested_limit_mb(limit.ram_bytes)
    hint = (f"; raise it with `{raise_command(suggested)}` (or make install-wired-limit WIRED_LIMIT_MB={suggested})"
            if suggested * MiB > limit.bytes else "")
    return (f"needs {gib(needed_bytes)} of GPU-wired memory{already}; total {gib(needed_bytes + committed)} "
            f"exceeds the GPU's wired-memory ceiling of {gib(limit.bytes)} ({limit.source}){hint}")

"""The one powermetrics command the agent runs as root, and its sudoers grant.

powermetrics needs root; the agent runs as a normal user under launchd and
gets root for exactly one argument vector through a NOPASSWD sudoers rule.
The argv the sampler executes and the rule that permits it are both built
here from the same constants, so they cannot drift apart: if the sampler
ran anything else, sudo would refuse it.

Why the rule pins every argument: powermetrics writes files as root
(``--output-file``), so a grant for the bare binary is a root escalation. And
why no wildcard: in sudoers a ``*`` in the arguments matches any characters,
spaces included, so ``-i [0-9]*`` also admits ``-i 1 --output-file
/etc/sudoers``. The interval is therefore rendered as one exact number, and
changing it means re-rendering the fragment.

Why a pinned sample count (``-n 3600``): sudo may run powermetrics so that
the agent's user cannot signal it (a sudo front-end that made itself full
root, or a command sudo executed in its own place), so the agent never
relies on a signal to end it. It ends a run by closing the output pipe
(powermetrics dies of SIGPIPE at its next write), and ``-n`` bounds the life
of any run regardless, even one whose pipe stayed open: after
:data:`SAMPLES_PER_RUN` samples powermetrics exits by itself and the agent
starts the next run. A grant without ``-n`` (metal-agent before the count
was pinned) no longer matches: re-run ``make install-powermetrics-sudo``.
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_INTERVAL_MS",
    "MIN_INTERVAL_MS",
    "POWERMETRICS_PATH",
    "SAMPLERS",
    "SAMPLES_PER_RUN",
    "SUDOERS_FRAGMENT_PATH",
    "SUDO_PATH",
    "SudoersError",
    "legacy_powermetrics_argv",
    "powermetrics_argv",
    "render_sudoers",
    "sampler_argv",
    "validate_interval_ms",
    "validate_samples",
    "validate_user",
]

SUDO_PATH = "/usr/bin/sudo"
POWERMETRICS_PATH = "/usr/bin/powermetrics"
SAMPLERS = "cpu_power,gpu_power"
SUDOERS_FRAGMENT_PATH = "/etc/sudoers.d/llmkube-powermetrics"

# Below 100 ms powermetrics itself becomes a noticeable load; above a minute
# the gauges are too coarse to attribute energy to requests.
MIN_INTERVAL_MS = 100
MAX_INTERVAL_MS = 60_000

# Samples per powermetrics run (``-n``): an hour at the default 1 s interval.
# Long enough that restarts cost nothing worth measuring (one sudo and one
# powermetrics start per hour), short enough that a run nobody can signal
# still ends on its own.
SAMPLES_PER_RUN = 3600
_MAX_SAMPLES_PER_RUN = 1_000_000

_USER = re.compile(r"[A-Za-z0-9._-]+")
# sudoers reads an all-caps word as an alias name (and ALL as everyone), so a
# user called that would silently grant something else than intended.
_ALIAS_LIKE = re.compile(r"[A-Z][A-Z0-9_]*")
_MAX_USER_LEN = 64
# Characters allowed in a rendered command argument; ',' is escaped below.
# Anything else (globs, '\', ':', '=', '#', spaces) is refused outright.
_ARG_SAFE = re.compile(r"[A-Za-z0-9_./,-]+")


class SudoersError(ValueError):
    """A user name or interval we refuse to render a grant for."""


def validate_user(user: str) -> str:
    """Return ``user`` if it is safe to name in a sudoers rule, else raise."""
    if not user or len(user) > _MAX_USER_LEN or not _USER.fullmatch(user):
        raise SudoersError(
            f"refusing user name {user!r}: use only letters, digits, '.', '_' and '-' "
            f"(at most {_MAX_USER_LEN} characters)"
        )
    if user.startswith("-"):
        raise SudoersError(f"refusing user name {user!r}: it must not start with '-'")
    if user == "root":
        raise SudoersError("refusing user 'root': root needs no grant; name the user the agent runs as")
    if _ALIAS_LIKE.fullmatch(user):
        raise SudoersError(f"refusing user name {user!r}: sudoers reads an all-caps word as an alias (ALL = everyone)")
    return user


def validate_interval_ms(interval_ms: int) -> int:
    """Return ``interval_ms`` if it is a whole number in the supported range, else raise."""
    if isinstance(interval_ms, bool) or not isinstance(interval_ms, int):
        raise SudoersError(f"interval must be a whole number of milliseconds, got {interval_ms!r}")
    if not MIN_INTERVAL_MS <= interval_ms <= MAX_INTERVAL_MS:
        raise SudoersError(f"interval {interval_ms} ms is outside {MIN_INTERVAL_MS}..{MAX_INTERVAL_MS} ms")
    return interval_ms


def validate_samples(samples: int) -> int:
    """Return ``samples`` (powermetrics ``-n``) if it is a whole number in range, else raise.

    0 would mean "forever" to powermetrics, which is exactly what the pinned
    count exists to prevent.
    """
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise SudoersError(f"sample count must be a whole number, got {samples!r}")
    if not 1 <= samples <= _MAX_SAMPLES_PER_RUN:
        raise SudoersError(f"sample count {samples} is outside 1..{_MAX_SAMPLES_PER_RUN}")
    return samples


def powermetrics_argv(interval_ms: int, samples: int = SAMPLES_PER_RUN) -> list[str]:
    """The powermetrics command line as root runs it (what the grant names)."""
    return [
        POWERMETRICS_PATH,
        "--samplers",
        SAMPLERS,
        "-i",
        str(validate_interval_ms(interval_ms)),
        "-n",
        str(validate_samples(samples)),
    ]


def legacy_powermetrics_argv(interval_ms: int) -> list[str]:
    """The command older metal-agents (and LLMKube's install) granted: no ``-n``.

    Only for recognising a grant that needs re-installing; never run.
    """
    return powermetrics_argv(interval_ms)[:-2]


def sampler_argv(interval_ms: int, samples: int = SAMPLES_PER_RUN) -> list[str]:
    """The exact argv the agent executes: non-interactive sudo around :func:`powermetrics_argv`.

    sudo's own ``-n`` makes it fail at once instead of waiting for a password
    nobody will type when the grant is missing; powermetrics' ``-n`` is the
    pinned sample count.
    """
    return [SUDO_PATH, "-n", *powermetrics_argv(interval_ms, samples)]


def _sudoers_arg(arg: str) -> str:
    if not _ARG_SAFE.fullmatch(arg):
        raise SudoersError(f"argument {arg!r} cannot be rendered literally into sudoers")
    return arg.replace(",", "\\,")  # ',' separates commands in a sudoers list


def render_sudoers(user: str, interval_ms: int, samples: int = SAMPLES_PER_RUN, *, version: str) -> str:
    """Render the ``/etc/sudoers.d/llmkube-powermetrics`` fragment for ``user``.

    ``samples`` exists for tests that need short runs; the agent and the
    install script always use :data:`SAMPLES_PER_RUN`. ``version`` is the
    agent's (``metal_agent.__version__``), named in the header; the caller
    passes it so that the core imports nothing above itself.
    """
    validate_user(user)
    command = " ".join(_sudoers_arg(a) for a in powermetrics_argv(interval_ms, samples))
    return f"""\
# {SUDOERS_FRAGMENT_PATH}: rendered by metal-agent {version}; do not edit.
# Re-render with: metal-agent render-sudoers --user {user} --interval-ms {interval_ms}
# Install with:   make install-powermetrics-sudo   (checks it with visudo first)
#
# Lets {user} run one command as root without a password: powermetrics with
# the cpu_power,gpu_power samplers every {interval_ms} ms, {samples} samples per
# run, for metal-agent's Apple power gauges.
#
# Every argument is pinned on purpose. powermetrics can write files as root
# (--output-file), so a grant for the bare binary is a root escalation. There
# is no wildcard either: in sudoers '*' in the arguments also matches spaces,
# so "-i [0-9]*" would admit "-i 1 --output-file /etc/sudoers". The sample
# count (-n) bounds each run, because the agent may not be allowed to signal
# a command sudo runs as root. To change the interval, re-render and
# reinstall this file; so too after upgrading metal-agent if its command
# changed (metal-agent doctor says so).
Cmnd_Alias LLMKUBE_POWERMETRICS = {command}
{user} ALL = (root) NOPASSWD: LLMKUBE_POWERMETRICS
"""

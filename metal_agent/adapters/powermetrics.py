"""Live Apple SoC power gauges from a supervised ``sudo -n powermetrics`` process.

The sampler runs the one argv :func:`metal_agent.core.sudoers.sampler_argv`
builds (absolute paths; the sudoers grant names exactly that vector), feeds
its stdout to :class:`~metal_agent.core.powermetrics.PowerParser` and
publishes every complete sample to unlabelled gauges, in watts, that
InferCost scrapes.

InferCost reads a combined value of 0 as "sampler off" and falls back to an
estimate, so the one thing this module must never do is leave a stale value
standing: the power gauges drop to 0 as soon as powermetrics fails, and a
watchdog drops them when no sample has arrived for three intervals. LLMKube's
Go agent got this wrong, and never restarted its sampler either: here a dead
powermetrics is restarted with exponential backoff, a silent one is presumed
hung after ten intervals and replaced, and each distinct failure is logged
once, with the tail of its stderr, instead of per retry.

**The agent may not be able to signal its own powermetrics.** sudo runs it as
root, and whether the agent's user may signal it depends on sudo: sudo before
1.9.5 made its front-end full root ("so user cannot kill us", setuid(0) in
sudo.c before run_command), and any sudo that executes the command in its own
place (sudoers defines no close function: no PAM session, no pty, no I/O log)
leaves a full-root process as the agent's child. Either way ``kill`` fails with
EPERM (``PermissionError``). Where the front-end keeps the user's real uid
(sudo >= 1.9.5), sudo relays SIGTERM, SIGHUP, SIGUSR1/2 and the like to the
command. So signals are only ever a courtesy here:

* a run is ended by closing the read end of its output pipes: powermetrics
  dies of SIGPIPE at its next write (at most one interval later);
* every run is bounded by the pinned sample count (``-n``), so even a run
  whose pipe stayed open exits by itself; that normal end is not a failure:
  the next run starts at once, with no backoff and the gauges left standing;
* a process that neither exits nor accepts a signal is abandoned (reaped
  whenever it does exit) and a new run starts; the number of abandoned runs
  still alive is capped, so a broken system cannot pile them up.

The powermetrics path is not configurable: a grant for a path the user can
choose would be a root escalation. The only way to run something else is the
``executable_override_for_tests`` constructor seam, which exists because
powermetrics cannot exist on the Linux machines the tests run on; nothing in
the CLI or the configuration reaches it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog
from prometheus_client import CollectorRegistry

from metal_agent.adapters.power_gauges import PowerGauges
from metal_agent.adapters.stream_lines import collect_tail, read_lines
from metal_agent.core.backoff import Backoff
from metal_agent.core.powermetrics import PowerParser, PowerSample
from metal_agent.core.sudoers import (
    POWERMETRICS_PATH,
    SAMPLERS,
    SAMPLES_PER_RUN,
    SUDO_PATH,
    SudoersError,
    legacy_powermetrics_argv,
    powermetrics_argv,
    sampler_argv,
    validate_interval_ms,
    validate_samples,
)
from metal_agent.tasks import cancel_and_wait, within

__all__ = [
    "PowerConfigError",
    "PowerGauges",
    "PowerSampler",
    "PowerSamplerSettings",
]

log = structlog.get_logger(__name__)

_READ_CHUNK = 64 * 1024
_STDERR_TAIL_LINES = 20
# Longest wait for a run to end once its pipes are closed (and a signal tried).
_END_GRACE_CAP_S = 5.0
_KILL_GRACE_S = 1.0
# Abandoned runs still alive before the sampler stops starting new ones.
MAX_ABANDONED = 3
# Restart quickly at first, but never wait more than a minute: while the
# sampler is down InferCost falls back to a TDP estimate. A minute of
# delivering samples counts as healthy and resets the delay.
DEFAULT_BACKOFF = Backoff(initial=1.0, factor=2.0, cap=60.0, reset_after=60.0)
DEFAULT_INTERVAL_MS = 1000


class PowerConfigError(ValueError):
    """Power sampler configuration the agent refuses to start with."""


def _fixed_command() -> str:
    return f"{SUDO_PATH} -n {POWERMETRICS_PATH} --samplers {SAMPLERS} -i <interval_ms> -n {SAMPLES_PER_RUN}"


@dataclass(frozen=True, slots=True)
class PowerSamplerSettings:
    """What an operator may configure about the sampler: on/off and the interval.

    The command itself is deliberately absent; :meth:`from_mapping` turns any
    attempt to set it into a start-up error rather than ignoring it, so a
    config that tries is noticed instead of silently not doing what it says.
    """

    enabled: bool = True
    interval_ms: int = DEFAULT_INTERVAL_MS

    @classmethod
    def from_mapping(cls, raw: Mapping[str, object]) -> PowerSamplerSettings:
        """Validate a ``power:`` config section (e.g. parsed YAML)."""
        for key in raw:
            lowered = str(key).lower()
            if any(word in lowered for word in ("path", "powermetrics", "sudo", "argv", "command", "exec", "bin")):
                raise PowerConfigError(
                    f"power.{key}: the powermetrics command is fixed to `{_fixed_command()}` "
                    "because the sudoers grant names exactly that; it cannot be configured"
                )
            if key not in ("enabled", "interval_ms"):
                raise PowerConfigError(f"power.{key}: unknown setting (known: enabled, interval_ms)")
        enabled = raw.get("enabled", True)
        if not isinstance(enabled, bool):
            raise PowerConfigError(f"power.enabled must be true or false, got {enabled!r}")
        interval = raw.get("interval_ms", DEFAULT_INTERVAL_MS)
        try:
            validate_interval_ms(interval)  # type: ignore[arg-type]
        except SudoersError as exc:
            raise PowerConfigError(f"power.interval_ms: {exc}") from None
        return cls(enabled=enabled, interval_ms=interval)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class _RunOutcome:
    returncode: int | None  # None: could not be started at all, or abandoned while still running
    stderr_tail: str
    samples: int
    healthy_s: float  # from the first sample to the exit; 0 if none arrived
    abandoned: bool = False  # could be neither ended nor signalled; left to end by itself
    completed: bool = False  # exited 0 after its pinned sample count: a normal end, not a failure

    def signature(self) -> tuple[int | None, str, bool]:
        """What makes two failures "the same" for logging purposes."""
        return (self.returncode, self.stderr_tail, self.abandoned)


def _hint(outcome: _RunOutcome) -> str | None:
    tail = outcome.stderr_tail.lower()
    if "password" in tail or "not allowed" in tail or "sudoers" in tail:
        return "the sudo grant for powermetrics is missing or stale: run `make install-powermetrics-sudo`"
    if outcome.abandoned:
        return (
            "powermetrics runs as root and refused the agent's signals; its output pipe is closed, so it "
            "ends at its next write, and its pinned sample count ends it in any case"
        )
    if outcome.returncode is None:
        return f"could not execute the sampler command; powermetrics exists only on macOS at {POWERMETRICS_PATH}"
    return None


def _signal(proc: asyncio.subprocess.Process, sig: int) -> bool:
    """Send ``sig``; False if the process may not be signalled (it runs as root)."""
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass  # already gone: as good as delivered
    except PermissionError:
        return False
    return True


async def _exited_within(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    if proc.returncode is not None:
        return True
    try:
        await within(proc.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def _open_reader(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """A StreamReader over the read end of a pipe we own (so we can close it)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_READ_CHUNK)
    pipe = os.fdopen(fd, "rb", buffering=0)
    try:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    except BaseException:
        pipe.close()
        raise
    return reader, transport


class PowerSampler:
    """Supervises powermetrics and keeps the power gauges honest. Run with :meth:`run`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        interval_ms: int = DEFAULT_INTERVAL_MS,
        samples_per_run: int = SAMPLES_PER_RUN,
        backoff: Backoff = DEFAULT_BACKOFF,
        stale_intervals: int = 3,
        hung_intervals: int = 10,
        on_sample: Callable[[PowerSample], None] | None = None,
        executable_override_for_tests: Sequence[str] | None = None,
    ) -> None:
        """Build a sampler; nothing runs until :meth:`run` is awaited.

        ``samples_per_run`` is powermetrics' ``-n``; it is part of the argv the
        sudoers grant pins, so it must match the installed grant. The agent
        always uses :data:`SAMPLES_PER_RUN`; tests pass small counts (with a
        grant rendered for them) to watch runs end and restart.

        ``backoff`` paces restarts after failures; its ``reset_after`` is
        measured from the first sample of a run, so a powermetrics that starts
        but never delivers keeps backing off. A run that ends normally after
        its sample count is restarted at once.

        After ``stale_intervals`` intervals without a sample the gauges read
        0; after ``hung_intervals`` (counted from the start or the last
        sample) the process is presumed hung, ended (or abandoned) and
        replaced.

        ``on_sample`` is called after the gauges are updated with each sample
        (for other consumers such as energy accounting; exceptions are logged).

        ``executable_override_for_tests`` replaces only the executable part of
        the argv (``/usr/bin/sudo -n /usr/bin/powermetrics``) with a stand-in;
        the powermetrics arguments are kept so the stand-in sees exactly what
        the real one would. It exists because powermetrics cannot exist on
        Linux, where the tests run. Never wire it to configuration or the CLI.
        """
        self._interval_ms = validate_interval_ms(interval_ms)
        self._samples_per_run = validate_samples(samples_per_run)
        if not 1 <= stale_intervals <= hung_intervals:
            raise ValueError("need 1 <= stale_intervals <= hung_intervals")
        interval_s = interval_ms / 1000.0
        self._stale_after_s = stale_intervals * interval_s
        self._hung_after_s = hung_intervals * interval_s
        # Once the pipes are closed a writing powermetrics dies at its next sample.
        self._end_grace_s = min(_END_GRACE_CAP_S, 2 * interval_s + 1.0)
        self._backoff = backoff
        self._on_sample = on_sample
        if executable_override_for_tests is None:
            self._argv = tuple(sampler_argv(interval_ms, samples_per_run))
            self._is_stand_in = False
        else:
            if not executable_override_for_tests:
                raise ValueError("executable_override_for_tests must not be empty")
            self._argv = (*executable_override_for_tests, *powermetrics_argv(interval_ms, samples_per_run)[1:])
            self._is_stand_in = True
        self.gauges = PowerGauges(registry, fallback_interval_s=interval_s)
        self.starts = 0
        self._fresh = asyncio.Event()
        self._live = False
        self._first_sample_at: float | None = None
        self._last_sample_at = 0.0
        self._last_failure: tuple[int | None, str, bool] | None = None
        self._abandoned: dict[int, asyncio.Task[None]] = {}
        self._log = log.bind(interval_ms=interval_ms)

    @property
    def argv(self) -> tuple[str, ...]:
        return self._argv

    @property
    def abandoned_pids(self) -> list[int]:
        """Runs that could not be ended and have not exited yet (they end by themselves)."""
        return sorted(self._abandoned)

    async def run(self) -> None:
        """Sample until cancelled, starting powermetrics again whenever a run ends."""
        if self._is_stand_in:
            self._log.warning("power sampler runs a stand-in, not powermetrics", argv=list(self._argv))
        self.gauges.off()
        watchdog = asyncio.create_task(self._watchdog(), name="power-sampler-watchdog")
        failures = 0
        try:
            while True:
                await self._room_for_a_run()
                self.starts += 1
                try:
                    outcome = await self._run_once()
                except Exception as exc:  # a bug must cost one run (restarted with backoff), not the sampler
                    self._log.exception("power sampler run failed")
                    outcome = _RunOutcome(None, f"{type(exc).__name__}: {exc}", 0, 0.0)
                if outcome.completed:
                    failures = 0
                    self._last_failure = None
                    self._log.info(
                        "powermetrics finished its pinned samples; starting the next run",
                        samples=outcome.samples,
                        returncode=outcome.returncode,
                        restart_in_s=0.0,
                    )
                    continue  # the gauges stay: the watchdog zeroes them if the next run is late
                self._set_off()
                failures = self._backoff.failures_after_run(failures, outcome.healthy_s)
                if outcome.healthy_s >= self._backoff.reset_after:
                    self._last_failure = None  # a recurrence after a good stretch is news again
                delay = self._backoff.delay(failures)
                self._report_exit(outcome, delay)
                await asyncio.sleep(delay)
        finally:
            try:
                await cancel_and_wait(watchdog, *self._abandoned.values())
            finally:
                self._set_off()

    async def _room_for_a_run(self) -> None:
        """Wait while ``MAX_ABANDONED`` runs that could not be ended are still alive."""
        if len(self._abandoned) < MAX_ABANDONED:
            return
        self._log.error(
            "not starting powermetrics while earlier runs that could not be ended are still alive",
            abandoned_pids=self.abandoned_pids,
        )
        while len(self._abandoned) >= MAX_ABANDONED:
            await asyncio.wait(set(self._abandoned.values()), return_when=asyncio.FIRST_COMPLETED)

    async def _run_once(self) -> _RunOutcome:
        # Our own pipes, so that we can close the read ends: that, not a signal,
        # is what ends a powermetrics the agent's user may not signal.
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv, stdin=asyncio.subprocess.DEVNULL, stdout=out_w, stderr=err_w
            )
        except OSError as exc:
            os.close(out_r)
            os.close(err_r)
            return _RunOutcome(None, f"{type(exc).__name__}: {exc}", 0, 0.0)
        finally:
            os.close(out_w)
            os.close(err_w)
        self._first_sample_at = None
        self._last_sample_at = time.monotonic()  # the hung clock starts at the start
        transports: list[asyncio.BaseTransport] = []
        tasks: list[asyncio.Task] = []
        tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        exited = True
        try:
            stdout, out_transport = await _open_reader(out_r)
            transports.append(out_transport)
            stderr, err_transport = await _open_reader(err_r)
            transports.append(err_transport)
            tasks.append(asyncio.create_task(collect_tail(stderr, tail)))
            consume = asyncio.create_task(self._consume(stdout))
            tasks.append(consume)
            await self._until_done_or_hung(consume)
            if consume.done():
                # stdout closed: the process is exiting; give it a moment, then make sure.
                await _exited_within(proc, self._stale_after_s)
        finally:
            for fd in (out_r, err_r)[len(transports):]:
                os.close(fd)  # never handed to a transport
            for transport in transports:
                transport.close()  # powermetrics dies of SIGPIPE at its next write
            exited = await self._end(proc)
            self._log.debug("powermetrics run over", pid=proc.pid, returncode=proc.returncode, abandoned=not exited)
            if tasks:
                await asyncio.wait(tasks, timeout=1.0)
            for task in tasks:
                task.cancel()
        consume = tasks[1]
        samples = 0
        if consume.done() and not consume.cancelled():
            if consume.exception() is None:
                samples = consume.result()
            else:  # a bug must cost one run (restarted with backoff), not the sampler
                self._log.error("reading powermetrics output failed", exc_info=consume.exception())
        healthy_s = time.monotonic() - self._first_sample_at if self._first_sample_at is not None else 0.0
        returncode = proc.returncode if exited else None
        completed = returncode == 0 and samples >= self._samples_per_run
        return _RunOutcome(returncode, "\n".join(tail), samples, healthy_s, abandoned=not exited, completed=completed)

    async def _end(self, proc: asyncio.subprocess.Process) -> bool:
        """Make sure a run is over (its pipes are already closed); False if it had to be abandoned.

        A signal is tried as a courtesy (it is faster than waiting for the next
        write, and sudo relays SIGTERM when its front-end kept the user's uid),
        but a ``PermissionError`` is expected, not an error.
        """
        if proc.returncode is not None:
            return True
        signalled = _signal(proc, signal.SIGTERM)
        if await _exited_within(proc, self._end_grace_s):
            return True
        if signalled and _signal(proc, signal.SIGKILL) and await _exited_within(proc, _KILL_GRACE_S):
            return True
        self._abandon(proc, signalled)
        return False

    def _abandon(self, proc: asyncio.subprocess.Process, signalled: bool) -> None:
        self._log.warning(
            "powermetrics could not be ended; abandoning it (it ends at its next write or after its pinned samples)",
            pid=proc.pid,
            may_signal=signalled,
            samples_per_run=self._samples_per_run,
        )
        self._abandoned[proc.pid] = asyncio.create_task(self._reap_abandoned(proc), name=f"powermetrics-reap-{proc.pid}")

    async def _reap_abandoned(self, proc: asyncio.subprocess.Process) -> None:
        try:
            returncode = await proc.wait()
            self._log.info("abandoned powermetrics ended", pid=proc.pid, returncode=returncode)
        finally:
            self._abandoned.pop(proc.pid, None)

    async def _until_done_or_hung(self, consume: asyncio.Task[int]) -> None:
        """Wait for stdout to end, or for ``hung_intervals`` without a sample."""
        while not consume.done():
            remaining = self._last_sample_at + self._hung_after_s - time.monotonic()
            if remaining <= 0:
                self._log.warning("powermetrics stopped delivering samples; restarting it", hung_after_s=self._hung_after_s)
                return
            await asyncio.wait({consume}, timeout=remaining)

    async def _consume(self, stdout: asyncio.StreamReader) -> int:
        parser = PowerParser()
        count = 0
        async for line in read_lines(stdout):
            for sample in parser.feed(line):
                count += 1
                self._publish(sample, first=count == 1)
        parser.finish()
        return count

    def _publish(self, sample: PowerSample, *, first: bool) -> None:
        self.gauges.publish(sample, time.time())
        self._last_sample_at = time.monotonic()
        self._live = True
        self._fresh.set()
        if first:
            self._first_sample_at = time.monotonic()
            if self.starts == 1 or self._last_failure is not None:
                self._log.info("power sampler delivering samples", combined_w=sample.combined_w)
        if self._on_sample is not None:
            try:
                self._on_sample(sample)
            except Exception:
                self._log.exception("power sample consumer failed")

    def _set_off(self) -> None:
        self.gauges.off()
        self._live = False

    async def _watchdog(self) -> None:
        """Zero the gauges when no sample arrived for ``stale_intervals`` intervals."""
        while True:
            try:
                await within(self._fresh.wait(), self._stale_after_s)
            except TimeoutError:
                if self._live:
                    self._log.warning("no powermetrics sample; power gauges set to 0", stale_after_s=self._stale_after_s)
                self._set_off()
                await self._fresh.wait()  # nothing to do until samples flow again
            self._fresh.clear()

    def _report_exit(self, outcome: _RunOutcome, restart_in_s: float) -> None:
        fields = {
            "returncode": outcome.returncode,
            "samples": outcome.samples,
            "abandoned": outcome.abandoned,
            "restart_in_s": restart_in_s,
        }
        if outcome.signature() == self._last_failure:
            self._log.debug("powermetrics exited again", **fields)
            return
        self._last_failure = outcome.signature()
        self._log.warning(
            "powermetrics exited",
            argv=list(self._argv),
            stderr_tail=outcome.stderr_tail,
            hint=_hint(outcome),
            **fields,
        )

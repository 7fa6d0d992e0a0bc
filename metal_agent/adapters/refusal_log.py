"""Refused HTTP requests: every one counted by reason, a sample of them logged.

The rules of the sample are in `core/log_sampling.py` (the first few per
reason, then one line per interval with how many were not logged). The
summary is written by a timer on the event loop, so the count of a flood
that has stopped still reaches the log.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import structlog

from metal_agent.core.log_sampling import LogSampler

log = structlog.get_logger("metal_agent.http")


class RefusalLog:
    def __init__(self, *, counter=None, sampler: LogSampler | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.counter = counter  # a prometheus Counter labelled by reason, or None
        self.sampler = sampler or LogSampler()
        self._clock = clock
        self._timer: asyncio.TimerHandle | None = None
        self.total = 0  # refusals seen (tests read it where no registry is at hand)

    def refused(self, reason: str, message: str, **fields) -> None:
        """One refusal: counted always, logged if the sample takes it. `fields` must hold no secret."""
        self.total += 1
        if self.counter is not None:
            self.counter.labels(reason).inc()
        if self.sampler.note(reason, self._clock()):
            log.info("refused a request", reason=reason, why=message, **fields)
        else:
            self._schedule()

    def _schedule(self) -> None:
        due = self.sampler.next_due()
        if self._timer is not None or due is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): the next refusal on one schedules it
            return
        self._timer = loop.call_later(max(0.0, due - self._clock()), self._flush)

    def _flush(self) -> None:
        self._timer = None
        for reason, count in self.sampler.due(self._clock()):
            log.warning("refused more requests than were logged", reason=reason, not_logged=count,
                        interval_s=self.sampler.interval)
        self._schedule()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

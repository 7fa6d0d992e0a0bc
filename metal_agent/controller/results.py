"""What a reconcile asks of the queue afterwards: nothing more, or another look later.

Named, with a reason, so a reader of the reconcile sees why it comes back
(instead of a bare 30.0), and so the runner (not the reconciler) is the one
part that talks to the queue.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Requeue:
    """Reconcile the key again after `after` seconds (unless an event does it sooner)."""

    after: float
    why: str


@dataclass(frozen=True)
class Done:
    """Nothing to do until an event about the key (or a resync) queues it again."""

    why: str = ""


DONE = Done()
Result = Requeue | Done

# How long a service blocked by something no event announces waits for the next look:
# a model that cannot be had (a fixed Secret, a freed disk) or a draft model downloading.
BLOCKED_RETRY = 30.0
DRAFT_DOWNLOAD_RETRY = 2.0  # the draft's download calls no one back

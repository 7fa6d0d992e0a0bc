"""What one Mac should do about one service's replica Leases, as one pure decision.

The fleet (metal_agent/fleet/placer.py) calls this for every service on every tick
with what its watch shows; everything it decides to write follows from the
answer. Kept pure so that the rules below are tested without an API server:

- a replica whose index is at or beyond `spec.replicas` is released by its
  holder (scaled down);
- a replica the holder's memory admission refused (after a download, when
  the estimate could first be made) is released, so another Mac may try;
- a draining Mac's replica is taken over by its successor once the
  successor's own slice says ready (make before break);
- a replica is free when nobody made its Lease yet, its Lease names no
  holder, or its holder's Lease expired; it is up for hand-over when its
  holder is cordoned and has no live successor yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from metal_agent.core.leases import Replica
from metal_agent.core.placement import Wanted

FREE, HANDOFF = "free", "handoff"


@dataclass(frozen=True)
class Plan:
    release: tuple[Replica, ...] = ()  # ours to give up
    promote: tuple[Replica, ...] = ()  # ours to take over from a draining Mac
    free: tuple[tuple[int, Replica | None, str], ...] = ()  # (index, its Lease if any, FREE or HANDOFF)
    holders: frozenset[str] = frozenset()  # live members serving a replica of it now


def plan_replicas(wanted: Wanted, leases: Iterable[Replica], me: str, *, alive: Callable[[str], bool],
                  cordoned: Callable[[str], bool], announced: bool = False, refused: bool = False) -> Plan:
    """`alive`/`cordoned` answer for a member name; `announced`: our slice for the service says
    ready; `refused`: our memory admission holds the service back."""
    reps = {r.index: r for r in leases if r.key == wanted.key}
    release, promote = [], []
    for index, r in sorted(reps.items()):
        if r.holder == me and (index >= wanted.replicas or refused):
            release.append(r)
        elif r.successor == me and r.holder and r.holder != me and announced and index < wanted.replicas:
            promote.append(r)
    free = []
    for index in range(wanted.replicas):
        r = reps.get(index)
        if r is None or not r.holder or not alive(r.holder):
            free.append((index, r, FREE))
        elif r.holder != me and cordoned(r.holder) and not (r.successor and alive(r.successor)):
            free.append((index, r, HANDOFF))
    holders = frozenset(r.holder for r in reps.values() if r.holder and alive(r.holder))
    return Plan(tuple(release), tuple(promote), tuple(free), holders)

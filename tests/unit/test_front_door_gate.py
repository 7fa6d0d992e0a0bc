"""A route's gate: slots, the FIFO queue, holding while the engine is away, and cancellation."""

from __future__ import annotations

import asyncio

import pytest

from metal_agent.core.front_door import Route, RouteState
from metal_agent.frontdoor.gate import Gate, Refused


def _route(upstream=("127.0.0.1", 1), state=RouteState.SERVING, max_inflight=1, queue=2, timeout=5.0) -> Route:
    return Route("ns/a", "a", 1000, upstream, state, max_inflight, queue, timeout)


def _deadline(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def _until(condition) -> None:
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_slots_then_fifo_queue_then_429():
    gate = Gate(_route(max_inflight=1, queue=2))
    assert await gate.acquire(_deadline()) == 0.0
    first = asyncio.ensure_future(gate.acquire(_deadline()))
    second = asyncio.ensure_future(gate.acquire(_deadline()))
    await _until(lambda: gate.queued == 2)
    with pytest.raises(Refused) as refused:
        await gate.acquire(_deadline())
    assert refused.value.status == 429 and refused.value.retry_after >= 1
    gate.release()
    await _until(first.done)
    assert not second.done() and gate.inflight == 1
    gate.release()
    await second
    gate.release()
    assert (gate.inflight, gate.queued) == (0, 0)


async def test_a_starting_route_holds_until_a_table_gives_it_an_upstream():
    gate = Gate(_route(upstream=None, state=RouteState.STARTING))
    held = asyncio.ensure_future(gate.acquire(_deadline()))
    await _until(lambda: gate.queued == 1)
    assert not held.done()
    gate.update(_route())
    await held
    assert gate.inflight == 1


async def test_holding_times_out_as_503_and_a_busy_queue_as_429():
    starting = Gate(_route(upstream=None, state=RouteState.STARTING))
    with pytest.raises(Refused) as refused:
        await starting.acquire(_deadline(0.01))
    assert refused.value.status == 503 and starting.queued == 0
    busy = Gate(_route())
    await busy.acquire(_deadline())
    with pytest.raises(Refused) as refused:
        await busy.acquire(_deadline(0.01))
    assert refused.value.status == 429 and busy.queued == 0 and busy.inflight == 1


async def test_a_waiter_that_goes_away_leaves_the_queue_and_takes_no_slot():
    gate = Gate(_route())
    await gate.acquire(_deadline())
    gone = asyncio.ensure_future(gate.acquire(_deadline()))
    await _until(lambda: gate.queued == 1)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert gate.queued == 0
    gate.release()
    assert gate.inflight == 0


async def test_a_connect_failure_holds_new_requests_until_the_next_table():
    gate = Gate(_route(max_inflight=2))
    await gate.acquire(_deadline())
    gate.upstream_failed()
    gate.release()
    held = asyncio.ensure_future(gate.acquire(_deadline()))
    await _until(lambda: gate.queued == 1)
    assert gate.holds and not held.done()
    gate.update(_route(upstream=("127.0.0.1", 2), max_inflight=2))
    await held
    assert gate.inflight == 1


async def test_the_back_off_alone_releases_a_held_request():
    gate = Gate(_route())
    gate.upstream_failed()
    await asyncio.wait_for(gate.acquire(_deadline()), 2)  # the retry timer pumps it
    assert gate.inflight == 1


async def test_a_removed_route_answers_its_waiters_at_once():
    gate = Gate(_route(upstream=None, state=RouteState.STARTING))
    held = asyncio.ensure_future(gate.acquire(_deadline()))
    await _until(lambda: gate.queued == 1)
    gate.refuse_waiters(Refused(503, 5, "gone"))
    with pytest.raises(Refused, match="gone"):
        await held
    assert gate.inflight == 0

"""Events: buffered through outages, bounded, aggregated, and never held up by one hung call.

The API server here is a small real HTTP server speaking the two Event
calls the recorder makes, with switches for the faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from dataclasses import dataclass, field
from typing import AsyncIterator

from aiohttp import web
from kubernetes_asyncio import client
from prometheus_client import CollectorRegistry, Counter

from metal_agent.adapters.kube.client import api_client
from metal_agent.adapters.kube.events import EventRecorder
from metal_agent.core.backoff import Backoff
from tests.support.wait import wait_for

FAST_RETRY = Backoff(initial=0.02, factor=2.0, cap=0.1, jitter=0.5)
ISVC = {"namespace": "ns", "name": "svc", "uid": "u-1"}


@dataclass
class FakeEvents:
    """Events as the API server stores them, plus fault switches."""

    events: dict[str, dict] = field(default_factory=dict)
    failing: bool = False  # every call answers 503
    hang_once: set[str] = field(default_factory=set)  # reasons whose first create never gets an answer
    reject: set[str] = field(default_factory=set)  # reasons answered 422
    expired: set[str] = field(default_factory=set)  # event names whose patch answers 404
    denials: int = 0  # this many next creates answer 403 (a restarted API server's cold RBAC cache)
    attempts: int = 0

    def by_reason(self, reason: str) -> list[dict]:
        return [e for e in self.events.values() if e["reason"] == reason]

    async def create(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.json()
        if self.failing:
            return web.json_response({"message": "unavailable"}, status=503)
        if body["reason"] in self.hang_once:
            self.hang_once.discard(body["reason"])
            await asyncio.Event().wait()
        if self.denials:
            self.denials -= 1
            return web.json_response({"message": "forbidden"}, status=403)
        if body["reason"] in self.reject:
            return web.json_response({"message": "invalid"}, status=422)
        self.events[body["metadata"]["name"]] = body
        return web.json_response(body, status=201)

    async def patch(self, request: web.Request) -> web.Response:
        self.attempts += 1
        name = request.match_info["name"]
        if self.failing:
            return web.json_response({"message": "unavailable"}, status=503)
        if name in self.expired or name not in self.events:
            return web.json_response({"message": "not found"}, status=404)
        self.events[name].update(await request.json())
        return web.json_response(self.events[name])


@contextlib.asynccontextmanager
async def recorder(**kwargs) -> AsyncIterator[tuple[EventRecorder, FakeEvents, Counter]]:
    fake = FakeEvents()
    app = web.Application()
    app.router.add_post("/api/v1/namespaces/{ns}/events", fake.create)
    app.router.add_patch("/api/v1/namespaces/{ns}/events/{name}", fake.patch)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    api = api_client(client.Configuration(host=f"http://127.0.0.1:{port}"))
    dropped = Counter("events_dropped", "test", ["reason"], registry=CollectorRegistry())
    rec = EventRecorder(api, host="mac", retry=FAST_RETRY, dropped=dropped, **kwargs)
    try:
        yield rec, fake, dropped
    finally:
        await rec.close()
        await api.close()
        await runner.cleanup()


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_events_raised_during_an_outage_are_delivered_when_it_ends():
    async with recorder() as (rec, fake, dropped):
        fake.failing = True
        raised_at = dt.datetime.now(dt.timezone.utc)
        rec.emit(ISVC, "ProcessExited", "exit code 1", warning=True)
        rec.emit(ISVC, "Restarting", "restart #1")
        await wait_for(lambda: fake.attempts >= 5, timeout=5, what="retries during the outage")
        assert rec.pending == 2 and fake.events == {}
        fake.failing = False
        await asyncio.wait_for(rec.flush(), 5)
        assert [e["reason"] for e in fake.events.values()] == ["ProcessExited", "Restarting"]
        exited = fake.by_reason("ProcessExited")[0]
        assert exited["type"] == "Warning" and exited["count"] == 1
        # The timeline shows when it happened, not when the API came back.
        assert abs((parse_time(exited["firstTimestamp"]) - raised_at).total_seconds()) < 1
        assert dropped.labels("overflow")._value.get() == 0


async def test_repeats_during_an_outage_become_one_event_with_their_count():
    async with recorder() as (rec, fake, _):
        fake.failing = True
        for _ in range(5):
            rec.emit(ISVC, "ProcessExited", "exit code 1", warning=True)
        assert rec.pending == 1
        fake.failing = False
        await asyncio.wait_for(rec.flush(), 5)
        [event] = fake.events.values()
        assert event["count"] == 5


async def test_a_repeat_after_delivery_bumps_the_existing_event():
    async with recorder() as (rec, fake, _):
        rec.emit(ISVC, "Unhealthy", "no answer")
        await asyncio.wait_for(rec.flush(), 5)
        rec.emit(ISVC, "Unhealthy", "no answer")
        rec.emit(ISVC, "Unhealthy", "no answer")
        await asyncio.wait_for(rec.flush(), 5)
        [event] = fake.events.values()
        assert event["count"] == 3


async def test_an_expired_event_is_created_again_rather_than_lost():
    async with recorder() as (rec, fake, dropped):
        rec.emit(ISVC, "Unhealthy", "no answer")
        await asyncio.wait_for(rec.flush(), 5)
        fake.expired = set(fake.events)
        rec.emit(ISVC, "Unhealthy", "no answer")
        await asyncio.wait_for(rec.flush(), 5)
        assert len(fake.by_reason("Unhealthy")) == 2
        assert dropped.labels("rejected")._value.get() == 0


async def test_the_buffer_is_bounded_and_drops_the_oldest_counting_them():
    async with recorder(capacity=3) as (rec, fake, dropped):
        fake.failing = True
        for n in range(5):
            rec.emit(ISVC, f"Reason{n}", "m")
        assert rec.pending == 3
        assert dropped.labels("overflow")._value.get() == 2
        fake.failing = False
        await asyncio.wait_for(rec.flush(), 5)
        assert sorted(e["reason"] for e in fake.events.values()) == ["Reason2", "Reason3", "Reason4"]


async def test_one_hung_call_holds_the_others_back_no_longer_than_the_call_timeout():
    async with recorder(call_timeout=0.3) as (rec, fake, _):
        fake.hang_once = {"Stuck"}
        rec.emit(ISVC, "Stuck", "first")
        rec.emit(ISVC, "Next", "second")
        await wait_for(lambda: fake.by_reason("Next"), timeout=3, what="the Event behind the hung one")
        await asyncio.wait_for(rec.flush(), 5)
        # The timed-out one went to the back of the line, and was delivered on its retry.
        assert [e["reason"] for e in fake.events.values()] == ["Next", "Stuck"]


async def test_a_rejected_event_is_dropped_counted_and_does_not_block_the_rest():
    async with recorder() as (rec, fake, dropped):
        fake.reject = {"Bad"}
        rec.emit(ISVC, "Bad", "m")
        rec.emit(ISVC, "Good", "m")
        await asyncio.wait_for(rec.flush(), 5)
        assert [e["reason"] for e in fake.events.values()] == ["Good"]
        assert dropped.labels("rejected")._value.get() == 1


async def test_events_still_buffered_at_shutdown_are_counted_as_dropped():
    async with recorder() as (rec, fake, dropped):
        fake.failing = True
        rec.emit(ISVC, "A", "m")
        rec.emit(ISVC, "A", "m")
        rec.emit(ISVC, "B", "m")
        await wait_for(lambda: fake.attempts >= 1, timeout=5, what="a first attempt")
        await asyncio.wait_for(rec.close(), 5)
        assert dropped.labels("shutdown")._value.get() == 3
        assert rec.pending == 0


async def test_denials_right_after_an_api_server_restart_do_not_lose_the_event():
    async with recorder() as (rec, fake, dropped):
        fake.denials = 3
        rec.emit(ISVC, "Evicted", "memory pressure")
        await asyncio.wait_for(rec.flush(), 5)
        assert fake.by_reason("Evicted")
        assert dropped.labels("rejected")._value.get() == 0


async def test_a_denial_that_persists_is_a_refusal():
    async with recorder() as (rec, fake, dropped):
        fake.denials = 1000
        rec.emit(ISVC, "Evicted", "memory pressure")
        await asyncio.wait_for(rec.flush(), 10)
        assert fake.attempts == 6
        assert dropped.labels("rejected")._value.get() == 1

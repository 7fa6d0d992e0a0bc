"""Energy attribution (frontdoor/energy.py): a window's joules split across the requests in flight."""

from __future__ import annotations

import pytest

from metal_agent.frontdoor.energy import EnergySplit


def _enabled() -> EnergySplit:
    split = EnergySplit()
    assert split.split(0.0, 1.0, 10.0, now=0.0) == {}  # the first window only switches it on
    return split


def test_nothing_is_kept_before_the_first_window():
    split = EnergySplit()
    split.begin("ns/a", 1.0)
    split.end("ns/a", 2.0)
    assert not split._segments
    assert split.split(1.0, 2.0, 5.0, now=2.0) == {}


def test_one_request_over_half_a_window_gets_half_its_energy():
    split = _enabled()
    split.begin("ns/a", 10.0)
    split.end("ns/a", 10.5)
    assert split.split(10.0, 11.0, 8.0, now=11.0) == {"ns/a": pytest.approx(4.0)}


def test_concurrent_requests_share_equally_and_idle_energy_is_nobodys():
    split = _enabled()
    split.begin("ns/a", 0.0)       # a alone 0-1, a+b+b 1-2 (a 1/3, b 2/3), idle 2-4
    split.begin("ns/b", 1.0)
    split.begin("ns/b", 1.0)
    split.end("ns/a", 2.0)
    split.end("ns/b", 2.0)
    split.end("ns/b", 2.0)
    out = split.split(0.0, 4.0, 40.0, now=4.0)  # 10 W
    assert out == {"ns/a": pytest.approx(10 + 10 / 3), "ns/b": pytest.approx(20 / 3)}
    assert sum(out.values()) == pytest.approx(20.0)  # half the window was idle


def test_a_request_spanning_windows_is_charged_in_each_and_still_running_counts_to_now():
    split = _enabled()
    split.begin("ns/a", 0.5)
    first = split.split(0.0, 1.0, 2.0, now=1.0)    # 2 W, in flight 0.5-1.0
    second = split.split(1.0, 2.0, 4.0, now=2.0)   # 4 W, in flight all of it
    split.end("ns/a", 2.5)
    assert first == {"ns/a": pytest.approx(1.0)} and second == {"ns/a": pytest.approx(4.0)}


def test_old_segments_are_dropped_and_bad_windows_charge_nothing():
    split = EnergySplit(horizon_s=5.0)
    split.split(0, 0, 0, now=0.0)
    for t in range(100):
        split.begin("ns/a", float(t))
        split.end("ns/a", t + 0.5)
    assert len(split._segments) <= 6
    assert split.split(3.0, 3.0, 1.0, now=100.0) == {}
    assert split.split(3.0, 4.0, -1.0, now=100.0) == {}


# -- the agent's side: the power windows it hands over ----------------------------------------------

async def test_each_power_sample_becomes_one_window_for_the_front_door():
    from metal_agent.app.front_door import PowerFeed
    from metal_agent.core.powermetrics import PowerSample

    sent: list[tuple[float, float, float]] = []

    class Client:
        async def put_power(self, start: float, end: float, joules: float) -> None:
            sent.append((start, end, joules))

    feed = PowerFeed(Client(), interval_s=1.0)  # type: ignore[arg-type]
    feed(PowerSample("t", 500.0, cpu_w=1.0, gpu_w=2.0, ane_w=0.0, combined_w=4.0))
    await feed._sending
    (start, end, joules), = sent
    assert end - start == pytest.approx(0.5) and joules == pytest.approx(2.0)

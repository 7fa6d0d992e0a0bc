"""Budgets for reviews of unknown tokens (core/review_limits.py) and sampled refusal logs (core/log_sampling.py).

The flood itself, against a real kube-apiserver, is tests/security/test_review_flood.py.
"""

from __future__ import annotations

import pytest

from metal_agent.core.log_sampling import LogSampler
from metal_agent.core.review_limits import GLOBAL, SOURCE, ReviewLimiter, TokenBucket


def test_a_bucket_gives_its_burst_then_its_rate():
    bucket = TokenBucket.full(rate=2.0, burst=3.0, now=0.0)
    for _ in range(3):
        assert bucket.wait(0.0) == 0.0
        bucket.take(0.0)
    assert bucket.wait(0.0) == pytest.approx(0.5)
    assert bucket.wait(0.5) == 0.0
    bucket.take(0.5)
    assert bucket.wait(100.0) == 0.0 and bucket.tokens == 3.0  # never above the burst


def test_one_source_is_held_to_its_budget_and_others_are_not():
    limiter = ReviewLimiter(per_source_rate=1.0, global_rate=100.0)
    assert limiter.per_source_burst == 10.0  # ten seconds' worth
    admitted = [limiter.admit("198.18.0.1", 0.0).admitted for _ in range(2000)]
    assert sum(admitted) == 10
    refused = limiter.admit("198.18.0.1", 0.0)
    assert refused.scope == SOURCE and refused.retry_after == pytest.approx(1.0)
    assert limiter.admit("198.18.0.5", 0.0).admitted  # another address has its own budget
    assert limiter.admit("198.18.0.1", 1.0).admitted and not limiter.admit("198.18.0.1", 1.0).admitted


def test_many_sources_together_are_held_to_the_global_budget():
    limiter = ReviewLimiter(per_source_rate=1.0, global_rate=10.0)
    assert limiter.global_burst == 20.0
    admitted = sum(limiter.admit(f"10.0.{i // 256}.{i % 256}", 0.0).admitted for i in range(2000))
    assert admitted == 20
    refused = limiter.admit("10.99.0.1", 0.0)
    assert refused.scope == GLOBAL and refused.retry_after == pytest.approx(0.1)
    # A refusal by the global budget took nothing from the source's own.
    assert limiter.admit("10.99.0.1", 0.1).admitted


def test_a_source_over_its_budget_spends_nothing_of_the_global_one():
    limiter = ReviewLimiter(per_source_rate=1.0, global_rate=1.0, per_source_burst=1, global_burst=2)
    assert limiter.admit("a", 0.0).admitted
    for _ in range(100):
        assert limiter.admit("a", 0.0).scope == SOURCE
    assert limiter.admit("b", 0.0).admitted  # the global bucket still had its second token


def test_the_buckets_kept_are_bounded():
    limiter = ReviewLimiter(max_sources=100)
    for i in range(5000):
        limiter.admit(f"s{i}", float(i))
    assert len(limiter) == 100


def test_rates_must_be_positive():
    with pytest.raises(ValueError):
        ReviewLimiter(per_source_rate=0)


def test_the_log_sample_is_the_first_few_then_one_summary_per_interval():
    sampler = LogSampler(first=5, interval=60.0)
    logged = [sampler.note("Unauthenticated", 0.001 * i) for i in range(2000)]
    assert sum(logged) == 5 and logged[:5] == [True] * 5
    assert sampler.due(59.0) == [] and sampler.next_due() == 60.0
    assert sampler.due(60.0) == [("Unauthenticated", 1995)]
    assert sampler.due(61.0) == [] and sampler.next_due() is None  # reported once
    assert sampler.note("Unauthenticated", 62.0)  # a new interval logs its first few again


def test_kinds_are_sampled_apart_and_a_quiet_interval_has_no_summary():
    sampler = LogSampler(first=1, interval=10.0)
    assert sampler.note("ForeignOrigin", 0.0) and sampler.note("ForeignHost", 0.0)
    assert not sampler.note("ForeignOrigin", 1.0)
    assert sampler.due(10.0) == [("ForeignOrigin", 1)]
    assert sampler.next_due() is None


def test_refusals_after_an_interval_end_but_before_its_summary_join_that_summary():
    sampler = LogSampler(first=1, interval=10.0)
    sampler.note("x", 0.0)
    sampler.note("x", 5.0)
    assert not sampler.note("x", 11.0)  # the summary timer has not run yet
    assert sampler.due(11.0) == [("x", 2)]


async def test_the_summary_is_written_by_a_timer_once_the_flood_has_stopped():
    import structlog

    from metal_agent.adapters.refusal_log import RefusalLog
    from tests.support.wait import wait_for

    refusals = RefusalLog(sampler=LogSampler(first=2, interval=0.05))
    with structlog.testing.capture_logs() as logs:
        for _ in range(100):
            refusals.refused("Unauthenticated", "unauthenticated: invalid bearer token", path="/metrics")
        await wait_for(lambda: any(e["event"] == "refused more requests than were logged" for e in logs),
                       timeout=10, what="the summary line")
    assert [e["event"] for e in logs] == ["refused a request"] * 2 + ["refused more requests than were logged"]
    assert logs[-1]["not_logged"] == 98 and refusals.total == 100
    refusals.close()

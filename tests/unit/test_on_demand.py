"""Load on demand, unload when idle: the annotation rules and the eviction choice (core/on_demand.py)."""

from __future__ import annotations

import pytest

from metal_agent.core.on_demand import (
    DEFAULT_IDLE_S, IDLE_AFTER, ON_DEMAND, OnDemandError, OnDemandPolicy, Resident, choose_evictions,
    format_seconds, parse_duration, read_policy, seconds_until_idle,
)


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("1h30m", 5400), ("2h", 7200),
                                               ("1h0m5s", 3605)])
def test_durations_are_read_as_go_writes_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "15", "1.5m", "-5m", "5M", "m", "5m1h", " 5m", "5m ", "1d", "5ms", "1e3s"])
def test_anything_else_is_not_a_duration(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_a_service_without_the_annotation_is_not_on_demand():
    assert read_policy(None) is None
    assert read_policy({"other": "x"}) is None
    assert read_policy({ON_DEMAND: "false"}) is None


def test_opting_in_takes_the_default_idle_duration_or_the_given_one():
    assert read_policy({ON_DEMAND: "true"}) == OnDemandPolicy(DEFAULT_IDLE_S)
    assert read_policy({ON_DEMAND: "true", IDLE_AFTER: "2m"}) == OnDemandPolicy(120.0)


@pytest.mark.parametrize(("annotations", "names"), [
    ({ON_DEMAND: "yes"}, ON_DEMAND),
    ({ON_DEMAND: "True"}, ON_DEMAND),
    ({ON_DEMAND: "true", IDLE_AFTER: "soon"}, IDLE_AFTER),
    ({ON_DEMAND: "true", IDLE_AFTER: "0s"}, IDLE_AFTER),
    ({ON_DEMAND: "true", IDLE_AFTER: "200h"}, IDLE_AFTER),
    ({IDLE_AFTER: "5m"}, IDLE_AFTER),  # an idle duration without opting in would silently do nothing
    ({ON_DEMAND: "false", IDLE_AFTER: "5m"}, IDLE_AFTER),
])
def test_a_bad_annotation_is_an_error_naming_it(annotations, names):
    with pytest.raises(OnDemandError) as err:
        read_policy(annotations)
    assert names in str(err.value)


def test_a_huge_value_is_not_echoed_whole():
    with pytest.raises(OnDemandError) as err:
        read_policy({ON_DEMAND: "x" * 10_000})
    assert len(str(err.value)) < 200


def test_quiet_counts_from_the_later_of_load_and_last_request():
    policy = OnDemandPolicy(60.0)
    assert seconds_until_idle(policy, now=100.0, loaded_at=50.0, last_active=None, busy=False) == 10.0
    assert seconds_until_idle(policy, now=100.0, loaded_at=50.0, last_active=90.0, busy=False) == 50.0
    assert seconds_until_idle(policy, now=200.0, loaded_at=50.0, last_active=90.0, busy=False) == -50.0
    assert seconds_until_idle(policy, now=200.0, loaded_at=50.0, last_active=90.0, busy=True) is None


def test_durations_are_said_briefly():
    assert [format_seconds(s) for s in (0, 45, 900, 5400, 3605)] == ["0s", "45s", "15m", "1h30m", "1h5s"]


def _r(key, bytes_=10, on_demand=True, protected=False, busy=False, last=0.0):
    return Resident(key, bytes_, on_demand, protected, busy, last)


def test_the_least_recently_used_idle_on_demand_service_goes_first():
    residents = [_r("ns/new", last=30), _r("ns/old", last=10), _r("ns/mid", last=20)]
    assert choose_evictions(residents, 10, for_key="ns/x") == ("ns/old",)
    assert choose_evictions(residents, 11, for_key="ns/x") == ("ns/old", "ns/mid")
    assert choose_evictions(residents, 30, for_key="ns/x") == ("ns/old", "ns/mid", "ns/new")


def test_never_a_busy_one_an_opted_out_one_a_protected_one_or_the_one_that_needs_room():
    residents = [_r("ns/busy", busy=True, last=1), _r("ns/always", on_demand=False, last=2),
                 _r("ns/kept", protected=True, last=3), _r("ns/me", last=4), _r("ns/idle", last=5)]
    assert choose_evictions(residents, 10, for_key="ns/me") == ("ns/idle",)
    assert choose_evictions(residents, 11, for_key="ns/me") == ()  # not enough: unload nobody


def test_no_shortfall_unloads_nobody():
    assert choose_evictions([_r("ns/a")], 0, for_key="ns/b") == ()


def _status(**kw) -> dict:
    from metal_agent.core.status import StatusInputs, compute_status

    return compute_status(StatusInputs(generation=1, wants_process=True, **kw), None, "2026-01-01T00:00:00Z")


def _conditions(status: dict) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in status["conditions"]}


def test_an_idle_model_is_ready_and_says_why_it_has_no_process():
    why = "unloaded: idle for 15m; the next request loads it (held at the front door meanwhile)"
    full = _status(idle=why)
    assert full["phase"] == "Ready" and full["readyReplicas"] == 1  # its slice stays ready
    assert _conditions(full)["Available"] == ("True", "Idle", why)
    assert _conditions(full)["MetalProcessReady"] == ("False", "Idle", why)
    shared = _status(idle=why, shared=True)
    assert "phase" not in shared and _conditions(shared)["MetalProcessReady"] == ("False", "Idle", why)


def test_a_model_loading_on_demand_says_so():
    from metal_agent.core.process import Snapshot, State

    starting = Snapshot(key="ml/chat", spec_hash="h", state=State.STARTING)
    status = _status(process=starting, loading="a request arrived")
    assert _conditions(status)["MetalProcessReady"] == (
        "False", "LoadingOnDemand", "llama-server is loading the model on demand: a request arrived")
    assert status["phase"] == "Progressing"
    assert _conditions(_status(process=starting))["MetalProcessReady"][1] == "ModelLoading"

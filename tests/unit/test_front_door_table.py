"""The front door's routing table: validation (refused whole, with the culprit named),
routing by model, and the backpressure arithmetic."""

from __future__ import annotations

import copy

import pytest

from metal_agent.core.front_door import (
    Admission, RouteState, TableError, admit, models_body, parse_table, retry_after_s,
)

GOOD = {
    "version": 7, "listen_host": "192.168.1.20", "client_port": 9999, "access": {"mode": "cluster"},
    "routes": [
        {"key": "ns/a", "model": "a", "port": 31234, "upstream": "127.0.0.1:40123", "state": "serving",
         "max_inflight": 4, "queue": 64, "queue_timeout_s": 30.0, "access": {"digests": []}},
        {"key": "ns/b", "model": "b", "port": 31235, "upstream": None, "state": "starting"},
    ],
}


def _with(path: list, value):
    table = copy.deepcopy(GOOD)
    target = table
    for step in path[:-1]:
        target = target[step]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return table


def test_a_good_table_parses_with_defaults_and_round_trips():
    table = parse_table(GOOD)
    a, b = table.routes
    assert (table.version, table.listen_host, table.client_port) == (7, "192.168.1.20", 9999)
    assert a.upstream == ("127.0.0.1", 40123) and a.state is RouteState.SERVING and not a.holds
    assert b.holds and (b.max_inflight, b.queue, b.queue_timeout_s) == (4, 64, 30.0)
    assert a.access == {"digests": []} and table.access == {"mode": "cluster"}
    assert parse_table(table.to_json()) == table


@pytest.mark.parametrize(("path", "value", "message"), [
    (["version"], KeyError, "`version` is missing"),
    (["version"], "7", "`version` must be int"),
    (["version"], True, "`version` must be int"),
    (["listen_host"], "mac.local", "is not an IP address"),
    (["client_port"], 70000, "is not a port"),
    (["routes"], {}, "`routes` must be list"),
    (["routes", 0], "ns/a", "routes[0]: must be an object"),
    (["routes", 0, "key"], "a", "route 'a': `key` must be"),
    (["routes", 0, "model"], "", "`model` is empty"),
    (["routes", 0, "port"], 0, "route 'ns/a': `port` 0 is not a port"),
    (["routes", 0, "upstream"], "localhost:80", "is not an IP address"),
    (["routes", 0, "upstream"], "127.0.0.1:http", "is not a number"),
    (["routes", 0, "upstream"], None, "a serving route needs an `upstream`"),
    (["routes", 0, "state"], "asleep", "`state` 'asleep'"),
    (["routes", 0, "max_inflight"], 0, "`max_inflight` 0 is out of range"),
    (["routes", 0, "queue"], -1, "`queue` -1 is out of range"),
    (["routes", 0, "queue_timeout_s"], float("nan"), "queue_timeout_s"),
    (["routes", 0, "queue_timeout_s"], 0, "queue_timeout_s"),
    (["routes", 0, "access"], [], "`access` must be an object"),
    (["routes", 1, "key"], "ns/a", "the key appears twice"),
    (["routes", 1, "port"], 31234, "port 31234 is also 'ns/a'"),
    (["routes", 1, "port"], 9999, "is the client port"),
    (["routes", 1, "model"], "a", "model 'a' is also 'ns/a'"),
])
def test_a_bad_field_refuses_the_whole_table_naming_it(path, value, message):
    with pytest.raises(TableError) as refused:
        parse_table(_with(path, value))
    assert message in str(refused.value)


def test_not_an_object_is_refused():
    with pytest.raises(TableError, match="must be a JSON object"):
        parse_table([GOOD])


def test_the_client_port_may_be_off_and_an_ipv6_upstream_parses():
    table = parse_table(_with(["client_port"], 0))
    assert table.client_port == 0
    assert parse_table(_with(["routes", 0, "upstream"], "[::1]:8080")).routes[0].upstream == ("::1", 8080)


def test_routing_by_model_and_the_models_list():
    table = parse_table(_with(["routes", 1, "state"], "stopped"))
    assert table.by_model("a").key == "ns/a"
    assert table.by_model("b").key == "ns/b"  # a sleeping model is held for (on-demand), not "not found"
    assert table.by_model("c") is None
    assert table.by_key("ns/b").model == "b"
    body = models_body(table, created=1)
    assert [m["id"] for m in body["data"]] == ["a", "b"]
    assert body["data"][1]["metal_agent"] == {"key": "ns/b", "state": "stopped"}


@pytest.mark.parametrize(("holds", "inflight", "queued", "expected"), [
    (False, 0, 0, Admission.GO),
    (False, 3, 0, Admission.GO),
    (False, 4, 0, Admission.WAIT),
    (False, 2, 1, Admission.WAIT),      # FIFO: a free slot does not let a newcomer jump the queue
    (False, 4, 2, Admission.REFUSE),
    (True, 0, 0, Admission.WAIT),       # no engine yet: held
    (True, 0, 2, Admission.REFUSE),
])
def test_admission(holds, inflight, queued, expected):
    assert admit(holds=holds, inflight=inflight, queued=queued, max_inflight=4, queue=2) is expected


def test_a_zero_queue_refuses_everything_beyond_the_slots():
    assert admit(holds=False, inflight=1, queued=0, max_inflight=1, queue=0) is Admission.REFUSE


def test_retry_after_grows_with_the_queue_and_is_bounded():
    assert retry_after_s(holds=False, queued=0, max_inflight=4, queue_timeout_s=30) == 1
    assert retry_after_s(holds=False, queued=8, max_inflight=4, queue_timeout_s=30) == 3
    assert retry_after_s(holds=False, queued=1000, max_inflight=1, queue_timeout_s=30) == 30
    assert retry_after_s(holds=True, queued=0, max_inflight=4, queue_timeout_s=30) == 5
    assert retry_after_s(holds=True, queued=0, max_inflight=4, queue_timeout_s=0.3) == 1

"""fatal_exits_total is counted on the way out, so it must reach the next agent's /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from metal_agent.metrics import AgentMetrics, FatalExitLog


def fresh_agent(path):
    """What a new agent process does at start-up: new registry, counts loaded from the state dir."""
    registry = CollectorRegistry()
    exits = FatalExitLog(path, AgentMetrics(registry).fatal_exits)
    exits.load()
    return registry, exits


def value(registry, subsystem):
    return registry.get_sample_value("llmkube_metal_agent_fatal_exits_total", {"subsystem": subsystem})


def test_an_exit_is_visible_to_the_next_agent_and_the_count_keeps_climbing(tmp_path):
    path = tmp_path / "fatal_exits.json"
    registry, exits = fresh_agent(path)
    assert value(registry, "watch") is None
    exits.record("watch")
    _, exits = fresh_agent(path)  # launchd restarts it
    exits.record("watch")
    exits.record("internal")
    registry, _ = fresh_agent(path)
    assert value(registry, "watch") == 2
    assert value(registry, "internal") == 1


def test_a_corrupt_count_file_never_stops_the_agent(tmp_path):
    path = tmp_path / "fatal_exits.json"
    for junk in ("{not json", "[1, 2]", '{"watch": "many", "internal": -3}'):
        path.write_text(junk)
        registry, exits = fresh_agent(path)
        assert value(registry, "watch") is None
        exits.record("watch")
        registry, _ = fresh_agent(path)
        assert value(registry, "watch") == 1

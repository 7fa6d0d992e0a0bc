"""How often the agent probes its engines: fast while one loads, little once the front door watches."""

from __future__ import annotations

from metal_agent.adapters.process.supervisor import ready_poll_interval


def test_a_loading_engine_is_polled_fast_then_less_as_the_load_drags_on():
    assert ready_poll_interval(0.0) == ready_poll_interval(4.9) == 0.02  # noticed <= 20 ms late
    assert ready_poll_interval(5.0) == ready_poll_interval(29.9) == 0.05
    assert ready_poll_interval(30.0) == ready_poll_interval(600.0) == 0.25  # minutes of loading: 4 probes/s


def test_behind_the_front_door_only_liveness_probes_remain(tmp_path):
    from metal_agent.app.config import AgentConfig, AgentPaths, FrontDoorSettings
    from metal_agent.app.front_door import supervision_for

    paths = AgentPaths(tmp_path / "models", tmp_path / "logs", tmp_path / "state")
    alone = supervision_for(AgentConfig(paths=paths, front_door=FrontDoorSettings(enabled=False)))
    assert alone.readiness_interval == 0.5  # slices point at the engines: the quick probe stays
    behind = supervision_for(AgentConfig(paths=paths, front_door=FrontDoorSettings(enabled=True)))
    assert behind.readiness_interval == behind.liveness_interval == 5.0
    assert behind.liveness_timeout == alone.liveness_timeout and behind.liveness_failures == alone.liveness_failures

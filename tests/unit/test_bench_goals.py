"""Benchmarks exit non-zero when a figure misses its goal (bench/goals.py)."""

from __future__ import annotations

from bench import goals


def test_every_goal_met_exits_zero():
    lines: list[str] = []
    figures = [goals.at_most("writes/min", 0.0, 0), goals.shown_only("CPU s/min", 1.5)]
    assert goals.report(figures, lines.append) == 0
    assert "MISSED" not in "\n".join(lines)


def test_a_missed_goal_exits_one_and_names_the_figure():
    lines: list[str] = []
    figures = [goals.at_most("apply -> exec p50 (ms)", 61.0, 50), goals.at_most("reloads", 0, 0)]
    assert goals.report(figures, lines.append) == 1
    assert lines[-1] == "MISSED: apply -> exec p50 (ms): 61 (goal <= 50)"


def test_a_figure_that_could_not_be_measured_misses_its_goal():
    figure = goals.at_most("agent share", None, 0)
    assert figure.met is False and figure.shown == "not measured"


def test_a_fault_row_misses_on_each_goal_and_on_a_blind_prober():
    from bench.faults import Row, missed

    assert missed(Row("blackhole", converge_s=2.0)) == []
    assert missed(Row("blackhole", converge_s=None)) == ["not converged"]
    blind = Row("latency", converge_s=1.0, prober_blind=True)
    assert missed(blind) == ["wrong-ready not measured (the prober saw too little)"]
    worst = Row("reset", needless_restarts=2, longest_wrong_s=1.5, converge_s=7.0, agent_exits=1,
                notes=["fault did not run as planned: TimeoutError: x"])
    assert len(missed(worst)) == 5

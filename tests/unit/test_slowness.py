"""The suite's one slowness factor: configured, or read from the load, never below 1."""

from __future__ import annotations

import os

import pytest

from tests.support import slowness


def test_a_configured_factor_is_used(monkeypatch):
    monkeypatch.setenv(slowness.ENV, "3")
    assert slowness.factor() == 3.0 and slowness.scaled(0.5) == 1.5


def test_a_factor_below_one_is_refused(monkeypatch):
    monkeypatch.setenv(slowness.ENV, "0.5")
    with pytest.raises(ValueError, match="must be >= 1"):
        slowness.factor()


@pytest.mark.parametrize("load,cpus,expected", [(0.3, 2, 1.0), (6.0, 2, 3.0), (100.0, 2, slowness.MAX_AUTO)])
def test_otherwise_the_load_per_cpu_sets_it(monkeypatch, load, cpus, expected):
    monkeypatch.delenv(slowness.ENV, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(slowness, "_runnable_now", lambda: 0.0)
    assert slowness.factor() == expected


def test_a_burst_the_load_average_has_not_caught_up_with_counts(monkeypatch):
    monkeypatch.delenv(slowness.ENV, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(slowness, "_runnable_now", lambda: 5.0)  # two burners and friends, just started
    assert slowness.factor() == 2.5

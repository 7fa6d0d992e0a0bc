"""`make demo`'s tables size each column to its content, as kubectl does (scripts/demo.py)."""

from __future__ import annotations

from scripts.demo import columns


def test_a_long_value_never_runs_into_the_next_column():
    lines = columns(("TYPE", "STATUS", "REASON", "MESSAGE"), [
        ("Available", "True", "InferenceReady", "Inference service is ready and serving requests"),
        ("MetalProcessReady", "True", "Ready", "llama-server is serving on port 41234"),
    ], indent="  ")
    assert lines == [
        "  TYPE                STATUS   REASON           MESSAGE",
        "  Available           True     InferenceReady   Inference service is ready and serving requests",
        "  MetalProcessReady   True     Ready            llama-server is serving on port 41234",
    ]


def test_no_rows_prints_the_header():
    assert columns(("TYPE", "REASON", "MESSAGE"), []) == ["TYPE   REASON   MESSAGE"]

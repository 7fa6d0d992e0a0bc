"""In CI a skipped test is a failed test.

A skip is how a suite passes without having run: a missing asset, a missing
root, a missing network namespace. `METAL_AGENT_REQUIRE_ASSETS=1` turns the
assets' skips into failures; this turns *every* skip into one when `CI` is
set, and lists each with its reason at the end of the run, so CI cannot go
green on a test it did not run.

A test that truly cannot run in CI says so with
`@pytest.mark.ci_may_skip(reason=...)`; keep that list empty: such a test
is one nobody runs. An expected failure (`xfail`) is not a skip and is left
alone.
"""

from __future__ import annotations

import os

import pytest

MARKER = "ci_may_skip"
_KEY = pytest.StashKey[list]()


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(reason): may skip in CI (the reason is printed); keep unused")
    config.stash[_KEY] = []


def as_failure(item: pytest.Item, report: pytest.TestReport) -> None:
    """Turn `report` into a failure if it is a skip CI does not allow."""
    if not in_ci() or not report.skipped or hasattr(report, "wasxfail"):
        return
    allowed = item.get_closest_marker(MARKER)
    reason = skip_reason(report)
    if allowed is not None:
        item.config.stash[_KEY].append((item.nodeid, f"allowed ({allowed.kwargs.get('reason', '')}): {reason}"))
        return
    item.config.stash[_KEY].append((item.nodeid, reason))
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, where nothing may be skipped: {reason}"


def collection_as_failure(report: pytest.CollectReport) -> None:
    """A module skipped whole (`importorskip`, `allow_module_level`) fails its collection in CI."""
    if in_ci() and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where nothing may be skipped: {skip_reason(report)}"


def summary(terminalreporter, config: pytest.Config) -> None:
    skips = config.stash.get(_KEY, [])
    if not skips:
        return
    terminalreporter.section("skips in CI (each is a failure unless marked ci_may_skip)", red=True)
    for nodeid, reason in skips:
        terminalreporter.line(f"{nodeid}: {reason}")

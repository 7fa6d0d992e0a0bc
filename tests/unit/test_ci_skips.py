"""In CI every skip is a failure, listed with its reason (tests/ci_skips.py), run on a small suite."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import pytest
from tests import ci_skips

def pytest_configure(config):
    ci_skips.configure(config)

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    ci_skips.as_failure(item, outcome.get_result())

@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    ci_skips.collection_as_failure(outcome.get_result())

def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ci_skips.summary(terminalreporter, config)
"""

SUITE = """
import pytest

def test_runs():
    pass

@pytest.mark.skipif(True, reason="needs root and iproute2")
def test_marked():
    pass

@pytest.fixture
def asset():
    pytest.skip("llama-server is not available")

def test_fixture_skip(asset):
    pass

def test_body_skip():
    pytest.skip("no second filesystem")

@pytest.mark.ci_may_skip(reason="only on a Mac")
def test_allowed():
    pytest.skip("checks what a Mac reports")

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_suite=SUITE)
    return pytester


def test_outside_ci_a_skip_is_a_skip(suite: pytest.Pytester, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=4, xfailed=1)
    assert result.ret == 0


def test_in_ci_each_skip_fails_and_is_listed_with_its_reason(suite: pytest.Pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest("-p", "no:cacheprovider")
    # skipif and fixture skips happen in setup: errors; a skip in the body: a failure.
    result.assert_outcomes(passed=1, failed=1, errors=2, skipped=1, xfailed=1)
    assert result.ret != 0
    result.stdout.fnmatch_lines([
        "*skips in CI*",
        "*test_marked: needs root and iproute2",
        "*test_fixture_skip: llama-server is not available",
        "*test_body_skip: no second filesystem",
        "*test_allowed: allowed (only on a Mac): checks what a Mac reports",
    ])


def test_in_ci_a_module_skipped_whole_fails_its_collection(pytester: pytest.Pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_gone='import pytest\nnp = pytest.importorskip("no_such_module_here")\n\ndef test_x():\n    pass\n')
    monkeypatch.setenv("CI", "1")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped in CI*no_such_module_here*"])

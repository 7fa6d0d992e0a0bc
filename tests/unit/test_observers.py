"""The suite's observers fail loudly when they stop observing (issue 25).

A watch that died and a prober that never read a slice both report "nothing
happened", which is what a passing fault or coexistence test asserts. Here
each is made blind on purpose and must say so.
"""

from __future__ import annotations

import asyncio

import pytest
from kubernetes_asyncio import client

from tests.support import coexistence
from tests.support.toxiproxy import MIN_SAMPLES, ProberBlind, SliceProber


class _DeadWatchCluster:
    """A Cluster stand-in whose first read fails, as an API server gone away would."""

    ns = "ns"

    async def isvc(self, name):
        raise ConnectionResetError("the API server went away")


async def test_a_watch_that_died_fails_the_block_it_observed():
    with pytest.raises(AssertionError, match="watch on ns/chat stopped after 0 change"):
        async with coexistence.Changes(_DeadWatchCluster(), "chat"):
            await asyncio.sleep(0)  # let the watch task run (and die)
            await asyncio.sleep(0)


async def test_a_dead_watch_does_not_hide_the_tests_own_failure():
    with pytest.raises(KeyError):
        async with coexistence.Changes(_DeadWatchCluster(), "chat"):
            await asyncio.sleep(0)
            raise KeyError("the test's own failure")


class _Unreadable:
    """A DiscoveryV1Api stand-in for an API server the prober cannot read."""

    async def list_namespaced_endpoint_slice(self, *args, **kwargs):
        raise ConnectionRefusedError("nothing listens")


@pytest.fixture
async def make_prober():
    api = client.ApiClient()

    def make(services) -> SliceProber:
        prober = SliceProber(api, "ns", "127.0.0.1", services)
        prober.discovery = _Unreadable()
        return prober

    yield make
    await api.close()


async def test_a_prober_that_never_read_a_slice_vouches_for_nothing(make_prober):
    prober = make_prober(["a"])
    for _ in range(3 * MIN_SAMPLES):
        await prober.sample()
    assert prober.unknown_samples == 3 * MIN_SAMPLES
    for figure in (prober.longest_dead, prober.longest_wrong, prober.wrong_seconds):
        with pytest.raises(ProberBlind, match="unknown share 100%"):
            figure()


async def test_a_prober_with_too_few_samples_of_a_service_vouches_for_nothing(make_prober):
    prober = make_prober(["a", "b"])
    prober.truth["a"].samples = MIN_SAMPLES
    prober.truth["b"].samples = MIN_SAMPLES - 1  # e.g. watched only at the very end
    with pytest.raises(ProberBlind, match=f"'b': {MIN_SAMPLES - 1}"):
        prober.longest_dead()
    prober.truth["b"].samples = MIN_SAMPLES
    assert prober.longest_dead() == 0.0

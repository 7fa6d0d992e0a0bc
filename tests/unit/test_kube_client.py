"""Every API call has a default timeout; a call that brings its own (a watch) keeps it.

Against a real TCP server that accepts connections and never answers: what
a Mac sees after switching networks without a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator

import aiohttp
import pytest
from kubernetes_asyncio import client

from metal_agent.adapters.kube.client import DEFAULT_TIMEOUT, api_client
from tests.support.slowness import scaled


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """Accepts, reads, never writes a byte."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def agent_client(host: str, total: float) -> AsyncIterator[client.ApiClient]:
    configuration = client.Configuration(host=host)
    api = api_client(configuration, default_timeout=aiohttp.ClientTimeout(total=total, connect=total))
    try:
        yield api
    finally:
        await api.close()


async def test_a_call_to_a_silent_server_fails_within_the_default_timeout():
    async with silent_server() as host, agent_client(host, total=0.3) as api:
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            # The outer bound only keeps a regression from hanging the suite.
            await asyncio.wait_for(client.CoreV1Api(api).list_namespace(), timeout=10)
        assert time.monotonic() - started < scaled(3)


async def test_a_call_with_its_own_timeout_keeps_it():
    """A watch passes a long timeout: the short default must not cut its stream."""
    async with silent_server() as host, agent_client(host, total=0.2) as api:
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(
                client.CustomObjectsApi(api).list_cluster_custom_object(
                    "inference.llmkube.dev", "v1alpha1", "inferenceservices", watch=True,
                    _preload_content=False, _request_timeout=1.2,
                ),
                timeout=10,
            )
        elapsed = time.monotonic() - started
        assert 1.0 <= elapsed < scaled(5), elapsed


def test_the_default_bounds_both_connect_and_total():
    assert DEFAULT_TIMEOUT.total and DEFAULT_TIMEOUT.connect and DEFAULT_TIMEOUT.sock_connect
    assert DEFAULT_TIMEOUT.connect < DEFAULT_TIMEOUT.total

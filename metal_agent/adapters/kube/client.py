"""The Kubernetes API client every part of the agent shares, with a default timeout on every call.

kubernetes_asyncio sends each request with an empty `aiohttp.ClientTimeout`
unless the call passes `_request_timeout`. A Mac that changes network (Wi-Fi
to VPN, a sleep) without a TCP reset then leaves a status patch, a
heartbeat or an Event waiting forever on a socket nobody will ever answer,
and everything queued behind it waits too. Here every call gets
`DEFAULT_TIMEOUT` (connect and total) unless it brings its own: a watch
passes a longer one, since its response is meant to stream for minutes.

The hook is `ApiClient.request`, the single method through which the
generated API classes reach the REST layer, so nothing else in
kubernetes_asyncio changes.
"""

from __future__ import annotations

import aiohttp
from kubernetes_asyncio import client

# Connect: a reachable API server accepts in milliseconds; 5 s rides out a
# slow VPN handshake. Total: the agent's calls are small (one object, one
# namespace's list), so 20 s is generous for a healthy server and still
# short beside the 30 s heartbeat and the 3 min after which LLMKube treats
# a slice as stale.
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=20.0, connect=5.0, sock_connect=5.0)


class TimeoutApiClient(client.ApiClient):
    """An `ApiClient` whose requests time out after `default_timeout` unless the caller says otherwise."""

    def __init__(self, configuration: client.Configuration | None = None, *,
                 default_timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT) -> None:
        super().__init__(configuration)
        self.default_timeout = default_timeout

    def request(self, method, url, query_params=None, headers=None, post_params=None, body=None,
                _preload_content=True, _request_timeout=None):
        if not _request_timeout:  # None (and 0, which kubernetes_asyncio also reads as "no timeout")
            _request_timeout = self.default_timeout
        return super().request(method, url, query_params=query_params, headers=headers,
                               post_params=post_params, body=body, _preload_content=_preload_content,
                               _request_timeout=_request_timeout)


def api_client(configuration: client.Configuration, *,
               default_timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT) -> client.ApiClient:
    """The agent's API client for a loaded `configuration`."""
    return TimeoutApiClient(configuration, default_timeout=default_timeout)

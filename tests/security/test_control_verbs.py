"""Issue 20, item 7: a web page the Mac's owner visits cannot drive the agent's local API.

Against the real agent (`run --fleet`, in its own network namespace, a
"Mac"), its real loopback listener and the real kube-apiserver that holds
its member Lease. Each forged request, the way a browser would send it for
a page (a `text/plain` or form POST, a foreign or `null` Origin, a rebound
Host, a CORS preflight), is refused with 403 and a JSON reason, AND the
verb is not carried out: the agent's fleet view and its Lease in the
cluster still say "not cordoned" after the Lease has been renewed twice
since the last forgery (a renewal carries the cordon the agent holds).
Then the real CLI (`metal-agent drain`, `uncordon`, `fleet`, `status`) still
works, and the Lease follows it.
"""

from __future__ import annotations

import json

import pytest
from kubernetes_asyncio import client

from metal_agent.core.leases import CORDONED_LABEL, member_lease_name
from tests.support import netns
from tests.support.fleet import cli_in, fleet_of
from tests.support.kube import create_namespace, delete_namespace
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]

EVIL = "https://evil.example"
REFUSALS = "llmkube_metal_agent_http_refusals_total"


@pytest.fixture(scope="module")
async def mac(control_plane, admin_api, llama_server_bin, tmp_path_factory):
    namespace = await create_namespace(admin_api)
    try:
        async with fleet_of(control_plane, llama_server_bin, tmp_path_factory.mktemp("verbs"), namespace,
                            {"mac": {}}) as (mac,):
            await mac.agent.start()
            yield mac
    finally:
        await delete_namespace(admin_api, namespace)


async def send(mac, method: str, path: str, headers: dict | None = None, body: bytes = b""):
    return await netns.http_request_in(mac.ns, mac.agent.port, method, path, headers, body)


async def lease(admin_api, mac):
    return await client.CoordinationV1Api(admin_api).read_namespaced_lease(member_lease_name(mac.name), "metal-agent")


async def renewed_twice_since(admin_api, mac, renew_time) -> bool:
    """The Lease was written twice after `renew_time` (one renewal could have been in flight)."""
    seen = {renew_time}

    async def newer() -> bool:
        current = (await lease(admin_api, mac)).spec.renew_time
        seen.add(current)
        return len(seen) >= 3
    return await wait_for(newer, timeout=30, what="two renewals of the member Lease")


def port_host(mac) -> str:
    return f"127.0.0.1:{mac.agent.port}"


# What a page can make a browser send to http://127.0.0.1:<port>, or to its own name rebound there.
FORGED_VERBS = [
    ("the issue's request: text/plain from a foreign page", {"Content-Type": "text/plain", "Origin": EVIL},
     b"{}", "ForeignOrigin"),
    ("text/plain, no Origin", {"Content-Type": "text/plain"}, b"{}", "ContentTypeNotJSON"),
    ("an HTML form", {"Content-Type": "application/x-www-form-urlencoded"}, b"a=b", "ContentTypeNotJSON"),
    ("a multipart form", {"Content-Type": "multipart/form-data; boundary=x"}, b"--x--", "ContentTypeNotJSON"),
    ("no content type", {}, b"", "ContentTypeNotJSON"),
    ("JSON from a foreign page", {"Content-Type": "application/json", "Origin": EVIL}, b"{}", "ForeignOrigin"),
    ("JSON from a sandboxed frame (Origin: null)", {"Content-Type": "application/json", "Origin": "null"},
     b"{}", "ForeignOrigin"),
    ("JSON from another local origin", {"Content-Type": "application/json", "Origin": "http://127.0.0.1:1"},
     b"{}", "ForeignOrigin"),
    ("DNS rebinding: same-origin to the page's own name",
     {"Content-Type": "application/json", "Host": "rebound.evil.example", "Origin": "http://rebound.evil.example"},
     b"{}", "ForeignHost"),
    ("DNS rebinding, no Origin", {"Content-Type": "application/json", "Host": "rebound.evil.example:80"},
     b"{}", "ForeignHost"),
    ("a cross-site fetch (Sec-Fetch-Site)", {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"},
     b"{}", "CrossSite"),
]


async def test_forged_verbs_are_refused_and_not_carried_out(mac, admin_api):
    assert (await lease(admin_api, mac)).metadata.labels[CORDONED_LABEL] == "false"
    for what, headers, body, reason in FORGED_VERBS:
        for verb in ("/v1/fleet/drain", "/v1/fleet/uncordon"):
            status, response_headers, text = await send(mac, "POST", verb, headers, body)
            assert status == 403, (what, verb, status, text)
            assert json.loads(text)["reason"] == reason, (what, text)
            assert not any(h.startswith("access-control-") for h in response_headers), (what, response_headers)

    # A CORS preflight is never answered, so a browser never sends the JSON request behind it.
    status, response_headers, text = await send(mac, "OPTIONS", "/v1/fleet/drain", {
        "Origin": EVIL, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert status == 403 and json.loads(text)["reason"] == "MethodNotAllowed"
    assert not any(h.startswith("access-control-") for h in response_headers)
    for method in ("PUT", "DELETE", "PATCH"):
        assert (await send(mac, method, "/v1/fleet/drain", {"Content-Type": "application/json"}, b"{}"))[0] == 403

    # Nothing was done: not cordoned, here or in the cluster, after two renewals since the last forgery.
    renew_time = (await lease(admin_api, mac)).spec.renew_time
    await renewed_twice_since(admin_api, mac, renew_time)
    assert (await lease(admin_api, mac)).metadata.labels[CORDONED_LABEL] == "false"
    status, _, text = await send(mac, "GET", "/v1/fleet")
    assert status == 200 and json.loads(text)["cordoned"] is False
    assert await mac.agent.metric(REFUSALS, {"reason": "ForeignOrigin"}) >= 2 * 4


@pytest.mark.parametrize("path", ["/v1/fleet", "/v1/services", "/metrics"])
async def test_reads_are_refused_to_a_rebound_name_and_a_foreign_page(mac, path):
    for headers, reason in (({"Host": f"rebound.evil.example:{mac.agent.port}"}, "ForeignHost"),
                            ({"Origin": EVIL}, "ForeignOrigin"), ({"Origin": "null"}, "ForeignOrigin")):
        status, _, text = await send(mac, "GET", path, headers)
        assert status == 403 and json.loads(text)["reason"] == reason, (path, headers, text)
        assert mac.name not in text and "llmkube_" not in text  # nothing of the answer leaked
    # The same read from a local tool answers.
    status, _, text = await send(mac, "GET", path)
    assert status == 200 and (mac.name in text if path == "/v1/fleet" else text)


async def test_a_flood_of_forgeries_is_counted_in_full_and_logged_by_sample(mac):
    before = await mac.agent.metric(REFUSALS, {"reason": "CrossSite"}) or 0.0
    for _ in range(200):
        status, _, _ = await send(mac, "POST", "/v1/fleet/drain",
                                  {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}, b"{}")
        assert status == 403
    assert await mac.agent.metric(REFUSALS, {"reason": "CrossSite"}) == before + 200
    lines = [json.loads(line) for line in mac.agent.log_text().splitlines() if line.startswith("{")]
    logged = [line for line in lines if line.get("event") == "refused a request" and line.get("reason") == "CrossSite"]
    assert 1 <= len(logged) <= 5, len(logged)  # the first few of the interval; a summary follows it


async def test_the_cli_still_drains_and_uncordons(mac, admin_api):
    code, out = await cli_in(mac, "drain", "--timeout", "60")
    assert code == 0, out
    assert "cordoned" in out and "drained" in out
    await wait_for(lambda: _cordoned(admin_api, mac, "true"), timeout=30, what="the Lease to say cordoned")
    code, out = await cli_in(mac, "fleet", "--json")
    assert code == 0 and json.loads(out)["cordoned"] is True, out
    code, out = await cli_in(mac, "uncordon")
    assert code == 0 and "uncordoned" in out, out
    await wait_for(lambda: _cordoned(admin_api, mac, "false"), timeout=30, what="the Lease to say not cordoned")
    code, out = await cli_in(mac, "status")
    assert code == 0, out


async def _cordoned(admin_api, mac, value: str) -> bool:
    return (await lease(admin_api, mac)).metadata.labels.get(CORDONED_LABEL) == value

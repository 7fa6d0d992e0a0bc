"""What a browser could have sent to the agent's HTTP endpoint for a web page: the rules (core/request_guard.py).

The real endpoint and the real CLI are in tests/security/test_control_verbs.py.
"""

from __future__ import annotations

import pytest

from metal_agent.core.request_guard import (
    CROSS_SITE,
    FOREIGN_HOST,
    FOREIGN_ORIGIN,
    METHOD_NOT_ALLOWED,
    NOT_JSON,
    RequestFacts,
    check,
    host_allowed,
    host_name,
)

LOCAL = "127.0.0.1"


def facts(method="POST", path="/v1/fleet/drain", host="127.0.0.1:9090", origin=None,
          content_type="application/json", fetch_site=None, local=LOCAL) -> RequestFacts:
    return RequestFacts(method, path, host, origin, content_type, fetch_site, local)


def reason(**kw) -> str | None:
    refusal = check(facts(**kw), frozenset({"mymac.tailnet.ts.net"}))
    return refusal.reason if refusal else None


@pytest.mark.parametrize("host,name", [
    ("127.0.0.1:9090", "127.0.0.1"), ("[::1]:9090", "::1"), ("LocalHost:80", "localhost"), ("::1", "::1"),
    ("example.com", "example.com"), ("", ""),
])
def test_host_name(host, name):
    assert host_name(host) == name


@pytest.mark.parametrize("host,local,ok", [
    ("127.0.0.1:9090", LOCAL, True), ("127.0.0.2", LOCAL, True), ("localhost:9090", LOCAL, True),
    ("[::1]:9090", "::1", True), ("198.18.0.2:9090", "198.18.0.2", True),  # the address it arrived on
    ("198.18.0.2:9090", "::ffff:198.18.0.2", True),
    ("198.18.0.9:9090", "198.18.0.2", False),  # another address
    ("mymac.tailnet.ts.net:9090", "198.18.0.2", True),  # listed by the owner
    ("evil.example:9090", LOCAL, False), ("localhost.evil.example", LOCAL, False),
    ("127.0.0.1.nip.io:9090", LOCAL, False), ("", LOCAL, False), ("198.18.0.2", None, False),
])
def test_hosts_that_name_this_agent(host, local, ok):
    assert host_allowed(host, local, frozenset({"mymac.tailnet.ts.net"})) is ok


def test_what_the_cli_curl_and_prometheus_send_passes():
    assert reason() is None  # the CLI's POST: JSON, no Origin
    assert reason(method="GET", path="/v1/services", content_type=None) is None
    assert reason(method="HEAD", path="/metrics", content_type=None) is None
    assert reason(method="GET", path="/metrics", host="198.18.0.2:9090", local="198.18.0.2", content_type=None) is None
    assert reason(content_type="application/json; charset=utf-8") is None
    assert reason(origin="http://127.0.0.1:9090") is None  # its own origin
    assert reason(fetch_site="same-origin") is None and reason(fetch_site="none") is None


@pytest.mark.parametrize("kw,why", [
    ({"content_type": "text/plain"}, NOT_JSON),
    ({"content_type": "application/x-www-form-urlencoded"}, NOT_JSON),
    ({"content_type": "multipart/form-data; boundary=x"}, NOT_JSON),
    ({"content_type": None}, NOT_JSON),
    ({"content_type": "application/jsonx"}, NOT_JSON),
    ({"content_type": "text/plain; a=application/json"}, NOT_JSON),
    ({"origin": "https://evil.example"}, FOREIGN_ORIGIN),
    ({"origin": "null"}, FOREIGN_ORIGIN),
    ({"origin": "http://127.0.0.1:9091"}, FOREIGN_ORIGIN),  # another local port is another origin
    ({"origin": "http://127.0.0.1:9090.evil.example"}, FOREIGN_ORIGIN),
    ({"origin": ""}, FOREIGN_ORIGIN),
    ({"fetch_site": "cross-site"}, CROSS_SITE),
    ({"fetch_site": "same-site"}, CROSS_SITE),
    ({"host": "evil.example:9090"}, FOREIGN_HOST),  # DNS rebinding
    ({"host": "evil.example:9090", "origin": "http://evil.example:9090"}, FOREIGN_HOST),
    ({"host": None}, FOREIGN_HOST),
    ({"method": "OPTIONS"}, METHOD_NOT_ALLOWED),  # no preflight is ever answered
    ({"method": "PUT"}, METHOD_NOT_ALLOWED),
    ({"method": "DELETE"}, METHOD_NOT_ALLOWED),
    ({"method": "GET", "path": "/v1/services", "host": "evil.example"}, FOREIGN_HOST),
    ({"method": "GET", "path": "/v1/fleet", "origin": "https://evil.example"}, FOREIGN_ORIGIN),
    ({"method": "GET", "path": "/metrics", "host": "rebound.example:9090"}, FOREIGN_HOST),
])
def test_what_a_web_page_could_send_is_refused(kw, why):
    assert reason(**kw) == why


def test_the_probes_stay_open_for_reads_only():
    assert reason(method="GET", path="/healthz", host="anything.example", origin="null") is None
    assert reason(method="GET", path="/readyz", host=None) is None
    assert reason(method="POST", path="/healthz", content_type="text/plain") == NOT_JSON


def test_a_refusal_quotes_what_was_sent_cut_short():
    refusal = check(facts(origin="https://" + "a" * 5000 + ".example"))
    assert refusal.reason == FOREIGN_ORIGIN and len(refusal.message) < 300

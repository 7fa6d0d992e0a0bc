"""The pure parts of the front door's access sources: the annotation's grammar, a Secret's keys, a Node's networks.
Against the real API server: tests/integration/test_front_door_access.py."""

from __future__ import annotations

import base64

import pytest

from metal_agent.adapters.kube.api_keys import (
    DEFAULT_KEY,
    INVALID,
    MIN_KEY_LENGTH,
    KeyRef,
    Problem,
    _slim_secret,
    digests_of,
    parse_ref,
)
from metal_agent.adapters.kube.cluster_networks import _slim, node_networks
from metal_agent.core.access import MAX_KEYS, ServiceKeys

KEY = "k" * MIN_KEY_LENGTH


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


@pytest.mark.parametrize("value,ref", [
    ("chat-keys", KeyRef("chat-keys", DEFAULT_KEY)), ("chat-keys/token", KeyRef("chat-keys", "token")),
    (" a.b-c/K_e.y-1 ", KeyRef("a.b-c", "K_e.y-1")),
    ("other-namespace/secret", KeyRef("other-namespace", "secret")),  # no place for a namespace: a key
])
def test_the_annotation_names_a_secret_and_a_key_in_the_services_namespace(value, ref):
    assert parse_ref(value) == ref


@pytest.mark.parametrize("value", [
    "", "/", "ns/secret/key", "a/b/c/d", "Secret", "-a", "a-", "a..b", "a/", "/key", "a/b c", "a/ключ", "a" * 254,
    "../etc", "a/../b", "a/b/../c", "a\n/b", "a/b\x00",
])
def test_anything_else_is_refused_with_a_reason(value):
    found = parse_ref(value)
    assert isinstance(found, Problem) and found.reason == INVALID


def test_a_secret_value_holds_one_key_per_line():
    assert digests_of(b64(f"{KEY}\n"), "x") == ServiceKeys.of([KEY])
    two = digests_of(b64(f"\n{KEY}\r\n  {KEY}2  \n\n"), "x")
    assert two == ServiceKeys.of([KEY, KEY + "2"])


@pytest.mark.parametrize("raw,says", [
    ("", "empty"), ("\n \n", "empty"), ("short", "shorter"), (f"{KEY} {KEY}", "whitespace"),
    (f"{KEY}\x07", "control"), (b"\xff\xfe" + KEY.encode(), "UTF-8"),
    ("\n".join(f"{KEY}{i}" for i in range(MAX_KEYS + 1)), "more than"),
])
def test_bad_secret_values_are_problems_that_never_echo_the_value(raw, says):
    found = digests_of(b64(raw), "key 'api-key' of Secret ns/s")
    assert isinstance(found, Problem) and says in found.message
    assert KEY not in found.message and "short" not in found.message.replace("shorter", "")


def test_not_base64_is_a_problem():
    assert isinstance(digests_of("not base64!", "x"), Problem)


def test_a_secrets_values_are_dropped_as_it_is_read():
    slim = _slim_secret({"metadata": {"name": "s", "namespace": "ns", "resourceVersion": "9", "managedFields": []},
                         "data": {"api-key": b64(KEY), "other": b64("tiny")}, "type": "Opaque"})
    assert slim["metadata"] == {"name": "s", "namespace": "ns", "resourceVersion": "9"}
    assert slim["keys"]["api-key"] == ServiceKeys.of([KEY])
    assert isinstance(slim["keys"]["other"], Problem)
    assert KEY not in repr(slim) and b64(KEY) not in repr(slim)


def test_a_nodes_networks_are_its_ips_and_pod_cidrs():
    node = {"metadata": {"name": "n1"},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "192.168.1.20"}, {"type": "ExternalIP", "address": "2001:db8::20"},
                {"type": "Hostname", "address": "n1"}, {"type": "InternalDNS", "address": "n1.local"},
                {"type": "InternalIP", "address": "not-an-ip"}, {"type": "InternalIP"}, "junk"],
                "images": [{"names": ["x"] * 100}]}}
    assert node_networks(node) == {"10.244.1.0/24", "fd00:1::/64", "192.168.1.20/32", "2001:db8::20/128"}
    assert node_networks(_slim(node)) == node_networks(node)
    assert "images" not in _slim(node)["status"]


@pytest.mark.parametrize("node", [{}, {"spec": None, "status": None}, {"spec": {"podCIDRs": ["bad", None]}},
                                  {"status": {"addresses": None}}])
def test_a_node_with_nothing_usable_gives_nothing(node):
    assert node_networks(node) == frozenset()

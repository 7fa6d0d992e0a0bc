"""The pure download rules: which addresses a download may reach, where a token may go,
how large a file may be, how much disk must stay free (core.egress, core.download_limits)."""

from __future__ import annotations

import pytest

from metal_agent.core.download_limits import (
    REASON_DISK,
    REASON_SIZE_UNKNOWN,
    REASON_TOO_LARGE,
    DownloadLimits,
    Refusal,
)
from metal_agent.core.egress import (
    MAX_REDIRECTS,
    EgressPolicy,
    next_hop,
    parse_address,
    parse_networks,
    parse_token_hosts,
    policy,
    same_origin,
)

DEFAULT = EgressPolicy()


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1", "169.254.169.254", "169.254.0.1", "fe80::1",
    "fe80::1%eth0", "10.0.0.1", "172.16.5.4", "192.168.1.10", "fd00::1", "fc00::5", "100.64.0.1",
    "100.100.100.100", "0.0.0.0", "0.1.2.3", "::", "224.0.0.1", "239.255.255.250", "ff02::1",
    "255.255.255.255", "198.18.0.1", "192.0.2.1", "2001:db8::1", "240.0.0.1", "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "::7f00:1", "::ffff:169.254.169.254", "::ffff:10.0.0.1",
])
def test_non_public_addresses_are_refused_by_default(address):
    why = DEFAULT.address_refusal(address)
    assert why is not None and "--download-allow-network" in why or "never" in why


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "18.244.0.1", "2606:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808", "2002:808:808::1"])
def test_public_addresses_are_allowed(address):
    assert DEFAULT.address_refusal(address) is None


def test_messages_say_what_the_address_is():
    assert "loopback" in DEFAULT.address_refusal("127.0.0.1")
    assert "link-local" in DEFAULT.address_refusal("169.254.169.254")
    assert "private" in DEFAULT.address_refusal("192.168.1.2")
    assert "not an IP address" in DEFAULT.address_refusal("localhost")


def test_the_owner_widens_exactly_the_networks_listed():
    owner = EgressPolicy(parse_networks(["192.168.1.0/24", "127.0.0.2"]))
    assert owner.address_refusal("192.168.1.77") is None
    assert owner.address_refusal("::ffff:192.168.1.77") is None  # mapped form, same address
    assert owner.address_refusal("127.0.0.2") is None
    assert owner.address_refusal("127.0.0.1") is not None
    assert owner.address_refusal("192.168.2.1") is not None
    assert owner.address_refusal("8.8.8.8") is None


def test_unspecified_multicast_and_broadcast_are_never_allowed():
    owner = EgressPolicy(parse_networks(["0.0.0.0/1", "224.0.0.0/4", "ff00::/8", "::/1"]))
    for address in ("0.0.0.0", "0.0.0.1", "224.0.0.1", "ff02::1", "::"):
        assert "never" in owner.address_refusal(address)


@pytest.mark.parametrize("bad", ["0.0.0.0/0", "::/0", "nonsense", "300.1.1.1/8", "::ffff:0:0/96"])
def test_network_flag_refuses_nonsense_and_everything(bad):
    with pytest.raises(ValueError):
        parse_networks([bad])


def test_network_flag_takes_commas_and_repeats():
    assert [str(n) for n in parse_networks(["10.0.0.0/8, 192.168.1.5", "fd00::/8"])] == [
        "10.0.0.0/8", "192.168.1.5/32", "fd00::/8"]


def test_parse_address_normalizes():
    assert str(parse_address("::ffff:127.0.0.1")) == "127.0.0.1"
    assert str(parse_address("fe80::1%en0")) == "fe80::1"
    assert parse_address("example.com") is None


# -- tokens -------------------------------------------------------------------------------------

HUB = policy(token_hosts=["models.example.com", "*.corp.example"], hub_endpoint="https://huggingface.co")


@pytest.mark.parametrize("url", [
    "https://huggingface.co/org/repo/resolve/main/m.gguf",
    "https://HuggingFace.co./org/repo/resolve/main/m.gguf",
    "https://models.example.com/m.gguf",
    "https://a.corp.example/m.gguf", "https://a.b.corp.example:8443/m.gguf",
])
def test_token_goes_over_https_to_listed_hosts(url):
    assert HUB.token_refusal(url) is None


@pytest.mark.parametrize("url,words", [
    ("http://huggingface.co/org/repo/resolve/main/m.gguf", "clear text"),
    ("https://evil.example/m.gguf", "not to evil.example"),
    ("https://huggingface.co.evil.example/m.gguf", "not to huggingface.co.evil.example"),
    ("https://corp.example/m.gguf", "not to corp.example"),  # *.corp.example is its subdomains only
    ("https://evilcorp.example/m.gguf", "not to evilcorp.example"),
    ("https://cdn-lfs.huggingface.co/x", "not to cdn-lfs.huggingface.co"),  # signed URLs need no token
    ("ftp://huggingface.co/x", "clear text"),
])
def test_token_is_refused_elsewhere(url, words):
    why = HUB.token_refusal(url)
    assert why is not None and words in why


def test_token_stays_on_the_origin_it_started_at():
    first = "https://huggingface.co/org/repo/resolve/main/m.gguf"
    assert HUB.hop_carries_token(first, "https://huggingface.co/org/renamed/resolve/main/m.gguf")
    assert HUB.hop_carries_token(first, "https://huggingface.co:443/x")
    assert not HUB.hop_carries_token(first, "https://cas-bridge.xethub.hf.co/x?X-Amz-Signature=1")
    assert not HUB.hop_carries_token(first, "https://models.example.com/m.gguf")  # allowed, but another host
    assert not HUB.hop_carries_token(first, "http://huggingface.co/x")  # downgrade
    assert not HUB.hop_carries_token(first, "https://huggingface.co:8443/x")
    assert not HUB.hop_carries_token("http://huggingface.co/x", "http://huggingface.co/x")
    assert not HUB.hop_carries_token("https://evil.example/x", "https://evil.example/x")


def test_the_hub_endpoint_host_is_a_token_host_and_only_it_by_default():
    mirror = policy(hub_endpoint="https://hf-mirror.example")
    assert mirror.token_refusal("https://hf-mirror.example/x") is None
    assert mirror.token_refusal("https://huggingface.co/x") is not None


@pytest.mark.parametrize("bad", ["*", "*.com.", "exa mple.com", "-bad.example", "a..b", "*.", "http://x"])
def test_token_host_flag_refuses_what_is_not_a_host(bad):
    with pytest.raises(ValueError):
        parse_token_hosts([bad])


def test_token_host_flag_normalizes():
    assert parse_token_hosts(["Models.Example.com.", "*.Corp.Example,127.0.0.1", "[::1]"]) == (
        "models.example.com", "*.corp.example", "127.0.0.1", "::1")


def test_same_origin_compares_scheme_host_and_port():
    assert same_origin("https://A.example/x", "https://a.example:443/y")
    assert not same_origin("https://a.example/x", "http://a.example/x")
    assert not same_origin("https://a.example/x", "https://b.example/x")


# -- redirects ----------------------------------------------------------------------------------

def test_redirects_resolve_relative_and_refuse_other_schemes_and_mazes():
    assert next_hop("https://h.example/a/b", "/c", 0) == "https://h.example/c"
    assert next_hop("https://h.example/a/b", "https://cdn.example/x?sig=1", 0) == "https://cdn.example/x?sig=1"
    assert next_hop("https://h.example/a", "file:///etc/passwd", 0) == (
        "a redirect to a file: URL; downloads use http(s) only",)
    assert isinstance(next_hop("https://h.example/a", None, 0), tuple)
    assert isinstance(next_hop("https://h.example/a", "/x", MAX_REDIRECTS), tuple)


# -- sizes and disk -----------------------------------------------------------------------------

LIMITS = DownloadLimits(max_size=1000, free_margin=100)


def test_size_must_be_known_or_the_digest_pinned():
    refused = LIMITS.file_limit("h", None, None, pinned_sha256=False)
    assert isinstance(refused, Refusal) and refused.reason == REASON_SIZE_UNKNOWN
    assert LIMITS.file_limit("h", None, None, pinned_sha256=True) == 1000  # the cap bounds it


def test_size_over_the_cap_is_refused_and_the_smallest_bound_wins():
    refused = LIMITS.file_limit("h", 1001, None, pinned_sha256=True)
    assert isinstance(refused, Refusal) and refused.reason == REASON_TOO_LARGE
    assert isinstance(LIMITS.file_limit("h", 10, 5000, pinned_sha256=False), Refusal)
    assert LIMITS.file_limit("h", 500, None, pinned_sha256=False) == 500
    assert LIMITS.file_limit("h", 500, 400, pinned_sha256=False) == 400
    assert LIMITS.file_limit("h", None, 400, pinned_sha256=False) == 400


def test_disk_must_keep_the_margin():
    assert LIMITS.space_refusal("/d", free=1000, still_needed=900) is None
    refused = LIMITS.space_refusal("/d", free=1000, still_needed=901)
    assert refused is not None and refused.reason == REASON_DISK and "--download-free-margin" in refused.message
    assert LIMITS.space_refusal("/d", free=99, still_needed=0) is not None

"""`--host-ip` validation: what may be published in an EndpointSlice, and what may only be listened on.

A registered address goes into an EndpointSlice the cluster routes to, so
it must be routable unicast. Without registration (`--no-register`) it is
only llama-server's listen address on this Mac: any IP literal is allowed.
The second half pins an operator-precedence bug that refused unspecified,
link-local and multicast literals even without registration.
"""

from __future__ import annotations

import pytest

from metal_agent.core.host_address import validate_host_ip

NOT_ROUTABLE = ["127.0.0.1", "::1", "0.0.0.0", "::", "169.254.1.1", "fe80::1", "224.0.0.251", "ff02::1"]


@pytest.mark.parametrize("value", NOT_ROUTABLE)
def test_registered_address_must_be_routable_unicast(value):
    with pytest.raises(ValueError, match="cannot be registered in an EndpointSlice"):
        validate_host_ip(value, registered=True)


@pytest.mark.parametrize("value", NOT_ROUTABLE)
def test_unregistered_address_may_be_any_literal(value):
    assert validate_host_ip(value, registered=False) == value


@pytest.mark.parametrize("value", ["100.101.102.103", "192.168.1.20", "fd7a:115c:a1e0::1", "2001:db8::7"])
@pytest.mark.parametrize("registered", [True, False])
def test_routable_address_is_accepted_and_normalised(value, registered):
    assert validate_host_ip(value, registered=registered) == value
    assert validate_host_ip(value.upper(), registered=registered) == value  # IPv6 in its canonical form


@pytest.mark.parametrize("value", ["mac.local", "300.1.1.1", "", "10.0.0.1/24"])
@pytest.mark.parametrize("registered", [True, False])
def test_not_an_ip_literal_is_refused_either_way(value, registered):
    with pytest.raises(ValueError, match="is not an IPv4 or IPv6 address"):
        validate_host_ip(value, registered=registered)

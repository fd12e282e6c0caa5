"""Client address rules (gateway/addresses.py): one normalisation for every rule."""

from __future__ import annotations

import pytest

from gateway.addresses import Networks, client_address, client_ip, format_peer, limit_key


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),  # an IPv4 client on a dual-stack [::] listener
        ("::ffff:7f00:1", "127.0.0.1"),
        ("fe80::1%eth0", "fe80::1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("not-an-ip", None),
        ("", None),
        (None, None),
    ],
)
def test_client_ip(address: str | None, expected: str | None) -> None:
    ip = client_ip(address)
    assert (str(ip) if ip is not None else None) == expected
    assert client_address(address) == expected


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        (None, "-"),
    ],
)
def test_limit_key(address: str | None, key: str) -> None:
    assert limit_key(address) == key


@pytest.mark.parametrize(
    ("address", "inside"),
    [
        ("127.0.0.1", True),
        ("::ffff:127.0.0.1", True),
        ("::1", True),
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),
        ("192.0.2.7", False),
        ("::ffff:192.0.2.7", False),
        ("2001:db8::1", False),
        ("garbage", False),
        (None, False),
    ],
)
def test_networks_match_ipv4_mapped_clients(address: str | None, inside: bool) -> None:
    assert (address in Networks(["127.0.0.0/8", "::1/128", "10.0.0.0/8"])) is inside


@pytest.mark.parametrize(
    ("host", "port", "shown"),
    [
        ("192.0.2.7", 4711, "192.0.2.7:4711"),
        ("2001:db8::1", 4711, "[2001:db8::1]:4711"),
        ("::ffff:127.0.0.1", 110, "[::ffff:127.0.0.1]:110"),
        (None, None, "?:?"),
    ],
)
def test_format_peer(host: str | None, port: int | None, shown: str) -> None:
    assert format_peer(host, port) == shown

"""clients: longest-prefix match on integers, IPv4-mapped sources, garbage is unauthorized."""

from __future__ import annotations

import ipaddress

import pytest

from smartdns.core.clients import AuthorizedClients, device_digest


def _row(text: str) -> tuple[int, int, int]:
    network = ipaddress.ip_network(text)
    return (network.version, int(network.network_address), network.prefixlen)


CLIENTS = AuthorizedClients.from_prefixes(
    _row(text)
    for text in [
        "203.0.113.7/32",
        "198.51.100.0/24",
        "2001:db8:7::/64",
        "2001:db8::1/128",
        "127.0.0.2/32",
    ]
)


@pytest.mark.parametrize(
    ("host", "authorized"),
    [
        ("203.0.113.7", True),
        ("203.0.113.8", False),
        ("198.51.100.1", True),
        ("198.51.100.255", True),
        ("198.51.101.0", False),
        ("2001:db8:7::1", True),
        ("2001:db8:7:0:ffff:ffff:ffff:ffff", True),
        ("2001:db8:8::1", False),
        ("2001:db8::1", True),
        ("2001:db8::2", False),
        ("::ffff:203.0.113.7", True),
        ("::ffff:203.0.113.9", False),
        ("fe80::1%eth0", False),
        ("127.0.0.2", True),
        ("127.0.0.3", False),
        ("not-an-address", False),
        ("", False),
    ],
)
def test_is_authorized(host: str, authorized: bool) -> None:
    assert CLIENTS.is_authorized(host) is authorized


def test_entries_and_empty() -> None:
    assert CLIENTS.entries == 5
    empty = AuthorizedClients.from_prefixes([])
    assert empty.entries == 0 and not empty.is_authorized("203.0.113.7")


def test_scoped_link_local_matches_its_prefix() -> None:
    clients = AuthorizedClients.from_prefixes([_row("fe80::/64")])
    assert clients.is_authorized("fe80::1%eth0")


def test_device_digests_are_applied_change_by_change() -> None:
    first, second = device_digest("a" * 20), device_digest("b" * 20)
    clients = AuthorizedClients.from_prefixes([], [first])
    assert clients.holds_device(first) and not clients.holds_device(second)
    clients.apply([], [], devices_present=[second], devices_gone=[first])
    assert clients.holds_device(second) and not clients.holds_device(first)
    assert clients.entries == 0  # IDs are not address entries


def test_device_digest_is_sha256_of_the_id() -> None:
    assert device_digest("abc").hex().startswith("ba7816bf8f01cfea")

"""Addresses and a snapshot builder shared by the store's unit tests (tests/unit/test_store_*)."""

from __future__ import annotations

import ipaddress
from types import MappingProxyType

from smartdns.registrations.entries import Network, Snapshot

A = ipaddress.IPv4Network("203.0.113.7/32")
B = ipaddress.IPv4Network("198.51.100.0/24")
C = ipaddress.IPv6Network("2001:db8:7::/64")
D = ipaddress.IPv6Network("2001:db8::1/128")


def snapshot(version: int, accounts: dict[str, tuple[Network, ...]]) -> Snapshot:
    return Snapshot(version=version, accounts=MappingProxyType(accounts))

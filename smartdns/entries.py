"""Registration input: account ids, addresses and prefixes, sync documents (SPEC 3 and 4).

Pure; no I/O. Error reasons name the entry by position and never repeat the submitted value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from smartdns.config import RegistrationsConfig
from smartdns.errors import RegistrationError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_VERSION: Final = 2**63 - 1  # SQLite INTEGER range
_ACCOUNT_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Longest valid text is "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128" (49 characters).
_MAX_ADDRESS_CHARS: Final = 64
_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")
_MULTICAST_V4: Final = ipaddress.IPv4Network("224.0.0.0/4")
_MULTICAST_V6: Final = ipaddress.IPv6Network("ff00::/8")
_ACCOUNT_KEYS: Final = frozenset({"version", "addresses"})
_SNAPSHOT_KEYS: Final = frozenset({"version", "accounts"})


class ShapeError(RegistrationError):
    """A document of the wrong shape (HTTP 400), as opposed to a rule violation (HTTP 422).

    Shape: the body is not an object, top-level keys are missing or extra, the version is
    missing or not an integer in range, `addresses` is not a list, `accounts` is not an object.
    """


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A validated `PUT /v1/snapshot` document: every account at one version."""

    version: int
    accounts: Mapping[str, tuple[Network, ...]]


def validate_account_id(value: object) -> str:
    """Return `value` if it is a valid opaque account id (`[A-Za-z0-9._:-]{1,128}`).

    fullmatch, not match with `$`: "a\\n" must fail. Raises RegistrationError("account", ...).
    """
    if not isinstance(value, str):
        raise RegistrationError("account", "must be a string")
    if _ACCOUNT_ID.fullmatch(value) is None:
        raise RegistrationError("account", "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -")
    return value


def parse_address(value: object, rules: RegistrationsConfig) -> Network:
    """Parse one registration entry: an address (→ /32 or /128) or a prefix `address/len`.

    IPv4-mapped IPv6 (`::ffff:a.b.c.d`, `::ffff:a.b.c.0/120`) becomes the IPv4 address or
    prefix, because that is how a dual-stack socket's mapped source is matched (SPEC 2).
    Raises ValueError(reason); the reason never contains `value`, since it is echoed to the
    portal and may reach logs.
    """
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if any(char.isspace() for char in value):
        raise ValueError("must not contain whitespace")
    if "%" in value:
        raise ValueError("scoped IPv6 addresses are not accepted")
    if not value.isascii() or len(value) > _MAX_ADDRESS_CHARS:
        raise ValueError("not a valid IP address or prefix")
    network = _parse_network(value)
    network = _unmap(network)
    floor = rules.min_prefix_v4 if network.version == 4 else rules.min_prefix_v6
    if network.prefixlen < floor:
        raise ValueError(f"prefix /{network.prefixlen} is wider than the allowed /{floor}")
    _check_special(network)
    # Prefixes are aligned blocks, and so are the non-global ranges: a prefix at or above the
    # floor is global throughout when both of its ends are.
    if rules.public_only and not (
        network.network_address.is_global and network.broadcast_address.is_global
    ):
        raise ValueError("not a globally routable address (registrations.public_only)")
    return network


def _parse_network(value: str) -> Network:
    """Syntax only: `address` or `address/len` with a decimal length and no host bits."""
    text, slash, length_text = value.partition("/")
    try:
        # ip_address rejects IPv4 octets with leading zeros (Python >= 3.9.5), as we want:
        # "010.0.0.1" is octal to some parsers and decimal to others.
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("not a valid IP address or prefix") from None
    if not slash:
        return ipaddress.ip_network(address)
    if not (length_text.isascii() and length_text.isdigit()) or len(length_text) > 3:
        raise ValueError("prefix length must be a decimal number")
    length = int(length_text)
    if length > address.max_prefixlen:
        raise ValueError(f"prefix length /{length} is out of range")
    network = ipaddress.ip_network((address, length), strict=False)
    if network.network_address != address:
        raise ValueError("host bits set")
    return network


def _unmap(network: Network) -> Network:
    """`::ffff:a.b.c.d/n` (n >= 96) → `a.b.c.d/(n - 96)`; other networks unchanged."""
    if isinstance(network, ipaddress.IPv4Network) or not network.subnet_of(_MAPPED):
        return network
    mapped = network.network_address.ipv4_mapped
    assert mapped is not None  # inside ::ffff:0:0/96
    return ipaddress.IPv4Network((mapped, network.prefixlen - _MAPPED.prefixlen))


def _check_special(network: Network) -> None:
    """Unspecified and multicast are never a client source; reject prefixes containing them."""
    if network.network_address.is_unspecified:
        raise ValueError("unspecified address")
    if isinstance(network, ipaddress.IPv4Network):
        multicast = network.overlaps(_MULTICAST_V4)
    else:
        multicast = network.overlaps(_MULTICAST_V6)
    if multicast:
        raise ValueError("multicast address")
    if isinstance(network, ipaddress.IPv6Network) and network.supernet_of(_MAPPED):
        # Mapped sources are matched as IPv4, so such a prefix would not mean what it says.
        raise ValueError("IPv4-mapped prefix is shorter than /96")


def _sort_key(network: Network) -> tuple[int, int, int]:
    return (network.version, int(network.network_address), network.prefixlen)


def parse_addresses(
    values: object, rules: RegistrationsConfig, field: str = "addresses"
) -> tuple[Network, ...]:
    """Parse an account's list of entries; the first bad entry is reported as `field[i]`.

    Duplicates (after normalization) collapse, so `203.0.113.7` and `::ffff:203.0.113.7`
    count once. Returns a sorted tuple: IPv4 first, then by address and prefix length.
    A non-list is a ShapeError; bad entries, including non-strings, are RegistrationErrors.
    """
    if not isinstance(values, list):
        raise ShapeError(field, "must be a list")
    unique: set[Network] = set()
    for index, value in enumerate(values):
        try:
            unique.add(parse_address(value, rules))
        except ValueError as exc:
            raise RegistrationError(f"{field}[{index}]", str(exc)) from None
    if len(unique) > rules.max_per_account:
        raise RegistrationError(
            field, f"{len(unique)} entries exceed the limit of {rules.max_per_account} per account"
        )
    return tuple(sorted(unique, key=_sort_key))


def parse_version(value: object, position: str = "version") -> int:
    """A portal version: an integer (not a bool) in 0..2**63-1; anything else is a ShapeError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShapeError(position, "must be an integer")
    if not 0 <= value <= MAX_VERSION:
        raise ShapeError(position, "must be between 0 and 2**63-1")
    return value


def _check_keys(doc: object, expected: frozenset[str]) -> dict[str, object]:
    if not isinstance(doc, dict):
        raise ShapeError("", "body must be a JSON object")
    for key in sorted(expected):
        if key not in doc:
            raise ShapeError(key, "missing")
    if len(doc) != len(expected):
        # Unknown key names are not echoed: they are arbitrary client text.
        names = " and ".join(f'"{key}"' for key in sorted(expected))
        raise ShapeError("", f"unexpected top-level key; only {names} are allowed")
    return doc


def parse_account_document(
    doc: object, rules: RegistrationsConfig
) -> tuple[int, tuple[Network, ...]]:
    """Validate a `PUT /v1/accounts/{account}` body: `{"version": N, "addresses": [...]}`."""
    body = _check_keys(doc, _ACCOUNT_KEYS)
    version = parse_version(body["version"])
    return version, parse_addresses(body["addresses"], rules)


def parse_snapshot_document(doc: object, rules: RegistrationsConfig) -> Snapshot:
    """Validate a `PUT /v1/snapshot` body: `{"version": N, "accounts": {"acct": [...], ...}}`.

    Positions name accounts by id (`accounts["acct-1"][3]`), which is an opaque portal id;
    an invalid id is named by its index among the keys instead, since it is unchecked text.
    """
    body = _check_keys(doc, _SNAPSHOT_KEYS)
    version = parse_version(body["version"])
    accounts_doc = body["accounts"]
    if not isinstance(accounts_doc, dict):
        raise ShapeError("accounts", "must be an object")
    accounts: dict[str, tuple[Network, ...]] = {}
    for index, (account, values) in enumerate(accounts_doc.items()):
        try:
            validate_account_id(account)
        except RegistrationError as exc:
            raise RegistrationError(f"accounts (key #{index})", exc.reason) from None
        accounts[account] = parse_addresses(values, rules, field=f'accounts["{account}"]')
    return Snapshot(version=version, accounts=MappingProxyType(accounts))


def format_network(network: Network) -> str:
    """`203.0.113.7` for a host route, `2001:db8:7::/64` for a prefix (list, export, GET)."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)

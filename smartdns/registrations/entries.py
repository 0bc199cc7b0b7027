"""Registration input: account ids, addresses and prefixes, sync documents (SPEC 3 and 4).

Pure; no I/O. Error reasons name the entry by position and never repeat the submitted value.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, NamedTuple, overload

from smartdns.config.model import RegistrationsConfig
from smartdns.errors import RegistrationError
from smartdns.registrations.device_ids import (
    DIGESTS_KEY,
    check_count,
    parse_device_id,
    parse_digest_hex,
)
from smartdns.registrations.hostnames import parse_hostname

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# One validated entry as a row of the registry's `entries` table: account, family (4 or 6),
# network address packed big-endian (4 or 16 bytes, so byte order is address order), length.
EntryRow = tuple[str, int, bytes, int]

MAX_VERSION: Final = 2**63 - 1  # SQLite INTEGER range
_ACCOUNT_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Longest valid text is "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128" (49 characters).
_MAX_ADDRESS_CHARS: Final = 64
_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")
_MULTICAST_V4: Final = ipaddress.IPv4Network("224.0.0.0/4")
_MULTICAST_V6: Final = ipaddress.IPv6Network("ff00::/8")
_ACCOUNT_KEYS: Final = frozenset({"version", "addresses"})
_SNAPSHOT_KEYS: Final = frozenset({"version", "accounts"})
_OPTIONAL: Final = frozenset({"hostnames", "device_ids"})  # optional next to "addresses"
_ENTRY_KEYS: Final = frozenset({"addresses"})  # a snapshot account in the object form
_ENTRY_OPTIONAL: Final = _OPTIONAL | {DIGESTS_KEY}  # an export's digests, see device_ids.py


class ShapeError(RegistrationError):
    """A document of the wrong shape (HTTP 400), as opposed to a rule violation (HTTP 422).

    Shape: the body is not an object, top-level keys are missing or extra, the version is
    missing or not an integer in range, `addresses` is not a list, `accounts` is not an object.
    """


class AccountEntries(Sequence[Network]):
    """An account's validated entries, held as registry rows and read as networks.

    `rows` are sorted and unique, in the order of `parse_addresses` (IPv4 first, then by
    address and prefix length), all for `account`; the registry inserts them as they are.
    Indexing and iterating build `ipaddress` networks on demand, so a million-entry snapshot
    never holds a million network objects. Equal to another AccountEntries with the same
    entries, and to a tuple of the same networks (what `parse_addresses` returns).
    """

    __slots__ = ("account", "rows")

    def __init__(self, account: str, rows: tuple[EntryRow, ...]) -> None:
        self.account = account
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> Network: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Network, ...]: ...

    def __getitem__(self, index: int | slice) -> Network | tuple[Network, ...]:
        if isinstance(index, slice):
            return tuple(map(_row_network, self.rows[index]))
        return _row_network(self.rows[index])

    def __iter__(self) -> Iterator[Network]:
        return map(_row_network, self.rows)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AccountEntries):
            return [row[1:] for row in self.rows] == [row[1:] for row in other.rows]
        if isinstance(other, tuple):
            return tuple(self) == other
        return NotImplemented

    def __repr__(self) -> str:
        return f"AccountEntries({len(self.rows)} entries)"  # never the addresses


def _row_network(row: EntryRow) -> Network:
    if row[1] == 4:
        return ipaddress.IPv4Network((int.from_bytes(row[2]), row[3]))
    return ipaddress.IPv6Network((int.from_bytes(row[2]), row[3]))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A validated `PUT /v1/snapshot` document: every account at one version.

    From `parse_snapshot_document` each value is an AccountEntries (compact; the registry
    inserts its rows directly); any sequence of networks is accepted as well.
    """

    version: int
    accounts: Mapping[str, Sequence[Network]]
    # account → its hostnames (normalized, sorted); accounts without hostnames are absent
    hostnames: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    # account → its device ID digests (sorted); accounts without device IDs are absent
    devices: Mapping[str, tuple[bytes, ...]] = field(default_factory=lambda: MappingProxyType({}))


class AccountDocument(NamedTuple):
    """A validated `PUT /v1/accounts/{account}` body."""

    version: int
    networks: tuple[Network, ...]
    hostnames: tuple[str, ...] = ()
    devices: tuple[bytes, ...] = ()  # device ID digests in the order given (positions)


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


def _non_global_bounds(network_type: type[Network]) -> tuple[int, ...]:
    """Boundaries b0 < b1 < ... such that an address `a` is not global (`is_global` false)
    exactly when `bisect_right(bounds, a)` is odd.

    Derived from the interpreter's own tables, not copied: `is_global` is a combination of
    membership tests against the networks listed in the address class's constants (private
    networks, their exceptions in newer Pythons, shared address space), so it is constant
    between consecutive ends of those networks, and one `is_global` per segment decides it.
    IPv6 addresses below 2**48 (the IPv4-mapped and -compatible ranges, whose answer depends
    on the embedded IPv4 address) are not covered; the fast path never asks about them.
    """
    address_type = network_type(0).network_address.__class__
    bits = address_type(0).max_prefixlen
    constants = vars(getattr(address_type, "_constants"))  # noqa: B009  # private, untyped
    cuts = {0, 1 << bits}
    for value in constants.values():
        for network in value if isinstance(value, list | tuple) else [value]:
            if isinstance(network, network_type):
                cuts.add(int(network.network_address))
                cuts.add(int(network.broadcast_address) + 1)
    ends = sorted(cuts)
    bounds: list[int] = []
    for start in ends[:-1]:
        if (len(bounds) % 2 == 0) == (not address_type(start).is_global):
            bounds.append(start)  # the state changes here
    return tuple(bounds)


_NON_GLOBAL_V4: Final = _non_global_bounds(ipaddress.IPv4Network)
_NON_GLOBAL_V6: Final = _non_global_bounds(ipaddress.IPv6Network)
# Per family, for _fast_row: version, socket family, bits, host mask by prefix length, first
# and last multicast address, non-global bounds, lowest acceptable network address. IPv4: 1
# (0.0.0.0 is unspecified). IPv6: 2**48, leaving ::/80 (unspecified, IPv4-compatible and
# -mapped forms, prefixes containing ::ffff:0:0/96) to parse_address.
_Family = tuple[int, int, int, tuple[int, ...], int, int, tuple[int, ...], int]
_V4: Final[_Family] = (
    4,
    socket.AF_INET,
    32,
    tuple((1 << (32 - length)) - 1 for length in range(33)),
    int(_MULTICAST_V4.network_address),
    int(_MULTICAST_V4.broadcast_address),
    _NON_GLOBAL_V4,
    1,
)
_V6: Final[_Family] = (
    6,
    socket.AF_INET6,
    128,
    tuple((1 << (128 - length)) - 1 for length in range(129)),
    int(_MULTICAST_V6.network_address),
    int(_MULTICAST_V6.broadcast_address),
    _NON_GLOBAL_V6,
    1 << 48,
)


def _fast_row(value: object, account: str, rules: RegistrationsConfig) -> EntryRow | None:
    """The entry's row when `value` is a plain, acceptable IPv4 or IPv6 address or prefix;
    None for anything else (invalid, rejected or unusual), which parse_address then decides.

    Only ever accepts what parse_address accepts, with the same result: socket.inet_pton
    (strict dotted quads without leading zeros, IPv6 without a zone; any other character,
    whitespace included, fails it) then the rules as integer comparisons. IPv6 with an
    embedded IPv4 part is left to parse_address rather than to the C library's reading of
    it. tests/unit/test_entries.py checks the agreement differentially.
    """
    if type(value) is not str or len(value) > _MAX_ADDRESS_CHARS or not value.isascii():
        return None
    text, slash, length_text = value.partition("/")
    if ":" in text:
        if "." in text:
            return None
        family, floor = _V6, rules.min_prefix_v6
    else:
        family, floor = _V4, rules.min_prefix_v4
    version, socket_family, bits, host_masks, mc_first, mc_last, non_global, lowest = family
    try:
        packed = socket.inet_pton(socket_family, text)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None
    length = bits
    if slash:
        if not length_text.isdigit() or len(length_text) > 3:
            return None
        length = int(length_text)
        if length > bits:
            return None
    first = int.from_bytes(packed)
    if length < floor or first < lowest:
        return None
    host = host_masks[length]
    last = first | host
    if (
        first & host
        or (first <= mc_last and last >= mc_first)
        or (
            rules.public_only
            and (bisect_right(non_global, first) & 1 or bisect_right(non_global, last) & 1)
        )
    ):
        return None
    return (account, version, packed, length)


def _parse_entries(
    values: object, rules: RegistrationsConfig, field: str, account: str
) -> AccountEntries:
    """parse_addresses' work, as the account's registry rows (see AccountEntries)."""
    if not isinstance(values, list):
        raise ShapeError(field, "must be a list")
    unique: set[EntryRow] = set()
    add = unique.add
    for index, value in enumerate(values):
        row = _fast_row(value, account, rules)
        if row is None:
            try:
                network = parse_address(value, rules)
            except ValueError as exc:
                raise RegistrationError(f"{field}[{index}]", str(exc)) from None
            row = (account, network.version, network.network_address.packed, network.prefixlen)
        add(row)
    if len(unique) > rules.max_per_account:
        raise RegistrationError(
            field, f"{len(unique)} entries exceed the limit of {rules.max_per_account} per account"
        )
    # Same account throughout: sorted by family, then packed address (big-endian, so numeric
    # order), then prefix length.
    return AccountEntries(account, tuple(sorted(unique)))


def parse_addresses(
    values: object, rules: RegistrationsConfig, field: str = "addresses"
) -> tuple[Network, ...]:
    """Parse an account's list of entries; the first bad entry is reported as `field[i]`.

    Duplicates (after normalization) collapse, so `203.0.113.7` and `::ffff:203.0.113.7`
    count once. Returns a sorted tuple: IPv4 first, then by address and prefix length.
    A non-list is a ShapeError; bad entries, including non-strings, are RegistrationErrors.
    """
    return tuple(_parse_entries(values, rules, field, ""))


def parse_version(value: object, position: str = "version") -> int:
    """A portal version: an integer (not a bool) in 0..2**63-1; anything else is a ShapeError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShapeError(position, "must be an integer")
    if not 0 <= value <= MAX_VERSION:
        raise ShapeError(position, "must be between 0 and 2**63-1")
    return value


def parse_hostnames(
    values: object, rules: RegistrationsConfig, field: str = "hostnames"
) -> tuple[str, ...]:
    """Parse an account's list of hostnames (hostnames.parse_hostname); the first bad one is
    reported as `field[i]`.

    Duplicates (after normalization: case, trailing dot) collapse, so `Home.example.net.` and
    `home.example.net` count once against `registrations.max_hostnames_per_account`. Returns
    the names sorted. A non-list is a ShapeError; bad names, non-strings included, are
    RegistrationErrors.
    """
    if not isinstance(values, list):
        raise ShapeError(field, "must be a list")
    unique: set[str] = set()
    for index, value in enumerate(values):
        try:
            unique.add(parse_hostname(value))
        except ValueError as exc:
            raise RegistrationError(f"{field}[{index}]", str(exc)) from None
    limit = rules.max_hostnames_per_account
    if len(unique) > limit:
        raise RegistrationError(
            field, f"{len(unique)} hostnames exceed the limit of {limit} per account"
        )
    return tuple(sorted(unique))


def parse_device_ids(
    values: object, rules: RegistrationsConfig, field: str = "device_ids"
) -> tuple[bytes, ...]:
    """An account's device IDs as their digests (device_ids.parse_device_id), in the order
    given; the first bad one is reported as `field[i]`.

    The same ID twice is refused, not folded as addresses and hostnames are: an ID is issued
    to one device, so a repeat is a portal bug, and refusing keeps each digest's index equal
    to its position in the request (a conflict the store finds is named by that index).
    """
    return _parse_digests(values, rules, field, parse_device_id)


def parse_device_digests(
    values: object, rules: RegistrationsConfig, field: str = DIGESTS_KEY
) -> tuple[bytes, ...]:
    """Device ID digests in hex (device_ids.parse_digest_hex), with parse_device_ids' rules:
    what the feed's values and an export carry in place of the IDs."""
    return _parse_digests(values, rules, field, parse_digest_hex)


def _parse_digests(
    values: object, rules: RegistrationsConfig, field: str, parse: Callable[[object], bytes]
) -> tuple[bytes, ...]:
    if not isinstance(values, list):
        raise ShapeError(field, "must be a list")
    first: dict[bytes, int] = {}
    for index, value in enumerate(values):
        try:
            digest = parse(value)
        except ValueError as exc:
            raise RegistrationError(f"{field}[{index}]", str(exc)) from None
        if digest in first:
            raise RegistrationError(f"{field}[{index}]", f"the same ID as {field}[{first[digest]}]")
        first[digest] = index
    check_count(len(first), rules.max_device_ids_per_account, field)
    return tuple(first)


def _check_keys(
    doc: object, expected: frozenset[str], optional: frozenset[str] = frozenset(), where: str = ""
) -> dict[str, object]:
    """`doc` as a dict with every key of `expected`, and no others but `optional` ones."""
    if not isinstance(doc, dict):
        raise ShapeError(where, "must be a JSON object" if where else "body must be a JSON object")
    for key in sorted(expected):
        if key not in doc:
            raise ShapeError(f"{where}.{key}" if where else key, "missing")
    if any(key not in expected and key not in optional for key in doc):
        # Unknown key names are not echoed: they are arbitrary client text.
        names = " and ".join(f'"{key}"' for key in sorted(expected | optional))
        level = "key" if where else "top-level key"
        raise ShapeError(where, f"unexpected {level}; only {names} are allowed")
    return doc


def parse_account_document(doc: object, rules: RegistrationsConfig) -> AccountDocument:
    """Validate a `PUT /v1/accounts/{account}` body:
    `{"version": N, "addresses": [...], "hostnames": [...], "device_ids": [...]}`
    (`hostnames` and `device_ids` optional)."""
    body = _check_keys(doc, _ACCOUNT_KEYS, _OPTIONAL)
    version = parse_version(body["version"])
    networks = parse_addresses(body["addresses"], rules)
    hostnames = parse_hostnames(body["hostnames"], rules) if "hostnames" in body else ()
    devices = parse_device_ids(body["device_ids"], rules) if "device_ids" in body else ()
    return AccountDocument(version, networks, hostnames, devices)


def parse_snapshot_document(doc: object, rules: RegistrationsConfig) -> Snapshot:
    """Validate a `PUT /v1/snapshot` body: `{"version": N, "accounts": {...}}`, each account
    a list of addresses or an object `{"addresses": [...], "hostnames": [...], "device_ids":
    [...], "device_id_sha256": [...]}` (all but `addresses` optional; the digests are what
    `registrations export` writes, since the IDs themselves are not kept).

    Positions name accounts by id (`accounts["acct-1"][3]`, `accounts["acct-1"].hostnames[0]`),
    which is an opaque portal id; an invalid id is named by its index among the keys instead,
    since it is unchecked text. A device ID given to two accounts is refused at the second
    (SPEC 3: an ID belongs to at most one account).
    """
    body = _check_keys(doc, _SNAPSHOT_KEYS)
    version = parse_version(body["version"])
    accounts_doc = body["accounts"]
    if not isinstance(accounts_doc, dict):
        raise ShapeError("accounts", "must be an object")
    accounts: dict[str, AccountEntries] = {}
    hostnames: dict[str, tuple[str, ...]] = {}
    devices: dict[str, tuple[bytes, ...]] = {}
    holders: set[bytes] = set()
    for index, (account, values) in enumerate(accounts_doc.items()):
        try:
            validate_account_id(account)
        except RegistrationError as exc:
            raise RegistrationError(f"accounts (key #{index})", exc.reason) from None
        position = f'accounts["{account}"]'
        if isinstance(values, dict):
            entry = _check_keys(values, _ENTRY_KEYS, _ENTRY_OPTIONAL, position)
            values = entry["addresses"]
            names = parse_hostnames(entry.get("hostnames", []), rules, f"{position}.hostnames")
            if names:
                hostnames[account] = names
            digests = _snapshot_devices(entry, rules, position, holders)
            if digests:
                devices[account] = digests
            position += ".addresses"
        accounts[account] = _parse_entries(values, rules, position, account)
    return Snapshot(
        version, MappingProxyType(accounts), MappingProxyType(hostnames), MappingProxyType(devices)
    )


def _snapshot_devices(
    entry: dict[str, object], rules: RegistrationsConfig, position: str, holders: set[bytes]
) -> tuple[bytes, ...]:
    """A snapshot account's digests, from its IDs and its hex digests, sorted; `holders`
    collects every account's so far, so an ID two accounts are given is refused."""
    fields = (("device_ids", parse_device_ids), (DIGESTS_KEY, parse_device_digests))
    digests: list[bytes] = []
    for name, parse in fields:
        for index, digest in enumerate(parse(entry.get(name, []), rules, f"{position}.{name}")):
            if digest in holders:
                reason = "given to another account too" if digest not in digests else "repeated"
                raise RegistrationError(f"{position}.{name}[{index}]", reason)
            holders.add(digest)
            digests.append(digest)
    check_count(len(digests), rules.max_device_ids_per_account, f"{position}.device_ids")
    return tuple(sorted(digests))


def format_network(network: Network) -> str:
    """`203.0.113.7` for a host route, `2001:db8:7::/64` for a prefix (list, export, GET)."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)

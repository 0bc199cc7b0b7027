"""The registration feed's bucket format (SPEC 4 "Registration feed"): keys and values.

Pure; no I/O. A portal may write the bucket directly with any NATS client; docs/feed.md is the
contract it follows, and this module is its one implementation here:

Keys. An account lives at `acct.` + its id with `.` written as `/` and `:` written as `=`
(`cust-42` -> `acct.cust-42`, `acct:7.eu` -> `acct.acct=7/eu`). NATS keys allow
`[-/_=.a-zA-Z0-9]` with `.` separating subject tokens; account ids allow `[A-Za-z0-9._:-]`.
`/` and `=` never occur in an account id, so the mapping is one character for one character,
reversible and unambiguous, common ids stay as they are, and every account is one subject
token after `acct.` (no empty token from `a..b`, no leading or trailing `.`). What a registered
hostname resolves to (written by the fleet's one DDNS refresher) lives at `host.` + the
hostname as registered (normalized LDH, already a valid key). The one other key is
`meta.snapshot`, the snapshot marker.

Values. UTF-8 JSON objects, at most MAX_VALUE_BYTES:
- a live account is a `PUT /v1/accounts/{account}` body with its device IDs as digests:
  `{"version": N, "addresses": ["203.0.113.7", "2001:db8:7::/64"], "hostnames": [...],
  "device_id_sha256": ["<64 hex>", ...]}` (`hostnames` and `device_id_sha256` optional;
  written only when there are some). A `device_ids` member is refused: the bucket never
  holds an ID (SPEC 3), only SHA-256 digests in lower-case hex;
- a deleted account is a tombstone `{"version": N, "deleted": true}`;
- a hostname's resolved addresses are `{"addresses": ["203.0.113.9", "2001:db8::9"]}`
  (host addresses only; empty: it resolves to nothing usable);
- the marker is `{"version": S, "complete": false|true}`: a snapshot at S is being written
  (false), or is complete (true).
A value is validated with the same rules as the sync API (entries.py) and rejected whole.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from smartdns.config.model import RegistrationsConfig
from smartdns.errors import RegistrationError
from smartdns.registrations import versions
from smartdns.registrations.device_ids import DIGESTS_KEY, digests_hex
from smartdns.registrations.entries import (
    Network,
    ShapeError,
    format_network,
    parse_account_document,
    parse_address,
    parse_device_digests,
    parse_version,
    validate_account_id,
)
from smartdns.registrations.hostnames import parse_hostname

ACCOUNT_PREFIX: Final = "acct."
HOST_PREFIX: Final = "host."
MAX_RESOLVED: Final = 64  # addresses of one hostname in the bucket
SNAPSHOT_KEY: Final = "meta.snapshot"
# 16 entries, 4 hostnames and 8 digests fit in under 3 KiB; the bucket is created with this limit.
MAX_VALUE_BYTES: Final = 16 * 1024
_TO_KEY: Final = str.maketrans(".:", "/=")
_FROM_KEY: Final = str.maketrans("/=", ".:")
_TOMBSTONE_KEYS: Final = frozenset({"version", "deleted"})
_MARKER_KEYS: Final = frozenset({"version", "complete"})
_RESOLVED_KEYS: Final = frozenset({"addresses"})


@dataclass(frozen=True, slots=True)
class AccountValue:
    """A live account in the bucket; `networks` sorted as entries.parse_addresses sorts them,
    `hostnames` normalized and sorted (entries.parse_hostnames)."""

    version: int
    networks: tuple[Network, ...]
    hostnames: tuple[str, ...] = ()
    devices: tuple[bytes, ...] = ()  # device ID digests, sorted


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A deleted account: it blocks writes at or below `version` (SPEC 4)."""

    version: int


@dataclass(frozen=True, slots=True)
class SnapshotMarker:
    """The `meta.snapshot` value: the snapshot at `version` is being written or is complete."""

    version: int
    complete: bool


FeedValue = AccountValue | Tombstone
# One change for the local copy: the account and its new value, or None when the key was
# deleted or purged in the bucket (the account goes without a tombstone).
FeedChange = tuple[str, FeedValue | None]


@dataclass(frozen=True, slots=True)
class FeedApplied:
    """What a batch of feed changes did to the local copy."""

    applied: int  # changes that changed it
    stale: int  # changes older than what it holds (a version going backwards)


def account_key(account: str) -> str:
    """The bucket key of `account`; raises RegistrationError for an invalid account id."""
    return ACCOUNT_PREFIX + validate_account_id(account).translate(_TO_KEY)


def key_account(key: str) -> str | None:
    """The account id a bucket key names; None for a key outside `acct.` (the marker).

    Raises RegistrationError for an `acct.` key that no valid account id encodes to, such as
    `acct.a.b` (a `.` the encoding never produces) or an id over 128 characters.
    """
    if not key.startswith(ACCOUNT_PREFIX):
        return None
    encoded = key[len(ACCOUNT_PREFIX) :]
    if "." in encoded or ":" in encoded:
        raise RegistrationError("key", "not an encoded account id")
    return validate_account_id(encoded.translate(_FROM_KEY))


def hostname_key(hostname: str) -> str:
    """The bucket key of a registered hostname's resolved addresses; ValueError when it is
    not a valid hostname (hostnames.parse_hostname)."""
    return HOST_PREFIX + parse_hostname(hostname)


def key_hostname(key: str) -> str | None:
    """The hostname a `host.` key names (None for other keys); RegistrationError when no
    valid hostname is there."""
    if not key.startswith(HOST_PREFIX):
        return None
    try:
        return parse_hostname(key[len(HOST_PREFIX) :])
    except ValueError as exc:
        raise RegistrationError("key", str(exc)) from None


def encode_resolved(networks: Sequence[Network]) -> bytes:
    return _dump({"addresses": [format_network(network) for network in networks]})


def decode_resolved(data: bytes, rules: RegistrationsConfig) -> tuple[Network, ...]:
    """A hostname's resolved addresses, each a host address the registration rules accept;
    RegistrationError for the first one that is not (the value is then skipped whole)."""
    doc = _load(data)
    _check_keys(doc, _RESOLVED_KEYS)
    assert isinstance(doc, dict)  # _check_keys
    values = doc["addresses"]
    if not isinstance(values, list) or len(values) > MAX_RESOLVED:
        raise ShapeError("addresses", f"must be a list of at most {MAX_RESOLVED} addresses")
    networks: list[Network] = []
    for index, text in enumerate(values):
        try:
            network = parse_address(text, rules)
        except ValueError as exc:
            raise RegistrationError(f"addresses[{index}]", str(exc)) from None
        if network.prefixlen != network.max_prefixlen:
            raise RegistrationError(f"addresses[{index}]", "must be an address, not a prefix")
        networks.append(network)
    return tuple(networks)


def encode_value(value: FeedValue) -> bytes:
    """An account key's value, canonical: entries in the order parse_addresses sorts them."""
    if isinstance(value, Tombstone):
        return _dump({"version": value.version, "deleted": True})
    doc: dict[str, object] = {
        "version": value.version,
        "addresses": [format_network(network) for network in value.networks],
    }
    if value.hostnames:
        doc["hostnames"] = list(value.hostnames)
    if value.devices:
        doc[DIGESTS_KEY] = digests_hex(value.devices)
    return _dump(doc)


def encode_marker(marker: SnapshotMarker) -> bytes:
    return _dump({"version": marker.version, "complete": marker.complete})


def decode_value(data: bytes, rules: RegistrationsConfig) -> FeedValue:
    """Validate an account key's value; RegistrationError (ShapeError for shape) when it is bad.

    A live value goes through parse_account_document, the sync API's own check, so a value the
    sync API would refuse is refused here too, and nothing of it is used; its digests are
    checked as 64 hex digits each, within `max_device_ids_per_account`, none repeated.
    """
    doc = _load(data)
    if isinstance(doc, dict) and "deleted" in doc:
        _check_keys(doc, _TOMBSTONE_KEYS)
        if doc["deleted"] is not True:
            raise ShapeError("deleted", "must be true")
        return Tombstone(parse_version(doc["version"]))
    devices: tuple[bytes, ...] = ()
    if isinstance(doc, dict):
        if "device_ids" in doc:
            raise ShapeError("device_ids", f"the bucket holds {DIGESTS_KEY}, never device IDs")
        if DIGESTS_KEY in doc:
            doc = dict(doc)
            devices = parse_device_digests(doc.pop(DIGESTS_KEY), rules)
    parsed = parse_account_document(doc, rules)
    hostnames = tuple(sorted(set(parsed.hostnames)))
    return AccountValue(parsed.version, parsed.networks, hostnames, tuple(sorted(devices)))


def decode_marker(data: bytes) -> SnapshotMarker:
    """Validate the `meta.snapshot` value; ShapeError when it is bad."""
    doc = _load(data)
    _check_keys(doc, _MARKER_KEYS)
    assert isinstance(doc, dict)  # _check_keys
    if not isinstance(doc["complete"], bool):
        raise ShapeError("complete", "must be true or false")
    return SnapshotMarker(parse_version(doc["version"]), doc["complete"])


def check_write(new: FeedValue, current: FeedValue | None, snapshot_version: int) -> bool:
    """SPEC 4's version rules (versions.check_write) for a write of `new` over the bucket's
    `current`; True for the same write repeated (a no-op), False for a write to make,
    StaleWriteError (409) for a stale one."""
    stored = None if current is None else (current.version, isinstance(current, AccountValue))
    return versions.check_write(
        new.version, stored, repeat=new == current, snapshot_version=snapshot_version
    )


def _dump(doc: dict[str, object]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _load(data: bytes) -> object:
    if len(data) > MAX_VALUE_BYTES:
        raise ShapeError("", f"value over {MAX_VALUE_BYTES} bytes")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ShapeError("", "not a JSON document") from None


def _check_keys(doc: object, expected: frozenset[str]) -> None:
    if not isinstance(doc, dict):
        raise ShapeError("", "value must be a JSON object")
    if doc.keys() != expected:
        raise ShapeError("", "keys must be " + " and ".join(f'"{key}"' for key in sorted(expected)))

"""The feed's bucket format: key encoding, value decoding, the version rules of a write."""

from __future__ import annotations

import ipaddress
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartdns.config.model import RegistrationsConfig
from smartdns.errors import RegistrationError, StaleWriteError
from smartdns.registrations.entries import ShapeError
from smartdns.registrations.feed_format import (
    MAX_VALUE_BYTES,
    SNAPSHOT_KEY,
    AccountValue,
    FeedValue,
    SnapshotMarker,
    Tombstone,
    account_key,
    check_write,
    decode_marker,
    decode_value,
    encode_marker,
    encode_value,
    key_account,
)

LAB = RegistrationsConfig(public_only=False)
# What nats-py and the Go client accept as a key, plus NATS subject token rules.
NATS_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")
ACCOUNT_IDS = st.text(alphabet="ABCXYZabcxyz0123456789._:-", min_size=1, max_size=128)


def _value(version: int, *addresses: str) -> AccountValue:
    return AccountValue(version, tuple(ipaddress.ip_network(a) for a in addresses))


@pytest.mark.parametrize(
    ("account", "key"),
    [
        ("cust-42", "acct.cust-42"),
        ("acct:7.eu", "acct.acct=7/eu"),
        ("a..b", "acct.a//b"),
        (".", "acct./"),
        (":", "acct.="),
        ("A_b-C", "acct.A_b-C"),
    ],
)
def test_account_key_table(account: str, key: str) -> None:
    assert account_key(account) == key
    assert key_account(key) == account


@given(ACCOUNT_IDS)
def test_every_account_id_encodes_to_one_valid_key_token_and_back(account: str) -> None:
    key = account_key(account)
    assert NATS_KEY.fullmatch(key)
    tokens = key.split(".")
    assert tokens[0] == "acct" and len(tokens) == 2 and tokens[1]
    assert key_account(key) == account


@pytest.mark.parametrize("account", ["", "a b", "é", "a/b", "a=b", "x" * 129])
def test_invalid_account_ids_have_no_key(account: str) -> None:
    with pytest.raises(RegistrationError):
        account_key(account)


@pytest.mark.parametrize("key", ["acct.a.b", "acct.", "acct." + "x" * 129, "acct.a:b"])
def test_keys_no_account_id_encodes_to_are_rejected(key: str) -> None:
    with pytest.raises(RegistrationError):
        key_account(key)


def test_keys_outside_the_account_prefix_name_no_account() -> None:
    assert key_account(SNAPSHOT_KEY) is None
    assert key_account("other.thing") is None


@pytest.mark.parametrize(
    "value",
    [
        _value(3, "203.0.113.7/32", "2001:db8:7::/64"),
        AccountValue(0, ()),
        AccountValue(2, (), ("home.example.net",), (b"\x01" * 32, b"\xfe" * 32)),
        Tombstone(9),
    ],
)
def test_values_round_trip(value: FeedValue) -> None:
    assert decode_value(encode_value(value), LAB) == value


def test_encoding_is_canonical_and_a_put_body() -> None:
    value = decode_value(
        b'{"addresses": ["2001:db8:7::/64", "203.0.113.7", "::ffff:203.0.113.7"], "version": 3}',
        LAB,
    )
    assert encode_value(value) == b'{"version":3,"addresses":["203.0.113.7","2001:db8:7::/64"]}'
    assert encode_value(Tombstone(4)) == b'{"version":4,"deleted":true}'


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"not json", ShapeError),
        (b"\xff\xfe", ShapeError),
        (b"[]", ShapeError),
        (b'{"version": 1}', ShapeError),
        (b'{"version": "1", "addresses": []}', ShapeError),
        (b'{"version": -1, "addresses": []}', ShapeError),
        (b'{"version": 1, "addresses": [], "extra": 1}', ShapeError),
        (b'{"version": 1, "deleted": false}', ShapeError),
        (b'{"version": 1, "deleted": true, "addresses": []}', ShapeError),
        (b'{"version": 1, "addresses": ["203.0.113.7/8"]}', RegistrationError),
        (b'{"version": 1, "addresses": ["224.0.0.1"]}', RegistrationError),
        (b'{"version": 1, "addresses": ["not-an-address"]}', RegistrationError),
        (b'{"version": true, "deleted": true}', ShapeError),
        (b" " * (MAX_VALUE_BYTES + 1), ShapeError),
    ],
)
def test_bad_values_are_rejected_whole(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as caught:
        decode_value(data, LAB)
    assert b"203.0.113.7" not in str(caught.value).encode()


def test_too_many_entries_are_rejected() -> None:
    addresses = ",".join(f'"203.0.113.{i}"' for i in range(17))
    with pytest.raises(RegistrationError, match="limit of 16"):
        decode_value(f'{{"version": 1, "addresses": [{addresses}]}}'.encode(), LAB)


def test_public_only_applies_to_feed_values() -> None:
    data = encode_value(_value(1, "10.0.0.1/32"))
    assert decode_value(data, LAB) == _value(1, "10.0.0.1/32")
    with pytest.raises(RegistrationError, match="public_only"):
        decode_value(data, RegistrationsConfig())


@pytest.mark.parametrize("marker", [SnapshotMarker(5, False), SnapshotMarker(0, True)])
def test_marker_round_trip(marker: SnapshotMarker) -> None:
    assert decode_marker(encode_marker(marker)) == marker


@pytest.mark.parametrize(
    "data", [b'{"version": 1}', b'{"version": 1, "complete": 1}', b"{}", b"1", b"nope"]
)
def test_bad_markers_are_rejected(data: bytes) -> None:
    with pytest.raises(ShapeError):
        decode_marker(data)


A5 = _value(5, "203.0.113.7/32")
B5 = _value(5, "203.0.113.8/32")


@pytest.mark.parametrize(
    ("new", "current", "snapshot_version", "outcome"),
    [
        (A5, None, 0, False),
        (A5, A5, 0, True),  # the same write repeated
        (Tombstone(5), Tombstone(5), 0, True),
        (_value(6, "203.0.113.7/32"), A5, 0, False),
        (Tombstone(6), A5, 0, False),
        (A5, Tombstone(4), 0, False),
        (B5, A5, 0, "already stored"),
        (Tombstone(5), A5, 0, "already stored"),
        (A5, Tombstone(5), 0, "already stored"),
        (_value(4, "203.0.113.7/32"), A5, 0, "older"),
        (Tombstone(4), A5, 0, "older"),
        (A5, None, 5, "snapshot"),
        (A5, None, 6, "snapshot"),
        (Tombstone(3), None, 5, "snapshot"),
        (A5, None, 4, False),
    ],
)
def test_check_write_follows_spec_4(
    new: FeedValue, current: FeedValue | None, snapshot_version: int, outcome: bool | str
) -> None:
    if isinstance(outcome, bool):
        assert check_write(new, current, snapshot_version) is outcome
    else:
        with pytest.raises(StaleWriteError, match=outcome):
            check_write(new, current, snapshot_version)


DIGEST_HEX = "ab" * 32


def test_device_ids_travel_as_digests_never_as_ids() -> None:
    value = AccountValue(1, (), (), (bytes.fromhex("cd" * 32), bytes.fromhex(DIGEST_HEX)))
    assert encode_value(value) == (
        b'{"version":1,"addresses":[],"device_id_sha256":["'
        + DIGEST_HEX.encode()
        + b'","'
        + b"cd" * 32
        + b'"]}'
    )
    assert b"device_ids" not in encode_value(value)
    with pytest.raises(ShapeError) as caught:  # a raw ID never enters the bucket's reader
        decode_value(b'{"version":1,"addresses":[],"device_ids":["' + b"k" * 26 + b'"]}', LAB)
    assert str(caught.value) == "device_ids: the bucket holds device_id_sha256, never device IDs"


@pytest.mark.parametrize(
    ("digests", "message"),
    [
        ([DIGEST_HEX.upper()], "device_id_sha256[0]: must be a SHA-256 digest as 64 lower-case"),
        ([DIGEST_HEX[:-2]], "device_id_sha256[0]: must be a SHA-256 digest"),
        ([DIGEST_HEX, DIGEST_HEX], r"device_id_sha256\[1\]: the same ID as device_id_sha256\[0\]"),
        ([f"{i:064x}" for i in range(9)], "9 device IDs exceed the limit of 8 per account"),
        ("not a list", "device_id_sha256: must be a list"),
    ],
)
def test_bad_digests_are_rejected_whole(digests: object, message: str) -> None:
    data = json.dumps({"version": 1, "addresses": [], "device_id_sha256": digests}).encode()
    with pytest.raises(RegistrationError, match=message.replace("[0]", r"\[0\]")):
        decode_value(data, LAB)

"""Device ID rules (SPEC 2a, 3): syntax, count, repeats, the documents that carry them, and
that no reason ever repeats an ID."""

from __future__ import annotations

import hashlib

import pytest

from smartdns.config.model import RegistrationsConfig
from smartdns.errors import RegistrationError
from smartdns.registrations.device_ids import digests_hex, parse_device_id, parse_digest_hex
from smartdns.registrations.entries import (
    AccountDocument,
    ShapeError,
    parse_account_document,
    parse_device_ids,
    parse_snapshot_document,
)
from smartdns.registrations.json_body import decode_account

RULES = RegistrationsConfig()  # max_device_ids_per_account 8
ID = "k3v9q2m8x4t6w1z7p5r0bn2dca"  # 26 characters, as the portal makes them
OTHER = "a" * 20
DIGEST = hashlib.sha256(ID.encode()).digest()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("a" * 19, "must be 20 to 63 characters, got 19"),
        ("a" * 64, "must be 20 to 63 characters, got 64"),
        ("K3V9Q2M8X4T6W1Z7P5R0BN2DCA", "must be lower-case letters a-z and digits only"),
        ("k3v9q2m8x4t6w1z7-5r0bn2dca", "must be lower-case letters a-z and digits only"),
        ("k3v9q2m8x4t6w1z7.5r0bn2dca", "must be lower-case letters a-z and digits only"),
        ("k3v9q2m8x4t6w1z7é5r0bn2dca", "must be lower-case letters a-z and digits only"),
        (f"{ID}\n", "must be lower-case letters a-z and digits only"),
        (42, "must be a string"),
        (None, "must be a string"),
    ],
)
def test_bad_device_id_is_refused_without_repeating_it(value: object, reason: str) -> None:
    with pytest.raises(ValueError, match=f"^{reason}$") as caught:
        parse_device_id(value)
    if isinstance(value, str):
        assert value.strip() not in str(caught.value)


@pytest.mark.parametrize("value", [ID, "a" * 20, "0" * 63, "abc123" * 10])
def test_device_id_becomes_its_sha256_digest(value: str) -> None:
    assert parse_device_id(value) == hashlib.sha256(value.encode()).digest()


def test_digest_hex_is_64_lower_case_hex_digits() -> None:
    assert parse_digest_hex(DIGEST.hex()) == DIGEST
    for bad in (DIGEST.hex().upper(), DIGEST.hex()[:-1], DIGEST.hex() + "0", ID, 7):
        with pytest.raises(ValueError, match="SHA-256 digest as 64 lower-case hex digits"):
            parse_digest_hex(bad)
    assert digests_hex([b"\x02" * 32, b"\x01" * 32]) == ["01" * 32, "02" * 32]


def test_list_keeps_the_order_given_and_names_positions() -> None:
    assert parse_device_ids([OTHER, ID], RULES) == (parse_device_id(OTHER), DIGEST)
    with pytest.raises(RegistrationError) as caught:
        parse_device_ids([ID, "short"], RULES)
    assert str(caught.value) == "device_ids[1]: must be 20 to 63 characters, got 5"
    with pytest.raises(ShapeError, match=r"^device_ids: must be a list$"):
        parse_device_ids(ID, RULES)


def test_the_same_id_twice_in_one_account_is_refused() -> None:
    with pytest.raises(RegistrationError) as caught:
        parse_device_ids([ID, OTHER, ID], RULES)
    assert str(caught.value) == "device_ids[2]: the same ID as device_ids[0]"
    assert ID not in str(caught.value)


def test_count_limit_per_account() -> None:
    ids = [f"{index:020d}" for index in range(3)]
    rules = RegistrationsConfig(max_device_ids_per_account=2)
    with pytest.raises(RegistrationError) as caught:
        parse_device_ids(ids, rules)
    assert str(caught.value) == "device_ids: 3 device IDs exceed the limit of 2 per account"
    assert len(parse_device_ids(ids[:2], rules)) == 2


def test_account_document_takes_device_ids_optionally() -> None:
    doc = {"version": 3, "addresses": [], "device_ids": [ID]}
    assert parse_account_document(doc, RULES) == AccountDocument(3, (), (), (DIGEST,))
    assert parse_account_document({"version": 3, "addresses": []}, RULES).devices == ()
    with pytest.raises(ShapeError):  # the digest form is an export's, not a PUT's
        parse_account_document({"version": 3, "addresses": [], "device_id_sha256": []}, RULES)


def test_put_body_decoded_strictly_with_device_ids() -> None:
    body = b'{"version": 1, "addresses": [], "device_ids": ["' + ID.encode() + b'"]}'
    assert decode_account(body, RULES).devices == (DIGEST,)
    with pytest.raises(RegistrationError) as caught:
        decode_account(
            b'{"version": 1, "addresses": [], "device_ids": ["UPPER' + b"A" * 20 + b'"]}', RULES
        )
    assert str(caught.value) == "device_ids[0]: must be lower-case letters a-z and digits only"


def test_snapshot_object_form_takes_ids_and_digests_sorted() -> None:
    doc = {
        "version": 5,
        "accounts": {
            "a": {"addresses": [], "device_ids": [ID]},
            "b": {"addresses": [], "device_id_sha256": [(b"\x01" * 32).hex()], "device_ids": []},
            "c": [],
        },
    }
    snapshot = parse_snapshot_document(doc, RULES)
    assert dict(snapshot.devices) == {"a": (DIGEST,), "b": (b"\x01" * 32,)}


@pytest.mark.parametrize(
    ("accounts", "message"),
    [
        (
            {
                "a": {"addresses": [], "device_ids": [ID]},
                "b": {"addresses": [], "device_ids": [ID]},
            },
            'accounts["b"].device_ids[0]: given to another account too',
        ),
        (
            {"a": {"addresses": [], "device_ids": [ID], "device_id_sha256": [DIGEST.hex()]}},
            'accounts["a"].device_id_sha256[0]: repeated',
        ),
        (
            {"a": {"addresses": [], "device_ids": ["x"]}},
            'accounts["a"].device_ids[0]: must be 20 to 63 characters, got 1',
        ),
        (
            {
                "a": {
                    "addresses": [],
                    "device_ids": [f"{i:020d}" for i in range(5)],
                    "device_id_sha256": [bytes([i]).hex() * 32 for i in range(4)],
                }
            },
            'accounts["a"].device_ids: 9 device IDs exceed the limit of 8 per account',
        ),
    ],
)
def test_snapshot_refuses_an_id_two_accounts_are_given(
    accounts: dict[str, object], message: str
) -> None:
    with pytest.raises(RegistrationError) as caught:
        parse_snapshot_document({"version": 1, "accounts": accounts}, RULES)
    assert str(caught.value) == message
    assert ID not in str(caught.value)

"""Hostname registration rules (SPEC 3 "Dynamic home addresses")."""

from __future__ import annotations

import pytest

from smartdns.config.model import RegistrationsConfig
from smartdns.errors import RegistrationError
from smartdns.registrations.entries import (
    AccountDocument,
    ShapeError,
    parse_account_document,
    parse_hostnames,
    parse_snapshot_document,
)
from smartdns.registrations.hostnames import parse_hostname

RULES = RegistrationsConfig()  # max_hostnames_per_account 4
LABEL_63 = "a" * 63
NAME_253 = ".".join([LABEL_63, LABEL_63, LABEL_63, "b" * 61])  # 63*3 + 61 + 3 dots = 253


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("home.example.net", "home.example.net"),
        ("Home.Example.NET", "home.example.net"),
        ("home.example.net.", "home.example.net"),
        ("a.b", "a.b"),
        ("my-home.dyndns.org", "my-home.dyndns.org"),
        ("1home.example.net", "1home.example.net"),
        ("123.example.net", "123.example.net"),  # numeric labels are fine below the top
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("router.example.0x10", "router.example.0x10"),  # not something inet_aton reads
        (f"{LABEL_63}.net", f"{LABEL_63}.net"),
        (NAME_253, NAME_253),
        (NAME_253 + ".", NAME_253),
    ],
)
def test_accepted_hostname_is_normalized(value: str, expected: str) -> None:
    assert parse_hostname(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (42, "must be a string"),
        (None, "must be a string"),
        ("bücher.example", "must be ASCII (send internationalized names in the xn-- form)"),
        ("localhost", "needs at least two labels"),
        ("localhost.", "needs at least two labels"),
        ("", "needs at least two labels"),
        (".", "needs at least two labels"),
        ("home..example.net", "label 2 is empty"),
        (".example.net", "label 1 is empty"),
        ("home.example.net..", "label 4 is empty"),
        (f"{'a' * 64}.net", "label 1 is over 63 octets"),
        ("home.exa_mple.net", "label 2 has a character other than a-z, 0-9 and -"),
        ("home.example.net/24", "label 3 has a character other than a-z, 0-9 and -"),
        ("home example.net", "label 1 has a character other than a-z, 0-9 and -"),
        ("home.example.net\n", "label 3 has a character other than a-z, 0-9 and -"),
        ("*.example.net", "label 1 has a character other than a-z, 0-9 and -"),
        ("-home.example.net", "label 1 starts or ends with a hyphen"),
        ("home-.example.net", "label 1 starts or ends with a hyphen"),
        (NAME_253 + "b", "over 253 octets"),
        (NAME_253 + "b.", "over 253 octets"),
        ("a." * 200, "over 253 octets"),
        ("1.2.3.4", "an IP address literal, not a hostname"),
        ("1.2.3.4.", "an IP address literal, not a hostname"),
        ("127.1", "an IP address literal, not a hostname"),
        ("0x7f.0x1", "an IP address literal, not a hostname"),
        ("10.0.0.0x1", "an IP address literal, not a hostname"),
        ("home.example.123", "an IP address literal, not a hostname"),
        ("::1", "an IP address literal, not a hostname"),
        ("2001:db8::1", "an IP address literal, not a hostname"),
        ("::ffff:1.2.3.4", "an IP address literal, not a hostname"),
        ("[2001:db8::1]", "an IP address literal, not a hostname"),
        ("[::1].", "an IP address literal, not a hostname"),
    ],
)
def test_rejected_hostname_names_the_rule_not_the_name(value: object, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_hostname(value)
    assert str(caught.value) == reason


def test_list_is_normalized_deduplicated_and_sorted() -> None:
    names = ["b.example.net", "A.example.net.", "a.example.net", "B.EXAMPLE.NET"]
    assert parse_hostnames(names, RULES) == ("a.example.net", "b.example.net")
    assert parse_hostnames([], RULES) == ()


def test_bad_entry_is_named_by_position_without_its_text() -> None:
    with pytest.raises(RegistrationError) as caught:
        parse_hostnames(["ok.example.net", "secret-home.example.net", "10.1.2.3"], RULES)
    assert str(caught.value) == "hostnames[2]: an IP address literal, not a hostname"
    assert caught.value.position == "hostnames[2]"
    assert "10.1.2.3" not in str(caught.value)


def test_position_uses_the_field_given() -> None:
    with pytest.raises(RegistrationError) as caught:
        parse_hostnames(["x"], RULES, field='accounts["acct-1"].hostnames')
    assert str(caught.value) == 'accounts["acct-1"].hostnames[0]: needs at least two labels'


@pytest.mark.parametrize(
    ("limit", "names", "accepted"),
    [
        (4, [f"h{i}.example.net" for i in range(4)], True),
        (4, [f"h{i}.example.net" for i in range(5)], False),
        (4, [f"H{i % 4}.example.net" for i in range(8)] + ["h0.example.net."], True),
        (1, ["a.example.net", "b.example.net"], False),
        (0, [], True),
        (0, ["a.example.net"], False),
    ],
)
def test_count_per_account_is_after_deduplication(
    limit: int, names: list[str], accepted: bool
) -> None:
    rules = RegistrationsConfig(max_hostnames_per_account=limit)
    if accepted:
        assert len(parse_hostnames(names, rules)) <= limit
        return
    with pytest.raises(RegistrationError) as caught:
        parse_hostnames(names, rules)
    assert caught.value.position == "hostnames"
    assert caught.value.reason.endswith(f"exceed the limit of {limit} per account")
    assert not isinstance(caught.value, ShapeError)


@pytest.mark.parametrize("values", [None, "home.example.net", {"a": 1}, 3])
def test_non_list_is_a_shape_error(values: object) -> None:
    with pytest.raises(ShapeError) as caught:
        parse_hostnames(values, RULES)
    assert str(caught.value) == "hostnames: must be a list"


def test_account_document_with_hostnames() -> None:
    doc = {"version": 3, "addresses": [], "hostnames": ["Home.Example.net."]}
    assert parse_account_document(doc, RULES) == AccountDocument(3, (), ("home.example.net",))
    assert parse_account_document({"version": 3, "addresses": []}, RULES).hostnames == ()


@pytest.mark.parametrize(
    ("doc", "error", "message"),
    [
        (
            {"version": 1, "addresses": [], "hostnames": ["ok.example.net", "1.2.3.4"]},
            RegistrationError,
            "hostnames[1]: an IP address literal, not a hostname",
        ),
        (
            {"version": 1, "addresses": [], "hostnames": "home.example.net"},
            ShapeError,
            "hostnames: must be a list",
        ),
        (
            {"version": 1, "addresses": [], "hostnames": [], "extra": 1},
            ShapeError,
            "unexpected top-level key; only"
            ' "addresses" and "device_ids" and "hostnames" and "version" are allowed',
        ),
    ],
)
def test_bad_account_document_hostnames(
    doc: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as caught:
        parse_account_document(doc, RULES)
    assert str(caught.value) == message


def test_snapshot_takes_both_forms() -> None:
    doc = {
        "version": 9,
        "accounts": {
            "plain": ["203.0.113.7"],
            "both": {"addresses": ["203.0.113.8"], "hostnames": ["b.example.net"]},
            "names": {"addresses": [], "hostnames": ["n.example.net", "N.example.net"]},
            "empty": {"addresses": []},
        },
    }
    snapshot = parse_snapshot_document(doc, RegistrationsConfig(public_only=False))
    assert sorted(snapshot.accounts) == ["both", "empty", "names", "plain"]
    assert dict(snapshot.hostnames) == {"both": ("b.example.net",), "names": ("n.example.net",)}
    assert [str(n) for n in snapshot.accounts["both"]] == ["203.0.113.8/32"]


@pytest.mark.parametrize(
    ("entry", "error", "message"),
    [
        (
            {"addresses": [], "hostnames": ["x"]},
            RegistrationError,
            'accounts["a"].hostnames[0]: needs at least two labels',
        ),
        (
            {"addresses": ["10.0.0.0/8"]},
            RegistrationError,
            'accounts["a"].addresses[0]: prefix /8 is wider than the allowed /24',
        ),
        ({"hostnames": []}, ShapeError, 'accounts["a"].addresses: missing'),
        (
            {"addresses": [], "other": 1},
            ShapeError,
            'accounts["a"]: unexpected key; only "addresses" and "device_id_sha256" and'
            ' "device_ids" and "hostnames" are allowed',
        ),
        (
            {"addresses": [], "hostnames": [f"h{i}.example.net" for i in range(5)]},
            RegistrationError,
            'accounts["a"].hostnames: 5 hostnames exceed the limit of 4 per account',
        ),
    ],
)
def test_bad_snapshot_account_object(
    entry: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as caught:
        parse_snapshot_document({"version": 1, "accounts": {"a": entry}}, RULES)
    assert str(caught.value) == message

"""Registration input rules (SPEC 3) and sync document shapes (SPEC 4)."""

from __future__ import annotations

import ipaddress
from bisect import bisect_right

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smartdns.config.model import RegistrationsConfig
from smartdns.errors import RegistrationError
from smartdns.registrations import entries
from smartdns.registrations.entries import (
    AccountEntries,
    Network,
    ShapeError,
    Snapshot,
    format_network,
    parse_account_document,
    parse_address,
    parse_addresses,
    parse_snapshot_document,
    parse_version,
    validate_account_id,
)

PUBLIC = RegistrationsConfig()  # defaults: /24, /48, 16 per account, public_only
LAB = RegistrationsConfig(public_only=False)


@pytest.mark.parametrize(
    ("value", "rules", "expected"),
    [
        ("8.8.8.8", PUBLIC, "8.8.8.8/32"),
        ("1.1.1.0/24", PUBLIC, "1.1.1.0/24"),
        ("2606:4700::1", PUBLIC, "2606:4700::1/128"),
        ("2606:4700:4700::/48", PUBLIC, "2606:4700:4700::/48"),
        ("2606:4700:4700:0:0::/64", PUBLIC, "2606:4700:4700::/64"),
        ("203.0.113.7", LAB, "203.0.113.7/32"),
        ("203.0.113.0/24", LAB, "203.0.113.0/24"),
        ("2001:db8:7::/64", LAB, "2001:db8:7::/64"),
        ("2001:DB8:7::1", LAB, "2001:db8:7::1/128"),
        ("127.0.0.1", LAB, "127.0.0.1/32"),
        ("::1", LAB, "::1/128"),
        ("10.0.0.0/24", LAB, "10.0.0.0/24"),
        ("fd00::/64", LAB, "fd00::/64"),
        ("::ffff:203.0.113.7", LAB, "203.0.113.7/32"),
        ("::ffff:203.0.113.0/120", LAB, "203.0.113.0/24"),
        ("::ffff:8.8.8.8", PUBLIC, "8.8.8.8/32"),
        ("::ffff:cb00:7107", LAB, "203.0.113.7/32"),
        ("203.0.113.7/32", LAB, "203.0.113.7/32"),
        ("0.1.2.3", RegistrationsConfig(public_only=False), "0.1.2.3/32"),
    ],
)
def test_accepted_address_is_normalized(
    value: str, rules: RegistrationsConfig, expected: str
) -> None:
    assert parse_address(value, rules) == ipaddress.ip_network(expected)


@pytest.mark.parametrize(
    ("value", "rules", "reason"),
    [
        (4294967295, LAB, "must be a string"),
        (None, LAB, "must be a string"),
        (["203.0.113.7"], LAB, "must be a string"),
        ("", LAB, "not a valid IP address or prefix"),
        ("example.com", LAB, "not a valid IP address or prefix"),
        ("203.0.113", LAB, "not a valid IP address or prefix"),
        ("203.0.113.256", LAB, "not a valid IP address or prefix"),
        ("010.0.0.1", LAB, "not a valid IP address or prefix"),
        ("1.2.3.04", LAB, "not a valid IP address or prefix"),
        ("::ffff:010.0.0.1", LAB, "not a valid IP address or prefix"),
        ("\uff12\uff10\uff13.0.113.7", LAB, "not a valid IP address or prefix"),
        ("1" * 100, LAB, "not a valid IP address or prefix"),
        (" 203.0.113.7", LAB, "must not contain whitespace"),
        ("203.0.113.7 ", LAB, "must not contain whitespace"),
        ("203.0.113.7\n", LAB, "must not contain whitespace"),
        ("203.0.113.0/ 24", LAB, "must not contain whitespace"),
        ("fe80::1%eth0", LAB, "scoped IPv6 addresses are not accepted"),
        ("fe80::1%1/128", LAB, "scoped IPv6 addresses are not accepted"),
        ("203.0.113.0/", LAB, "prefix length must be a decimal number"),
        ("203.0.113.0/255.255.255.0", LAB, "prefix length must be a decimal number"),
        ("203.0.113.0/+24", LAB, "prefix length must be a decimal number"),
        ("203.0.113.0/33", LAB, "prefix length /33 is out of range"),
        ("2001:db8::/129", LAB, "prefix length /129 is out of range"),
        ("203.0.113.7/24", LAB, "host bits set"),
        ("2001:db8:7::1/64", LAB, "host bits set"),
        ("0.0.0.0/0", LAB, "prefix /0 is wider than the allowed /24"),
        ("::/0", LAB, "prefix /0 is wider than the allowed /48"),
        ("203.0.0.0/16", LAB, "prefix /16 is wider than the allowed /24"),
        ("2001:db8::/32", LAB, "prefix /32 is wider than the allowed /48"),
        ("::ffff:203.0.0.0/112", LAB, "prefix /16 is wider than the allowed /24"),
        ("::fffe:0:0/95", RegistrationsConfig(min_prefix_v6=0, public_only=False),
         "IPv4-mapped prefix is shorter than /96"),
        ("::/64", LAB, "unspecified address"),
        ("0.0.0.0", LAB, "unspecified address"),
        ("::", LAB, "unspecified address"),
        ("0.0.0.0/24", LAB, "unspecified address"),
        ("224.0.0.1", LAB, "multicast address"),
        ("239.255.255.0/24", LAB, "multicast address"),
        ("ff02::1", LAB, "multicast address"),
        ("ff00::/48", LAB, "multicast address"),
        ("::ffff:224.0.0.1", LAB, "multicast address"),
        ("192.0.0.0/2", RegistrationsConfig(min_prefix_v4=0, public_only=False),
         "multicast address"),
        ("224.0.0.1", PUBLIC, "multicast address"),
        ("127.0.0.1", PUBLIC, "not a globally routable address (registrations.public_only)"),
        ("::1", PUBLIC, "not a globally routable address (registrations.public_only)"),
        ("10.0.0.0/24", PUBLIC, "not a globally routable address (registrations.public_only)"),
        ("192.168.1.7", PUBLIC, "not a globally routable address (registrations.public_only)"),
        ("172.16.0.0/24", PUBLIC, "not a globally routable address (registrations.public_only)"),
        ("100.64.0.1", PUBLIC, "not a globally routable address (registrations.public_only)"),
        ("169.254.1.1", PUBLIC, "not a globally routable address (registrations.public_only)"),
        ("203.0.113.7", PUBLIC, "not a globally routable address (registrations.public_only)"),
        ("198.51.100.0/24", PUBLIC,
         "not a globally routable address (registrations.public_only)"),
        ("2001:db8:7::/64", PUBLIC,
         "not a globally routable address (registrations.public_only)"),
        ("fd00::/64", PUBLIC, "not a globally routable address (registrations.public_only)"),
        ("fe80::1", PUBLIC, "not a globally routable address (registrations.public_only)"),
        ("::ffff:10.0.0.1", PUBLIC,
         "not a globally routable address (registrations.public_only)"),
    ],
)  # fmt: skip
def test_rejected_address_names_the_rule(
    value: object, rules: RegistrationsConfig, reason: str
) -> None:
    with pytest.raises(ValueError) as caught:
        parse_address(value, rules)
    assert str(caught.value) == reason


def test_floor_is_configurable() -> None:
    rules = RegistrationsConfig(min_prefix_v4=16, min_prefix_v6=32, public_only=False)
    assert parse_address("203.0.0.0/16", rules) == ipaddress.ip_network("203.0.0.0/16")
    assert parse_address("2001:db8::/32", rules) == ipaddress.ip_network("2001:db8::/32")
    with pytest.raises(ValueError, match=r"^prefix /15 is wider than the allowed /16$"):
        parse_address("202.0.0.0/15", rules)


def test_parse_addresses_sorts_and_collapses_duplicates() -> None:
    values = [
        "2001:db8:7::/64",
        "203.0.113.7",
        "::ffff:203.0.113.7",
        "203.0.113.7/32",
        "198.51.100.0/24",
        "198.51.100.0/25",
        "::1",
    ]
    assert parse_addresses(values, LAB) == (
        ipaddress.IPv4Network("198.51.100.0/24"),
        ipaddress.IPv4Network("198.51.100.0/25"),
        ipaddress.IPv4Network("203.0.113.7/32"),
        ipaddress.IPv6Network("::1/128"),
        ipaddress.IPv6Network("2001:db8:7::/64"),
    )


def test_parse_addresses_empty_list_is_valid() -> None:
    assert parse_addresses([], PUBLIC) == ()


@pytest.mark.parametrize(
    ("values", "position", "reason"),
    [
        (["203.0.113.7", "203.0.113.7/24"], "addresses[1]", "host bits set"),
        (["203.0.113.7", 7, "x"], "addresses[1]", "must be a string"),
        (["x", "0.0.0.0/0"], "addresses[0]", "not a valid IP address or prefix"),
        ([f"203.0.113.{i}" for i in range(1, 18)], "addresses",
         "17 entries exceed the limit of 16 per account"),
        # A bad entry is reported before the count.
        ([f"203.0.113.{i}" for i in range(1, 18)] + ["::"], "addresses[17]",
         "unspecified address"),
    ],
)  # fmt: skip
def test_parse_addresses_reports_first_bad_entry(
    values: list[object], position: str, reason: str
) -> None:
    with pytest.raises(RegistrationError) as caught:
        parse_addresses(values, LAB)
    assert not isinstance(caught.value, ShapeError)
    assert (caught.value.position, caught.value.reason) == (position, reason)
    assert str(caught.value) == f"{position}: {reason}"


def test_duplicates_do_not_count_against_the_limit() -> None:
    rules = RegistrationsConfig(max_per_account=2, public_only=False)
    values = ["203.0.113.7", "::ffff:203.0.113.7", "203.0.113.7/32", "2001:db8::1"]
    assert len(parse_addresses(values, rules)) == 2
    with pytest.raises(RegistrationError, match="3 entries exceed the limit of 2 per account"):
        parse_addresses([*values, "2001:db8::2"], rules)


@pytest.mark.parametrize("values", ["203.0.113.7", {"a": 1}, None, ("203.0.113.7",)])
def test_parse_addresses_needs_a_list(values: object) -> None:
    with pytest.raises(ShapeError) as caught:
        parse_addresses(values, LAB, field='accounts["a"]')
    assert (caught.value.position, caught.value.reason) == ('accounts["a"]', "must be a list")


@pytest.mark.parametrize(
    "value", ["a", "acct-1", "A.b_c:d-9", "x" * 128, "00000000-0000-0000-0000-000000000000"]
)
def test_valid_account_id(value: str) -> None:
    assert validate_account_id(value) == value


@pytest.mark.parametrize(
    "value", ["", "x" * 129, "a b", "a\n", "\na", "a/b", "é", "a\x00", 7, None]
)
def test_invalid_account_id(value: object) -> None:
    with pytest.raises(RegistrationError) as caught:
        validate_account_id(value)
    assert caught.value.position == "account"
    assert not isinstance(caught.value, ShapeError)


@pytest.mark.parametrize("value", [0, 1, 2**63 - 1])
def test_valid_version(value: int) -> None:
    assert parse_version(value) == value


@pytest.mark.parametrize("value", [-1, 2**63, True, False, 1.0, "1", None])
def test_invalid_version_is_a_shape_error(value: object) -> None:
    with pytest.raises(ShapeError) as caught:
        parse_version(value, position="query version")
    assert caught.value.position == "query version"


def test_account_document() -> None:
    version, networks, hostnames, devices = parse_account_document(
        {"version": 7, "addresses": ["203.0.113.7", "2001:db8:7::/64"]}, LAB
    )
    assert hostnames == devices == ()
    assert version == 7
    assert networks == (
        ipaddress.IPv4Network("203.0.113.7/32"),
        ipaddress.IPv6Network("2001:db8:7::/64"),
    )


@pytest.mark.parametrize(
    ("doc", "position"),
    [
        ([], ""),
        ("{}", ""),
        (None, ""),
        ({}, "addresses"),
        ({"version": 1}, "addresses"),
        ({"addresses": []}, "version"),
        ({"version": 1, "addresses": [], "extra": 1}, ""),
        ({"version": "1", "addresses": []}, "version"),
        ({"version": True, "addresses": []}, "version"),
        ({"version": -1, "addresses": []}, "version"),
        ({"version": 1, "addresses": "203.0.113.7"}, "addresses"),
        ({"version": 1, "addresses": {}}, "addresses"),
    ],
)
def test_account_document_shape_errors(doc: object, position: str) -> None:
    with pytest.raises(ShapeError) as caught:
        parse_account_document(doc, LAB)
    assert caught.value.position == position


def test_unexpected_key_is_not_echoed() -> None:
    with pytest.raises(ShapeError) as caught:
        parse_account_document({"version": 1, "addresses": [], "198.51.100.99": 1}, LAB)
    assert "198.51.100.99" not in str(caught.value)


def test_account_document_rule_error_is_not_a_shape_error() -> None:
    with pytest.raises(RegistrationError) as caught:
        parse_account_document({"version": 1, "addresses": ["203.0.113.7", 5]}, LAB)
    assert not isinstance(caught.value, ShapeError)
    assert caught.value.position == "addresses[1]"


def test_snapshot_document() -> None:
    snapshot = parse_snapshot_document(
        {
            "version": 42,
            "accounts": {
                "acct-2": ["2001:db8:7::/64"],
                "acct-1": ["::ffff:203.0.113.7", "203.0.113.7"],
                "acct-3": [],
            },
        },
        LAB,
    )
    assert isinstance(snapshot, Snapshot)
    assert snapshot.version == 42
    assert dict(snapshot.accounts) == {
        "acct-1": (ipaddress.IPv4Network("203.0.113.7/32"),),
        "acct-2": (ipaddress.IPv6Network("2001:db8:7::/64"),),
        "acct-3": (),
    }
    with pytest.raises(TypeError):
        snapshot.accounts["x"] = ()  # type: ignore[index]  # read-only mapping


@pytest.mark.parametrize(
    ("doc", "position"),
    [
        ([], ""),
        ({"version": 1}, "accounts"),
        ({"accounts": {}}, "version"),
        ({"version": 1, "accounts": {}, "addresses": []}, ""),
        ({"version": 1.5, "accounts": {}}, "version"),
        ({"version": 1, "accounts": []}, "accounts"),
        ({"version": 1, "accounts": {"acct-1": "203.0.113.7"}}, 'accounts["acct-1"]'),
    ],
)
def test_snapshot_document_shape_errors(doc: object, position: str) -> None:
    with pytest.raises(ShapeError) as caught:
        parse_snapshot_document(doc, LAB)
    assert caught.value.position == position


@pytest.mark.parametrize(
    ("accounts", "position", "reason"),
    [
        ({"acct-1": ["203.0.113.7"], "acct-2": ["a", "0.0.0.0/0"]}, 'accounts["acct-2"][0]',
         "not a valid IP address or prefix"),
        ({"acct-1": ["203.0.113.7"], "acct 2": []}, "accounts (key #1)",
         "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"),
        ({"acct-1": [f"203.0.113.{i}" for i in range(1, 18)]}, 'accounts["acct-1"]',
         "17 entries exceed the limit of 16 per account"),
    ],
)  # fmt: skip
def test_snapshot_document_rule_errors(
    accounts: dict[str, object], position: str, reason: str
) -> None:
    with pytest.raises(RegistrationError) as caught:
        parse_snapshot_document({"version": 3, "accounts": accounts}, LAB)
    assert not isinstance(caught.value, ShapeError)
    assert (caught.value.position, caught.value.reason) == (position, reason)


SECRET_ADDRESSES = [
    "0.0.0.0/0",
    "::/0",
    "203.0.113.77/16",
    "203.0.113.77/24",
    "fe80::1%eth0",
    "010.0.0.1",
    " 203.0.113.77",
    "203.0.113.77 ",
    "224.0.0.77",
    "127.0.0.77",
    "10.0.77.0/24",
    "fd77::/64",
    "2001:db8:77::/64",
    "::ffff:10.0.0.77",
    "203.0.113.77/999",
    "203.0.113.0/abc77",
]


@pytest.mark.parametrize("value", SECRET_ADDRESSES)
def test_error_messages_never_contain_the_address(value: str) -> None:
    with pytest.raises(RegistrationError) as caught:
        parse_snapshot_document({"version": 1, "accounts": {"acct": [value]}}, PUBLIC)
    message = str(caught.value)
    assert value.strip() not in message
    assert "77" not in message  # no fragment of the address either
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or value not in str(caught.value.__context__)


def test_invalid_account_id_is_not_echoed() -> None:
    with pytest.raises(RegistrationError) as caught:
        parse_snapshot_document({"version": 1, "accounts": {"203.0.113.77 ": []}}, PUBLIC)
    assert "203.0.113.77" not in str(caught.value)


@pytest.mark.parametrize(
    ("network", "text"),
    [
        ("203.0.113.7/32", "203.0.113.7"),
        ("203.0.113.0/24", "203.0.113.0/24"),
        ("2001:db8:7::1/128", "2001:db8:7::1"),
        ("2001:db8:7::/64", "2001:db8:7::/64"),
    ],
)
def test_format_network(network: str, text: str) -> None:
    assert format_network(ipaddress.ip_network(network)) == text


def test_format_round_trips_through_parse() -> None:
    for text in ["203.0.113.7", "203.0.113.0/24", "2001:db8:7::1", "2001:db8:7::/64"]:
        assert format_network(parse_address(text, LAB)) == text


# --- the fast path (socket.inet_pton + integers) agrees with parse_address --------------------

CI = settings(
    max_examples=3000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
RULE_SETS = [
    PUBLIC,
    LAB,
    RegistrationsConfig(min_prefix_v4=0, min_prefix_v6=0, public_only=False),
    RegistrationsConfig(min_prefix_v4=0, min_prefix_v6=0, public_only=True),
    RegistrationsConfig(min_prefix_v4=30, min_prefix_v6=100, public_only=True),
]


def _boundaries(network_type: type[Network]) -> list[int]:
    """Both ends of every network Python's ipaddress special-cases, and of multicast."""
    address_type = type(network_type(0).network_address)
    constants = vars(getattr(address_type, "_constants"))  # noqa: B009
    ends = {0, 2 ** network_type(0).max_prefixlen - 1}
    for value in constants.values():
        for network in value if isinstance(value, list) else [value]:
            if isinstance(network, network_type):
                ends |= {int(network.network_address), int(network.broadcast_address)}
    return sorted(ends)


V4_EDGES = _boundaries(ipaddress.IPv4Network)
V6_EDGES = _boundaries(ipaddress.IPv6Network)


def _near(edges: list[int], top: int) -> st.SearchStrategy[int]:
    return st.builds(
        lambda edge, delta: min(max(edge + delta, 0), top),
        st.sampled_from(edges),
        st.integers(-2, 2),
    )


v4_ints = st.integers(0, 2**32 - 1) | _near(V4_EDGES, 2**32 - 1)
v6_ints = (
    st.integers(0, 2**128 - 1)
    | _near(V6_EDGES, 2**128 - 1)
    | st.integers(0, 2**48).map(lambda low: (0xFFFF << 32) + low)  # mapped and nearby
    | st.integers(0, 2**32 - 1)  # IPv4-compatible ::a.b.c.d
)


def _v4_text(number: int, style: int) -> str:
    octets = number.to_bytes(4, "big")
    if style == 1:  # leading zeros: rejected by both parsers
        return ".".join(f"{octet:03d}" for octet in octets)
    return ".".join(str(octet) for octet in octets)


def _v6_text(number: int, style: int) -> str:
    address = ipaddress.IPv6Address(number)
    if style == 1:
        return address.exploded
    if style == 2:
        return address.compressed.upper()
    if style == 3:  # the low 32 bits as a dotted quad
        return address.exploded[:30] + str(ipaddress.IPv4Address(number & 0xFFFFFFFF))
    return address.compressed


def _with_length(text: st.SearchStrategy[str], top: int) -> st.SearchStrategy[str]:
    lengths = st.none() | st.integers(0, top + 2).map(str) | st.sampled_from(["", "024", "+8"])
    return st.builds(lambda t, n: t if n is None else f"{t}/{n}", text, lengths)


def _aligned(number: int, length: int, bits: int) -> int:
    return number >> (bits - length) << (bits - length) if length else 0


v4_prefixes = st.builds(
    lambda n, length: f"{_v4_text(_aligned(n, length, 32), 0)}/{length}",
    v4_ints,
    st.integers(0, 32),
)
v6_prefixes = st.builds(
    lambda n, length, style: f"{_v6_text(_aligned(n, length, 128), style)}/{length}",
    v6_ints,
    st.integers(0, 128),
    st.integers(0, 3),
)
EDGE_CASES = [
    "1.2.3.4",
    "1.2.3.4.",
    ".1.2.3.4",
    "1.2.3",
    "1.2.3.4.5",
    "01.2.3.4",
    "1.2.3.00",
    "1.2.3.0x1",
    "256.0.0.1",
    "1.2.3.4\x00",
    "1.2.3.4/32/1",
    "1.2.3.4//32",
    "1.2.3.4/32 ",
    "1::2:3:4:5:6:7",
    "1:2:3:4:5:6:7::",
    "::1:2:3:4:5:6:7",
    "1:2:3:4:5:6:7:8::",
    "::1:2:3:4:5:6:7:8",
    "1:2:3:4:5:6:7:8:9",
    ":1:2:3:4:5:6:7",
    "1:2:3:4:5:6:7:",
    "1:::2",
    "1::2::3",
    "12345::1",
    "2606:4700::1%eth0",
    "2606:4700::1%1/128",
    "2606:4700::g",
    "2606:4700::1.2.3.4",
    "2606:4700::1.2.3.4/128",
    "::ffff:1.2.3.4",
    "::ffff:cb00:7107",
    "::1.2.3.4",
    "::ffff:0:0/96",
    "::fffe:0:0/95",
    "2606:4700:0:0:0:0:0:1",
    "2606:4700::/0048",
    "2606:4700::/48\n",
    "\uff12606:4700::1",
    "ff00::/8",
    "fe80::/10",
    "2001:db8::/32",
    "2001:db9::/32",
]
address_texts = (
    st.builds(_v4_text, v4_ints, st.integers(0, 1))
    | st.builds(_v6_text, v6_ints, st.integers(0, 3))
    | v4_prefixes
    | v6_prefixes
    | _with_length(st.builds(_v4_text, v4_ints, st.just(0)), 32)
    | _with_length(st.builds(_v6_text, v6_ints, st.just(0)), 128)
    | st.text(alphabet="0123456789abcdefABCDEF:./%x \x00", max_size=50)
    | st.sampled_from(EDGE_CASES)
)


def _slow(value: str, rules: RegistrationsConfig) -> tuple[int, bytes, int] | str:
    try:
        network = parse_address(value, rules)
    except ValueError as exc:
        return str(exc)
    return (network.version, network.network_address.packed, network.prefixlen)


def _fast_path_expected(value: str) -> bool:
    """The forms the fast path is meant to take: no embedded IPv4 part in IPv6, and IPv6
    networks from 2**48 up (below are the unspecified, IPv4-compatible and mapped forms)."""
    text = value.partition("/")[0]
    if ":" not in text:
        return True
    return "." not in text and int(ipaddress.IPv6Address(text)) >= 2**48


@CI
@given(value=address_texts)
@example(value="203.0.113.7")
def test_fast_path_agrees_with_parse_address(value: str) -> None:
    """Whatever the fast path accepts, parse_address accepts with the same result; what it
    leaves alone goes to parse_address (so rejections and their reasons are the same by
    construction); and the common forms parse_address accepts do take the fast path."""
    for rules in RULE_SETS:
        slow = _slow(value, rules)
        fast = entries._fast_row(value, "acct", rules)
        if fast is not None:
            assert ("acct", *slow) == fast, (value, rules)
        elif not isinstance(slow, str):
            assert not _fast_path_expected(value), (value, rules)
        # The whole path (fast, then parse_address) gives exactly parse_address's outcome.
        try:
            outcome: object = parse_addresses([value], rules)
        except RegistrationError as exc:
            outcome = exc.reason
        expected = slow if isinstance(slow, str) else (parse_address(value, rules),)
        assert outcome == expected, (value, rules)


@CI
@given(number=v4_ints)
def test_non_global_table_matches_is_global_v4(number: int) -> None:
    is_global = ipaddress.IPv4Address(number).is_global
    assert bool(bisect_right(entries._NON_GLOBAL_V4, number) & 1) == (not is_global)


@CI
@given(
    number=(st.integers(2**48, 2**128 - 1) | _near(V6_EDGES, 2**128 - 1)).map(
        lambda n: max(n, 2**48)
    )
)
def test_non_global_table_matches_is_global_v6(number: int) -> None:
    is_global = ipaddress.IPv6Address(number).is_global
    assert bool(bisect_right(entries._NON_GLOBAL_V6, number) & 1) == (not is_global)


def test_non_global_table_at_every_edge() -> None:
    for edges, table, address_type, floor in (
        (V4_EDGES, entries._NON_GLOBAL_V4, ipaddress.IPv4Address, 0),
        (V6_EDGES, entries._NON_GLOBAL_V6, ipaddress.IPv6Address, 2**48),
    ):
        top = 2 ** address_type(0).max_prefixlen - 1
        for edge in edges:
            for number in (edge - 1, edge, edge + 1):
                if floor <= number <= top:
                    expected = not address_type(number).is_global
                    assert bool(bisect_right(table, number) & 1) == expected, number


def test_snapshot_accounts_are_compact_entries() -> None:
    snapshot = parse_snapshot_document(
        {"version": 1, "accounts": {"a": ["2001:db8:7::/64", "203.0.113.7", "::ffff:cb00:7107"]}},
        LAB,
    )
    value = snapshot.accounts["a"]
    assert isinstance(value, AccountEntries)
    assert value.account == "a"
    assert value.rows == (
        ("a", 4, bytes([203, 0, 113, 7]), 32),
        ("a", 6, ipaddress.IPv6Address("2001:db8:7::").packed, 64),
    )
    networks = (ipaddress.ip_network("203.0.113.7/32"), ipaddress.ip_network("2001:db8:7::/64"))
    assert len(value) == 2
    assert tuple(value) == networks
    assert value == networks
    assert value != list(networks)
    assert value[1] == networks[1]
    assert value[-1] == networks[1]
    assert value[:1] == networks[:1]
    assert value == AccountEntries("other", tuple(("other", *row[1:]) for row in value.rows))
    assert value != AccountEntries("a", value.rows[:1])
    assert "203" not in repr(value)
    with pytest.raises(TypeError):
        hash(value)

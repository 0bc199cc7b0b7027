"""Reading A/AAAA answers along their CNAME chain, and combining the halves (core.chain)."""

from __future__ import annotations

import ipaddress

import pytest
from dnslib import QTYPE, RCODE, RR, DNSHeader, DNSQuestion, DNSRecord

from smartdns.core.chain import (
    ChainAnswer,
    ChainKind,
    LookupOutcome,
    Resolution,
    combine,
    read_chain,
)
from smartdns.core.wire import (
    HEADER_SIZE,
    QTYPE_A,
    QTYPE_AAAA,
    ForwardedAnswer,
    encode_name,
    parse_upstream_answer,
    skip_name,
)
from smartdns.errors import WireError


def _parsed(message: bytes) -> ForwardedAnswer:
    """The answer as the forwarder hands it to read_chain: parsed and checked once."""
    return parse_upstream_answer(message, skip_name(message, HEADER_SIZE) + 4 - HEADER_SIZE)


SOA = "example.net. 300 IN SOA ns.example.net. h.example.net. 1 3600 600 86400 40"


def reply(qname: str, qtype: str, rcode: str, answers: list[str], authority: list[str]) -> bytes:
    message = DNSRecord(
        DNSHeader(id=7, qr=1, ra=1, rcode=getattr(RCODE, rcode)),
        q=DNSQuestion(qname, getattr(QTYPE, qtype)),
    )
    for text in answers:
        message.add_answer(*RR.fromZone(text))
    for text in authority:
        message.add_auth(*RR.fromZone(text))
    return bytes(message.pack())


def packed(*texts: str) -> tuple[bytes, ...]:
    return tuple(ipaddress.ip_address(text).packed for text in texts)


H = "home.example.net."
CASES = [
    (
        "direct_a",
        "A",
        "NOERROR",
        [f"{H} 60 IN A 192.0.2.1", f"{H} 30 IN A 192.0.2.2"],
        [],
        ChainAnswer(ChainKind.ADDRESSES, packed("192.0.2.1", "192.0.2.2"), 30, encode_name(H), 0),
    ),
    (
        "duplicates_collapse",
        "A",
        "NOERROR",
        [f"{H} 60 IN A 192.0.2.1", f"{H} 60 IN A 192.0.2.1"],
        [],
        ChainAnswer(ChainKind.ADDRESSES, packed("192.0.2.1"), 60, encode_name(H), 0),
    ),
    (
        "direct_aaaa",
        "AAAA",
        "NOERROR",
        [f"{H} 60 IN AAAA 2001:db8::7"],
        [],
        ChainAnswer(ChainKind.ADDRESSES, packed("2001:db8::7"), 60, encode_name(H), 0),
    ),
    (
        "chain_in_answer_takes_the_smallest_ttl",
        "A",
        "NOERROR",
        [
            f"{H} 300 IN CNAME b.dyn.example.",
            "b.dyn.example. 20 IN CNAME c.dyn.example.",
            "c.dyn.example. 90 IN A 192.0.2.9",
        ],
        [],
        ChainAnswer(ChainKind.ADDRESSES, packed("192.0.2.9"), 20, encode_name("c.dyn.example"), 2),
    ),
    (
        "records_off_the_chain_are_ignored",
        "A",
        "NOERROR",
        [
            "other.example. 60 IN A 203.0.113.66",
            f"{H} 60 IN CNAME c.dyn.example.",
            f"{H} 60 IN A 203.0.113.67",
            "c.dyn.example. 60 IN A 192.0.2.9",
        ],
        [],
        ChainAnswer(ChainKind.ADDRESSES, packed("192.0.2.9"), 60, encode_name("c.dyn.example"), 1),
    ),
    (
        "chain_leaving_the_answer_is_asked_next",
        "A",
        "NOERROR",
        [f"{H} 45 IN CNAME c.dyn.example."],
        [],
        ChainAnswer(ChainKind.CNAME, (), 45, encode_name("c.dyn.example"), 1),
    ),
    (
        "chain_to_a_name_without_the_type_is_nodata",
        "A",
        "NOERROR",
        [f"{H} 45 IN CNAME c.dyn.example."],
        [SOA],
        ChainAnswer(ChainKind.NODATA, (), 40, encode_name("c.dyn.example"), 1),
    ),
    (
        "chain_to_a_missing_name_is_nxdomain",
        "A",
        "NXDOMAIN",
        [f"{H} 45 IN CNAME c.dyn.example."],
        [SOA],
        ChainAnswer(ChainKind.NXDOMAIN, (), 40, encode_name("c.dyn.example"), 1),
    ),
    (
        "nxdomain",
        "A",
        "NXDOMAIN",
        [],
        [SOA],
        ChainAnswer(ChainKind.NXDOMAIN, (), 40, encode_name(H), 0),
    ),
    (
        "nodata_with_soa",
        "AAAA",
        "NOERROR",
        [],
        [SOA],
        ChainAnswer(ChainKind.NODATA, (), 40, encode_name(H), 0),
    ),
    (
        "nodata_without_soa",
        "AAAA",
        "NOERROR",
        [],
        [],
        ChainAnswer(ChainKind.NODATA, (), -1, encode_name(H), 0),
    ),
    (
        "other_type_in_answer_is_nodata",
        "AAAA",
        "NOERROR",
        [f"{H} 60 IN A 192.0.2.1"],
        [],
        ChainAnswer(ChainKind.NODATA, (), -1, encode_name(H), 0),
    ),
    (
        "ttl_with_the_top_bit_counts_as_zero",
        "A",
        "NOERROR",
        [f"{H} 2147483649 IN A 192.0.2.1"],
        [],
        ChainAnswer(ChainKind.ADDRESSES, packed("192.0.2.1"), 0, encode_name(H), 0),
    ),
    (
        "other_class_is_ignored",
        "A",
        "NOERROR",
        [f"{H} 60 CH A 192.0.2.1"],
        [],
        ChainAnswer(ChainKind.NODATA, (), -1, encode_name(H), 0),
    ),
]


@pytest.mark.parametrize(
    ("qtype", "rcode", "answers", "authority", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_read_chain(
    qtype: str, rcode: str, answers: list[str], authority: list[str], expected: ChainAnswer
) -> None:
    message = reply("Home.Example.NET.", qtype, rcode, answers, authority)
    wanted = QTYPE_A if qtype == "A" else QTYPE_AAAA
    assert read_chain(_parsed(message), encode_name(H), wanted, 8) == expected


def test_cname_loop_is_an_error() -> None:
    message = reply(
        H,
        "A",
        "NOERROR",
        [f"{H} 60 IN CNAME b.example.net.", f"b.example.net. 60 IN CNAME {H}"],
        [],
    )
    with pytest.raises(WireError):
        read_chain(_parsed(message), encode_name(H), QTYPE_A, 8)


def test_chain_longer_than_allowed_is_an_error() -> None:
    chain = [f"n{i}.example.net. 60 IN CNAME n{i + 1}.example.net." for i in range(3)]
    message = reply("n0.example.net.", "A", "NOERROR", chain, [])
    assert read_chain(_parsed(message), encode_name("n0.example.net"), QTYPE_A, 3).links == 3
    with pytest.raises(WireError):
        read_chain(_parsed(message), encode_name("n0.example.net"), QTYPE_A, 2)


@pytest.mark.parametrize("rcode", ["SERVFAIL", "REFUSED", "FORMERR", "NOTIMP"])
def test_rcodes_other_than_answers_are_errors(rcode: str) -> None:
    with pytest.raises(WireError):
        read_chain(_parsed(reply(H, "A", rcode, [], [])), encode_name(H), QTYPE_A, 8)


def test_garbage_is_an_error() -> None:
    message = reply(H, "A", "NOERROR", [f"{H} 60 IN A 192.0.2.1"], [])
    with pytest.raises(WireError):
        read_chain(_parsed(message[:-3]), encode_name(H), QTYPE_A, 8)


NAME = encode_name(H)
V4 = ChainAnswer(ChainKind.ADDRESSES, packed("192.0.2.1"), 50, NAME, 0)
V6 = ChainAnswer(ChainKind.ADDRESSES, packed("2001:db8::1"), 70, NAME, 0)
NODATA = ChainAnswer(ChainKind.NODATA, (), 40, NAME, 0)
NODATA_NO_SOA = ChainAnswer(ChainKind.NODATA, (), -1, NAME, 0)
NXDOMAIN = ChainAnswer(ChainKind.NXDOMAIN, (), 30, NAME, 0)


@pytest.mark.parametrize(
    ("v4", "v6", "expected"),
    [
        (V4, V6, Resolution(LookupOutcome.ADDRESSES, V4.addresses + V6.addresses, 50)),
        (V4, NODATA, Resolution(LookupOutcome.ADDRESSES, V4.addresses, 50)),
        (NODATA, V6, Resolution(LookupOutcome.ADDRESSES, V6.addresses, 70)),
        (NXDOMAIN, NXDOMAIN, Resolution(LookupOutcome.NXDOMAIN, (), 30)),
        (NODATA, NODATA_NO_SOA, Resolution(LookupOutcome.NODATA, (), 40)),
        (NODATA_NO_SOA, NODATA_NO_SOA, Resolution(LookupOutcome.NODATA, (), -1)),
        (NXDOMAIN, NODATA, Resolution(LookupOutcome.NODATA, (), 30)),
        (V4, None, Resolution(LookupOutcome.FAILED, V4.addresses)),
        (None, NODATA, Resolution(LookupOutcome.FAILED, ())),
        (None, None, Resolution(LookupOutcome.FAILED, ())),
    ],
)
def test_combine(v4: ChainAnswer | None, v6: ChainAnswer | None, expected: Resolution) -> None:
    assert combine(v4, v6) == expected

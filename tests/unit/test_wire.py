"""wire: the EDNS Padding option read from a query, and block-length padding of a reply
(RFC 7830, RFC 8467 §4.1)."""

from __future__ import annotations

import struct

import dns.edns
import dns.message
import pytest

from smartdns.core.wire import MAX_MESSAGE_SIZE, PADDING_BLOCK, build_opt, pad_reply, parse_query


def _reply(length: int) -> bytes:
    """A reply of `length` octets ending with our OPT (no options), as answers builds them:
    a header, one NULL record at the root filling the room, the OPT."""
    opt = build_opt(1232, dnssec_ok=False)
    rdlength = length - 12 - 11 - len(opt)
    header = struct.pack("!6H", 0, 0x8180, 0, 1, 0, 1)
    record = b"\x00" + struct.pack("!HHIH", 10, 1, 0, rdlength) + bytes(rdlength)
    return header + record + opt


@pytest.mark.parametrize(
    ("length", "padded"),
    [
        (60, 468),
        (464, 468),  # room for the option header only: a zero-length Padding option
        (465, 936),  # one octet short of room for the option header: a whole block more
        (468, 936),  # already a multiple: the option still goes in, so a block more
        (1000, 1404),
        (65_000, 65_052),  # near the largest message: still fits
        (65_520, 65_520),  # padded it would pass 65,535 octets: sent unpadded
    ],
)
def test_reply_is_padded_to_a_multiple_of_the_block(length: int, padded: int) -> None:
    reply = pad_reply(_reply(length))
    assert len(reply) == padded
    assert len(reply) % PADDING_BLOCK == 0 or len(reply) == length
    if padded > length:
        opt = dns.message.from_wire(reply).options
        assert [option.otype for option in opt] == [dns.edns.OptionType.PADDING]


def test_padding_respects_a_smaller_limit() -> None:
    assert pad_reply(_reply(500), limit=900) == _reply(500)
    assert MAX_MESSAGE_SIZE == 65_535


@pytest.mark.parametrize(
    ("options", "padding"),
    [
        ([dns.edns.GenericOption(dns.edns.OptionType.PADDING, b"")], True),
        ([dns.edns.GenericOption(dns.edns.OptionType.PADDING, bytes(40))], True),
        ([dns.edns.GenericOption(dns.edns.OptionType.COOKIE, bytes(8))], False),
        (
            [
                dns.edns.GenericOption(dns.edns.OptionType.COOKIE, bytes(8)),
                dns.edns.GenericOption(dns.edns.OptionType.PADDING, bytes(3)),
            ],
            True,
        ),
        ([], False),
    ],
)
def test_query_learns_whether_it_carried_the_padding_option(
    options: list[dns.edns.Option], padding: bool
) -> None:
    wire = dns.message.make_query("example.org", "A", use_edns=0, options=options).to_wire()
    assert parse_query(wire).padding is padding


def test_query_without_edns_has_no_padding() -> None:
    assert parse_query(dns.message.make_query("example.org", "A").to_wire()).padding is False

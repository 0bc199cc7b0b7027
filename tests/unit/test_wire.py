"""wire: hand parsing of header, question and OPT; upstream answers; CNAME chains; the EDNS
Padding option read from a query and block-length padding of a reply (RFC 7830, RFC 8467)."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest

from smartdns.core.wire import (
    FLAG_RD,
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_UPSTREAM_RECORDS,
    PADDING_BLOCK,
    RCODE_BADVERS,
    RCODE_FORMERR,
    RCODE_NOTIMP,
    build_opt,
    encode_name,
    pad_reply,
    parse_query,
    parse_upstream_answer,
    read_name,
    skip_name,
)
from smartdns.errors import WireError


def _query(name: str = "www.NetFlix.com", qtype: str = "A", **kwargs: object) -> bytes:
    message = dns.message.make_query(name, qtype, **kwargs)  # type: ignore[arg-type]
    return message.to_wire()


def _header(
    query_id: int = 0x1234, flags: int = FLAG_RD, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return struct.pack("!6H", query_id, flags, qd, an, ns, ar)


QUESTION = encode_name("example.com") + struct.pack("!HH", 1, 1)


def test_plain_query_fields() -> None:
    packet = _query("www.NetFlix.com", "AAAA")
    query = parse_query(packet)
    assert query.id == struct.unpack("!H", packet[:2])[0]
    assert query.question == packet[12:]  # case kept byte for byte
    assert b"NetFlix" in query.question
    assert query.qname == encode_name("www.netflix.com")
    assert (query.qtype, query.qclass) == (28, 1)
    assert not query.has_edns and query.udp_size == 0


def test_edns_fields_and_small_size_counts_as_512() -> None:
    query = parse_query(_query(use_edns=0, payload=4096, want_dnssec=True))
    assert query.has_edns and query.udp_size == 4096 and query.dnssec_ok
    small = parse_query(_query(use_edns=0, payload=100))
    assert small.udp_size == 512 and not small.dnssec_ok


def test_unknown_options_and_flags_are_ignored() -> None:
    options = [dns.edns.GenericOption(100, b"xyz"), dns.edns.ECSOption("192.0.2.0", 24)]
    query = parse_query(_query(use_edns=0, options=options, ednsflags=0x0080))
    assert query.has_edns and not query.dnssec_ok


def test_edns_version_1_gets_badvers_with_question() -> None:
    packet = _query(use_edns=1)
    with pytest.raises(WireError) as caught:
        parse_query(packet)
    assert caught.value.rcode == RCODE_BADVERS
    assert caught.value.question == parse_query(_query()).question


@pytest.mark.parametrize(
    ("packet", "rcode"),
    [
        pytest.param(b"\x12\x34\x01", None, id="runt_packet_is_dropped"),
        pytest.param(_header(flags=0x8000) + QUESTION, None, id="response_is_dropped"),
        pytest.param(_header(flags=15 << 11) + QUESTION, RCODE_NOTIMP, id="opcode_15_gets_notimp"),
        pytest.param(
            _header(flags=2 << 11) + QUESTION, RCODE_NOTIMP, id="status_opcode_gets_notimp"
        ),
        pytest.param(_header(qd=0), RCODE_FORMERR, id="qdcount_0_gets_formerr"),
        pytest.param(_header(qd=2) + QUESTION * 2, RCODE_FORMERR, id="qdcount_2_gets_formerr"),
        pytest.param(
            _header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",
            RCODE_FORMERR,
            id="label_over_63_gets_formerr",
        ),
        pytest.param(
            _header() + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01",
            RCODE_FORMERR,
            id="name_over_255_gets_formerr",
        ),
        pytest.param(
            _header() + b"\xc0\x0c\x00\x01\x00\x01",
            RCODE_FORMERR,
            id="compression_loop_gets_formerr",
        ),
        pytest.param(
            _header() + b"\x01a\xc0\x0c\x00\x01\x00\x01",
            RCODE_FORMERR,
            id="compression_pointer_to_self_gets_formerr",
        ),
        pytest.param(
            _header() + b"\xc0\x02\x00\x01\x00\x01",
            RCODE_FORMERR,
            id="pointer_into_header_gets_formerr",
        ),
        pytest.param(
            _header() + b"\x07example\x03co", RCODE_FORMERR, id="truncated_name_gets_formerr"
        ),
        pytest.param(
            _header() + encode_name("example.com") + b"\x00",
            RCODE_FORMERR,
            id="truncated_question_gets_formerr",
        ),
        pytest.param(
            _header(ar=1) + QUESTION + b"\x00\x00\x29\x04",
            RCODE_FORMERR,
            id="truncated_opt_gets_formerr",
        ),
        pytest.param(
            _header(ar=2) + QUESTION + build_opt(1232, False) * 2,
            RCODE_FORMERR,
            id="two_opt_records_get_formerr",
        ),
        pytest.param(
            _header(an=1) + QUESTION + build_opt(1232, False),
            RCODE_FORMERR,
            id="opt_in_answer_section_gets_formerr",
        ),
        pytest.param(
            _header(ar=1) + QUESTION + b"\x01a" + build_opt(1232, False)[1:],
            RCODE_FORMERR,
            id="opt_with_non_root_owner_gets_formerr",
        ),
        pytest.param(
            _header(ar=1) + QUESTION + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x10",
            RCODE_FORMERR,
            id="opt_rdata_past_end_gets_formerr",
        ),
        pytest.param(
            _header(ar=60000) + QUESTION, RCODE_FORMERR, id="absurd_record_count_gets_formerr"
        ),
        pytest.param(
            _header(ar=1) + QUESTION + b"\xc0\x1d" + b"\x00" * 10,
            RCODE_FORMERR,
            id="compression_loop_in_additional_gets_formerr",
        ),
    ],
)
def test_malformed(packet: bytes, rcode: int | None) -> None:
    with pytest.raises(WireError) as caught:
        parse_query(packet)
    assert caught.value.rcode == rcode
    assert "example" not in str(caught.value)


def test_trailing_garbage_is_ignored() -> None:
    packet = _query()
    assert parse_query(packet + b"\xde\xad\xbe\xef").question == parse_query(packet).question


def test_skip_name_handles_pointer_and_rejects_bad_label() -> None:
    message = b"\x00" * 12 + encode_name("a.b") + b"\xc0\x0c"
    assert skip_name(message, 12) == 17
    assert skip_name(message, 17) == 19
    with pytest.raises(WireError):
        skip_name(b"\x80abc", 0)


def test_encode_name() -> None:
    assert encode_name("NetFlix.com.") == b"\x07netflix\x03com\x00"
    assert encode_name("") == b"\x00"
    with pytest.raises(ValueError):
        encode_name("a" * 64 + ".com")


def test_parse_upstream_answer_strips_opt_and_finds_ttls() -> None:
    request = dns.message.make_query("example.com", "A", use_edns=0)
    response = dns.message.make_response(request)
    response.answer.append(
        dns.rrset.from_text("example.com.", 300, "IN", "A", "192.0.2.1", "192.0.2.2")
    )
    response.additional.append(dns.rrset.from_text("ns.example.com.", 60, "IN", "A", "192.0.2.53"))
    wire = response.to_wire()
    answer = parse_upstream_answer(wire, len(QUESTION))
    assert (answer.answer_count, answer.authority_count, answer.additional_count) == (2, 0, 1)
    assert len(answer.ttl_offsets) == 3
    assert [struct.unpack_from("!I", answer.records, o)[0] for o in answer.ttl_offsets] == [
        300,
        300,
        60,
    ]
    with pytest.raises(WireError):
        parse_upstream_answer(wire[:-5], len(QUESTION))


def _upstream_message(records: bytes, an: int, ns: int = 0, ar: int = 0) -> bytes:
    return _header(flags=0x8180, an=an, ns=ns, ar=ar) + QUESTION + records


A_RECORD = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + b"\xc0\x00\x02\x01"


def test_read_name_follows_backward_pointers_and_lowers() -> None:
    message = _header() + b"\x07Example\x03COM\x00" + b"\x03WWW\xc0\x0c"
    name, after = read_name(message, 25)
    assert name == encode_name("www.example.com") and after == len(message)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(b"\xc0\x0c", id="pointer_to_itself_is_a_loop"),
        pytest.param(b"\x01a\xc0\x0c", id="pointer_back_to_own_start_is_a_loop"),
        pytest.param(b"\xc0\x20", id="forward_pointer_is_refused"),
        pytest.param(b"\x05ab", id="truncated_label"),
        pytest.param(b"\x40" + b"a" * 64 + b"\x00", id="label_over_63"),
        pytest.param((b"\x3f" + b"a" * 63) * 4 + b"\x00", id="name_over_255"),
    ],
)
def test_read_name_refuses_crafted_names(name: bytes) -> None:
    with pytest.raises(WireError):
        read_name(_header() + name, 12)


def test_parse_upstream_answer_refuses_too_many_records() -> None:
    message = _upstream_message(A_RECORD * 10, an=10)
    assert parse_upstream_answer(message, len(QUESTION), max_records=10).answer_count == 10
    with pytest.raises(WireError):
        parse_upstream_answer(message, len(QUESTION), max_records=9)
    with pytest.raises(WireError):  # the count alone is enough: nothing is walked
        parse_upstream_answer(_upstream_message(b"", an=MAX_UPSTREAM_RECORDS + 1), len(QUESTION))


def test_parse_upstream_answer_refuses_opt_outside_additional() -> None:
    opt = build_opt(1232, False)
    with pytest.raises(WireError):
        parse_upstream_answer(_upstream_message(opt + A_RECORD, an=2), len(QUESTION))
    with pytest.raises(WireError):
        parse_upstream_answer(_upstream_message(A_RECORD + opt, an=1, ns=1), len(QUESTION))
    ok = parse_upstream_answer(_upstream_message(A_RECORD + opt, an=1, ar=1), len(QUESTION))
    assert ok.additional_count == 0 and ok.records == A_RECORD


def test_parse_upstream_answer_refuses_a_cname_target_it_cannot_read() -> None:
    cname = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 300, 2) + b"\xc0\x40"
    with pytest.raises(WireError):
        parse_upstream_answer(_upstream_message(cname, an=1), len(QUESTION))


def test_parse_upstream_answer_notes_cname_and_negative_ttl() -> None:
    cname = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 300, 2) + b"\xc0\x0c"
    assert parse_upstream_answer(_upstream_message(cname, an=1), len(QUESTION)).has_cname
    soa_rdata = b"\x00\x00" + struct.pack("!5I", 1, 3600, 600, 86400, 120)
    soa = b"\x00" + struct.pack("!HHIH", 6, 1, 900, len(soa_rdata)) + soa_rdata
    negative = parse_upstream_answer(_upstream_message(soa, an=0, ns=1), len(QUESTION))
    assert negative.soa_negative_ttl == 120 and not negative.has_cname
    assert (
        parse_upstream_answer(_upstream_message(A_RECORD, an=1), len(QUESTION)).soa_negative_ttl
        == -1
    )


# ---- upstream answers: every name and every RDATA a client parses is checked ---------------

_RR = struct.Struct("!HHIH")
_LONG_LABELS = (b"\x3f" + b"a" * 63) * 3 + b"\x33" + b"b" * 51  # 244 octets, no root yet


def _rr(owner: bytes, rtype: int, rdata: bytes, rclass: int = 1, ttl: int = 300) -> bytes:
    return owner + _RR.pack(rtype, rclass, ttl, len(rdata)) + rdata


def test_skip_name_and_read_name_refuse_pointers_into_the_header() -> None:
    message = _header(query_id=0) + b"\xc0\x00"  # ID 0 reads as the root name
    with pytest.raises(WireError):
        skip_name(message, 12)
    with pytest.raises(WireError):
        read_name(message, 12)


def test_read_name_refuses_a_pointer_that_does_not_go_further_back() -> None:
    # the name at 25 hops to 12, whose own pointer goes forward again to 14: a loop in waiting
    message = _header() + b"\x01a\xc0\x0e" + b"\x01b\x00" + b"\x00" * 6 + b"\xc0\x0c"
    with pytest.raises(WireError):
        read_name(message, len(message) - 2)


def test_dnspython_compressed_answer_of_many_types_is_accepted_as_is() -> None:
    """dnspython compresses against names inside RDATA (NS, MX, SOA, ...): all accepted."""
    request = dns.message.make_query("example.com", "ANY", use_edns=0)
    response = dns.message.make_response(request)
    for rtype, rdatas in [
        ("CNAME", ["www.example.com."]),
        ("NS", ["ns1.example.com.", "ns2.example.com."]),
        ("MX", ["10 mx.example.com.", "20 mx2.example.com."]),
        ("SOA", ["ns1.example.com. host.example.com. 1 2 3 4 5"]),
        ("TXT", ['"v=spf1 -all" "second"', '""']),
        ("HINFO", ['"cpu" "os"']),
        ("SRV", ["0 5 443 www.example.com."]),
        ("NAPTR", ['100 10 "u" "E2U+sip" "!^.*$!sip:x@example.com!" .']),
        ("DNAME", ["example.net."]),
        ("PTR", ["mx.example.com."]),
        ("RP", ["host.example.com. txt.example.com."]),
        ("HTTPS", ['1 . alpn="h2"']),
        ("CAA", ['0 issue "ca.example"']),
        ("A", ["192.0.2.1"]),
        ("AAAA", ["2001:db8::1"]),
    ]:
        response.answer.append(dns.rrset.from_text("example.com.", 300, "IN", rtype, *rdatas))
    response.additional.append(dns.rrset.from_text("ns1.example.com.", 60, "IN", "A", "192.0.2.53"))
    response.additional.append(dns.rrset.from_text("mx2.example.com.", 60, "IN", "A", "192.0.2.25"))
    wire = response.to_wire()
    assert wire.count(b"\x03mx2") == 1  # the glue's owner points into the MX RDATA
    question_end = HEADER_SIZE + len(QUESTION)
    answer = parse_upstream_answer(wire, len(QUESTION))
    assert answer.records == wire[question_end : wire.rindex(build_opt(1232, False)[:3])]
    assert answer.additional_count == 2 and len(answer.ttl_offsets) == answer.answer_count + 2


_TTL_AS_NAME = b"\xc0\x0c" + _RR.pack(1, 1, 0x01610000, 4) + b"\xc0\x00\x02\x01"  # TTL = "a."


@pytest.mark.parametrize(
    ("records", "an", "ns"),
    [
        pytest.param(_rr(b"\xc0\x00", 1, bytes(4)), 1, 0, id="owner_pointer_into_header"),
        pytest.param(_rr(b"\xc0\x0d", 1, bytes(4)), 1, 0, id="owner_pointer_into_a_label"),
        pytest.param(_rr(b"\xc0\x19", 1, bytes(4)), 1, 0, id="owner_pointer_into_qtype"),
        pytest.param(_TTL_AS_NAME + _rr(b"\xc0\x23", 1, bytes(4)), 2, 0, id="pointer_into_a_ttl"),
        pytest.param(
            _rr(b"\xc0\x0c", 1, b"\x01a\x00\x00") + _rr(b"\xc0\x29", 1, bytes(4)),
            2,
            0,
            id="pointer_into_a_records_rdata",
        ),
        pytest.param(_rr(_LONG_LABELS + b"\xc0\x0c", 1, bytes(4)), 1, 0, id="owner_over_255"),
        pytest.param(_rr(b"\xc0\x0c", 5, _LONG_LABELS + b"\xc0\x0c"), 1, 0, id="cname_over_255"),
        pytest.param(_rr(b"\xc0\x0c", 2, _LONG_LABELS + b"\xc0\x0c"), 0, 1, id="ns_over_255"),
        pytest.param(_rr(b"\xc0\x0c", 12, b"\xc0\x30"), 1, 0, id="ptr_forward_pointer"),
        pytest.param(
            _rr(b"\xc0\x0c", 15, b"\x00\x0a" + _LONG_LABELS + b"\xc0\x0c"), 1, 0, id="mx_over_255"
        ),
        pytest.param(
            _rr(b"\xc0\x0c", 33, bytes(6) + _LONG_LABELS + b"\xc0\x0c"), 1, 0, id="srv_over_255"
        ),
        pytest.param(_rr(b"\xc0\x0c", 39, _LONG_LABELS + b"\xc0\x0c"), 1, 0, id="dname_over_255"),
        pytest.param(
            _rr(b"\x00", 6, b"\x00" + _LONG_LABELS + b"\xc0\x0c" + bytes(20)),
            0,
            1,
            id="soa_rname_over_255",
        ),
        pytest.param(_rr(b"\xc0\x0c", 6, b"\x00\x00" + bytes(19)), 0, 1, id="soa_too_short"),
        pytest.param(_rr(b"\xc0\x0c", 15, b"\x00\x0a\x00\x00"), 1, 0, id="mx_trailing_octet"),
        pytest.param(_rr(b"\xc0\x0c", 5, b"\x40" + bytes(64)), 1, 0, id="cname_bad_label_type"),
        pytest.param(_rr(b"\xc0\x0c", 1, b""), 1, 0, id="a_rdlength_0"),
        pytest.param(_rr(b"\xc0\x0c", 1, bytes(5)), 1, 0, id="a_rdlength_5"),
        pytest.param(_rr(b"\xc0\x0c", 28, bytes(4)), 1, 0, id="aaaa_rdlength_4"),
        pytest.param(_rr(b"\xc0\x0c", 16, b"\x05abc"), 1, 0, id="txt_string_past_rdata"),
    ],
)
def test_parse_upstream_answer_refuses_names_and_rdata_a_client_could_not_parse(
    records: bytes, an: int, ns: int
) -> None:
    with pytest.raises(WireError):
        parse_upstream_answer(_upstream_message(records, an=an, ns=ns), len(QUESTION))


def test_parse_upstream_answer_cuts_at_opt_or_tsig_and_refuses_a_second_opt() -> None:
    opt = build_opt(1232, False)
    tsig = _rr(b"\x00", 250, b"", rclass=255, ttl=0)
    answer = parse_upstream_answer(_upstream_message(A_RECORD + tsig, an=1, ar=1), len(QUESTION))
    assert answer.records == A_RECORD and answer.additional_count == 0
    glue = _rr(b"\xc0\x0c", 1, bytes(4))
    answer = parse_upstream_answer(
        _upstream_message(A_RECORD + glue + opt + tsig, an=1, ar=3), len(QUESTION)
    )
    assert answer.records == A_RECORD + glue and answer.additional_count == 1
    with pytest.raises(WireError):
        parse_upstream_answer(_upstream_message(A_RECORD + opt + opt, an=1, ar=2), len(QUESTION))
    with pytest.raises(WireError):  # RFC 8945 §5.1: TSIG is the last record
        parse_upstream_answer(_upstream_message(A_RECORD + tsig + glue, an=1, ar=2), len(QUESTION))


def test_rdata_of_other_classes_and_unknown_types_is_opaque() -> None:
    chaos_a = _rr(b"\xc0\x0c", 1, b"\x00\xc0\x00", rclass=3)  # CH A: a name and an address
    unknown = _rr(b"\xc0\x0c", 65280, b"\xc0\x00anything")
    answer = parse_upstream_answer(_upstream_message(chaos_a + unknown, an=2), len(QUESTION))
    assert answer.records == chaos_a + unknown


def test_a_name_255_octets_long_through_a_pointer_is_accepted() -> None:
    # 244 octets of labels + "example.com" (13 octets with the root) = 257: one label shorter
    owner = (b"\x3f" + b"a" * 63) * 3 + b"\x31" + b"b" * 49 + b"\xc0\x0c"  # 192 + 50 + 13 = 255
    record = _rr(owner, 1, bytes(4))
    assert parse_upstream_answer(_upstream_message(record, an=1), len(QUESTION)).records == record
    assert len(read_name(_upstream_message(record, an=1), HEADER_SIZE + len(QUESTION))[0]) == 255


def _padded_reply(length: int) -> bytes:
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
    reply = pad_reply(_padded_reply(length))
    assert len(reply) == padded
    assert len(reply) % PADDING_BLOCK == 0 or len(reply) == length
    if padded > length:
        opt = dns.message.from_wire(reply).options
        assert [option.otype for option in opt] == [dns.edns.OptionType.PADDING]


def test_padding_respects_a_smaller_limit() -> None:
    assert pad_reply(_padded_reply(500), limit=900) == _padded_reply(500)
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

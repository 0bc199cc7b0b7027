"""EDNS(0) per RFC 6891, truncation, and what reaches the upstream (conformance cases)."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode

from tests.e2e.harness import UNREGISTERED, Server
from tests.fake_upstream import FakeUpstream


def test_plain_query_gets_no_opt(server: Server) -> None:
    reply = server.query("www.netflix.com", "A")
    assert reply.edns == -1


def test_edns0_gets_our_size(server: Server) -> None:
    reply = server.query("www.netflix.com", "A", use_edns=0, payload=4096)
    assert reply.edns == 0 and reply.payload == 1232 and not reply.options


def test_edns_version_1_gets_badvers(server: Server) -> None:
    reply = server.query("www.netflix.com", "A", use_edns=1)
    assert reply.rcode() == dns.rcode.BADVERS and reply.edns == 0 and not reply.answer


def test_unknown_option_and_flag_are_ignored_not_echoed(server: Server) -> None:
    reply = server.query(
        "www.netflix.com",
        "A",
        use_edns=0,
        ednsflags=0x0080,
        options=[dns.edns.GenericOption(100, b"hi")],
    )
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer
    assert not reply.options and reply.ednsflags == 0


def test_do_bit_copied(server: Server) -> None:
    reply = server.query("www.netflix.com", "A", use_edns=0, want_dnssec=True)
    assert reply.ednsflags & dns.flags.DO


def test_z_bit_in_header_is_ignored(server: Server) -> None:
    message = dns.message.make_query("www.netflix.com", "A")
    wire = bytearray(message.to_wire())
    wire[3] |= 0x40
    reply = server.raw_udp(bytes(wire))
    assert reply is not None and dns.message.from_wire(reply).answer


def test_many_options_are_not_forwarded(server: Server, upstream: FakeUpstream) -> None:
    options = [
        dns.edns.GenericOption(dns.edns.NSID, b""),
        dns.edns.ECSOption("198.51.100.0", 24),
        dns.edns.GenericOption(9, b""),  # EXPIRE
        dns.edns.CookieOption(b"\x01" * 8, b""),
    ]
    reply = server.query("example.org", "A", use_edns=0, options=options)
    assert reply.rcode() == dns.rcode.NOERROR and [r.to_text() for r in reply.answer[0]] == [
        "192.0.2.1"
    ]
    assert not reply.options
    seen = upstream.queries[-1]
    assert seen.has_opt and seen.edns_options == []


def test_upstream_never_sees_client_bytes(server: Server, upstream: FakeUpstream) -> None:
    message = dns.message.make_query(
        "Example.ORG", "A", use_edns=0, options=[dns.edns.ECSOption("198.51.100.7", 32)]
    )
    message.id = 0x5151
    wire = message.to_wire() + b"TRAILING-CANARY"
    reply_wire = server.raw_udp(wire)
    assert reply_wire is not None
    reply = dns.message.from_wire(reply_wire)
    assert reply.id == 0x5151 and reply.answer
    assert (
        reply_wire[12 : 12 + len("Example.ORG") + 2 + 4]
        == wire[12 : 12 + len("Example.ORG") + 2 + 4]
    )  # 0x20 kept
    seen = upstream.queries[-1]
    assert b"TRAILING-CANARY" not in seen.raw and b"\xc6\x33\x64" not in seen.raw
    assert (seen.edns_options == [] and seen.id != 0x5151) or (
        seen.id == 0x5151 and len(upstream.queries) > 0
    )
    assert seen.qname == "example.org"


def test_large_answer_is_truncated_then_complete_over_tcp(server: Server) -> None:
    udp = server.query("big.example.org", "A", use_edns=0, payload=512)
    assert udp.flags & dns.flags.TC and not udp.answer and udp.edns == 0
    plain = server.query("big.example.org", "A")
    assert plain.flags & dns.flags.TC
    big = server.query("big.example.org", "A", use_edns=0, payload=4096)
    assert big.flags & dns.flags.TC  # 120 A records are more than our 1232
    tcp = server.query("big.example.org", "A", tcp=True)
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 120


def test_unknown_type_is_forwarded(server: Server) -> None:
    reply = server.query("example.org", "TYPE666")
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer


def test_chaos_version_bind_is_refused(server: Server) -> None:
    reply = server.query("version.bind", "TXT", rdclass="CH")
    assert reply.rcode() == dns.rcode.REFUSED and not reply.answer


def test_unregistered_gets_refused_throughout(server: Server) -> None:
    for kwargs in ({}, {"use_edns": 0}, {"use_edns": 0, "want_dnssec": True}):
        for name, qtype in (
            ("www.netflix.com", "A"),
            ("example.org", "TYPE666"),
            ("big.example.org", "A"),
        ):
            reply = server.query(name, qtype, source=UNREGISTERED, **kwargs)
            assert reply.rcode() == dns.rcode.REFUSED and not reply.answer
    badvers = server.query("example.org", "A", source=UNREGISTERED, use_edns=1)
    assert badvers.rcode() == dns.rcode.BADVERS


def test_question_echoed_byte_for_byte(server: Server) -> None:
    for name in ("wWw.NeTfLiX.cOm", "ExAmPlE.oRg"):
        wire = dns.message.make_query(name, "A").to_wire()
        reply = server.raw_udp(wire)
        assert reply is not None
        qlen = len(wire) - 12
        assert reply[12 : 12 + qlen] == wire[12:]
        assert struct.unpack("!H", reply[:2]) == struct.unpack("!H", wire[:2])

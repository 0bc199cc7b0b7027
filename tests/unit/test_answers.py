"""answers: every reply kind parses as the reply SPEC 2 describes (checked with dnspython),
copies the query's ID, opcode, RD and CD, and fits the limit it is given."""

from __future__ import annotations

import ipaddress
import struct
from types import MappingProxyType

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from smartdns.config.model import EncryptedConfig, HostPort, Region, UnblockConfig
from smartdns.core.answers import LocalZone, Responder, build_local_zones, error_reply
from smartdns.core.policy import ChainCut, NameKind, Verdict
from smartdns.core.wire import (
    RCODE_FORMERR,
    RCODE_SERVFAIL,
    CnameLink,
    encode_name,
    parse_query,
    parse_upstream_answer,
)
from smartdns.errors import WireError

UNBLOCK = UnblockConfig(
    ttl=60,
    regions=MappingProxyType(
        {
            "us": Region(
                ipv4=(
                    ipaddress.IPv4Address("198.51.100.10"),
                    ipaddress.IPv4Address("198.51.100.11"),
                )
            ),
            "uk": Region(
                ipv4=(ipaddress.IPv4Address("198.51.100.20"),),
                ipv6=(ipaddress.IPv6Address("2001:db8:20::1"),),
            ),
        }
    ),
    zones=MappingProxyType({"netflix.com": "us", "bbc.co.uk": "uk"}),
)
ZONES = build_local_zones(UNBLOCK)
RESPONDER = Responder(1232)
ROOMY = 65535
SOA_TEXT = "smartdns.invalid. hostmaster.smartdns.invalid. 1 3600 600 86400 60"


def _ask(name: str, qtype: str, **kwargs: object) -> tuple[dns.message.Message, bytes]:
    message = dns.message.make_query(name, qtype, **kwargs)  # type: ignore[arg-type]
    return message, message.to_wire()


def _local(name: str, qtype: str, verdict: Verdict, **kwargs: object) -> dns.message.Message:
    _, wire = _ask(name, qtype, **kwargs)
    query = parse_query(wire)
    zone = ZONES.match(query.qname)
    assert zone is not None
    reply = RESPONDER.local(query, verdict, zone, ROOMY)
    assert reply[12 : 12 + len(query.question)] == query.question
    return dns.message.from_wire(reply)


def test_a_answer_echoes_question_and_carries_region_addresses() -> None:
    request, wire = _ask("WWW.NetFlix.com", "A")
    query = parse_query(wire)
    zone = ZONES.match(query.qname)
    assert zone is not None and zone.region == "us" and zone.kind is NameKind.UNBLOCK_V4
    reply = dns.message.from_wire(RESPONDER.local(query, Verdict.UNBLOCK, zone, ROOMY))
    assert reply.id == request.id and reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.RA and reply.flags & dns.flags.RD and reply.flags & dns.flags.QR
    assert reply.flags & dns.flags.AA and reply.edns == -1
    (rrset,) = reply.answer
    assert rrset.ttl == 60 and sorted(r.address for r in rrset) == [
        "198.51.100.10",
        "198.51.100.11",
    ]


def test_aaaa_with_region_ipv6_and_opt_do_copied() -> None:
    reply = _local("bbc.co.uk", "AAAA", Verdict.UNBLOCK, use_edns=0, want_dnssec=True)
    assert [r.address for r in reply.answer[0]] == ["2001:db8:20::1"]
    assert reply.edns == 0 and reply.payload == 1232 and reply.ednsflags & dns.flags.DO


@pytest.mark.parametrize(
    ("name", "qtype", "verdict", "rcode", "owner"),
    [
        ("www.netflix.com", "HTTPS", Verdict.NODATA, dns.rcode.NOERROR, "netflix.com."),
        ("_dns.resolver.arpa", "SVCB", Verdict.NODATA, dns.rcode.NOERROR, "resolver.arpa."),
        ("resolver.arpa", "A", Verdict.NODATA, dns.rcode.NOERROR, "resolver.arpa."),
        (
            "use-application-dns.net",
            "A",
            Verdict.NXDOMAIN,
            dns.rcode.NXDOMAIN,
            "use-application-dns.net.",
        ),
    ],
)
def test_negative_local_answers_carry_the_synthesized_soa(
    name: str, qtype: str, verdict: Verdict, rcode: dns.rcode.Rcode, owner: str
) -> None:
    reply = _local(name, qtype, verdict)
    assert reply.rcode() == rcode and not reply.answer and reply.flags & dns.flags.AA
    (soa,) = reply.authority
    assert soa.rdtype == dns.rdatatype.SOA and str(soa.name) == owner and soa.ttl == 60
    assert soa[0].to_text() == SOA_TEXT


def test_special_names_are_local_without_addresses() -> None:
    for name, kind in (
        ("resolver.arpa", NameKind.RESOLVER),
        ("use-application-dns.net", NameKind.CANARY),
    ):
        zone = ZONES.match(encode_name("x." + name))
        assert isinstance(zone, LocalZone) and zone.kind is kind and zone.a_count == 0


def test_refused_and_servfail_keep_id_and_question() -> None:
    request, wire = _ask("example.org", "TXT", use_edns=0)
    query = parse_query(wire)
    for build, rcode in (
        (RESPONDER.refused, dns.rcode.REFUSED),
        (RESPONDER.servfail, dns.rcode.SERVFAIL),
    ):
        reply = dns.message.from_wire(build(query))
        assert (
            reply.id == request.id and reply.rcode() == rcode and reply.question == request.question
        )
        assert reply.edns == 0


def _with_opcode(wire: bytes, opcode: int, cd: bool = False) -> bytes:
    return wire[:2] + bytes([wire[2] & 0x87 | opcode << 3, wire[3] | cd << 4]) + wire[4:]


@pytest.mark.parametrize("opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, 3, dns.opcode.UPDATE, 15])
def test_notimp_copies_the_opcode(opcode: int) -> None:
    """RFC 1035 §4.1.1: dig discards a reply whose opcode differs from its query's."""
    request, wire = _ask("example.org", "A")
    packet = _with_opcode(wire, opcode, cd=True)
    with pytest.raises(WireError) as raised:
        parse_query(packet)
    reply = dns.message.from_wire(RESPONDER.error(packet, raised.value))
    assert reply.rcode() == dns.rcode.NOTIMP and reply.opcode() == opcode
    assert reply.id == request.id and reply.flags & dns.flags.RD and reply.flags & dns.flags.QR
    assert not reply.flags & dns.flags.CD  # RFC 4035 §3.2.2: CD belongs to QUERY


def test_formerr_to_a_query_copies_cd() -> None:
    _, wire = _ask("example.org", "A")
    packet = _with_opcode(wire[:4] + b"\x00\x02" + wire[6:], dns.opcode.QUERY, cd=True)
    with pytest.raises(WireError) as raised:
        parse_query(packet)
    reply = RESPONDER.error(packet, raised.value)
    assert (reply[3] & 0xF, reply[3] & 0x10) == (dns.rcode.FORMERR, 0x10)


@pytest.mark.parametrize("opcode", [dns.opcode.QUERY, dns.opcode.UPDATE, 15])
def test_formerr_and_servfail_from_a_header_copy_the_opcode(opcode: int) -> None:
    _, wire = _ask("example.org", "A")
    packet = _with_opcode(wire[:4] + b"\x00\x02" + wire[6:], opcode)  # QDCOUNT 2
    if opcode == dns.opcode.QUERY:
        with pytest.raises(WireError) as raised:
            parse_query(packet)
        assert raised.value.rcode == RCODE_FORMERR
        formerr = RESPONDER.error(packet, raised.value)
    else:
        formerr = error_reply(packet, RCODE_FORMERR)
    for reply, rcode in ((formerr, 1), (error_reply(packet, RCODE_SERVFAIL), 2)):
        assert (reply[2] >> 3 & 0xF, reply[3] & 0xF, reply[:2]) == (opcode, rcode, packet[:2])
        assert reply[2] & 0x80 and reply[2] & 0x01  # QR set, RD copied


def test_badvers_reply_carries_extended_rcode() -> None:
    _, packet = _ask("example.org", "A", use_edns=1)
    with pytest.raises(WireError) as raised:
        parse_query(packet)
    reply = dns.message.from_wire(RESPONDER.error(packet, raised.value))
    assert reply.rcode() == dns.rcode.BADVERS and reply.edns == 0
    assert str(reply.question[0].name) == "example.org."


def _upstream(request: dns.message.Message, addresses: list[str]) -> bytes:
    response = dns.message.make_response(request)
    response.answer.append(
        dns.rrset.from_text_list(request.question[0].name, 60, "IN", "A", addresses)
    )
    response.flags |= dns.flags.AD
    return response.to_wire(max_size=65535)


def test_forwarded_reply_is_truncated_to_the_limit_with_question_and_opt() -> None:
    request, wire = _ask("example.org", "A", use_edns=0)
    query = parse_query(wire)
    upstream = _upstream(request, [f"192.0.2.{i}" for i in range(100)])
    answer = parse_upstream_answer(upstream, len(query.question))
    whole = RESPONDER.forwarded(query, answer, answer.records, ROOMY)
    assert len(dns.message.from_wire(whole).answer[0]) == 100
    assert not dns.message.from_wire(whole).flags & dns.flags.AD  # the client did not ask
    small = RESPONDER.forwarded(query, answer, answer.records, 512)
    assert len(small) <= 512
    parsed = dns.message.from_wire(small)
    assert parsed.flags & dns.flags.TC and not parsed.answer and parsed.edns == 0
    assert small[12 : 12 + len(query.question)] == query.question


def _cut(name: str, qtype: str, target: str, verdict: Verdict) -> dns.message.Message:
    _, wire = _ask(name, qtype)
    query = parse_query(wire)
    chain = [
        CnameLink(query.qname, 300, encode_name("cdn.example.net")),
        CnameLink(encode_name("cdn.example.net"), 200, encode_name(target)),
    ]
    zone = ZONES.match(encode_name(target))
    assert zone is not None
    reply = RESPONDER.chain(query, chain, ChainCut(2, zone, verdict), ROOMY)
    assert reply[12 : 12 + len(query.question)] == query.question
    return dns.message.from_wire(reply)


def _records(section: list[dns.rrset.RRset]) -> list[tuple[str, int, str]]:
    return [(str(rrset.name), rrset.ttl, rdata.to_text()) for rrset in section for rdata in rrset]


def test_cut_chain_ends_in_the_region_addresses() -> None:
    reply = _cut("Alias.Example.org", "A", "www.netflix.com", Verdict.UNBLOCK)
    assert reply.rcode() == dns.rcode.NOERROR and not reply.flags & dns.flags.AA
    assert _records(reply.answer) == [
        ("Alias.Example.org.", 300, "cdn.example.net."),
        ("cdn.example.net.", 200, "www.netflix.com."),
        ("www.netflix.com.", 60, "198.51.100.10"),
        ("www.netflix.com.", 60, "198.51.100.11"),
    ]


@pytest.mark.parametrize(
    ("qtype", "target", "verdict", "rcode", "owner"),
    [
        ("AAAA", "www.netflix.com", Verdict.NODATA, dns.rcode.NOERROR, "netflix.com."),
        ("SVCB", "_dns.resolver.arpa", Verdict.NODATA, dns.rcode.NOERROR, "resolver.arpa."),
        (
            "A",
            "use-application-dns.net",
            Verdict.NXDOMAIN,
            dns.rcode.NXDOMAIN,
            "use-application-dns.net.",
        ),
    ],
)
def test_cut_chain_ends_in_the_soa(
    qtype: str, target: str, verdict: Verdict, rcode: dns.rcode.Rcode, owner: str
) -> None:
    reply = _cut("alias.example.org", qtype, target, verdict)
    assert reply.rcode() == rcode and [data for _, _, data in _records(reply.answer)] == [
        "cdn.example.net.",
        target + ".",
    ]
    (soa,) = reply.authority
    assert str(soa.name) == owner and soa[0].to_text() == SOA_TEXT


def test_local_answer_over_the_limit_is_truncated() -> None:
    big = UnblockConfig(
        ttl=60,
        regions=MappingProxyType(
            {"many": Region(ipv4=tuple(ipaddress.IPv4Address(0xC6336400 + i) for i in range(40)))}
        ),
        zones=MappingProxyType({"example.com": "many"}),
    )
    _, wire = _ask("example.com", "A")
    query = parse_query(wire)
    zone = build_local_zones(big).match(query.qname)
    assert zone is not None
    assert (
        len(dns.message.from_wire(RESPONDER.local(query, Verdict.UNBLOCK, zone, ROOMY)).answer[0])
        == 40
    )
    small = RESPONDER.local(query, Verdict.UNBLOCK, zone, 512)
    assert struct.unpack_from("!H", small, 2)[0] & 0x0200 and len(small) < 512


def _encrypted(**changes: object) -> EncryptedConfig:
    fields: dict[str, object] = {
        "server_name": "dns.example.net",
        "doh_listen": (HostPort("0.0.0.0", 8443),),
        "dot_listen": (HostPort("0.0.0.0", 8853), HostPort("::", 853)),
        "ddr": True,
        "ddr_addresses": (
            ipaddress.IPv4Address("203.0.113.53"),
            ipaddress.IPv6Address("2001:db8::53"),
            ipaddress.IPv4Address("203.0.113.54"),
        ),
    }
    fields.update(changes)
    return EncryptedConfig(**fields)  # type: ignore[arg-type]


def _designated(name: str, qtype: str, encrypted: EncryptedConfig) -> dns.message.Message:
    query = parse_query(dns.message.make_query(name, qtype).to_wire())
    zone = build_local_zones(UNBLOCK, encrypted).match(query.qname)
    assert zone is not None
    return dns.message.from_wire(RESPONDER.local(query, Verdict.DESIGNATE, zone, ROOMY))


def test_ddr_answer_holds_exactly_this_nodes_doh_and_dot_endpoints() -> None:
    reply = _designated("_dns.resolver.arpa", "SVCB", _encrypted())
    assert reply.flags & dns.flags.AA and not reply.authority
    (rrset,) = reply.answer
    assert (rrset.name.to_text(), rrset.ttl) == ("_dns.resolver.arpa.", 60)
    assert sorted(rdata.to_text() for rdata in rrset) == [
        '1 dns.example.net. alpn="h2" port="8443" ipv4hint="203.0.113.53,203.0.113.54"'
        ' ipv6hint="2001:db8::53" dohpath="/dns-query{?dns}"',
        '2 dns.example.net. alpn="dot" port="8853" ipv4hint="203.0.113.53,203.0.113.54"'
        ' ipv6hint="2001:db8::53"',
    ]


def test_ddr_leaves_out_a_transport_without_listeners_and_missing_hints() -> None:
    encrypted = _encrypted(dot_listen=(), ddr_addresses=(ipaddress.IPv6Address("2001:db8::53"),))
    (rrset,) = _designated("_dns.resolver.arpa", "SVCB", encrypted).answer
    assert [rdata.to_text() for rdata in rrset] == [
        '1 dns.example.net. alpn="h2" port="8443" ipv6hint="2001:db8::53"'
        ' dohpath="/dns-query{?dns}"'
    ]


def test_ddr_names_only_dns_resolver_arpa() -> None:
    zones = build_local_zones(UNBLOCK, _encrypted())
    below = zones.match(
        parse_query(dns.message.make_query("x._dns.resolver.arpa", "SVCB").to_wire()).qname
    )
    assert below is not None and below.kind is NameKind.RESOLVER
    off = build_local_zones(UNBLOCK, _encrypted(ddr=False))
    zone = off.match(
        parse_query(dns.message.make_query("_dns.resolver.arpa", "SVCB").to_wire()).qname
    )
    assert zone is not None and zone.kind is NameKind.RESOLVER


def test_ddr_nodata_carries_the_resolver_arpa_soa() -> None:
    query = parse_query(dns.message.make_query("_dns.resolver.arpa", "A").to_wire())
    zone = build_local_zones(UNBLOCK, _encrypted()).match(query.qname)
    assert zone is not None
    reply = dns.message.from_wire(RESPONDER.local(query, Verdict.NODATA, zone, ROOMY))
    assert [rrset.name.to_text() for rrset in reply.authority] == ["resolver.arpa."]

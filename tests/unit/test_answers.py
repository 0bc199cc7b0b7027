"""answers: templates parse as the replies SPEC 2 describes (checked with dnspython)."""

from __future__ import annotations

import ipaddress
from types import MappingProxyType

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from smartdns.config.model import Region, UnblockConfig
from smartdns.core.answers import Responder, build_unblock_zones
from smartdns.core.wire import encode_name, parse_query

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
ZONES = build_unblock_zones(UNBLOCK)
RESPONDER = Responder(1232)


def _ask(name: str, qtype: str, **kwargs: object) -> tuple[dns.message.Message, bytes]:
    message = dns.message.make_query(name, qtype, **kwargs)  # type: ignore[arg-type]
    return message, message.to_wire()


def test_a_answer_echoes_question_and_carries_region_addresses() -> None:
    request, wire = _ask("WWW.NetFlix.com", "A")
    query = parse_query(wire)
    zone = ZONES.match(query.qname)
    assert zone is not None and zone.region == "us"
    reply_wire = RESPONDER.unblock(query, zone)
    assert reply_wire[12 : 12 + len(query.question)] == query.question
    reply = dns.message.from_wire(reply_wire)
    assert reply.id == request.id and reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.RA and reply.flags & dns.flags.RD and reply.flags & dns.flags.QR
    assert reply.edns == -1
    (rrset,) = reply.answer
    assert rrset.ttl == 60 and sorted(r.address for r in rrset) == [
        "198.51.100.10",
        "198.51.100.11",
    ]


def test_aaaa_with_region_ipv6_and_opt_do_copied() -> None:
    _, wire = _ask("bbc.co.uk", "AAAA", use_edns=0, want_dnssec=True)
    query = parse_query(wire)
    zone = ZONES.match(query.qname)
    assert zone is not None
    reply = dns.message.from_wire(RESPONDER.unblock(query, zone))
    assert [r.address for r in reply.answer[0]] == ["2001:db8:20::1"]
    assert reply.edns == 0 and reply.payload == 1232 and reply.ednsflags & dns.flags.DO


def test_nodata_has_synthesized_soa() -> None:
    _, wire = _ask("www.netflix.com", "HTTPS")
    query = parse_query(wire)
    zone = ZONES.match(query.qname)
    assert zone is not None
    reply = dns.message.from_wire(RESPONDER.nodata(query, zone))
    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer
    (soa,) = reply.authority
    assert str(soa.name) == "netflix.com." and soa.ttl == 60
    assert soa[0].to_text() == "smartdns.invalid. hostmaster.smartdns.invalid. 1 3600 600 86400 60"


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


def test_zone_keys_are_wire_names() -> None:
    assert ZONES.match(encode_name("hulu.com")) is None
    assert len(ZONES) == 2

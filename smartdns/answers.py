"""Every reply smartdns builds itself, from byte templates prepared at start-up and reload.

Pure; no I/O. Per query only the ID, the client's question bytes and the OPT are filled in.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from smartdns.config import Region, UnblockConfig
from smartdns.errors import WireError
from smartdns.wire import (
    FLAG_AA,
    FLAG_AD,
    QCLASS_IN,
    QTYPE_A,
    QTYPE_AAAA,
    QTYPE_SOA,
    RCODE_BADVERS,
    RCODE_NOERROR,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    ForwardedAnswer,
    Query,
    build_error,
    build_opt,
    build_reply,
    encode_name,
)
from smartdns.zones import ZoneMatcher

_RR_FIXED = struct.Struct("!HHIH")
_POINTER_TO_QNAME = b"\xc0\x0c"  # the question name always starts at offset 12
_SOA_MNAME = encode_name("smartdns.invalid")
_SOA_RNAME = encode_name("hostmaster.smartdns.invalid")


@dataclass(frozen=True, slots=True)
class UnblockZone:
    """Answer templates for one unblock zone; records own the qname by pointer."""

    region: str
    a_records: bytes
    a_count: int
    aaaa_records: bytes
    aaaa_count: int
    soa_record: bytes  # authority section of NODATA replies


def build_unblock_zones(unblock: UnblockConfig) -> ZoneMatcher[UnblockZone]:
    """Templates for every configured zone; regions are encoded once and shared."""
    by_region = {
        name: _region_records(region, unblock.ttl) for name, region in unblock.regions.items()
    }
    zones: dict[bytes, UnblockZone] = {}
    for zone, region in unblock.zones.items():
        a_records, a_count, aaaa_records, aaaa_count = by_region[region]
        zone_wire = encode_name(zone)
        zones[zone_wire] = UnblockZone(
            region,
            a_records,
            a_count,
            aaaa_records,
            aaaa_count,
            _soa_record(zone_wire, unblock.ttl),
        )
    return ZoneMatcher(zones)


def _region_records(region: Region, ttl: int) -> tuple[bytes, int, bytes, int]:
    return (
        _address_records(QTYPE_A, region.ipv4, ttl),
        len(region.ipv4),
        _address_records(QTYPE_AAAA, region.ipv6, ttl),
        len(region.ipv6),
    )


def _address_records(
    rtype: int,
    addresses: tuple[ipaddress.IPv4Address, ...] | tuple[ipaddress.IPv6Address, ...],
    ttl: int,
) -> bytes:
    return b"".join(
        _POINTER_TO_QNAME + _RR_FIXED.pack(rtype, QCLASS_IN, ttl, len(a.packed)) + a.packed
        for a in addresses
    )


def _soa_record(zone_wire: bytes, ttl: int) -> bytes:
    """`<zone> <ttl> IN SOA smartdns.invalid. hostmaster.smartdns.invalid. 1 3600 600 86400 <ttl>`;
    the minimum field is the TTL too, so negative caching lasts as long as the proxy answer."""
    rdata = _SOA_MNAME + _SOA_RNAME + struct.pack("!5I", 1, 3600, 600, 86400, ttl)
    return zone_wire + _RR_FIXED.pack(QTYPE_SOA, QCLASS_IN, ttl, len(rdata)) + rdata


class Responder:
    """Builds replies for one configuration: our OPT variants are prepared once."""

    __slots__ = ("_opt_badvers", "_opt_do", "_opt_plain", "edns_udp_size")

    def __init__(self, edns_udp_size: int) -> None:
        self.edns_udp_size = edns_udp_size
        self._opt_plain = build_opt(edns_udp_size, dnssec_ok=False)
        self._opt_do = build_opt(edns_udp_size, dnssec_ok=True)
        self._opt_badvers = build_opt(edns_udp_size, dnssec_ok=False, extended_rcode=RCODE_BADVERS)

    def error(self, packet: bytes, error: WireError) -> bytes:
        """FORMERR, NOTIMP or BADVERS for a query with a readable header. BADVERS carries our
        OPT (version 0) with the upper rcode bits, as RFC 6891 §6.1.3 requires."""
        assert error.rcode is not None
        opt = self._opt_badvers if error.rcode == RCODE_BADVERS else b""
        return build_error(packet, error.rcode, error.question, opt)

    def opt_for(self, query: Query) -> bytes:
        """Our OPT when the query had one (RFC 6891 §7), DO copied (RFC 3225 §3)."""
        if not query.has_edns:
            return b""
        return self._opt_do if query.dnssec_ok else self._opt_plain

    def unblock(self, query: Query, zone: UnblockZone) -> bytes:
        if query.qtype == QTYPE_AAAA:
            records, count = zone.aaaa_records, zone.aaaa_count
        else:  # A, and ANY per RFC 8482
            records, count = zone.a_records, zone.a_count
        return build_reply(query, RCODE_NOERROR, FLAG_AA, count, 0, 0, records, self.opt_for(query))

    def nodata(self, query: Query, zone: UnblockZone) -> bytes:
        return build_reply(
            query, RCODE_NOERROR, FLAG_AA, 0, 1, 0, zone.soa_record, self.opt_for(query)
        )

    def refused(self, query: Query) -> bytes:
        return build_reply(query, RCODE_REFUSED, 0, 0, 0, 0, b"", self.opt_for(query))

    def servfail(self, query: Query) -> bytes:
        return build_reply(query, RCODE_SERVFAIL, 0, 0, 0, 0, b"", self.opt_for(query))

    def forwarded(self, query: Query, answer: ForwardedAnswer, records: bytes) -> bytes:
        """An upstream answer for this client: its ID, question and OPT; `records` may carry
        TTLs rewritten by the cache. AD only for clients that asked for it (RFC 6840 §5.8)."""
        flags = answer.flags
        if not (query.dnssec_ok or query.flags & FLAG_AD):
            flags &= ~FLAG_AD
        return build_reply(
            query,
            answer.rcode,
            flags,
            answer.answer_count,
            answer.authority_count,
            answer.additional_count,
            records,
            self.opt_for(query),
        )

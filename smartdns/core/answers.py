"""Every reply smartdns builds itself, from byte templates prepared at start-up and reload.

Pure; no I/O. Per query only the ID, the client's question bytes and the OPT are filled in.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, NamedTuple

from smartdns.config.model import Region, UnblockConfig
from smartdns.core.wire import (
    FLAG_AA,
    FLAG_AD,
    FLAG_TC,
    HEADER_SIZE,
    QCLASS_IN,
    QTYPE_A,
    QTYPE_AAAA,
    QTYPE_ANY,
    QTYPE_CNAME,
    QTYPE_HTTPS,
    QTYPE_SOA,
    QTYPE_SVCB,
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
    read_name,
    scan_records,
)
from smartdns.core.zones import ZoneMatcher
from smartdns.errors import WireError

_RR_FIXED = struct.Struct("!HHIH")
_UINT32 = struct.Struct("!I")
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
    a_tails: tuple[bytes, ...] = ()  # each A record after its owner name (CNAME chains)
    aaaa_tails: tuple[bytes, ...] = ()


def build_unblock_zones(unblock: UnblockConfig) -> ZoneMatcher[UnblockZone]:
    """Templates for every configured zone; regions are encoded once and shared."""
    by_region = {
        name: _region_records(region, unblock.ttl) for name, region in unblock.regions.items()
    }
    zones: dict[bytes, UnblockZone] = {}
    for zone, region in unblock.zones.items():
        a_tails, aaaa_tails = by_region[region]
        zone_wire = encode_name(zone)
        zones[zone_wire] = UnblockZone(
            region,
            b"".join(_POINTER_TO_QNAME + tail for tail in a_tails),
            len(a_tails),
            b"".join(_POINTER_TO_QNAME + tail for tail in aaaa_tails),
            len(aaaa_tails),
            _soa_record(zone_wire, unblock.ttl),
            a_tails,
            aaaa_tails,
        )
    return ZoneMatcher(zones)


def _region_records(region: Region, ttl: int) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    return (
        _address_tails(QTYPE_A, region.ipv4, ttl),
        _address_tails(QTYPE_AAAA, region.ipv6, ttl),
    )


def _address_tails(
    rtype: int,
    addresses: tuple[ipaddress.IPv4Address, ...] | tuple[ipaddress.IPv6Address, ...],
    ttl: int,
) -> tuple[bytes, ...]:
    """Address records without their owner name: type, class, TTL, rdata."""
    return tuple(_RR_FIXED.pack(rtype, QCLASS_IN, ttl, len(a.packed)) + a.packed for a in addresses)


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

    def truncated(self, query: Query) -> bytes:
        """An empty reply with TC set: the client retries over TCP (rate limiting)."""
        return build_reply(query, RCODE_NOERROR, FLAG_TC, 0, 0, 0, b"", self.opt_for(query))

    def servfail(self, query: Query) -> bytes:
        return build_reply(query, RCODE_SERVFAIL, 0, 0, 0, 0, b"", self.opt_for(query))

    def chain(self, query: Query, rewrite: ChainRewrite) -> bytes:
        """A CNAME chain cut where it enters an unblock zone (see `rewrite_cname_chain`)."""
        return build_reply(
            query,
            RCODE_NOERROR,
            0,
            rewrite.answer_count,
            rewrite.authority_count,
            0,
            rewrite.records,
            self.opt_for(query),
        )

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


class ChainRewrite(NamedTuple):
    """The sections of a reply whose CNAME chain was cut at an unblock zone."""

    answer_count: int
    authority_count: int
    records: bytes


_CHAIN_QTYPES: Final = frozenset({QTYPE_A, QTYPE_AAAA, QTYPE_ANY, QTYPE_HTTPS, QTYPE_SVCB})


def rewrite_cname_chain(
    query: Query, answer: ForwardedAnswer, records: bytes, zones: ZoneMatcher[UnblockZone]
) -> ChainRewrite | None:
    """Stop a forwarded answer from leaking real addresses through a CNAME chain.

    Follows the answer section's CNAMEs from the qname; at the first target inside an unblock
    zone the answer becomes the chain up to that name, then what the zone itself would
    answer for that name (SPEC 2's table): the region's proxy A records for A and ANY, its
    IPv6 proxies for AAAA, and for AAAA without them, HTTPS and SVCB no address records but
    the zone's synthesized SOA. None when the chain never enters a zone (the answer is
    passed on as it is). `records` are the answer's records with the TTLs this reply hands
    out. Raises WireError when a name in the chain cannot be read; the caller answers
    SERVFAIL rather than risk passing on the real addresses.
    """
    if query.qtype not in _CHAIN_QTYPES or query.qclass != QCLASS_IN or not len(zones):
        return None
    # Pointers in `records` count from the start of the upstream message, whose header and
    # question had the same lengths as these.
    message = bytes(HEADER_SIZE) + query.question + records
    base = HEADER_SIZE + len(query.question)
    targets: dict[bytes, tuple[int, bytes]] = {}  # CNAME owner -> (TTL, target)
    for span in scan_records(message, base, answer.answer_count):
        if span.rtype != QTYPE_CNAME:
            continue
        owner, _ = read_name(message, span.start)
        target, _ = read_name(message, span.ttl_offset + 6)
        ttl = _UINT32.unpack_from(message, span.ttl_offset)[0]
        targets.setdefault(owner, (ttl, target))
    chain = bytearray()
    links = 0
    name = query.qname
    while name in targets:  # each owner is used once: a CNAME loop ends here
        ttl, target = targets.pop(name)
        owner = _POINTER_TO_QNAME if links == 0 else name
        chain += owner + _RR_FIXED.pack(QTYPE_CNAME, QCLASS_IN, ttl, len(target)) + target
        links += 1
        zone = zones.match(target)
        if zone is not None:
            return _cut_chain(query.qtype, bytes(chain), links, target, zone)
        name = target
    return None


def _cut_chain(
    qtype: int, chain: bytes, links: int, owner: bytes, zone: UnblockZone
) -> ChainRewrite:
    if qtype in (QTYPE_A, QTYPE_ANY):
        tails = zone.a_tails
    elif qtype == QTYPE_AAAA:
        tails = zone.aaaa_tails
    else:
        tails = ()
    if tails:
        addresses = b"".join(owner + tail for tail in tails)
        return ChainRewrite(links + len(tails), 0, chain + addresses)
    return ChainRewrite(links, 1, chain + zone.soa_record)

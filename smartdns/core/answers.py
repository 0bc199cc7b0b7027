"""Every reply smartdns sends, as bytes: templates prepared at start-up and reload, filled in
per query with the ID, the client's question and our OPT (padded when the query asked for it
and the pipeline let it: RFC 8467, encrypted transports only). Pure; no I/O.

Nothing here decides what a query gets (that is policy); this module only builds what the
verdict names. Every reply copies the query's ID, opcode, RD and CD (RFC 1035 §4.1.1: a
client discards a reply whose opcode differs), and sets QR and RA; CD only for opcode QUERY.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from smartdns.config.model import EncryptedConfig, UnblockConfig
from smartdns.core.policy import RESOLVER_ARPA, ChainCut, NameKind, Verdict, local_names
from smartdns.core.wire import (
    FLAG_AA,
    FLAG_AD,
    FLAG_CD,
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    FLAG_TC,
    MIN_UDP_SIZE,
    QCLASS_IN,
    QTYPE_A,
    QTYPE_AAAA,
    QTYPE_CNAME,
    QTYPE_SOA,
    QTYPE_SVCB,
    RCODE_BADVERS,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    CnameLink,
    ForwardedAnswer,
    Query,
    build_opt,
    encode_name,
    pad_reply,
)
from smartdns.core.zones import ZoneMatcher
from smartdns.errors import WireError

_HEADER = struct.Struct("!6H")
_PACK: Final = _HEADER.pack
_ID_AND_FLAGS = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")
_POINTER_TO_QNAME: Final = b"\xc0\x0c"  # the question name always starts at offset 12
_SOA_MNAME: Final = encode_name("smartdns.invalid")
_SOA_RNAME: Final = encode_name("hostmaster.smartdns.invalid")
_OPCODE: Final = 0x7800
_COPIED_FLAGS: Final = _OPCODE | FLAG_RD | FLAG_CD
_AA_NOERROR: Final = FLAG_QR | FLAG_RA | FLAG_AA | RCODE_NOERROR
_AA_NXDOMAIN: Final = FLAG_QR | FLAG_RA | FLAG_AA | RCODE_NXDOMAIN
_REFUSED: Final = FLAG_QR | FLAG_RA | RCODE_REFUSED
_SERVFAIL: Final = FLAG_QR | FLAG_RA | RCODE_SERVFAIL
_TRUNCATED: Final = FLAG_QR | FLAG_RA | FLAG_TC | RCODE_NOERROR
_UNBLOCK: Final = Verdict.UNBLOCK
_NXDOMAIN: Final = Verdict.NXDOMAIN
_DESIGNATE: Final = Verdict.DESIGNATE
# RFC 9460 §14.3.2 SvcParamKeys, and RFC 9461 §5's dohpath; RFC 9462 §4 (the DDR answer)
_SVC_ALPN: Final = 1
_SVC_PORT: Final = 3
_SVC_IPV4HINT: Final = 4
_SVC_IPV6HINT: Final = 6
_SVC_DOHPATH: Final = 7
_DOH_PATH_TEMPLATE: Final = b"/dns-query{?dns}"  # RFC 9461 §5: the URI template of our DoH


def reply_flags(query_flags: int, rcode: int, extra: int = 0) -> int:
    """Reply header flags: QR and RA set; opcode, RD and CD copied (RFC 1035 §4.1.1,
    RFC 4035 §3.2.2)."""
    return FLAG_QR | FLAG_RA | (query_flags & _COPIED_FLAGS) | extra | (rcode & 0xF)


def error_reply(packet: bytes, rcode: int, question: bytes = b"", opt: bytes = b"") -> bytes:
    """An error reply from a readable header: ID, opcode, RD and CD copied, the question
    echoed when it was readable, `opt` (empty or our OPT record) appended.

    The only reply an opcode other than QUERY gets (NOTIMP): there CD is not copied, since
    RFC 4035 §3.2.2 defines it for queries only, while RD is, as RFC 1035 §4.1.1 has it
    for every reply (and RFC 8906's opcode checks send RD clear, so they see it clear)."""
    query_id, flags = _ID_AND_FLAGS.unpack_from(packet)
    if flags & _OPCODE:
        flags &= ~FLAG_CD
    header = _HEADER.pack(
        query_id, reply_flags(flags, rcode), 1 if question else 0, 0, 0, 1 if opt else 0
    )
    return header + question + opt


@dataclass(frozen=True, slots=True)
class LocalZone:
    """Answer templates for one name the node answers itself (policy.local_names); records
    own the qname by pointer, `*_tails` are the records after their owner name (for a cut
    CNAME chain, whose owner is the chain's last target)."""

    kind: NameKind
    region: str  # "" for the names that are not unblock zones
    a_records: bytes
    a_count: int
    aaaa_records: bytes
    aaaa_count: int
    soa_record: bytes  # authority section of NODATA and NXDOMAIN replies
    a_tails: tuple[bytes, ...] = ()
    aaaa_tails: tuple[bytes, ...] = ()
    svcb_records: bytes = b""  # _dns.resolver.arpa's SVCB records (DDR), owned by the qname
    svcb_count: int = 0
    svcb_tails: tuple[bytes, ...] = ()


def build_local_zones(
    unblock: UnblockConfig, encrypted: EncryptedConfig | None = None
) -> ZoneMatcher[LocalZone]:
    """Templates for every local name; each region's records are encoded once and shared.
    With `encrypted.ddr`, `_dns.resolver.arpa` (that name alone) answers SVCB with this
    node's encrypted endpoints (`_designation_tails`); its NODATA carries resolver.arpa's SOA."""
    regions = {
        name: (
            _address_tails(QTYPE_A, region.ipv4, unblock.ttl),
            _address_tails(QTYPE_AAAA, region.ipv6, unblock.ttl),
        )
        for name, region in unblock.regions.items()
    }
    region_of = {encode_name(zone): region for zone, region in unblock.zones.items()}
    zones: dict[bytes, LocalZone] = {}
    exact: list[bytes] = []
    designated = encrypted is not None and encrypted.ddr
    for zone_wire, kind in local_names(unblock, designated).items():
        soa = _soa_record(zone_wire, unblock.ttl)
        if kind in (NameKind.UNBLOCK, NameKind.UNBLOCK_V4):
            region = region_of[zone_wire]
            a, aaaa = regions[region]
            zones[zone_wire] = LocalZone(
                kind, region, _owned(a), len(a), _owned(aaaa), len(aaaa), soa, a, aaaa
            )
        elif kind is NameKind.DESIGNATED:
            assert encrypted is not None
            svcb = _designation_tails(encrypted, unblock.ttl)
            soa = _soa_record(encode_name(RESOLVER_ARPA), unblock.ttl)
            zones[zone_wire] = LocalZone(
                kind,
                "",
                b"",
                0,
                b"",
                0,
                soa,
                svcb_records=_owned(svcb),
                svcb_count=len(svcb),
                svcb_tails=svcb,
            )
            exact.append(zone_wire)
        else:
            zones[zone_wire] = LocalZone(kind, "", b"", 0, b"", 0, soa)
    return ZoneMatcher(zones, exact)


def _designation_tails(encrypted: EncryptedConfig, ttl: int) -> tuple[bytes, ...]:
    """This node's SVCB records without their owner name (RFC 9462 §4, RFC 9461): priority 1
    DoH (alpn h2, the port of the first doh_listen address, dohpath), priority 2 DoT (alpn
    dot, the first dot_listen port), both with target `server_name` and the ipv4hint and
    ipv6hint of `ddr_addresses`; a transport with no listen address is left out. Keys in
    ascending order, as RFC 9460 §2.2 requires."""
    target = encode_name(encrypted.server_name)
    v4 = b"".join(a.packed for a in encrypted.ddr_addresses if a.version == 4)
    v6 = b"".join(a.packed for a in encrypted.ddr_addresses if a.version == 6)
    hints = (_svc_param(_SVC_IPV4HINT, v4) if v4 else b"") + (
        _svc_param(_SVC_IPV6HINT, v6) if v6 else b""
    )
    records: list[bytes] = []
    if encrypted.doh_listen:
        port = encrypted.doh_listen[0].port.to_bytes(2, "big")
        params = (
            _svc_param(_SVC_ALPN, b"\x02h2")
            + _svc_param(_SVC_PORT, port)
            + hints
            + _svc_param(_SVC_DOHPATH, _DOH_PATH_TEMPLATE)
        )
        records.append(_svcb_tail(1, target, params, ttl))
    if encrypted.dot_listen:
        port = encrypted.dot_listen[0].port.to_bytes(2, "big")
        params = _svc_param(_SVC_ALPN, b"\x03dot") + _svc_param(_SVC_PORT, port) + hints
        records.append(_svcb_tail(2, target, params, ttl))
    return tuple(records)


def _svc_param(key: int, value: bytes) -> bytes:
    return struct.pack("!HH", key, len(value)) + value


def _svcb_tail(priority: int, target: bytes, params: bytes, ttl: int) -> bytes:
    rdata = priority.to_bytes(2, "big") + target + params
    return _RR_FIXED.pack(QTYPE_SVCB, QCLASS_IN, ttl, len(rdata)) + rdata


def _owned(tails: tuple[bytes, ...]) -> bytes:
    return b"".join(_POINTER_TO_QNAME + tail for tail in tails)


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
    """Builds replies for one configuration: our OPT variants are prepared once. Every
    method returns the finished reply (header, question, records, OPT) in one step."""

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
        return error_reply(packet, error.rcode, error.question, opt)

    def _build(
        self,
        query: Query,
        flags: int,
        an: int,
        ns: int,
        ar: int,
        records: bytes,
        limit: int | None,
    ) -> bytes:
        """Header + question + records + our OPT when the query had one (RFC 6891 §7, DO
        copied per RFC 3225 §3); over the limit, header + question + OPT with TC set, so
        the client retries over TCP (RFC 1035 §4.2.1). `flags` are the reply's own (see
        `reply_flags`); `ar` excludes our OPT. `limit` is the peer's (Peer.reply_limit);
        None means the query's own: its EDNS size (else 512) capped by ours (SPEC 2)."""
        if query.has_edns:
            opt = self._opt_do if query.dnssec_ok else self._opt_plain
            extra = 1
            if limit is None:
                limit = min(query.udp_size, self.edns_udp_size)
        else:
            opt = b""
            extra = 0
            if limit is None:
                limit = MIN_UDP_SIZE
        reply = _PACK(query.id, flags, 1, an, ns, ar + extra) + query.question + records + opt
        if len(reply) <= limit:
            return pad_reply(reply, limit) if query.padding else reply
        return self._bare(query, flags | FLAG_TC)

    def local(self, query: Query, verdict: Verdict, zone: LocalZone, limit: int | None) -> bytes:
        """UNBLOCK, DESIGNATE, NODATA or NXDOMAIN for a local name (authoritative: AA set)."""
        copied = query.flags & _COPIED_FLAGS
        if verdict is _UNBLOCK:
            if query.qtype == QTYPE_AAAA:
                return self._build(
                    query, _AA_NOERROR | copied, zone.aaaa_count, 0, 0, zone.aaaa_records, limit
                )
            # A, and ANY per RFC 8482
            return self._build(
                query, _AA_NOERROR | copied, zone.a_count, 0, 0, zone.a_records, limit
            )
        if verdict is _DESIGNATE:
            return self._build(
                query, _AA_NOERROR | copied, zone.svcb_count, 0, 0, zone.svcb_records, limit
            )
        flags = (_AA_NXDOMAIN if verdict is _NXDOMAIN else _AA_NOERROR) | copied
        return self._build(query, flags, 0, 1, 0, zone.soa_record, limit)

    def _bare(self, query: Query, flags: int) -> bytes:
        """Header + question + our OPT when the query had one: fits any limit (padded, it
        only goes where a padding query could come from: a stream)."""
        if query.has_edns:
            opt = self._opt_do if query.dnssec_ok else self._opt_plain
            reply = _PACK(query.id, flags, 1, 0, 0, 1) + query.question + opt
            return pad_reply(reply) if query.padding else reply
        return _PACK(query.id, flags, 1, 0, 0, 0) + query.question

    def refused(self, query: Query) -> bytes:
        return self._bare(query, _REFUSED | (query.flags & _COPIED_FLAGS))

    def truncated(self, query: Query) -> bytes:
        """An empty reply with TC set: the client retries over TCP (rate limiting)."""
        return self._bare(query, _TRUNCATED | (query.flags & _COPIED_FLAGS))

    def servfail(self, query: Query) -> bytes:
        return self._bare(query, _SERVFAIL | (query.flags & _COPIED_FLAGS))

    def forwarded(
        self, query: Query, answer: ForwardedAnswer, records: bytes, limit: int | None
    ) -> bytes:
        """An upstream answer for this client: its ID, question and OPT; `records` may carry
        TTLs rewritten by the cache. AD only for clients that asked for it (RFC 6840 §5.8)."""
        flags = answer.flags
        if not (query.dnssec_ok or query.flags & FLAG_AD):
            flags &= ~FLAG_AD
        return self._build(
            query,
            reply_flags(query.flags, answer.rcode, flags),
            answer.answer_count,
            answer.authority_count,
            answer.additional_count,
            records,
            limit,
        )

    def chain(
        self,
        query: Query,
        chain: Sequence[CnameLink],
        cut: ChainCut[LocalZone],
        limit: int | None,
    ) -> bytes:
        """A forwarded CNAME chain cut where policy says (`cut.links` links kept), then the
        local answer for the last target: its proxy addresses, or the name's SOA."""
        records = bytearray()
        for index, link in enumerate(chain[: cut.links]):
            owner = _POINTER_TO_QNAME if index == 0 else link.owner
            target = link.target
            records += owner + _RR_FIXED.pack(QTYPE_CNAME, QCLASS_IN, link.ttl, len(target))
            records += target
        last = chain[cut.links - 1].target
        zone = cut.zone
        tails: tuple[bytes, ...] = ()
        if cut.verdict is Verdict.UNBLOCK:
            tails = zone.aaaa_tails if query.qtype == QTYPE_AAAA else zone.a_tails
        elif cut.verdict is _DESIGNATE:
            tails = zone.svcb_tails
        if tails:
            records += b"".join(last + tail for tail in tails)
            answers, authorities = cut.links + len(tails), 0
        else:  # an empty region behaves like NODATA, as the zone itself would answer
            records += zone.soa_record
            answers, authorities = cut.links, 1
        flags = reply_flags(query.flags, RCODE_NXDOMAIN if cut.verdict is _NXDOMAIN else 0)
        return self._build(query, flags, answers, authorities, 0, bytes(records), limit)

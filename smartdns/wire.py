"""DNS wire format for the hot path: header, question and OPT parsing, reply building.

Pure functions on bytes; no I/O, no logging, no dnslib (it costs tens of µs per packet).
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from smartdns.errors import WireError

QTYPE_A: Final = 1
QTYPE_NS: Final = 2
QTYPE_CNAME: Final = 5
QTYPE_SOA: Final = 6
QTYPE_AAAA: Final = 28
QTYPE_OPT: Final = 41
QTYPE_SVCB: Final = 64
QTYPE_HTTPS: Final = 65
QTYPE_ANY: Final = 255
QCLASS_IN: Final = 1
QCLASS_CHAOS: Final = 3

RCODE_NOERROR: Final = 0
RCODE_FORMERR: Final = 1
RCODE_SERVFAIL: Final = 2
RCODE_NXDOMAIN: Final = 3
RCODE_NOTIMP: Final = 4
RCODE_REFUSED: Final = 5
RCODE_BADVERS: Final = 16  # extended: upper 8 bits travel in the OPT TTL (RFC 6891 §6.1.3)

FLAG_QR: Final = 0x8000
FLAG_AA: Final = 0x0400
FLAG_TC: Final = 0x0200
FLAG_RD: Final = 0x0100
FLAG_RA: Final = 0x0080
FLAG_AD: Final = 0x0020
FLAG_CD: Final = 0x0010
EDNS_FLAG_DO: Final = 0x8000

HEADER_SIZE: Final = 12
MIN_UDP_SIZE: Final = 512  # RFC 6891 §6.2.5: smaller advertised sizes count as 512


class Query(NamedTuple):
    """One parsed query. A NamedTuple, not a dataclass: it is built once per packet.

    `question` is the question section exactly as received (0x20 case preserved);
    `qname` is the owner name in wire format, lower-cased, ending with the root label;
    `udp_size` is the client's EDNS payload size (at least 512) or 0 without EDNS.
    """

    id: int
    flags: int
    question: bytes
    qname: bytes
    qtype: int
    qclass: int
    has_edns: bool
    udp_size: int
    dnssec_ok: bool

    @property
    def udp_limit(self) -> int:
        """Largest UDP reply the client accepts, before our own `edns_udp_size` cap."""
        return self.udp_size if self.has_edns else MIN_UDP_SIZE


_HEADER = struct.Struct("!6H")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_OPT_FIXED = struct.Struct("!HHBBHH")  # type, udp size, ext-rcode, version, flags, rdlength
_MAX_NAME_OCTETS: Final = 255
_MAX_RECORDS: Final = 4096  # more than any 64 KiB message can hold without being crafted


def parse_query(packet: bytes) -> Query:
    """Parse header, question and OPT of a client query (RFC 1035 §4.1, RFC 6891 §6.1).

    Raises WireError: rcode None (drop) for a runt or a response (QR set), NOTIMP for an
    opcode other than QUERY, BADVERS for EDNS version > 0, FORMERR for everything malformed
    (QDCOUNT ≠ 1, labels over 63 octets, names over 255, compression in the question,
    truncated records, a second OPT). Trailing bytes after the counted records are ignored.
    """
    if len(packet) < HEADER_SIZE:
        raise WireError(None, "runt packet")
    query_id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(packet)
    if flags & FLAG_QR:
        raise WireError(None, "response sent as a query")
    if flags & 0x7800:
        raise WireError(RCODE_NOTIMP, "opcode not implemented")
    if qdcount != 1:
        raise WireError(RCODE_FORMERR, "QDCOUNT is not 1")
    name_end = _question_name_end(packet)
    question_end = name_end + 4
    if question_end > len(packet):
        raise WireError(RCODE_FORMERR, "truncated question")
    question = packet[HEADER_SIZE:question_end]
    qtype, qclass = struct.unpack_from("!HH", packet, name_end)
    has_edns = False
    udp_size = 0
    dnssec_ok = False
    if ancount or nscount or arcount:
        opt = _find_opt(packet, question_end, ancount, nscount, arcount, question)
        if opt is not None:
            opt_udp_size, version, edns_flags = opt
            if version:
                raise WireError(RCODE_BADVERS, "EDNS version not supported", question)
            has_edns = True
            udp_size = max(opt_udp_size, MIN_UDP_SIZE)
            dnssec_ok = bool(edns_flags & EDNS_FLAG_DO)
    return Query(
        query_id,
        flags,
        question,
        packet[HEADER_SIZE:name_end].lower(),  # length octets are < 0x40, so .lower() spares them
        qtype,
        qclass,
        has_edns,
        udp_size,
        dnssec_ok,
    )


def _question_name_end(packet: bytes) -> int:
    """Offset after the question's name. The first name of a message has nothing earlier to
    point to, so any compression pointer there is a loop or out of range: FORMERR."""
    offset = HEADER_SIZE
    end = len(packet)
    while True:
        if offset >= end:
            raise WireError(RCODE_FORMERR, "truncated name")
        length = packet[offset]
        if length == 0:
            offset += 1
            break
        if length > 63:
            # 0xC0 is a pointer, 0x40/0x80 are obsolete extended label types (RFC 6891 §5)
            raise WireError(RCODE_FORMERR, "bad label in question")
        offset += length + 1
    if offset - HEADER_SIZE > _MAX_NAME_OCTETS:
        raise WireError(RCODE_FORMERR, "name over 255 octets")
    return offset


def skip_name(message: bytes, offset: int) -> int:
    """Offset after a possibly compressed name. The pointer is not followed, but it must point
    to an earlier name (RFC 1035 §4.1.4 "prior occurrence"), which rules out loops."""
    start = offset
    end = len(message)
    octets = 0
    while offset < end:
        length = message[offset]
        if length == 0:
            return offset + 1
        if length >= 0xC0:
            if offset + 2 > end:
                break
            if ((length & 0x3F) << 8 | message[offset + 1]) >= start:
                raise WireError(RCODE_FORMERR, "compression pointer loop")
            return offset + 2
        if length > 63:
            raise WireError(RCODE_FORMERR, "bad label type")
        octets += length + 1
        if octets > _MAX_NAME_OCTETS:
            raise WireError(RCODE_FORMERR, "name over 255 octets")
        offset += length + 1
    raise WireError(RCODE_FORMERR, "truncated name")


def _find_opt(
    packet: bytes, offset: int, ancount: int, nscount: int, arcount: int, question: bytes
) -> tuple[int, int, int] | None:
    """(udp size, version, flags) of the OPT record, None without one; FORMERR for two."""
    if ancount + nscount + arcount > _MAX_RECORDS:
        raise WireError(RCODE_FORMERR, "too many records")
    opt: tuple[int, int, int] | None = None
    end = len(packet)
    answer_and_authority = ancount + nscount
    for index in range(answer_and_authority + arcount):
        name_start = offset
        offset = skip_name(packet, offset)
        if offset + 10 > end:
            raise WireError(RCODE_FORMERR, "truncated record")
        rtype = packet[offset] << 8 | packet[offset + 1]
        rdlength = packet[offset + 8] << 8 | packet[offset + 9]
        if rtype == QTYPE_OPT:
            # RFC 6891 §6.1.1: one OPT, owner root, additional section only
            if opt is not None or index < answer_and_authority or offset - name_start != 1:
                raise WireError(RCODE_FORMERR, "misplaced or repeated OPT")
            _, udp_size, _, version, flags, _ = _OPT_FIXED.unpack_from(packet, offset)
            opt = (udp_size, version, flags)
        offset += 10 + rdlength
        if offset > end:
            raise WireError(RCODE_FORMERR, "truncated record data")
    return opt


class RecordSpan(NamedTuple):
    """Where one resource record sits in a message."""

    start: int
    end: int
    rtype: int
    ttl_offset: int


def scan_records(message: bytes, offset: int, count: int) -> list[RecordSpan]:
    """Locate `count` records from `offset`. Raises WireError on anything malformed."""
    if count > _MAX_RECORDS:
        raise WireError(RCODE_FORMERR, "too many records")
    spans: list[RecordSpan] = []
    end = len(message)
    for _ in range(count):
        start = offset
        offset = skip_name(message, offset)
        if offset + 10 > end:
            raise WireError(RCODE_FORMERR, "truncated record")
        rtype, _, _, rdlength = _RR_FIXED.unpack_from(message, offset)
        ttl_offset = offset + 4
        offset += 10 + rdlength
        if offset > end:
            raise WireError(RCODE_FORMERR, "truncated record data")
        spans.append(RecordSpan(start, offset, rtype, ttl_offset))
    return spans


def encode_name(text: str) -> bytes:
    """Wire form of a dotted name (lower-cased). Raises ValueError for bad labels."""
    labels = [label for label in text.rstrip(".").lower().split(".") if label] if text else []
    wire = bytearray()
    for label in labels:
        raw = label.encode("ascii")
        if len(raw) > 63:
            raise ValueError("label over 63 octets")
        wire.append(len(raw))
        wire += raw
    wire.append(0)
    if len(wire) > _MAX_NAME_OCTETS:
        raise ValueError("name over 255 octets")
    return bytes(wire)


def build_opt(udp_size: int, dnssec_ok: bool, extended_rcode: int = 0) -> bytes:
    """Our OPT record: root owner, our payload size, no options (RFC 6891 §6.1.2-3)."""
    return b"\x00" + _OPT_FIXED.pack(
        QTYPE_OPT, udp_size, extended_rcode >> 4, 0, EDNS_FLAG_DO if dnssec_ok else 0, 0
    )


def reply_flags(query_flags: int, rcode: int, extra: int = 0) -> int:
    """Reply header flags: QR and RA set, RD and CD copied (RFC 1035 §4.1.1, RFC 4035 §3.2.2)."""
    return FLAG_QR | FLAG_RA | (query_flags & (FLAG_RD | FLAG_CD)) | extra | (rcode & 0xF)


def build_error(packet: bytes, rcode: int, question: bytes, opt: bytes) -> bytes:
    """An error reply from a readable header: ID and RD/CD copied, question echoed when known.

    `opt` (empty or an OPT record) goes in when the query had EDNS; BADVERS needs it to carry
    the upper rcode bits.
    """
    query_id, flags = struct.unpack_from("!HH", packet)
    header = _HEADER.pack(
        query_id, reply_flags(flags, rcode), 1 if question else 0, 0, 0, 1 if opt else 0
    )
    return header + question + opt


def build_reply(
    query: Query,
    rcode: int,
    extra_flags: int,
    answer_count: int,
    authority_count: int,
    additional_count: int,
    records: bytes,
    opt: bytes,
) -> bytes:
    """A reply echoing the client's question; `opt` is b"" when the query had no EDNS."""
    header = _HEADER.pack(
        query.id,
        reply_flags(query.flags, rcode, extra_flags),
        1,
        answer_count,
        authority_count,
        additional_count + (1 if opt else 0),
    )
    return header + query.question + records + opt


def truncate(reply: bytes, query: Query, limit: int, opt: bytes) -> bytes:
    """The reply itself when it fits in `limit` octets, else header + question (+ OPT) with TC
    set so the client retries over TCP (RFC 1035 §4.2.1, RFC 6891 §7)."""
    if len(reply) <= limit:
        return reply
    flags = (reply[2] << 8 | reply[3]) | FLAG_TC
    header = _HEADER.pack(query.id, flags, 1, 0, 0, 1 if opt else 0)
    return header + query.question + opt


class ForwardedAnswer(NamedTuple):
    """An upstream answer reduced to what every client reply shares: the records after the
    question without the upstream's OPT (each hop builds its own), and where their TTLs are."""

    rcode: int
    flags: int  # AA and AD bits of the upstream header
    answer_count: int
    authority_count: int
    additional_count: int
    records: bytes
    ttl_offsets: tuple[int, ...]  # into `records`
    has_cname: bool = False  # a CNAME in the answer section: the chain may enter an unblock zone
    soa_negative_ttl: int = -1  # min(SOA TTL, SOA MINIMUM) of the authority SOA, -1 without one


MAX_UPSTREAM_RECORDS: Final = 1000  # more is crafted; refused before any record is walked


def parse_upstream_answer(
    message: bytes, question_length: int, max_records: int = MAX_UPSTREAM_RECORDS
) -> ForwardedAnswer:
    """Split a validated upstream answer to our question. Raises WireError when malformed:
    truncated, over `max_records` records, an owner name with a forward or looping pointer,
    or an OPT outside the additional section (RFC 6891 §6.1.1)."""
    if len(message) < HEADER_SIZE + question_length:
        raise WireError(RCODE_FORMERR, "truncated answer")
    _, flags, _, ancount, nscount, arcount = _HEADER.unpack_from(message)
    if ancount + nscount + arcount > max_records:
        raise WireError(RCODE_FORMERR, "too many records")
    start = HEADER_SIZE + question_length
    spans = scan_records(message, start, ancount + nscount + arcount)
    kept = bytearray()
    ttl_offsets: list[int] = []
    additional_count = 0
    has_cname = False
    soa_negative_ttl = -1
    for index, span in enumerate(spans):
        rtype = span.rtype
        if rtype == QTYPE_OPT:
            if index < ancount + nscount:
                raise WireError(RCODE_FORMERR, "OPT outside the additional section")
            # Compression pointers only point backwards, so cutting here keeps every kept
            # pointer valid; what follows an OPT is optional additional data.
            break
        if index >= ancount + nscount:
            additional_count += 1
        elif index < ancount:
            if rtype == QTYPE_CNAME:
                # the chain is followed later (unblock zones): its target must be readable
                read_name(message, span.ttl_offset + 6)
                has_cname = True
        elif rtype == QTYPE_SOA and soa_negative_ttl < 0 and span.end - span.ttl_offset >= 26:
            # RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM); MINIMUM is the
            # last field of the rdata (at least two root names and five 32-bit fields)
            ttl = _ttl_value(message, span.ttl_offset)
            minimum = _ttl_value(message, span.end - 4)
            soa_negative_ttl = min(ttl, minimum)
        ttl_offsets.append(len(kept) + span.ttl_offset - span.start)
        kept += message[span.start : span.end]
    return ForwardedAnswer(
        flags & 0xF,
        flags & (FLAG_AA | FLAG_AD),
        ancount,
        nscount,
        additional_count,
        bytes(kept),
        tuple(ttl_offsets),
        has_cname,
        soa_negative_ttl,
    )


def _ttl_value(message: bytes, offset: int) -> int:
    """A 32-bit TTL; RFC 2181 §8: values with the top bit set count as zero."""
    value: int = _UINT32.unpack_from(message, offset)[0]
    return 0 if value & 0x80000000 else value


_UINT32 = struct.Struct("!I")


def read_name(message: bytes, offset: int) -> tuple[bytes, int]:
    """The name at `offset`, decompressed and lower-cased in wire form, and the offset after
    it in the message. Every pointer must point before the label that holds it, so a loop
    cannot exist; names over 255 octets and bad label types are FORMERR."""
    name = bytearray()
    end = len(message)
    after = -1
    position = offset
    while True:
        if position >= end:
            raise WireError(RCODE_FORMERR, "truncated name")
        length = message[position]
        if length == 0:
            name.append(0)
            if after < 0:
                after = position + 1
            break
        if length >= 0xC0:
            if position + 2 > end:
                raise WireError(RCODE_FORMERR, "truncated name")
            target = (length & 0x3F) << 8 | message[position + 1]
            if target >= position:
                raise WireError(RCODE_FORMERR, "compression pointer loop")
            if after < 0:
                after = position + 2
            position = target
            continue
        if length > 63:
            raise WireError(RCODE_FORMERR, "bad label type")
        if position + length + 1 > end:
            raise WireError(RCODE_FORMERR, "truncated name")
        name += message[position : position + length + 1]
        if len(name) + 1 > _MAX_NAME_OCTETS:
            raise WireError(RCODE_FORMERR, "name over 255 octets")
        position += length + 1
    return bytes(name).lower(), after

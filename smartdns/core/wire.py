"""DNS wire format for the hot path: header, question and OPT parsing, upstream answers.

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
MAX_MESSAGE_SIZE: Final = 65535  # a 2-byte length prefix cannot announce more (RFC 1035 §4.2.2)


class Query(NamedTuple):
    """One parsed query. A NamedTuple, not a dataclass: it is built once per packet.

    `question` is the question section exactly as received (0x20 case preserved);
    `qname` is the owner name in wire format, lower-cased, ending with the root label;
    `udp_size` is the client's EDNS payload size (at least 512) or 0 without EDNS;
    `padding`: the OPT carried the EDNS Padding option (RFC 7830), so a reply over an
    encrypted transport is padded (RFC 8467); the pipeline clears it for other transports.
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
    padding: bool = False


_HEADER = struct.Struct("!6H")
_TYPE_CLASS = struct.Struct("!HH")
# Builds a NamedTuple from its fields without the class's Python-level __new__: about 170 ns
# less per query than calling the class (the per-query NamedTuples, Query and QueryFacts).
new_tuple: Final = tuple.__new__
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_OPT_FIXED = struct.Struct("!HHBBHH")  # type, udp size, ext-rcode, version, flags, rdlength
_MAX_NAME_OCTETS: Final = 255
_MAX_RECORDS: Final = 4096  # more than any 64 KiB message can hold without being crafted
EDNS_OPTION_PADDING: Final = 12  # RFC 7830
PADDING_BLOCK: Final = 468  # RFC 8467 §4.1: the recommended block length for responses
_OPTION_HEADER = struct.Struct("!HH")  # option code, option length


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
    qtype, qclass = _TYPE_CLASS.unpack_from(packet, name_end)
    has_edns = False
    udp_size = 0
    dnssec_ok = False
    padding = False
    if ancount or nscount or arcount:
        opt = _find_opt(packet, question_end, ancount, nscount, arcount, question)
        if opt is not None:
            opt_udp_size, version, edns_flags, padding = opt
            if version:
                raise WireError(RCODE_BADVERS, "EDNS version not supported", question)
            has_edns = True
            udp_size = max(opt_udp_size, MIN_UDP_SIZE)
            dnssec_ok = bool(edns_flags & EDNS_FLAG_DO)
    return new_tuple(
        Query,
        (
            query_id,
            flags,
            question,
            packet[HEADER_SIZE:name_end].lower(),  # length octets are < 0x40: .lower() spares them
            qtype,
            qclass,
            has_edns,
            udp_size,
            dnssec_ok,
            padding,
        ),
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
    to an earlier name (RFC 1035 §4.1.4 "prior occurrence"), which rules out loops, and past
    the 12-octet header, which holds no name."""
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
            target = (length & 0x3F) << 8 | message[offset + 1]
            if target >= start or target < HEADER_SIZE:
                raise WireError(RCODE_FORMERR, "compression pointer loop or into the header")
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
) -> tuple[int, int, int, bool] | None:
    """(udp size, version, flags, has Padding option) of the OPT record, None without one;
    FORMERR for two."""
    if ancount + nscount + arcount > _MAX_RECORDS:
        raise WireError(RCODE_FORMERR, "too many records")
    opt: tuple[int, int, int, bool] | None = None
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
            padding = bool(rdlength) and _has_padding(packet, offset + 10, offset + 10 + rdlength)
            opt = (udp_size, version, flags, padding)
        offset += 10 + rdlength
        if offset > end:
            raise WireError(RCODE_FORMERR, "truncated record data")
    return opt


def _has_padding(packet: bytes, offset: int, end: int) -> bool:
    """Whether the OPT options from `offset` to `end` include Padding (RFC 7830). Options
    are otherwise ignored (RFC 6891 §6.1.2); a malformed option list ends the walk."""
    end = min(end, len(packet))
    while offset + 4 <= end:
        code, length = _OPTION_HEADER.unpack_from(packet, offset)
        if code == EDNS_OPTION_PADDING:
            return True
        offset += 4 + length
    return False


def pad_reply(reply: bytes, limit: int = MAX_MESSAGE_SIZE) -> bytes:
    """`reply`, which ends with our OPT record (no options yet), with a Padding option
    (RFC 7830) that brings it to a multiple of PADDING_BLOCK octets (RFC 8467 §4.1
    block-length padding). The option's 4-octet header counts too, so a reply already a
    multiple gets a whole block more. A padded reply over `limit` (the transport's largest
    message) goes out unpadded: RFC 8467 prefers that to no reply."""
    padded = -(-(len(reply) + 4) // PADDING_BLOCK) * PADDING_BLOCK
    if padded > limit:
        return reply
    fill = padded - len(reply) - 4
    # the OPT's RDLENGTH is the last field of the reply: 0 before, the option after
    option = _OPTION_HEADER.pack(EDNS_OPTION_PADDING, fill) + bytes(fill)
    return reply[:-2] + len(option).to_bytes(2, "big") + option


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
    ttls: tuple[int, ...]  # the TTL at each offset as received, RFC 2181 §8 applied
    has_cname: bool = False  # a CNAME in the answer section: the chain may enter an unblock zone
    soa_negative_ttl: int = -1  # min(SOA TTL, SOA MINIMUM) of the authority SOA, -1 without one


MAX_UPSTREAM_RECORDS: Final = 1000  # more is crafted; refused before any record is walked
QTYPE_TSIG: Final = 250


class _RdataLayout(NamedTuple):
    """The shape of one type's RDATA: `fixed` octets, `strings` character-strings (-1: as many
    as fit), `names` domain names, then exactly `tail` octets (None: any number, opaque)."""

    fixed: int
    strings: int
    names: int
    tail: int | None
    in_only: bool = False  # class-specific (RFC 3597 §4): in other classes the RDATA is opaque


_ONE_NAME: Final = _RdataLayout(0, 0, 1, 0)
_TWO_NAMES: Final = _RdataLayout(0, 0, 2, 0)
_PREFERENCE_NAME: Final = _RdataLayout(2, 0, 1, 0)
_STRINGS: Final = _RdataLayout(0, -1, 0, 0)
_SERVICE_BINDING: Final = _RdataLayout(2, 0, 1, None, in_only=True)  # RFC 9460: priority, target
# Types whose RDATA a client parses field by field. Their names (compressible per RFC 1035 and
# RFC 3597 §4, or read that way by receivers: SRV, DNAME, RRSIG...) are checked like owner
# names, and the fixed parts must fill RDLENGTH exactly. Other types are relayed opaque.
_RDATA_LAYOUTS: Final[dict[int, _RdataLayout]] = {
    QTYPE_A: _RdataLayout(4, 0, 0, 0, in_only=True),
    QTYPE_NS: _ONE_NAME,
    3: _ONE_NAME,  # MD
    4: _ONE_NAME,  # MF
    QTYPE_CNAME: _ONE_NAME,
    QTYPE_SOA: _RdataLayout(0, 0, 2, 20),  # MNAME RNAME, then five 32-bit fields
    7: _ONE_NAME,  # MB
    8: _ONE_NAME,  # MG
    9: _ONE_NAME,  # MR
    12: _ONE_NAME,  # PTR
    13: _RdataLayout(0, 2, 0, 0),  # HINFO
    14: _TWO_NAMES,  # MINFO
    15: _PREFERENCE_NAME,  # MX
    16: _STRINGS,  # TXT
    17: _TWO_NAMES,  # RP
    18: _PREFERENCE_NAME,  # AFSDB
    21: _PREFERENCE_NAME,  # RT
    23: _RdataLayout(0, 0, 1, 0, in_only=True),  # NSAP-PTR
    26: _RdataLayout(2, 0, 2, 0, in_only=True),  # PX
    QTYPE_AAAA: _RdataLayout(16, 0, 0, 0, in_only=True),
    33: _RdataLayout(6, 0, 1, 0, in_only=True),  # SRV: priority, weight, port, target
    35: _RdataLayout(4, 3, 1, 0, in_only=True),  # NAPTR: order, preference, 3 strings, name
    36: _RdataLayout(2, 0, 1, 0, in_only=True),  # KX
    39: _ONE_NAME,  # DNAME
    46: _RdataLayout(18, 0, 1, None),  # RRSIG: signer name after 18 octets, then the signature
    47: _RdataLayout(0, 0, 1, None),  # NSEC: next name, then the type bitmap
    QTYPE_SVCB: _SERVICE_BINDING,
    QTYPE_HTTPS: _SERVICE_BINDING,
    99: _STRINGS,  # SPF
}


def parse_upstream_answer(
    message: bytes, question_length: int, max_records: int = MAX_UPSTREAM_RECORDS
) -> ForwardedAnswer:
    """Validate an upstream answer to our question and split it, in one walk over the records.

    Raises WireError (the caller counts an upstream failure) when anything in it is something
    a client's parser could refuse, or could come to refuse once the cache rewrites TTLs:
    truncation, over `max_records` records, a name over 255 octets once decompressed or a
    compression pointer to anything but a name seen earlier (`_check_name`; owners and the
    names in `_RDATA_LAYOUTS` types), RDATA that does not fit its type (`_check_rdata`), an
    OPT outside the additional section or twice, a TSIG not last (`_check_hop_by_hop`).
    The kept records are those before the upstream's OPT or TSIG, which are hop-by-hop.
    """
    end = len(message)
    start = HEADER_SIZE + question_length
    flags, ancount, nscount, count = _check_header(message, start, max_records)
    suffixes: dict[int, int] = {}  # the question's labels are the first a pointer may name
    if _check_name(message, HEADER_SIZE, start - 4, suffixes) != start - 4:
        raise WireError(RCODE_FORMERR, "question does not fill its length")
    answer_and_authority = ancount + nscount
    kept_end = -1  # where the kept records end: at the upstream's OPT or TSIG, or at the end
    has_opt = False
    ttl_offsets: list[int] = []
    ttls: list[int] = []
    has_cname = False
    soa_negative_ttl = -1
    offset = start
    for index in range(count):
        record_start = offset
        name_end, rtype, ttl_offset, offset = _check_record(message, offset, end, suffixes)
        if rtype in (QTYPE_OPT, QTYPE_TSIG):
            has_opt = _check_hop_by_hop(
                rtype, name_end - record_start, has_opt, index, answer_and_authority, count
            )
            if kept_end < 0:
                # Pointers only name earlier names, so the records before this one stand on
                # their own; what follows is optional additional data.
                kept_end = record_start
            continue
        if kept_end >= 0:
            continue
        ttl_offsets.append(ttl_offset - start)
        ttls.append(ttl_value(message, ttl_offset))
        if index < ancount:
            has_cname = has_cname or rtype == QTYPE_CNAME
        elif rtype == QTYPE_SOA and index < answer_and_authority and soa_negative_ttl < 0:
            # RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM); MINIMUM is the
            # last field of the RDATA (its shape was checked)
            soa_negative_ttl = min(ttls[-1], ttl_value(message, offset - 4))
    return ForwardedAnswer(
        flags & 0xF,
        flags & (FLAG_AA | FLAG_AD),
        ancount,
        nscount,
        len(ttl_offsets) - answer_and_authority,
        message[start : offset if kept_end < 0 else kept_end],
        tuple(ttl_offsets),
        tuple(ttls),
        has_cname,
        soa_negative_ttl,
    )


def _check_header(message: bytes, start: int, max_records: int) -> tuple[int, int, int, int]:
    """(flags, ANCOUNT, NSCOUNT, all records) of an answer whose records start at `start`."""
    if len(message) < start:
        raise WireError(RCODE_FORMERR, "truncated answer")
    _, flags, _, ancount, nscount, arcount = _HEADER.unpack_from(message)
    count = ancount + nscount + arcount
    if count > max_records:
        raise WireError(RCODE_FORMERR, "too many records")
    return flags, ancount, nscount, count


def _check_record(
    message: bytes, offset: int, end: int, suffixes: dict[int, int]
) -> tuple[int, int, int, int]:
    """(owner name end, type, TTL offset, record end) of the valid record at `offset`."""
    name_end = _check_name(message, offset, end, suffixes)
    if name_end + 10 > end:
        raise WireError(RCODE_FORMERR, "truncated record")
    rtype, rclass, _, rdlength = _RR_FIXED.unpack_from(message, name_end)
    rdata = name_end + 10
    record_end = rdata + rdlength
    if record_end > end:
        raise WireError(RCODE_FORMERR, "truncated record data")
    layout = _RDATA_LAYOUTS.get(rtype)
    if layout is not None and (rclass == QCLASS_IN or not layout.in_only):
        _check_rdata(message, rdata, record_end, layout, suffixes)
    return name_end, rtype, name_end + 4, record_end


def _check_hop_by_hop(
    rtype: int, owner_length: int, has_opt: bool, index: int, additional_from: int, count: int
) -> bool:
    """The `index`-th record, an OPT or TSIG, is in the additional section; one OPT, owned
    by the root; TSIG last. Returns whether the message has had an OPT."""
    if index < additional_from:
        raise WireError(RCODE_FORMERR, "OPT or TSIG outside the additional section")
    if rtype == QTYPE_OPT:
        if has_opt or owner_length != 1:
            raise WireError(RCODE_FORMERR, "repeated OPT or OPT not owned by the root")
        return True
    if index != count - 1:
        raise WireError(RCODE_FORMERR, "TSIG not last")
    return has_opt


def _check_name(message: bytes, offset: int, end: int, suffixes: dict[int, int]) -> int:
    """Offset after the valid name at `offset`, which must end before `end`.

    RFC 1035 §4.1.4: a pointer names "a prior occurrence of the same name". `suffixes` maps
    the offset of every label (and terminating root or pointer) of the names checked so far
    to the decompressed length of the name from there; a pointer must hit one of them. That
    rules out in one lookup, without following any pointer, loops, forward pointers, pointers
    into the header (rewritten for each client), into fixed fields (the cache rewrites TTLs,
    which would change the name) and into the middle of a label, and gives the decompressed
    length exactly: at most 255 octets (RFC 1035 §3.1). This name's offsets are added.
    """
    position = offset
    while True:
        if position >= end:
            raise WireError(RCODE_FORMERR, "truncated name")
        length = message[position]
        if length == 0:
            suffix = 1
            after = position + 1
            break
        if length >= 0xC0:
            if position + 2 > end:
                raise WireError(RCODE_FORMERR, "truncated name")
            suffix = suffixes.get((length & 0x3F) << 8 | message[position + 1], 0)
            if not suffix:
                raise WireError(RCODE_FORMERR, "compression pointer to no earlier name")
            after = position + 2
            break
        if length > 63:
            raise WireError(RCODE_FORMERR, "bad label type")
        position += length + 1
        if position - offset > _MAX_NAME_OCTETS:
            raise WireError(RCODE_FORMERR, "name over 255 octets")
    total = position - offset + suffix
    if total > _MAX_NAME_OCTETS:
        raise WireError(RCODE_FORMERR, "name over 255 octets")
    suffixes[position] = suffix
    label = offset
    while label < position:
        suffixes[label] = total - (label - offset)
        label += message[label] + 1
    return after


def _check_rdata(
    message: bytes, start: int, end: int, layout: _RdataLayout, suffixes: dict[int, int]
) -> None:
    """RDATA from `start` to `end` has `layout`'s shape; its names are checked like owners."""
    position = start + layout.fixed
    strings = layout.strings
    if strings < 0:
        while position < end:
            position += message[position] + 1
    else:
        for _ in range(strings):
            if position >= end:
                raise WireError(RCODE_FORMERR, "truncated RDATA")
            position += message[position] + 1
    for _ in range(layout.names):
        position = _check_name(message, position, end, suffixes)
    if position > end or (layout.tail is not None and position + layout.tail != end):
        raise WireError(RCODE_FORMERR, "RDATA does not fit its type")


def ttl_value(message: bytes, offset: int) -> int:
    """A 32-bit TTL; RFC 2181 §8: values with the top bit set count as zero (the one place
    this rule is written)."""
    value: int = _UINT32.unpack_from(message, offset)[0]
    return 0 if value & 0x80000000 else value


_UINT32 = struct.Struct("!I")


def read_name(message: bytes, offset: int) -> tuple[bytes, int]:
    """The name at `offset`, decompressed and lower-cased in wire form, and the offset after
    it in the message. Each pointer must point before the previous one (before the name for
    the first) and past the header, so a loop cannot exist and the hops are bounded; names
    over 255 octets and bad label types are FORMERR. For names parse_upstream_answer checked.
    """
    name = bytearray()
    end = len(message)
    after = -1
    position = offset
    bound = offset  # the next pointer must point below this
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
            if target >= bound or target < HEADER_SIZE:
                raise WireError(RCODE_FORMERR, "compression pointer loop or into the header")
            if after < 0:
                after = position + 2
            position = bound = target
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


class CnameLink(NamedTuple):
    """One CNAME record of a chain: names lower-cased wire form, the TTL as in the record."""

    owner: bytes
    ttl: int
    target: bytes


def cname_chain(question: bytes, records: bytes, answer_count: int) -> list[CnameLink]:
    """The CNAME chain from the question's name through the first `answer_count` of
    `records` (a checked upstream answer's records after `question`), in order. Each owner
    is used once, so a CNAME loop ends the chain. Raises WireError when a name in it cannot
    be read (the caller answers SERVFAIL rather than risk passing on real addresses)."""
    # Pointers in `records` count from the start of the upstream message, whose header and
    # question had the same lengths as these.
    message = bytes(HEADER_SIZE) + question + records
    targets: dict[bytes, tuple[int, bytes]] = {}  # CNAME owner -> (TTL, target)
    for span in scan_records(message, HEADER_SIZE + len(question), answer_count):
        if span.rtype == QTYPE_CNAME:
            owner, _ = read_name(message, span.start)
            target, _ = read_name(message, span.ttl_offset + 6)
            targets.setdefault(owner, (_UINT32.unpack_from(message, span.ttl_offset)[0], target))
    chain: list[CnameLink] = []
    name = question[:-4].lower()
    while name in targets:
        ttl, target = targets.pop(name)
        chain.append(CnameLink(name, ttl, target))
        name = target
    return chain


def reply_max_age(reply: bytes) -> int:
    """How long an HTTP cache may keep a DoH response carrying `reply` (RFC 8484 §5.1):
    the smallest TTL of its records (our OPT excluded), and for an answer with no records in
    the answer section but an SOA in the authority section at most that SOA's MINIMUM
    (RFC 2308 §5). 0 when there is no record at all (REFUSED, SERVFAIL): nothing to cache.
    `reply` is our own, built well-formed; anything unreadable in it counts as 0."""
    # One pass without scan_records' spans: this runs for every DoH answer.
    try:
        offset = _question_name_end(reply) + 4
        _, _, _, ancount, nscount, arcount = _HEADER.unpack_from(reply)
        count = ancount + nscount + arcount
        if count > _MAX_RECORDS:
            return 0
        end = len(reply)
        smallest = -1
        for index in range(count):
            offset = skip_name(reply, offset)
            rtype, _, _, rdlength = _RR_FIXED.unpack_from(reply, offset)
            ttl_offset = offset + 4
            offset += 10 + rdlength
            if offset > end:
                return 0
            if rtype == QTYPE_OPT:
                continue
            ttl = ttl_value(reply, ttl_offset)
            if rtype == QTYPE_SOA and not ancount and index < nscount:
                ttl = min(ttl, ttl_value(reply, offset - 4))  # the SOA MINIMUM field
            if smallest < 0 or ttl < smallest:
                smallest = ttl
    except (WireError, struct.error):
        return 0
    return max(smallest, 0)

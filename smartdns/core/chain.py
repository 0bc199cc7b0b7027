"""Hostname lookups' answers (SPEC 3 "Dynamic home addresses"): the addresses at the end of
an A or AAAA answer's CNAME chain, the chain's TTL, and how the A and AAAA halves combine.

Pure; no I/O, no clock. Works on the wire bytes with `wire`'s walkers: a full DNS library
costs tens of µs per message, and a node refreshing 100,000 hostnames reads thousands a second.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final, NamedTuple

from smartdns.core.wire import (
    HEADER_SIZE,
    QCLASS_IN,
    QTYPE_A,
    QTYPE_AAAA,
    QTYPE_CNAME,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    ForwardedAnswer,
    read_name,
    scan_records,
    ttl_value,
)
from smartdns.errors import WireError

MAX_CNAME_LINKS: Final = 8  # CNAMEs followed per name, across re-queries; more is a loop
_RR_FIXED: Final = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_TTL_INFINITE: Final = 2**31 - 1
_ADDRESS_LENGTH: Final = {QTYPE_A: 4, QTYPE_AAAA: 16}


class ChainKind(enum.Enum):
    """What one A or AAAA answer says about the name at the end of its CNAME chain."""

    ADDRESSES = "addresses"  # records of the asked type
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"  # the name exists without records of the type (RFC 2308 §2.2)
    CNAME = "cname"  # the chain leaves the answer: the target must be asked for itself


class ChainAnswer(NamedTuple):
    """One answer read along its chain. `ttl` is the smallest TTL of the chain's CNAMEs and
    addresses (ADDRESSES, CNAME), or the SOA's negative TTL (NXDOMAIN, NODATA; -1 without an
    SOA). `target` is the wire name the chain ends at: the one to ask next for CNAME."""

    kind: ChainKind
    addresses: tuple[bytes, ...]  # packed, 4 octets for A, 16 for AAAA
    ttl: int
    target: bytes
    links: int  # CNAMEs followed in this answer


def read_chain(forwarded: ForwardedAnswer, qname: bytes, qtype: int, max_links: int) -> ChainAnswer:
    """Follow `qname`'s CNAME chain through the answer section of a reply to (qname, qtype),
    as the forwarder returns it (parsed and checked once, there).

    `qname` is the lower-cased wire name that was asked (the reply's question must be it,
    as the forwarder checks). Only answer records of class IN count; records owned by names
    off the chain are ignored (RFC 2181 §5.4.1: they are not part of the answer). A chain
    that ends at a CNAME is NODATA when an SOA is in the authority section (the resolver
    followed it to a name without records), else CNAME: an authority answered for its own
    zone only and the target is to be asked. Raises WireError for an rcode other than
    NOERROR or NXDOMAIN, and more than `max_links` CNAMEs (a loop).
    """
    question_length = len(qname) + 4
    # Pointers in the records count from the start of the upstream message, whose header and
    # question had these lengths.
    message = bytes(HEADER_SIZE) + qname + bytes(4) + forwarded.records
    if forwarded.rcode not in (RCODE_NOERROR, RCODE_NXDOMAIN):
        raise WireError(forwarded.rcode, "not an answer")
    cnames: dict[bytes, tuple[bytes, int]] = {}
    found: dict[bytes, list[tuple[bytes, int]]] = {}
    size = _ADDRESS_LENGTH[qtype]
    for span in scan_records(message, HEADER_SIZE + question_length, forwarded.answer_count):
        rtype, rclass, _, rdlength = _RR_FIXED.unpack_from(message, span.ttl_offset - 4)
        if rclass != QCLASS_IN:
            continue
        ttl = ttl_value(message, span.ttl_offset)
        if rtype == QTYPE_CNAME:
            owner = read_name(message, span.start)[0]
            target = read_name(message, span.ttl_offset + 6)[0]
            cnames.setdefault(owner, (target, ttl))  # RFC 2181 §10.1: one CNAME per owner
        elif rtype == qtype and rdlength == size:
            owner = read_name(message, span.start)[0]
            rdata = span.ttl_offset + 6
            found.setdefault(owner, []).append((message[rdata : rdata + size], ttl))
    name, ttl, links = qname, _TTL_INFINITE, 0
    while name in cnames:
        links += 1
        if links > max_links:
            raise WireError(RCODE_FORMERR, "CNAME chain too long or a loop")
        name, link_ttl = cnames[name]
        ttl = min(ttl, link_ttl)
    records = found.get(name)
    if records:
        ttl = min(ttl, *(record_ttl for _, record_ttl in records))
        unique = tuple(dict.fromkeys(address for address, _ in records))
        return ChainAnswer(ChainKind.ADDRESSES, unique, ttl, name, links)
    negative_ttl = forwarded.soa_negative_ttl
    if forwarded.rcode == RCODE_NXDOMAIN:
        return ChainAnswer(ChainKind.NXDOMAIN, (), negative_ttl, name, links)
    if links and negative_ttl < 0:
        return ChainAnswer(ChainKind.CNAME, (), ttl, name, links)
    return ChainAnswer(ChainKind.NODATA, (), negative_ttl, name, links)


class LookupOutcome(enum.Enum):
    """How a hostname's lookup (A and AAAA together) ended; a metric label."""

    ADDRESSES = "addresses"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    FAILED = "failed"  # a timeout, SERVFAIL, an unusable reply, a loop: try again later


@dataclass(frozen=True, slots=True)
class Resolution:
    """A hostname's A and AAAA lookups, combined.

    `addresses` are packed (4 or 16 octets) from every half that answered, so a FAILED
    lookup may still carry the half that did. `ttl` is the smallest positive TTL of the
    halves with addresses (ADDRESSES), the smallest negative TTL (NXDOMAIN, NODATA; -1
    when no SOA said), or -1 (FAILED).
    """

    outcome: LookupOutcome
    addresses: tuple[bytes, ...] = ()
    ttl: int = -1


FAILED: Final = Resolution(LookupOutcome.FAILED)


def combine(v4: ChainAnswer | None, v6: ChainAnswer | None) -> Resolution:
    """One Resolution from the A and AAAA halves; None is a half that failed.

    A name with addresses in one family and NODATA in the other has addresses. Both halves
    NXDOMAIN is NXDOMAIN; otherwise answers without addresses are NODATA (a resolver that
    says NXDOMAIN for one type and NODATA for another is contradicting itself; NODATA is the
    weaker claim).
    """
    halves = [half for half in (v4, v6) if half is not None]
    with_data = [half for half in halves if half.kind is ChainKind.ADDRESSES]
    addresses = tuple(address for half in with_data for address in half.addresses)
    if len(halves) < 2:
        return Resolution(LookupOutcome.FAILED, addresses)
    if with_data:
        return Resolution(LookupOutcome.ADDRESSES, addresses, min(h.ttl for h in with_data))
    known = [half.ttl for half in halves if half.ttl >= 0]
    negative_ttl = min(known) if known else -1
    if all(half.kind is ChainKind.NXDOMAIN for half in halves):
        return Resolution(LookupOutcome.NXDOMAIN, (), negative_ttl)
    return Resolution(LookupOutcome.NODATA, (), negative_ttl)

"""Property tests over wire.parse_query: random and mutated queries give a Query or WireError.

Valid queries come from dnspython; mutations are the ways real packets go wrong (bit flips,
truncation, edited counts, a second OPT, over-long labels). Bounded and derandomized for CI;
the strategies are shared with test_fuzz_pipeline.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartdns.core.answers import Responder
from smartdns.core.wire import (
    MIN_UDP_SIZE,
    RCODE_BADVERS,
    RCODE_FORMERR,
    RCODE_NOTIMP,
    Query,
    parse_query,
    parse_upstream_answer,
)
from smartdns.errors import WireError

CI = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

_ZONE_NAMES = ["netflix.com", "www.NetFlix.com", "bbc.co.uk", "notnetflix.com", "example.org"]
_QTYPES = [1, 2, 5, 6, 12, 15, 16, 28, 33, 41, 43, 48, 64, 65, 99, 250, 251, 252, 255, 65535]
_QCLASSES = [1, 1, 1, 3, 4, 254, 255]

labels = st.binary(min_size=1, max_size=63) | st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1, max_size=20
).map(str.encode)


@st.composite
def names(draw: st.DrawFn) -> dns.name.Name:
    """A name of at most 255 octets: a known zone name, or random labels (any bytes)."""
    if draw(st.booleans()):
        return dns.name.from_text(draw(st.sampled_from(_ZONE_NAMES)))
    parts: list[bytes] = []
    size = 1
    for label in draw(st.lists(labels, max_size=8)):
        if size + len(label) + 1 > 255:
            break
        parts.append(label)
        size += len(label) + 1
    return dns.name.Name([*parts, b""])


edns_options = st.sampled_from(
    [
        dns.edns.ECSOption("192.0.2.0", 24),
        dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"\x07" * 8),
        dns.edns.GenericOption(dns.edns.OptionType.NSID, b""),
        dns.edns.GenericOption(dns.edns.OptionType.PADDING, bytes(16)),
        dns.edns.GenericOption(65001, b"unknown"),
    ]
)


@st.composite
def valid_queries(draw: st.DrawFn) -> bytes:
    """A well-formed query as a client library would send it."""
    edns = draw(st.sampled_from([-1, -1, 0, 0, 1]))
    message = dns.message.make_query(
        draw(names()),
        draw(st.sampled_from(_QTYPES)),
        rdclass=draw(st.sampled_from(_QCLASSES)),
        use_edns=edns,
        payload=draw(st.sampled_from([0, 511, 512, 1232, 4096, 65535])),
        options=draw(st.lists(edns_options, max_size=3)) if edns >= 0 else None,
        want_dnssec=edns >= 0 and draw(st.booleans()),
        id=draw(st.integers(0, 0xFFFF)),
    )
    message.flags = draw(st.integers(0, 0xFFFF)) & ~(dns.flags.QR | 0x7800 | 0xF) | dns.flags.RD
    return bytes(message.to_wire())


def _bit_flip(packet: bytes, index: int, bit: int) -> bytes:
    index %= len(packet)
    return packet[:index] + bytes([packet[index] ^ 1 << bit]) + packet[index + 1 :]


def _set_count(packet: bytes, field: int, value: int) -> bytes:
    offset = 4 + 2 * field  # QD, AN, NS, AR
    return packet[:offset] + struct.pack("!H", value) + packet[offset + 2 :]


def _question_end(packet: bytes) -> int:
    offset = 12
    while offset < len(packet) and packet[offset] and packet[offset] < 64:
        offset += packet[offset] + 1
    return offset + 5


def _duplicate_opt(packet: bytes) -> bytes:
    """Append a copy of everything after the question (dnspython's OPT, with its options, is
    all there is) and count it."""
    arcount = struct.unpack_from("!H", packet, 10)[0]
    return _set_count(packet, 3, arcount + 1) + packet[_question_end(packet) :]


def _lengthen_label(packet: bytes, extra: int) -> bytes:
    """Grow the first label of the question by `extra` octets (possibly past 63)."""
    length = packet[12]
    if length == 0 or length + extra > 255:
        return packet
    return (
        packet[:12]
        + bytes([length + extra])
        + packet[13 : 13 + length]
        + b"x" * extra
        + packet[13 + length :]
    )


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("count"), st.integers(0, 3), st.integers(0, 0xFFFF)),
    st.tuples(st.just("opt"), st.just(0), st.just(0)),
    st.tuples(st.just("label"), st.integers(1, 200), st.just(0)),
    st.tuples(st.just("append"), st.integers(1, 64), st.just(0)),
)


def mutate(packet: bytes, steps: list[tuple[str, int, int]]) -> bytes:
    for kind, a, b in steps:
        if not packet:
            break
        if kind == "flip":
            packet = _bit_flip(packet, a, b)
        elif kind == "truncate":
            packet = packet[: a % (len(packet) + 1)]
        elif kind == "count" and len(packet) >= 12:
            packet = _set_count(packet, a, b)
        elif kind == "opt" and len(packet) >= 23:
            packet = _duplicate_opt(packet)
        elif kind == "label" and len(packet) > 12:
            packet = _lengthen_label(packet, a)
        elif kind == "append":
            packet = packet + bytes(range(a))
    return packet


mutated_queries = st.builds(mutate, valid_queries(), st.lists(mutations, min_size=1, max_size=4))
packets = st.one_of(st.binary(max_size=600), valid_queries(), mutated_queries)


def parse_or_error(packet: bytes) -> Query | WireError:
    """parse_query's result; any exception but WireError fails the test."""
    try:
        return parse_query(packet)
    except WireError as error:
        return error


@CI
@given(st.binary(max_size=600))
def test_random_bytes_give_query_or_wire_error(packet: bytes) -> None:
    result = parse_or_error(packet)
    if isinstance(result, WireError):
        assert result.rcode in (None, RCODE_FORMERR, RCODE_NOTIMP, RCODE_BADVERS)
        if len(packet) < 12:
            assert result.rcode is None


@CI
@given(mutated_queries)
def test_mutated_queries_give_query_or_wire_error(packet: bytes) -> None:
    result = parse_or_error(packet)
    if isinstance(result, Query):
        assert packet[12 : 12 + len(result.question)] == result.question
        assert result.qname == result.question[:-4].lower()
        assert result.udp_size == 0 or result.udp_size >= MIN_UDP_SIZE


@CI
@given(valid_queries())
def test_valid_queries_parse_as_dnspython_reads_them(packet: bytes) -> None:
    message = dns.message.from_wire(packet)
    result = parse_or_error(packet)
    if message.edns > 0:
        assert isinstance(result, WireError) and result.rcode == RCODE_BADVERS
        return
    assert isinstance(result, Query), result
    (question,) = message.question
    assert result.id == message.id
    assert result.qtype == question.rdtype and result.qclass == question.rdclass
    assert result.qname == question.name.to_wire().lower()  # type: ignore[union-attr]
    assert result.has_edns == (message.edns == 0)
    if result.has_edns:
        assert result.udp_size == max(message.payload, MIN_UDP_SIZE)
        assert result.dnssec_ok == bool(message.ednsflags & dns.flags.DO)


@CI
@given(valid_queries().filter(lambda p: p[11] == 1))
def test_duplicated_opt_gets_formerr(packet: bytes) -> None:
    result = parse_or_error(_duplicate_opt(packet))
    assert isinstance(result, WireError) and result.rcode == RCODE_FORMERR


@CI
@given(valid_queries().filter(lambda p: 0 < p[12] < 64), st.integers(1, 191))
def test_label_over_63_octets_gets_formerr(packet: bytes, extra: int) -> None:
    lengthened = _lengthen_label(packet, max(extra, 64 - packet[12]))
    result = parse_or_error(lengthened)
    assert isinstance(result, WireError) and result.rcode == RCODE_FORMERR


@CI
@given(valid_queries(), st.integers(0, 11))
def test_runt_header_is_dropped(packet: bytes, size: int) -> None:
    result = parse_or_error(packet[:size])
    assert isinstance(result, WireError) and result.rcode is None


@CI
@given(valid_queries(), st.sampled_from([0, 2, 3, 0xFFFF]))
def test_qdcount_not_one_gets_formerr(packet: bytes, qdcount: int) -> None:
    result = parse_or_error(_set_count(packet, 0, qdcount))
    assert isinstance(result, WireError) and result.rcode == RCODE_FORMERR


@CI
@given(valid_queries(), st.integers(1, 0xFFFF))
def test_inflated_record_counts_never_crash(packet: bytes, count: int) -> None:
    for field in (1, 2, 3):
        result = parse_or_error(_set_count(packet, field, count))
        assert isinstance(result, Query | WireError)


# ---- upstream answers: what the pipeline copies into client replies ------------------------


@dataclass(frozen=True)
class Exchange:
    """A client query (0x20 case) and the upstream's answer to its lower-cased question."""

    name: str
    cased: str
    qtype: str
    edns: int
    client_id: int
    upstream_id: int
    hops: int
    positive: bool
    glue: bool

    def build(self) -> tuple[bytes, bytes]:
        """Built in the test, not in the strategy: building inside it made Hypothesis report
        a use of the `random` module (from within dnspython)."""
        client = dns.message.make_query(
            self.cased, self.qtype, use_edns=self.edns, id=self.client_id
        )
        answer = dns.message.make_response(
            dns.message.make_query(self.name, self.qtype, use_edns=0, id=self.upstream_id)
        )
        owner = self.name + "."
        for hop in range(self.hops):
            target = f"hop{hop}.cdn.example.net."
            answer.answer.append(dns.rrset.from_text(owner, 300, "IN", "CNAME", target))
            owner = target
        if self.positive:
            rdatas = _UPSTREAM_RDATA[self.qtype]
            answer.answer.append(dns.rrset.from_text(owner, 60, "IN", self.qtype, *rdatas))
        else:
            soa = "ns.example.net. h.example.net. 1 3600 600 86400 300"
            answer.authority.append(dns.rrset.from_text("example.net.", 300, "IN", "SOA", soa))
        if self.glue:
            glue = dns.rrset.from_text("ns.example.net.", 300, "IN", "A", "192.0.2.53")
            answer.additional.append(glue)
        return bytes(client.to_wire()), bytes(answer.to_wire())


_UPSTREAM_RDATA = {"A": ["192.0.2.1", "192.0.2.2"], "AAAA": ["2001:db8::1"], "MX": ["10 mx.x.org."]}


@st.composite
def upstream_exchanges(draw: st.DrawFn) -> Exchange:
    """Compressed CNAME chains, A/AAAA/MX answers or a SOA in authority, optional glue."""
    labels = draw(st.lists(st.sampled_from(["www", "cdn", "api", "e1", "x"]), max_size=3))
    name = ".".join([*labels, draw(st.sampled_from(["example.org", "netflix.com"]))])
    return Exchange(
        name=name,
        cased="".join(c.upper() if draw(st.booleans()) else c for c in name),
        qtype=draw(st.sampled_from(sorted(_UPSTREAM_RDATA))),
        edns=draw(st.sampled_from([-1, 0])),
        client_id=draw(st.integers(0, 0xFFFF)),
        upstream_id=draw(st.integers(0, 0xFFFF)),
        hops=draw(st.integers(0, 3)),
        positive=draw(st.booleans()),
        glue=draw(st.booleans()),
    )


@CI
@given(upstream_exchanges())
def test_forwarded_reply_carries_the_upstream_records(exchange: Exchange) -> None:
    packet, upstream = exchange.build()
    query = parse_query(packet)
    answer = parse_upstream_answer(upstream, len(query.question))
    reply_wire = Responder(1232).forwarded(query, answer, answer.records, 65535)
    reply = dns.message.from_wire(reply_wire)
    expected = dns.message.from_wire(upstream)
    assert reply.id == query.id and reply.question == expected.question  # names: any case
    assert reply_wire[12 : 12 + len(query.question)] == packet[12 : 12 + len(query.question)]
    assert reply.answer == expected.answer and reply.authority == expected.authority
    assert reply.additional == expected.additional
    assert (reply.edns == 0) == query.has_edns


@pytest.mark.parametrize("client_id", [0x0541, 0x4142, 0xC0C0])
def test_upstream_pointer_into_header_gets_formerr(client_id: int) -> None:
    """An upstream answer whose owner name points at offset 0: with upstream ID 0x0000 that
    is the root name, and dnslib (the Forwarder's full parse) and dnspython both accept it.
    Copied into the client's reply, the pointer reads the client's ID instead: `A\\x81\\x80..`
    for ID 0x0541, a bad label type for 0x4142 or 0xC0C0. RFC 1035 §4.1.4 pointers name a
    prior occurrence of a name; the header holds none, so parse_upstream_answer refuses
    pointers below offset 12 with FORMERR and the client gets SERVFAIL."""
    packet = dns.message.make_query("example.org", "A", id=client_id).to_wire()
    query = parse_query(packet)
    question = query.qname + struct.pack("!HH", query.qtype, query.qclass)
    record = b"\xc0\x00" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes([192, 0, 2, 1])
    upstream = struct.pack("!6H", 0x0000, 0x8180, 1, 1, 0, 0) + question + record
    assert dns.message.from_wire(upstream).answer[0].name == dns.name.root  # valid upstream
    with pytest.raises(WireError):
        parse_upstream_answer(upstream, len(query.question))


# Found by the atheris harness (fuzz/fuzz_pipeline.py): a 253-octet qname, and an upstream
# answer whose names are a short label plus a pointer to the qname, 256+ octets once expanded.
_LONG_QNAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 47]) + ".netflix.com"  # 253 octets


def _long_exchange(records: bytes, ancount: int, nscount: int) -> tuple[Query, bytes]:
    query = parse_query(dns.message.make_query(_LONG_QNAME, "TXT", id=7).to_wire())
    question = query.qname + struct.pack("!HH", query.qtype, query.qclass)
    header = struct.pack("!6H", 0x0101, 0x8180 | (3 if nscount else 0), 1, ancount, nscount, 0)
    return query, header + question + records


def test_upstream_owner_name_over_255_octets_via_pointer_gets_formerr() -> None:
    """Owner `xyz.<qname>`: 4 + 253 = 257 octets (RFC 1035 §3.1 allows 255). dnslib, the
    Forwarder's full parse once, accepts it; the client's resolver (dnspython: NameTooLong)
    does not. parse_upstream_answer counts the name through the pointer: FORMERR, SERVFAIL."""
    record = b"\x03xyz\xc0\x0c" + struct.pack("!HHIH", 16, 1, 300, 2) + b"\x01a"
    query, upstream = _long_exchange(record, ancount=1, nscount=0)
    with pytest.raises(dns.name.NameTooLong):
        dns.message.from_wire(upstream)
    with pytest.raises(WireError):
        parse_upstream_answer(upstream, len(query.question))


def test_upstream_soa_name_over_255_octets_is_unparseable() -> None:
    """NXDOMAIN with SOA `ns.<qname> h.<qname>` (256 and 255 octets): the pipeline relays it
    and the client cannot parse the reply (atheris crash, `reply does not parse: NameTooLong`).
    SPEC 2: unparseable upstream answers count as upstream failures, so the Forwarder's check
    (parse_upstream_answer) refuses it and the client gets SERVFAIL."""
    rdata = b"\x02ns\xc0\x0c\x01h\xc0\x0c" + struct.pack("!5I", 1, 3600, 600, 86400, 300)
    soa = b"\xc0\x0c" + struct.pack("!HHIH", 6, 1, 300, len(rdata)) + rdata
    query, upstream = _long_exchange(soa, ancount=0, nscount=1)
    with pytest.raises(dns.name.NameTooLong):
        dns.message.from_wire(upstream)
    with pytest.raises(WireError):
        parse_upstream_answer(upstream, len(query.question))  # the Forwarder's one parse


def test_upstream_a_record_with_wrong_rdlength_is_unparseable() -> None:
    """One of a class found by differential fuzzing (dnslib + wire accept, dnspython rejects
    the upstream answer and hence our reply): A/AAAA with the wrong RDLENGTH, forward or
    header pointers and bad label types inside RDATA, compressed names in RDATA of types that
    forbid compression (RFC 3597 §4). The client gets a reply it cannot parse, cached for the
    TTL, where SPEC 2 wants an upstream failure (SERVFAIL, not cached). parse_upstream_answer
    now checks the RDATA of the types a client parses field by field (wire._RDATA_LAYOUTS)."""
    query = parse_query(dns.message.make_query("example.org", "A", id=9).to_wire())
    question = query.qname + struct.pack("!HH", query.qtype, query.qclass)
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 0)  # A, no address
    upstream = struct.pack("!6H", 0x1234, 0x8180, 1, 1, 0, 0) + question + record
    with pytest.raises(dns.exception.FormError):
        dns.message.from_wire(upstream)
    with pytest.raises(WireError):
        parse_upstream_answer(upstream, len(query.question))


def _retarget_pointer(message: bytes, which: int, target: int) -> bytes:
    """Point the `which`-th byte that looks like a compression pointer at `target`."""
    pointers = [i for i in range(12, len(message) - 1) if message[i] & 0xC0 == 0xC0]
    if not pointers:
        return message
    at = pointers[which % len(pointers)]
    return message[:at] + bytes([0xC0 | target >> 8, target & 0xFF]) + message[at + 2 :]


@CI
@given(
    upstream_exchanges(),
    st.lists(mutations, max_size=2),
    st.tuples(st.integers(0, 50), st.integers(0, 0x1FF)),
    st.lists(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=6),
)
def test_accepted_upstream_answers_give_replies_that_parse_with_any_ttls(
    exchange: Exchange,
    steps: list[tuple[str, int, int]],
    retarget: tuple[int, int],
    ttls: list[int],
) -> None:
    """Whatever parse_upstream_answer accepts stays readable in every reply built from it: with
    the client's ID, flags and question case, and whatever TTLs the cache writes (clamped,
    counted down, stale). Our own walk accepts the reply with the same records, and when
    dnspython reads the upstream's answer it reads the reply with the same sections."""
    packet, upstream = exchange.build()
    query = parse_query(packet)
    upstream = _retarget_pointer(mutate(upstream, steps), *retarget)
    question_end = 12 + len(query.question)
    if upstream[12:question_end].lower() != query.question.lower():
        return  # the Forwarder only accepts answers to its own question (upstream._matches)
    try:
        answer = parse_upstream_answer(upstream, len(query.question))
    except WireError:
        return
    records = bytearray(answer.records)
    for index, offset in enumerate(answer.ttl_offsets):
        struct.pack_into("!I", records, offset, ttls[index % len(ttls)])
    reply_wire = Responder(1232).forwarded(query, answer, bytes(records), 65535)
    again = parse_upstream_answer(reply_wire, len(query.question))
    assert again.records == bytes(records) and again.ttl_offsets == answer.ttl_offsets
    try:
        expected = dns.message.from_wire(upstream)
    except Exception:  # any refusal: the upstream's answer is not comparable
        return
    reply = dns.message.from_wire(reply_wire)
    assert reply.answer == expected.answer and reply.authority == expected.authority

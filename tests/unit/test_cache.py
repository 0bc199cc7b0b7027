"""cache: key, TTL clamp and countdown, RFC 2308 negative entries, failures, LRU, stale."""

from __future__ import annotations

import struct

import dns.message
import dns.rcode
import dns.rrset
import pytest

from smartdns.config.model import CacheConfig
from smartdns.core.cache import FAILURE_TTL_S, STALE_TTL, AnswerCache, PacketCache, cache_key
from smartdns.core.counters import Outcome
from smartdns.core.wire import ForwardedAnswer, parse_query, parse_upstream_answer

NOW = 1000.0


def _query_wire(name: str = "example.org", qtype: str = "A", **kwargs: object) -> bytes:
    return dns.message.make_query(name, qtype, **kwargs).to_wire()  # type: ignore[arg-type]


def _answer(
    *rrsets: tuple[str, int, str, str],
    rcode: int = dns.rcode.NOERROR,
    authority: tuple[tuple[str, int, str, str], ...] = (),
    name: str = "example.org",
) -> ForwardedAnswer:
    request = dns.message.make_query(name, "A")
    response = dns.message.make_response(request)
    response.set_rcode(rcode)
    for owner, ttl, rtype, rdata in rrsets:
        response.answer.append(dns.rrset.from_text(owner, ttl, "IN", rtype, rdata))
    for owner, ttl, rtype, rdata in authority:
        response.authority.append(dns.rrset.from_text(owner, ttl, "IN", rtype, rdata))
    wire = response.to_wire()
    return parse_upstream_answer(wire, len(request.question[0].name.to_wire()) + 4)


def _ttls(records: bytes, answer: ForwardedAnswer) -> list[int]:
    return [struct.unpack_from("!I", records, offset)[0] for offset in answer.ttl_offsets]


A_300 = ("example.org.", 300, "A", "192.0.2.1")
SOA = ("org.", 900, "SOA", "ns.org. h.org. 1 3600 600 86400 120")


def test_key_is_case_insensitive_and_separates_type_class_do_and_cd() -> None:
    base = cache_key(parse_query(_query_wire("Example.ORG")))
    assert base == cache_key(parse_query(_query_wire("example.org")))
    assert base != cache_key(parse_query(_query_wire("example.org", "AAAA")))
    assert base != cache_key(parse_query(_query_wire("example.org", "A", rdclass="CH")))
    assert base != cache_key(parse_query(_query_wire("example.org", use_edns=0, want_dnssec=True)))
    with_cd = bytearray(_query_wire("example.org"))
    with_cd[3] |= 0x10
    assert base != cache_key(parse_query(bytes(with_cd)))
    # HTTPS is 0x0041 ("A"): the key must not lower-case the type bytes
    https = cache_key(parse_query(_query_wire("example.org", "HTTPS")))
    assert https != cache_key(parse_query(_query_wire("example.org", "TYPE97")))


def test_hit_counts_ttls_down_from_the_stored_ones_and_never_mutates() -> None:
    cache = AnswerCache(CacheConfig())
    stored = cache.put(b"k", _answer(A_300, ("example.org.", 60, "TXT", '"x"')), NOW)
    snapshot = stored.answer.records
    assert cache.get(b"k", NOW + 0.9) is stored
    assert _ttls(cache.records(stored, NOW + 0.9), stored.answer) == [300, 60]
    assert _ttls(cache.records(stored, NOW + 10.5), stored.answer) == [290, 50]
    assert _ttls(cache.records(stored, NOW + 59.9), stored.answer) == [241, 1]
    assert cache.get(b"k", NOW + 60) is None  # the shortest TTL ends the entry
    assert stored.answer.records == snapshot
    assert (cache.hits, cache.misses) == (1, 1)


@pytest.mark.parametrize(
    ("min_ttl", "max_ttl", "upstream", "stored"),
    [(0, 86400, 300, 300), (0, 100, 300, 100), (60, 86400, 5, 60), (60, 100, 60, 60)],
)
def test_ttls_are_clamped(min_ttl: int, max_ttl: int, upstream: int, stored: int) -> None:
    cache = AnswerCache(CacheConfig(min_ttl=min_ttl, max_ttl=max_ttl))
    entry = cache.put(b"k", _answer(("example.org.", upstream, "A", "192.0.2.1")), NOW)
    assert _ttls(entry.answer.records, entry.answer) == [stored]
    assert entry.expires_at == NOW + stored


def test_ttl_zero_is_not_cached_but_handed_to_waiters() -> None:
    cache = AnswerCache(CacheConfig())
    entry = cache.put(b"k", _answer(("example.org.", 0, "A", "192.0.2.1")), NOW)
    assert entry.answer.answer_count == 1 and len(cache) == 0


def test_ttl_with_top_bit_counts_as_zero() -> None:
    cache = AnswerCache(CacheConfig())
    cache.put(b"k", _answer(("example.org.", 0x80000000, "A", "192.0.2.1")), NOW)
    assert len(cache) == 0


@pytest.mark.parametrize(
    ("rcode", "negative_ttl", "soa_ttl", "expected"),
    [
        (dns.rcode.NXDOMAIN, 300, 900, 120),  # SOA MINIMUM 120 < SOA TTL 900
        (dns.rcode.NXDOMAIN, 300, 30, 30),  # SOA TTL 30 < MINIMUM
        (dns.rcode.NXDOMAIN, 60, 900, 60),  # capped by negative_ttl
        (dns.rcode.NOERROR, 300, 900, 120),  # NODATA
    ],
)
def test_negative_answers_live_min_of_soa_ttl_and_minimum(
    rcode: int, negative_ttl: int, soa_ttl: int, expected: int
) -> None:
    cache = AnswerCache(CacheConfig(negative_ttl=negative_ttl))
    soa = (SOA[0], soa_ttl, SOA[2], SOA[3])
    entry = cache.put(b"k", _answer(rcode=rcode, authority=(soa,)), NOW)
    assert len(cache) == 1 and entry.expires_at == NOW + expected
    assert _ttls(entry.answer.records, entry.answer) == [expected]


def test_negative_answer_without_soa_is_not_cached() -> None:
    cache = AnswerCache(CacheConfig())
    cache.put(b"k", _answer(rcode=dns.rcode.NXDOMAIN), NOW)
    cache.put(b"j", _answer(), NOW)  # NODATA without SOA
    assert len(cache) == 0


def test_other_rcodes_are_not_cached() -> None:
    cache = AnswerCache(CacheConfig())
    cache.put(b"k", _answer(rcode=dns.rcode.SERVFAIL, authority=(SOA,)), NOW)
    cache.put(b"j", _answer(A_300, rcode=dns.rcode.YXDOMAIN), NOW)
    assert len(cache) == 0


def test_failure_is_remembered_only_a_few_seconds() -> None:
    cache = AnswerCache(CacheConfig())
    cache.put_failure(b"k", NOW)
    assert cache.has_failed(b"k", NOW + FAILURE_TTL_S - 0.1)
    assert not cache.has_failed(b"k", NOW + FAILURE_TTL_S)
    assert not cache.has_failed(b"other", NOW)
    cache.put_failure(b"k", NOW)
    cache.put(b"k", _answer(A_300), NOW + 1)  # an answer clears the failure
    assert not cache.has_failed(b"k", NOW + 1)


def test_lru_eviction_keeps_hot_entries() -> None:
    cache = AnswerCache(CacheConfig(max_entries=10))
    answer = _answer(A_300)
    cache.put(b"hot", answer, NOW)
    for index in range(50):
        cache.put(b"cold%d" % index, answer, NOW)
        assert cache.get(b"hot", NOW) is not None
        assert len(cache) <= 10
    assert len(cache) == 10 and cache.evictions == 41
    assert cache.get(b"cold0", NOW) is None and cache.get(b"cold49", NOW) is not None


def test_byte_budget_bounds_memory() -> None:
    cache = AnswerCache(CacheConfig(max_entries=1000), max_bytes=20_000)
    big = _answer(*[("example.org.", 300, "TXT", '"' + "x" * 200 + f'{i}"') for i in range(10)])
    for index in range(100):
        cache.put(b"k%d" % index, big, NOW)
        assert cache.bytes <= 20_000
    assert 0 < len(cache) < 20 and cache.evictions > 80


def test_replacing_an_entry_keeps_the_byte_count_right() -> None:
    cache = AnswerCache(CacheConfig())
    for _ in range(5):
        entry = cache.put(b"k", _answer(A_300), NOW)
    assert len(cache) == 1 and cache.bytes == entry.size


def test_stale_entry_served_within_window_with_ttl_30() -> None:
    cache = AnswerCache(CacheConfig(serve_stale=100))
    entry = cache.put(b"k", _answer(A_300, ("example.org.", 60, "TXT", '"x"')), NOW)
    assert cache.get(b"k", NOW + 150) is None  # expired at NOW + 60 (the TXT's TTL)
    stale = cache.stale(b"k", NOW + 150)
    assert stale is entry
    assert _ttls(cache.stale_records(stale), entry.answer) == [STALE_TTL, STALE_TTL]
    assert cache.stale_served == 1
    assert cache.stale(b"k", NOW + 60 + 101) is None  # past the window: dropped
    assert len(cache) == 0 and cache.bytes == 0


def test_max_entries_zero_disables_the_cache() -> None:
    cache = AnswerCache(CacheConfig(max_entries=0))
    cache.put(b"k", _answer(A_300), NOW)
    assert len(cache) == 0


def test_packet_cache_expires_and_evicts_the_oldest_when_full() -> None:
    packets = PacketCache()
    packets.put(b"q1", 10.0, Outcome.FORWARD, b"\x12\x34reply")
    assert packets.get(b"q1", 9.9) == (10.0, Outcome.FORWARD, b"reply")
    assert packets.get(b"q1", 10.0) is None
    for index in range(PacketCache.MAX_ENTRIES):
        packets.put(index.to_bytes(4), float("inf"), Outcome.REFUSE, b"\x00\x00r")
    assert len(packets) == PacketCache.MAX_ENTRIES  # q1 made room for the last one
    assert packets.get(b"q1", 0.0) is None
    packets.put((0).to_bytes(4), float("inf"), Outcome.REFUSE, b"\x00\x00r")  # now youngest
    packets.put(b"newest", float("inf"), Outcome.REFUSE, b"\x00\x00n")
    assert len(packets) == PacketCache.MAX_ENTRIES  # full: only the oldest made room
    assert packets.get((1).to_bytes(4), 0.0) is None
    assert packets.get((0).to_bytes(4), 0.0) is not None
    assert packets.get((2).to_bytes(4), 0.0) is not None
    assert packets.get(b"newest", 0.0) == (float("inf"), Outcome.REFUSE, b"n")


def test_packet_cache_keeps_no_reply_over_its_size_bound() -> None:
    """A stream peer's reply may reach 64 KiB: such replies are built each time."""
    packets = PacketCache()
    packets.put(b"big", float("inf"), Outcome.FORWARD, bytes(PacketCache.MAX_REPLY_BYTES + 1))
    packets.put(b"fits", float("inf"), Outcome.FORWARD, bytes(PacketCache.MAX_REPLY_BYTES))
    assert packets.get(b"big", 0.0) is None and packets.get(b"fits", 0.0) is not None


def test_packet_cache_holds_its_octet_budget_by_dropping_the_oldest() -> None:
    packets = PacketCache()
    reply = bytes(PacketCache.MAX_REPLY_BYTES)
    room = PacketCache.MAX_BYTES // (4 + len(reply) - 2)  # 4-octet keys, replies after the ID
    for index in range(room + 10):
        packets.put(index.to_bytes(4), float("inf"), Outcome.FORWARD, reply)
    assert len(packets) == room
    assert packets.get((9).to_bytes(4), 0.0) is None  # the ten oldest made room
    assert packets.get((10).to_bytes(4), 0.0) is not None
    for _ in range(3):  # storing the same key again takes no more room
        packets.put((room + 9).to_bytes(4), float("inf"), Outcome.FORWARD, reply)
    assert packets.get((10).to_bytes(4), 0.0) is not None and len(packets) == room

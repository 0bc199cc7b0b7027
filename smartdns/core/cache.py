"""AnswerCache: forwarded answers as bytes, bounded, TTL-clamped, negative entries, stale serving.

Pure data structure: no I/O, no clock (callers pass `now`, monotonic seconds), no logging.
Stored entries are never mutated; a hit copies the records and rewrites their TTLs.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Final, NamedTuple

from smartdns.config.model import CacheConfig
from smartdns.core.counters import Outcome
from smartdns.core.wire import FLAG_CD, RCODE_NOERROR, RCODE_NXDOMAIN, ForwardedAnswer, Query

STALE_TTL: Final = 30  # RFC 8767 §4: TTL of a stale answer
FAILURE_TTL_S: Final = 5.0  # RFC 9520 §3.2: a resolution failure is remembered a few seconds
BYTES_PER_ENTRY: Final = 1024  # memory budget per `max_entries` slot, on average
ENTRY_OVERHEAD_BYTES: Final = 320  # tuple, key, dict slot: what an entry costs beyond its records
MAX_FAILURES: Final = 10_000  # remembered failures; the oldest is forgotten first

_UINT32 = struct.Struct("!I")
_KEY_SUFFIX: Final = (b"\x00", b"\x01", b"\x02", b"\x03")  # DO bit | CD bit << 1


def cache_key(query: Query) -> bytes:
    """Lower-cased wire qname, qtype and qclass (as in the question), DO and CD bits.

    CD is part of the key as well as DO: an answer fetched with checking disabled may be
    one a validating upstream would have refused, and must not reach clients that rely on
    validation (RFC 4035 §3.2.2).
    """
    return (
        query.qname
        + query.question[-4:]
        + _KEY_SUFFIX[query.dnssec_ok | (2 if query.flags & FLAG_CD else 0)]
    )


class CacheEntry(NamedTuple):
    """One stored answer: its records and `ttls` carry the clamped TTLs."""

    answer: ForwardedAnswer
    stored_at: float
    expires_at: float
    size: int  # bytes counted against the budget


class AnswerCache:
    """Bounded LRU of forwarded answers (SPEC 2 "Forwarding", RFC 2308, RFC 8767).

    `max_entries` bounds the count, `max_entries * BYTES_PER_ENTRY` the bytes, so a flood of
    64 KiB answers cannot grow memory beyond the budget. A hit moves an entry to the young end;
    eviction takes the old end, so entries in use stay. `hits`, `misses`, `stale_served` and
    `evictions` are aggregate counters for metrics.
    """

    __slots__ = (
        "_entries",
        "_failures",
        "bytes",
        "config",
        "evictions",
        "hits",
        "max_bytes",
        "misses",
        "stale_served",
    )

    def __init__(self, config: CacheConfig, *, max_bytes: int | None = None) -> None:
        self.config = config
        self.max_bytes = config.max_entries * BYTES_PER_ENTRY if max_bytes is None else max_bytes
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self._failures: OrderedDict[bytes, float] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.stale_served = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    # ---- lookups -------------------------------------------------------------------------

    def get(self, key: bytes, now: float) -> CacheEntry | None:
        """The fresh entry for `key`, or None (a miss). Expired entries stay for `stale`."""
        entry = self._entries.get(key)
        if entry is None or now >= entry.expires_at:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def stale(self, key: bytes, now: float) -> CacheEntry | None:
        """An expired entry still within `serve_stale` seconds of its expiry (RFC 8767), or
        None; entries past that window are dropped here."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now < entry.expires_at:  # refreshed meanwhile: fresh is better than stale
            return entry
        if now - entry.expires_at > self.config.serve_stale:
            self._remove(key, entry)
            return None
        return entry

    def has_failed(self, key: bytes, now: float) -> bool:
        """Did resolving `key` fail within the last FAILURE_TTL_S seconds?"""
        until = self._failures.get(key)
        if until is None:
            return False
        if now < until:
            return True
        del self._failures[key]
        return False

    # ---- records out ---------------------------------------------------------------------

    @staticmethod
    def records(entry: CacheEntry, now: float) -> bytes:
        """The entry's records with TTLs counted down by whole elapsed seconds: never above
        the stored (clamped) TTLs, at least 1 while the entry is fresh."""
        elapsed = int(now - entry.stored_at)
        if elapsed <= 0:
            return entry.answer.records
        buffer = bytearray(entry.answer.records)
        pack_into = _UINT32.pack_into
        for offset, ttl in zip(entry.answer.ttl_offsets, entry.answer.ttls, strict=True):
            pack_into(buffer, offset, ttl - elapsed if ttl > elapsed else 0)
        return bytes(buffer)

    def stale_records(self, entry: CacheEntry) -> bytes:
        """The entry's records with every TTL set to STALE_TTL (RFC 8767 §4); counted."""
        self.stale_served += 1
        buffer = bytearray(entry.answer.records)
        for offset in entry.answer.ttl_offsets:
            _UINT32.pack_into(buffer, offset, STALE_TTL)
        return bytes(buffer)

    # ---- storing -------------------------------------------------------------------------

    def put(self, key: bytes, answer: ForwardedAnswer, now: float) -> CacheEntry:
        """Store `answer` with clamped TTLs and return the entry; an answer that must not be
        cached (TTL 0, a negative answer without SOA, another rcode) is returned unstored, so
        the queries waiting for it still get the clamped form."""
        config = self.config
        ttls = list(answer.ttls)
        cacheable = True
        if answer.rcode == RCODE_NXDOMAIN or (
            answer.rcode == RCODE_NOERROR and answer.answer_count == 0
        ):
            # RFC 2308 §5: min(SOA TTL, SOA MINIMUM), capped by negative_ttl; no SOA, no caching
            cap = min(answer.soa_negative_ttl, config.negative_ttl, config.max_ttl)
            cacheable = answer.soa_negative_ttl >= 0
            ttls = [min(ttl, cap) for ttl in ttls]
        elif answer.rcode == RCODE_NOERROR:
            low, high = config.min_ttl, config.max_ttl
            ttls = [low if ttl < low else high if ttl > high else ttl for ttl in ttls]
        else:
            cacheable = False
        lifetime = min(ttls, default=0)
        entry = CacheEntry(
            _with_ttls(answer, ttls),
            now,
            now + lifetime,
            len(answer.records) + len(key) + ENTRY_OVERHEAD_BYTES,
        )
        if not cacheable or lifetime <= 0 or config.max_entries <= 0:
            return entry
        self._failures.pop(key, None)
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self._entries[key] = entry
        self.bytes += entry.size
        entries = self._entries
        while len(entries) > config.max_entries or self.bytes > self.max_bytes:
            _, evicted = entries.popitem(last=False)
            self.bytes -= evicted.size
            self.evictions += 1
        return entry

    def put_failure(self, key: bytes, now: float) -> None:
        """Remember that resolving `key` failed (RFC 9520): for FAILURE_TTL_S seconds the
        next queries get the stale entry or SERVFAIL at once, without asking upstream."""
        failures = self._failures
        failures.pop(key, None)
        failures[key] = now + FAILURE_TTL_S
        if len(failures) > MAX_FAILURES:
            failures.popitem(last=False)

    def _remove(self, key: bytes, entry: CacheEntry) -> None:
        del self._entries[key]
        self.bytes -= entry.size


def _with_ttls(answer: ForwardedAnswer, ttls: list[int]) -> ForwardedAnswer:
    buffer = bytearray(answer.records)
    for offset, ttl in zip(answer.ttl_offsets, ttls, strict=True):
        _UINT32.pack_into(buffer, offset, ttl)
    return answer._replace(records=bytes(buffer), ttls=tuple(ttls))


class PacketHit(NamedTuple):
    """A stored reply: fresh until `until`, how its query ended, the reply after its ID."""

    until: float
    outcome: Outcome
    reply: bytes


class PacketCache:
    """Recent replies by the query's bytes after its ID (a packet cache, as dnsdist keeps):
    a repeated query skips parsing, policy and reply building and gets the stored reply with
    its own ID. Kept per Settings (so a reload starts empty), per kind of transport and per
    authorization state (the address itself is never part of a key); entries live until
    `until` (monotonic seconds), when the answer's TTL countdown moves on. Bounded in
    entries and in octets: when full, the oldest stored entries make room (insertion order,
    so a hit costs no bookkeeping); a reply over MAX_REPLY_BYTES is not kept."""

    __slots__ = ("_bytes", "_replies")

    MAX_ENTRIES: Final = 10_000
    # Octets of keys and replies held. A worker has six caches (three kinds of transport,
    # two authorization states): at most ~50 MB together, whatever the replies; 10,000
    # usual ones (a few hundred octets with their key, padded ones about 600) fit in one.
    MAX_BYTES: Final = 8 * 1024 * 1024
    # A stream peer's reply may reach 64 KiB (UDP's are truncated to edns_udp_size, at most
    # 4096): such rare replies are built each time rather than evict hundreds of others.
    MAX_REPLY_BYTES: Final = 4096

    def __init__(self) -> None:
        self._replies: dict[bytes, PacketHit] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: bytes, now: float) -> PacketHit | None:
        """The stored reply while fresh, else None."""
        hit = self._replies.get(key)
        if hit is None or now >= hit.until:
            return None
        return hit

    def put(self, key: bytes, until: float, outcome: Outcome, reply: bytes) -> None:
        if len(reply) > self.MAX_REPLY_BYTES:
            return
        replies = self._replies
        old = replies.pop(key, None)
        if old is not None:
            self._bytes -= len(key) + len(old.reply)
        size = len(key) + len(reply) - 2
        while replies and (len(replies) >= self.MAX_ENTRIES or self._bytes + size > self.MAX_BYTES):
            oldest = next(iter(replies))
            self._bytes -= len(oldest) + len(replies.pop(oldest).reply)
        replies[key] = PacketHit(until, outcome, reply[2:])  # (re)stored at the young end
        self._bytes += size

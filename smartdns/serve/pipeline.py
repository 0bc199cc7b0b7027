"""The query path: bytes in, bytes (or nothing) out. The only module that calls the others.

Nothing here logs (SPEC 7); outcomes are counted once, at the end. Everything but a
forwarded query is answered synchronously; a forward returns a coroutine for the transport
to await.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from smartdns.config.model import CacheConfig, RateLimitConfig, Unregistered
from smartdns.core.answers import Responder, UnblockZone, rewrite_cname_chain
from smartdns.core.cache import AnswerCache, CacheEntry, PacketCache, cache_key
from smartdns.core.clients import AuthorizedClients
from smartdns.core.counters import Metrics, Outcome, Transport
from smartdns.core.peer import Peer
from smartdns.core.policy import Verdict, decide
from smartdns.core.ratelimit import Admission, RateLimits
from smartdns.core.wire import (
    HEADER_SIZE,
    RCODE_SERVFAIL,
    Query,
    build_error,
    parse_query,
    parse_upstream_answer,
    truncate,
)
from smartdns.core.zones import ZoneMatcher
from smartdns.errors import UpstreamError, WireError
from smartdns.logs import WarnOnce
from smartdns.upstream.forwarder import DEADLINE_S, Forwarder, UpstreamBusyError

PendingReply = Coroutine[Any, Any, bytes | None]
Reply = bytes | PendingReply | None

STALE_AFTER_S: Final = 1.8  # RFC 8767 §5 client response timer: then a stale answer goes out
MAX_WAITING: Final = 10_000  # queries waiting for upstream; more get SERVFAIL at once
MAX_TCP_MESSAGE: Final = 65535  # a 2-byte length prefix cannot announce more

_OUTCOME = {verdict: Outcome(verdict.value) for verdict in Verdict}
_FOREVER: Final = float("inf")


@dataclass(frozen=True, slots=True)
class Settings:
    """What the query path needs from the configuration; reload swaps the whole object
    (the daemon hands an unchanged cache and forwarder over to the new one)."""

    responder: Responder
    zones: ZoneMatcher[UnblockZone]
    unregistered: Unregistered
    forwarder: Forwarder
    cache: AnswerCache = field(default_factory=lambda: AnswerCache(CacheConfig()))
    limits: RateLimits = field(default_factory=lambda: RateLimits(RateLimitConfig()))
    # UDP replies by query bytes, for authorized and for other sources; new with each reload
    packets_authorized: PacketCache = field(default_factory=PacketCache)
    packets_other: PacketCache = field(default_factory=PacketCache)


class Pipeline:
    """`handle(packet, peer)`; `settings` and `clients` are swapped whole by the
    daemon, and each query reads each reference once.

    Forwarded queries: policy first (authorization and zones, so a removed registration or a
    newly added zone beats the cache), then a fresh cache entry is answered synchronously; a
    miss joins the one upstream fetch for its key (coalescing) and falls back to a stale
    entry after STALE_AFTER_S or on failure (RFC 8767).
    """

    def __init__(
        self,
        settings: Settings,
        clients: AuthorizedClients,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clients = clients
        self.metrics = metrics
        self._clock = clock
        self._fetches: dict[bytes, asyncio.Task[CacheEntry | None]] = {}  # owner of fetches
        self._waiting = 0
        self._internal_errors = WarnOnce(__name__, "unexpected error while handling a query")

    def handle(self, packet: bytes, peer: Peer) -> Reply:
        """Reply bytes, None to send nothing, or a coroutine giving either (forwarding).

        Over UDP a query seen before (same bytes after the ID, same authorization state)
        is answered from the packet cache once the rate limits let it through."""
        host = peer.host
        transport = peer.transport
        settings = self.settings
        counts = self.metrics.queries
        authorized = self.clients.is_authorized(host)
        udp = transport is Transport.UDP
        packets = settings.packets_authorized if authorized else settings.packets_other
        admission = Admission.ALLOW
        now = 0.0
        if udp:
            now = self._clock()
            if authorized:
                # TCP is not limited: its source cannot be spoofed, and TC sends clients there.
                admission = settings.limits.client.check(host, now)
                if admission is Admission.DROP:
                    counts[transport, Outcome.RATE_LIMITED] += 1
                    return None
            if admission is Admission.ALLOW:
                hit = packets.get(packet[2:], now)
                if hit is not None:
                    outcome = hit[1]
                    if outcome is Outcome.REFUSE and not settings.limits.refused.allow(host, now):
                        counts[transport, Outcome.RATE_LIMITED] += 1
                        return None
                    if outcome is Outcome.FORWARD:
                        settings.cache.hits += 1
                    counts[transport, outcome] += 1
                    return packet[:2] + hit[2]
        try:
            query = parse_query(packet)
        except WireError as error:
            if error.rcode is None:
                counts[transport, Outcome.UNREADABLE] += 1
                return None
            # Error replies to unauthorized sources could be reflected: they share refused_qps.
            if udp and not authorized and not settings.limits.refused.allow(host, now):
                counts[transport, Outcome.RATE_LIMITED] += 1
                return None
            counts[transport, Outcome.MALFORMED] += 1
            return settings.responder.error(packet, error)
        if admission is Admission.TRUNCATE:
            counts[transport, Outcome.TRUNCATED] += 1
            return settings.responder.truncated(query)
        zone = settings.zones.match(query.qname) if authorized else None
        verdict = decide(
            authorized,
            zone is not None,
            zone is not None and zone.aaaa_count > 0,
            query.qtype,
            query.qclass,
            settings.unregistered,
        )
        if verdict is Verdict.FORWARD:
            key = cache_key(query)
            now = self._clock()
            entry = settings.cache.get(key, now)
            if entry is not None:
                counts[transport, Outcome.FORWARD] += 1
                records = settings.cache.records(entry, now)
                reply = self._reply(query, entry, records, settings, transport, authorized)
                if udp:
                    # valid until the TTL countdown moves to its next whole second
                    second_ends = now + 1.0 - (now - entry.stored_at) % 1.0
                    packets.put(
                        packet[2:], min(second_ends, entry.expires_at), Outcome.FORWARD, reply
                    )
                return reply
            if self._waiting >= MAX_WAITING:
                counts[transport, Outcome.SERVFAIL] += 1
                return settings.responder.servfail(query)
            return self._forward(query, key, settings, transport, authorized)
        responder = settings.responder
        if verdict is Verdict.REFUSE:
            if udp and not settings.limits.refused.allow(host, now):
                counts[transport, Outcome.RATE_LIMITED] += 1  # anti-reflection: silence
                return None
            reply = responder.refused(query)
        elif verdict is Verdict.DROP:
            counts[transport, Outcome.DROP] += 1
            return None
        else:
            assert zone is not None  # UNBLOCK and NODATA only come from a matched zone
            if verdict is Verdict.UNBLOCK:
                reply = responder.unblock(query, zone)
            else:
                reply = responder.nodata(query, zone)
        outcome = _OUTCOME[verdict]
        counts[transport, outcome] += 1
        if udp:
            packets.put(packet[2:], _FOREVER, outcome, reply)  # local answers change by reload
        return reply

    async def _forward(
        self, query: Query, key: bytes, settings: Settings, transport: Transport, authorized: bool
    ) -> bytes:
        """A cache miss: wait for the shared fetch, a stale entry after STALE_AFTER_S, or
        SERVFAIL when nothing answered by DEADLINE_S."""
        self._waiting += 1
        try:
            cache = settings.cache
            stale = cache.stale(key, self._clock())
            entry: CacheEntry | None = None
            if not cache.has_failed(key, self._clock()):
                fetch = self._fetches.get(key)
                if fetch is None:
                    fetch = asyncio.get_running_loop().create_task(
                        self._fetch(query, key, settings)
                    )
                    self._fetches[key] = fetch
                    fetch.add_done_callback(lambda done: self._fetch_done(key, done))
                try:
                    async with asyncio.timeout(STALE_AFTER_S if stale is not None else DEADLINE_S):
                        entry = await asyncio.shield(fetch)
                except TimeoutError:
                    entry = None  # the fetch goes on and refreshes the entry for the next query
        finally:
            self._waiting -= 1
        counts = self.metrics.queries
        now = self._clock()
        if entry is not None:
            counts[transport, Outcome.FORWARD] += 1
            records = cache.records(entry, now)
        elif stale is not None:
            counts[transport, Outcome.FORWARD] += 1
            entry = stale
            records = (
                cache.records(stale, now) if now < stale.expires_at else cache.stale_records(stale)
            )
        else:
            counts[transport, Outcome.SERVFAIL] += 1
            return settings.responder.servfail(query)
        return self._reply(query, entry, records, settings, transport, authorized)

    async def _fetch(self, query: Query, key: bytes, settings: Settings) -> CacheEntry | None:
        """One upstream resolution shared by every query with this key; stores the answer,
        or remembers the failure (not when we were only out of local capacity)."""
        try:
            response = await settings.forwarder.resolve(query)
            answer = parse_upstream_answer(response, len(query.question))
        except UpstreamBusyError:
            return None
        except (UpstreamError, WireError):
            settings.cache.put_failure(key, self._clock())
            return None
        return settings.cache.put(key, answer, self._clock())

    def _fetch_done(self, key: bytes, fetch: asyncio.Task[CacheEntry | None]) -> None:
        if self._fetches.get(key) is fetch:
            del self._fetches[key]
        if not fetch.cancelled() and fetch.exception() is not None:
            # every waiter already got it through the shield; this marks it retrieved
            self._internal_errors.warn(type(fetch.exception()).__name__)

    def _reply(
        self,
        query: Query,
        entry: CacheEntry,
        records: bytes,
        settings: Settings,
        transport: Transport,
        authorized: bool,
    ) -> bytes:
        """The client's reply from an entry: its ID, question and OPT; a CNAME chain into an
        unblock zone is cut there for authorized clients (with the zones of now, so a reload
        applies to cached answers too); truncated to the client's UDP limit."""
        responder = settings.responder
        answer = entry.answer
        if answer.has_cname and authorized:
            try:
                rewrite = rewrite_cname_chain(query, answer, records, settings.zones)
            except WireError:
                return responder.servfail(query)
            reply = (
                responder.forwarded(query, answer, records)
                if rewrite is None
                else responder.chain(query, rewrite)
            )
        else:
            reply = responder.forwarded(query, answer, records)
        if transport is Transport.TCP:
            limit = MAX_TCP_MESSAGE
        else:
            limit = min(query.udp_limit, responder.edns_udp_size)
        return truncate(reply, query, limit, responder.opt_for(query))

    async def close(self) -> None:
        """Cancel the fetches still running (shutdown; their waiters are gone)."""
        fetches = list(self._fetches.values())
        for fetch in fetches:
            fetch.cancel()
        if fetches:
            await asyncio.wait(fetches, timeout=1.0)

    def fail(self, packet: bytes, error: BaseException, peer: Peer) -> bytes | None:
        """The per-packet error boundary: SERVFAIL when the header is readable, a counter, and
        a rate-limited warning naming only the exception type (its text could carry a name)."""
        self.metrics.queries[peer.transport, Outcome.INTERNAL_ERROR] += 1
        self._internal_errors.warn(type(error).__name__)
        if len(packet) < HEADER_SIZE or struct.unpack_from("!H", packet, 2)[0] & 0x8000:
            return None
        return build_error(packet, RCODE_SERVFAIL, b"", b"")

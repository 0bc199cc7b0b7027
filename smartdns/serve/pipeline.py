"""The query path: bytes in, bytes (or nothing) out. The only module that calls the others.

Nothing here logs (SPEC 7); each outcome is counted once, where the reply is returned.
Everything but a forwarded cache miss is answered synchronously; a miss returns a coroutine
for the transport to await.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from smartdns.config.model import CacheConfig, RateLimitConfig, Unregistered
from smartdns.core.answers import LocalZone, Responder, error_reply
from smartdns.core.cache import AnswerCache, CacheEntry, PacketCache, cache_key
from smartdns.core.clients import AuthorizedClients
from smartdns.core.counters import Authorization, Metrics, Outcome
from smartdns.core.peer import Peer
from smartdns.core.policy import NameKind, QueryFacts, Verdict, cut_chain, decide
from smartdns.core.ratelimit import Admission, RateLimits
from smartdns.core.wire import (
    HEADER_SIZE,
    RCODE_SERVFAIL,
    Query,
    cname_chain,
    new_tuple,
    parse_query,
)
from smartdns.core.zones import ZoneMatcher
from smartdns.errors import UpstreamError, WireError
from smartdns.logs import WarnOnce
from smartdns.upstream.forwarder import Forwarder
from smartdns.upstream.resolver import DEADLINE_S, Resolver, UpstreamBusyError

PendingReply = Coroutine[Any, Any, bytes | None]
Reply = bytes | PendingReply | None

STALE_AFTER_S: Final = 1.8  # RFC 8767 §5 client response timer: then a stale answer goes out
MAX_WAITING: Final = 10_000  # queries waiting for upstream; more get SERVFAIL at once

_OUTCOME: Final = {verdict: Outcome(verdict.value) for verdict in Verdict}
_FOREVER: Final = float("inf")
_PLAIN: Final = NameKind.PLAIN
_BY_ADDRESS: Final = Authorization.ADDRESS
_BY_DEVICE: Final = Authorization.DEVICE_ID
_NOT_AUTHORIZED: Final = Authorization.NONE


@dataclass(frozen=True, slots=True)
class Settings:
    """What the query path needs from the configuration; reload swaps the whole object
    (the daemon hands an unchanged cache and forwarder over to the new one). The pipeline
    asks `forwarder` only through the Resolver protocol; the daemon reads its health."""

    responder: Responder
    zones: ZoneMatcher[LocalZone]
    unregistered: Unregistered
    forwarder: Forwarder
    cache: AnswerCache = field(default_factory=lambda: AnswerCache(CacheConfig()))
    limits: RateLimits = field(default_factory=lambda: RateLimits(RateLimitConfig()))
    # replies by query bytes, one cache per kind of transport and authorization state (see
    # packets_for); new with each reload
    packets: tuple[PacketCache, ...] = field(
        default_factory=lambda: tuple(PacketCache() for _ in range(6))
    )

    def packets_for(self, peer: Peer, authorized: bool) -> PacketCache:
        """The packet cache for `peer`'s replies. The same query bytes get the same reply
        only within one kind of transport and one authorization state: over UDP a reply is
        truncated to the query's own limit and never padded; over TCP neither truncated nor
        padded; over DoT and DoH never truncated, and padded when the query asks (RFC 8467).
        Whether an authorized peer named a device ID or not changes nothing in a reply."""
        kind = 0 if peer.spoofable else 4 if peer.encrypted else 2
        return self.packets[kind + authorized]


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
        """Reply bytes, None to send nothing, or a coroutine giving either (a cache miss).

        In order: authorization; the rate limits (per address for a spoofable peer, per
        device ID for one that named an ID); the packet cache (a query seen before: same
        bytes after the ID, same authorization state, same kind of transport); then
        parsing; then policy (SPEC 2's table); then the local answer, or the answer cache
        and upstream."""
        settings = self.settings
        device = peer.device
        if device is None:
            authorized = self.clients.contains(peer.address)
            self.metrics.authorizations[_BY_ADDRESS if authorized else _NOT_AUTHORIZED] += 1
        else:  # SPEC 2a: by the ID alone; an unknown ID never falls back to the address
            authorized = self.clients.holds_device(device)
            self.metrics.authorizations[_BY_DEVICE if authorized else _NOT_AUTHORIZED] += 1
        now = self._clock()
        admission = Admission.ALLOW
        if authorized and device is not None and not settings.limits.device.allow(device, now):
            admission = Admission.REFUSE  # a leaked ID cannot serve a crowd
        elif peer.spoofable and authorized:
            admission = settings.limits.client.check(peer.address, now)
            if admission is Admission.DROP:
                return self._done(peer, Outcome.RATE_LIMITED, None)
        if admission is Admission.ALLOW:
            hit = settings.packets_for(peer, authorized).get(packet[2:], now)
            if hit is not None:  # the stored reply with this query's ID
                if hit.outcome is Outcome.FORWARD:
                    settings.cache.hits += 1  # the answer cache would have answered it
                return self._send(peer, hit.outcome, packet[:2] + hit.reply, authorized, now)
        try:
            query = parse_query(packet)
        except WireError as error:
            if error.rcode is None:
                return self._done(peer, Outcome.UNREADABLE, None)
            reply = settings.responder.error(packet, error)
            return self._send(peer, Outcome.MALFORMED, reply, authorized, now)
        if query.padding and not peer.encrypted:
            query = query._replace(padding=False)  # RFC 8467: padding is for encrypted replies
        if admission is Admission.TRUNCATE:
            return self._done(peer, Outcome.TRUNCATED, settings.responder.truncated(query))
        if admission is Admission.REFUSE:
            return self._done(peer, Outcome.RATE_LIMITED, settings.responder.refused(query))
        zone = settings.zones.match(query.qname) if authorized else None
        kind = _PLAIN if zone is None else zone.kind
        facts = new_tuple(QueryFacts, (authorized, kind, query.qtype, query.qclass))
        verdict = decide(facts, settings.unregistered)
        if verdict is Verdict.FORWARD:
            return self._forward(packet, query, peer, authorized)
        if verdict is Verdict.DROP:
            return self._done(peer, Outcome.DROP, None)
        if verdict is Verdict.REFUSE:
            reply = settings.responder.refused(query)
        else:
            assert zone is not None  # the local verdicts only come from a local name
            reply = settings.responder.local(query, verdict, zone, peer.reply_limit)
        outcome = _OUTCOME[verdict]
        # local answers change only by reload
        settings.packets_for(peer, authorized).put(packet[2:], _FOREVER, outcome, reply)
        return self._send(peer, outcome, reply, authorized, now)

    def _done(self, peer: Peer, outcome: Outcome, reply: bytes | None) -> bytes | None:
        """Count the query's outcome (the one place outcomes are counted) and return its
        reply."""
        self.metrics.queries[peer.transport, outcome] += 1
        return reply

    def _send(
        self, peer: Peer, outcome: Outcome, reply: bytes, authorized: bool, now: float
    ) -> bytes | None:
        """`_done`, but a reply that could be reflected at a forged source (REFUSED, or an
        error reply to an unauthorized source) first passes `refused_qps`; over it, silence.
        The one place the refused limiter is consulted."""
        if (
            peer.spoofable
            and (outcome is Outcome.REFUSE or (outcome is Outcome.MALFORMED and not authorized))
            and not self.settings.limits.refused.allow(peer.address, now)
        ):
            return self._done(peer, Outcome.RATE_LIMITED, None)
        return self._done(peer, outcome, reply)

    def _forward(self, packet: bytes, query: Query, peer: Peer, authorized: bool) -> Reply:
        """A fresh cache entry answers at once (and fills the packet cache until the TTL
        countdown moves to its next whole second); a miss waits for upstream."""
        settings = self.settings
        now = self._clock()
        key = cache_key(query)
        entry = settings.cache.get(key, now)
        if entry is None:
            if self._waiting >= MAX_WAITING:
                return self._done(peer, Outcome.SERVFAIL, settings.responder.servfail(query))
            return self._resolve(query, key, settings, peer, authorized)
        records = settings.cache.records(entry, now)
        reply = self._reply(query, entry, records, settings, peer, authorized)
        second_ends = now + 1.0 - (now - entry.stored_at) % 1.0
        packets = settings.packets_for(peer, authorized)
        packets.put(packet[2:], min(second_ends, entry.expires_at), Outcome.FORWARD, reply)
        return self._done(peer, Outcome.FORWARD, reply)

    async def _resolve(
        self, query: Query, key: bytes, settings: Settings, peer: Peer, authorized: bool
    ) -> bytes | None:
        """A cache miss: the shared fetch's answer, a stale entry after STALE_AFTER_S or on
        failure (RFC 8767), or SERVFAIL when nothing answered by DEADLINE_S."""
        cache = settings.cache
        self._waiting += 1
        try:
            stale = cache.stale(key, self._clock())
            entry = await self._fetched(query, key, settings, stale is not None)
        finally:
            self._waiting -= 1
        now = self._clock()
        if entry is not None:
            records = cache.records(entry, now)
        elif stale is not None:
            entry = stale
            records = (
                cache.records(stale, now) if now < stale.expires_at else cache.stale_records(stale)
            )
        else:
            return self._done(peer, Outcome.SERVFAIL, settings.responder.servfail(query))
        reply = self._reply(query, entry, records, settings, peer, authorized)
        return self._done(peer, Outcome.FORWARD, reply)

    async def _fetched(
        self, query: Query, key: bytes, settings: Settings, has_stale: bool
    ) -> CacheEntry | None:
        """Join the one upstream fetch for `key` (coalescing), starting it when there is
        none; None after a recent failure or when the wait is over (STALE_AFTER_S with a
        stale entry to fall back on, else DEADLINE_S): the fetch goes on and refreshes the
        entry for the next query."""
        if settings.cache.has_failed(key, self._clock()):
            return None
        fetch = self._fetches.get(key)
        if fetch is None:
            fetch = asyncio.get_running_loop().create_task(
                self._fetch(settings.forwarder, query, key, settings.cache)
            )
            self._fetches[key] = fetch
            fetch.add_done_callback(lambda done: self._fetch_done(key, done))
        try:
            async with asyncio.timeout(STALE_AFTER_S if has_stale else DEADLINE_S):
                return await asyncio.shield(fetch)
        except TimeoutError:
            return None

    async def _fetch(
        self, resolver: Resolver, query: Query, key: bytes, cache: AnswerCache
    ) -> CacheEntry | None:
        """One upstream resolution shared by every query with this key; stores the parsed
        answer, or remembers the failure (not when we were only out of local capacity)."""
        try:
            answer = await resolver.resolve(query)
        except UpstreamBusyError:
            return None
        except UpstreamError:
            cache.put_failure(key, self._clock())
            return None
        return cache.put(key, answer, self._clock())

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
        peer: Peer,
        authorized: bool,
    ) -> bytes:
        """The client's reply from an entry, where policy may cut a CNAME chain that enters
        a local name (with the zones of now, so a reload applies to cached answers too)."""
        responder = settings.responder
        answer = entry.answer
        limit = peer.reply_limit
        if answer.has_cname and authorized:  # policy never cuts other sources' chains
            try:
                chain = cname_chain(query.question, records, answer.answer_count)
            except WireError:
                return responder.servfail(query)
            facts = QueryFacts(authorized, NameKind.PLAIN, query.qtype, query.qclass)
            cut = cut_chain(facts, chain, settings.zones)
            if cut is not None:
                return responder.chain(query, chain, cut, limit)
        return responder.forwarded(query, answer, records, limit)

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
        self._internal_errors.warn(type(error).__name__)
        if len(packet) < HEADER_SIZE or packet[2] & 0x80:  # a runt, or QR set
            return self._done(peer, Outcome.INTERNAL_ERROR, None)
        return self._done(peer, Outcome.INTERNAL_ERROR, error_reply(packet, RCODE_SERVFAIL))

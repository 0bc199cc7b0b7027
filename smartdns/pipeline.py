"""The query path: bytes in, bytes (or nothing) out. The only module that calls the others.

Nothing here logs (SPEC 7); outcomes are counted once, at the end. Everything but a
forwarded query is answered synchronously; a forward returns a coroutine for the transport
to await.
"""

from __future__ import annotations

import struct
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from smartdns.answers import Responder, UnblockZone
from smartdns.clients import AuthorizedClients
from smartdns.config import Unregistered
from smartdns.errors import UpstreamError, WireError
from smartdns.logs import WarnOnce
from smartdns.metrics import Metrics, Outcome, Transport
from smartdns.policy import Verdict, decide
from smartdns.upstream import Forwarder
from smartdns.wire import (
    HEADER_SIZE,
    RCODE_SERVFAIL,
    Query,
    build_error,
    parse_query,
    parse_upstream_answer,
    truncate,
)
from smartdns.zones import ZoneMatcher

PendingReply = Coroutine[Any, Any, bytes | None]
Reply = bytes | PendingReply | None

_OUTCOME = {verdict: Outcome(verdict.value) for verdict in Verdict}


@dataclass(frozen=True, slots=True)
class Settings:
    """What the query path needs from the configuration; reload swaps the whole object."""

    responder: Responder
    zones: ZoneMatcher[UnblockZone]
    unregistered: Unregistered
    forwarder: Forwarder


class Pipeline:
    """`handle(packet, host, transport)`; `settings` and `clients` are swapped whole by the
    daemon, and each query reads each reference once."""

    def __init__(self, settings: Settings, clients: AuthorizedClients, metrics: Metrics) -> None:
        self.settings = settings
        self.clients = clients
        self.metrics = metrics
        self._internal_errors = WarnOnce(__name__, "unexpected error while handling a query")

    def handle(self, packet: bytes, host: str, transport: Transport) -> Reply:
        """Reply bytes, None to send nothing, or a coroutine giving either (forwarding)."""
        settings = self.settings
        counts = self.metrics.queries
        try:
            query = parse_query(packet)
        except WireError as error:
            if error.rcode is None:
                counts[transport, Outcome.UNREADABLE] += 1
                return None
            counts[transport, Outcome.MALFORMED] += 1
            return settings.responder.error(packet, error)
        authorized = self.clients.is_authorized(host)
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
            return self._forward(query, settings, transport)
        counts[transport, _OUTCOME[verdict]] += 1
        responder = settings.responder
        if verdict is Verdict.REFUSE:
            return responder.refused(query)
        if verdict is Verdict.DROP:
            return None
        assert zone is not None  # UNBLOCK and NODATA only come from a matched zone
        if verdict is Verdict.UNBLOCK:
            return responder.unblock(query, zone)
        return responder.nodata(query, zone)

    async def _forward(self, query: Query, settings: Settings, transport: Transport) -> bytes:
        responder = settings.responder
        try:
            response = await settings.forwarder.resolve(query)
            answer = parse_upstream_answer(response, len(query.question))
        except (UpstreamError, WireError):
            self.metrics.queries[transport, Outcome.SERVFAIL] += 1
            return responder.servfail(query)
        self.metrics.queries[transport, Outcome.FORWARD] += 1
        reply = responder.forwarded(query, answer, answer.records)
        if transport is Transport.TCP:
            return reply
        limit = min(query.udp_limit, responder.edns_udp_size)
        return truncate(reply, query, limit, responder.opt_for(query))

    def fail(self, packet: bytes, error: BaseException, transport: Transport) -> bytes | None:
        """The per-packet error boundary: SERVFAIL when the header is readable, a counter, and
        a rate-limited warning naming only the exception type (its text could carry a name)."""
        self.metrics.queries[transport, Outcome.INTERNAL_ERROR] += 1
        self._internal_errors.warn(type(error).__name__)
        if len(packet) < HEADER_SIZE or struct.unpack_from("!H", packet, 2)[0] & 0x8000:
            return None
        return build_error(packet, RCODE_SERVFAIL, b"", b"")

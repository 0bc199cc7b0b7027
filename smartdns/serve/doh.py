"""DNS over HTTPS (RFC 8484): one asyncio protocol per TLS connection, HTTP/2 when the
handshake chose ALPN `h2`, else HTTP/1.1, under `serve.connections`' cap.

The HTTP state machines are sans I/O (serve.doh_h2, serve.doh_h1), the DoH rules pure
(serve.doh_request); this module moves bytes between them, the TLS transport and
`Pipeline.handle`, and owns the timer and the write bound. Each request is one call to the
pipeline inside the per-packet error boundary; a forwarded cache miss runs as a task of the
listeners' InFlight, so a drain waits for it. Nothing here logs a peer, a path or a header.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Final, Protocol

from smartdns.core.counters import StatusClass, Transport
from smartdns.core.peer import Peer, stream_peer
from smartdns.logs import WarnOnce
from smartdns.serve.connections import Connections
from smartdns.serve.doh_h1 import H1Session
from smartdns.serve.doh_h2 import H2Session
from smartdns.serve.doh_request import (
    HttpRequest,
    HttpResponse,
    dns_response,
    error_response,
    no_reply_response,
    read_request,
)
from smartdns.serve.pipeline import PendingReply, Pipeline
from smartdns.serve.stream import StreamConnection
from smartdns.serve.tcp import MAX_UNSENT_BYTES

_STATUS_CLASS: Final = {status: StatusClass.of(status) for status in range(100, 600)}
# one for all connections, so failing connections cannot each log a line
_FAILURES: Final = WarnOnce(__name__, "DoH connection failed; closed")


class HttpSession(Protocol):
    """What H2Session and H1Session share: the protocol drives either."""

    closed: bool

    def receive(self, data: bytes, now: float) -> list[tuple[int, HttpRequest]]: ...

    def respond(self, ref: int, response: HttpResponse | None, now: float) -> None: ...

    def resume(self, now: float) -> list[tuple[int, HttpRequest]]: ...

    def data_to_send(self) -> bytes: ...

    def expire(self, now: float) -> float | None: ...

    def is_idle(self) -> bool: ...

    @property
    def may_read(self) -> bool: ...


class DohConnection(StreamConnection):
    """One DoH client connection. Requests are answered as they complete (HTTP/2 streams
    in any order; HTTP/1.1 in order). Unsent output above MAX_UNSENT_BYTES aborts it, and
    reading pauses while the client is not reading."""

    def __init__(
        self,
        pipeline: Pipeline,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        connections: Connections,
    ) -> None:
        super().__init__(pipeline, spawn, connections, Transport.DOH)
        self._session: HttpSession | None = None
        self._pending = 0  # requests waiting for upstream
        self._reading = True
        self._writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = self._admit(transport)
        if stream is None:
            return
        ssl_object = stream.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        now = self._loop.time()
        deadline_s = self._connections.idle_timeout_s
        # Nothing is written yet: HTTP/2's server preface waits in the session's output for
        # the first read (RFC 9113 §3.4 only asks that it be the first frame sent; the client
        # sends its own without waiting), so it leaves in one TLS record and one send with the
        # SETTINGS ack and the first response. The session's timer writes it otherwise.
        self._session = H2Session(now, deadline_s) if alpn == "h2" else H1Session(now, deadline_s)

    def is_idle(self, now: float) -> bool:
        """No request in progress and nothing unsent."""
        transport, session = self._transport, self._session
        return (
            transport is not None
            and session is not None
            and not self._pending
            and session.is_idle()
            and not transport.get_write_buffer_size()
        )

    # ---- reading -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._feed(data)

    def eof_received(self) -> bool | None:
        self._feed(b"")  # h11 learns of the client's end; the TLS transport then closes
        return None

    def _feed(self, data: bytes) -> None:
        session = self._session
        if self._transport is None or session is None:
            return
        now = self._loop.time()
        try:
            self._serve(session, session.receive(data, now), now)
        except Exception as error:  # the connection's error boundary: h11, hpack or ours
            _FAILURES.warn(type(error).__name__)  # the type only: texts quote headers
            self.abort()

    def _serve(
        self, session: HttpSession, requests: list[tuple[int, HttpRequest]], now: float
    ) -> None:
        """Answer `requests`, then the pipelined ones h11 held behind them, then write.
        `now` stands for the whole batch: it is answered within microseconds."""
        if requests:
            self._connections.touch(self)
        while requests:
            for ref, request in requests:
                self._answer(session, ref, request, now)
            requests = session.resume(now)
        self._write_out()

    def _answer(self, session: HttpSession, ref: int, request: HttpRequest, now: float) -> None:
        read = read_request(request)
        if isinstance(read, int):
            self._respond(session, ref, error_response(read), now)
            return
        peer = self._peer
        if read.device is not None:
            peer = stream_peer(peer.host, Transport.DOH, read.device)
        packet = read.packet
        try:
            reply = self._pipeline.handle(packet, peer)
        except Exception as error:
            reply = self._pipeline.fail(packet, error, peer)
        if reply is None or type(reply) is bytes:
            self._respond(session, ref, _response(packet, reply), now)
            return
        assert not isinstance(reply, bytes)
        self._pending += 1
        self._spawn(self._answer_later(session, ref, packet, peer, reply))

    async def _answer_later(
        self, session: HttpSession, ref: int, packet: bytes, peer: Peer, pending: PendingReply
    ) -> None:
        try:
            reply = await pending
        except Exception as error:
            reply = self._pipeline.fail(packet, error, peer)
        finally:
            self._pending -= 1
        if self._transport is None:
            return  # the client is gone; the answer went into the cache all the same
        now = self._loop.time()
        self._respond(session, ref, _response(packet, reply), now)
        self._connections.touch(self)
        self._serve(session, session.resume(now), now)

    def _respond(
        self, session: HttpSession, ref: int, response: HttpResponse | None, now: float
    ) -> None:
        session.respond(ref, response, now)
        if response is not None:
            self._pipeline.metrics.doh_responses[_STATUS_CLASS[response.status]] += 1

    # ---- writing -------------------------------------------------------------------------

    def _write_out(self) -> None:
        transport, session = self._transport, self._session
        if transport is None or session is None or transport.is_closing():
            return
        data = session.data_to_send()
        if data:
            transport.write(data)
            if transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
                self.abort()  # a client that does not read its answers
                return
        if session.closed:
            self.close()
        elif session.may_read and not self._writing_paused:
            if not self._reading:
                self._reading = True
                transport.resume_reading()
        elif self._reading:
            self._reading = False
            transport.pause_reading()

    def pause_writing(self) -> None:
        """The client reads slower than it asks: stop reading its requests meanwhile."""
        self._writing_paused = True
        self._write_out()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._write_out()

    # ---- timer and closing ---------------------------------------------------------------

    def _on_timer(self) -> None:
        self._timer = None
        session = self._session
        if self._transport is None or session is None:
            return
        next_check = session.expire(self._loop.time())
        self._write_out()
        if next_check is not None:
            self._arm_timer(next_check)


def _response(packet: bytes, reply: bytes | None) -> HttpResponse | None:
    """The DNS reply as a 200, or what a query without a reply gets (serve.doh_request)."""
    return dns_response(reply) if reply is not None else no_reply_response(packet)

"""DoH over HTTP/1.1, sans I/O: the `h11` state machine with this server's bounds around it.
Keep-alive; pipelined requests answered one at a time, in order (h11 holds the next one
until the current response is out). The asyncio protocol (serve.doh) moves the bytes.

h11 logs nothing; its exceptions become a status or a closed connection, their text goes
nowhere (SPEC 7).
"""

from __future__ import annotations

from typing import Final

import h11

from smartdns.serve.doh_request import (
    BAD_REQUEST,
    MAX_BODY_BYTES,
    PAYLOAD_TOO_LARGE,
    HttpRequest,
    HttpResponse,
)

MAX_HEAD_BYTES: Final = 8192  # request line and headers; a DoH request needs < 1 KiB


class H1Session:
    """One HTTP/1.1 connection's DoH state, with the same face as H2Session: `receive`
    returns the requests completed (at most one at a time: the next waits in h11 until
    `respond`), `respond` answers it (None closes the connection: a query the policy
    dropped), `data_to_send`, `expire`, `closed`.

    Bounds: request line and headers over MAX_HEAD_BYTES get 431 and a close; a body over
    MAX_BODY_BYTES gets 413 and a close (the rest is never read); unparseable HTTP gets
    400 and a close; no request answered for `deadline_s` while none is being answered
    closes the connection, which also bounds a request that trickles in (slowloris)."""

    def __init__(self, now: float, deadline_s: float) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._deadline_s = deadline_s
        self._last_active = now
        self._out = bytearray()
        self._head: h11.Request | None = None
        self._body = bytearray()
        self._answering = 0  # the request handed out and not yet answered (0: none)
        self._count = 0
        self._close_after = False  # the request is cut short: answer it, then close
        self.closed = False

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def is_idle(self) -> bool:
        return not self._answering and self._h11.their_state is h11.IDLE

    @property
    def may_read(self) -> bool:
        """False while a request is being answered: its successors wait in the kernel, not
        in h11's buffer."""
        return not self._answering and not self.closed

    def receive(self, data: bytes, now: float) -> list[tuple[int, HttpRequest]]:
        """Feed bytes (b"" at end of stream) and read on."""
        if self.closed:
            return []
        try:
            self._h11.receive_data(data)
        except h11.RemoteProtocolError:  # data after the client's own end of stream
            self.closed = True
            return []
        return self._next(now)

    def _next(self, now: float) -> list[tuple[int, HttpRequest]]:
        while not self._answering and not self.closed:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as error:
                hint = error.error_status_hint
                status = hint if hint >= BAD_REQUEST else BAD_REQUEST
                return [self._hand_out(HttpRequest(b"", b"", None, b"", status), now, True)]
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return []
            if isinstance(event, h11.Request):
                self._head = event
                self._body.clear()
                length = _header(event, b"content-length")
                if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                    return [self._cut(PAYLOAD_TOO_LARGE, now)]
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > MAX_BODY_BYTES:
                    return [self._cut(PAYLOAD_TOO_LARGE, now)]
            elif isinstance(event, h11.EndOfMessage) and self._head is not None:
                head = self._head
                self._head = None
                request = HttpRequest(
                    head.method, head.target, _header(head, b"content-type"), bytes(self._body)
                )
                return [self._hand_out(request, now, False)]
            elif isinstance(event, h11.ConnectionClosed):
                self.closed = True
        return []

    def _cut(self, status: int, now: float) -> tuple[int, HttpRequest]:
        head = self._head
        assert head is not None
        self._head = None
        request = HttpRequest(head.method, head.target, None, b"", status)
        return self._hand_out(request, now, True)

    def _hand_out(
        self, request: HttpRequest, now: float, close_after: bool
    ) -> tuple[int, HttpRequest]:
        self._count += 1
        self._answering = self._count
        self._close_after = close_after
        self._last_active = now
        return self._count, request

    def respond(self, ref: int, response: HttpResponse | None, now: float) -> None:
        """Send the response to request `ref`, then let the next pipelined one through;
        None closes the connection instead."""
        if ref != self._answering or self.closed:
            return
        self._answering = 0
        self._last_active = now
        if response is None:
            self.closed = True
            return
        headers = [*response.headers, (b"content-length", b"%d" % len(response.body))]
        if self._close_after:
            headers.append((b"connection", b"close"))
        h11conn = self._h11
        try:
            self._out += h11conn.send(h11.Response(status_code=response.status, headers=headers))
            if response.body:
                self._out += h11conn.send(h11.Data(data=response.body))
            self._out += h11conn.send(h11.EndOfMessage())
            if h11conn.our_state is h11.DONE and h11conn.their_state is h11.DONE:
                h11conn.start_next_cycle()
                return
        except h11.LocalProtocolError:
            pass
        self.closed = True  # Connection: close, ours or the client's, or a broken state

    def resume(self, now: float) -> list[tuple[int, HttpRequest]]:
        """The requests already received behind the one just answered (pipelining)."""
        return [] if self.closed else self._next(now)

    def expire(self, now: float) -> float | None:
        """Close a connection with nothing being answered for `deadline_s`; returns when to
        call again (None once closed)."""
        if self.closed:
            return None
        if self._answering:
            return now + self._deadline_s
        if now - self._last_active >= self._deadline_s:
            self.closed = True
            return None
        return self._last_active + self._deadline_s


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key == name:
            return bytes(value)
    return None

"""DNS over TCP (RFC 7766) and over TLS (RFC 7858, the same protocol on the TLS transport):
the accept loop and one asyncio protocol per connection, under `serve.connections`' cap.

The framing and deadlines are `serve.framing`'s; this module only moves bytes between the
socket, that machine and `Pipeline.handle`, and owns the timer and flow control. Each message
is one call to the pipeline, inside the per-packet error boundary. Nothing here logs a peer.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Final

from smartdns.core.counters import Transport
from smartdns.logs import WarnOnce
from smartdns.serve.connections import Connections
from smartdns.serve.framing import Expiry, Framing, Stop
from smartdns.serve.pipeline import Pipeline
from smartdns.serve.stream import StreamConnection

MAX_UNSENT_BYTES: Final = 256 * 1024  # a TCP client that never reads is disconnected
# Replies ready at once are written together up to this size (a TLS record's payload at
# most), so a flood of pipelined queries is still written, and bounded, as it is answered.
WRITE_BATCH_BYTES: Final = 16 * 1024
ACCEPT_BATCH: Final = 64  # connections accepted per readiness event, so UDP is not starved
ACCEPT_RETRY_S: Final = 0.25  # pause after EMFILE and the like before accepting again


Accepted = Callable[[socket.socket], Coroutine[Any, Any, None]]
"""Turns one accepted socket into a connection (plain, or after a TLS handshake); on
failure it closes the socket."""


class TcpConnection(StreamConnection):
    """One client connection: pipelined queries answered as they complete (possibly out of
    order, RFC 7766 §6.2.1.1), with the limits of `Framing`. Unsent output above
    MAX_UNSENT_BYTES aborts it, and reading pauses while the client is not reading.

    The same protocol serves DoT (`kind` Transport.DOT) on the TLS transport: RFC 7858 §3.3
    is RFC 7766's framing inside TLS; the device ID the handshake named is in the peer."""

    def __init__(
        self,
        pipeline: Pipeline,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        connections: Connections,
        kind: Transport = Transport.TCP,
    ) -> None:
        super().__init__(pipeline, spawn, connections, kind)
        self._framing = Framing(self._loop.time(), connections.idle_timeout_s)
        self._reading = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._admit(transport)

    def is_idle(self, now: float) -> bool:
        """Nothing in progress (see `Framing.is_idle`) and nothing unsent."""
        transport = self._transport
        return (
            transport is not None
            and self._framing.is_idle(now)
            and not transport.get_write_buffer_size()
        )

    # ---- reading -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            self._framing.feed(data)
            self._process()

    def _process(self) -> None:
        """Answer every complete message read; the answers ready at once leave in one write
        (one TLS record and one send for a pipelined batch, not one per answer)."""
        framing = self._framing
        now = self._loop.time()
        out = bytearray()
        read = False
        while True:
            message = framing.next_message(now)
            if not isinstance(message, bytes):
                break
            read = True
            reply = self._dispatch(message)
            if reply is not None:
                out += len(reply).to_bytes(2, "big")
                out += reply
                if len(out) >= WRITE_BATCH_BYTES:
                    self._write(out)  # the transport may keep it: never touched again
                    out = bytearray()
                    if self._transport is None:
                        return  # aborted: the client does not read
        if out:
            self._write(out)
        if self._transport is None:
            return
        if read:
            self._connections.touch(self)
        if message is Stop.PAUSE:
            self._pause_reading()  # resumed as answers complete or the client reads
        elif message is Stop.BOGUS:
            self.abort()

    def _pause_reading(self) -> None:
        if self._reading and self._transport is not None:
            self._reading = False
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if not self._reading and self._framing.may_read and self._transport is not None:
            self._reading = True
            self._transport.resume_reading()
            self._process()

    def _dispatch(self, packet: bytes) -> bytes | None:
        """The reply when it is ready now; a forwarded cache miss is written when it comes."""
        try:
            reply = self._pipeline.handle(packet, self._peer)
        except Exception as error:
            reply = self._pipeline.fail(packet, error, self._peer)
        if reply is None or type(reply) is bytes:
            return reply
        assert not isinstance(reply, bytes)
        self._framing.answer_pending()
        self._spawn(self._write_later(packet, reply))
        return None

    async def _write_later(self, packet: bytes, pending: Coroutine[Any, Any, bytes | None]) -> None:
        try:
            reply = await pending
        except Exception as error:
            reply = self._pipeline.fail(packet, error, self._peer)
        finally:
            self._framing.answer_finished()
        if reply is not None:
            self._write(len(reply).to_bytes(2, "big") + reply)
        self._resume_reading()

    # ---- writing -------------------------------------------------------------------------

    def _write(self, framed: bytes | bytearray) -> None:
        """Send length-prefixed replies (RFC 1035 §4.2.2)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(framed)
        if transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
            self.abort()  # a client that does not read its answers
            return
        self._framing.answer_sent(self._loop.time())
        self._connections.touch(self)

    def pause_writing(self) -> None:
        """The client reads slower than it asks: stop reading its queries meanwhile."""
        self._framing.writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._framing.writing_paused = False
        self._resume_reading()

    # ---- timer and closing ---------------------------------------------------------------

    def _on_timer(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        expiry = self._framing.expire(self._loop.time(), bool(transport.get_write_buffer_size()))
        if expiry is Expiry.ABORT:
            self.abort()
        elif expiry is Expiry.CLOSE:
            self.close()
        else:
            self._arm_timer(expiry)


class TcpListener:
    """Accepts on one listening socket by hand, so running out of file descriptors (EMFILE)
    pauses accepting (the kernel's backlog holds new clients meanwhile), sheds the least
    recently active idle connection and resumes after ACCEPT_RETRY_S, under asyncio and
    uvloop alike (uvloop's own server closes the listener on that error)."""

    def __init__(
        self,
        sock: socket.socket,
        accepted: Accepted,
        connections: Connections,
    ) -> None:
        self._sock = sock
        self._accepted = accepted
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self._starting: set[asyncio.Task[Any]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._serving = True
        self.paused = 0  # times accepting paused for lack of descriptors
        self._exhausted = WarnOnce(__name__, "out of file descriptors; TCP accepting paused")
        self._loop.add_reader(sock.fileno(), self._accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,)

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        if self._retry is not None:
            self._retry.cancel()
        else:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for task in self._starting:
            task.cancel()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up already
                self._pause(error)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._accepted(conn))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    def _pause(self, error: OSError) -> None:
        """EMFILE, ENFILE, ENOBUFS, ENOMEM: stop accepting for a moment, free an idle
        connection, then try again (RFC 7766 §10: a server under stress sheds idle clients)."""
        self.paused += 1
        self._exhausted.warn(type(error).__name__)
        self._loop.remove_reader(self._sock.fileno())
        self._connections.shed_idle()
        self._retry = self._loop.call_later(ACCEPT_RETRY_S, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if self._serving:
            self._loop.add_reader(self._sock.fileno(), self._accept)


def plain(factory: Callable[[], asyncio.Protocol]) -> Accepted:
    """Accepted sockets become `factory()` connections at once (plain TCP)."""

    async def start(conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(factory, conn)
        except OSError:
            conn.close()

    return start

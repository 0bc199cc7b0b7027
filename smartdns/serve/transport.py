"""UDP endpoints and TCP connections (RFC 7766) on every listen address: bytes in, bytes out.

Each received packet is one call to `Pipeline.handle`, wrapped in the per-packet error
boundary. Forwarded queries run as owned tasks so a drain can wait for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Final, cast

from smartdns.config.model import HostPort, ServerConfig
from smartdns.core.peer import Peer, stream_peer, udp_peer
from smartdns.errors import SmartDNSError
from smartdns.logs import WarnOnce
from smartdns.serve.pipeline import Pipeline

MAX_UDP_QUERY: Final = 4096  # larger datagrams are not queries anyone sends; drop unread
SOCKET_BUFFER_BYTES: Final = 4 * 1024 * 1024  # so a burst queues in the kernel, not on the floor
TCP_BACKLOG: Final = 1024
MAX_UNSENT_BYTES: Final = 256 * 1024  # a TCP client that never reads is disconnected
MAX_PENDING_PER_CONNECTION: Final = 100  # pipelined queries in progress; reading pauses beyond
MAX_QUERIES_PER_CONNECTION: Final = 1000  # then the connection closes once they are answered
ACCEPT_BATCH: Final = 64  # connections accepted per readiness event, so UDP is not starved
ACCEPT_RETRY_S: Final = 0.25  # pause after EMFILE and the like before accepting again
# A new connection cannot be shed for room before its first query or this long: otherwise
# each newcomer sheds the one before it before its query has even been read, and none is served
FIRST_QUERY_GRACE_S: Final = 1.0
_LENGTH = 2


class InFlight:
    """Owner of the forwarding tasks of one worker: tracked until done, awaited on drain."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for in-flight queries, then cancel the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()


class UdpServer(asyncio.DatagramProtocol):
    """One UDP socket. `reading` goes False on drain: new datagrams are ignored while the
    socket stays open for the answers still in flight."""

    def __init__(self, pipeline: Pipeline, in_flight: InFlight) -> None:
        self._pipeline = pipeline
        self._in_flight = in_flight
        self._transport: asyncio.DatagramTransport | None = None
        self.reading = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, so no isinstance check here
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) > MAX_UDP_QUERY or self._transport is None or not self.reading:
            return
        peer = udp_peer(addr[0])
        try:
            reply = self._pipeline.handle(data, peer)
        except Exception as error:
            reply = self._pipeline.fail(data, error, peer)
        if reply is None:
            return
        if type(reply) is bytes:
            self._transport.sendto(reply, addr)
            return
        assert not isinstance(reply, bytes)
        self._in_flight.spawn(self._send_later(data, reply, peer, addr))

    async def _send_later(
        self,
        data: bytes,
        pending: Coroutine[Any, Any, bytes | None],
        peer: Peer,
        addr: tuple[Any, ...],
    ) -> None:
        try:
            reply = await pending
        except Exception as error:
            reply = self._pipeline.fail(data, error, peer)
        transport = self._transport
        if reply is not None and transport is not None and not transport.is_closing():
            transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        """ICMP errors for earlier replies (client gone): nothing to do."""


class TcpConnections:
    """State shared by the TCP connections of one worker: the cap, the timeouts, and the
    open connections in order of last activity (oldest first), for shedding."""

    def __init__(self, config: ServerConfig) -> None:
        self.max_connections = config.tcp_max_connections
        self.idle_timeout_s = config.tcp_idle_timeout
        self.open: dict[TcpConnection, None] = {}
        self.shed = 0  # idle connections closed to make room (cap or out of descriptors)
        self.refused = 0  # new connections closed at once: full of busy connections

    def close_all(self) -> None:
        for connection in list(self.open):
            connection.close()

    def touch(self, connection: TcpConnection) -> None:
        """`connection` was active: move it to the young end."""
        if connection in self.open:
            del self.open[connection]
            self.open[connection] = None

    def shed_idle(self) -> bool:
        """Close the least recently active idle connection; False when none is idle."""
        now = asyncio.get_running_loop().time()
        for connection in self.open:
            if connection.is_idle(now):
                connection.abort()
                self.shed += 1
                return True
        return False


class TcpConnection(asyncio.Protocol):
    """One client connection: 2-byte length framing, pipelined queries answered as they
    complete (possibly out of order, RFC 7766 §6.2.1.1).

    Limits (RFC 7766 §6.2.3, RFC 9210 §4): closed after `tcp_idle_timeout` without a query or
    an answer; a started message must be complete within the same time from its first byte,
    however slowly it trickles (slowloris); at most MAX_PENDING_PER_CONNECTION queries in
    progress (reading pauses beyond); at most MAX_QUERIES_PER_CONNECTION queries, then closed
    once answered; unsent output above MAX_UNSENT_BYTES aborts it, and reading pauses while
    the client is not reading. A length prefix below a header's size ends it at once.
    """

    def __init__(
        self, pipeline: Pipeline, in_flight: InFlight, connections: TcpConnections
    ) -> None:
        self._pipeline = pipeline
        self._in_flight = in_flight
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._peer = stream_peer("")
        self._buffer = bytearray()
        self._pending = 0
        self._queries = 0
        self._reading = True
        self._writing_paused = False
        self._opened = 0.0
        self._last_activity = 0.0
        self._message_started = -1.0  # when the incomplete message in the buffer began
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)
        connections = self._connections
        if len(connections.open) >= connections.max_connections and not connections.shed_idle():
            connections.refused += 1
            stream.abort()
            return
        self._transport = stream
        self._peer = stream_peer(stream.get_extra_info("peername")[0])
        connections.open[self] = None
        self._opened = self._last_activity = self._loop.time()
        self._arm_timer(self._last_activity + connections.idle_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.open.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None

    def is_idle(self, now: float) -> bool:
        """Nothing in progress: no query being answered, no partial message, nothing unsent,
        and past its first query or FIRST_QUERY_GRACE_S."""
        transport = self._transport
        return (
            transport is not None
            and (self._queries > 0 or now - self._opened >= FIRST_QUERY_GRACE_S)
            and not self._pending
            and not self._buffer
            and not transport.get_write_buffer_size()
        )

    # ---- reading -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._queries >= MAX_QUERIES_PER_CONNECTION:
            return
        self._buffer += data
        self._process()

    def _process(self) -> None:
        buffer = self._buffer
        completed = False
        while len(buffer) >= _LENGTH:
            if self._pending >= MAX_PENDING_PER_CONNECTION or self._writing_paused:
                self._pause_reading()  # resumed as answers complete or the client reads
                break
            length = buffer[0] << 8 | buffer[1]
            if length < 12:  # not even a header: the stream cannot be trusted any more
                self.abort()
                return
            if len(buffer) < _LENGTH + length:
                break
            packet = bytes(buffer[_LENGTH : _LENGTH + length])
            del buffer[: _LENGTH + length]
            completed = True
            self._queries += 1
            self._dispatch(packet)
            if self._transport is None:
                return
            if self._queries >= MAX_QUERIES_PER_CONNECTION:
                # RFC 7766 §6.2.3: a server may close after some queries; the rest is dropped
                buffer.clear()
                self._pause_reading()
                self._close_when_answered()
                return
        now = self._loop.time()
        if completed:
            self._activity(now)
            self._message_started = -1.0
        if buffer and self._message_started < 0:
            self._message_started = now

    def _pause_reading(self) -> None:
        if self._reading and self._transport is not None:
            self._reading = False
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if (
            not self._reading
            and not self._writing_paused
            and self._pending < MAX_PENDING_PER_CONNECTION
            and self._queries < MAX_QUERIES_PER_CONNECTION
            and self._transport is not None
        ):
            self._reading = True
            self._transport.resume_reading()
            if self._buffer:
                self._process()

    def _dispatch(self, packet: bytes) -> None:
        try:
            reply = self._pipeline.handle(packet, self._peer)
        except Exception as error:
            reply = self._pipeline.fail(packet, error, self._peer)
        if reply is None:
            return
        if type(reply) is bytes:
            self._write(reply)
            return
        assert not isinstance(reply, bytes)
        self._pending += 1
        self._in_flight.spawn(self._write_later(packet, reply))

    async def _write_later(self, packet: bytes, pending: Coroutine[Any, Any, bytes | None]) -> None:
        try:
            reply = await pending
        except Exception as error:
            reply = self._pipeline.fail(packet, error, self._peer)
        finally:
            self._pending -= 1
        if reply is not None:
            self._write(reply)
        if self._queries >= MAX_QUERIES_PER_CONNECTION:
            self._close_when_answered()
        else:
            self._resume_reading()

    # ---- writing -------------------------------------------------------------------------

    def _write(self, reply: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(len(reply).to_bytes(2, "big") + reply)
        if transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
            self.abort()  # a client that does not read its answers
            return
        self._activity(self._loop.time())

    def pause_writing(self) -> None:
        """The client reads slower than it asks: stop reading its queries meanwhile."""
        self._writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._resume_reading()

    # ---- timers --------------------------------------------------------------------------

    def _activity(self, now: float) -> None:
        self._last_activity = now
        self._connections.touch(self)

    def _arm_timer(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        """One lazily re-armed timer serves both limits, so traffic costs no timer churn:
        the message deadline (from a message's first byte) and the idle timeout (from the
        last query or answer; an answer still on its way keeps the connection open)."""
        self._timer = None
        if self._transport is None:
            return
        timeout_s = self._connections.idle_timeout_s
        now = self._loop.time()
        if self._message_started >= 0 and now >= self._message_started + timeout_s:
            self.abort()  # slowloris: the message never completed
            return
        if self._message_started >= 0:  # a message under way: its own deadline governs
            self._arm_timer(self._message_started + timeout_s)
            return
        if self._pending:  # an answer is on its way: idle counts from when it is sent
            self._arm_timer(now + timeout_s)
            return
        deadline = self._last_activity + timeout_s
        if now < deadline:
            self._arm_timer(deadline)
        elif self._transport.get_write_buffer_size():
            self.abort()  # idle with answers the client never read
        else:
            self.close()

    # ---- closing -------------------------------------------------------------------------

    def _close_when_answered(self) -> None:
        if not self._pending:
            self.close()

    def close(self) -> None:
        """Close after the unsent output is flushed (bounded by MAX_UNSENT_BYTES)."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Close at once, dropping unsent output."""
        transport = self._transport
        if transport is not None:
            self._connections.open.pop(self, None)
            transport.abort()


class TcpListener:
    """Accepts on one listening socket by hand, so running out of file descriptors (EMFILE)
    pauses accepting (the kernel's backlog holds new clients meanwhile), sheds the least
    recently active idle connection and resumes after ACCEPT_RETRY_S, under asyncio and
    uvloop alike (uvloop's own server closes the listener on that error)."""

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], TcpConnection],
        connections: TcpConnections,
    ) -> None:
        self._sock = sock
        self._factory = factory
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
            task = self._loop.create_task(self._start(conn))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError:
            conn.close()

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


@dataclass(slots=True)
class _Endpoint:
    """UDP and TCP on one listen address."""

    udp: asyncio.DatagramTransport
    udp_server: UdpServer
    tcp: TcpListener

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


class Listeners:
    """The sockets of one process, by listen address. `rebind` opens new addresses before it
    closes dropped ones; `stop_reading` starts a drain: no new queries, answers still go out."""

    def __init__(self, config: ServerConfig, pipeline: Pipeline, in_flight: InFlight) -> None:
        self._pipeline = pipeline
        self._in_flight = in_flight
        self.connections = TcpConnections(config)
        self.endpoints: dict[HostPort, _Endpoint] = {}

    def are_up(self) -> bool:
        return bool(self.endpoints) and all(
            not endpoint.udp.is_closing() and endpoint.tcp.is_serving()
            for endpoint in self.endpoints.values()
        )

    async def bind(self, addresses: Iterable[HostPort], *, reuse_port: bool) -> None:
        """Open UDP and TCP on each address not yet open; on failure close what this call
        opened and raise SmartDNSError naming the address."""
        loop = asyncio.get_running_loop()
        opened: list[HostPort] = []
        try:
            for address in addresses:
                if address in self.endpoints:
                    continue
                udp_sock = _bound_socket(address, socket.SOCK_DGRAM, reuse_port)
                udp, protocol = await loop.create_datagram_endpoint(
                    lambda: UdpServer(self._pipeline, self._in_flight), sock=udp_sock
                )
                udp_server = protocol
                try:
                    tcp_sock = _bound_socket(address, socket.SOCK_STREAM, reuse_port)
                except BaseException:
                    udp.close()
                    raise
                tcp = TcpListener(tcp_sock, self._new_connection, self.connections)
                self.endpoints[address] = _Endpoint(udp, udp_server, tcp)
                opened.append(address)
        except BaseException:
            self.unbind(opened)
            raise

    async def rebind(self, addresses: tuple[HostPort, ...], *, reuse_port: bool) -> None:
        """Serve exactly `addresses`: new ones first, so a failure leaves the old set intact."""
        await self.bind(addresses, reuse_port=reuse_port)
        self.unbind([address for address in self.endpoints if address not in addresses])

    def unbind(self, addresses: Iterable[HostPort]) -> None:
        for address in list(addresses):
            endpoint = self.endpoints.pop(address, None)
            if endpoint is not None:
                endpoint.close()

    def stop_reading(self) -> None:
        for endpoint in self.endpoints.values():
            endpoint.udp_server.reading = False
            endpoint.tcp.close()

    def close(self) -> None:
        self.unbind(self.endpoints)

    def close_connections(self) -> None:
        self.connections.close_all()

    def _new_connection(self) -> TcpConnection:
        return TcpConnection(self._pipeline, self._in_flight, self.connections)


def _bound_socket(address: HostPort, kind: socket.SocketKind, reuse_port: bool) -> socket.socket:
    sock = socket.socket(address.family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            # SPEC 2: an IPv6 listen address serves IPv6 only; IPv4 needs its own address
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_DGRAM:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        sock.bind((address.host, address.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(TCP_BACKLOG)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        protocol = "UDP" if kind == socket.SOCK_DGRAM else "TCP"
        raise SmartDNSError(f"cannot listen on {address} ({protocol}): {error.strerror}") from None
    return sock


async def start_listeners(
    config: ServerConfig, pipeline: Pipeline, in_flight: InFlight, *, reuse_port: bool
) -> Listeners:
    """Bind UDP and TCP on every listen address; on any failure close what was opened."""
    listeners = Listeners(config, pipeline, in_flight)
    await listeners.bind(config.listen, reuse_port=reuse_port)
    return listeners

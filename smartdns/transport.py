"""UDP endpoints and TCP connections (RFC 7766) on every listen address: bytes in, bytes out.

Each received packet is one call to `Pipeline.handle`, wrapped in the per-packet error
boundary. Forwarded queries run as owned tasks so a drain can wait for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Coroutine
from typing import Any, Final, cast

from smartdns.config import HostPort, ServerConfig
from smartdns.errors import SmartDNSError
from smartdns.metrics import Transport
from smartdns.pipeline import Pipeline

MAX_UDP_QUERY: Final = 4096  # larger datagrams are not queries anyone sends; drop unread
SOCKET_BUFFER_BYTES: Final = 4 * 1024 * 1024  # so a burst queues in the kernel, not on the floor
TCP_BACKLOG: Final = 1024
MAX_UNSENT_BYTES: Final = 256 * 1024  # a TCP client that never reads is disconnected
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
    def __init__(self, pipeline: Pipeline, in_flight: InFlight) -> None:
        self._pipeline = pipeline
        self._in_flight = in_flight
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, so no isinstance check here
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) > MAX_UDP_QUERY or self._transport is None:
            return
        try:
            reply = self._pipeline.handle(data, addr[0], Transport.UDP)
        except Exception as error:
            reply = self._pipeline.fail(data, error, Transport.UDP)
        if reply is None:
            return
        if type(reply) is bytes:
            self._transport.sendto(reply, addr)
            return
        assert not isinstance(reply, bytes)
        self._in_flight.spawn(self._send_later(data, reply, addr))

    async def _send_later(
        self, data: bytes, pending: Coroutine[Any, Any, bytes | None], addr: tuple[Any, ...]
    ) -> None:
        try:
            reply = await pending
        except Exception as error:
            reply = self._pipeline.fail(data, error, Transport.UDP)
        transport = self._transport
        if reply is not None and transport is not None and not transport.is_closing():
            transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        """ICMP errors for earlier replies (client gone): nothing to do."""


class TcpConnections:
    """State shared by the TCP connections of one worker: the cap and the idle timeout."""

    def __init__(self, config: ServerConfig) -> None:
        self.max_connections = config.tcp_max_connections
        self.idle_timeout_s = config.tcp_idle_timeout
        self.open: set[TcpConnection] = set()

    def close_all(self) -> None:
        for connection in list(self.open):
            connection.close()


class TcpConnection(asyncio.Protocol):
    """One client connection: 2-byte length framing, pipelined queries answered as they
    complete (possibly out of order, RFC 7766 §6.2.1.1), closed when idle."""

    def __init__(
        self, pipeline: Pipeline, in_flight: InFlight, connections: TcpConnections
    ) -> None:
        self._pipeline = pipeline
        self._in_flight = in_flight
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._host = ""
        self._buffer = bytearray()
        self._pending = 0
        self._idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)
        if len(self._connections.open) >= self._connections.max_connections:
            stream.abort()
            return
        self._transport = stream
        self._host = stream.get_extra_info("peername")[0]
        self._connections.open.add(self)
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.open.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= _LENGTH:
            length = buffer[0] << 8 | buffer[1]
            if length < 12:  # not even a header: the stream cannot be trusted any more
                self.close()
                return
            if len(buffer) < _LENGTH + length:
                break
            packet = bytes(buffer[_LENGTH : _LENGTH + length])
            del buffer[: _LENGTH + length]
            self._dispatch(packet)
        self._arm_idle_timer()

    def _dispatch(self, packet: bytes) -> None:
        try:
            reply = self._pipeline.handle(packet, self._host, Transport.TCP)
        except Exception as error:
            reply = self._pipeline.fail(packet, error, Transport.TCP)
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
            reply = self._pipeline.fail(packet, error, Transport.TCP)
        finally:
            self._pending -= 1
        if reply is not None:
            self._write(reply)

    def _write(self, reply: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(len(reply).to_bytes(2, "big") + reply)
        if transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
            transport.abort()

    def _arm_idle_timer(self) -> None:
        if self._transport is None:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self._connections.idle_timeout_s, self._on_idle)

    def _on_idle(self) -> None:
        if self._pending:  # an answer is still on its way; idle counts from when it is sent
            self._arm_idle_timer()
        else:
            self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class Listeners:
    """The sockets of one worker; `close` stops reading everywhere at once."""

    def __init__(self) -> None:
        self.udp: list[asyncio.DatagramTransport] = []
        self.tcp: list[asyncio.Server] = []
        self.tcp_connections: list[TcpConnections] = []

    def close(self) -> None:
        for transport in self.udp:
            transport.close()
        for server in self.tcp:
            server.close()

    def close_connections(self) -> None:
        for connections in self.tcp_connections:
            connections.close_all()


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
    loop = asyncio.get_running_loop()
    listeners = Listeners()
    connections = TcpConnections(config)
    listeners.tcp_connections.append(connections)
    try:
        for address in config.listen:
            udp_sock = _bound_socket(address, socket.SOCK_DGRAM, reuse_port)
            udp, _ = await loop.create_datagram_endpoint(
                lambda: UdpServer(pipeline, in_flight), sock=udp_sock
            )
            listeners.udp.append(udp)
            tcp_sock = _bound_socket(address, socket.SOCK_STREAM, reuse_port)
            server = await loop.create_server(
                lambda: TcpConnection(pipeline, in_flight, connections), sock=tcp_sock
            )
            listeners.tcp.append(server)
    except BaseException:
        listeners.close()
        raise
    return listeners

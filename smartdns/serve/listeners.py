"""The sockets of one process: UDP and TCP bound on every listen address, rebinding on
reload, the drain (stop reading, answers still go out), and InFlight, the owner of the
forwarding tasks that a drain waits for.

Binding errors become SmartDNSError naming the address; nothing here reads a packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Final

from smartdns.config.model import HostPort, ServerConfig
from smartdns.errors import SmartDNSError
from smartdns.serve.connections import Connections
from smartdns.serve.pipeline import Pipeline
from smartdns.serve.tcp import TcpConnection, TcpListener, plain
from smartdns.serve.udp import UdpServer

SOCKET_BUFFER_BYTES: Final = 4 * 1024 * 1024  # so a burst queues in the kernel, not on the floor
TCP_BACKLOG: Final = 1024


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
        self.connections = Connections(config.tcp_max_connections, config.tcp_idle_timeout)
        self.endpoints: dict[HostPort, _Endpoint] = {}

    def are_up(self) -> bool:
        return bool(self.endpoints) and all(
            not endpoint.udp.is_closing() and endpoint.tcp.is_serving()
            for endpoint in self.endpoints.values()
        )

    async def bind(self, addresses: Iterable[HostPort], *, reuse_port: bool) -> None:
        """Open UDP and TCP on each address not yet open; on failure close what this call
        opened and raise SmartDNSError naming the address."""
        opened: list[HostPort] = []
        try:
            for address in addresses:
                if address not in self.endpoints:
                    self.endpoints[address] = await self._open(address, reuse_port)
                    opened.append(address)
        except BaseException:
            self.unbind(opened)
            raise

    async def _open(self, address: HostPort, reuse_port: bool) -> _Endpoint:
        udp_sock = bound_socket(address, socket.SOCK_DGRAM, reuse_port)
        udp, udp_server = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: UdpServer(self._pipeline, self._in_flight.spawn), sock=udp_sock
        )
        try:
            tcp_sock = bound_socket(address, socket.SOCK_STREAM, reuse_port)
        except BaseException:
            udp.close()
            raise
        return _Endpoint(
            udp, udp_server, TcpListener(tcp_sock, plain(self._new_connection), self.connections)
        )

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
        return TcpConnection(self._pipeline, self._in_flight.spawn, self.connections)


def bound_socket(address: HostPort, kind: socket.SocketKind, reuse_port: bool) -> socket.socket:
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

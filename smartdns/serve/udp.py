"""DNS over UDP: one asyncio datagram protocol per socket; each datagram is one call to
`Pipeline.handle`, inside the per-packet error boundary.

Owns no limits of its own beyond the query size: the peer it builds (`core.peer.udp_peer`)
tells the pipeline that rate limits and the UDP reply size apply. Nothing here logs a peer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Final, cast

from smartdns.core.peer import Peer, udp_peer
from smartdns.serve.pipeline import Pipeline

MAX_UDP_QUERY: Final = 4096  # larger datagrams are not queries anyone sends; drop unread


class UdpServer(asyncio.DatagramProtocol):
    """One UDP socket. `reading` goes False on drain: new datagrams are ignored while the
    socket stays open for the answers still in flight."""

    def __init__(
        self, pipeline: Pipeline, spawn: Callable[[Coroutine[Any, Any, None]], None]
    ) -> None:
        self._pipeline = pipeline
        self._spawn = spawn  # owner of the forwarding tasks, so a drain can wait for them
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
        self._spawn(self._send_later(data, reply, peer, addr))

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

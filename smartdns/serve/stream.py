"""What every connection protocol under `serve.connections`' cap shares (TCP, DoT, DoH): its
admission when the connection is made, the peer built once from the socket and the TLS
handshake, one timer, and closing.

No protocol of its own: subclasses read and write; nothing here logs a peer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, cast

from smartdns.core.counters import Transport
from smartdns.core.peer import Peer, stream_peer
from smartdns.serve.connections import Connections
from smartdns.serve.pipeline import Pipeline
from smartdns.serve.tls import device_of


class StreamConnection(asyncio.Protocol):
    """One client connection under the cap. A subclass calls `_admit` from connection_made
    (None: refused at the cap, already aborted) and implements `is_idle` and `_on_timer`."""

    def __init__(
        self,
        pipeline: Pipeline,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        connections: Connections,
        kind: Transport,
    ) -> None:
        self.kind = kind
        self._pipeline = pipeline
        self._spawn = spawn  # owner of the forwarding tasks, so a drain can wait for them
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._peer: Peer = stream_peer("", kind)  # until connection_made names the client
        self._timer: asyncio.TimerHandle | None = None

    def _admit(self, transport: asyncio.BaseTransport) -> asyncio.Transport | None:
        """Take the connection under the cap and build its peer: the source address, and
        the device ID the TLS server name named, if any (SPEC 2a)."""
        stream = cast(asyncio.Transport, transport)
        if not self._connections.admit(self):
            stream.abort()
            return None
        self._transport = stream
        device = device_of(stream.get_extra_info("ssl_object"))
        self._peer = stream_peer(stream.get_extra_info("peername")[0], self.kind, device)
        self._arm_timer(self._loop.time() + self._connections.idle_timeout_s)
        return stream

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None

    def _arm_timer(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def is_idle(self, now: float) -> bool:
        """Nothing in progress and nothing unsent: shedding it loses no answer."""
        raise NotImplementedError

    def _on_timer(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Close after the unsent output is flushed (bounded by serve.tcp.MAX_UNSENT_BYTES)."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Close at once, dropping unsent output."""
        transport = self._transport
        if transport is not None:
            self._connections.forget(self)
            transport.abort()

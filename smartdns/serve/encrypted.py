"""The accept path of DoT and DoH listeners (SPEC 2a): per-source handshake rate limit and
the worker's connection cap, both before the TLS handshake, then the handshake bounded by
`encrypted.handshake_timeout`, then the transport's protocol.

A transport plugs in with its protocol factory: `TlsAccept(contexts.contexts[Transport.DOH],
factory, ...)` where `factory()` returns an asyncio protocol that follows
`serve.connections.Connections` (admit in connection_made, touch on activity, forget in
connection_lost; `kind`, `is_idle`, `abort`, `close`) and reads the device ID the handshake
named with `serve.tls.device_of(transport.get_extra_info("ssl_object"))`. DoT's is
`serve.tcp.TcpConnection` with kind Transport.DOT. No peer detail is kept or logged: a failed
handshake is only counted.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from typing import Final

from smartdns.core.clients import source_address
from smartdns.core.counters import Handshake
from smartdns.core.ratelimit import RateLimiter
from smartdns.serve.connections import Connections

# Per source bucket (IPv4 address, IPv6 /56) and worker. A resuming client costs one
# handshake per connection, and a household or a carrier-grade NAT shares a bucket, so the
# rate is generous; it bounds what one source can make a worker spend on key exchanges.
HANDSHAKES_PER_S: Final = 20.0
HANDSHAKE_BURST: Final = 100


class Handshakes:
    """The handshake rate limit and outcome counts of one worker, shared by its DoT and DoH
    listeners (the limiter keeps no address: keyed-hash buckets, core.ratelimit)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.limiter = RateLimiter(HANDSHAKES_PER_S, HANDSHAKE_BURST)
        self.outcomes: Counter[Handshake] = Counter()


class TlsAccept:
    """Turns an accepted socket into a TLS connection of one transport (`serve.tcp.Accepted`
    for `serve.tcp.TcpListener`'s accept loop)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        factory: Callable[[], asyncio.Protocol],
        connections: Connections,
        handshakes: Handshakes,
    ) -> None:
        self._context = context
        self._factory = factory
        self._connections = connections
        self._handshakes = handshakes

    async def __call__(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        handshakes, connections = self._handshakes, self._connections
        try:
            host = conn.getpeername()[0]
        except OSError:  # the client is gone already
            conn.close()
            return
        started = loop.time()
        if not handshakes.limiter.allow(source_address(host), started):
            handshakes.outcomes[Handshake.RATE_LIMITED] += 1
            conn.close()
            return
        if not connections.has_room():
            conn.close()
            return
        connections.starting += 1
        try:
            await loop.connect_accepted_socket(
                self._factory,
                conn,
                ssl=self._context,
                ssl_handshake_timeout=handshakes.timeout_s,
            )
        except OSError:  # ssl.SSLError, a reset, or the timeout's ConnectionAbortedError
            timed_out = loop.time() - started >= handshakes.timeout_s
            handshakes.outcomes[Handshake.TIMEOUT if timed_out else Handshake.FAILED] += 1
            conn.close()
        except BaseException:
            conn.close()
            raise
        else:
            handshakes.outcomes[Handshake.OK] += 1
        finally:
            connections.starting -= 1

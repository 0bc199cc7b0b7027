"""DoT and DoH listeners (SPEC 2a): their sockets, and the accept path of each: per-source
handshake rate limit and the worker's connection cap, both before the TLS handshake, then
the handshake bounded by `encrypted.handshake_timeout`, then the transport's protocol.

A transport plugs in with its protocol class in PROTOCOLS, called as
`(pipeline, spawn, connections)`: an asyncio protocol that follows
`serve.connections.Connections` (admit in connection_made, touch on activity, forget in
connection_lost; `kind`, `is_idle`, `abort`, `close`) and reads the device ID the handshake
named with `serve.tls.device_of(transport.get_extra_info("ssl_object"))`. DoT's is
`serve.tcp.TcpConnection` with kind Transport.DOT; DoH's `serve.doh.DohConnection` (whose
device ID is its request path's, else the handshake's). No peer detail is kept or logged: a failed
handshake is only counted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Final

from smartdns.config.model import EncryptedConfig, HostPort
from smartdns.core.clients import source_address
from smartdns.core.counters import Handshake, Transport
from smartdns.core.ratelimit import RateLimiter
from smartdns.errors import SmartDNSError
from smartdns.serve.connections import Connections
from smartdns.serve.doh import DohConnection
from smartdns.serve.listeners import bound_socket
from smartdns.serve.pipeline import Pipeline
from smartdns.serve.tcp import TcpConnection, TcpListener
from smartdns.serve.tls import TlsContexts

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], None]

# Per source bucket (IPv4 address, IPv6 /56) and worker. Generous: a household, an office or
# a carrier-grade NAT address shares a bucket, and a resuming client still costs a handshake
# per connection; it bounds what one source can make a worker spend on key exchanges: a DoT
# connection (handshake, one query, teardown) measured 1.2-1.3 ms of worker CPU, resumed
# 1.1 ms, so one source gets at most about 7 % of a worker after its burst.
HANDSHAKES_PER_S: Final = 50.0
HANDSHAKE_BURST: Final = 250


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


ConnectionMaker = Callable[[Pipeline, Spawn, Connections], asyncio.Protocol]
"""A transport's protocol class: (pipeline, owner of forwarding tasks, the cap) → protocol."""

# The protocol of each encrypted transport; a transport without one is not bound.
PROTOCOLS: Final[Mapping[Transport, ConnectionMaker]] = {
    Transport.DOT: functools.partial(TcpConnection, kind=Transport.DOT),
    Transport.DOH: DohConnection,
}


class EncryptedListeners:
    """The DoT and DoH listening sockets of one process, their TLS contexts, their shared
    connection cap and handshake limiter. Like `Listeners`: `rebind` opens new addresses
    before it closes dropped ones, `stop_reading` starts a drain."""

    def __init__(
        self, encrypted: EncryptedConfig, idle_timeout_s: float, pipeline: Pipeline, spawn: Spawn
    ) -> None:
        """Load the certificate pair; SmartDNSError when it cannot be loaded."""
        try:
            self.contexts = TlsContexts(
                encrypted.server_name, encrypted.cert_file, encrypted.key_file
            )
        except (ssl.SSLError, OSError) as error:
            raise SmartDNSError(f"cannot load the certificate pair: {_reason(error)}") from None
        self.not_after = encrypted.not_after
        self.connections = Connections(encrypted.max_connections, idle_timeout_s)
        self.handshakes = Handshakes(encrypted.handshake_timeout)
        self._pipeline = pipeline
        self._spawn = spawn
        self.endpoints: dict[tuple[Transport, HostPort], TcpListener] = {}

    def are_up(self) -> bool:
        return all(listener.is_serving() for listener in self.endpoints.values())

    def bind(self, encrypted: EncryptedConfig, *, reuse_port: bool) -> None:
        """Listen on each address of `encrypted` not yet open; on failure close what this
        call opened and raise SmartDNSError naming the address."""
        opened: list[tuple[Transport, HostPort]] = []
        try:
            for key in _addresses(encrypted):
                if key not in self.endpoints:
                    self.endpoints[key] = self._open(*key, reuse_port)
                    opened.append(key)
        except BaseException:
            self._unbind(opened)
            raise

    def _open(self, transport: Transport, address: HostPort, reuse_port: bool) -> TcpListener:
        make = PROTOCOLS[transport]
        accept = TlsAccept(
            self.contexts.contexts[transport],
            lambda: make(self._pipeline, self._spawn, self.connections),
            self.connections,
            self.handshakes,
        )
        sock = bound_socket(address, socket.SOCK_STREAM, reuse_port)
        return TcpListener(sock, accept, self.connections)

    def rebind(self, encrypted: EncryptedConfig, *, reuse_port: bool) -> None:
        """Serve exactly `encrypted`'s addresses (new ones first, so a taken port changes
        nothing), with its limits for new connections and its certificate pair for new
        handshakes. A pair that does not load keeps the running one, logged: the pair was
        checked by load_config, so only a file changed since gets here."""
        self.bind(encrypted, reuse_port=reuse_port)
        self._unbind([key for key in self.endpoints if key not in _addresses(encrypted)])
        self.connections.max_connections = encrypted.max_connections
        self.handshakes.timeout_s = encrypted.handshake_timeout
        try:
            self.contexts.load(encrypted.server_name, encrypted.cert_file, encrypted.key_file)
        except (ssl.SSLError, OSError) as error:
            log.error(
                "keeping the running certificate: cannot load the new pair: %s", _reason(error)
            )
            return
        self.not_after = encrypted.not_after

    def _unbind(self, keys: Iterable[tuple[Transport, HostPort]]) -> None:
        for key in list(keys):
            listener = self.endpoints.pop(key, None)
            if listener is not None:
                listener.close()

    def stop_reading(self) -> None:
        """No new connections; open ones keep being answered until closed."""
        self._unbind(self.endpoints)

    def close_connections(self) -> None:
        self.connections.close_all()


def _addresses(encrypted: EncryptedConfig) -> list[tuple[Transport, HostPort]]:
    listen = {Transport.DOT: encrypted.dot_listen, Transport.DOH: encrypted.doh_listen}
    return [
        (transport, address)
        for transport, addresses in listen.items()
        if transport in PROTOCOLS
        for address in addresses
    ]


def _reason(error: ssl.SSLError | OSError) -> str:
    """OpenSSL's reason (`KEY_VALUES_MISMATCH`) or the file error; never key material."""
    if isinstance(error, ssl.SSLError):
        return str(error.reason or error)
    return f"{error.filename}: {error.strerror or error}"

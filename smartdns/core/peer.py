"""The peer of a query: who sent it, over what, and what that transport imposes on the reply.

Pure; no I/O. Transports build a `Peer` and the query path reads its fields instead of
asking which transport it was: a new transport (DoT, DoH) is a new constructor, not a branch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Final

from smartdns.core.clients import source_address
from smartdns.core.counters import Transport
from smartdns.core.wire import MAX_MESSAGE_SIZE

_UDP_PEERS: Final = 4096  # recent UDP sources whose Peer is reused


@dataclass(frozen=True, slots=True)
class Peer:
    """`host`: the source address as the socket layer reports it (text).

    `reply_limit`: the largest reply the transport carries; None means the query's own UDP
    limit applies (its EDNS size or 512, capped by server.edns_udp_size), decided per query.
    `spoofable`: the source address could be forged (UDP), so rate limits and the
    anti-reflection rules apply; a connection's source is proven by its handshake.
    `address`: `host` packed once here (clients.source_address), for authorization and the
    rate limits, so no query parses the text again.
    `device`: the SHA-256 digest of the device ID the client named (a DoT server name's
    first label, a DoH path segment; SPEC 2a), or None when it named none. A peer that
    named one is authorized by that ID alone, never by its address.
    `encrypted`: the transport is encrypted (DoT, DoH), so a query carrying the EDNS Padding
    option gets a padded reply (RFC 8467); a cleartext reply is never padded.
    """

    host: str
    transport: Transport
    reply_limit: int | None
    spoofable: bool
    device: bytes | None = None
    encrypted: bool = False
    address: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", source_address(self.host))


# A frozen dataclass costs ~0.5 µs to build (object.__setattr__ per field); a hit here costs
# ~40 ns. Bounded, so a flood of forged sources only evicts.
@functools.lru_cache(maxsize=_UDP_PEERS)
def udp_peer(host: str) -> Peer:
    """The peer of a datagram from `host`."""
    return Peer(host, Transport.UDP, None, True)


def stream_peer(
    host: str, transport: Transport = Transport.TCP, device: bytes | None = None
) -> Peer:
    """The peer of a connection or an encrypted request (TCP, DoT, DoH): never rate limited
    by address (its source is proven by the handshake), replies up to MAX_MESSAGE_SIZE;
    `device` as in Peer."""
    encrypted = transport is not Transport.TCP
    return Peer(host, transport, MAX_MESSAGE_SIZE, False, device, encrypted)

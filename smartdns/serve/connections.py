"""The connection cap of one worker, shared by the connections it covers (plain TCP; DoT and
DoH together): open connections in order of last activity, and shedding of the least
recently active idle one when the cap is reached (RFC 7766 §10).

No I/O of its own beyond closing the connections it sheds; nothing here knows a peer.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Protocol

from smartdns.core.counters import Transport


class Connection(Protocol):
    """What the cap needs of a connection's protocol (TCP, DoT, DoH)."""

    @property
    def kind(self) -> Transport:
        """The transport it serves, for the counters."""
        ...

    def is_idle(self, now: float) -> bool:
        """Nothing in progress and nothing unsent: shedding it loses no answer."""
        ...

    def abort(self) -> None:
        """Close at once, dropping unsent output."""
        ...

    def close(self) -> None:
        """Close after the unsent output is flushed."""
        ...


class Connections:
    """The open connections under one cap, oldest activity first.

    A protocol calls `admit(self)` in connection_made (False: it was refused, abort), `touch`
    on every query or answer, and `forget(self)` in connection_lost. An accept loop that does
    work before a connection is made (a TLS handshake) reserves room first with `has_room`
    and counts the work in progress in `starting`, so handshakes count against the cap too.
    """

    def __init__(self, max_connections: int, idle_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.open: dict[Connection, None] = {}
        self.starting = 0  # accepted, not yet a connection (TLS handshakes in progress)
        self.accepted: Counter[Transport] = Counter()  # connections admitted
        self.shed: Counter[Transport] = Counter()  # idle ones closed to make room
        self.refused = 0  # new connections closed at once: full of busy connections

    def open_by_kind(self) -> Counter[Transport]:
        return Counter(connection.kind for connection in self.open)

    def has_room(self) -> bool:
        """Room for one more, counting the ones starting; at the cap the least recently
        active idle connection is shed to make it. False (and counted refused): all busy."""
        if len(self.open) + self.starting < self.max_connections or self.shed_idle():
            return True
        self.refused += 1
        return False

    def admit(self, connection: Connection) -> bool:
        """Add `connection` as the most recently active one, shedding an idle one at the
        cap; False (counted refused) when every open connection is busy."""
        if len(self.open) >= self.max_connections and not self.shed_idle():
            self.refused += 1
            return False
        self.open[connection] = None
        self.accepted[connection.kind] += 1
        return True

    def forget(self, connection: Connection) -> None:
        self.open.pop(connection, None)

    def touch(self, connection: Connection) -> None:
        """`connection` was active: move it to the young end."""
        if connection in self.open:
            del self.open[connection]
            self.open[connection] = None

    def shed_idle(self) -> bool:
        """Close the least recently active idle connection; False when none is idle."""
        now = asyncio.get_running_loop().time()
        for connection in self.open:
            if connection.is_idle(now):
                self.open.pop(connection)
                connection.abort()
                self.shed[connection.kind] += 1
                return True
        return False

    def close_all(self) -> None:
        for connection in list(self.open):
            connection.close()

"""Tests for smartdns.serve.connections: the cap, handshakes counted against it, and shedding
the least recently active idle connection."""

from __future__ import annotations

from smartdns.core.counters import Transport
from smartdns.serve.connections import Connections


class FakeConnection:
    """A connection that is idle or busy as told, and records being closed."""

    def __init__(self, kind: Transport, *, idle: bool = True) -> None:
        self.kind = kind
        self.idle = idle
        self.aborted = False

    def is_idle(self, now: float) -> bool:
        return self.idle

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True


async def test_at_the_cap_the_least_recently_active_idle_one_is_shed() -> None:
    connections = Connections(max_connections=3, idle_timeout_s=10)
    first, second, third = (FakeConnection(Transport.DOT) for _ in range(3))
    second.kind = Transport.DOH
    for connection in (first, second, third):
        assert connections.admit(connection)
    connections.touch(first)  # second is now the least recently active
    newcomer = FakeConnection(Transport.DOT)
    assert connections.admit(newcomer)
    assert second.aborted and not first.aborted
    assert list(connections.open) == [third, first, newcomer]
    assert connections.shed == {Transport.DOH: 1}
    assert connections.accepted == {Transport.DOT: 3, Transport.DOH: 1}
    assert connections.open_by_kind() == {Transport.DOT: 3}


async def test_busy_connections_are_kept_and_the_newcomer_refused() -> None:
    connections = Connections(max_connections=1, idle_timeout_s=10)
    busy = FakeConnection(Transport.TCP, idle=False)
    assert connections.admit(busy)
    assert not connections.admit(FakeConnection(Transport.TCP))
    assert not connections.has_room()
    assert connections.refused == 2 and not busy.aborted


async def test_handshakes_in_progress_count_against_the_cap() -> None:
    connections = Connections(max_connections=2, idle_timeout_s=10)
    assert connections.admit(FakeConnection(Transport.DOT, idle=False))
    assert connections.has_room()
    connections.starting += 1
    assert not connections.has_room()
    connections.starting -= 1
    assert connections.has_room()


async def test_forget_and_close_all() -> None:
    connections = Connections(max_connections=2, idle_timeout_s=10)
    kept, gone = FakeConnection(Transport.TCP), FakeConnection(Transport.TCP)
    connections.admit(kept)
    connections.admit(gone)
    connections.forget(gone)
    connections.close_all()
    assert kept.aborted and not gone.aborted

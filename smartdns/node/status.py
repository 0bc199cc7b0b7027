"""NodeStatus: what the sync API reads from the node (registrations.sources.sync_api.Node):
`/healthz` and the `/metrics` page, from the query side's statistics and the DNS side's
store connection. The sync API imports nothing of `node`; the daemon hands it this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Final, Protocol

from smartdns.core.counters import Metrics
from smartdns.node.metrics import (
    CONTENT_TYPE,
    CacheStatsLike,
    ForwarderStatsLike,
    RegistrationStatsLike,
    WorkerSample,
    render,
)
from smartdns.registrations.store import DatabaseError, RegistrationStore

PROBE_S: Final = 2.0  # a database probe for /healthz or /metrics


class QuerySide(Protocol):
    """The DNS side's state as the node runs it (in this process, or in worker processes)."""

    def listeners_up(self) -> bool: ...

    def forwarder_stats(self) -> ForwarderStatsLike | None: ...

    def cache_stats(self) -> CacheStatsLike | None: ...

    def worker_samples(self) -> Sequence[WorkerSample]:
        """Per-worker series; empty when DNS runs in this process."""
        ...


class NodeStatus:
    """Health and metrics, read at request time; database probes bounded by `probe_s`."""

    def __init__(
        self, store: RegistrationStore, metrics: Metrics, side: QuerySide, probe_s: float = PROBE_S
    ) -> None:
        self._store = store  # the DNS side's connection: it is the one that must answer
        self._metrics = metrics
        self._side = side
        self._probe_s = probe_s

    async def healthy(self) -> bool:
        """DNS listeners up and the database answering (it reads a row of the file: SELECT 1
        would succeed without touching it)."""
        if not self._side.listeners_up():
            return False
        try:
            async with asyncio.timeout(self._probe_s):
                await self._store.generation()
        except (DatabaseError, TimeoutError):
            return False
        return True

    async def metrics_page(self) -> tuple[str, str]:
        """(content type, Prometheus text); without registration counts when the database
        does not answer in time."""
        registrations: RegistrationStatsLike | None = None
        try:
            async with asyncio.timeout(self._probe_s):
                registrations = await self._store.status()
        except (DatabaseError, TimeoutError):
            pass
        side = self._side
        text = render(
            self._metrics,
            forwarder=side.forwarder_stats(),
            cache=side.cache_stats(),
            registrations=registrations,
            database_up=registrations is not None,
            workers=side.worker_samples(),
        )
        return CONTENT_TYPE, text

"""NodeStatus: what the sync API needs of the node (registrations.sources.sync_api.Node):
`/healthz` and the `/metrics` page, from the query side's statistics, the DNS side's store
connection and the feed's state; and ReadYourWrites, the writer's announcement: a write
returns once DNS applied it. The sync API imports nothing of `node`; the daemon hands it this.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

from smartdns import logs
from smartdns.core.counters import Metrics
from smartdns.errors import SmartDNSError
from smartdns.node.metrics import (
    CONTENT_TYPE,
    CacheStatsLike,
    DdnsSample,
    ForwarderStatsLike,
    RegistrationStatsLike,
    TlsSample,
    WorkerSample,
    render,
    render_feed,
)
from smartdns.registrations.sources.feed import FeedState
from smartdns.registrations.store import DatabaseError
from smartdns.registrations.store.readers import Readers
from smartdns.registrations.writer import NotInEffect

PROBE_S: Final = 2.0  # a database probe for /healthz or /metrics
APPLY_TIMEOUT_S: Final = 1.0  # SPEC 4: a worker confirms a write within a second
# A snapshot is a full load in every worker (a million entries take a few seconds there).
FULL_LOAD_TIMEOUT_S: Final = 30.0

log = logging.getLogger(__name__)

# Waits until every DNS process applied the write at `generation`, at most `timeout_s`.
Applier = Callable[[int, float], Awaitable[None]]


class QuerySide(Protocol):
    """The DNS side's state as the node runs it (in this process, or in worker processes)."""

    def listeners_up(self) -> bool: ...

    def forwarder_stats(self) -> ForwarderStatsLike | None: ...

    def cache_stats(self) -> CacheStatsLike | None: ...

    def worker_samples(self) -> Sequence[WorkerSample]:
        """Per-worker series; empty when DNS runs in this process."""
        ...

    def tls_sample(self) -> TlsSample | None:
        """DoT and DoH figures; None when `encrypted` is off."""
        ...


class ReadYourWrites:
    """The announcement of the node's writer (writer.Announce): a write returns once every DNS
    process applied it (SPEC 4). A worker process that does not confirm in time is counted,
    killed and gone when the applier returns (a new one loads everything before it answers),
    so the write is in effect then too. When the DNS side in this process did not apply it
    in time (`workers: 1`: nothing to restart), the applier raises: logged here, and raised
    as NotInEffect (the sync API's 503), since a 200 would say what is not true yet."""

    def __init__(self, applier: Applier) -> None:
        self._applier = applier
        self._apply_errors = logs.WarnOnce(
            __name__, "a registration change was stored but not confirmed by the DNS side"
        )

    async def announce(self, generation: int, everything: bool) -> None:
        timeout_s = FULL_LOAD_TIMEOUT_S if everything else APPLY_TIMEOUT_S
        try:
            await self._applier(generation, timeout_s)
        except (SmartDNSError, TimeoutError) as error:
            self._apply_errors.warn(type(error).__name__)
            raise NotInEffect(
                "stored, but not in DNS answers yet: repeat the write (it is a no-op that"
                " answers 200 once the change is in effect)"
            ) from None


class NodeStatus:
    """Health and metrics, read at request time; database probes bounded by `probe_s`."""

    def __init__(
        self,
        readers: Readers,
        metrics: Metrics,
        side: QuerySide,
        probe_s: float = PROBE_S,
        ddns: Callable[[], DdnsSample | None] = lambda: None,
        feed: FeedState | None = None,
    ) -> None:
        """`feed`: the state of the feed the node follows, None without one."""
        self._readers = readers  # on the DNS side's connection: the one that must answer
        self._metrics = metrics
        self._side = side
        self._probe_s = probe_s
        self._ddns = ddns
        self._feed = feed

    def is_degraded(self) -> bool:
        feed = self._feed
        return feed is not None and not (feed.connected and feed.caught_up)

    async def healthy(self) -> bool:
        """DNS listeners up and the database answering (it reads a row of the file: SELECT 1
        would succeed without touching it)."""
        if not self._side.listeners_up():
            return False
        try:
            async with asyncio.timeout(self._probe_s):
                await self._readers.generation()
        except (DatabaseError, TimeoutError):
            return False
        return True

    async def metrics_page(self) -> tuple[str, str]:
        """(content type, Prometheus text); without registration counts when the database
        does not answer in time; with the feed's state when the node follows one."""
        registrations: RegistrationStatsLike | None = None
        try:
            async with asyncio.timeout(self._probe_s):
                registrations = await self._readers.status()
        except (DatabaseError, TimeoutError):
            pass
        side = self._side
        text = render(
            self._metrics,
            forwarder=side.forwarder_stats(),
            cache=side.cache_stats(),
            registrations=registrations,
            database_up=registrations is not None,
            # What healthy() decides, from this page's own database probe (a scrape that
            # finds the node not ready pages someone: monitoring/alerts.yml).
            ready=side.listeners_up() and registrations is not None,
            workers=side.worker_samples(),
            ddns=self._ddns(),
            tls=side.tls_sample(),
        )
        if self._feed is not None:
            text += render_feed(self._feed)
        return CONTENT_TYPE, text

"""The lifecycle components both process kinds share: the registration database, the pruning
of removed entries, the systemd watchdog and notifications, the registration sink (with the
feed's follower when `feed` is configured) and the sync API. The daemon puts them in order.

Nothing here sees a query; each component owns the tasks it starts.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final

from smartdns.config.model import Config, HostPort
from smartdns.core.counters import Metrics
from smartdns.errors import SmartDNSError
from smartdns.logs import WarnOnce
from smartdns.node import systemd
from smartdns.node.lifecycle import Component
from smartdns.registrations.sink import RegistrationSink
from smartdns.registrations.sources.feed import Feed, FeedState
from smartdns.registrations.sources.feed_sink import BucketSink
from smartdns.registrations.sources.sync_api import Node, SyncServer, start_sync_api
from smartdns.registrations.store import DatabaseError, RegistrationStore
from smartdns.registrations.writer import Announce, RegistrationWriter

log = logging.getLogger(__name__)

# A removed entry is kept this long after its write, for DNS processes catching up by what
# changed (they apply within a second; a full load of a million entries takes a few seconds);
# a process further behind loads everything.
KEEP_REMOVED_S: Final = 60.0
PRUNE_INTERVAL_S: Final = 5.0


class Database(Component):
    """The DNS side's connection to the registration database; it must exist (fail closed:
    a node never starts with an empty registration set because a path was wrong)."""

    name = "registration database"

    def __init__(self) -> None:
        self._store: RegistrationStore | None = None
        self._path: Path | None = None

    @property
    def store(self) -> RegistrationStore:
        """The open store; only components started after this one read it."""
        if self._store is None:
            raise RuntimeError("the registration database is not open")
        return self._store

    async def start(self, config: Config) -> None:
        self._path = config.database.path
        self._store = await RegistrationStore.open(self._path, create=False)

    async def reload(self, config: Config) -> None:
        if config.database.path != self._path:
            log.warning("database.path changed: restart smartdns to apply it")

    async def stop(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            await store.close()


class RemovedEntriesPruner(Component):
    """Forgets the entries writes took away once every DNS process has had KEEP_REMOVED_S to
    apply them, and all of them at start and at stop (no reader is behind then): the
    database never keeps an address for longer than that after its removal (SPEC 7). One
    per node, in the process that owns the sync API; started before any DNS process loads.

    The rounds in between write through the registration sink's connection, in turn with
    the node's other writes. On a connection of their own they waited in SQLite's busy
    handler for the write lock, which a steady stream of sync writes hardly ever leaves
    free: up to its 5 s timeout ("database is locked"), holding the DNS side's connection
    all the while, so the DNS side could not read the writes it was asked to confirm."""

    name = "removed-entry pruning"

    def __init__(self, database: Database, sinks: SinkService) -> None:
        self._database = database
        self._sinks = sinks
        self._task: asyncio.Task[None] | None = None
        self._failures = WarnOnce(
            __name__, "cannot prune removed registration entries; they are kept until it works"
        )

    async def start(self, config: Config) -> None:
        # No writer of this process runs yet: the sink starts later and stops earlier.
        await self._database.store.database.forget_removed()
        self._task = asyncio.get_running_loop().create_task(self._prune_periodically())

    async def stop(self) -> None:
        await cancel_tasks(self._task)
        self._task = None
        await self._database.store.database.forget_removed()

    async def _prune_periodically(self) -> None:
        loop = asyncio.get_running_loop()
        seen: deque[tuple[float, int]] = deque()  # (when, generation then), oldest first
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_S)
            store = self._sinks.running_store
            if store is None:  # the sink is not started yet: nothing of this node writes
                continue
            try:
                now = loop.time()
                seen.append((now, await store.readers.generation()))
                through = None
                while seen and now - seen[0][0] >= KEEP_REMOVED_S:
                    through = seen.popleft()[1]
                if through is not None:
                    await store.database.forget_removed(through)
            except SmartDNSError as error:  # the next round prunes through a later generation
                self._failures.warn(type(error).__name__)


class Watchdog(Component):
    """WATCHDOG=1 while `healthy()`, from start until stopped; early in the order so the
    pings go on while later components drain."""

    name = "systemd watchdog"

    def __init__(self, healthy: Callable[[], bool]) -> None:
        self._healthy = healthy
        self._task: asyncio.Task[None] | None = None

    async def start(self, config: Config) -> None:
        self._task = systemd.keep_watchdog(self._healthy)

    async def stop(self) -> None:
        await cancel_tasks(self._task)
        self._task = None


class SinkService(Component):
    """The node's one write path, once per node (where writes are owned, never in a worker):
    a store connection of its own (so the DNS side's change polling never waits behind a long
    write) and the RegistrationWriter on it, announcing through `announce`; with `feed`, the
    feed too: it follows the bucket through that writer (its task is this component's) and
    `sink` writes to the bucket. Started before the DDNS refresher and the sync API, which
    write through `sink`, and so stopped after them."""

    name = "registration sink"

    def __init__(self, announce: Announce) -> None:
        self._announce = announce
        self._store: RegistrationStore | None = None
        self._writer: RegistrationWriter | None = None
        self._sink: RegistrationSink | None = None
        self._feed: Feed | None = None
        self._task: asyncio.Task[None] | None = None
        self._feed_config: object = None

    @property
    def sink(self) -> RegistrationSink:
        """Where registration changes go; only components started after this one write."""
        if self._sink is None:
            raise RuntimeError("the registration sink is not started")
        return self._sink

    @property
    def store(self) -> RegistrationStore:
        """The connection `sink` writes through: read-your-writes reads go here too."""
        if self._store is None:
            raise RuntimeError("the registration sink is not started")
        return self._store

    @property
    def running_store(self) -> RegistrationStore | None:
        """`store` while started, else None: for the removed-entry pruner, which starts
        before this component and stops after it."""
        return self._store

    @property
    def feed_state(self) -> FeedState | None:
        """The followed feed's state for /healthz and /metrics; None without a feed."""
        return None if self._feed is None else self._feed.state

    async def start(self, config: Config) -> None:
        self._store = store = await RegistrationStore.open(config.database.path, create=False)
        try:  # what start opened it closes itself (lifecycle.Component)
            writer = RegistrationWriter(store, config.registrations, self._announce)
            self._writer = self._sink = writer
            self._feed_config = config.feed
            if config.feed is not None:
                self._feed = Feed(config.feed, writer, config.registrations)
                self._sink = BucketSink(self._feed, writer, store)
                self._task = asyncio.get_running_loop().create_task(self._feed.run(), name="feed")
        except BaseException:
            await self.stop()
            raise

    async def reload(self, config: Config) -> None:
        if config.feed != self._feed_config:
            log.warning("feed changed: restart smartdns to apply it")
        if self._writer is not None:
            self._writer.reload(config.registrations)
        if self._feed is not None:
            self._feed.reload(config.registrations)

    async def stop(self) -> None:
        await cancel_tasks(self._task)
        self._task = self._feed = self._sink = self._writer = None
        store, self._store = self._store, None
        if store is not None:
            try:
                await store.close()
            except DatabaseError as error:
                log.error("registration sink: %s", error)


class SyncService(Component):
    """The sync API (SPEC 4), once per node: writes through `sinks`' sink, reads on its
    connection, the token reloaded with the config. `view` builds what it reads of the
    process, once the parts exist."""

    name = "sync API"

    def __init__(self, metrics: Metrics, sinks: SinkService, view: Callable[[], Node]) -> None:
        self._metrics = metrics
        self._sinks = sinks
        self._view = view
        self._server: SyncServer | None = None
        self._listen: HostPort | None = None

    async def start(self, config: Config) -> None:
        sinks, view = self._sinks, self._view()
        self._server = await start_sync_api(
            config, sinks.sink, sinks.store.readers, self._metrics, view
        )
        self._listen = config.sync.listen
        log.info("sync API on %s", self._listen)

    async def reload(self, config: Config) -> None:
        if config.sync.listen != self._listen:
            log.warning("sync.listen changed: restart smartdns to apply it")
        if self._server is not None:
            self._server.reload(config)  # the new token; a bad one never got past load_config

    async def stop(self) -> None:
        # Stopped before DNS drains: no registration change starts while queries finish.
        server, self._server = self._server, None
        if server is not None:
            await server.close()


class SystemdAnnouncer:
    """READY=1 / RELOADING=1 / STOPPING=1 to systemd (a no-op without NOTIFY_SOCKET)."""

    def ready(self) -> None:
        systemd.notify("READY=1", "STATUS=serving")

    def reloading(self) -> None:
        systemd.reloading()

    def reloaded(self, ok: bool) -> None:
        systemd.notify("READY=1")  # after a failed reload too: the old config still serves

    async def stopping(self) -> None:
        systemd.notify("STOPPING=1")


async def cancel_tasks(*tasks: asyncio.Task[None] | None) -> None:
    """Cancel `tasks` (None ones skipped) and wait until they have ended."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)

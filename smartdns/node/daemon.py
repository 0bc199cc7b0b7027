"""Composition root: builds everything from a Config, then starts, reloads and drains.

Start order: database, registration snapshot, sockets, sync API, READY=1; stop in reverse.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any, Final

from smartdns import logs
from smartdns.config.loader import load_config
from smartdns.config.model import Config
from smartdns.core.answers import Responder, build_unblock_zones
from smartdns.core.cache import AnswerCache
from smartdns.core.clients import AuthorizedClients
from smartdns.core.counters import Metrics
from smartdns.core.ratelimit import RateLimits
from smartdns.errors import ConfigError, SmartDNSError
from smartdns.node import systemd
from smartdns.node.metrics import CacheStatsLike, ForwarderStatsLike, WorkerSample
from smartdns.node.status import NodeStatus
from smartdns.node.workers import STATS_INTERVAL_S, Supervisor, WorkerLink, every, stats_message
from smartdns.registrations.sources.sync_api import BULK_WORK, SyncServer, start_sync_api
from smartdns.registrations.store import RegistrationStore
from smartdns.serve.listeners import InFlight, Listeners, start_listeners
from smartdns.serve.pipeline import Pipeline, Settings
from smartdns.upstream.forwarder import Forwarder

log = logging.getLogger(__name__)

REGISTRY_POLL_S: Final = 0.25  # SPEC 4: a change is in effect within one second
DRAIN_TIMEOUT_S: Final = 5.0
FREE_SLICE: Final = 10_000  # rows freed per step off the loop: well under a millisecond each


def build_settings(config: Config, previous: Settings | None = None) -> Settings:
    """Everything the query path derives from the configuration, prepared aside. A reload
    keeps the cache, the forwarder (its upstream health) and the rate limiters when their
    settings are unchanged; cached answers stay valid because policy and zones are applied
    before and after the cache."""
    edns_udp_size = config.server.edns_udp_size
    forwarder = previous.forwarder if previous is not None else None
    if forwarder is None or (forwarder.config, forwarder.edns_udp_size) != (
        config.upstream,
        edns_udp_size,
    ):
        forwarder = Forwarder(config.upstream, edns_udp_size=edns_udp_size)
    cache = previous.cache if previous is not None else None
    if cache is None or cache.config != config.cache:
        cache = AnswerCache(config.cache)
    limits = previous.limits if previous is not None else None
    if limits is None or limits.config != config.rate_limit:
        limits = RateLimits(config.rate_limit)
    return Settings(
        responder=Responder(edns_udp_size),
        zones=build_unblock_zones(config.unblock),
        unregistered=config.unregistered,
        forwarder=forwarder,
        cache=cache,
        limits=limits,
    )


async def load_clients(store: RegistrationStore) -> tuple[int, AuthorizedClients]:
    """The store's generation and a snapshot at least as new; built off the event loop."""
    with BULK_WORK:  # a million rows
        generation = await store.generation()
        prefixes = await store.load_prefixes()
        return generation, await asyncio.to_thread(_build_clients, prefixes)


def _build_clients(prefixes: list[tuple[int, int, int]]) -> AuthorizedClients:
    """Build the snapshot, then free the rows a slice at a time (worker thread): freed in one
    go, on the loop thread when load_clients returns, a million rows hold the GIL for tens of
    milliseconds."""
    clients = AuthorizedClients.from_prefixes(prefixes)
    while prefixes:
        del prefixes[-FREE_SLICE:]
    return clients


class NodeView:
    """The query side when DNS runs in this process (status.QuerySide): listener state and
    the query path's statistics, read at request time."""

    def __init__(self, pipeline: Pipeline, listeners: Listeners) -> None:
        self._pipeline = pipeline
        self._listeners = listeners

    def listeners_up(self) -> bool:
        return self._listeners.are_up()

    def forwarder_stats(self) -> ForwarderStatsLike | None:
        return self._pipeline.settings.forwarder.stats

    def cache_stats(self) -> CacheStatsLike | None:
        return self._pipeline.settings.cache

    def worker_samples(self) -> tuple[WorkerSample, ...]:
        return ()


class WorkersView:
    """The query side seen from the main process of a node with worker processes: up when
    every worker reports its listeners up; statistics are the workers' sums."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def listeners_up(self) -> bool:
        return self._supervisor.all_ready()

    def forwarder_stats(self) -> ForwarderStatsLike | None:
        return self._supervisor.forwarder

    def cache_stats(self) -> CacheStatsLike | None:
        return self._supervisor.cache

    def worker_samples(self) -> list[WorkerSample]:
        return self._supervisor.samples()


class Daemon:
    """One DNS-serving process: the whole node (`workers: 1`), or a worker under
    `MainProcess` when `link` is set (then the main process owns the sync API and systemd)."""

    def __init__(self, config: Config, link: WorkerLink | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self._link = link
        self._stop = asyncio.Event()
        self._in_flight = InFlight()
        self._generation = -1
        self._registry_errors = logs.WarnOnce(
            __name__, "registration database unreadable; serving the last good registrations"
        )

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; raises SmartDNSError when start-up fails."""
        logs.guard_loop_exceptions(asyncio.get_running_loop())
        config = self.config
        store = await RegistrationStore.open(config.database.path, create=False)
        try:
            self._generation, clients = await load_clients(store)
            pipeline = Pipeline(build_settings(config), clients, self.metrics)
            listeners = await start_listeners(
                config.server, pipeline, self._in_flight, reuse_port=True
            )
            sync: SyncServer | None = None
            try:
                if self._link is None:
                    # Once per node, in this (main) process; its own store connection.
                    view = NodeView(pipeline, listeners)
                    sync = await start_sync_api(
                        config, self.metrics, NodeStatus(store, self.metrics, view)
                    )
                await self._serve(config, store, pipeline, listeners, sync)
            finally:
                if sync is not None:
                    await sync.close()
                listeners.close()
                listeners.close_connections()
        finally:
            await store.close()
        log.info("smartdns stopped")
        return 0

    async def _serve(
        self,
        config: Config,
        store: RegistrationStore,
        pipeline: Pipeline,
        listeners: Listeners,
        sync: SyncServer | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        tasks = _handle_signals(
            loop, lambda: self._reload(store, pipeline, listeners, sync), self._stop
        )
        tasks.add(loop.create_task(self._watch_registrations(store, pipeline)))
        log.info(
            "smartdns started: %d listen addresses, %d zones, %d regions, %d upstreams, "
            "%d registered entries%s",
            len(config.server.listen),
            len(config.unblock.zones),
            len(config.unblock.regions),
            len(config.upstream.servers),
            pipeline.clients.entries,
            f"; sync API on {config.sync.listen}" if sync is not None else "",
        )
        link = self._link
        if link is None:
            systemd.notify("READY=1", "STATUS=serving")
            tasks.add(systemd.keep_watchdog(listeners.are_up))
        else:
            link.send("ready")
            tasks.add(every(STATS_INTERVAL_S, lambda: self._report(link, pipeline)))
            tasks.add(loop.create_task(_stop_when(link.parent_gone(), self._stop)))
        try:
            await self._stop.wait()
        finally:
            if link is None:
                systemd.notify("STOPPING=1")
            if sync is not None:
                await sync.close()  # first: no registration change starts while DNS drains
            log.info("stopping: draining %d in-flight queries", len(self._in_flight))
            listeners.stop_reading()
            await self._in_flight.drain(DRAIN_TIMEOUT_S)
            listeners.close()
            await pipeline.close()  # upstream fetches nobody waits for any more
            await _cancel(tasks)
            if link is not None:
                self._report(link, pipeline)
                link.close()

    def _report(self, link: WorkerLink, pipeline: Pipeline) -> None:
        settings = pipeline.settings
        link.send("stats", **stats_message(self.metrics, settings.forwarder.stats, settings.cache))

    async def _watch_registrations(self, store: RegistrationStore, pipeline: Pipeline) -> None:
        """Notice changes by any writer (sync API, CLI, another process) with a cheap
        generation check, then swap in a whole new snapshot."""
        while True:
            await asyncio.sleep(REGISTRY_POLL_S)
            try:
                if await store.generation() != self._generation:
                    await self._refresh_clients(store, pipeline)
            except SmartDNSError as error:
                self._registry_errors.warn(type(error).__name__)

    async def _refresh_clients(self, store: RegistrationStore, pipeline: Pipeline) -> None:
        generation, clients = await load_clients(store)
        pipeline.clients = clients
        self._generation = generation
        log.info("registrations loaded: %d entries", clients.entries)

    async def _reload(
        self,
        store: RegistrationStore,
        pipeline: Pipeline,
        listeners: Listeners,
        sync: SyncServer | None,
    ) -> None:
        """SIGHUP: re-read the config (and the sync token); on success swap the derived
        objects, on failure keep serving the old ones and log each problem with its PATH:LINE."""
        if self._link is None:
            systemd.reloading()
        config = _reread(self.config)
        ok = config is not None
        try:
            if config is not None:
                # New addresses first: a taken port fails the reload before anything changed.
                await listeners.rebind(config.server.listen, reuse_port=True)
                pipeline.settings = build_settings(config, pipeline.settings)
                self.config = config
                if sync is not None:
                    sync.reload(config)  # the new token; a bad one never got past load_config
                logs.set_level(config.logging.level)
                await self._refresh_clients(store, pipeline)
                log.info(
                    "reloaded: %d zones, %d regions, %d upstreams",
                    len(config.unblock.zones),
                    len(config.unblock.regions),
                    len(config.upstream.servers),
                )
        except SmartDNSError as error:
            ok = False
            log.error("reload failed, keeping the running configuration: %s", error)
        finally:
            if self._link is not None:
                self._link.send("reloaded", ok=ok)
            elif not self._stop.is_set():  # never READY=1 after STOPPING=1
                systemd.notify("READY=1")


class MainProcess:
    """The node with `server.workers` > 1: worker processes serve DNS; this process owns the
    sync API, systemd notifications, signals and the workers' lifecycle."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self._stop = asyncio.Event()
        self._stopped_by_crashes = False

    async def run(self) -> int:
        logs.guard_loop_exceptions(asyncio.get_running_loop())
        config = self.config
        # Fail closed before any worker starts: the database must exist and be readable.
        store = await RegistrationStore.open(config.database.path, create=False)
        try:
            supervisor = Supervisor(config.path, config.server.workers, self.metrics)
            await supervisor.start()
            try:
                status = NodeStatus(store, self.metrics, WorkersView(supervisor))
                sync = await start_sync_api(config, self.metrics, status)
            except BaseException:
                await supervisor.stop(DRAIN_TIMEOUT_S)
                raise
            try:
                await self._serve(supervisor, sync)
            finally:
                await sync.close()
                await supervisor.stop(DRAIN_TIMEOUT_S)
        finally:
            await store.close()
        log.info("smartdns stopped")
        return 1 if self._stopped_by_crashes else 0

    async def _serve(self, supervisor: Supervisor, sync: SyncServer) -> None:
        loop = asyncio.get_running_loop()
        tasks = _handle_signals(loop, lambda: self._reload(supervisor, sync), self._stop)
        tasks.add(loop.create_task(self._stop_when_all_gave_up(supervisor)))
        tasks.add(systemd.keep_watchdog(supervisor.all_ready))
        log.info(
            "smartdns started: %d workers; sync API on %s",
            self.config.server.workers,
            self.config.sync.listen,
        )
        systemd.notify("READY=1", "STATUS=serving")
        try:
            await self._stop.wait()
        finally:
            systemd.notify("STOPPING=1")
            log.info("stopping: draining the workers")
            await _cancel(tasks)

    async def _stop_when_all_gave_up(self, supervisor: Supervisor) -> None:
        await supervisor.all_gave_up.wait()
        log.error("every worker keeps crashing; stopping")
        self._stopped_by_crashes = True
        self._stop.set()

    async def _reload(self, supervisor: Supervisor, sync: SyncServer) -> None:
        systemd.reloading()
        try:
            config = _reread(self.config)
            if config is None:
                return
            if config.server.workers != self.config.server.workers:
                log.warning("server.workers changed: restart smartdns to apply it")
            if config.sync.listen != self.config.sync.listen:
                log.warning("sync.listen changed: restart smartdns to apply it")
            self.config = config
            sync.reload(config)
            logs.set_level(config.logging.level)
            if await supervisor.reload():
                log.info("reloaded: %d workers", config.server.workers)
        finally:
            if not self._stop.is_set():  # never READY=1 after STOPPING=1
                systemd.notify("READY=1")


def _reread(current: Config) -> Config | None:
    """The config file read again, or None (each problem logged) when it does not load."""
    try:
        return load_config(current.path)
    except ConfigError as error:
        for problem in error.problems:
            log.error("reload failed, keeping the running configuration: %s", problem)
        return None


def _handle_signals(
    loop: asyncio.AbstractEventLoop,
    reload: Callable[[], Coroutine[Any, Any, None]],
    stop: asyncio.Event,
) -> set[asyncio.Task[None]]:
    """SIGHUP runs `reload` (one at a time), SIGTERM/SIGINT set `stop`. Returns the set that
    owns the reload tasks; the caller adds its own tasks and cancels them all at the end.
    The handlers stay until the loop closes: a second SIGTERM while draining changes nothing."""
    tasks: set[asyncio.Task[None]] = set()
    lock = asyncio.Lock()

    async def serialized() -> None:
        async with lock:
            await reload()

    def on_hup() -> None:
        task = loop.create_task(serialized())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    return tasks


async def _cancel(tasks: set[asyncio.Task[None]]) -> None:
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _stop_when(event: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    await event
    stop.set()


async def _run(config: Config) -> int:
    inherited = WorkerLink.inherited()
    if inherited is not None:
        link = await WorkerLink.connect(*inherited)
        return await Daemon(config, link).run()
    if config.server.workers > 1:
        return await MainProcess(config).run()
    return await Daemon(config).run()


def serve(config: Config) -> int:
    """Run the node in the foreground on uvloop when it is installed: one process with
    `workers: 1`, else a main process and its workers; a worker when started by one."""
    inherited = WorkerLink.inherited()
    logs.setup(config.logging.level, f"worker {inherited[0]}" if inherited else "")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on supported platforms
        return asyncio.run(_run(config))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(config))

"""Composition root: builds everything from a Config, then starts, reloads and drains.

Start order: database, registration snapshot, sockets, sync API, READY=1; stop in reverse.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Final

from smartdns import logs, systemd
from smartdns.answers import Responder, build_unblock_zones
from smartdns.cache import AnswerCache
from smartdns.clients import AuthorizedClients
from smartdns.config import Config, load_config
from smartdns.errors import ConfigError, SmartDNSError
from smartdns.metrics import CacheStatsLike, ForwarderStatsLike, Metrics, RegistrationStatsLike
from smartdns.pipeline import Pipeline, Settings
from smartdns.registry import RegistrationStore
from smartdns.sync_api import COLLECTOR_PAUSE, SyncServer, start_sync_api
from smartdns.transport import InFlight, Listeners, start_listeners
from smartdns.upstream import Forwarder

log = logging.getLogger(__name__)

REGISTRY_POLL_S: Final = 0.25  # SPEC 4: a change is in effect within one second
DRAIN_TIMEOUT_S: Final = 5.0


def build_settings(config: Config, previous: Settings | None = None) -> Settings:
    """Everything the query path derives from the configuration, prepared aside. A reload
    keeps the cache and the forwarder (its upstream health) when their settings are unchanged;
    cached answers stay valid because policy and zones are applied before and after the cache."""
    edns_udp_size = config.server.edns_udp_size
    forwarder = Forwarder(config.upstream, edns_udp_size=edns_udp_size)
    cache = AnswerCache(config.cache)
    if previous is not None:
        if (previous.forwarder.config, previous.forwarder.edns_udp_size) == (
            config.upstream,
            edns_udp_size,
        ):
            forwarder = previous.forwarder
        if previous.cache.config == config.cache:
            cache = previous.cache
    return Settings(
        responder=Responder(edns_udp_size),
        zones=build_unblock_zones(config.unblock),
        unregistered=config.unregistered,
        forwarder=forwarder,
        cache=cache,
    )


async def load_clients(store: RegistrationStore) -> tuple[int, AuthorizedClients]:
    """The store's generation and a snapshot at least as new; built off the event loop."""
    with COLLECTOR_PAUSE:  # a million rows: no full collections stalling the loop meanwhile
        generation = await store.generation()
        prefixes = await store.load_prefixes()
        return generation, await asyncio.to_thread(AuthorizedClients.from_prefixes, prefixes)


class NodeView:
    """What the sync API reads from this process (sync_api.Node): the DNS side's store
    connection, listener state and the query path's statistics, read at request time."""

    def __init__(self, store: RegistrationStore, pipeline: Pipeline, listeners: Listeners) -> None:
        self._store = store
        self._pipeline = pipeline
        self._listeners = listeners

    def listeners_up(self) -> bool:
        udp, tcp = self._listeners.udp, self._listeners.tcp
        return (
            bool(udp and tcp)
            and all(not t.is_closing() for t in udp)
            and all(server.is_serving() for server in tcp)
        )

    async def ping_database(self) -> None:
        # Reads a row of the file (SELECT 1 would succeed without touching it).
        await self._store.generation()

    async def registration_stats(self) -> RegistrationStatsLike:
        return await self._store.status()

    def forwarder_stats(self) -> ForwarderStatsLike | None:
        return self._pipeline.settings.forwarder.stats

    def cache_stats(self) -> CacheStatsLike | None:
        return self._pipeline.settings.cache


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self._stop = asyncio.Event()
        self._in_flight = InFlight()
        self._generation = -1
        self._registry_errors = logs.WarnOnce(
            __name__, "registration database unreadable; serving the last good registrations"
        )

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; raises SmartDNSError when start-up fails."""
        config = self.config
        store = await RegistrationStore.open(config.database.path, create=False)
        try:
            self._generation, clients = await load_clients(store)
            pipeline = Pipeline(build_settings(config), clients, self.metrics)
            listeners = await start_listeners(
                config.server, pipeline, self._in_flight, reuse_port=True
            )
            try:
                # Once per node, in this (main) process; its own store connection.
                sync = await start_sync_api(
                    config, self.metrics, NodeView(store, pipeline, listeners)
                )
                try:
                    await self._serve(config, store, pipeline, listeners, sync)
                finally:
                    await sync.close()
            finally:
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
        sync: SyncServer,
    ) -> None:
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()

        def on_hup() -> None:
            task = loop.create_task(self._reload(store, pipeline, sync))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        log.info(
            "smartdns started: %d listen addresses, %d zones, %d regions, %d upstreams, "
            "%d registered entries; sync API on %s",
            len(config.server.listen),
            len(config.unblock.zones),
            len(config.unblock.regions),
            len(config.upstream.servers),
            pipeline.clients.entries,
            config.sync.listen,
        )
        systemd.notify("READY=1", "STATUS=serving")
        watcher = loop.create_task(self._watch_registrations(store, pipeline))
        try:
            await self._stop.wait()
        finally:
            systemd.notify("STOPPING=1")
            await sync.close()  # first: no registration change starts while DNS drains
            log.info("stopping: draining %d in-flight queries", len(self._in_flight))
            listeners.close()
            await self._in_flight.drain(DRAIN_TIMEOUT_S)
            watcher.cancel()
            for task in (watcher, *reloads):
                task.cancel()
            await asyncio.gather(watcher, *reloads, return_exceptions=True)
            for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

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

    async def _reload(self, store: RegistrationStore, pipeline: Pipeline, sync: SyncServer) -> None:
        """SIGHUP: re-read the config (and the sync token); on success swap the derived
        objects, on failure keep serving the old ones and log each problem with its PATH:LINE."""
        systemd.reloading()
        try:
            try:
                config = load_config(self.config.path)
            except ConfigError as error:
                for problem in error.problems:
                    log.error("reload failed, keeping the running configuration: %s", problem)
                return
            if config.server.listen != self.config.server.listen:
                log.warning("listen addresses changed: restart smartdns to apply them")
            if config.sync.listen != self.config.sync.listen:
                log.warning("sync.listen changed: restart smartdns to apply it")
            pipeline.settings = build_settings(config, pipeline.settings)
            self.config = config
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
            log.error("reload failed, keeping the running configuration: %s", error)
        finally:
            systemd.notify("READY=1")


def serve(config: Config) -> int:
    """Run the server in the foreground on uvloop when it is installed."""
    logs.setup(config.logging.level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on supported platforms
        return asyncio.run(Daemon(config).run())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(Daemon(config).run())

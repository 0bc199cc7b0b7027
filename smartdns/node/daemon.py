"""Composition root: builds each process's ordered components from a Config and runs them.

A DNS process starts: database, watchdog (or a worker's reports), registration snapshot,
DNS listeners, registration sink (with the feed), DDNS refresher and sync API (the whole node
only), then READY=1; it stops in reverse. The main process of a node with workers: database,
watchdog, workers, registration sink, DDNS refresher, sync API, READY=1.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from smartdns import logs
from smartdns.config.loader import load_config, summary, warnings
from smartdns.config.model import Config
from smartdns.core.answers import Responder, build_local_zones
from smartdns.core.cache import AnswerCache
from smartdns.core.clients import AuthorizedClients
from smartdns.core.counters import Metrics
from smartdns.core.ratelimit import RateLimits
from smartdns.errors import ConfigError, SmartDNSError
from smartdns.node.components import (
    Database,
    RemovedEntriesPruner,
    SinkService,
    SyncService,
    SystemdAnnouncer,
    Watchdog,
    cancel_tasks,
)
from smartdns.node.ddns import DdnsService
from smartdns.node.lifecycle import Announcer, Component, Lifecycle
from smartdns.node.metrics import CacheStatsLike, ForwarderStatsLike, TlsSample, WorkerSample
from smartdns.node.port_holders import check_ports_free
from smartdns.node.snapshot import SnapshotWatch
from smartdns.node.status import NodeStatus, ReadYourWrites
from smartdns.node.tls_stats import TlsTotals, tls_report
from smartdns.node.workers import Supervisor, WorkerAnnouncer, WorkerLink, WorkerReports, Workers
from smartdns.serve.encrypted import EncryptedListeners
from smartdns.serve.listeners import InFlight, Listeners, start_listeners
from smartdns.serve.pipeline import Pipeline, Settings
from smartdns.upstream.forwarder import Forwarder

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S: Final = 5.0


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
        zones=build_local_zones(config.unblock, config.encrypted),
        unregistered=config.unregistered,
        forwarder=forwarder,
        cache=cache,
        limits=limits,
    )


class NodeView:
    """The query side when DNS runs in this process (status.QuerySide): listener state and
    the query path's statistics, read at request time."""

    def __init__(self, pipeline: Pipeline, listeners: Listeners, dns: DnsService) -> None:
        self._pipeline = pipeline
        self._listeners = listeners
        self._dns = dns

    def listeners_up(self) -> bool:
        return self._listeners.are_up()

    def forwarder_stats(self) -> ForwarderStatsLike | None:
        return self._pipeline.settings.forwarder.stats

    def cache_stats(self) -> CacheStatsLike | None:
        return self._pipeline.settings.cache

    def worker_samples(self) -> tuple[WorkerSample, ...]:
        return ()

    def tls_sample(self) -> TlsSample | None:
        totals = TlsTotals()
        if self._dns.encrypted is not None:
            totals.add(tls_report(self._dns.encrypted))
        return totals.sample(time.time())


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

    def tls_sample(self) -> TlsSample | None:
        return self._supervisor.tls_sample()


class DnsService(Component):
    """The query path of one process: binds the listen addresses and, with `encrypted`, the
    DoT and DoH ones (the snapshot is loaded by then), rebinds and swaps the derived
    settings on reload, drains on stop."""

    name = "DNS listeners"

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._in_flight = InFlight()
        self._listeners: Listeners | None = None
        self.encrypted: EncryptedListeners | None = None

    @property
    def listeners(self) -> Listeners:
        if self._listeners is None:
            raise RuntimeError("the DNS listeners are not started")
        return self._listeners

    def are_up(self) -> bool:
        encrypted = self.encrypted
        return (
            self._listeners is not None
            and self._listeners.are_up()
            and (encrypted is None or encrypted.are_up())
        )

    async def start(self, config: Config) -> None:
        self._listeners = await start_listeners(
            config.server, self._pipeline, self._in_flight, reuse_port=True
        )
        try:
            self.encrypted = self._start_encrypted(config)
        except BaseException:
            self._listeners.close()
            raise

    def _start_encrypted(self, config: Config) -> EncryptedListeners | None:
        if config.encrypted is None:
            return None
        encrypted = EncryptedListeners(
            config.encrypted, config.server.tcp_idle_timeout, self._pipeline, self._in_flight.spawn
        )
        encrypted.bind(config.encrypted, reuse_port=True)
        return encrypted

    async def reload(self, config: Config) -> None:
        # New addresses first: a taken port fails the reload before anything changed.
        await self.listeners.rebind(config.server.listen, reuse_port=True)
        if self.encrypted is None:
            self.encrypted = self._start_encrypted(config)
        elif config.encrypted is None:
            self.encrypted.stop_reading()
            self.encrypted.close_connections()
            self.encrypted = None
        else:
            self.encrypted.rebind(config.encrypted, reuse_port=True)
        self._pipeline.settings = build_settings(config, self._pipeline.settings)

    async def stop(self) -> None:
        listeners, self._listeners = self.listeners, None
        encrypted, self.encrypted = self.encrypted, None
        log.info("stopping: draining %d in-flight queries", len(self._in_flight))
        listeners.stop_reading()
        if encrypted is not None:
            encrypted.stop_reading()
        await self._in_flight.drain(DRAIN_TIMEOUT_S)
        listeners.close()
        await self._pipeline.close()  # upstream fetches nobody waits for any more
        listeners.close_connections()
        if encrypted is not None:
            encrypted.close_connections()


class Node:
    """One process's run: its components started in order, then the announcer's READY;
    SIGHUP reloads (one at a time), SIGTERM/SIGINT stop: components stopped in reverse."""

    def __init__(
        self,
        config: Config,
        components: list[Component],
        announcer: Announcer,
        stop: asyncio.Event,
        *,
        warns: bool = True,
    ) -> None:
        """`warns`: log the configuration's warnings (a worker leaves them to its main
        process, so each is logged once per node)."""
        self.config = config
        self._lifecycle = Lifecycle(components)
        self._announcer = announcer
        self._stop = stop
        self._warns = warns

    @property
    def components(self) -> tuple[Component, ...]:
        """The process's components in start order (the order its docstring promises)."""
        return self._lifecycle.components

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT; raises SmartDNSError when start-up fails."""
        loop = asyncio.get_running_loop()
        logs.guard_loop_exceptions(loop)
        await self._lifecycle.start(self.config)
        reloads: set[asyncio.Task[None]] = set()
        try:
            reloads = _handle_signals(loop, self._reload, self._stop)  # before READY=1
            log.info("smartdns started: %s", summary(self.config))
            self._warn(self.config)
            self._announcer.ready()
            await self._stop.wait()
        finally:
            await self._announcer.stopping()
            await cancel_tasks(*reloads)  # a reload does not race the components stopping
            await self._lifecycle.stop()
        log.info("smartdns stopped")

    async def _reload(self) -> None:
        """SIGHUP: re-read the config (and the sync token); on success each component takes
        it, on failure the running one stays and each problem is logged with its PATH:LINE."""
        self._announcer.reloading()
        config = _reread(self.config)
        ok = False
        try:
            if config is not None:
                await self._lifecycle.reload(config)
                self.config = config
                logs.set_level(config.logging.level)
                ok = True
                log.info("reloaded: %s", summary(config))
                self._warn(config)
        except SmartDNSError as error:
            log.error("reload failed, keeping the running configuration: %s", error)
        finally:
            if not self._stop.is_set():  # never READY=1 after STOPPING=1
                self._announcer.reloaded(ok)

    def _warn(self, config: Config) -> None:
        """What check-config warns about (a certificate near its expiry), in the log."""
        if self._warns:
            for warning in warnings(config, time.time()):
                log.warning("%s", warning)


def _dns_process(config: Config, link: WorkerLink | None) -> Node:
    """A DNS-serving process: the whole node (`workers: 1`), or a worker under the main
    process when `link` is set (the main process then owns the sync API and systemd)."""
    stop = asyncio.Event()
    metrics = Metrics()
    pipeline = Pipeline(build_settings(config), AuthorizedClients.from_prefixes(()), metrics)
    database = Database()
    dns = DnsService(pipeline)
    watch = SnapshotWatch(database, pipeline)
    serving: list[Component] = [watch, dns]
    if link is not None:
        reports = WorkerReports(link, metrics, pipeline, lambda: dns.encrypted)
        announcer = WorkerAnnouncer(link, stop.set, watch.wait_applied, reports.report)
        return Node(config, [database, reports, *serving], announcer, stop, warns=False)

    async def apply(generation: int, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):  # no worker to restart: the poll retries
            await watch.wait_applied(generation)

    sinks = SinkService(ReadYourWrites(apply).announce)
    ddns = DdnsService(sinks)
    sync = SyncService(
        metrics,
        sinks,
        lambda: NodeStatus(
            database.store.readers,
            metrics,
            NodeView(pipeline, dns.listeners, dns),
            ddns=ddns.sample,
            feed=sinks.feed_state,
        ),
    )
    pruner = RemovedEntriesPruner(database, sinks)
    components = [database, pruner, Watchdog(dns.are_up), *serving, sinks, ddns, sync]
    return Node(config, components, SystemdAnnouncer(), stop)


def _main_process(config: Config) -> tuple[Node, Workers]:
    """The main process of a node with `server.workers` > 1: the workers serve DNS; this
    process owns the sync API, systemd, signals and the workers' lifecycle. The database is
    opened first: it must exist and be readable before any worker starts (fail closed)."""
    stop = asyncio.Event()
    metrics = Metrics()
    database = Database()
    supervisor = Supervisor(config.path, config.server.workers, metrics)
    workers = Workers(supervisor, DRAIN_TIMEOUT_S, stop.set)
    sinks = SinkService(ReadYourWrites(supervisor.apply).announce)
    ddns = DdnsService(sinks)
    sync = SyncService(
        metrics,
        sinks,
        lambda: NodeStatus(
            database.store.readers,
            metrics,
            WorkersView(supervisor),
            ddns=ddns.sample,
            feed=sinks.feed_state,
        ),
    )
    pruner = RemovedEntriesPruner(database, sinks)
    components = [database, pruner, Watchdog(supervisor.all_ready), workers, sinks, ddns, sync]
    return Node(config, components, SystemdAnnouncer(), stop), workers


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
    owns the reload tasks; the caller cancels them when it stops.
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


async def _run(config: Config) -> int:
    inherited = WorkerLink.inherited()
    if inherited is not None:
        link = await WorkerLink.connect(*inherited)
        await _dns_process(config, link).run()
        return 0
    if config.server.workers > 1:
        node, workers = _main_process(config)
        await node.run()
        return 1 if workers.gave_up else 0
    await _dns_process(config, None).run()
    return 0


def serve(config: Config) -> int:
    """Run the node in the foreground on uvloop when it is installed: one process with
    `workers: 1`, else a main process and its workers; a worker when started by one."""
    inherited = WorkerLink.inherited()
    logs.setup(config.logging.level, f"worker {inherited[0]}" if inherited else "")
    if inherited is None:  # workers share the ports on purpose, with the node that started them
        encrypted = config.encrypted
        tls = () if encrypted is None else (*encrypted.dot_listen, *encrypted.doh_listen)
        check_ports_free(config.server.listen, tls)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on supported platforms
        return asyncio.run(_run(config))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(config))

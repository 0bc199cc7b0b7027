"""The DDNS refresher as a lifecycle component (SPEC 3): in the process that owns writes (the
whole node, or the main process of a node with workers), never in a worker, and with a feed
only on the node with `feed.refresher: true`.

It follows the registered hostnames in the store (on a connection of its own) and writes what
they resolve to through the node's registration sink, like any write: in effect on every DNS
process before the write returns; with a feed, into the bucket, so every node applies it.
Logs counts only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Final

from smartdns import logs
from smartdns.config.model import Config
from smartdns.core.chain import LookupOutcome
from smartdns.errors import SmartDNSError
from smartdns.node.components import SinkService, cancel_tasks
from smartdns.node.lifecycle import Component
from smartdns.node.metrics import DdnsSample
from smartdns.registrations.sources.ddns import LATENCY_BOUNDS_S, HostnameRefresher
from smartdns.registrations.store import RegistrationStore
from smartdns.registrations.store.hostnames import Hostnames
from smartdns.upstream.forwarder import Forwarder
from smartdns.upstream.lookup import HostnameLookup, forwarder_config

log = logging.getLogger(__name__)

HOSTNAMES_POLL_S: Final = 0.25  # a newly registered hostname is looked up this soon


def runs_refresher(config: Config) -> bool:
    """Resolution runs once per deployment: with a feed, on its refresher node only."""
    return config.feed is None or config.feed.refresher


class HostnameFollower:
    """Keeps the refresher's hostnames those of the store, at a cost in proportion to the
    accounts a write touched (SPEC 4): it holds account → hostnames, so a changed account's
    old ones can be diffed against its new ones, and hands the refresher only the difference.
    A full load at the start and whenever the store says changes cannot be read by generation.
    """

    def __init__(self, hostnames: Hostnames, refresher: HostnameRefresher) -> None:
        self._hostnames = hostnames
        self._refresher = refresher
        self._held: dict[str, tuple[str, ...]] = {}  # accounts holding any hostname
        self._generation = -1

    @property
    def held(self) -> Mapping[str, tuple[str, ...]]:
        return self._held

    async def load(self) -> None:
        """Everything, once: at the start."""
        self._generation, held = await self._hostnames.registered_hostnames()
        self._replace(held)

    async def follow(self) -> None:
        """One step: a cheap poll, and the changed accounts' hostnames when the set moved."""
        if await self._hostnames.hostnames_generation() <= self._generation:
            return
        changes = await self._hostnames.hostname_changes(self._generation)
        self._generation = changes.generation
        if changes.full_load:
            self._replace(changes.accounts)
            return
        for account, names in changes.accounts.items():
            old = self._held.get(account, ())
            if names == old:
                continue
            self._refresher.add(set(names).difference(old))
            self._refresher.remove(set(old).difference(names))
            if names:
                self._held[account] = names
            else:
                del self._held[account]

    def _replace(self, held: dict[str, tuple[str, ...]]) -> None:
        self._held = held
        self._refresher.replace_all(name for names in held.values() for name in names)


class DdnsService(Component):
    """Starts the refresher with the registered hostnames (and the addresses stored for them,
    so a restart withdraws nothing until a lookup says so), then follows the store."""

    name = "DDNS refresher"

    def __init__(self, sinks: SinkService) -> None:
        self._sinks = sinks  # started before this component: its sink takes the results
        self._store: RegistrationStore | None = None
        self._lookup: HostnameLookup | None = None
        self._refresher: HostnameRefresher | None = None
        self._task: asyncio.Task[None] | None = None
        self._follower: HostnameFollower | None = None
        self._lookup_settings: object = None
        self._errors = logs.WarnOnce(__name__, "registered hostnames unreadable; keeping the last")

    def sample(self) -> DdnsSample | None:
        """The refresher's aggregate figures for /metrics; None when it does not run here."""
        refresher = self._refresher
        if refresher is None:
            return None
        stats = refresher.stats
        return DdnsSample(
            hostnames=refresher.hostnames,
            addresses=refresher.addresses_authorized,
            lookups={outcome.value: stats.lookups[outcome] for outcome in LookupOutcome},
            rejected=stats.rejected,
            expired=stats.expired,
            latency_bounds_s=LATENCY_BOUNDS_S,
            latency_buckets=tuple(stats.latency_buckets),
            latency_sum_s=stats.latency_sum_s,
        )

    async def start(self, config: Config) -> None:
        if not runs_refresher(config):
            return
        store = await RegistrationStore.open(config.database.path, create=False)
        self._store = store
        self._lookup = self._new_lookup(config)
        sink = self._sinks.sink
        refresher = HostnameRefresher(config.ddns, config.registrations, self._lookup, sink)
        self._refresher = refresher
        self._follower = HostnameFollower(store.hostnames, refresher)
        await self._follower.load()
        refresher.seed(await store.hostnames.resolved_addresses())
        await refresher.start()
        self._task = asyncio.get_running_loop().create_task(self._follow())
        log.info("DDNS refresher: %d hostnames", refresher.hostnames)

    async def reload(self, config: Config) -> None:
        if self._refresher is None:
            return
        self._refresher.reload(config.ddns, config.registrations)
        if self._settings(config) != self._lookup_settings:
            old, self._lookup = self._lookup, self._new_lookup(config)
            self._refresher.use(self._lookup)
            if old is not None:
                old.close()

    async def stop(self) -> None:
        await cancel_tasks(self._task)
        self._task = None
        self._follower = None
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            await refresher.stop()
        if self._lookup is not None:
            self._lookup.close()
        store, self._store = self._store, None
        if store is not None:
            await store.close()

    def _settings(self, config: Config) -> object:
        return (forwarder_config(config.ddns, config.upstream), config.ddns.max_concurrent)

    def _new_lookup(self, config: Config) -> HostnameLookup:
        self._lookup_settings = self._settings(config)
        upstream = forwarder_config(config.ddns, config.upstream)
        forwarder = Forwarder(upstream, edns_udp_size=config.server.edns_udp_size)
        return HostnameLookup(forwarder, config.ddns.max_concurrent)

    async def _follow(self) -> None:
        """Poll the hostnames' generation (one cheap read); read what changed when it moved."""
        assert self._follower is not None
        while True:
            await asyncio.sleep(HOSTNAMES_POLL_S)
            try:
                await self._follower.follow()
            except SmartDNSError as error:
                self._errors.warn(type(error).__name__)

"""The composition root (node.daemon): each process kind's components in the order its
docstring and docs/architecture.md promise, above all the write path's: the registration sink
after the database and before the DDNS refresher and the sync API that write through it, so
that it stops after them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from smartdns.config.model import Config, HostPort, UpstreamConfig
from smartdns.node.components import (
    Database,
    RemovedEntriesPruner,
    SinkService,
    SyncService,
    Watchdog,
)
from smartdns.node.daemon import DnsService, _dns_process, _main_process
from smartdns.node.ddns import DdnsService
from smartdns.node.lifecycle import Component
from smartdns.node.snapshot import SnapshotWatch
from smartdns.node.workers import Workers


def make_config(tmp_path: Path) -> Config:
    upstream = UpstreamConfig(servers=(HostPort("192.0.2.53", 53),))  # never asked: not started
    return Config(path=tmp_path / "smartdns.yaml", upstream=upstream)


def kinds(components: tuple[Component, ...]) -> list[type[Component]]:
    return [type(component) for component in components]


def the_sink(components: tuple[Component, ...]) -> SinkService:
    (sinks,) = [component for component in components if isinstance(component, SinkService)]
    return sinks


def writers_share_the_sink(components: tuple[Component, ...]) -> bool:
    sinks = the_sink(components)
    writers = [c for c in components if isinstance(c, DdnsService | SyncService)]
    return len(writers) == 2 and all(writer._sinks is sinks for writer in writers)


async def test_the_whole_node_starts_its_sink_before_the_refresher_and_the_sync_api(
    tmp_path: Path,
) -> None:
    node = _dns_process(make_config(tmp_path), None)
    assert kinds(node.components) == [
        Database,
        RemovedEntriesPruner,
        Watchdog,
        SnapshotWatch,
        DnsService,
        SinkService,
        DdnsService,
        SyncService,
    ]
    assert writers_share_the_sink(node.components)


async def test_a_main_process_starts_its_sink_after_the_workers_and_before_its_writers(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    config = replace(config, server=replace(config.server, workers=2))
    node, _workers = _main_process(config)
    assert kinds(node.components) == [
        Database,
        RemovedEntriesPruner,
        Watchdog,
        Workers,
        SinkService,
        DdnsService,
        SyncService,
    ]
    assert writers_share_the_sink(node.components)

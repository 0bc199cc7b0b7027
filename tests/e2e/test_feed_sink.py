"""The registration sink with `feed` (sources/feed_sink.BucketSink) as the node builds it
(node.components.SinkService): a real nats-server, a real SQLite copy, the feed's follower
running as the component's task. Each write returns once it is in the bucket *and* in this
node's copy; what the bucket cannot check (device IDs) is checked against the copy first;
a bucket out of reach is SinkUnavailable; stopping ends the follower and the connection."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import nats
import nats.js.errors
import pytest

from smartdns.config.model import Config, DatabaseConfig, FeedConfig, RegistrationsConfig
from smartdns.errors import StaleWriteError
from smartdns.node.components import SinkService
from smartdns.registrations.entries import Snapshot
from smartdns.registrations.feed_format import account_key
from smartdns.registrations.sink import SinkUnavailable
from smartdns.registrations.sources.feed_sink import BucketSink
from smartdns.registrations.store import RegistrationStore
from tests.e2e.nats import NatsCluster, nats_cluster
from tests.ports import free_port

LAB = RegistrationsConfig(public_only=False)
BUCKET = "smartdns-sink-test"
WAIT_S = 10.0
A = ipaddress.ip_network("203.0.113.7/32")
B = ipaddress.ip_network("203.0.113.8/32")
DEVICE = bytes(range(32))  # a device ID's digest
HOME = "home.example.net"


@pytest.fixture
def single(tmp_path: Path) -> Iterator[NatsCluster]:
    with nats_cluster(tmp_path, size=1) as cluster:
        yield cluster


def make_config(tmp_path: Path, servers: list[str]) -> Config:
    return Config(
        path=tmp_path / "smartdns.yaml",
        database=DatabaseConfig(tmp_path / "registrations.db"),
        registrations=LAB,
        feed=FeedConfig(servers=tuple(servers), bucket=BUCKET),
    )


async def eventually(predicate: Callable[[], bool]) -> None:
    """A bounded poll: fails past WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def feed_tasks() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == "feed"]


@contextlib.asynccontextmanager
async def started(config: Config, announced: list[int]) -> AsyncIterator[SinkService]:
    async with await RegistrationStore.open(config.database.path, create=True):
        pass

    async def announce(generation: int, everything: bool) -> None:
        announced.append(generation)

    sinks = SinkService(announce)
    await asyncio.wait_for(sinks.start(config), WAIT_S)
    try:
        yield sinks
    finally:
        await asyncio.wait_for(sinks.stop(), WAIT_S)


@contextlib.asynccontextmanager
async def caught_up(config: Config, announced: list[int]) -> AsyncIterator[SinkService]:
    async with started(config, announced) as sinks:
        await eventually(lambda: sinks.feed_state is not None and sinks.feed_state.caught_up)
        yield sinks


async def in_bucket(cluster: NatsCluster, account: str) -> bool:
    nc = await nats.connect(servers=cluster.urls)
    try:
        kv = await nc.jetstream().key_value(BUCKET)
        try:
            await kv.get(account_key(account))
        except nats.js.errors.KeyNotFoundError:
            return False
        return True
    finally:
        await nc.close()


async def test_a_write_is_in_the_bucket_and_in_this_nodes_copy_when_it_returns(
    tmp_path: Path, single: NatsCluster
) -> None:
    announced: list[int] = []
    async with caught_up(make_config(tmp_path, single.urls), announced) as sinks:
        assert isinstance(sinks.sink, BucketSink)
        readers = sinks.store.readers
        record = await sinks.sink.put_account("acct", 3, [A], [HOME], [DEVICE])
        assert (record.version, record.networks, record.hostnames) == (3, (A,), (HOME,))
        assert await readers.get_account("acct") == record  # applied here, not only in the bucket
        assert announced  # through the writer's announcement: on the DNS side too
        assert await in_bucket(single, "acct")

        assert await sinks.sink.delete_account("acct", 4) is True
        assert await readers.get_account("acct") is None
        assert await sinks.sink.delete_account("acct", 5) is False  # a tombstone, not live

        with pytest.raises(StaleWriteError):
            await sinks.sink.put_account("acct", 4, [A])  # at the tombstone's version


async def test_a_device_id_another_account_holds_is_refused_before_the_bucket(
    tmp_path: Path, single: NatsCluster
) -> None:
    async with caught_up(make_config(tmp_path, single.urls), []) as sinks:
        await sinks.sink.put_account("first", 1, [A], devices=[DEVICE])
        with pytest.raises(StaleWriteError, match=r"device_ids\[0\]: held by another account"):
            await sinks.sink.put_account("second", 2, [B], devices=[DEVICE])
        assert not await in_bucket(single, "second")


async def test_a_snapshot_replaces_the_copy_and_is_freed(
    tmp_path: Path, single: NatsCluster
) -> None:
    async with caught_up(make_config(tmp_path, single.urls), []) as sinks:
        await sinks.sink.put_account("old", 2, [B])
        holder = [Snapshot(10, {"new": [A], "other": [A, B]})]
        result = await sinks.sink.replace_snapshot(holder)
        assert (result.accounts, result.entries) == (2, 3)
        assert holder == []  # not held twice over while the node loads it
        status = await sinks.store.readers.status()
        assert (status.accounts, status.entries, status.snapshot_version) == (2, 3, 10)
        assert await sinks.store.readers.get_account("old") is None


async def test_without_a_reachable_server_writes_are_unavailable(tmp_path: Path) -> None:
    config = make_config(tmp_path, [f"nats://127.0.0.1:{free_port()}"])  # nobody listens
    async with await RegistrationStore.open(config.database.path, create=True) as store:
        await store.accounts.put_account("acct", 1, [A], [HOME])
    async with started(config, []) as sinks:
        with pytest.raises(SinkUnavailable):
            await sinks.sink.put_account("acct", 2, [B])
        record = await sinks.store.readers.get_account("acct")
        assert record is not None and record.version == 1  # unchanged
        # The refresher's results are applied here at least, and it is told to retry.
        with pytest.raises(SinkUnavailable):
            await sinks.sink.apply_resolved({HOME: [B]})
        resolved = await sinks.store.hostnames.resolved_addresses()
        assert resolved == {HOME: [B.network_address.packed]}


async def test_stopping_ends_the_follower_and_closes_the_connection(
    tmp_path: Path, single: NatsCluster
) -> None:
    async with caught_up(make_config(tmp_path, single.urls), []) as sinks:
        assert len(feed_tasks()) == 1
    assert feed_tasks() == []
    with pytest.raises(RuntimeError):
        sinks.sink  # noqa: B018 - the property raises once stopped
    with pytest.raises(RuntimeError):
        sinks.store  # noqa: B018

"""The feed module against real nats-server processes: follow, catch up, compare-and-set,
bad values, a server killed in a three-server cluster, reconciliation, snapshots.

The sink is an in-memory FeedSink with the store's version rule (apply only a newer version);
the node's SQLite sink is exercised by the fleet tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.js.kv import KeyValue

from smartdns.config.model import RegistrationsConfig
from smartdns.errors import StaleWriteError
from smartdns.registrations.entries import Network, Snapshot
from smartdns.registrations.feed_follow import Position
from smartdns.registrations.feed_format import (
    SNAPSHOT_KEY,
    AccountValue,
    FeedApplied,
    FeedChange,
    FeedValue,
    SnapshotMarker,
    Tombstone,
    account_key,
    encode_marker,
    encode_value,
)
from smartdns.registrations.sources.feed import Feed, stream_name
from smartdns.registrations.sources.feed_writes import FeedUnavailable
from tests.e2e.nats import NatsCluster, make_certificates, nats_cluster

LAB = RegistrationsConfig(public_only=False)
BUCKET = "smartdns-test"
WAIT_S = 10.0
ELECTION_S = 30.0  # a cluster that lost a server elects new leaders within this


@dataclass(frozen=True)
class Settings:
    servers: tuple[str, ...]
    bucket: str = BUCKET
    replicas: int = 1
    credentials_file: Path | None = None
    tls_ca_file: Path | None = None


class MemorySink:
    """A FeedSink over a dict, with the registry's rule: only a newer version replaces."""

    def __init__(self) -> None:
        self.accounts: dict[str, FeedValue] = {}
        self.snapshot_version = 0
        self.resolved: dict[str, tuple[Network, ...]] = {}
        self.batches: list[int] = []
        self.position: Position | None = None  # saved with the changes, as the store does
        self._changed = asyncio.Condition()

    async def apply_feed(
        self,
        changes: Sequence[FeedChange],
        snapshot_version: int | None,
        position: Position | None = None,
    ) -> FeedApplied:
        applied = stale = 0
        for account, value in changes:
            stored = self.accounts.get(account)
            if value is None:
                applied += self.accounts.pop(account, None) is not None
            elif stored is not None and value.version <= stored.version:
                stale += value.version < stored.version
            else:
                self.accounts[account] = value
                applied += 1
        if snapshot_version is not None:
            self.snapshot_version = snapshot_version
        self.position = position or self.position
        self.batches.append(len(changes))
        async with self._changed:
            self._changed.notify_all()
        return FeedApplied(applied, stale)

    async def reconcile_feed(
        self, present: Set[str], snapshot_version: int | None, position: Position | None = None
    ) -> int:
        gone = [account for account in self.accounts if account not in present]
        for account in gone:
            del self.accounts[account]
        if snapshot_version is not None:
            self.snapshot_version = snapshot_version
        self.position = position or self.position
        return len(gone)

    async def feed_position(self) -> tuple[Position | None, int]:
        return self.position, len(self.accounts)

    async def apply_resolved(self, changes: Mapping[str, Sequence[Network]]) -> None:
        self.resolved.update((hostname, tuple(networks)) for hostname, networks in changes.items())

    def live(self) -> dict[str, int]:
        return {a: v.version for a, v in self.accounts.items() if isinstance(v, AccountValue)}


def value(version: int, *addresses: str) -> AccountValue:
    return AccountValue(version, tuple(ipaddress.ip_network(a) for a in addresses))


async def eventually(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> float:
    """Seconds until `predicate()` holds; fails past the timeout (a bounded poll)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, "condition not reached in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@contextlib.asynccontextmanager
async def running(
    servers: Sequence[str], sink: MemorySink | None = None, replicas: int = 1
) -> AsyncIterator[tuple[Feed, MemorySink]]:
    sink = sink or MemorySink()
    feed = Feed(Settings(tuple(servers), replicas=replicas), sink, LAB)
    async with running_feed(feed):
        await eventually(lambda: feed.state.caught_up)
        yield feed, sink


@contextlib.asynccontextmanager
async def running_feed(feed: Feed) -> AsyncIterator[None]:
    task = asyncio.create_task(feed.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def raw_bucket(servers: Sequence[str]) -> AsyncIterator[KeyValue]:
    """A plain nats-py client on the bucket, as a portal writing directly would use."""
    nc = await nats.connect(servers=list(servers), max_reconnect_attempts=-1)
    try:
        js = nc.jetstream()
        try:
            yield await js.key_value(BUCKET)
        except nats.js.errors.BucketNotFoundError:
            yield await js.create_key_value(bucket=BUCKET, history=1)
    finally:
        await nc.close()


@pytest.fixture
def single(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    with nats_cluster(tmp_path, size=1) as cluster:
        yield cluster


async def test_a_write_reaches_a_follower_and_the_writer_reads_its_own(
    single: NatsCluster,
) -> None:
    async with running(single.urls) as (writer, mine), running(single.urls) as (_, theirs):
        revision, _ = await writer.writes.put_account("acct:1.eu", value(3, "203.0.113.7/32"))
        assert await writer.wait_applied(revision)
        assert mine.accounts["acct:1.eu"] == value(3, "203.0.113.7/32")  # read-your-writes
        await eventually(lambda: "acct:1.eu" in theirs.accounts, 1.0)
        revision, existed = await writer.writes.delete_account("acct:1.eu", 4)
        assert existed
        await eventually(lambda: theirs.accounts.get("acct:1.eu") == Tombstone(4), 1.0)
        assert theirs.live() == {}
        assert writer.state.applied >= 2 and writer.state.rejected == 0


async def test_catch_up_reads_every_key_then_reports_caught_up(single: NatsCluster) -> None:
    async with raw_bucket(single.urls) as kv:
        for i in range(500):
            await kv.put(account_key(f"a{i}"), encode_value(value(i + 1, f"203.0.{i % 250}.0/24")))
        await kv.put(account_key("gone"), encode_value(Tombstone(7)))
        last = (await kv.status()).stream_info.state.last_seq
    async with running(single.urls) as (feed, sink):
        assert len(sink.live()) == 500 and sink.accounts["gone"] == Tombstone(7)
        assert feed.state.last_revision == last and feed.state.lag == 0
        assert feed.state.applied == 501


async def test_stale_and_conflicting_versions_are_refused_fleet_wide(
    single: NatsCluster,
) -> None:
    async with running(single.urls) as (one, _), running(single.urls) as (two, _):
        first, _ = await one.writes.put_account("x", value(5, "203.0.113.7/32"))
        with pytest.raises(StaleWriteError, match="older"):
            await two.writes.put_account("x", value(4, "203.0.113.7/32"))
        with pytest.raises(StaleWriteError, match="other content"):
            await two.writes.put_account("x", value(5, "203.0.113.8/32"))
        assert (await two.writes.put_account("x", value(5, "203.0.113.7/32")))[0] == first  # no-op
        with pytest.raises(StaleWriteError):
            await two.writes.delete_account("x", 5)


async def test_racing_writers_leave_the_highest_version(single: NatsCluster) -> None:
    """Compare-and-set: of concurrent writes to one account, each either lands on the value
    it read or is retried on the new one; the newest version always ends up stored."""
    async with running(single.urls) as (one, sink), running(single.urls) as (two, _):

        async def write(feed: Feed, version: int) -> None:
            with contextlib.suppress(StaleWriteError):
                await feed.writes.put_account("race", value(version, "203.0.113.7/32"))

        await asyncio.gather(*(write((one, two)[v % 2], v) for v in range(1, 13)))
        await eventually(lambda: sink.live().get("race") == 12)
        async with raw_bucket(single.urls) as kv:
            assert (await kv.get(account_key("race"))).value == encode_value(
                value(12, "203.0.113.7/32")
            )


async def test_bad_values_are_skipped_whole_and_counted(single: NatsCluster) -> None:
    async with running(single.urls) as (feed, sink), raw_bucket(single.urls) as kv:
        await kv.put(account_key("ok"), encode_value(value(5, "203.0.113.7/32")))
        await eventually(lambda: "ok" in sink.accounts)
        bad = [
            (account_key("ok"), b'{"version": 9, "addresses": ["203.0.113.9", "bogus"]}'),
            (account_key("ok"), b"not json"),
            (account_key("ok"), encode_value(value(4, "203.0.113.4/32"))),  # going backwards
            (account_key("b"), b'{"version": 1, "addresses": ["203.0.113.0/8"]}'),
            ("acct.not.an.id", encode_value(value(1))),
            ("stray", encode_value(value(1))),
            (SNAPSHOT_KEY, b'{"version": "x"}'),
        ]
        for key, data in bad:
            await kv.put(key, data)
        await kv.put(account_key("after"), encode_value(value(6, "203.0.113.6/32")))
        await eventually(lambda: "after" in sink.accounts)
        assert feed.state.rejected == len(bad)
        assert sink.accounts["ok"] == value(5, "203.0.113.7/32")  # nothing half-applied
        assert "b" not in sink.accounts


async def test_reconciles_what_was_purged_while_away(single: NatsCluster) -> None:
    sink = MemorySink()
    async with running(single.urls, sink) as (feed, _):
        for name in ("keep", "purged", "wiped"):
            await feed.writes.put_account(name, value(2, "203.0.113.7/32"))
        await feed.writes.delete_account("tomb", 3)
        await eventually(lambda: len(sink.accounts) == 4)
    async with raw_bucket(single.urls) as kv:
        await kv.purge(account_key("purged"))  # leaves a purge marker
        js = kv._js  # a stream purge leaves nothing: only reconciliation notices
        for name in ("wiped", "tomb"):
            await js.purge_stream(stream_name(BUCKET), subject=f"$KV.{BUCKET}.{account_key(name)}")
    async with running(single.urls, sink) as (feed, _):
        assert set(sink.accounts) == {"keep"}
        assert feed.state.reconciled == 2


async def test_an_empty_bucket_keeps_the_local_copy(single: NatsCluster) -> None:
    sink = MemorySink()
    sink.accounts["local"] = value(1, "203.0.113.7/32")
    async with running(single.urls, sink):
        assert "local" in sink.accounts


async def test_a_snapshot_replaces_the_bucket_and_lands_in_one_step(
    single: NatsCluster,
) -> None:
    async with running(single.urls) as (writer, _), running(single.urls) as (_, sink):
        await writer.writes.put_account("old", value(2, "203.0.113.7/32"))
        await writer.writes.delete_account("tomb", 3)
        await eventually(lambda: len(sink.accounts) == 2)
        accounts = {f"s{i}": (ipaddress.ip_network("198.51.100.0/24"),) for i in range(300)}
        revision = await writer.writes.replace_snapshot(Snapshot(10, accounts))
        assert await writer.wait_applied(revision)
        await eventually(lambda: sink.snapshot_version == 10)
        assert set(sink.accounts) == set(accounts)
        assert max(sink.batches) >= 302  # 300 accounts and 2 removals in one apply
        with pytest.raises(StaleWriteError, match="snapshot"):
            await writer.writes.put_account("late", value(10, "203.0.113.7/32"))
        with pytest.raises(StaleWriteError, match="older"):
            await writer.writes.replace_snapshot(Snapshot(9, {}))
        await writer.writes.put_account("late", value(11, "203.0.113.7/32"))


async def test_an_interrupted_snapshot_is_staged_until_repeated(single: NatsCluster) -> None:
    async with running(single.urls) as (writer, sink), raw_bucket(single.urls) as kv:
        await writer.writes.put_account("old", value(2, "203.0.113.7/32"))
        await kv.put(SNAPSHOT_KEY, encode_marker(SnapshotMarker(5, False)))
        await kv.put(account_key("new"), encode_value(value(5, "203.0.113.5/32")))
        await kv.put(account_key("live"), encode_value(value(6, "203.0.113.6/32")))
        await eventually(lambda: "live" in sink.accounts)
        assert "new" not in sink.accounts  # staged: the snapshot has not completed
        await writer.writes.replace_snapshot(
            Snapshot(5, {"new": value(5, "203.0.113.5/32").networks})
        )
        await eventually(lambda: sink.snapshot_version == 5)
        assert set(sink.live()) == {"new", "live"}  # `live` is newer than the snapshot


async def test_a_killed_server_in_a_cluster_is_survived(tmp_path: Path) -> None:
    with nats_cluster(tmp_path, size=3) as cluster:
        async with (
            running(cluster.urls, replicas=3) as (writer, _),
            running(cluster.urls, replicas=3) as (follower, sink),
        ):
            await writer.writes.put_account("before", value(1, "203.0.113.1/32"))
            await eventually(lambda: "before" in sink.accounts)
            attached = follower._nc.connected_url.port  # type: ignore[union-attr]
            victim = next(i for i, s in enumerate(cluster.servers) if s.client_port == attached)
            cluster.kill(victim)
            killed = time.monotonic()
            accepted: list[float] = []
            converged: list[float] = []
            for version in range(2, 12):
                while True:
                    try:
                        await writer.writes.put_account("after", value(version, "203.0.113.2/32"))
                        break
                    except FeedUnavailable:  # no stream leader yet: the cluster is electing
                        assert time.monotonic() - killed < ELECTION_S
                        await asyncio.sleep(0.05)
                accepted.append(time.monotonic() - killed)
                converged.append(
                    await eventually(lambda v=version: sink.live().get("after") == v)  # type: ignore[misc]
                )
            print(
                f"writes accepted again {accepted[0]:.2f}s after the kill; follower behind the"
                f" writer by at most {max(converged):.3f}s"
            )
            # SPEC 4's second holds from the first write the cluster accepts; that write may
            # have been stored during the election (its first try timed out) while the
            # watch's consumer was being re-created, so it alone gets longer.
            assert converged[0] < 3.0
            assert max(converged[1:]) < 1.0
            await eventually(lambda: follower.state.caught_up, ELECTION_S)
            cluster.start(victim)
            await writer.writes.put_account("back", value(1, "203.0.113.3/32"))
            await eventually(lambda: "back" in sink.accounts, 2.0)


async def test_tls_to_the_servers_with_the_configured_ca(tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path / "tls")
    with nats_cluster(tmp_path, size=1, tls=(cert, key)) as cluster:
        assert cluster.urls[0].startswith("tls://")
        sink = MemorySink()
        feed = Feed(Settings(tuple(cluster.urls), tls_ca_file=ca), sink, LAB)
        async with running_feed(feed):
            await eventually(lambda: feed.state.caught_up)
            revision, _ = await feed.writes.put_account("tls", value(1, "203.0.113.7/32"))
            assert await feed.wait_applied(revision) and "tls" in sink.accounts
        # Without the CA the server's certificate is not trusted: no connection at all.
        untrusting = Feed(Settings(tuple(cluster.urls)), MemorySink(), LAB)
        async with running_feed(untrusting):
            with pytest.raises(AssertionError):
                await eventually(lambda: untrusting.state.connected, 2.0)


async def test_resolved_hostnames_reach_every_follower(single: NatsCluster) -> None:
    """The fleet's one DDNS refresher writes what a hostname resolves to; every node applies it
    (after the accounts, at catch-up too); a bad value is skipped and counted."""
    home = (ipaddress.ip_network("203.0.113.9/32"), ipaddress.ip_network("2001:db8::9/128"))
    async with running(single.urls) as (refresher, mine), running(single.urls) as (_, theirs):
        revision = await refresher.writes.apply_resolved({"home.example.net": home})
        assert await refresher.wait_applied(revision)
        assert mine.resolved["home.example.net"] == home
        await eventually(lambda: theirs.resolved.get("home.example.net") == home, 1.0)
        await refresher.writes.apply_resolved({"home.example.net": ()})
        await eventually(lambda: theirs.resolved.get("home.example.net") == (), 1.0)
        async with raw_bucket(single.urls) as kv:
            await kv.put("host.bad.example.net", b'{"addresses": ["203.0.113.0/24"]}')
            await kv.put("host.home.example.net", b'{"addresses": ["203.0.113.10"]}')
        await eventually(lambda: len(theirs.resolved.get("home.example.net", ())) == 1, 1.0)
        assert "bad.example.net" not in theirs.resolved and refresher.state.rejected == 1
    async with running(single.urls) as (_, late):
        assert late.resolved == {"home.example.net": (ipaddress.ip_network("203.0.113.10/32"),)}

"""The DDNS refresher component (node.ddns): where it runs, once per deployment (SPEC 3), and
how it follows the store's hostnames, at the cost of what changed (SPEC 4), real SQLite."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from smartdns.config.model import Config, DdnsConfig, FeedConfig, RegistrationsConfig
from smartdns.core.chain import Resolution
from smartdns.node.components import SinkService
from smartdns.node.ddns import DdnsService, HostnameFollower, runs_refresher
from smartdns.registrations.entries import Snapshot
from smartdns.registrations.feed_format import AccountValue
from smartdns.registrations.sources.ddns import Addresses, HostnameRefresher, _Name
from smartdns.registrations.store import HostnameChanges, RegistrationStore

A = ipaddress.IPv4Network("203.0.113.7/32")
B = ipaddress.IPv4Network("203.0.113.8/32")
H1 = "home.example.net"
H2 = "other.example.net"


@pytest.mark.parametrize(
    ("feed", "expected"),
    [
        (None, True),  # a single node resolves its own hostnames
        (FeedConfig(servers=("nats://127.0.0.1:4222",), refresher=False), False),
        (FeedConfig(servers=("nats://127.0.0.1:4222",), refresher=True), True),
    ],
)
def test_with_a_feed_only_the_refresher_node_resolves(
    feed: FeedConfig | None, expected: bool
) -> None:
    assert runs_refresher(Config(path=Path("smartdns.yaml"), feed=feed)) is expected


async def test_a_node_that_does_not_resolve_has_no_ddns_figures(tmp_path: Path) -> None:
    async def announce(generation: int, everything: bool) -> None:
        raise AssertionError("nothing is written")

    feed = FeedConfig(servers=("nats://127.0.0.1:4222",), refresher=False)
    service = DdnsService(SinkService(announce))  # never started: its sink is never asked for
    await service.start(Config(path=tmp_path / "smartdns.yaml", feed=feed))  # opens nothing
    assert service.sample() is None
    await service.stop()


# --- following the store's hostnames: incremental, checked against a full read ----------


class NoResolver:
    """The refresher is never started here: only what it is told to hold is checked."""

    async def resolve(self, hostname: str) -> Resolution:
        raise AssertionError("no lookup is made")


class NoSink:
    async def apply_resolved(self, changes: Mapping[str, Addresses]) -> None:
        raise AssertionError("nothing is resolved")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RegistrationStore]:
    async with await RegistrationStore.open(tmp_path / "r.db", create=True) as opened:
        yield opened


def following(store: RegistrationStore) -> tuple[HostnameFollower, HostnameRefresher]:
    refresher = HostnameRefresher(DdnsConfig(), RegistrationsConfig(), NoResolver(), NoSink())
    return HostnameFollower(store.hostnames, refresher), refresher


def held_refs(refresher: HostnameRefresher) -> Counter[str]:
    """How many accounts the refresher counts for each hostname it keeps resolved."""
    return Counter({name: _Name._make(raw).refs for name, raw in refresher._names.items()})


async def assert_follows_a_full_read(
    store: RegistrationStore, follower: HostnameFollower, refresher: HostnameRefresher
) -> None:
    _generation, full = await store.hostnames.registered_hostnames()
    assert dict(follower.held) == full
    assert held_refs(refresher) == Counter(name for names in full.values() for name in names)


def host(i: int) -> str:
    return f"h{i}.example.net"


async def test_a_hostname_write_reads_only_the_accounts_it_touched(
    store: RegistrationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    accounts = {f"acct{i:04}": [A] for i in range(2500)}
    names = {account: (host(2 * i), host(2 * i + 1)) for i, account in enumerate(accounts)}
    await store.accounts.replace_snapshot(Snapshot(1, accounts, names))  # 5,000 hostnames
    follower, refresher = following(store)
    await follower.load()
    reads: list[HostnameChanges] = []
    real = store.hostnames.hostname_changes

    async def spied(since: int) -> HostnameChanges:
        reads.append(await real(since))
        return reads[-1]

    monkeypatch.setattr(store.hostnames, "hostname_changes", spied)
    swapped = [host(0), "new.example.net"]
    await store.accounts.put_account("acct0000", 2, [A], swapped)  # one swapped
    await store.accounts.delete_account("acct0001", 3)
    await store.accounts.put_account("fresh", 4, [A], [host(4)])  # a name another account holds
    await store.accounts.put_account("acct0003", 5, [A], [])  # entries only: no hostname left
    await follower.follow()
    assert len(reads) == 1 and not reads[0].full_load
    assert sorted(reads[0].accounts) == ["acct0000", "acct0001", "acct0003", "fresh"]
    await assert_follows_a_full_read(store, follower, refresher)
    await store.accounts.put_account("acct0002", 6, [B], names["acct0002"])  # the same hostnames:
    await follower.follow()  # the poll stops at hostnames_generation
    assert len(reads) == 1


async def test_an_account_dropped_without_a_tombstone_reloads_whole(
    store: RegistrationStore,
) -> None:
    await store.feed.apply_feed(
        [("keep", AccountValue(1, (A,), (H1,))), ("drop", AccountValue(1, (A,), (H2,)))], None
    )
    follower, refresher = following(store)
    await follower.load()
    since = await store.readers.generation()
    assert await store.feed.reconcile_feed({"keep"}, None) == 1  # its row is gone, not written
    assert (await store.hostnames.hostname_changes(since)).full_load
    await follower.follow()
    await assert_follows_a_full_read(store, follower, refresher)
    assert refresher.hostnames == 1


@pytest.mark.parametrize("seed", range(20))
async def test_random_writes_followed_as_a_full_read_sees_them(
    store: RegistrationStore, seed: int
) -> None:
    rng = random.Random(seed)
    follower, refresher = following(store)
    await follower.load()
    for version in range(1, 61):
        account = f"a{rng.randrange(12)}"
        kind = rng.randrange(10)
        hostnames = [host(rng.randrange(15)) for _ in range(rng.randrange(5))]
        if kind < 5:
            await store.accounts.put_account(account, version, [A], hostnames)
        elif kind < 7:
            await store.accounts.delete_account(account, version)
        elif kind == 7:
            await store.feed.apply_feed([(account, None)], None)  # purged in the bucket
        elif kind == 8:
            present = {f"a{i}" for i in range(12) if rng.random() < 0.8}
            await store.feed.reconcile_feed(present, None)
        else:
            accounts = {f"a{i}": [A] for i in range(rng.randrange(12))}
            picked = {name: (host(rng.randrange(15)),) for name in accounts if rng.random() < 0.5}
            await store.accounts.replace_snapshot(Snapshot(version, accounts, picked))
        if rng.random() < 0.5:
            await follower.follow()
            await assert_follows_a_full_read(store, follower, refresher)
    await follower.follow()
    await assert_follows_a_full_read(store, follower, refresher)

"""ClientsFollower on a real SQLite store: incremental apply equals a full rebuild."""

from __future__ import annotations

import asyncio
import ipaddress
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartdns.core.clients import AuthorizedClients, device_digest
from smartdns.errors import StaleWriteError
from smartdns.registrations.entries import Network, Snapshot
from smartdns.registrations.feed_format import AccountValue
from smartdns.registrations.follower import ClientsFollower, load_clients
from smartdns.registrations.store import Changes, RegistrationStore, database, schema

# A small pool, so that accounts share prefixes and prefixes nest.
POOL: tuple[Network, ...] = (
    ipaddress.IPv4Network("203.0.113.7/32"),
    ipaddress.IPv4Network("203.0.113.0/24"),
    ipaddress.IPv4Network("203.0.113.8/32"),
    ipaddress.IPv4Network("198.51.100.0/24"),
    ipaddress.IPv6Network("2001:db8::1/128"),
    ipaddress.IPv6Network("2001:db8::/64"),
    ipaddress.IPv6Network("2001:db8:1::/48"),
)
ACCOUNTS = ("a", "b", "c")
# Device ID digests, few so that accounts come to share them (the feed allows that).
DEVICES = tuple(device_digest(f"device{index:020d}") for index in range(3))


def contents(clients: AuthorizedClients) -> tuple[object, ...]:
    """What a set authorizes: the prefixes per family and length (empty lengths left out),
    and the device ID digests."""
    families = (clients._v4_sets, clients._v6_sets)
    by_length = [{n: frozenset(s) for n, s in sets.items() if s} for sets in families]
    return (*by_length, clients.entries, frozenset(clients.devices))


class Node:
    """A store and a follower of it, as a DNS process has them."""

    def __init__(self, store: RegistrationStore, follower: ClientsFollower) -> None:
        self.store = store
        self.follower = follower
        self.published: list[AuthorizedClients] = []

    @classmethod
    async def open(cls, path: Path) -> Node:
        store = await RegistrationStore.open(path, create=True)
        generation, clients = await load_clients(store)
        node = cls.__new__(cls)
        node.published = []
        node.store = store
        node.follower = ClientsFollower(store, clients, generation, node.published.append)
        return node

    async def matches_a_full_load(self) -> None:
        for generation in range(1, await self.store.readers.generation() + 1):  # snapshots included
            await self.follower.wait_applied(generation)
        _, rebuilt = await load_clients(self.store)
        assert contents(self.follower.clients) == contents(rebuilt)

    async def close(self) -> None:
        await self.follower.close()
        await self.store.close()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    opened = await Node.open(tmp_path / "registrations.db")
    yield opened
    await opened.close()


_networks = st.lists(st.sampled_from(POOL), max_size=4)
_devices = st.lists(st.sampled_from(DEVICES), max_size=2, unique=True)
_write = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(ACCOUNTS), _networks),
    st.tuples(st.just("devices"), st.sampled_from(ACCOUNTS), _devices),
    st.tuples(st.just("feed"), st.sampled_from(ACCOUNTS), _devices),
    st.tuples(st.just("add_devices"), st.sampled_from(ACCOUNTS), _devices),
    st.tuples(st.just("remove_devices"), st.sampled_from(ACCOUNTS), _devices),
    st.tuples(st.just("delete"), st.sampled_from(ACCOUNTS), st.just([])),
    st.tuples(st.just("add"), st.sampled_from(ACCOUNTS), _networks),
    st.tuples(st.just("remove"), st.sampled_from(ACCOUNTS), _networks),
    st.tuples(st.just("remove_all"), st.sampled_from(ACCOUNTS), st.just([])),
    st.tuples(
        st.just("snapshot"),
        st.just(""),
        st.lists(st.tuples(st.sampled_from(ACCOUNTS), _networks), max_size=3),
    ),
    st.tuples(st.just("catch_up"), st.just(""), st.just([])),
)


async def _write_one(store: RegistrationStore, version: int, step: tuple[str, str, list]) -> None:
    kind, account, values = step
    try:
        if kind == "put":
            await store.accounts.put_account(account, version, values)
        elif kind == "devices":
            await store.accounts.put_account(account, version, POOL[:1], (), values)
        elif kind == "feed":  # no conflict check: two accounts may come to hold one ID
            await store.feed.apply_feed(
                [(account, AccountValue(version, (), (), tuple(values)))], None
            )
        elif kind == "add_devices":
            await store.accounts.add_entries(account, [], 16, devices=values, max_devices=8)
        elif kind == "remove_devices":
            await store.accounts.remove_entries(account, [], devices=values)
        elif kind == "delete":
            await store.accounts.delete_account(account, version)
        elif kind == "add":
            await store.accounts.add_entries(account, values, 16)
        elif kind == "remove":
            await store.accounts.remove_entries(account, values)
        elif kind == "remove_all":
            await store.accounts.remove_entries(account, None)
        elif kind == "snapshot":
            accounts = {name: tuple(networks) for name, networks in values}
            devices = {name: DEVICES[len(networks) % 3 :][:1] for name, networks in values}
            await store.accounts.replace_snapshot(
                Snapshot(version, MappingProxyType(accounts), devices=MappingProxyType(devices))
            )
    except StaleWriteError:
        pass


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(_write, max_size=25), keep=st.sampled_from([1, 3, 65_536]))
def test_incremental_apply_equals_a_full_rebuild(
    steps: list[tuple[str, str, list]], keep: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After any sequence of writes, caught up at random points (and with removed rows
    pruned early, forcing full loads), the followed set equals one built from scratch."""
    monkeypatch.setattr(database, "KEEP_REMOVED_GENERATIONS", keep)
    monkeypatch.setattr(database, "PRUNE_EVERY", 1)

    async def run() -> None:
        with tempfile.TemporaryDirectory() as directory:
            node = await Node.open(Path(directory) / "registrations.db")
            try:
                for version, step in enumerate(steps, start=1):
                    if step[0] == "catch_up":
                        await node.follower.catch_up()
                    else:
                        await _write_one(node.store, version, step)
                await node.matches_a_full_load()
            finally:
                await node.close()

    asyncio.run(asyncio.wait_for(run(), 30))


async def test_a_write_is_applied_in_place_and_costs_what_it_touches(node: Node) -> None:
    await node.store.accounts.replace_snapshot(
        Snapshot(1, MappingProxyType({f"bulk-{i}": (POOL[0],) for i in range(50)}))
    )
    await node.follower.wait_applied(await node.store.readers.generation())
    assert len(node.published) == 1  # the snapshot: a full load, swapped in
    held = node.follower.clients
    await node.store.accounts.put_account("a", 2, [POOL[3], POOL[4]])
    changes = await node.store.readers.changes_since(node.follower.generation)
    assert (len(changes.present), len(changes.gone)) == (2, 0)  # not the 50 others
    await node.follower.wait_applied(await node.store.readers.generation())
    assert node.follower.clients is held and len(node.published) == 1  # in place, no rebuild
    assert held.is_authorized("198.51.100.9") and held.is_authorized("2001:db8::1")
    await node.store.accounts.put_account("a", 3, [POOL[3]])
    await node.follower.wait_applied(await node.store.readers.generation())
    assert not held.is_authorized("2001:db8::1")
    await node.matches_a_full_load()


async def test_concurrent_writes_are_confirmed_by_one_read(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writes of concurrent sync API requests wait together: one read of what changed
    applies them all (each used to queue its own read behind the others')."""
    for version in range(1, 9):
        await node.store.accounts.put_account(f"a{version}", version, [POOL[version % 3]])
    reads: list[int] = []
    read = node.store.readers.changes_since

    async def counted(generation: int) -> Changes:
        reads.append(generation)
        return await read(generation)

    monkeypatch.setattr(node.store.readers, "changes_since", counted)
    async with asyncio.timeout(5):
        await asyncio.gather(*(node.follower.wait_applied(g) for g in range(1, 9)))
    assert reads == [0]
    assert node.follower.clients.is_authorized("203.0.113.8")
    await node.matches_a_full_load()


@pytest.mark.timeout(10)  # the defect spun the loop: no asyncio timeout could fire
async def test_a_write_the_ended_read_missed_is_read_again(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter that runs after the shared read ended but before its end was noticed (its
    done callback comes later in the loop's queue) starts a new read. It joined the ended
    one instead, which returned at once without covering its write, again and again: the
    loop spun and the node answered nothing (bench/soak.py under load)."""
    await node.store.accounts.put_account("a", 1, [POOL[0]])
    looked, gate, ending = asyncio.Event(), asyncio.Event(), asyncio.Event()
    read = node.store.readers.changes_since
    reads: list[int] = []

    async def held_back(generation: int) -> Changes:
        reads.append(generation)
        changes = await read(generation)
        if len(reads) == 1:  # the first read: it ends after the second write
            looked.set()
            await gate.wait()
            ending.set()  # wakes the second waiter ahead of the read's done callback
        return changes

    async def second_waiter() -> None:
        await ending.wait()
        await node.follower.wait_applied(2)

    monkeypatch.setattr(node.store.readers, "changes_since", held_back)
    first = asyncio.create_task(node.follower.wait_applied(1))
    async with asyncio.timeout(5):
        await looked.wait()
    await node.store.accounts.put_account("b", 2, [POOL[2]])
    second = asyncio.create_task(second_waiter())
    gate.set()
    async with asyncio.timeout(5):
        await asyncio.gather(first, second)
    assert node.follower.clients.is_authorized("203.0.113.8")


async def test_a_prefix_two_accounts_hold_stays_until_both_let_go(node: Node) -> None:
    await node.store.accounts.put_account("a", 1, [POOL[0]])
    await node.store.accounts.put_account("b", 2, [POOL[0]])
    await node.store.accounts.delete_account("a", 3)
    await node.follower.wait_applied(await node.store.readers.generation())
    assert node.follower.clients.is_authorized("203.0.113.7")
    await node.store.accounts.remove_entries("b", [POOL[0]])
    await node.follower.wait_applied(await node.store.readers.generation())
    assert not node.follower.clients.is_authorized("203.0.113.7")


async def test_a_write_racing_a_snapshot_is_ordered_by_version(node: Node) -> None:
    """A write after the snapshot is in effect on top of it; one the snapshot superseded is
    not; queries see the older set until the snapshot's is swapped in whole."""
    await node.store.accounts.put_account("old", 1, [POOL[3]])
    await node.follower.wait_applied(await node.store.readers.generation())
    await node.store.accounts.replace_snapshot(Snapshot(5, MappingProxyType({"s": (POOL[0],)})))
    snapshot_generation = await node.store.readers.generation()
    await node.store.accounts.put_account("late", 6, [POOL[4]])
    with pytest.raises(StaleWriteError):
        await node.store.accounts.put_account("stale", 4, [POOL[6]])
    await node.follower.catch_up()  # sees the snapshot: a full load starts, off the loop
    assert not node.follower.is_applied(snapshot_generation)
    assert node.follower.is_applied(snapshot_generation + 1)  # the later write, on top
    assert node.follower.clients.is_authorized("2001:db8::1")
    await node.follower.wait_applied(snapshot_generation)
    clients = node.follower.clients
    assert clients.is_authorized("203.0.113.7") and clients.is_authorized("2001:db8::1")
    assert not clients.is_authorized("198.51.100.1") and not clients.is_authorized("2001:db8:1::")
    await node.matches_a_full_load()


async def test_a_schema_1_database_is_upgraded_and_followed(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "registrations.db"
    with sqlite3.connect(path) as db:
        for statement in schema.SCHEMA_V1:
            db.execute(statement)
        db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', 1)")
        db.execute("INSERT INTO accounts (account, version, deleted) VALUES ('a', 3, 0)")
        db.execute("INSERT INTO entries VALUES ('a', 4, ?, 32)", (POOL[0].network_address.packed,))
        db.execute("UPDATE meta SET value = 7 WHERE key = 'generation'")
    node = await Node.open(path)
    try:
        assert node.follower.clients.is_authorized("203.0.113.7")
        await node.store.accounts.put_account("a", 4, [POOL[3]])
        await node.matches_a_full_load()
        assert not node.follower.clients.is_authorized("203.0.113.7")
    finally:
        await node.close()


async def test_a_reader_past_the_kept_removals_loads_whole_without_spinning(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "KEEP_REMOVED_GENERATIONS", 2)
    monkeypatch.setattr(database, "PRUNE_EVERY", 1)
    for version in range(1, 12):
        await node.store.accounts.put_account("moving", version, [POOL[version % 2]])
    reads = 0
    changes_since = node.store.readers.changes_since

    async def counted(since: int) -> Changes:
        nonlocal reads
        reads += 1
        return await changes_since(since)

    monkeypatch.setattr(node.store.readers, "changes_since", counted)
    await node.follower.wait_applied(await node.store.readers.generation())
    assert reads <= 3  # one to learn a full load is due, one after it; no busy loop
    assert len(node.published) == 1
    await node.matches_a_full_load()


async def test_withdrawn_device_id_stops_authorizing_in_the_same_step(node: Node) -> None:
    """SPEC 2a: withdrawing an ID takes effect with the write (read-your-writes), in place."""
    held = node.follower.clients
    await node.store.accounts.put_account("a", 1, [], (), [DEVICES[0], DEVICES[1]])
    await node.follower.wait_applied(await node.store.readers.generation())
    assert held.holds_device(DEVICES[0]) and held.holds_device(DEVICES[1])
    await node.store.accounts.put_account("a", 2, [], (), [DEVICES[1]])
    await node.follower.wait_applied(await node.store.readers.generation())
    assert not held.holds_device(DEVICES[0]) and held.holds_device(DEVICES[1])
    await node.store.accounts.delete_account("a", 3)
    await node.follower.wait_applied(await node.store.readers.generation())
    assert not held.holds_device(DEVICES[1])
    assert node.follower.clients is held and node.published == []  # in place, no rebuild


async def test_device_id_two_accounts_hold_authorizes_neither(node: Node) -> None:
    """SPEC 3: should the feed bring one ID to two accounts, it authorizes neither; once
    one lets go, the other's authorizes again, without a write to that other account."""
    await node.store.accounts.put_account("a", 1, [], (), [DEVICES[0]])
    await node.follower.wait_applied(await node.store.readers.generation())
    assert node.follower.clients.holds_device(DEVICES[0])
    await node.store.feed.apply_feed([("b", AccountValue(2, (), (), (DEVICES[0],)))], None)
    await node.follower.wait_applied(await node.store.readers.generation())
    assert not node.follower.clients.holds_device(DEVICES[0])
    await node.store.feed.apply_feed([("b", AccountValue(3, (), (), ()))], None)
    await node.follower.wait_applied(await node.store.readers.generation())
    assert node.follower.clients.holds_device(DEVICES[0])
    await node.matches_a_full_load()

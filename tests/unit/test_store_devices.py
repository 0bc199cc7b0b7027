"""Device IDs in the store (schema 4), real SQLite: digests only, one holder per ID, what a
reader at a generation is told, and the upgrade of an existing database."""

from __future__ import annotations

import ipaddress
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from types import MappingProxyType

import pytest

from smartdns.core.clients import device_digest
from smartdns.errors import RegistrationError, StaleWriteError
from smartdns.registrations.entries import Snapshot
from smartdns.registrations.feed_format import AccountValue
from smartdns.registrations.store import RegistrationStore, database
from smartdns.registrations.store.readers import _CHANGED_DEVICES
from smartdns.registrations.store.schema import SCHEMA_VERSION

ID1 = "k3v9q2m8x4t6w1z7p5r0bn2dca"
ID2 = "q8w2e4r6t8y0u2i4o6p8a0s2df"
D1 = device_digest(ID1)
D2 = device_digest(ID2)
D3 = device_digest("z" * 30)
A = ipaddress.IPv4Network("203.0.113.7/32")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RegistrationStore]:
    async with await RegistrationStore.open(tmp_path / "r.db", create=True) as opened:
        yield opened


async def authorizing(store: RegistrationStore) -> set[bytes]:
    return set((await store.readers.load_prefixes())[2])


def file_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


async def test_only_digests_are_stored_and_read_back(store: RegistrationStore) -> None:
    record = await store.accounts.put_account("acct", 1, [A], (), [D2, D1])
    assert record.devices == tuple(sorted((D1, D2)))
    got = await store.readers.get_account("acct")
    assert got is not None and got.devices == tuple(sorted((D1, D2)))
    assert [r.devices for r in await store.readers.list_accounts()] == [tuple(sorted((D1, D2)))]
    assert await authorizing(store) == {D1, D2}
    stored = file_bytes(store.path)
    assert D1 in stored and ID1.encode() not in stored


async def test_same_write_repeated_compares_the_digests(store: RegistrationStore) -> None:
    await store.accounts.put_account("acct", 1, [A], (), [D1])
    generation = await store.readers.generation()
    await store.accounts.put_account("acct", 1, [A], (), [D1])  # a no-op
    assert await store.readers.generation() == generation
    with pytest.raises(StaleWriteError, match="already stored with other content"):
        await store.accounts.put_account("acct", 1, [A], (), [D2])
    with pytest.raises(StaleWriteError, match="already stored with other content"):
        await store.accounts.put_account("acct", 1, [A], (), [])
    assert await store.readers.generation() == generation


async def test_id_another_account_holds_is_a_conflict_named_by_position(
    store: RegistrationStore,
) -> None:
    await store.accounts.put_account("a", 1, [], (), [D1])
    generation = await store.readers.generation()
    with pytest.raises(StaleWriteError) as caught:
        await store.accounts.put_account("b", 2, [A], (), [D2, D1])
    assert str(caught.value) == "device_ids[1]: held by another account"
    assert (
        await store.readers.generation() == generation
        and await store.readers.get_account("b") is None
    )
    with pytest.raises(StaleWriteError, match=r"^device_ids\[0\]: held by another account$"):
        await store.accounts.add_entries("b", [], 16, devices=[D1], max_devices=8)
    await store.accounts.put_account("a", 3, [], (), [D1, D2])  # its own IDs again: no conflict
    await store.accounts.delete_account("a", 4)  # a tombstone holds none
    await store.accounts.put_account("b", 5, [], (), [D1])
    assert await authorizing(store) == {D1}


async def test_id_two_accounts_hold_authorizes_neither(store: RegistrationStore) -> None:
    """Only the feed can bring this about (the bucket has no index by digest)."""
    await store.accounts.put_account("a", 1, [], (), [D1, D2])
    await store.feed.apply_feed([("b", AccountValue(2, (), (), (D1,)))], None)
    assert await authorizing(store) == {D2}
    since = await store.readers.generation()
    await store.feed.apply_feed([("b", AccountValue(3, (), (), ()))], None)
    changes = await store.readers.changes_since(since)
    assert (changes.devices_present, changes.devices_gone) == ([D1], [])  # a's, again
    assert await authorizing(store) == {D1, D2}


async def test_changes_since_reads_what_changed(store: RegistrationStore) -> None:
    await store.accounts.replace_snapshot(
        Snapshot(
            1,
            MappingProxyType({f"bulk-{i}": () for i in range(50)}),
            devices=MappingProxyType(
                {f"bulk-{i}": (device_digest(f"{i:030d}"),) for i in range(50)}
            ),
        )
    )
    assert len(await authorizing(store)) == 50
    since = await store.readers.generation()
    await store.accounts.put_account("a", 2, [], (), [D1, D2])
    changes = await store.readers.changes_since(since)
    assert sorted(changes.devices_present) == sorted([D1, D2]) and changes.devices_gone == []
    since = await store.readers.generation()
    await store.accounts.put_account("a", 3, [], (), [D2])
    changes = await store.readers.changes_since(since)
    assert (changes.devices_present, changes.devices_gone) == ([D2], [D1])
    since = await store.readers.generation()
    await store.accounts.remove_entries("a", [], devices=[D2])
    changes = await store.readers.changes_since(since)
    assert (changes.devices_present, changes.devices_gone) == ([], [D2])
    with sqlite3.connect(store.path) as conn:  # indexed reads, never a scan of device_ids
        plan = str(conn.execute(f"EXPLAIN QUERY PLAN {_CHANGED_DEVICES}", (1, 1)).fetchall())
    assert "accounts_by_generation" in plan and "device_ids_by_digest" in plan
    assert "SCAN d" not in plan and "SCAN x" not in plan


async def test_tombstone_snapshot_and_purge_take_ids_away(store: RegistrationStore) -> None:
    await store.accounts.put_account("a", 1, [], (), [D1])
    await store.accounts.put_account("b", 2, [], (), [D2])
    await store.accounts.put_account("c", 3, [], (), [D3])
    since = await store.readers.generation()
    await store.accounts.delete_account("a", 4)
    await store.feed.reconcile_feed({"a", "c"}, None)  # b purged from the bucket
    changes = await store.readers.changes_since(since)
    assert sorted(changes.devices_gone) == sorted([D1, D2])
    assert await authorizing(store) == {D3}
    await store.accounts.replace_snapshot(Snapshot(9, MappingProxyType({"c": ()})))
    assert await authorizing(store) == set()
    await store.database.forget_removed()
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM removed_devices").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM device_ids").fetchone() == (0,)


async def test_removed_digests_are_pruned_with_removed_entries(
    store: RegistrationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "KEEP_REMOVED_GENERATIONS", 1)
    monkeypatch.setattr(database, "PRUNE_EVERY", 1)
    await store.accounts.put_account("a", 1, [], (), [D1])
    await store.accounts.put_account("a", 2, [], (), [D2])
    await store.accounts.put_account("a", 3, [], (), [D3])
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT digest FROM removed_devices").fetchall() == [(D2,)]
    assert (await store.readers.changes_since(1)).full_load


async def test_operator_add_and_remove_device_ids(store: RegistrationStore) -> None:
    record = await store.accounts.add_entries("acct", [], 16, devices=[D1], max_devices=2)
    assert (record.version, record.devices) == (0, (D1,))
    record = await store.accounts.add_entries("acct", [A], 16, devices=[D2, D1], max_devices=2)
    assert set(record.devices) == {D1, D2}
    with pytest.raises(RegistrationError, match="3 device IDs exceed the limit of 2"):
        await store.accounts.add_entries("acct", [], 16, devices=[D3], max_devices=2)
    assert await store.accounts.remove_entries("acct", [], devices=[D1])
    got = await store.readers.get_account("acct")
    assert got is not None and (got.networks, got.devices) == ((A,), (D2,))
    assert await store.accounts.remove_entries("acct", None)
    assert await authorizing(store) == set()


async def test_schema_3_database_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with await RegistrationStore.open(path, create=True) as store:
        await store.accounts.put_account("acct", 1, [A])
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE device_ids")
        conn.execute("DROP TABLE removed_devices")
        conn.execute("UPDATE meta SET value = 3 WHERE key = 'schema_version'")
    async with await RegistrationStore.open(path, create=False) as store:
        got = await store.readers.get_account("acct")
        assert got is not None and got.networks == (A,) and got.devices == ()
        await store.accounts.put_account("acct", 2, [A], (), [D1])
        assert await authorizing(store) == {D1}
    with sqlite3.connect(path) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == (SCHEMA_VERSION,) == (4,)

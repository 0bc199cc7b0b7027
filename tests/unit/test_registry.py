"""RegistrationStore on real SQLite files: versions, tombstones, snapshots, overrides."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from types import MappingProxyType

import pytest

from smartdns.config.model import RegistrationsConfig
from smartdns.errors import RegistrationError, StaleWriteError
from smartdns.registrations.entries import (
    AccountEntries,
    Network,
    Snapshot,
    parse_snapshot_document,
)
from smartdns.registrations.store import (
    SCHEMA_VERSION,
    AccountRecord,
    DatabaseError,
    RegistrationStore,
    SnapshotResult,
)

A = ipaddress.IPv4Network("203.0.113.7/32")
B = ipaddress.IPv4Network("198.51.100.0/24")
C = ipaddress.IPv6Network("2001:db8:7::/64")
D = ipaddress.IPv6Network("2001:db8::1/128")


def snapshot(version: int, accounts: dict[str, tuple[Network, ...]]) -> Snapshot:
    return Snapshot(version=version, accounts=MappingProxyType(accounts))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RegistrationStore]:
    opened = await RegistrationStore.open(tmp_path / "registrations.db", create=True)
    yield opened
    await opened.close()


# --- opening ---------------------------------------------------------------------------------


async def test_open_missing_without_create_fails(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    with pytest.raises(DatabaseError) as caught:
        await RegistrationStore.open(path, create=False)
    assert str(path) in str(caught.value)
    assert "smartdns registrations add" in str(caught.value)
    assert not path.exists()


async def test_open_with_create_makes_directories_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "registrations.db"
    store = await RegistrationStore.open(path, create=True)
    assert (await store.status()).snapshot_version == 0
    assert await store.generation() == 0
    await store.close()
    # Reopening (with or without create) keeps the schema and does not reset anything.
    for create in (True, False):
        store = await RegistrationStore.open(path, create=create)
        await store.ping()
        await store.close()


async def test_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "registrations.db"
    store = await RegistrationStore.open(path, create=True)
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert version == (SCHEMA_VERSION,)
    conn.close()


@pytest.mark.parametrize("create", [True, False])
async def test_corrupt_file_fails(tmp_path: Path, create: bool) -> None:
    path = tmp_path / "registrations.db"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(DatabaseError) as caught:
        await RegistrationStore.open(path, create=create)
    assert str(path) in str(caught.value)


async def test_foreign_sqlite_database_fails(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE something (x)")
    conn.close()
    with pytest.raises(DatabaseError, match="not a smartdns registrations database"):
        await RegistrationStore.open(path, create=True)


async def test_empty_file_without_create_fails(tmp_path: Path) -> None:
    path = tmp_path / "registrations.db"
    path.touch()
    with pytest.raises(DatabaseError, match="create it with"):
        await RegistrationStore.open(path, create=False)


# --- PUT -------------------------------------------------------------------------------------


async def test_put_then_get(store: RegistrationStore) -> None:
    record = await store.put_account("acct-1", 5, (C, A, B))
    assert record == AccountRecord("acct-1", 5, (B, A, C))
    assert await store.get_account("acct-1") == record
    assert await store.get_account("acct-2") is None
    assert await store.generation() == 1


async def test_put_replaces_the_set(store: RegistrationStore) -> None:
    await store.put_account("acct-1", 5, (A, B))
    record = await store.put_account("acct-1", 6, (C,))
    assert record == AccountRecord("acct-1", 6, (C,))
    assert (await store.load_prefixes())[1] == [(6, int(C.network_address), 64)]


async def test_put_empty_set_keeps_a_live_account(store: RegistrationStore) -> None:
    await store.put_account("acct-1", 5, ())
    assert await store.get_account("acct-1") == AccountRecord("acct-1", 5, ())


async def test_repeated_put_is_a_noop(store: RegistrationStore) -> None:
    first = await store.put_account("acct-1", 5, (A, C))
    generation = await store.generation()
    assert await store.put_account("acct-1", 5, (C, A, A)) == first
    assert await store.generation() == generation


async def test_put_with_lower_version_is_stale(store: RegistrationStore) -> None:
    await store.put_account("acct-1", 5, (A,))
    generation = await store.generation()
    with pytest.raises(StaleWriteError):
        await store.put_account("acct-1", 4, (B,))
    assert await store.get_account("acct-1") == AccountRecord("acct-1", 5, (A,))
    assert await store.generation() == generation


async def test_put_same_version_other_content_is_stale(store: RegistrationStore) -> None:
    await store.put_account("acct-1", 5, (A,))
    with pytest.raises(StaleWriteError):
        await store.put_account("acct-1", 5, (A, B))
    assert await store.get_account("acct-1") == AccountRecord("acct-1", 5, (A,))


async def test_put_not_above_snapshot_version_is_stale(store: RegistrationStore) -> None:
    await store.replace_snapshot(snapshot(10, {}))
    for version in (9, 10):
        with pytest.raises(StaleWriteError):
            await store.put_account("acct-1", version, (A,))
    assert await store.get_account("acct-1") is None
    await store.put_account("acct-1", 11, (A,))


async def test_repeat_of_snapshot_content_is_a_noop(store: RegistrationStore) -> None:
    await store.replace_snapshot(snapshot(10, {"acct-1": (A,)}))
    assert await store.put_account("acct-1", 10, (A,)) == AccountRecord("acct-1", 10, (A,))
    with pytest.raises(StaleWriteError):
        await store.put_account("acct-1", 10, (B,))


async def test_invalid_account_id_is_rejected(store: RegistrationStore) -> None:
    with pytest.raises(RegistrationError):
        await store.put_account("a b", 1, (A,))
    with pytest.raises(RegistrationError):
        await store.delete_account("", 1)


# --- DELETE ----------------------------------------------------------------------------------


async def test_delete_leaves_a_tombstone(store: RegistrationStore) -> None:
    await store.put_account("acct-1", 5, (A,))
    assert await store.delete_account("acct-1", 6) is True
    assert await store.get_account("acct-1") is None
    assert (await store.load_prefixes())[1] == []
    assert await store.list_accounts() == []
    # Repeating the delete is a no-op; an older PUT cannot bring the account back.
    generation = await store.generation()
    assert await store.delete_account("acct-1", 6) is False
    assert await store.generation() == generation
    for version in (5, 6):
        with pytest.raises(StaleWriteError):
            await store.put_account("acct-1", version, (A,))
    assert await store.put_account("acct-1", 7, (B,)) == AccountRecord("acct-1", 7, (B,))


async def test_delete_of_unknown_account_leaves_a_tombstone(store: RegistrationStore) -> None:
    assert await store.delete_account("acct-9", 8) is False
    assert await store.generation() == 1
    with pytest.raises(StaleWriteError):
        await store.put_account("acct-9", 7, (A,))  # the delayed older PUT
    assert await store.get_account("acct-9") is None
    status = await store.status()
    assert (status.accounts, status.entries) == (0, 0)


async def test_stale_deletes(store: RegistrationStore) -> None:
    await store.put_account("acct-1", 5, (A,))
    for version in (4, 5):  # older, or the same version as the live account
        with pytest.raises(StaleWriteError):
            await store.delete_account("acct-1", version)
    assert await store.get_account("acct-1") is not None
    await store.replace_snapshot(snapshot(10, {}))
    with pytest.raises(StaleWriteError):
        await store.delete_account("acct-2", 10)


async def test_newer_delete_over_tombstone_refreshes_it(store: RegistrationStore) -> None:
    await store.delete_account("acct-1", 5)
    assert await store.delete_account("acct-1", 7) is False
    with pytest.raises(StaleWriteError):
        await store.put_account("acct-1", 6, (A,))
    with pytest.raises(StaleWriteError):
        await store.delete_account("acct-1", 6)


# --- snapshot --------------------------------------------------------------------------------


async def test_snapshot_replaces_everything(store: RegistrationStore) -> None:
    await store.put_account("gone", 3, (D,))
    await store.put_account("acct-1", 4, (A,))
    await store.delete_account("tomb", 5)
    result = await store.replace_snapshot(snapshot(6, {"acct-1": (B, C), "acct-2": ()}))
    assert result == SnapshotResult(accounts=2, entries=2)
    assert await store.list_accounts() == [
        AccountRecord("acct-1", 6, (B, C)),
        AccountRecord("acct-2", 6, ()),
    ]
    assert await store.get_account("gone") is None
    status = await store.status()
    assert (status.accounts, status.entries, status.snapshot_version) == (2, 2, 6)
    assert await store.snapshot_version() == 6
    # The tombstone is gone with the snapshot: a PUT above the snapshot version is accepted.
    assert await store.put_account("tomb", 7, (A,)) == AccountRecord("tomb", 7, (A,))


async def test_parsed_snapshot_is_stored_from_its_rows(store: RegistrationStore) -> None:
    parsed = parse_snapshot_document(
        {
            "version": 3,
            "accounts": {
                "acct-2": ["2001:db8:7::/64", "::ffff:198.51.100.0/120", "203.0.113.7"],
                "acct-1": ["2001:db8::1", "203.0.113.7/32", "::ffff:cb00:7107"],
                "acct-3": [],
            },
        },
        RegistrationsConfig(public_only=False),
    )
    assert all(isinstance(value, AccountEntries) for value in parsed.accounts.values())
    assert await store.replace_snapshot(parsed) == SnapshotResult(accounts=3, entries=5)
    assert await store.list_accounts() == [
        AccountRecord("acct-1", 3, (A, D)),
        AccountRecord("acct-2", 3, (B, A, C)),
        AccountRecord("acct-3", 3, ()),
    ]
    # Entries parsed for another account are stored under the key they are given.
    moved = snapshot(4, {"acct-9": parsed.accounts["acct-1"]})
    assert await store.replace_snapshot(moved) == SnapshotResult(accounts=1, entries=2)
    assert await store.list_accounts() == [AccountRecord("acct-9", 4, (A, D))]


async def test_snapshot_entry_count_ignores_duplicates(store: RegistrationStore) -> None:
    result = await store.replace_snapshot(snapshot(2, {"acct-1": (A, A, C), "acct-2": (A,)}))
    assert result == SnapshotResult(accounts=2, entries=3)
    assert (await store.status()).entries == 3


async def test_snapshot_below_snapshot_version_is_stale(store: RegistrationStore) -> None:
    await store.replace_snapshot(snapshot(10, {"acct-1": (A,)}))
    generation = await store.generation()
    with pytest.raises(StaleWriteError):
        await store.replace_snapshot(snapshot(9, {}))
    assert await store.snapshot_version() == 10
    assert await store.generation() == generation
    # The same snapshot again is accepted.
    assert await store.replace_snapshot(snapshot(10, {"acct-1": (A,)})) == SnapshotResult(1, 1)


@pytest.mark.parametrize("deleted", [False, True])
async def test_snapshot_older_than_an_account_write_is_stale(
    store: RegistrationStore, deleted: bool
) -> None:
    await store.replace_snapshot(snapshot(10, {"acct-1": (A,)}))
    await store.put_account("acct-1", 12, (B,))
    if deleted:
        await store.delete_account("acct-1", 13)
    with pytest.raises(StaleWriteError):
        await store.replace_snapshot(snapshot(11, {"acct-1": (A,)}))
    expected = None if deleted else AccountRecord("acct-1", 12, (B,))
    assert await store.get_account("acct-1") == expected
    assert await store.snapshot_version() == 10


# --- operator overrides ----------------------------------------------------------------------


async def test_add_entries_to_new_account_gets_version_zero(store: RegistrationStore) -> None:
    record = await store.add_entries("acct-1", (C, A), max_per_account=16)
    assert record == AccountRecord("acct-1", 0, (A, C))
    record = await store.add_entries("acct-1", (A, B), max_per_account=16)
    assert record == AccountRecord("acct-1", 0, (B, A, C))


async def test_add_entries_keeps_version(store: RegistrationStore) -> None:
    await store.put_account("acct-1", 5, (A,))
    assert await store.add_entries("acct-1", (B,), 16) == AccountRecord("acct-1", 5, (B, A))
    generation = await store.generation()
    await store.add_entries("acct-1", (B,), 16)
    assert await store.generation() == generation


async def test_add_entries_revives_a_tombstone_at_its_version(store: RegistrationStore) -> None:
    await store.put_account("acct-1", 5, (A,))
    await store.delete_account("acct-1", 6)
    assert await store.add_entries("acct-1", (B,), 16) == AccountRecord("acct-1", 6, (B,))


async def test_add_entries_enforces_the_limit(store: RegistrationStore) -> None:
    await store.put_account("acct-1", 5, (A, B))
    generation = await store.generation()
    with pytest.raises(RegistrationError) as caught:
        await store.add_entries("acct-1", (C, D), max_per_account=3)
    assert caught.value.position == "addresses"
    assert caught.value.reason == "4 entries exceed the limit of 3 per account"
    assert await store.get_account("acct-1") == AccountRecord("acct-1", 5, (B, A))
    assert await store.generation() == generation
    assert await store.add_entries("acct-1", (A, C), 3) == AccountRecord("acct-1", 5, (B, A, C))


async def test_remove_entries(store: RegistrationStore) -> None:
    await store.put_account("acct-1", 5, (A, B, C))
    assert await store.remove_entries("acct-1", (A, D)) is True
    assert await store.get_account("acct-1") == AccountRecord("acct-1", 5, (B, C))
    assert await store.remove_entries("acct-2", (A,)) is False
    assert await store.remove_entries("acct-1", None) is True
    assert await store.get_account("acct-1") is None
    assert await store.remove_entries("acct-1", None) is False
    # The tombstone is at the account's version: a PUT at that version is stale.
    with pytest.raises(StaleWriteError):
        await store.put_account("acct-1", 5, (A,))
    assert await store.delete_account("acct-1", 5) is False  # idempotent tombstone


# --- reads and change detection --------------------------------------------------------------


async def test_list_accounts(store: RegistrationStore) -> None:
    await store.put_account("b", 2, (C,))
    await store.put_account("a", 1, (B, A))
    await store.put_account("c", 3, ())
    await store.delete_account("d", 4)
    assert await store.list_accounts() == [
        AccountRecord("a", 1, (B, A)),
        AccountRecord("b", 2, (C,)),
        AccountRecord("c", 3, ()),
    ]
    assert await store.list_accounts("b") == [AccountRecord("b", 2, (C,))]
    assert await store.list_accounts("d") == []
    assert await store.list_accounts("zzz") == []


async def test_load_prefixes(store: RegistrationStore) -> None:
    await store.put_account("a", 1, (A, B))
    await store.put_account("b", 2, (C, D))
    await store.delete_account("c", 3)
    assert sorted((await store.load_prefixes())[1]) == [
        (4, 0xC6336400, 24),
        (4, 0xCB007107, 32),
        (6, 0x20010DB8000000000000000000000001, 128),
        (6, 0x20010DB8000700000000000000000000, 64),
    ]


async def test_generation_counts_writes_only(store: RegistrationStore) -> None:
    assert await store.generation() == 0
    await store.put_account("a", 1, (A,))
    await store.get_account("a")
    await store.status()
    await store.list_accounts()
    (await store.load_prefixes())[1]
    assert await store.generation() == 1
    await store.delete_account("a", 2)
    await store.replace_snapshot(snapshot(3, {}))
    await store.add_entries("x", (A,), 16)
    await store.remove_entries("x", (A,))
    await store.remove_entries("x", (A,))  # nothing left to remove: no change
    assert await store.generation() == 5


async def test_second_instance_sees_changes(tmp_path: Path) -> None:
    """Two stores on one file stand in for the server and the CLI in separate processes."""
    path = tmp_path / "registrations.db"
    server = await RegistrationStore.open(path, create=True)
    cli = await RegistrationStore.open(path, create=False)
    try:
        before = await server.generation()
        await cli.add_entries("acct-1", (A,), 16)
        assert await server.generation() == before + 1
        assert (await server.load_prefixes())[1] == [(4, int(A.network_address), 32)]
        await server.put_account("acct-1", 9, (B,))
        assert await cli.get_account("acct-1") == AccountRecord("acct-1", 9, (B,))
        with pytest.raises(StaleWriteError):
            await cli.put_account("acct-1", 8, (A,))
    finally:
        await cli.close()
        await server.close()


async def test_concurrent_writes_serialize(store: RegistrationStore) -> None:
    async def put(index: int) -> None:
        await store.put_account(f"acct-{index}", index + 1, (A,))

    async with asyncio.timeout(30):
        await asyncio.gather(*(put(index) for index in range(50)))
    assert (await store.status()).accounts == 50
    assert await store.generation() == 50


@pytest.mark.parametrize("steps", range(8))
async def test_cancelled_write_leaves_no_open_transaction(
    store: RegistrationStore, steps: int
) -> None:
    task = asyncio.create_task(store.put_account("acct-1", 1, (A,)))
    for _ in range(steps):  # cancel at different points of the transaction
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    async with asyncio.timeout(10):
        await store.put_account("acct-2", 2, (B,))
        assert await store.get_account("acct-2") == AccountRecord("acct-2", 2, (B,))
        # All or nothing: a cancel may land after COMMIT went out, never half-way.
        first = await store.get_account("acct-1")
        assert first in (None, AccountRecord("acct-1", 1, (A,)))
        assert await store.generation() == (1 if first is None else 2)


async def test_database_errors_name_the_operation(tmp_path: Path) -> None:
    path = tmp_path / "registrations.db"
    store = await RegistrationStore.open(path, create=True)
    await store.put_account("acct-1", 1, (A,))
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE entries")
    conn.close()
    try:
        with pytest.raises(DatabaseError) as caught:
            await store.get_account("acct-1")
        assert "get account" in str(caught.value)
        with pytest.raises(DatabaseError) as caught:
            await store.put_account("acct-1", 2, (B,))
        assert "put account" in str(caught.value)
        assert "203.0.113" not in str(caught.value)
        assert "198.51.100" not in str(caught.value)
    finally:
        await store.close()


async def test_large_snapshot_round_trip(store: RegistrationStore) -> None:
    accounts: dict[str, tuple[Network, ...]] = {}
    base = int(ipaddress.IPv4Address("1.0.0.0"))
    for index in range(10_000):
        v4 = tuple(ipaddress.IPv4Network((base + index * 16 + k, 32)) for k in range(5))
        v6 = tuple(
            ipaddress.IPv6Network(((0x2606 << 112) + (index << 64) + (k << 80), 64))
            for k in range(5)
        )
        accounts[f"acct-{index:05d}"] = v4 + v6
    async with asyncio.timeout(110):
        result = await store.replace_snapshot(snapshot(1, accounts))
        assert result == SnapshotResult(accounts=10_000, entries=100_000)
        prefixes = (await store.load_prefixes())[1]
        assert len(prefixes) == 100_000
        expected = {
            (network.version, int(network.network_address), network.prefixlen)
            for networks in accounts.values()
            for network in networks
        }
        assert set(prefixes) == expected
        records = await store.list_accounts()
        assert len(records) == 10_000
        assert records[123] == AccountRecord("acct-00123", 1, accounts["acct-00123"])
        # Replacing it again (e.g. anti-entropy) works on a full database.
        result = await store.replace_snapshot(snapshot(2, {"acct-1": (A,)}))
        assert result == SnapshotResult(accounts=1, entries=1)
        assert (await store.load_prefixes())[1] == [(4, int(A.network_address), 32)]


async def test_changes_since_reads_what_changed_and_keeps_no_growing_log(
    store: RegistrationStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from smartdns.registrations import store as store_module

    monkeypatch.setattr(store_module, "KEEP_REMOVED_GENERATIONS", 4)
    monkeypatch.setattr(store_module, "_PRUNE_EVERY", 1)
    await store.put_account("keep", 1, [C])
    for version in range(2, 40):  # an address moving every write: churn
        await store.put_account("moving", version, [A if version % 2 else B])
    changes = await store.changes_since(await store.generation() - 1)
    assert not changes.full_load
    assert changes.present == [(4, int(A.network_address), 32)]  # only the account written
    assert changes.gone == [(4, int(B.network_address), 24)]
    assert (await store.changes_since(5)).full_load  # its removed rows are pruned
    with sqlite3.connect(tmp_path / "registrations.db") as db:
        assert db.execute("SELECT COUNT(*) FROM removed").fetchone()[0] <= 4
    db.close()

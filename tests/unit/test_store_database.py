"""The store's Database on real SQLite files: opening, schema, pragmas, transactions."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from smartdns.errors import StaleWriteError
from smartdns.registrations.store import AccountRecord, DatabaseError, RegistrationStore
from smartdns.registrations.store.schema import SCHEMA_VERSION
from tests.registrations_data import A, B

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
    assert (await store.readers.status()).snapshot_version == 0
    assert await store.readers.generation() == 0
    await store.close()
    # Reopening (with or without create) keeps the schema and does not reset anything.
    for create in (True, False):
        store = await RegistrationStore.open(path, create=create)
        await store.database.ping()
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


# --- transactions ----------------------------------------------------------------------------


async def test_second_instance_sees_changes(tmp_path: Path) -> None:
    """Two stores on one file stand in for the server and the CLI in separate processes."""
    path = tmp_path / "registrations.db"
    server = await RegistrationStore.open(path, create=True)
    cli = await RegistrationStore.open(path, create=False)
    try:
        before = await server.readers.generation()
        await cli.accounts.add_entries("acct-1", (A,), 16)
        assert await server.readers.generation() == before + 1
        assert (await server.readers.load_prefixes())[1] == [(4, int(A.network_address), 32)]
        await server.accounts.put_account("acct-1", 9, (B,))
        assert await cli.readers.get_account("acct-1") == AccountRecord("acct-1", 9, (B,))
        with pytest.raises(StaleWriteError):
            await cli.accounts.put_account("acct-1", 8, (A,))
    finally:
        await cli.close()
        await server.close()


async def test_concurrent_writes_serialize(store: RegistrationStore) -> None:
    async def put(index: int) -> None:
        await store.accounts.put_account(f"acct-{index}", index + 1, (A,))

    async with asyncio.timeout(30):
        await asyncio.gather(*(put(index) for index in range(50)))
    assert (await store.readers.status()).accounts == 50
    assert await store.readers.generation() == 50


@pytest.mark.parametrize("steps", range(8))
async def test_cancelled_write_leaves_no_open_transaction(
    store: RegistrationStore, steps: int
) -> None:
    task = asyncio.create_task(store.accounts.put_account("acct-1", 1, (A,)))
    for _ in range(steps):  # cancel at different points of the transaction
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    async with asyncio.timeout(10):
        await store.accounts.put_account("acct-2", 2, (B,))
        assert await store.readers.get_account("acct-2") == AccountRecord("acct-2", 2, (B,))
        # All or nothing: a cancel may land after COMMIT went out, never half-way.
        first = await store.readers.get_account("acct-1")
        assert first in (None, AccountRecord("acct-1", 1, (A,)))
        assert await store.readers.generation() == (1 if first is None else 2)


async def test_database_errors_name_the_operation(tmp_path: Path) -> None:
    path = tmp_path / "registrations.db"
    store = await RegistrationStore.open(path, create=True)
    await store.accounts.put_account("acct-1", 1, (A,))
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE entries")
    conn.close()
    try:
        with pytest.raises(DatabaseError) as caught:
            await store.readers.get_account("acct-1")
        assert "get account" in str(caught.value)
        with pytest.raises(DatabaseError) as caught:
            await store.accounts.put_account("acct-1", 2, (B,))
        assert "put account" in str(caught.value)
        assert "203.0.113" not in str(caught.value)
        assert "198.51.100" not in str(caught.value)
    finally:
        await store.close()

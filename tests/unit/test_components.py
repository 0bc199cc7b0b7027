"""Tests for node.components: the removed-entry pruner against a real store in tmp_path."""

from __future__ import annotations

import asyncio
import ipaddress
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smartdns.config.model import Config, DatabaseConfig
from smartdns.errors import SmartDNSError
from smartdns.node import components
from smartdns.node.components import Database, RemovedEntriesPruner, SinkService
from smartdns.registrations.store import RegistrationStore
from smartdns.registrations.writer import RegistrationWriter

A = ipaddress.IPv4Network("203.0.113.7/32")
B = ipaddress.IPv4Network("198.51.100.0/24")


def removed_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        count = int(db.execute("SELECT COUNT(*) FROM removed").fetchone()[0])
    db.close()
    return count


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[tuple[Database, Config]]:
    path = tmp_path / "registrations.db"
    async with await RegistrationStore.open(path, create=True) as store:
        await store.accounts.put_account("moving", 1, [A])
        await store.accounts.put_account("moving", 2, [B])  # A is removed: one row remembers it
    assert removed_rows(path) == 1
    config = Config(path=tmp_path / "smartdns.yaml", database=DatabaseConfig(path=path))
    database = Database()
    await database.start(config)
    yield database, config
    await database.stop()


async def announce_nothing(generation: int, everything: bool) -> None:
    """No DNS side to tell (the tests read the database)."""


async def test_start_and_stop_forget_every_removed_entry(
    database: tuple[Database, Config],
) -> None:
    db, config = database
    path = config.database.path
    pruner = RemovedEntriesPruner(db, SinkService(announce_nothing))
    await pruner.start(config)
    assert removed_rows(path) == 0  # left by a writer while no node ran (the CLI, a crash)
    await db.store.accounts.put_account("moving", 3, [A])
    assert removed_rows(path) == 1
    changes = await db.store.readers.changes_since(await db.store.readers.generation() - 1)
    assert changes.gone == [(4, int(B.network_address), 24)]  # still there for readers
    await pruner.stop()
    assert removed_rows(path) == 0
    assert (await db.store.readers.changes_since(1)).full_load  # a reader that far behind loads all


async def test_a_removed_entry_is_forgotten_once_kept_long_enough(
    database: tuple[Database, Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(components, "KEEP_REMOVED_S", 0.3)
    monkeypatch.setattr(components, "PRUNE_INTERVAL_S", 0.05)
    db, config = database
    path = config.database.path
    sinks = SinkService(announce_nothing)
    pruner = RemovedEntriesPruner(db, sinks)
    await pruner.start(config)
    await sinks.start(config)
    try:
        await sinks.sink.put_account("moving", 3, [A])
        assert removed_rows(path) == 1
        await until_pruned(path)
        # A write's removals outlive it by KEEP_REMOVED_S, not by a round of the pruner.
        await sinks.sink.put_account("moving", 4, [B])
        assert removed_rows(path) == 1
    finally:
        await sinks.stop()
        await pruner.stop()


async def until_pruned(path: Path) -> None:
    """Wait (up to 5 s) for the pruner, which runs in the background, to leave no row."""
    for _ in range(100):
        if removed_rows(path) == 0:
            return
        await asyncio.sleep(0.05)
    assert removed_rows(path) == 0


async def test_pruning_waits_for_the_writer_without_holding_up_the_dns_side(
    database: tuple[Database, Config],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under a steady stream of sync writes a prune on a connection of its own waited in
    SQLite's busy handler for the write lock (5 s, then "database is locked"), holding the
    DNS side's connection, so the DNS side could not read the writes it had to confirm."""
    monkeypatch.setattr(components, "KEEP_REMOVED_S", 0.0)
    monkeypatch.setattr(components, "PRUNE_INTERVAL_S", 0.05)
    db, config = database
    path = config.database.path
    sinks = SinkService(announce_nothing)
    pruner = RemovedEntriesPruner(db, sinks)
    await pruner.start(config)
    await sinks.start(config)
    try:
        await sinks.sink.put_account("moving", 3, [A])
        async with sinks.store.database.writing("a long write"):  # the writer is busy
            for _ in range(10):  # several rounds of the pruner come due meanwhile
                async with asyncio.timeout(1.0):  # SPEC 4: DNS applies a write within 1 s
                    await db.store.readers.generation()
                await asyncio.sleep(components.PRUNE_INTERVAL_S)
        await until_pruned(path)  # once the writer is free, in turn with it
    finally:
        await sinks.stop()
        await pruner.stop()
    assert "cannot prune" not in caplog.text


# --- the registration sink without a feed -----------------------------------------------------


async def test_without_a_feed_the_sink_is_the_writer_on_a_connection_of_its_own(
    database: tuple[Database, Config],
) -> None:
    db, config = database
    announced: list[tuple[int, bool]] = []

    async def announce(generation: int, everything: bool) -> None:
        announced.append((generation, everything))

    sinks = SinkService(announce)
    await sinks.start(config)
    try:
        assert isinstance(sinks.sink, RegistrationWriter) and sinks.feed_state is None
        assert sinks.store is not db.store  # long writes never hold up the DNS side's polling
        assert not [task for task in asyncio.all_tasks() if task.get_name() == "feed"]
        record = await sinks.sink.put_account("new", 5, [A])
        assert await db.store.readers.get_account("new") == record
        assert announced == [(await db.store.readers.generation(), False)]  # read-your-writes
    finally:
        await sinks.stop()
    with pytest.raises(RuntimeError):
        sinks.sink  # noqa: B018 - the property raises once stopped
    await sinks.stop()  # a second stop closes nothing twice


async def test_the_sink_fails_closed_without_its_database(tmp_path: Path) -> None:
    async def announce(generation: int, everything: bool) -> None:
        raise AssertionError("nothing is written")

    sinks = SinkService(announce)
    config = Config(path=tmp_path / "smartdns.yaml", database=DatabaseConfig(tmp_path / "no.db"))
    with pytest.raises(SmartDNSError):
        await sinks.start(config)
    with pytest.raises(RuntimeError):
        sinks.sink  # noqa: B018

"""The store's readers on real SQLite files: listing, loading, what changed."""

from __future__ import annotations

import asyncio
import ipaddress
import sqlite3
from pathlib import Path

import pytest

from smartdns.registrations.entries import Network
from smartdns.registrations.store import AccountRecord, RegistrationStore, SnapshotResult
from tests.registrations_data import A, B, C, D, snapshot

# --- reads and change detection --------------------------------------------------------------


async def test_list_accounts(store: RegistrationStore) -> None:
    await store.accounts.put_account("b", 2, (C,))
    await store.accounts.put_account("a", 1, (B, A))
    await store.accounts.put_account("c", 3, ())
    await store.accounts.delete_account("d", 4)
    assert await store.readers.list_accounts() == [
        AccountRecord("a", 1, (B, A)),
        AccountRecord("b", 2, (C,)),
        AccountRecord("c", 3, ()),
    ]
    assert await store.readers.list_accounts("b") == [AccountRecord("b", 2, (C,))]
    assert await store.readers.list_accounts("d") == []
    assert await store.readers.list_accounts("zzz") == []


async def test_load_prefixes(store: RegistrationStore) -> None:
    await store.accounts.put_account("a", 1, (A, B))
    await store.accounts.put_account("b", 2, (C, D))
    await store.accounts.delete_account("c", 3)
    assert sorted((await store.readers.load_prefixes())[1]) == [
        (4, 0xC6336400, 24),
        (4, 0xCB007107, 32),
        (6, 0x20010DB8000000000000000000000001, 128),
        (6, 0x20010DB8000700000000000000000000, 64),
    ]


async def test_generation_counts_writes_only(store: RegistrationStore) -> None:
    assert await store.readers.generation() == 0
    await store.accounts.put_account("a", 1, (A,))
    await store.readers.get_account("a")
    await store.readers.status()
    await store.readers.list_accounts()
    (await store.readers.load_prefixes())[1]
    assert await store.readers.generation() == 1
    await store.accounts.delete_account("a", 2)
    await store.accounts.replace_snapshot(snapshot(3, {}))
    await store.accounts.add_entries("x", (A,), 16)
    await store.accounts.remove_entries("x", (A,))
    await store.accounts.remove_entries("x", (A,))  # nothing left to remove: no change
    assert await store.readers.generation() == 5


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
        result = await store.accounts.replace_snapshot(snapshot(1, accounts))
        assert result == SnapshotResult(accounts=10_000, entries=100_000)
        prefixes = (await store.readers.load_prefixes())[1]
        assert len(prefixes) == 100_000
        expected = {
            (network.version, int(network.network_address), network.prefixlen)
            for networks in accounts.values()
            for network in networks
        }
        assert set(prefixes) == expected
        records = await store.readers.list_accounts()
        assert len(records) == 10_000
        assert records[123] == AccountRecord("acct-00123", 1, accounts["acct-00123"])
        # Replacing it again (e.g. anti-entropy) works on a full database.
        result = await store.accounts.replace_snapshot(snapshot(2, {"acct-1": (A,)}))
        assert result == SnapshotResult(accounts=1, entries=1)
        assert (await store.readers.load_prefixes())[1] == [(4, int(A.network_address), 32)]


async def test_changes_since_reads_what_changed_and_keeps_no_growing_log(
    store: RegistrationStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from smartdns.registrations.store import database

    monkeypatch.setattr(database, "KEEP_REMOVED_GENERATIONS", 4)
    monkeypatch.setattr(database, "PRUNE_EVERY", 1)
    await store.accounts.put_account("keep", 1, [C])
    for version in range(2, 40):  # an address moving every write: churn
        await store.accounts.put_account("moving", version, [A if version % 2 else B])
    changes = await store.readers.changes_since(await store.readers.generation() - 1)
    assert not changes.full_load
    assert changes.present == [(4, int(A.network_address), 32)]  # only the account written
    assert changes.gone == [(4, int(B.network_address), 24)]
    assert (await store.readers.changes_since(5)).full_load  # its removed rows are pruned
    with sqlite3.connect(tmp_path / "registrations.db") as db:
        assert db.execute("SELECT COUNT(*) FROM removed").fetchone()[0] <= 4
    db.close()

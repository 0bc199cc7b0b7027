"""Hostname registrations and their resolved addresses in the store (schema 3), real SQLite."""

from __future__ import annotations

import ipaddress
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smartdns.errors import RegistrationError
from smartdns.registrations.entries import Snapshot
from smartdns.registrations.store import HostnameChanges, RegistrationStore
from smartdns.registrations.store.hostnames import _CHANGED_HOSTNAMES
from smartdns.registrations.store.schema import SCHEMA_VERSION

H1 = "home.example.net"
H2 = "other.example.net"
A = ipaddress.IPv4Network("203.0.113.7/32")
R1 = ipaddress.IPv4Network("198.51.100.1/32")
R2 = ipaddress.IPv4Network("198.51.100.2/32")
R6 = ipaddress.IPv6Network("2001:db8::1/128")


def prefix(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int, int]:
    return (network.version, int(network.network_address), network.prefixlen)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RegistrationStore]:
    async with await RegistrationStore.open(tmp_path / "r.db", create=True) as opened:
        yield opened


async def authorized(store: RegistrationStore) -> set[tuple[int, int, int]]:
    return set((await store.readers.load_prefixes())[1])


async def test_hostnames_stored_and_read_back(store: RegistrationStore) -> None:
    record = await store.accounts.put_account("acct", 1, [A], [H2, H1])
    assert record.hostnames == (H1, H2)
    got = await store.readers.get_account("acct")
    assert got is not None and got.hostnames == (H1, H2)
    assert [r.hostnames for r in await store.readers.list_accounts()] == [(H1, H2)]
    assert await store.hostnames.registered_hostnames() == (
        await store.readers.generation(),
        {"acct": (H1, H2)},
    )


async def test_hostname_changes_read_only_the_accounts_written_since(
    store: RegistrationStore,
) -> None:
    await store.accounts.replace_snapshot(
        Snapshot(1, {f"a{i}": [A] for i in range(300)}, {"a1": (H1,)})
    )
    since = await store.readers.generation()
    await store.accounts.put_account("a2", 2, [A], [H2])
    await store.accounts.delete_account("a1", 3)
    changes = await store.hostnames.hostname_changes(since)
    assert changes == HostnameChanges(
        await store.readers.generation(), {"a1": (), "a2": (H2,)}, False
    )
    assert (await store.hostnames.hostname_changes(since - 1)).full_load  # from before the snapshot
    with sqlite3.connect(store.path) as conn:  # by the generation index, not an account scan
        plan = conn.execute(f"EXPLAIN QUERY PLAN {_CHANGED_HOSTNAMES}", (since,)).fetchall()
    assert "accounts_by_generation" in str(plan[0])


async def test_same_write_with_same_hostnames_is_a_no_op(store: RegistrationStore) -> None:
    await store.accounts.put_account("acct", 1, [A], [H1])
    generation = await store.readers.generation()
    await store.accounts.put_account("acct", 1, [A], [H1])
    assert await store.readers.generation() == generation
    await store.accounts.put_account("acct", 2, [A], [H2])
    assert await store.readers.generation() == generation + 1


async def test_resolved_addresses_authorize_while_held(store: RegistrationStore) -> None:
    await store.accounts.put_account("acct", 1, [A], [H1])
    since = await store.readers.generation()
    hostnames_generation = await store.hostnames.hostnames_generation()
    assert await store.hostnames.put_resolved({H1: [R1, R6]})
    assert await authorized(store) == {prefix(A), prefix(R1), prefix(R6)}
    changes = await store.readers.changes_since(since)
    assert set(changes.present) >= {prefix(R1), prefix(R6)} and changes.gone == []
    since = changes.generation
    assert await store.hostnames.put_resolved({H1: [R2, R6]})  # new first, old gone, in one write
    changes = await store.readers.changes_since(since)
    assert prefix(R2) in changes.present and changes.gone == [prefix(R1)]
    assert not await store.hostnames.put_resolved({H1: [R2, R6]})  # nothing changed: no write
    assert await store.hostnames.hostnames_generation() == hostnames_generation  # results only
    assert await store.hostnames.resolved_addresses() == {
        H1: [R2.network_address.packed, R6.network_address.packed]
    }


async def test_unheld_hostname_keeps_nothing(store: RegistrationStore) -> None:
    assert not await store.hostnames.put_resolved({H1: [R1]})
    assert await store.hostnames.resolved_addresses() == {}
    assert await authorized(store) == set()


async def test_shared_hostname_stays_until_its_last_account_drops_it(
    store: RegistrationStore,
) -> None:
    await store.accounts.put_account("a", 1, [], [H1])
    await store.accounts.put_account("b", 1, [], [H1])
    await store.hostnames.put_resolved({H1: [R1]})
    since = await store.readers.generation()
    await store.accounts.put_account("a", 2, [], [])
    changes = await store.readers.changes_since(since)
    assert changes.gone == []  # b still authorizes it
    assert await authorized(store) == {prefix(R1)}
    since = changes.generation
    assert await store.accounts.delete_account("b", 2)
    changes = await store.readers.changes_since(since)
    assert changes.gone == [prefix(R1)]
    assert await authorized(store) == set()
    assert await store.hostnames.resolved_addresses() == {}  # not kept without a registration


async def test_resolved_address_equal_to_an_entry_stays_authorized(
    store: RegistrationStore,
) -> None:
    await store.accounts.put_account("a", 1, [R1], [H1])
    await store.hostnames.put_resolved({H1: [R1]})
    since = await store.readers.generation()
    await store.hostnames.put_resolved({H1: []})
    assert (await store.readers.changes_since(since)).gone == []
    assert await authorized(store) == {prefix(R1)}


async def test_snapshot_object_form_replaces_hostnames(store: RegistrationStore) -> None:
    await store.accounts.put_account("old", 1, [], [H2])
    await store.hostnames.put_resolved({H2: [R2]})
    snapshot = Snapshot(5, {"a": [A], "b": []}, {"b": (H1,)})
    await store.accounts.replace_snapshot(snapshot)
    assert [(r.account, r.hostnames) for r in await store.readers.list_accounts()] == [
        ("a", ()),
        ("b", (H1,)),
    ]
    assert await store.hostnames.resolved_addresses() == {}
    assert await authorized(store) == {prefix(A)}


async def test_operator_add_and_remove_hostnames(store: RegistrationStore) -> None:
    record = await store.accounts.add_entries("acct", [], 16, [H1], 2)
    assert (record.version, record.hostnames) == (0, (H1,))
    record = await store.accounts.add_entries("acct", [A], 16, [H2], 2)
    assert record.hostnames == (H1, H2)
    with pytest.raises(RegistrationError) as caught:
        await store.accounts.add_entries("acct", [], 16, ["third.example.net"], 2)
    assert str(caught.value) == "hostnames: 3 hostnames exceed the limit of 2 per account"
    await store.hostnames.put_resolved({H1: [R1]})
    assert await store.accounts.remove_entries("acct", [], [H1])
    got = await store.readers.get_account("acct")
    assert got is not None and (got.networks, got.hostnames) == ((A,), (H2,))
    assert await store.hostnames.resolved_addresses() == {}


async def test_schema_2_database_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with await RegistrationStore.open(path, create=True) as store:
        await store.accounts.put_account("acct", 1, [A])
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE hostnames")
        conn.execute("DROP TABLE resolved")
        conn.execute("DELETE FROM meta WHERE key = 'hostnames_generation'")
        conn.execute("UPDATE meta SET value = 2 WHERE key = 'schema_version'")
    async with await RegistrationStore.open(path, create=False) as store:
        await store.accounts.put_account("acct", 2, [A], [H1])
        got = await store.readers.get_account("acct")
        assert got is not None and got.hostnames == (H1,)
    with sqlite3.connect(path) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == (SCHEMA_VERSION,)


async def test_large_batch_in_one_write(store: RegistrationStore) -> None:
    count = 1200  # over two IN (...) chunks
    names = [f"h{i}.example.net" for i in range(count)]
    await store.accounts.replace_snapshot(
        Snapshot(
            1, {f"a{i}": [] for i in range(count)}, {f"a{i}": (n,) for i, n in enumerate(names)}
        )
    )
    since = await store.readers.generation()
    addresses = {n: [ipaddress.IPv4Network((0x0A000000 + i, 32))] for i, n in enumerate(names)}
    assert await store.hostnames.put_resolved({**addresses, "unheld.example.net": [R1]})
    assert await store.readers.generation() == since + 1
    changes = await store.readers.changes_since(since)
    assert len(changes.present) == count and changes.gone == []
    assert len(await authorized(store)) == count

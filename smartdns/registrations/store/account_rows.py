"""What one account holds in the database, read and rewritten inside a caller's transaction.

The shared vocabulary of the store's writers (accounts.py, feed_apply.py) and readers: an
account's row, its entries, hostnames and device ID digests, and the `removed` rows a write
leaves for readers catching up (readers.changes_since). Functions over the connection a
Database transaction yields; none opens a transaction, none decides a version rule.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiosqlite

from smartdns.errors import StaleWriteError
from smartdns.registrations.entries import Network
from smartdns.registrations.store.database import DatabaseError, scalar
from smartdns.registrations.store.schema import HOST_PREFIX

Key = tuple[int, bytes, int]  # family, network, prefix_len
# What an account holds: entry keys, hostnames, device ID digests.
Held = tuple[Sequence[Key], Sequence[str], Sequence[bytes]]

# An account's own digests are not a conflict; any other holder is live (tombstones hold none).
_OTHER_HOLDER: Final = "SELECT 1 FROM device_ids WHERE digest = ? AND account != ? LIMIT 1"
_ROW_AND_SNAPSHOT: Final = (
    "SELECT (SELECT value FROM meta WHERE key = 'snapshot_version'), a.version, a.deleted"
    " FROM (SELECT 1) LEFT JOIN accounts AS a ON a.account = ?"
)
_HELD: Final = (
    "SELECT 0, family, network, prefix_len FROM entries WHERE account = :account"
    " UNION ALL SELECT 1, hostname, NULL, NULL FROM hostnames WHERE account = :account"
    " UNION ALL SELECT 2, digest, NULL, NULL FROM device_ids WHERE account = :account"
)


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """A live account: its portal version and its entries, sorted as in entries.py."""

    account: str
    version: int
    networks: tuple[Network, ...]
    hostnames: tuple[str, ...] = ()  # normalized, sorted
    devices: tuple[bytes, ...] = ()  # device ID digests, sorted


def key(network: Network) -> Key:
    return (network.version, network.network_address.packed, network.prefixlen)


def network(family: int, packed: bytes, prefix_len: int) -> Network:
    if family == 4:
        return ipaddress.IPv4Network((int.from_bytes(packed, "big"), prefix_len))
    return ipaddress.IPv6Network((int.from_bytes(packed, "big"), prefix_len))


async def account_row(db: aiosqlite.Connection, account: str) -> tuple[int, bool] | None:
    """(version, live) for a stored account or tombstone."""
    rows = list(
        await db.execute_fetchall(
            "SELECT version, deleted FROM accounts WHERE account = ?", (account,)
        )
    )
    if not rows:
        return None
    return int(rows[0][0]), not rows[0][1]


async def row_and_snapshot(
    db: aiosqlite.Connection, account: str
) -> tuple[tuple[int, bool] | None, int]:
    """account_row and the node's snapshot_version, what the version rule weighs a write
    against (versions.check_write), in one statement: one hop fewer under the write lock."""
    rows = await db.execute_fetchall(_ROW_AND_SNAPSHOT, (account,))
    snapshot_version, version, deleted = next(iter(rows))
    if snapshot_version is None:
        raise DatabaseError("registrations database: meta key snapshot_version is missing")
    row = None if version is None else (int(version), not deleted)
    return row, int(snapshot_version)


async def entry_keys(db: aiosqlite.Connection, account: str) -> list[Key]:
    rows = await db.execute_fetchall(
        "SELECT family, network, prefix_len FROM entries WHERE account = ?"
        " ORDER BY family, network, prefix_len",
        (account,),
    )
    return [(int(row[0]), bytes(row[1]), int(row[2])) for row in rows]


async def insert_entries(db: aiosqlite.Connection, account: str, keys: Iterable[Key]) -> None:
    await insert_entries_of(db, ((account, key) for key in keys))


async def insert_entries_of(db: aiosqlite.Connection, rows: Iterable[tuple[str, Key]]) -> None:
    """(account, entry key) rows, for any number of accounts."""
    await execute_many(
        db,
        "INSERT OR IGNORE INTO entries (account, family, network, prefix_len) VALUES (?, ?, ?, ?)",
        [(account, *key) for account, key in rows],
    )


async def execute_many(db: aiosqlite.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """`sql` for each of `rows`, and no statement at all for none: each statement is a hop to
    the database thread, under the write lock, which a busy event loop makes milliseconds
    (a sync write that moves an address gives up no device IDs, nor takes any)."""
    if rows:
        await db.executemany(sql, rows)


async def upsert_account(
    db: aiosqlite.Connection, account: str, version: int, deleted: bool, generation: int
) -> None:
    await upsert_accounts(db, ((account, version, deleted, generation),))


async def upsert_accounts(
    db: aiosqlite.Connection, rows: Iterable[tuple[str, int, bool, int]]
) -> None:
    """(account, version, deleted, generation) rows: inserted, or replacing the stored ones."""
    await db.executemany(
        "INSERT INTO accounts (account, version, deleted, generation) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (account) DO UPDATE SET version = excluded.version,"
        " deleted = excluded.deleted, generation = excluded.generation",
        (
            (account, version, int(deleted), generation)
            for account, version, deleted, generation in rows
        ),
    )


async def remember_removed(db: aiosqlite.Connection, generation: int, keys: Iterable[Key]) -> None:
    """Note entries this write took away, for readers catching up (changes_since)."""
    await execute_many(
        db,
        "INSERT OR IGNORE INTO removed (generation, family, network, prefix_len)"
        " VALUES (?, ?, ?, ?)",
        [(generation, *key) for key in keys],
    )


async def record(db: aiosqlite.Connection, account: str, version: int) -> AccountRecord:
    networks = tuple(network(*key) for key in await entry_keys(db, account))
    names = await hostnames(db, account)
    return AccountRecord(account, version, networks, names, await devices(db, account))


async def held(db: aiosqlite.Connection, account: str) -> Held:
    """What the account holds now: entry keys, hostnames and device digests, each sorted
    (as entry_keys, hostnames and devices sort them: the database compares octets too). One
    statement, not three: each is a hop to the database thread under the write lock."""
    rows = await db.execute_fetchall(_HELD, {"account": account})
    keys = sorted((int(row[1]), bytes(row[2]), int(row[3])) for row in rows if row[0] == 0)
    names = sorted(str(row[1]) for row in rows if row[0] == 1)
    digests = sorted(bytes(row[1]) for row in rows if row[0] == 2)
    return keys, tuple(names), tuple(digests)


async def devices(db: aiosqlite.Connection, account: str) -> tuple[bytes, ...]:
    return tuple(map(bytes, await _account_values(db, "device_ids", "digest", account)))


async def hostnames(db: aiosqlite.Connection, account: str) -> tuple[str, ...]:
    return tuple(map(str, await _account_values(db, "hostnames", "hostname", account)))


async def _account_values(
    db: aiosqlite.Connection, table: str, column: str, account: str
) -> list[Any]:
    """The account's `column` values of `table` (hostnames, device_ids), sorted."""
    rows = await db.execute_fetchall(
        f"SELECT {column} FROM {table} WHERE account = ? ORDER BY {column}", (account,)
    )
    return [row[0] for row in rows]


async def raise_if_held(db: aiosqlite.Connection, account: str, digests: Sequence[bytes]) -> None:
    """StaleWriteError (409) naming the first of `digests` (by its index, never the ID)
    that another live account holds (SPEC 3: an ID belongs to at most one account)."""
    for index, digest in enumerate(digests):
        if await scalar(db, _OTHER_HOLDER, (digest, account)) is not None:
            raise StaleWriteError(f"device_ids[{index}]: held by another account")


async def replace_account(
    db: aiosqlite.Connection,
    account: str,
    version: int,
    new: Held | None,
    old: Held,
    generation: int,
) -> None:
    """The account at `version` with `new` (entries, hostnames, device digests), or a
    tombstone for None; `old` is what it held, whose losses readers are told of
    (changes_since)."""
    entries, names, digests = new if new is not None else ((), (), ())
    await db.execute("DELETE FROM entries WHERE account = ?", (account,))
    await upsert_account(db, account, version, new is None, generation)
    await insert_entries(db, account, entries)
    await remember_removed(db, generation, set(old[0]).difference(entries))
    await set_hostnames(db, account, old[1], names, generation)
    await set_devices(db, account, old[2], digests, generation)


async def set_devices(
    db: aiosqlite.Connection,
    account: str,
    old: Sequence[bytes],
    new: Sequence[bytes],
    generation: int,
) -> None:
    """Give the account exactly `new` digests (it held `old`); the ones it gave up are
    noted as removed, for readers catching up (changes_since decides what they mean)."""
    await set_devices_of(db, ((account, old, new),), generation)


async def set_devices_of(
    db: aiosqlite.Connection,
    changes: Iterable[tuple[str, Iterable[bytes], Iterable[bytes]]],
    generation: int,
) -> None:
    """set_devices for any number of (account, old digests, new digests)."""
    dropped: list[tuple[str, bytes]] = []
    added: list[tuple[str, bytes]] = []
    for account, old, new in changes:
        held, wanted = set(old), set(new)
        dropped.extend((account, digest) for digest in held - wanted)
        added.extend((account, digest) for digest in wanted - held)
    await execute_many(db, "DELETE FROM device_ids WHERE account = ? AND digest = ?", dropped)
    await execute_many(
        db, "INSERT OR IGNORE INTO device_ids (account, digest) VALUES (?, ?)", added
    )
    await execute_many(
        db,
        "INSERT OR IGNORE INTO removed_devices (generation, digest) VALUES (?, ?)",
        [(generation, digest) for _, digest in dropped],
    )


async def set_hostnames(
    db: aiosqlite.Connection,
    account: str,
    old: Sequence[str],
    new: Sequence[str],
    generation: int,
) -> None:
    """Give the account exactly `new` hostnames (it held `old`). The resolved addresses of
    the ones it gave up are noted as removed (changes_since reports those no one else
    authorizes) and forgotten when no account holds the hostname any more."""
    if list(old) == list(new):
        return
    dropped = sorted(set(old).difference(new))
    await db.execute("DELETE FROM hostnames WHERE account = ?", (account,))
    await db.executemany(
        "INSERT INTO hostnames (account, hostname) VALUES (?, ?)",
        ((account, hostname) for hostname in new),
    )
    for hostname in dropped:
        await db.execute(
            "INSERT OR IGNORE INTO removed (generation, family, network, prefix_len)"
            f" SELECT ?, r.family, r.network, {HOST_PREFIX} FROM resolved AS r"
            " WHERE r.hostname = ?",
            (generation, hostname),
        )
    await forget_unheld(db, dropped)
    await db.execute("UPDATE meta SET value = ? WHERE key = 'hostnames_generation'", (generation,))


async def forget_unheld(db: aiosqlite.Connection, names: Sequence[str] | None) -> None:
    """Delete the resolved addresses of these hostnames (None: of all) that no account
    holds: they are kept only to authorize a registration."""
    unheld = "NOT EXISTS (SELECT 1 FROM hostnames AS h WHERE h.hostname = resolved.hostname)"
    if names is None:
        await db.execute(f"DELETE FROM resolved WHERE {unheld}")
        return
    await db.executemany(
        f"DELETE FROM resolved WHERE hostname = ? AND {unheld}",
        ((hostname,) for hostname in names),
    )

"""Readers: what the sync API, the CLI and the node read back, and what a DNS process loads
and follows (SPEC 4 GET and status, SPEC 5 list and export).

Reads only. A DNS process never awaits these per query: `load_prefixes()` builds its
in-memory AuthorizedClients and `changes_since()` keeps it current, at the cost of what
changed. Counts and versions only in status; no addresses leave here but to their caller.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from dataclasses import dataclass
from typing import Any, Final

from smartdns.registrations.entries import Network
from smartdns.registrations.store import account_rows
from smartdns.registrations.store.account_rows import AccountRecord
from smartdns.registrations.store.database import Database, converted_rows, meta, scalar
from smartdns.registrations.store.schema import HOST_PREFIX

_Prefix = tuple[int, int, int]  # family, network as int, prefix_len
_ENTRY_ROWS: Final = "SELECT family, network, prefix_len FROM entries"
# The resolved addresses that authorize, as entries rows of the accounts holding them.
_RESOLVED_ROWS: Final = (
    f"SELECT r.family, r.network, {HOST_PREFIX} FROM hostnames AS h"
    " JOIN resolved AS r ON r.hostname = h.hostname"
)
_CHANGE_COUNTERS: Final = (
    "SELECT (SELECT value FROM meta WHERE key = 'generation'),"
    " (SELECT value FROM meta WHERE key = 'snapshot_generation'),"
    " (SELECT value FROM meta WHERE key = 'removed_floor')"
)
# 0: an entry, or a resolved address of a hostname, of an account written after the base
# generation (registered now); 1: an entry or address removed after it that no account
# holds any more, neither as an entry nor through a hostname.
_CHANGED_PREFIXES: Final = (
    "SELECT 0, e.family, e.network, e.prefix_len FROM accounts AS a"
    " JOIN entries AS e ON e.account = a.account WHERE a.generation > ?"
    " UNION ALL"
    f" SELECT 0, r.family, r.network, {HOST_PREFIX} FROM accounts AS a"
    " JOIN hostnames AS h ON h.account = a.account"
    " JOIN resolved AS r ON r.hostname = h.hostname WHERE a.generation > ?"
    " UNION ALL"
    " SELECT 1, g.family, g.network, g.prefix_len FROM removed AS g"
    " WHERE g.generation > ? AND NOT EXISTS (SELECT 1 FROM entries AS e"
    " WHERE e.family = g.family AND e.network = g.network AND e.prefix_len = g.prefix_len)"
    " AND NOT EXISTS (SELECT 1 FROM resolved AS r JOIN hostnames AS h"
    " ON h.hostname = r.hostname WHERE r.family = g.family AND r.network = g.network"
    f" AND {HOST_PREFIX} = g.prefix_len)"
)
# Digests held by exactly one account: the ones that authorize (a full load).
_AUTHORIZING_DEVICES: Final = "SELECT digest FROM device_ids GROUP BY digest HAVING COUNT(*) = 1"
# Every digest of an account written after the base generation, and every digest a write
# took away after it, with whether exactly one account holds it now: a second holder (a feed
# value) takes it away as surely as its one holder dropping it. Each count is one probe of
# device_ids_by_digest, so the read costs what changed.
_CHANGED_DEVICES: Final = (
    "SELECT c.digest, (SELECT COUNT(*) FROM device_ids AS x WHERE x.digest = c.digest) = 1"
    " FROM (SELECT d.digest FROM accounts AS a JOIN device_ids AS d ON d.account = a.account"
    " WHERE a.generation > ? UNION SELECT digest FROM removed_devices WHERE generation > ?) AS c"
)


@dataclass(frozen=True, slots=True)
class Changes:
    """What a reader at `since` must apply to reach `generation`, read in one transaction.

    `present`: the entries of every account written after `since` (they are registered);
    `gone`: entries removed after `since` that no account holds any more. Rows are (family,
    network as int, prefix length). `full_load` is set when a snapshot was stored after
    `since` (its changes are everything) or the removed rows `since` needs were pruned; the
    changes are then those after `base`, the snapshot's generation (or none, `base` = since).
    `devices_present` and `devices_gone`: the device ID digests of those accounts and those
    taken away, split by whether exactly one account holds each now (it authorizes) or not.
    """

    base: int
    generation: int
    present: list[tuple[int, int, int]]
    gone: list[tuple[int, int, int]]
    full_load: bool
    devices_present: list[bytes] = dataclasses.field(default_factory=list)
    devices_gone: list[bytes] = dataclasses.field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StoreStatus:
    accounts: int  # live accounts (tombstones not counted)
    entries: int
    snapshot_version: int
    devices: int = 0  # device IDs held (for /metrics; /v1/status keeps SPEC 4's keys)


def _prefix_row(_cursor: sqlite3.Cursor, row: tuple[int, bytes, int]) -> tuple[int, int, int]:
    return (row[0], int.from_bytes(row[1], "big"), row[2])


def _first_column(_cursor: sqlite3.Cursor, row: tuple[bytes]) -> bytes:
    return row[0]


def _change_row(_cursor: sqlite3.Cursor, row: tuple[int, int, bytes, int]) -> tuple[int, _Prefix]:
    return (row[0], (row[1], int.from_bytes(row[2], "big"), row[3]))


class Readers:
    """The store's reads, on a shared Database."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def get_account(self, account: str) -> AccountRecord | None:
        """The live account, or None when unknown or deleted (tombstone)."""
        async with self._database.reading("get account") as db:
            row = await account_rows.account_row(db, account)
            if row is None or not row[1]:
                return None
            return await account_rows.record(db, account, row[0])

    async def status(self) -> StoreStatus:
        """Counts for `GET /v1/status`; live accounts only, no addresses."""
        async with self._database.reading("status") as db:
            accounts = await scalar(db, "SELECT COUNT(*) FROM accounts WHERE deleted = 0")
            entries = await scalar(db, "SELECT COUNT(*) FROM entries")
            devices = await scalar(db, "SELECT COUNT(*) FROM device_ids")
            return StoreStatus(
                accounts=accounts or 0,
                entries=entries or 0,
                snapshot_version=await meta(db, "snapshot_version"),
                devices=devices or 0,
            )

    async def snapshot_version(self) -> int:
        """The version of the last snapshot applied (0 for a new node)."""
        async with self._database.reading("snapshot version") as db:
            return await meta(db, "snapshot_version")

    async def generation(self) -> int:
        """Change counter, incremented by every write from any process; cheap to poll."""
        async with self._database.reading("generation") as db:
            return await meta(db, "generation")

    async def list_accounts(self, account: str | None = None) -> list[AccountRecord]:
        """Live accounts sorted by id (only `account` when given), with their entries."""
        where = "a.deleted = 0" + ("" if account is None else " AND a.account = ?")
        params: tuple[Any, ...] = () if account is None else (account,)
        async with self._database.reading("list accounts") as db:
            rows = await db.execute_fetchall(
                "SELECT a.account, a.version, e.family, e.network, e.prefix_len"
                " FROM accounts AS a LEFT JOIN entries AS e ON e.account = a.account"
                f" WHERE {where} ORDER BY a.account, e.family, e.network, e.prefix_len",
                params,
            )
        records: list[AccountRecord] = []
        current: tuple[str, int] | None = None
        networks: list[Network] = []
        for name, version, family, packed, prefix_len in rows:
            if current is None or current[0] != name:
                if current is not None:
                    records.append(AccountRecord(current[0], current[1], tuple(networks)))
                current, networks = (str(name), int(version)), []
            if family is not None:  # LEFT JOIN: a live account may have no entries
                networks.append(account_rows.network(int(family), bytes(packed), int(prefix_len)))
        if current is not None:
            records.append(AccountRecord(current[0], current[1], tuple(networks)))
        hostnames = await self._by_account("hostnames", "hostname", account)
        devices = await self._by_account("device_ids", "digest", account)
        return [
            dataclasses.replace(
                record,
                hostnames=tuple(map(str, hostnames.get(record.account, ()))),
                devices=tuple(bytes(digest) for digest in devices.get(record.account, ())),
            )
            for record in records
        ]

    async def _by_account(
        self, table: str, column: str, account: str | None
    ) -> dict[str, list[Any]]:
        """account -> its `column` values of `table` (hostnames, device_ids), sorted."""
        where = "" if account is None else " WHERE account = ?"
        params: tuple[Any, ...] = () if account is None else (account,)
        async with self._database.reading(f"list {table}") as db:
            rows = await db.execute_fetchall(
                f"SELECT account, {column} FROM {table}{where} ORDER BY account, {column}",
                params,
            )
        by_account: dict[str, list[Any]] = {}
        for name, value in rows:
            by_account.setdefault(str(name), []).append(value)
        return by_account

    async def load_prefixes(self) -> tuple[int, list[_Prefix], list[bytes]]:
        """The generation, (family 4 or 6, network as int, prefix_len) for every live entry
        at that generation, and the device ID digests that authorize (held by exactly one
        account), for a full build of the in-memory AuthorizedClients.

        Tombstones have no entries, so no join is needed; rows are converted on the database
        thread and never become ipaddress objects.
        """
        async with self._database.consistent("load prefixes") as db:
            generation = await meta(db, "generation")
            rows = await converted_rows(db, _ENTRY_ROWS, _prefix_row)
            rows += await converted_rows(db, _RESOLVED_ROWS, _prefix_row)
            devices = await converted_rows(db, _AUTHORIZING_DEVICES, _first_column)
            return generation, rows, devices

    async def changes_since(self, since: int) -> Changes:
        """What changed after generation `since` (see Changes): indexed reads costing what
        changed, not what is stored; five statements (each a hop to the database thread)."""
        async with self._database.consistent("read changes") as db:
            rows = await db.execute_fetchall(_CHANGE_COUNTERS)
            generation, snapshot, floor = (int(value) for value in next(iter(rows)))
            if generation == since:
                return Changes(since, generation, [], [], full_load=False)
            base = since
            if since < snapshot or since < floor:
                if snapshot < floor:  # the rows after the snapshot are pruned too
                    return Changes(since, since, [], [], full_load=True)
                base = snapshot
            cursor = await db.execute(_CHANGED_PREFIXES, (base, base, base))
            cursor.row_factory = _change_row  # type: ignore[assignment]  # as in converted_rows
            changed: list[tuple[int, _Prefix]] = list(await cursor.fetchall())  # type: ignore[arg-type]
            await cursor.close()
            present = [prefix for gone, prefix in changed if not gone]
            gone = [prefix for is_gone, prefix in changed if is_gone]
            devices = await db.execute_fetchall(_CHANGED_DEVICES, (base, base))
            return Changes(
                base,
                generation,
                present,
                gone,
                full_load=base != since,
                devices_present=[bytes(digest) for digest, one in devices if one],
                devices_gone=[bytes(digest) for digest, one in devices if not one],
            )

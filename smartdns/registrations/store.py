"""RegistrationStore: the SQLite registrations database (schema, versions, tombstones, changes).

Written through registrations.writer only; the DNS query path never awaits SQLite, it reads
the in-memory snapshot built from `load_prefixes()` and kept up by `changes_since()`. Stores
what SPEC 3 allows and nothing else: no timestamps, no counters of use. Error messages name
the operation, never an address.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence, Set
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Final, TypeVar

import aiosqlite

from smartdns.errors import RegistrationError, SmartDNSError, StaleWriteError
from smartdns.registrations.device_ids import check_count
from smartdns.registrations.entries import (
    AccountEntries,
    EntryRow,
    Network,
    Snapshot,
    validate_account_id,
)
from smartdns.registrations.feed_format import AccountValue, FeedApplied, FeedChange, FeedValue
from smartdns.registrations.versions import check_write

SCHEMA_VERSION: Final = 4
# Removed entries are kept for this many generations, so a reader that far behind still
# catches up by reading what changed; one further behind loads everything.
KEEP_REMOVED_GENERATIONS: Final = 65_536
_PRUNE_EVERY: Final = 256  # generations between prunes of the removed rows

_SCHEMA_V1: Final = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    # deleted = 1 is a tombstone: the account has no entries and blocks older writes.
    "CREATE TABLE IF NOT EXISTS accounts ("
    " account TEXT PRIMARY KEY,"
    " version INTEGER NOT NULL,"
    " deleted INTEGER NOT NULL CHECK (deleted IN (0, 1)))",
    # network: 4- or 16-byte big-endian address, so blob order is address order.
    "CREATE TABLE IF NOT EXISTS entries ("
    " account TEXT NOT NULL REFERENCES accounts(account) ON DELETE CASCADE,"
    " family INTEGER NOT NULL CHECK (family IN (4, 6)),"
    " network BLOB NOT NULL,"
    " prefix_len INTEGER NOT NULL,"
    " PRIMARY KEY (account, family, network, prefix_len)"
    ") WITHOUT ROWID",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('snapshot_version', 0), ('generation', 0)",
)
# Version 2: what changed since a generation is an indexed read of what changed. Each
# account row carries the generation of its last write; each entry a write took away leaves
# a `removed` row at that generation (pruned after KEEP_REMOVED_GENERATIONS); a snapshot
# clears them and records its generation, since it rewrites everything.
_ENTRIES_BY_PREFIX: Final = (
    "CREATE INDEX IF NOT EXISTS entries_by_prefix ON entries (family, network, prefix_len)"
)
_SCHEMA_V2: Final = (
    "ALTER TABLE accounts ADD COLUMN generation INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX IF NOT EXISTS accounts_by_generation ON accounts (generation)",
    _ENTRIES_BY_PREFIX,
    "CREATE TABLE IF NOT EXISTS removed ("
    " generation INTEGER NOT NULL,"
    " family INTEGER NOT NULL,"
    " network BLOB NOT NULL,"
    " prefix_len INTEGER NOT NULL,"
    " PRIMARY KEY (generation, family, network, prefix_len)"
    ") WITHOUT ROWID",
    # An existing database's readers all start with a full load: mark everything as new.
    "INSERT OR IGNORE INTO meta (key, value) SELECT 'snapshot_generation', value"
    " FROM meta WHERE key = 'generation'",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('removed_floor', 0)",
    "UPDATE meta SET value = 2 WHERE key = 'schema_version'",
)
# Version 3: hostname registrations (SPEC 3) and what they resolve to. `resolved` holds the
# DDNS refresher's results only while some account holds the hostname; they authorize as /32
# and /128 entries of each such account (see _AUTHORIZED_ROWS). `hostnames_generation` moves
# when the set of registered hostnames does, so the refresher polls one value.
_SCHEMA_V3: Final = (
    "CREATE TABLE IF NOT EXISTS hostnames ("
    " account TEXT NOT NULL REFERENCES accounts(account) ON DELETE CASCADE,"
    " hostname TEXT NOT NULL,"
    " PRIMARY KEY (account, hostname)"
    ") WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS hostnames_by_name ON hostnames (hostname)",
    "CREATE TABLE IF NOT EXISTS resolved ("
    " hostname TEXT NOT NULL,"
    " family INTEGER NOT NULL CHECK (family IN (4, 6)),"
    " network BLOB NOT NULL,"
    " PRIMARY KEY (hostname, family, network)"
    ") WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS resolved_by_address ON resolved (family, network)",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('hostnames_generation', 0)",
    "UPDATE meta SET value = 3 WHERE key = 'schema_version'",
)
_DEVICES_BY_DIGEST: Final = "CREATE INDEX IF NOT EXISTS device_ids_by_digest ON device_ids (digest)"
# Version 4: device IDs (SPEC 2a, 3), as SHA-256 digests only; tombstones hold none. A digest
# authorizes while exactly one account holds it (decided in SQL, through device_ids_by_digest:
# an ID two accounts of a fleet hold authorizes neither). Each digest a write took away leaves
# a `removed_devices` row, so changes_since stays a read of what changed, as for entries.
_SCHEMA_V4: Final = (
    "CREATE TABLE IF NOT EXISTS device_ids ("
    " account TEXT NOT NULL REFERENCES accounts(account) ON DELETE CASCADE,"
    " digest BLOB NOT NULL,"
    " PRIMARY KEY (account, digest)"
    ") WITHOUT ROWID",
    _DEVICES_BY_DIGEST,
    "CREATE TABLE IF NOT EXISTS removed_devices ("
    " generation INTEGER NOT NULL,"
    " digest BLOB NOT NULL,"
    " PRIMARY KEY (generation, digest)"
    ") WITHOUT ROWID",
    "UPDATE meta SET value = 4 WHERE key = 'schema_version'",
)
_HOST_PREFIX: Final = "CASE r.family WHEN 4 THEN 32 ELSE 128 END"
# The resolved addresses that authorize, as entries rows of the accounts holding them.
_RESOLVED_ROWS: Final = (
    f"SELECT r.family, r.network, {_HOST_PREFIX} FROM hostnames AS h"
    " JOIN resolved AS r ON r.hostname = h.hostname"
)
_IN_CHUNK: Final = 500  # names per `IN (...)` list, well under SQLite's variable limit
_CREATE_HINT: Final = "create it with `smartdns registrations add` or `import`"

_T = TypeVar("_T")
_Row = EntryRow  # account, family, network, prefix_len
_Key = tuple[int, bytes, int]  # family, network, prefix_len
# What an account holds: entry keys, hostnames, device ID digests.
_Held = tuple[Sequence[_Key], Sequence[str], Sequence[bytes]]
_Prefix = tuple[int, int, int]  # family, network as int, prefix_len


class DatabaseError(SmartDNSError):
    """The registrations database cannot be opened or an operation on it failed."""


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """A live account: its portal version and its entries, sorted as in entries.py."""

    account: str
    version: int
    networks: tuple[Network, ...]
    hostnames: tuple[str, ...] = ()  # normalized, sorted
    devices: tuple[bytes, ...] = ()  # device ID digests, sorted


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
class HostnameChanges:
    """What the DDNS refresher at `since` must apply to reach `generation`: account → its
    hostnames now (empty: none any more) for every account written after `since`, or, with
    `full_load`, for every account holding any (a snapshot, or an account dropped without
    a tombstone, came after `since`: what changed can no longer be read by generation)."""

    generation: int
    accounts: dict[str, tuple[str, ...]]
    full_load: bool


@dataclass(frozen=True, slots=True)
class SnapshotResult:
    accounts: int
    entries: int
    devices: int = 0  # device IDs

    @classmethod
    def of(cls, snapshot: Snapshot) -> SnapshotResult:
        """The counts of a snapshot written elsewhere (the feed's bucket), as stored ones."""
        entries = sum(len(networks) for networks in snapshot.accounts.values())
        devices = sum(len(digests) for digests in snapshot.devices.values())
        return cls(len(snapshot.accounts), entries, devices)

    def __str__(self) -> str:
        return f"{self.accounts} accounts, {self.entries} entries, {self.devices} device IDs"


@dataclass(frozen=True, slots=True)
class StoreStatus:
    accounts: int  # live accounts (tombstones not counted)
    entries: int
    snapshot_version: int
    devices: int = 0  # device IDs held (for /metrics; /v1/status keeps SPEC 4's keys)


def _key(network: Network) -> _Key:
    return (network.version, network.network_address.packed, network.prefixlen)


def _network(family: int, packed: bytes, prefix_len: int) -> Network:
    if family == 4:
        return ipaddress.IPv4Network((int.from_bytes(packed, "big"), prefix_len))
    return ipaddress.IPv6Network((int.from_bytes(packed, "big"), prefix_len))


def _prefix_row(_cursor: sqlite3.Cursor, row: tuple[int, bytes, int]) -> tuple[int, int, int]:
    return (row[0], int.from_bytes(row[1], "big"), row[2])


def _first_column(_cursor: sqlite3.Cursor, row: tuple[bytes]) -> bytes:
    return row[0]


def _change_row(_cursor: sqlite3.Cursor, row: tuple[int, int, bytes, int]) -> tuple[int, _Prefix]:
    return (row[0], (row[1], int.from_bytes(row[2], "big"), row[3]))


_CHANGE_COUNTERS: Final = (
    "SELECT (SELECT value FROM meta WHERE key = 'generation'),"
    " (SELECT value FROM meta WHERE key = 'snapshot_generation'),"
    " (SELECT value FROM meta WHERE key = 'removed_floor')"
)
_HOSTNAME_COUNTERS: Final = (
    "SELECT (SELECT value FROM meta WHERE key = 'generation'),"
    " (SELECT value FROM meta WHERE key = 'snapshot_generation'),"
    " COALESCE((SELECT value FROM meta WHERE key = 'hostnames_reload'), 0)"
)
# Every account written after a generation (tombstones included: they hold no hostname any
# more), with its hostnames; through accounts_by_generation. No ORDER BY: it would have the
# planner scan accounts in key order instead (_by_account sorts each account's few names).
_CHANGED_HOSTNAMES: Final = (
    "SELECT a.account, h.hostname FROM accounts AS a"
    " LEFT JOIN hostnames AS h ON h.account = a.account WHERE a.generation > ?"
)
# 0: an entry, or a resolved address of a hostname, of an account written after the base
# generation (registered now); 1: an entry or address removed after it that no account
# holds any more, neither as an entry nor through a hostname.
_CHANGED_PREFIXES: Final = (
    "SELECT 0, e.family, e.network, e.prefix_len FROM accounts AS a"
    " JOIN entries AS e ON e.account = a.account WHERE a.generation > ?"
    " UNION ALL"
    f" SELECT 0, r.family, r.network, {_HOST_PREFIX} FROM accounts AS a"
    " JOIN hostnames AS h ON h.account = a.account"
    " JOIN resolved AS r ON r.hostname = h.hostname WHERE a.generation > ?"
    " UNION ALL"
    " SELECT 1, g.family, g.network, g.prefix_len FROM removed AS g"
    " WHERE g.generation > ? AND NOT EXISTS (SELECT 1 FROM entries AS e"
    " WHERE e.family = g.family AND e.network = g.network AND e.prefix_len = g.prefix_len)"
    " AND NOT EXISTS (SELECT 1 FROM resolved AS r JOIN hostnames AS h"
    " ON h.hostname = r.hostname WHERE r.family = g.family AND r.network = g.network"
    f" AND {_HOST_PREFIX} = g.prefix_len)"
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
# An account's own digests are not a conflict; any other holder is live (tombstones hold none).
_OTHER_HOLDER: Final = "SELECT 1 FROM device_ids WHERE digest = ? AND account != ? LIMIT 1"


class RegistrationStore:
    """Registrations in one SQLite file, safe to share between the server and the CLI.

    Every write is one `BEGIN IMMEDIATE` transaction that also increments `generation`, so
    writers in different processes serialize and a poller notices any change with one read.
    Within a process an asyncio lock keeps coroutines from interleaving on the connection.
    """

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self._path = path
        self._lock = asyncio.Lock()
        self._generation_written: int | None = None
        self._pending_generation: int | None = None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def generation_written(self) -> int | None:
        """The generation of this connection's latest committed write (None before any): once
        a write method returns, at least the generation that write produced."""
        return self._generation_written

    # --- lifecycle -----------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path, *, create: bool) -> RegistrationStore:
        """Open the database at `path`; with `create`, make it (and its directories) if missing.

        Without `create` a missing file is an error rather than a silently empty store, since
        an empty store refuses every client. A file that is not a smartdns database is too.
        """
        uri = _database_uri(path, create)
        try:
            db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open registrations database {path}: {exc}") from None
        store = cls(db, path)
        try:
            await store._prepare(create)
        except BaseException:
            await db.close()
            raise
        return store

    async def _prepare(self, create: bool) -> None:
        try:
            # busy_timeout first: switching to WAL needs a lock another process may hold.
            await self._db.execute("PRAGMA busy_timeout = 5000")
            rows = await self._db.execute_fetchall("PRAGMA journal_mode = WAL")
            mode = next(iter(rows))[0]
            if str(mode).lower() != "wal":
                raise DatabaseError(
                    f"registrations database {self._path}: cannot enable WAL (mode {mode})"
                )
            await self._db.execute("PRAGMA synchronous = FULL")  # a 200 means it is on disk
            await self._db.execute("PRAGMA foreign_keys = ON")
            # Deleted registrations are overwritten in the file, not left in free pages.
            await self._db.execute("PRAGMA secure_delete = ON")
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                await self._check_or_create_schema(create)
                await self._db.execute("COMMIT")
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open registrations database {self._path}: {exc}") from None

    async def _check_or_create_schema(self, create: bool) -> None:
        tables = {
            str(row[0])
            for row in await self._db.execute_fetchall(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
            )
        }
        if not tables:
            if not create:
                raise DatabaseError(f"registrations database {self._path} is empty; {_CREATE_HINT}")
            for statement in _SCHEMA_V1:
                await self._db.execute(statement)
            await self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', 1)"
            )
        elif not {"meta", "accounts", "entries"} <= tables:
            raise DatabaseError(f"{self._path} is not a smartdns registrations database")
        rows = list(
            await self._db.execute_fetchall("SELECT value FROM meta WHERE key = 'schema_version'")
        )
        if not rows:
            raise DatabaseError(f"{self._path} is not a smartdns registrations database")
        version = int(rows[0][0])
        if version == 1:
            for statement in _SCHEMA_V2:
                await self._db.execute(statement)
            version = 2
        if version == 2:
            for statement in _SCHEMA_V3:
                await self._db.execute(statement)
            version = 3
        if version == 3:
            for statement in _SCHEMA_V4:
                await self._db.execute(statement)
            version = 4
        if version != SCHEMA_VERSION:
            raise DatabaseError(
                f"registrations database {self._path} has schema version {version}, "
                f"this smartdns supports {SCHEMA_VERSION}"
            )

    async def close(self) -> None:
        """Close the connection; the store cannot be used afterwards."""
        async with self._lock:
            try:
                await self._db.close()
            except sqlite3.Error as exc:
                raise DatabaseError(f"registrations database: close failed: {exc}") from None

    async def __aenter__(self) -> RegistrationStore:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # --- plumbing ------------------------------------------------------------------------

    @asynccontextmanager
    async def _reading(self, operation: str) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise DatabaseError(f"registrations database: {operation} failed: {exc}") from None

    @asynccontextmanager
    async def _writing(self, operation: str) -> AsyncIterator[aiosqlite.Connection]:
        """One IMMEDIATE transaction; rolled back on any exception, including cancellation."""
        async with self._lock:
            try:
                self._pending_generation = None
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                await self._db.execute("COMMIT")
                if self._pending_generation is not None:
                    self._generation_written = self._pending_generation
            except BaseException as exc:
                # Shielded: a cancelled caller must not leave the transaction open. aiosqlite
                # runs statements in order, so this follows whatever is still in flight.
                await asyncio.shield(self._rollback())
                if isinstance(exc, sqlite3.Error):
                    raise DatabaseError(
                        f"registrations database: {operation} failed: {exc}"
                    ) from None
                raise

    async def _rollback(self) -> None:
        # Nothing may be open: BEGIN failed, or COMMIT already went through.
        with contextlib.suppress(sqlite3.Error):
            await self._db.execute("ROLLBACK")

    async def _bump_generation(self) -> int:
        """The next generation, which this write's rows carry; noted once committed."""
        generation = await self._scalar(
            "UPDATE meta SET value = value + 1 WHERE key = 'generation' RETURNING value"
        )
        assert generation is not None  # the meta row exists in every database
        self._pending_generation = generation
        if generation % _PRUNE_EVERY == 0:
            await self._prune_removed(generation - KEEP_REMOVED_GENERATIONS)
        return generation

    async def _prune_removed(self, floor: int) -> None:
        """Forget the removed entries up to generation `floor`; a reader behind it loads all."""
        await self._db.execute("DELETE FROM removed WHERE generation <= ?", (floor,))
        await self._db.execute("DELETE FROM removed_devices WHERE generation <= ?", (floor,))
        await self._db.execute(
            "UPDATE meta SET value = max(value, ?) WHERE key = 'removed_floor'", (floor,)
        )

    async def forget_removed(self, through: int | None = None) -> None:
        """Forget the entries writes took away up to generation `through` (None: all of them).

        They exist only so readers can catch up by what changed; once every reader has
        applied them they are addresses nobody holds any more (SPEC 7), and secure_delete
        overwrites their bytes in the file."""
        async with self._writing("forget removed entries"):
            await self._prune_removed(
                through if through is not None else await self._meta("generation")
            )

    async def _meta(self, key: str) -> int:
        value = await self._scalar("SELECT value FROM meta WHERE key = ?", (key,))
        if value is None:
            raise DatabaseError(f"registrations database: meta key {key} is missing")
        return value

    async def _scalar(self, sql: str, params: tuple[Any, ...] = ()) -> int | None:
        """The first column of the first row as an int; None for no row or NULL."""
        for row in await self._db.execute_fetchall(sql, params):
            return None if row[0] is None else int(row[0])
        return None

    async def _account_row(self, account: str) -> tuple[int, bool] | None:
        """(version, live) for a stored account or tombstone."""
        rows = list(
            await self._db.execute_fetchall(
                "SELECT version, deleted FROM accounts WHERE account = ?", (account,)
            )
        )
        if not rows:
            return None
        return int(rows[0][0]), not rows[0][1]

    async def _entry_keys(self, account: str) -> list[_Key]:
        rows = await self._db.execute_fetchall(
            "SELECT family, network, prefix_len FROM entries WHERE account = ?"
            " ORDER BY family, network, prefix_len",
            (account,),
        )
        return [(int(row[0]), bytes(row[1]), int(row[2])) for row in rows]

    async def _insert_entries(self, account: str, keys: Iterable[_Key]) -> None:
        await self._db.executemany(
            "INSERT OR IGNORE INTO entries (account, family, network, prefix_len)"
            " VALUES (?, ?, ?, ?)",
            ((account, *key) for key in keys),
        )

    async def _upsert_account(
        self, account: str, version: int, deleted: bool, generation: int
    ) -> None:
        await self._db.execute(
            "INSERT INTO accounts (account, version, deleted, generation) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (account) DO UPDATE SET version = excluded.version,"
            " deleted = excluded.deleted, generation = excluded.generation",
            (account, version, int(deleted), generation),
        )

    async def _remember_removed(self, generation: int, keys: Iterable[_Key]) -> None:
        """Note entries this write took away, for readers catching up (changes_since)."""
        await self._db.executemany(
            "INSERT OR IGNORE INTO removed (generation, family, network, prefix_len)"
            " VALUES (?, ?, ?, ?)",
            ((generation, *key) for key in keys),
        )

    async def _record(self, account: str, version: int) -> AccountRecord:
        networks = tuple(_network(*key) for key in await self._entry_keys(account))
        hostnames = await self._hostnames(account)
        return AccountRecord(account, version, networks, hostnames, await self._devices(account))

    async def _held(self, account: str) -> _Held:
        """What the account holds now: entry keys, hostnames and device digests, each sorted."""
        return (
            await self._entry_keys(account),
            await self._hostnames(account),
            await self._devices(account),
        )

    async def _devices(self, account: str) -> tuple[bytes, ...]:
        return tuple(map(bytes, await self._account_values("device_ids", "digest", account)))

    async def _account_values(self, table: str, column: str, account: str) -> list[Any]:
        """The account's `column` values of `table` (hostnames, device_ids), sorted."""
        rows = await self._db.execute_fetchall(
            f"SELECT {column} FROM {table} WHERE account = ? ORDER BY {column}", (account,)
        )
        return [row[0] for row in rows]

    async def _set_devices(
        self, account: str, old: Sequence[bytes], new: Sequence[bytes], generation: int
    ) -> None:
        """Give the account exactly `new` digests (it held `old`); the ones it gave up are
        noted as removed, for readers catching up (changes_since decides what they mean)."""
        dropped = set(old).difference(new)
        await self._db.executemany(
            "DELETE FROM device_ids WHERE account = ? AND digest = ?",
            ((account, digest) for digest in dropped),
        )
        await self._db.executemany(
            "INSERT OR IGNORE INTO device_ids (account, digest) VALUES (?, ?)",
            ((account, digest) for digest in set(new).difference(old)),
        )
        await self._db.executemany(
            "INSERT OR IGNORE INTO removed_devices (generation, digest) VALUES (?, ?)",
            ((generation, digest) for digest in dropped),
        )

    async def _raise_if_held(self, account: str, devices: Sequence[bytes]) -> None:
        """StaleWriteError (409) naming the first of `devices` (by its index, never the ID)
        that another live account holds (SPEC 3: an ID belongs to at most one account)."""
        for index, digest in enumerate(devices):
            if await self._scalar(_OTHER_HOLDER, (digest, account)) is not None:
                raise StaleWriteError(f"device_ids[{index}]: held by another account")

    async def device_conflict(self, account: str, devices: Sequence[bytes]) -> None:
        """_raise_if_held as a read of its own: the sync API's check before it writes an
        account to the feed's bucket (which has no index by digest; this node's copy does)."""
        async with self._reading("check device IDs"):
            await self._raise_if_held(account, devices)

    async def _hostnames(self, account: str) -> tuple[str, ...]:
        return tuple(map(str, await self._account_values("hostnames", "hostname", account)))

    async def _set_hostnames(
        self, account: str, old: Sequence[str], new: Sequence[str], generation: int
    ) -> None:
        """Give the account exactly `new` hostnames (it held `old`). The resolved addresses of
        the ones it gave up are noted as removed (changes_since reports those no one else
        authorizes) and forgotten when no account holds the hostname any more."""
        if list(old) == list(new):
            return
        dropped = sorted(set(old).difference(new))
        await self._db.execute("DELETE FROM hostnames WHERE account = ?", (account,))
        await self._db.executemany(
            "INSERT INTO hostnames (account, hostname) VALUES (?, ?)",
            ((account, hostname) for hostname in new),
        )
        for hostname in dropped:
            await self._db.execute(
                "INSERT OR IGNORE INTO removed (generation, family, network, prefix_len)"
                f" SELECT ?, r.family, r.network, {_HOST_PREFIX} FROM resolved AS r"
                " WHERE r.hostname = ?",
                (generation, hostname),
            )
        await self._forget_unheld(dropped)
        await self._db.execute(
            "UPDATE meta SET value = ? WHERE key = 'hostnames_generation'", (generation,)
        )

    async def _forget_unheld(self, hostnames: Sequence[str] | None) -> None:
        """Delete the resolved addresses of these hostnames (None: of all) that no account
        holds: they are kept only to authorize a registration."""
        unheld = "NOT EXISTS (SELECT 1 FROM hostnames AS h WHERE h.hostname = resolved.hostname)"
        if hostnames is None:
            await self._db.execute(f"DELETE FROM resolved WHERE {unheld}")
            return
        await self._db.executemany(
            f"DELETE FROM resolved WHERE hostname = ? AND {unheld}",
            ((hostname,) for hostname in hostnames),
        )

    # --- sync API semantics (SPEC 4) -----------------------------------------------------

    async def put_account(
        self,
        account: str,
        version: int,
        networks: Sequence[Network],
        hostnames: Sequence[str] = (),
        devices: Sequence[bytes] = (),
    ) -> AccountRecord:
        """Replace the account's set atomically at `version`.

        The same write repeated (live, same version, same entries, hostnames and device ID
        digests) is a no-op that returns the record without bumping `generation`. Stale
        (StaleWriteError, nothing changes): version below the stored one (live or tombstone),
        the same version with other content or over a tombstone, or not above
        `snapshot_version`; and a device ID another live account holds, named by its index in
        `devices` (given in the request's order).
        """
        validate_account_id(account)
        wanted = sorted({_key(network) for network in networks})
        names = sorted(set(hostnames))
        digests = sorted(set(devices))
        async with self._writing("put account") as _db:
            row = await self._account_row(account)
            old = await self._held(account)
            same = [list(held) for held in old] == [wanted, names, digests]
            repeat = row == (version, True) and same
            snapshot_version = await self._meta("snapshot_version")
            if check_write(version, row, repeat=repeat, snapshot_version=snapshot_version):
                return await self._record(account, version)
            await self._raise_if_held(account, devices)
            generation = await self._bump_generation()
            await self._replace_account(account, version, (wanted, names, digests), old, generation)
            networks_out = tuple(_network(*key) for key in wanted)
            return AccountRecord(account, version, networks_out, tuple(names), tuple(digests))

    async def _replace_account(
        self,
        account: str,
        version: int,
        new: _Held | None,
        old: _Held,
        generation: int,
    ) -> None:
        """The account at `version` with `new` (entries, hostnames, device digests), or a
        tombstone for None; `old` is what it held, whose losses readers are told of
        (changes_since)."""
        entries, names, devices = new if new is not None else ((), (), ())
        await self._db.execute("DELETE FROM entries WHERE account = ?", (account,))
        await self._upsert_account(account, version, new is None, generation)
        await self._insert_entries(account, entries)
        await self._remember_removed(generation, set(old[0]).difference(entries))
        await self._set_hostnames(account, old[1], names, generation)
        await self._set_devices(account, old[2], devices, generation)

    async def delete_account(self, account: str, version: int) -> bool:
        """Remove the account's entries and leave a tombstone at `version`; True if it was live.

        The tombstone is written for accounts never seen too, so a delayed older PUT cannot
        create them. A tombstone already at `version` is a no-op (False). Stale: version below
        the stored one, equal to a live account's, or not above `snapshot_version`.
        """
        validate_account_id(account)
        async with self._writing("delete account") as _db:
            row = await self._account_row(account)
            snapshot_version = await self._meta("snapshot_version")
            if check_write(
                version, row, repeat=row == (version, False), snapshot_version=snapshot_version
            ):
                return False
            live = row is not None and row[1]
            generation = await self._bump_generation()
            await self._replace_account(
                account, version, None, await self._held(account), generation
            )
            return live

    # --- the registration feed (SPEC 4): the bucket is the truth ------------------------

    async def apply_feed(
        self, changes: Sequence[FeedChange], snapshot_version: int | None
    ) -> FeedApplied:
        """Apply the feed's changes in one transaction, one generation for all of them.

        A value or tombstone replaces the stored account when its version is higher (the
        bucket already enforced SPEC 4's rules fleet-wide, so `snapshot_version` does not
        refuse it, and a snapshot's own accounts arrive at its version); a lower one is
        counted stale, an equal one is the same change again. None removes the account
        without a tombstone. `snapshot_version`, when given, is stored as well. Stored
        versions are read 500 at a time, and accounts new to the store are inserted with one
        executemany, so a catch-up over a large bucket costs statements per batch, not per key.
        """
        applied = stale = 0
        async with self._writing("apply feed"):
            stored = await self._stored_versions({account for account, _ in changes})
            generation: int | None = None
            fresh: dict[str, AccountValue] = {}
            for account, value in changes:
                version = stored.get(account)
                if value is not None and version is not None and value.version <= version:
                    stale += value.version < version
                    continue
                if value is None and account not in stored:
                    continue
                generation = generation or await self._bump_generation()
                applied += 1
                if version is None and isinstance(value, AccountValue) and not value.hostnames:
                    # New to the store, and no hostname to resolve: plain inserts (below).
                    fresh[account] = value
                    stored[account] = value.version
                    continue
                await self._insert_fresh(fresh, generation)  # before it changes one of them
                await self._apply_change(account, value, generation)
                if value is None:
                    del stored[account]
                else:
                    stored[account] = value.version
            if generation is not None:
                await self._insert_fresh(fresh, generation)
            if snapshot_version is not None:
                await self._set_snapshot_version(snapshot_version)
        return FeedApplied(applied, stale)

    async def _stored_versions(self, accounts: Set[str]) -> dict[str, int]:
        """account -> stored version (live or tombstone) of those of `accounts` stored."""
        names = sorted(accounts)
        versions: dict[str, int] = {}
        for start in range(0, len(names), _IN_CHUNK):
            chunk = names[start : start + _IN_CHUNK]
            rows = await self._db.execute_fetchall(
                "SELECT account, version FROM accounts WHERE account IN"
                f" ({','.join('?' * len(chunk))})",
                chunk,
            )
            versions.update((str(row[0]), int(row[1])) for row in rows)
        return versions

    async def _insert_fresh(self, fresh: dict[str, AccountValue], generation: int) -> None:
        """Accounts not stored before, without hostnames: nothing to take away, three inserts."""
        if not fresh:
            return
        await self._db.executemany(
            "INSERT INTO accounts (account, version, deleted, generation) VALUES (?, ?, 0, ?)",
            ((account, value.version, generation) for account, value in fresh.items()),
        )
        await self._db.executemany(
            "INSERT OR IGNORE INTO entries (account, family, network, prefix_len)"
            " VALUES (?, ?, ?, ?)",
            (
                (account, *_key(network))
                for account, value in fresh.items()
                for network in value.networks
            ),
        )
        await self._db.executemany(
            "INSERT OR IGNORE INTO device_ids (account, digest) VALUES (?, ?)",
            ((account, digest) for account, value in fresh.items() for digest in value.devices),
        )
        fresh.clear()

    async def _apply_change(self, account: str, value: FeedValue | None, generation: int) -> None:
        old = await self._held(account)
        if value is None:
            await self._drop_account(account, old, generation)
            return
        new: _Held | None = None
        if isinstance(value, AccountValue):
            keys = sorted({_key(network) for network in value.networks})
            new = (keys, value.hostnames, value.devices)
        await self._replace_account(account, value.version, new, old, generation)

    async def reconcile_feed(self, present: Set[str], snapshot_version: int | None) -> int:
        """Remove every account and tombstone not in `present` (the bucket's keys after a
        catch-up: what was purged while this node was away); returns how many went."""
        async with self._writing("reconcile feed") as db:
            rows = await db.execute_fetchall("SELECT account FROM accounts")
            gone = [str(row[0]) for row in rows if str(row[0]) not in present]
            if gone:
                generation = await self._bump_generation()
                for account in gone:
                    await self._drop_account(account, await self._held(account), generation)
            if snapshot_version is not None:
                await self._set_snapshot_version(snapshot_version)
        return len(gone)

    async def _drop_account(self, account: str, old: _Held, generation: int) -> None:
        """The account gone without a tombstone (the bucket no longer has its key). With its
        row goes the generation that tells the DDNS refresher it changed, so the refresher
        is told to reload its hostnames whole instead (see hostname_changes): even when the
        account holds none now, a refresher behind may still count the ones it held before.
        Such purges are rare; tombstones, the usual deletes, keep their row."""
        await self._replace_account(account, 0, None, old, generation)
        await self._db.execute("DELETE FROM accounts WHERE account = ?", (account,))
        await self._db.execute(
            "INSERT INTO meta (key, value) VALUES ('hostnames_reload', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (generation,),
        )

    async def _set_snapshot_version(self, version: int) -> None:
        await self._db.execute(
            "UPDATE meta SET value = ? WHERE key = 'snapshot_version'", (version,)
        )

    async def get_account(self, account: str) -> AccountRecord | None:
        """The live account, or None when unknown or deleted (tombstone)."""
        async with self._reading("get account"):
            row = await self._account_row(account)
            if row is None or not row[1]:
                return None
            return await self._record(account, row[0])

    async def replace_snapshot(self, snapshot: Snapshot) -> SnapshotResult:
        """Replace every registration with `snapshot`: accounts at its version, tombstones gone.

        Stale (StaleWriteError) when the version is below `snapshot_version`, or below any
        stored account's version (live or tombstone). The second check matters: versions come
        from one portal-wide sequence, so a snapshot older than a write we already applied was
        taken before that write, and applying it late would silently undo the newer write.
        One transaction with executemany; rows are produced lazily on the database thread.
        """
        async with self._writing("replace snapshot") as db:
            current = await self._meta("snapshot_version")
            if snapshot.version < current:
                raise StaleWriteError(
                    f"snapshot version {snapshot.version} is older than the stored {current}"
                )
            newest = await self._scalar("SELECT MAX(version) FROM accounts")
            if newest is not None and snapshot.version < newest:
                raise StaleWriteError(
                    f"snapshot version {snapshot.version} is older than an account write"
                    f" at version {newest}"
                )
            generation = await self._bump_generation()
            # Rows arrive in account order: the prefix index is built once at the end (a
            # sort) rather than kept up row by row in random order (2.1 s -> 5.3 s at 1M).
            await db.execute("DROP INDEX entries_by_prefix")
            # The digest index likewise: digests are random, so row by row would split its
            # B-tree at every insert.
            await db.execute("DROP INDEX device_ids_by_digest")
            await db.execute("DELETE FROM entries")
            await db.execute("DELETE FROM hostnames")
            await db.execute("DELETE FROM device_ids")
            await db.execute("DELETE FROM accounts")
            await db.execute("DELETE FROM removed")  # every reader reloads after a snapshot
            await db.execute("DELETE FROM removed_devices")
            accounts = sorted(snapshot.accounts)
            await db.executemany(
                "INSERT INTO accounts (account, version, deleted, generation) VALUES (?, ?, 0, ?)",
                ((account, snapshot.version, generation) for account in accounts),
            )
            cursor = await db.executemany(
                "INSERT OR IGNORE INTO entries (account, family, network, prefix_len)"
                " VALUES (?, ?, ?, ?)",
                _snapshot_rows(snapshot, accounts),
            )
            # The table was emptied above, so the rows inserted (executemany sums them; an
            # ignored duplicate adds nothing) are its new count, without scanning it again.
            entries = max(cursor.rowcount, 0)
            await db.execute(_ENTRIES_BY_PREFIX)
            await db.executemany(
                "INSERT INTO hostnames (account, hostname) VALUES (?, ?)",
                (
                    (account, hostname)
                    for account, names in snapshot.hostnames.items()
                    if account in snapshot.accounts
                    for hostname in names
                ),
            )
            await self._forget_unheld(None)
            cursor = await db.executemany(
                "INSERT INTO device_ids (account, digest) VALUES (?, ?)",
                (  # in primary-key order, as the entries
                    (account, digest)
                    for account in accounts
                    for digest in sorted(set(snapshot.devices.get(account, ())))
                ),
            )
            devices = max(cursor.rowcount, 0)
            await db.execute(_DEVICES_BY_DIGEST)
            await db.executemany(
                "UPDATE meta SET value = ? WHERE key = ?",
                [
                    (snapshot.version, "snapshot_version"),
                    (generation, "snapshot_generation"),
                    (generation, "hostnames_generation"),
                ],
            )
        return SnapshotResult(accounts=len(accounts), entries=entries, devices=devices)

    # --- reads ---------------------------------------------------------------------------

    async def status(self) -> StoreStatus:
        """Counts for `GET /v1/status`; live accounts only, no addresses."""
        async with self._reading("status"):
            accounts = await self._scalar("SELECT COUNT(*) FROM accounts WHERE deleted = 0")
            entries = await self._scalar("SELECT COUNT(*) FROM entries")
            devices = await self._scalar("SELECT COUNT(*) FROM device_ids")
            return StoreStatus(
                accounts=accounts or 0,
                entries=entries or 0,
                snapshot_version=await self._meta("snapshot_version"),
                devices=devices or 0,
            )

    async def snapshot_version(self) -> int:
        """The version of the last snapshot applied (0 for a new node)."""
        async with self._reading("snapshot version"):
            return await self._meta("snapshot_version")

    async def generation(self) -> int:
        """Change counter, incremented by every write from any process; cheap to poll."""
        async with self._reading("generation"):
            return await self._meta("generation")

    async def list_accounts(self, account: str | None = None) -> list[AccountRecord]:
        """Live accounts sorted by id (only `account` when given), with their entries."""
        where = "a.deleted = 0" + ("" if account is None else " AND a.account = ?")
        params: tuple[Any, ...] = () if account is None else (account,)
        async with self._reading("list accounts") as db:
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
                networks.append(_network(int(family), bytes(packed), int(prefix_len)))
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
        async with self._reading(f"list {table}") as db:
            rows = await db.execute_fetchall(
                f"SELECT account, {column} FROM {table}{where} ORDER BY account, {column}",
                params,
            )
        by_account: dict[str, list[Any]] = {}
        for name, value in rows:
            by_account.setdefault(str(name), []).append(value)
        return by_account

    @asynccontextmanager
    async def _consistent(self, operation: str) -> AsyncIterator[aiosqlite.Connection]:
        """Reads in one transaction: what they return is one state of the database."""
        async with self._reading(operation) as db:
            await db.execute("BEGIN")
            try:
                yield db
            finally:
                await self._rollback()  # nothing was written; ends the read transaction

    async def _prefix_rows(self, sql: str) -> list[_Prefix]:
        return await self._converted_rows(sql, _prefix_row)

    async def _converted_rows(
        self, sql: str, factory: Callable[[sqlite3.Cursor, Any], _T]
    ) -> list[_T]:
        """Rows made by `factory` on the database thread, not one by one on the loop's."""
        cursor = await self._db.execute(sql)
        # aiosqlite types the setter as `type | None`; sqlite3 takes any callable.
        cursor.row_factory = factory  # type: ignore[assignment]
        rows = await cursor.fetchall()
        await cursor.close()
        return list(rows)  # type: ignore[arg-type]  # rows come from factory

    async def load_prefixes(self) -> tuple[int, list[_Prefix], list[bytes]]:
        """The generation, (family 4 or 6, network as int, prefix_len) for every live entry
        at that generation, and the device ID digests that authorize (held by exactly one
        account), for a full build of the in-memory AuthorizedClients.

        Tombstones have no entries, so no join is needed; rows are converted on the database
        thread and never become ipaddress objects.
        """
        async with self._consistent("load prefixes"):
            generation = await self._meta("generation")
            rows = await self._prefix_rows("SELECT family, network, prefix_len FROM entries")
            rows += await self._prefix_rows(_RESOLVED_ROWS)
            devices = await self._converted_rows(_AUTHORIZING_DEVICES, _first_column)
            return generation, rows, devices

    async def changes_since(self, since: int) -> Changes:
        """What changed after generation `since` (see Changes): indexed reads costing what
        changed, not what is stored; five statements (each a hop to the database thread)."""
        async with self._consistent("read changes") as db:
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
            cursor.row_factory = _change_row  # type: ignore[assignment]  # as in _prefix_rows
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

    # --- hostnames and what they resolve to (SPEC 3) -----------------------------------

    async def registered_hostnames(self) -> tuple[int, dict[str, tuple[str, ...]]]:
        """The generation and account → its hostnames (sorted; accounts holding any), for a
        full load of the DDNS refresher (each distinct hostname is resolved once)."""
        async with self._consistent("read hostnames") as db:
            generation = await self._meta("generation")
            rows = await db.execute_fetchall(
                "SELECT account, hostname FROM hostnames ORDER BY account, hostname"
            )
            return generation, _by_account(rows)

    async def hostname_changes(self, since: int) -> HostnameChanges:
        """The hostnames of every account written after generation `since` (see
        HostnameChanges): an indexed read costing the accounts that changed, not all held."""
        async with self._consistent("read hostname changes") as db:
            rows = await db.execute_fetchall(_HOSTNAME_COUNTERS)
            generation, snapshot, reload = (int(value) for value in next(iter(rows)))
            if since < snapshot or since < reload:
                rows = await db.execute_fetchall(
                    "SELECT account, hostname FROM hostnames ORDER BY account, hostname"
                )
                return HostnameChanges(generation, _by_account(rows), full_load=True)
            rows = list(await db.execute_fetchall(_CHANGED_HOSTNAMES, (since,)))
            changed = _by_account(rows)
            return HostnameChanges(
                generation, {name: changed.get(name, ()) for name, _ in rows}, full_load=False
            )

    async def hostnames_generation(self) -> int:
        """Moves whenever the set of registered hostnames does; cheap to poll."""
        async with self._reading("hostnames generation"):
            return await self._meta("hostnames_generation")

    async def resolved_addresses(self) -> dict[str, list[bytes]]:
        """hostname → its stored resolved addresses (packed), for a refresher starting up."""
        async with self._reading("read resolved") as db:
            rows = await db.execute_fetchall("SELECT hostname, network FROM resolved")
        resolved: dict[str, list[bytes]] = {}
        for hostname, packed in rows:
            resolved.setdefault(str(hostname), []).append(bytes(packed))
        return resolved

    async def put_resolved(self, changes: Mapping[str, Sequence[Network]]) -> bool:
        """Store what each hostname now resolves to (empty: nothing), in one write that
        moves the generation of every account holding a changed hostname, so each DNS
        process applies the change as it applies account writes. A hostname no account holds
        keeps nothing. True when anything changed.

        A batch costs a fixed number of statements, not some per hostname: the refresher's
        first round after a start hands over thousands of hostnames at a time.
        """
        names = list(changes)
        async with self._writing("store resolved addresses") as db:
            held: set[str] = set()
            old: dict[str, set[tuple[int, bytes]]] = {name: set() for name in names}
            for start in range(0, len(names), _IN_CHUNK):
                chunk = names[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = await db.execute_fetchall(
                    f"SELECT DISTINCT hostname FROM hostnames WHERE hostname IN ({marks})", chunk
                )
                held.update(str(row[0]) for row in rows)
                rows = await db.execute_fetchall(
                    f"SELECT hostname, family, network FROM resolved WHERE hostname IN ({marks})",
                    chunk,
                )
                for hostname, family, packed in rows:
                    old[str(hostname)].add((int(family), bytes(packed)))
            gone: list[tuple[str, int, bytes]] = []
            added: list[tuple[str, int, bytes]] = []
            for hostname in names:
                new = {_key(n)[:2] for n in changes[hostname]} if hostname in held else set()
                gone.extend((hostname, *key) for key in old[hostname] - new)
                added.extend((hostname, *key) for key in new - old[hostname])
            touched = sorted({row[0] for row in gone} | {row[0] for row in added})
            if not touched:
                return False
            generation = await self._bump_generation()
            await db.executemany(
                "DELETE FROM resolved WHERE hostname = ? AND family = ? AND network = ?", gone
            )
            await db.executemany(
                "INSERT INTO resolved (hostname, family, network) VALUES (?, ?, ?)", added
            )
            await self._remember_removed(
                generation, ((f, packed, 32 if f == 4 else 128) for _, f, packed in gone)
            )
            await db.executemany(
                "UPDATE accounts SET generation = ? WHERE account IN"
                " (SELECT account FROM hostnames WHERE hostname = ?)",
                ((generation, hostname) for hostname in touched),
            )
            return True

    async def ping(self) -> None:
        """Raise DatabaseError unless the database answers (health checks)."""
        async with self._reading("ping") as db:
            await db.execute_fetchall("SELECT 1")

    # --- operator overrides (SPEC 5) -----------------------------------------------------

    async def add_entries(
        self,
        account: str,
        networks: Sequence[Network],
        max_per_account: int,
        hostnames: Sequence[str] = (),
        max_hostnames: int = 0,
        devices: Sequence[bytes] = (),
        max_devices: int = 0,
    ) -> AccountRecord:
        """Add entries, hostnames and device ID digests, keeping the account's version (new:
        version 0).

        A tombstoned account is revived at its tombstone version. The unions must stay within
        `max_per_account`, `max_hostnames` and `max_devices`, else RegistrationError and
        nothing changes; a device ID another account holds is a StaleWriteError.
        """
        validate_account_id(account)
        async with self._writing("add entries"):
            row = await self._account_row(account)
            version, live = row if row is not None else (0, False)
            existing = set(await self._entry_keys(account))
            union = existing | {_key(network) for network in networks}
            if len(union) > max_per_account:
                raise RegistrationError(
                    "addresses",
                    f"{len(union)} entries exceed the limit of {max_per_account} per account",
                )
            old_names = await self._hostnames(account)
            names = sorted(set(old_names).union(hostnames))
            if len(names) > max(max_hostnames, len(old_names)):
                raise RegistrationError(
                    "hostnames",
                    f"{len(names)} hostnames exceed the limit of {max_hostnames} per account",
                )
            old_devices = await self._devices(account)
            digests = sorted(set(old_devices).union(devices))
            check_count(len(digests), max(max_devices, len(old_devices)))
            await self._raise_if_held(account, devices)
            if (
                live
                and union == existing
                and (names, digests) == (list(old_names), list(old_devices))
            ):
                return await self._record(account, version)
            generation = await self._bump_generation()
            await self._upsert_account(account, version, False, generation)
            await self._insert_entries(account, sorted(union - existing))
            await self._set_hostnames(account, old_names, names, generation)
            await self._set_devices(account, old_devices, digests, generation)
            return await self._record(account, version)

    async def remove_entries(
        self,
        account: str,
        networks: Sequence[Network] | None,
        hostnames: Sequence[str] = (),
        devices: Sequence[bytes] = (),
    ) -> bool:
        """Remove entries, hostnames and device ID digests; with None the account becomes a
        tombstone at its current version.

        Returns False (and changes nothing) when the account is not live.
        """
        validate_account_id(account)
        async with self._writing("remove entries") as db:
            row = await self._account_row(account)
            if row is None or not row[1]:
                return False
            existing = set(await self._entry_keys(account))
            gone = existing if networks is None else existing & {_key(n) for n in networks}
            old_names = await self._hostnames(account)
            names = [] if networks is None else sorted(set(old_names).difference(hostnames))
            old_devices = await self._devices(account)
            digests = [] if networks is None else sorted(set(old_devices).difference(devices))
            if (
                networks is not None
                and not gone
                and (names, digests)
                == (
                    list(old_names),
                    list(old_devices),
                )
            ):
                return True
            generation = await self._bump_generation()
            await db.executemany(
                "DELETE FROM entries"
                " WHERE account = ? AND family = ? AND network = ? AND prefix_len = ?",
                [(account, *key) for key in gone],
            )
            await self._upsert_account(account, row[0], networks is None, generation)
            await self._remember_removed(generation, gone)
            await self._set_hostnames(account, old_names, names, generation)
            await self._set_devices(account, old_devices, digests, generation)
            return True


def _by_account(rows: Iterable[Any]) -> dict[str, tuple[str, ...]]:
    """(account, hostname or NULL) rows → account → its hostnames, sorted."""
    by_account: dict[str, list[str]] = {}
    for account, hostname in rows:
        if hostname is not None:
            by_account.setdefault(str(account), []).append(str(hostname))
    return {account: tuple(sorted(names)) for account, names in by_account.items()}


def _database_uri(path: Path, create: bool) -> str:
    """The SQLite URI for `path`; creates its directories or checks that it exists."""
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(
                f"cannot create the directory for the registrations database {path}: {exc.strerror}"
            ) from None
    elif not path.exists():
        raise DatabaseError(f"registrations database {path} does not exist; {_CREATE_HINT}")
    # mode=rw: never create the file behind the caller's back (it may vanish after exists()).
    return f"{path.absolute().as_uri()}?mode={'rwc' if create else 'rw'}"


def _snapshot_rows(snapshot: Snapshot, accounts: list[str]) -> Iterator[_Row]:
    """The entries rows of `snapshot`, lazily. Accounts sorted and entries already sorted by
    (family, address, prefix): rows arrive in primary-key order, so the B-tree is appended
    to rather than split at random. An AccountEntries (from parse_snapshot_document) already
    holds its rows, so a million rows cost no Python bytecode each, only the C iterators."""
    return chain.from_iterable(
        _account_rows(account, snapshot.accounts[account]) for account in accounts
    )


def _account_rows(account: str, networks: Sequence[Network]) -> Iterable[_Row]:
    if isinstance(networks, AccountEntries) and networks.account == account:
        return networks.rows
    return ((account, *_key(network)) for network in networks)

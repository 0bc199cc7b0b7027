"""The registrations database connection: open, pragmas, schema migrations, transactions.

Every part of the store (accounts.py, feed_apply.py, hostnames.py, readers.py) reads and
writes through one Database and the helpers here; none opens a transaction of its own.
Knows tables only as schema.py states them, nothing of accounts, hostnames or the feed.
Error messages name the operation, never an address.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

import aiosqlite

from smartdns.errors import SmartDNSError
from smartdns.registrations.store.schema import (
    SCHEMA_V1,
    SCHEMA_V2,
    SCHEMA_V3,
    SCHEMA_V4,
    SCHEMA_VERSION,
)

# Removed entries are kept for this many generations, so a reader that far behind still
# catches up by reading what changed; one further behind loads everything.
KEEP_REMOVED_GENERATIONS: Final = 65_536
PRUNE_EVERY: Final = 256  # generations between prunes of the removed rows
IN_CHUNK: Final = 500  # names per `IN (...)` list, well under SQLite's variable limit
_CREATE_HINT: Final = "create it with `smartdns registrations add` or `import`"
# Each version's migration from the one before, in order.
_MIGRATIONS: Final = ((1, SCHEMA_V2), (2, SCHEMA_V3), (3, SCHEMA_V4))

_T = TypeVar("_T")


class DatabaseError(SmartDNSError):
    """The registrations database cannot be opened or an operation on it failed."""


class Database:
    """One SQLite connection, safe to share between the server and the CLI.

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
    async def open(cls, path: Path, *, create: bool) -> Database:
        """Open the database at `path`; with `create`, make it (and its directories) if missing.

        Without `create` a missing file is an error rather than a silently empty store, since
        an empty store refuses every client. A file that is not a smartdns database is too.
        """
        uri = _database_uri(path, create)
        try:
            db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open registrations database {path}: {exc}") from None
        database = cls(db, path)
        try:
            await database._prepare(create)
        except BaseException:
            await db.close()
            raise
        return database

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
            for statement in SCHEMA_V1:
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
        for before, statements in _MIGRATIONS:
            if version == before:
                for statement in statements:
                    await self._db.execute(statement)
                version = before + 1
        if version != SCHEMA_VERSION:
            raise DatabaseError(
                f"registrations database {self._path} has schema version {version}, "
                f"this smartdns supports {SCHEMA_VERSION}"
            )

    async def close(self) -> None:
        """Close the connection; the database cannot be used afterwards."""
        async with self._lock:
            try:
                await self._db.close()
            except sqlite3.Error as exc:
                raise DatabaseError(f"registrations database: close failed: {exc}") from None

    async def ping(self) -> None:
        """Raise DatabaseError unless the database answers (health checks)."""
        async with self.reading("ping") as db:
            await db.execute_fetchall("SELECT 1")

    # --- transactions --------------------------------------------------------------------

    @asynccontextmanager
    async def reading(self, operation: str) -> AsyncIterator[aiosqlite.Connection]:
        """The connection to itself; a sqlite3 error becomes DatabaseError naming `operation`."""
        async with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise DatabaseError(f"registrations database: {operation} failed: {exc}") from None

    @asynccontextmanager
    async def consistent(self, operation: str) -> AsyncIterator[aiosqlite.Connection]:
        """Reads in one transaction: what they return is one state of the database."""
        async with self.reading(operation) as db:
            await db.execute("BEGIN")
            try:
                yield db
            finally:
                await self._rollback()  # nothing was written; ends the read transaction

    @asynccontextmanager
    async def writing(self, operation: str) -> AsyncIterator[aiosqlite.Connection]:
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

    # --- the change counter --------------------------------------------------------------

    async def bump_generation(self) -> int:
        """The next generation, which this write's rows carry; noted once committed. Call
        inside `writing`."""
        generation = await scalar(
            self._db, "UPDATE meta SET value = value + 1 WHERE key = 'generation' RETURNING value"
        )
        assert generation is not None  # the meta row exists in every database
        self._pending_generation = generation
        if generation % PRUNE_EVERY == 0:
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
        async with self.writing("forget removed entries") as db:
            await self._prune_removed(
                through if through is not None else await meta(db, "generation")
            )


async def meta(db: aiosqlite.Connection, key: str) -> int:
    """The `meta` table's value at `key` (snapshot_version, generation, ...)."""
    value = await scalar(db, "SELECT value FROM meta WHERE key = ?", (key,))
    if value is None:
        raise DatabaseError(f"registrations database: meta key {key} is missing")
    return value


async def scalar(db: aiosqlite.Connection, sql: str, params: tuple[Any, ...] = ()) -> int | None:
    """The first column of the first row as an int; None for no row or NULL."""
    for row in await db.execute_fetchall(sql, params):
        return None if row[0] is None else int(row[0])
    return None


async def converted_rows(
    db: aiosqlite.Connection, sql: str, factory: Callable[[sqlite3.Cursor, Any], _T]
) -> list[_T]:
    """Rows made by `factory` on the database thread, not one by one on the loop's."""
    cursor = await db.execute(sql)
    # aiosqlite types the setter as `type | None`; sqlite3 takes any callable.
    cursor.row_factory = factory  # type: ignore[assignment]
    rows = await cursor.fetchall()
    await cursor.close()
    return list(rows)  # type: ignore[arg-type]  # rows come from factory


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

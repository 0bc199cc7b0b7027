"""RegistrationStore: the SQLite registrations database, as one part per client on one
connection.

Written through registrations.writer only; the DNS query path never awaits SQLite, it reads
the in-memory snapshot built from `readers.load_prefixes()` and kept up by
`readers.changes_since()`. Stores what SPEC 3 allows and nothing else: no timestamps, no
counters of use. The facade only opens, composes and closes; each caller reaches the part it
needs (`store.accounts.put_account(...)`), so a part's signature is written in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from smartdns.registrations.store.account_rows import AccountRecord
from smartdns.registrations.store.accounts import AccountWrites, SnapshotResult
from smartdns.registrations.store.database import Database, DatabaseError
from smartdns.registrations.store.feed_apply import FeedApplication
from smartdns.registrations.store.hostnames import HostnameChanges, Hostnames
from smartdns.registrations.store.readers import Changes, Readers, StoreStatus

__all__ = [
    "AccountRecord",
    "Changes",
    "DatabaseError",
    "HostnameChanges",
    "RegistrationStore",
    "SnapshotResult",
    "StoreStatus",
]


@dataclass(frozen=True, slots=True)
class RegistrationStore:
    """The store's parts, all on one Database (one connection, one lock, one generation)."""

    database: Database  # open, close, transactions, the change counter, ping
    accounts: AccountWrites  # the sync API's and the CLI's writes (SPEC 4, 5)
    feed: FeedApplication  # the registration feed's changes (SPEC 4)
    hostnames: Hostnames  # registered hostnames, what they resolve to (SPEC 3)
    readers: Readers  # accounts, counts, what a DNS process loads and follows

    @classmethod
    async def open(cls, path: Path, *, create: bool) -> RegistrationStore:
        """Open the database at `path` (Database.open: with `create`, make it if missing)."""
        database = await Database.open(path, create=create)
        return cls(
            database,
            AccountWrites(database),
            FeedApplication(database),
            Hostnames(database),
            Readers(database),
        )

    @property
    def path(self) -> Path:
        return self.database.path

    async def close(self) -> None:
        """Close the connection; no part can be used afterwards."""
        await self.database.close()

    async def __aenter__(self) -> RegistrationStore:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

"""Account writes: the sync API's PUT, DELETE and snapshot (SPEC 4), the CLI's add and remove
(SPEC 5), each one transaction through the Database.

Whether a write is stale is versions.check_write's to say, the one rule the feed's bucket
writes follow too; this module knows nothing of the feed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

from smartdns.errors import RegistrationError, StaleWriteError
from smartdns.registrations.device_ids import check_count
from smartdns.registrations.entries import (
    AccountEntries,
    EntryRow,
    Network,
    Snapshot,
    validate_account_id,
)
from smartdns.registrations.store import account_rows
from smartdns.registrations.store.account_rows import AccountRecord
from smartdns.registrations.store.database import Database, meta, scalar
from smartdns.registrations.store.schema import DEVICES_BY_DIGEST, ENTRIES_BY_PREFIX
from smartdns.registrations.versions import check_write


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


class AccountWrites:
    """The writes of the sync API and the CLI, on a shared Database."""

    def __init__(self, database: Database) -> None:
        self._database = database

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
        wanted = sorted({account_rows.key(network) for network in networks})
        names = sorted(set(hostnames))
        digests = sorted(set(devices))
        async with self._database.writing("put account") as db:
            row, snapshot_version = await account_rows.row_and_snapshot(db, account)
            old = await account_rows.held(db, account)
            same = [list(held) for held in old] == [wanted, names, digests]
            repeat = row == (version, True) and same
            if check_write(version, row, repeat=repeat, snapshot_version=snapshot_version):
                return await account_rows.record(db, account, version)
            await account_rows.raise_if_held(db, account, devices)
            generation = await self._database.bump_generation()
            await account_rows.replace_account(
                db, account, version, (wanted, names, digests), old, generation
            )
            networks_out = tuple(account_rows.network(*key) for key in wanted)
            return AccountRecord(account, version, networks_out, tuple(names), tuple(digests))

    async def delete_account(self, account: str, version: int) -> bool:
        """Remove the account's entries and leave a tombstone at `version`; True if it was live.

        The tombstone is written for accounts never seen too, so a delayed older PUT cannot
        create them. A tombstone already at `version` is a no-op (False). Stale: version below
        the stored one, equal to a live account's, or not above `snapshot_version`.
        """
        validate_account_id(account)
        async with self._database.writing("delete account") as db:
            row, snapshot_version = await account_rows.row_and_snapshot(db, account)
            if check_write(
                version, row, repeat=row == (version, False), snapshot_version=snapshot_version
            ):
                return False
            live = row is not None and row[1]
            generation = await self._database.bump_generation()
            old = await account_rows.held(db, account)
            await account_rows.replace_account(db, account, version, None, old, generation)
            return live

    async def device_conflict(self, account: str, devices: Sequence[bytes]) -> None:
        """account_rows.raise_if_held as a read of its own: the sync API's check before it
        writes an account to the feed's bucket (which has no index by digest; this node's
        copy does)."""
        async with self._database.reading("check device IDs") as db:
            await account_rows.raise_if_held(db, account, devices)

    async def replace_snapshot(self, snapshot: Snapshot) -> SnapshotResult:
        """Replace every registration with `snapshot`: accounts at its version, tombstones gone.

        Stale (StaleWriteError) when the version is below `snapshot_version`, or below any
        stored account's version (live or tombstone). The second check matters: versions come
        from one portal-wide sequence, so a snapshot older than a write we already applied was
        taken before that write, and applying it late would silently undo the newer write.
        One transaction with executemany; rows are produced lazily on the database thread.
        """
        async with self._database.writing("replace snapshot") as db:
            current = await meta(db, "snapshot_version")
            if snapshot.version < current:
                raise StaleWriteError(
                    f"snapshot version {snapshot.version} is older than the stored {current}"
                )
            newest = await scalar(db, "SELECT MAX(version) FROM accounts")
            if newest is not None and snapshot.version < newest:
                raise StaleWriteError(
                    f"snapshot version {snapshot.version} is older than an account write"
                    f" at version {newest}"
                )
            generation = await self._database.bump_generation()
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
            await db.execute(ENTRIES_BY_PREFIX)
            await db.executemany(
                "INSERT INTO hostnames (account, hostname) VALUES (?, ?)",
                (
                    (account, hostname)
                    for account, names in snapshot.hostnames.items()
                    if account in snapshot.accounts
                    for hostname in names
                ),
            )
            await account_rows.forget_unheld(db, None)
            cursor = await db.executemany(
                "INSERT INTO device_ids (account, digest) VALUES (?, ?)",
                (  # in primary-key order, as the entries
                    (account, digest)
                    for account in accounts
                    for digest in sorted(set(snapshot.devices.get(account, ())))
                ),
            )
            devices = max(cursor.rowcount, 0)
            await db.execute(DEVICES_BY_DIGEST)
            await db.executemany(
                "UPDATE meta SET value = ? WHERE key = ?",
                [
                    (snapshot.version, "snapshot_version"),
                    (generation, "snapshot_generation"),
                    (generation, "hostnames_generation"),
                ],
            )
        return SnapshotResult(accounts=len(accounts), entries=entries, devices=devices)

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
        async with self._database.writing("add entries") as db:
            row = await account_rows.account_row(db, account)
            version, live = row if row is not None else (0, False)
            existing = set(await account_rows.entry_keys(db, account))
            union = existing | {account_rows.key(network) for network in networks}
            if len(union) > max_per_account:
                raise RegistrationError(
                    "addresses",
                    f"{len(union)} entries exceed the limit of {max_per_account} per account",
                )
            old_names = await account_rows.hostnames(db, account)
            names = sorted(set(old_names).union(hostnames))
            if len(names) > max(max_hostnames, len(old_names)):
                raise RegistrationError(
                    "hostnames",
                    f"{len(names)} hostnames exceed the limit of {max_hostnames} per account",
                )
            old_devices = await account_rows.devices(db, account)
            digests = sorted(set(old_devices).union(devices))
            check_count(len(digests), max(max_devices, len(old_devices)))
            await account_rows.raise_if_held(db, account, devices)
            if (
                live
                and union == existing
                and (names, digests) == (list(old_names), list(old_devices))
            ):
                return await account_rows.record(db, account, version)
            generation = await self._database.bump_generation()
            await account_rows.upsert_account(db, account, version, False, generation)
            await account_rows.insert_entries(db, account, sorted(union - existing))
            await account_rows.set_hostnames(db, account, old_names, names, generation)
            await account_rows.set_devices(db, account, old_devices, digests, generation)
            return await account_rows.record(db, account, version)

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
        async with self._database.writing("remove entries") as db:
            row = await account_rows.account_row(db, account)
            if row is None or not row[1]:
                return False
            existing = set(await account_rows.entry_keys(db, account))
            gone = (
                existing if networks is None else existing & {account_rows.key(n) for n in networks}
            )
            old_names = await account_rows.hostnames(db, account)
            names = [] if networks is None else sorted(set(old_names).difference(hostnames))
            old_devices = await account_rows.devices(db, account)
            digests = [] if networks is None else sorted(set(old_devices).difference(devices))
            if (
                networks is not None
                and not gone
                and (names, digests) == (list(old_names), list(old_devices))
            ):
                return True
            generation = await self._database.bump_generation()
            await db.executemany(
                "DELETE FROM entries"
                " WHERE account = ? AND family = ? AND network = ? AND prefix_len = ?",
                [(account, *key) for key in gone],
            )
            await account_rows.upsert_account(db, account, row[0], networks is None, generation)
            await account_rows.remember_removed(db, generation, gone)
            await account_rows.set_hostnames(db, account, old_names, names, generation)
            await account_rows.set_devices(db, account, old_devices, digests, generation)
            return True


def _snapshot_rows(snapshot: Snapshot, accounts: list[str]) -> Iterator[EntryRow]:
    """The entries rows of `snapshot`, lazily. Accounts sorted and entries already sorted by
    (family, address, prefix): rows arrive in primary-key order, so the B-tree is appended
    to rather than split at random. An AccountEntries (from parse_snapshot_document) already
    holds its rows, so a million rows cost no Python bytecode each, only the C iterators."""
    return chain.from_iterable(
        _rows_of(account, snapshot.accounts[account]) for account in accounts
    )


def _rows_of(account: str, networks: Sequence[Network]) -> Iterable[EntryRow]:
    if isinstance(networks, AccountEntries) and networks.account == account:
        return networks.rows
    return ((account, *account_rows.key(network)) for network in networks)

"""Feed application: the registration feed's changes applied to this node's copy (SPEC 4).

The one part of the store that knows the feed's types (feed_format). The bucket is the
truth and already enforced SPEC 4's version rules fleet-wide, so nothing here refuses a
change; a change older than the copy is only counted. Whatever the feed keeps alongside the
registrations, in the same transaction, belongs here too.
"""

from __future__ import annotations

from collections.abc import Sequence, Set

import aiosqlite

from smartdns.registrations.feed_follow import Position
from smartdns.registrations.feed_format import AccountValue, FeedApplied, FeedChange, FeedValue
from smartdns.registrations.store import account_rows
from smartdns.registrations.store.database import IN_CHUNK, Database


class FeedApplication:
    """The feed follower's writes, on a shared Database."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def apply_feed(
        self,
        changes: Sequence[FeedChange],
        snapshot_version: int | None,
        position: Position | None = None,
    ) -> FeedApplied:
        """Apply the feed's changes in one transaction, one generation for all of them, and
        save `position` (the bucket revision they reach) in the same transaction, so a restart
        resumes exactly after what was applied.

        A value or tombstone replaces the stored account when its version is higher (the
        bucket already enforced SPEC 4's rules fleet-wide, so `snapshot_version` does not
        refuse it, and a snapshot's own accounts arrive at its version); a lower one is
        counted stale, an equal one is the same change again. None removes the account
        without a tombstone. `snapshot_version`, when given, is stored as well. Stored
        versions are read 500 at a time, accounts new to the store are inserted with one
        executemany, and stored accounts taking a value without hostnames are replaced set by
        set, so a catch-up or a resume costs statements per batch, not per key.
        """
        applied = stale = 0
        async with self._database.writing("apply feed") as db:
            stored = await _stored_versions(db, {account for account, _ in changes})
            generation: int | None = None
            fresh: dict[str, AccountValue] = {}
            plain: dict[str, AccountValue] = {}  # stored, changed, no hostnames in the value
            for account, value in changes:
                version = stored.get(account)
                if value is not None and version is not None and value.version <= version:
                    stale += value.version < version
                    continue
                if value is None and account not in stored:
                    continue
                generation = generation or await self._database.bump_generation()
                applied += 1
                if version is None and isinstance(value, AccountValue) and not value.hostnames:
                    # New to the store, and no hostname to resolve: plain inserts (below).
                    fresh[account] = value
                    stored[account] = value.version
                    continue
                if isinstance(value, AccountValue) and not value.hostnames and account not in fresh:
                    plain[account] = value  # replaced with the others (below)
                    stored[account] = value.version
                    continue
                # Before it changes one of them:
                await _insert_fresh(db, fresh, generation)
                await _replace_plain(db, plain, generation)
                await _apply_change(db, account, value, generation)
                if value is None:
                    del stored[account]
                else:
                    stored[account] = value.version
            if generation is not None:
                await _insert_fresh(db, fresh, generation)
                await _replace_plain(db, plain, generation)
            if snapshot_version is not None:
                await _set_snapshot_version(db, snapshot_version)
            await _save_position(db, position)
        return FeedApplied(applied, stale)

    async def feed_position(self) -> tuple[Position | None, int]:
        """The bucket position saved with the last feed batch (None: never saved), and the
        number of accounts held, live or tombstone (each is one key of the bucket)."""
        async with self._database.reading("feed position") as db:
            rows = await db.execute_fetchall(
                "SELECT (SELECT value FROM meta WHERE key = 'feed_created'),"
                " (SELECT value FROM meta WHERE key = 'feed_sequence'),"
                " (SELECT value FROM meta WHERE key = 'feed_messages'),"
                " (SELECT COUNT(*) FROM accounts)"
            )
            created, sequence, messages, accounts = next(iter(rows))
        if created is None:
            return None, int(accounts)
        return Position(int(created), int(sequence), int(messages or 0)), int(accounts)

    async def reconcile_feed(
        self, present: Set[str], snapshot_version: int | None, position: Position | None = None
    ) -> int:
        """Remove every account and tombstone not in `present` (the bucket's keys after a
        full read: what was purged while this node was away), and save `position`, the
        revision that read reached; returns how many accounts went."""
        async with self._database.writing("reconcile feed") as db:
            rows = await db.execute_fetchall("SELECT account FROM accounts")
            gone = [str(row[0]) for row in rows if str(row[0]) not in present]
            if gone:
                generation = await self._database.bump_generation()
                for account in gone:
                    old = await account_rows.held(db, account)
                    await _drop_account(db, account, old, generation)
            if snapshot_version is not None:
                await _set_snapshot_version(db, snapshot_version)
            await _save_position(db, position)
        return len(gone)


async def _save_position(db: aiosqlite.Connection, position: Position | None) -> None:
    if position is None:
        return
    await db.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (
            ("feed_created", position.created),
            ("feed_sequence", position.sequence),
            ("feed_messages", position.messages),
        ),
    )


async def _stored_versions(db: aiosqlite.Connection, accounts: Set[str]) -> dict[str, int]:
    """account -> stored version (live or tombstone) of those of `accounts` stored."""
    names = sorted(accounts)
    versions: dict[str, int] = {}
    for start in range(0, len(names), IN_CHUNK):
        chunk = names[start : start + IN_CHUNK]
        rows = await db.execute_fetchall(
            "SELECT account, version FROM accounts WHERE account IN"
            f" ({','.join('?' * len(chunk))})",
            chunk,
        )
        versions.update((str(row[0]), int(row[1])) for row in rows)
    return versions


async def _insert_fresh(
    db: aiosqlite.Connection, fresh: dict[str, AccountValue], generation: int
) -> None:
    """Accounts not stored before, without hostnames: nothing to take away, three inserts."""
    if not fresh:
        return
    await account_rows.upsert_accounts(
        db, ((account, value.version, False, generation) for account, value in fresh.items())
    )
    await account_rows.insert_entries_of(
        db,
        (
            (account, account_rows.key(network))
            for account, value in fresh.items()
            for network in value.networks
        ),
    )
    await account_rows.set_devices_of(
        db, ((account, (), value.devices) for account, value in fresh.items()), generation
    )
    fresh.clear()


async def _replace_plain(
    db: aiosqlite.Connection, plain: dict[str, AccountValue], generation: int
) -> None:
    """Stored accounts (live or tombstone) taking a value without hostnames: what
    account_rows.replace_account does one account at a time, done for all of them with the
    same row functions, a few statements in all. One that holds hostnames now takes the
    general path."""
    if not plain:
        return
    names = sorted(plain)
    old_entries: dict[str, set[account_rows.Key]] = {name: set() for name in names}
    old_devices: dict[str, set[bytes]] = {name: set() for name in names}
    with_hostnames: set[str] = set()
    for start in range(0, len(names), IN_CHUNK):
        chunk = names[start : start + IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        for row in await db.execute_fetchall(
            f"SELECT account, family, network, prefix_len FROM entries WHERE account IN ({marks})",
            chunk,
        ):
            old_entries[str(row[0])].add((int(row[1]), bytes(row[2]), int(row[3])))
        for row in await db.execute_fetchall(
            f"SELECT account, digest FROM device_ids WHERE account IN ({marks})", chunk
        ):
            old_devices[str(row[0])].add(bytes(row[1]))
        for row in await db.execute_fetchall(
            f"SELECT DISTINCT account FROM hostnames WHERE account IN ({marks})", chunk
        ):
            with_hostnames.add(str(row[0]))
    for account in with_hostnames:
        await _apply_change(db, account, plain.pop(account), generation)
    new_entries = {
        account: {account_rows.key(network) for network in value.networks}
        for account, value in plain.items()
    }
    await db.executemany("DELETE FROM entries WHERE account = ?", ((name,) for name in plain))
    await account_rows.upsert_accounts(
        db, ((account, value.version, False, generation) for account, value in plain.items())
    )
    await account_rows.insert_entries_of(
        db, ((account, key) for account, keys in new_entries.items() for key in keys)
    )
    await account_rows.remember_removed(
        db,
        generation,
        {key for account, keys in new_entries.items() for key in old_entries[account] - keys},
    )
    await account_rows.set_devices_of(
        db,
        ((account, old_devices[account], value.devices) for account, value in plain.items()),
        generation,
    )
    plain.clear()


async def _apply_change(
    db: aiosqlite.Connection, account: str, value: FeedValue | None, generation: int
) -> None:
    old = await account_rows.held(db, account)
    if value is None:
        await _drop_account(db, account, old, generation)
        return
    new: account_rows.Held | None = None
    if isinstance(value, AccountValue):
        keys = sorted({account_rows.key(network) for network in value.networks})
        new = (keys, value.hostnames, value.devices)
    await account_rows.replace_account(db, account, value.version, new, old, generation)


async def _drop_account(
    db: aiosqlite.Connection, account: str, old: account_rows.Held, generation: int
) -> None:
    """The account gone without a tombstone (the bucket no longer has its key). With its
    row goes the generation that tells the DDNS refresher it changed, so the refresher
    is told to reload its hostnames whole instead (see hostnames.hostname_changes): even when
    the account holds none now, a refresher behind may still count the ones it held before.
    Such purges are rare; tombstones, the usual deletes, keep their row."""
    await account_rows.replace_account(db, account, 0, None, old, generation)
    await db.execute("DELETE FROM accounts WHERE account = ?", (account,))
    await db.execute(
        "INSERT INTO meta (key, value) VALUES ('hostnames_reload', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (generation,),
    )


async def _set_snapshot_version(db: aiosqlite.Connection, version: int) -> None:
    await db.execute("UPDATE meta SET value = ? WHERE key = 'snapshot_version'", (version,))

"""Registered hostnames and what they resolve to (SPEC 3): the DDNS refresher's part of the
store, what it reads to know which hostnames to resolve and how it stores their addresses.

The addresses authorize as host entries of each account holding the hostname; readers.py
hands them to the DNS processes with the entries. Hostnames are never logged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from smartdns.registrations.entries import Network
from smartdns.registrations.store import account_rows
from smartdns.registrations.store.database import IN_CHUNK, Database, meta

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
_ALL_HOSTNAMES: Final = "SELECT account, hostname FROM hostnames ORDER BY account, hostname"


@dataclass(frozen=True, slots=True)
class HostnameChanges:
    """What the DDNS refresher at `since` must apply to reach `generation`: account → its
    hostnames now (empty: none any more) for every account written after `since`, or, with
    `full_load`, for every account holding any (a snapshot, or an account dropped without
    a tombstone, came after `since`: what changed can no longer be read by generation)."""

    generation: int
    accounts: dict[str, tuple[str, ...]]
    full_load: bool


class Hostnames:
    """The DDNS refresher's reads and writes, on a shared Database."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def registered_hostnames(self) -> tuple[int, dict[str, tuple[str, ...]]]:
        """The generation and account → its hostnames (sorted; accounts holding any), for a
        full load of the DDNS refresher (each distinct hostname is resolved once)."""
        async with self._database.consistent("read hostnames") as db:
            generation = await meta(db, "generation")
            rows = await db.execute_fetchall(_ALL_HOSTNAMES)
            return generation, _by_account(rows)

    async def hostname_changes(self, since: int) -> HostnameChanges:
        """The hostnames of every account written after generation `since` (see
        HostnameChanges): an indexed read costing the accounts that changed, not all held."""
        async with self._database.consistent("read hostname changes") as db:
            rows = await db.execute_fetchall(_HOSTNAME_COUNTERS)
            generation, snapshot, reload = (int(value) for value in next(iter(rows)))
            if since < snapshot or since < reload:
                rows = await db.execute_fetchall(_ALL_HOSTNAMES)
                return HostnameChanges(generation, _by_account(rows), full_load=True)
            rows = list(await db.execute_fetchall(_CHANGED_HOSTNAMES, (since,)))
            changed = _by_account(rows)
            return HostnameChanges(
                generation, {name: changed.get(name, ()) for name, _ in rows}, full_load=False
            )

    async def hostnames_generation(self) -> int:
        """Moves whenever the set of registered hostnames does; cheap to poll."""
        async with self._database.reading("hostnames generation") as db:
            return await meta(db, "hostnames_generation")

    async def resolved_addresses(self) -> dict[str, list[bytes]]:
        """hostname → its stored resolved addresses (packed), for a refresher starting up."""
        async with self._database.reading("read resolved") as db:
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
        async with self._database.writing("store resolved addresses") as db:
            held: set[str] = set()
            old: dict[str, set[tuple[int, bytes]]] = {name: set() for name in names}
            for start in range(0, len(names), IN_CHUNK):
                chunk = names[start : start + IN_CHUNK]
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
                new = (
                    {account_rows.key(n)[:2] for n in changes[hostname]}
                    if hostname in held
                    else set()
                )
                gone.extend((hostname, *key) for key in old[hostname] - new)
                added.extend((hostname, *key) for key in new - old[hostname])
            touched = sorted({row[0] for row in gone} | {row[0] for row in added})
            if not touched:
                return False
            generation = await self._database.bump_generation()
            await db.executemany(
                "DELETE FROM resolved WHERE hostname = ? AND family = ? AND network = ?", gone
            )
            await db.executemany(
                "INSERT INTO resolved (hostname, family, network) VALUES (?, ?, ?)", added
            )
            await account_rows.remember_removed(
                db, generation, ((f, packed, 32 if f == 4 else 128) for _, f, packed in gone)
            )
            await db.executemany(
                "UPDATE accounts SET generation = ? WHERE account IN"
                " (SELECT account FROM hostnames WHERE hostname = ?)",
                ((generation, hostname) for hostname in touched),
            )
            return True


def _by_account(rows: Iterable[Any]) -> dict[str, tuple[str, ...]]:
    """(account, hostname or NULL) rows → account → its hostnames, sorted."""
    by_account: dict[str, list[str]] = {}
    for account, hostname in rows:
        if hostname is not None:
            by_account.setdefault(str(account), []).append(str(hostname))
    return {account: tuple(sorted(names)) for account, names in by_account.items()}

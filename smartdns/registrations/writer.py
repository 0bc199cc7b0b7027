"""RegistrationWriter: the one path by which registrations change, whatever their source.

It is the local registration sink (sink.py) the sync API, the CLI and the DDNS refresher
write through without a feed, and what the feed's follower applies the bucket through with
one: it checks the input against the rules of SPEC 3, writes it to the store in one
transaction, then announces the change so the DNS side applies it before the source reports
success.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence, Set
from typing import TypeVar

from smartdns.config.model import RegistrationsConfig
from smartdns.errors import SmartDNSError
from smartdns.registrations.entries import Network, Snapshot, validate_account_id
from smartdns.registrations.feed_follow import Position
from smartdns.registrations.feed_format import FeedApplied, FeedChange
from smartdns.registrations.json_body import release_snapshot
from smartdns.registrations.store import AccountRecord, RegistrationStore, SnapshotResult

# Called with the store's generation after a write that changed something, and whether that
# write replaced everything (a snapshot: a full load, which may take seconds); returns once
# the DNS side applied it, raises NotInEffect when it did not in time. A source with no DNS
# side in its process (the CLI) has none: the node's generation poll picks the change up.
Announce = Callable[[int, bool], Awaitable[None]]
_T = TypeVar("_T")


class NotInEffect(SmartDNSError):
    """The write is stored (durable) but the DNS side did not confirm it in time, so it may
    not be in DNS answers yet: the sync API answers 503, never a 200 that is not in effect.
    The same write repeated waits for it again, and gets its 200 once it is in effect."""


class RegistrationWriter:
    """Validates, stores, announces. `reload` swaps the rules (limits) at once."""

    def __init__(
        self, store: RegistrationStore, rules: RegistrationsConfig, announce: Announce | None = None
    ) -> None:
        self._store = store
        self._rules = rules
        self._announce = announce
        # The latest write whose announcement failed: a repeat of a write (which changes
        # nothing) waits for it, so its 200 too means in effect.
        self._unconfirmed: int | None = None

    def reload(self, rules: RegistrationsConfig) -> None:
        self._rules = rules

    async def _through(
        self, write: Awaitable[_T], everything: bool = False, *, promised: bool = True
    ) -> _T:
        """Await the store write, then announce it unless it changed nothing (a repeat) and
        every write before it is confirmed. Another coroutine's write may land in between:
        announcing a later generation too is harmless, it covers this one.

        `promised`: the caller's success tells someone the write is in effect (the sync
        API's 200), so NotInEffect is raised to it; the feed's follower and the DDNS
        refresher promise nothing, and what they wrote is applied by the DNS side's poll."""
        before = self._store.database.generation_written
        result = await write
        written = self._store.database.generation_written
        if self._announce is None or written is None:
            return result
        if written == before and (self._unconfirmed is None or not promised):
            return result
        try:
            await self._announce(written, everything)
        except NotInEffect:
            if promised:
                self._unconfirmed = max(written, self._unconfirmed or 0)
                raise
            return result
        if self._unconfirmed is not None and written >= self._unconfirmed:
            self._unconfirmed = None
        return result

    async def put_account(
        self,
        account: str,
        version: int,
        networks: Sequence[Network],
        hostnames: Sequence[str] = (),
        devices: Sequence[bytes] = (),
    ) -> AccountRecord:
        """Replace the account's entries, hostnames and device ID digests at `version` (SPEC 4
        version rules; a device ID another account holds is 409 too)."""
        validate_account_id(account)
        write = self._store.accounts.put_account(account, version, networks, hostnames, devices)
        return await self._through(write)

    async def delete_account(self, account: str, version: int) -> bool:
        """Remove the account, leaving a tombstone at `version`; True if it was live."""
        validate_account_id(account)
        return await self._through(self._store.accounts.delete_account(account, version))

    async def replace_snapshot(self, holder: list[Snapshot]) -> SnapshotResult:
        """Replace every registration with the snapshot in `holder`, all or nothing. The
        snapshot is taken out of `holder` and freed once stored, before the DNS side loads
        the new set, so a million entries are not held twice over meanwhile."""
        return await self._through(self._store_snapshot(holder), everything=True)

    async def _store_snapshot(self, holder: list[Snapshot]) -> SnapshotResult:
        result = await self._store.accounts.replace_snapshot(holder[0])
        await asyncio.to_thread(release_snapshot, holder)
        return result

    async def apply_feed(
        self,
        changes: Sequence[FeedChange],
        snapshot_version: int | None,
        position: Position | None = None,
    ) -> FeedApplied:
        """The registration feed's changes (feed.FeedSink), checked there against the rules,
        with the bucket revision they reach."""
        write = self._store.feed.apply_feed(changes, snapshot_version, position)
        return await self._through(write, promised=False)

    async def reconcile_feed(
        self, present: Set[str], snapshot_version: int | None, position: Position | None = None
    ) -> int:
        """Drop what the feed's bucket no longer holds (feed.FeedSink)."""
        write = self._store.feed.reconcile_feed(present, snapshot_version, position)
        return await self._through(write, promised=False)

    async def feed_position(self) -> tuple[Position | None, int]:
        """Where the feed resumes, and how many accounts are held (feed.FeedSink)."""
        return await self._store.feed.feed_position()

    async def add_entries(
        self,
        account: str,
        networks: Sequence[Network],
        hostnames: Sequence[str] = (),
        devices: Sequence[bytes] = (),
    ) -> AccountRecord:
        """Operator override: add entries, hostnames and device ID digests, keeping the
        account's version (new: version 0)."""
        validate_account_id(account)
        rules = self._rules
        write = self._store.accounts.add_entries(
            account,
            networks,
            rules.max_per_account,
            hostnames,
            rules.max_hostnames_per_account,
            devices,
            rules.max_device_ids_per_account,
        )
        return await self._through(write)

    async def remove_entries(
        self,
        account: str,
        networks: Sequence[Network] | None,
        hostnames: Sequence[str] = (),
        devices: Sequence[bytes] = (),
    ) -> bool:
        """Operator override: remove entries, hostnames and device ID digests, or (None) the
        whole account as a tombstone."""
        validate_account_id(account)
        write = self._store.accounts.remove_entries(account, networks, hostnames, devices)
        return await self._through(write)

    async def apply_resolved(self, changes: Mapping[str, Sequence[Network]]) -> None:
        """What registered hostnames now resolve to (the DDNS refresher's sink): stored, then
        announced like any write, so it is in DNS answers on every worker on return."""
        await self._through(self._store.hostnames.put_resolved(changes), promised=False)

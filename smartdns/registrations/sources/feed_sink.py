"""BucketSink: the registration sink of a node with `feed` (SPEC 4's fleet): each change goes to
the bucket with the feed's compare-and-set writes, then waits until this node's follower has
applied it, so a 200 still means "in DNS answers here".

Owns the checks the bucket cannot make (a device ID held by another account: the bucket has
no index by digest; this node's copy does). Logs no account id, address or hostname.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Final

from smartdns import logs
from smartdns.registrations.entries import Network, Snapshot, validate_account_id
from smartdns.registrations.feed_format import AccountValue
from smartdns.registrations.json_body import release_snapshot
from smartdns.registrations.sources.feed import APPLIED_TIMEOUT_S, Feed
from smartdns.registrations.sources.feed_writes import FeedUnavailable
from smartdns.registrations.store import AccountRecord, RegistrationStore, SnapshotResult
from smartdns.registrations.writer import RegistrationWriter

# A snapshot's staged values apply in one step, and the DNS side then loads the whole set
# (seconds at a million entries): its 200 waits as long as the local path's (node.status).
SNAPSHOT_APPLIED_TIMEOUT_S: Final = 30.0


class BucketSink:
    """A RegistrationSink over `feed`'s bucket. `local` is the writer the feed applies through
    (on `store`'s connection); `follows`: this process runs the feed's follower, so a write
    waits until it is applied here (the CLI writes without following, and does not wait)."""

    def __init__(
        self,
        feed: Feed,
        local: RegistrationWriter,
        store: RegistrationStore,
        *,
        follows: bool = True,
    ) -> None:
        self._feed = feed
        self._local = local
        self._store = store
        self._follows = follows
        self._late = logs.WarnOnce(
            __name__, "a feed write is in the bucket but this node did not apply it in time"
        )

    async def put_account(
        self,
        account: str,
        version: int,
        networks: Sequence[Network],
        hostnames: Sequence[str] = (),
        devices: Sequence[bytes] = (),
    ) -> AccountRecord:
        validate_account_id(account)
        await self._store.accounts.device_conflict(account, devices)
        value = AccountValue(
            version, tuple(networks), tuple(sorted(set(hostnames))), tuple(sorted(devices))
        )
        revision, _existed = await self._feed.writes.put_account(account, value)
        await self._applied(revision)
        return AccountRecord(account, version, value.networks, value.hostnames, value.devices)

    async def delete_account(self, account: str, version: int) -> bool:
        validate_account_id(account)
        revision, existed = await self._feed.writes.delete_account(account, version)
        await self._applied(revision)
        return existed

    async def replace_snapshot(self, holder: list[Snapshot]) -> SnapshotResult:
        revision = await self._feed.writes.replace_snapshot(holder[0])
        result = SnapshotResult.of(holder[0])
        await asyncio.to_thread(release_snapshot, holder)  # freed before this node loads it
        await self._applied(revision, SNAPSHOT_APPLIED_TIMEOUT_S)
        return result

    async def apply_resolved(self, changes: Mapping[str, Sequence[Network]]) -> None:
        """Into the bucket, so every node applies them (SPEC 3: one refresher per deployment).
        A bucket that cannot take them now gets them applied here at least, and the error goes
        back to the refresher, which retries the bucket."""
        try:
            revision = await self._feed.writes.apply_resolved(changes)
        except FeedUnavailable:
            await self._local.apply_resolved(changes)
            raise
        if revision:
            await self._applied(revision)

    async def _applied(self, revision: int, timeout_s: float = APPLIED_TIMEOUT_S) -> None:
        """Read-your-writes: wait until the follower applied `revision`; a node that does not
        within `timeout_s` answers anyway, since the bucket holds the write."""
        if self._follows and not await self._feed.wait_applied(revision, timeout_s):
            self._late.warn("timeout")

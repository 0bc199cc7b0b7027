"""The one write path's seam: what the sync API, the CLI's import and the DDNS refresher write
through, whether this node's database holds the registrations (the local RegistrationWriter)
or a feed's bucket does (sources/feed_sink.BucketSink). The writers never ask which.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Protocol

from smartdns.config.model import Config
from smartdns.errors import SmartDNSError
from smartdns.registrations.entries import Network, Snapshot
from smartdns.registrations.store import AccountRecord, RegistrationStore, SnapshotResult
from smartdns.registrations.writer import RegistrationWriter


class SinkUnavailable(SmartDNSError):
    """The change cannot be made now (the feed is not connected, its cluster has no leader):
    the sync API answers 503 and the portal retries; the DDNS refresher retries the batch."""


class RegistrationSink(Protocol):
    """Registration changes, each returning once the change is in effect on this node (SPEC 4:
    the 200 means in DNS answers), or once durable where this process serves no DNS (the CLI).
    Version rules as SPEC 4: StaleWriteError for a 409; SinkUnavailable for "not now"."""

    async def put_account(
        self,
        account: str,
        version: int,
        networks: Sequence[Network],
        hostnames: Sequence[str] = (),
        devices: Sequence[bytes] = (),
    ) -> AccountRecord:
        """Replace the account's entries, hostnames and device ID digests at `version`."""
        ...

    async def delete_account(self, account: str, version: int) -> bool:
        """Remove the account, leaving a tombstone at `version`; True if it was live."""
        ...

    async def replace_snapshot(self, holder: list[Snapshot]) -> SnapshotResult:
        """Replace every registration with the snapshot in `holder`, which is emptied and
        freed once written (a million entries are not held twice over)."""
        ...

    async def apply_resolved(self, changes: Mapping[str, Sequence[Network]]) -> None:
        """What registered hostnames now resolve to (the DDNS refresher's results)."""
        ...


@contextlib.asynccontextmanager
async def writing_sink(config: Config, store: RegistrationStore) -> AsyncIterator[RegistrationSink]:
    """The sink of a process that writes without serving DNS or following a feed (the CLI):
    `store`'s writer, or with `feed` the bucket over a connection for writes only (NATS is
    imported only then). FeedUnavailable (a SinkUnavailable) when no server answers."""
    writer = RegistrationWriter(store, config.registrations)
    if config.feed is None:
        yield writer
        return
    from smartdns.registrations.sources.feed import Feed
    from smartdns.registrations.sources.feed_sink import BucketSink

    feed = Feed(config.feed, writer, config.registrations)
    async with feed.writing():
        yield BucketSink(feed, writer, store, follows=False)

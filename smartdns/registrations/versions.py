"""SPEC 4's version rule for one account write, written once: the store and the feed's bucket.

Pure; no I/O. The local store (account writes) and the feed's compare-and-set writes
(feed_format.check_write) both decide here whether a write is stale, a repeat, or to be made,
so the fleet and a single node answer the same write the same way, with the same message.
"""

from __future__ import annotations

from smartdns.errors import StaleWriteError

# (version, live) of what an account key holds: a live account or a tombstone.
Stored = tuple[int, bool]


def check_write(
    version: int, stored: Stored | None, *, repeat: bool, snapshot_version: int
) -> bool:
    """True for the same write repeated (a no-op 200), False for a write to make,
    StaleWriteError (409, nothing changes) for a stale one.

    `stored` is what the account holds now (None: nothing, not even a tombstone); `repeat`
    says the write is exactly that (same version, same content, live or deleted alike).
    Stale: a version below the stored one (live or tombstone); the same version with other
    content, which includes a write over a tombstone at its version and a delete over a live
    account at its version; a version not above `snapshot_version` (the snapshot's own
    accounts are at its version, so their repeat is still a no-op).
    """
    if stored is not None:
        stored_version, live = stored
        if repeat:
            return True
        if version < stored_version:
            raise StaleWriteError(
                f"version {version} is older than the stored version {stored_version}"
            )
        if version == stored_version:
            deleted = "" if live else f": the account was deleted at version {version}"
            raise StaleWriteError(
                f"version {version} is already stored with other content{deleted}"
            )
    if version <= snapshot_version:
        raise StaleWriteError(
            f"version {version} is not newer than the snapshot version {snapshot_version}"
        )
    return False

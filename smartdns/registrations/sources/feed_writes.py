"""The feed's compare-and-set writes (SPEC 4's version rules, fleet-wide): an account, a
tombstone, a snapshot, the DDNS refresher's results, into the bucket over the connection the
Feed (sources/feed.py) owns and lends here while it is up.

Each write reads the key and the snapshot marker, checks SPEC 4 (versions.py, through
feed_format.check_write) and publishes with the revision it read as the expected last
revision of the subject, retrying a conflict after reading again; it is bounded as a whole by
WRITE_DEADLINE_S. A snapshot is planned with one read and written pipelined
(feed_snapshot.py). Errors carry exception types only: never an account id, an address or a
hostname (SPEC 7).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.kv import KV_DEL, KV_OP, KeyValue

from smartdns.config.model import RegistrationsConfig
from smartdns.errors import RegistrationError, StaleWriteError
from smartdns.registrations.entries import Network, Snapshot
from smartdns.registrations.feed_format import (
    SNAPSHOT_KEY,
    AccountValue,
    FeedValue,
    SnapshotMarker,
    Tombstone,
    account_key,
    check_write,
    decode_marker,
    decode_value,
    encode_marker,
    encode_resolved,
    encode_value,
    hostname_key,
    key_account,
)
from smartdns.registrations.sink import SinkUnavailable
from smartdns.registrations.sources.feed_snapshot import (
    Publisher,
    SnapshotUnavailable,
    plan_snapshot,
    snapshot_value,
)

CAS_ATTEMPTS: Final = 8  # compare-and-set tries of one write before it is reported busy
CAS_RETRY_S: Final = 0.005  # jittered pause before a retry, times the attempt number
# A write's answer comes within WRITE_DEADLINE_S + the feed's APPLIED_TIMEOUT_S, below the 5 s
# a client commonly waits: the bucket takes it within the first (or 503: a cluster electing a
# leader is retried by the portal), this node applies it within the second.
WRITE_DEADLINE_S: Final = 2.5
SNAPSHOT_CONCURRENCY: Final = 256  # snapshot writes in flight
_WRONG_LAST_SEQUENCE: Final = frozenset({10071, 10164})  # JetStream API error codes


class FeedUnavailable(SinkUnavailable):
    """The bucket cannot be written now (not connected, or the cluster has no leader)."""


class BucketWrites:
    """Compare-and-set writes to the bucket under `prefix` (`$KV.<bucket>.`) of `stream`;
    `rules` gives the registration rules values are read back with. Usable while the Feed
    has lent its connection (`attach`); FeedUnavailable otherwise."""

    def __init__(self, prefix: str, stream: str, rules: Callable[[], RegistrationsConfig]) -> None:
        self._prefix = prefix
        self._stream = stream
        self._rules_now = rules
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None

    def attach(self, nc: NATS, js: JetStreamContext, kv: KeyValue) -> None:
        """Write over `nc` from now on (all three at once: a write sees them whole or not)."""
        self._nc, self._js, self._kv = nc, js, kv

    def detach(self) -> None:
        self._nc = self._js = self._kv = None

    @property
    def _rules(self) -> RegistrationsConfig:
        return self._rules_now()

    def _jetstream(self) -> JetStreamContext:
        if self._js is None or self._nc is None or not self._nc.is_connected:
            raise FeedUnavailable("not connected to the registration feed")
        return self._js

    def _bucket(self) -> KeyValue:
        self._jetstream()
        assert self._kv is not None  # set with _js
        return self._kv

    async def _read(self, key: str) -> tuple[int, bytes | None]:
        """(revision, value) of `key`: revision 0 when it never existed, value None when it was
        deleted or purged."""
        try:
            entry = await self._bucket().get(key)
        except nats.js.errors.KeyNotFoundError as exc:
            deleted = exc.entry
            return (0, None) if deleted is None else (int(deleted.revision or 0), None)
        return int(entry.revision or 0), entry.value

    async def _marker(self) -> tuple[int, SnapshotMarker | None]:
        revision, data = await self._read(SNAPSHOT_KEY)
        return revision, None if data is None else decode_marker(data)

    def _decoded(self, data: bytes | None) -> FeedValue | None:
        if data is None:
            return None
        try:
            return decode_value(data, self._rules)
        except RegistrationError:
            return None  # a bad value in the bucket is overwritten, never obeyed

    async def _cas(self, key: str, data: bytes | None, revision: int) -> int:
        """Write `data` at `key` (None: a KV delete) if its revision is still `revision` (0:
        absent); returns the new revision. KeyWrongLastSequenceError when it moved on."""
        headers = {api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(revision)}
        if data is None:
            headers[KV_OP] = KV_DEL
        try:
            ack = await self._jetstream().publish(self._prefix + key, data or b"", headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                raise nats.js.errors.KeyWrongLastSequenceError(exc.description) from None
            raise
        return int(ack.seq)

    async def _write(self, account: str, new: FeedValue) -> tuple[int, FeedValue | None]:
        """Compare-and-set `new` at the account's key; a conflict is retried by re-reading.

        Returns the revision that holds the result and the value it replaced. StaleWriteError
        when SPEC 4 says 409 against the bucket's state; FeedUnavailable when the bucket does
        not take it within WRITE_DEADLINE_S (the caller answers 503). A write whose
        acknowledgement came too late may still be stored: the portal's retry of the same write
        then finds it and is answered 200 (SPEC 4: the same write repeated is a no-op).
        """
        key = account_key(account)
        data = encode_value(new)
        try:
            async with asyncio.timeout(WRITE_DEADLINE_S):
                return await self._compare_and_set(key, data, new)
        except (nats.errors.Error, TimeoutError) as exc:
            raise FeedUnavailable(f"registration feed: {type(exc).__name__}") from None

    async def _compare_and_set(
        self, key: str, data: bytes, new: FeedValue
    ) -> tuple[int, FeedValue | None]:
        """One write's compare-and-set rounds: read the marker and the key, check, write."""
        for attempt in range(CAS_ATTEMPTS):
            if attempt:
                await asyncio.sleep(random.uniform(0, CAS_RETRY_S * attempt))
            _, marker = await self._marker()
            revision, stored = await self._read(key)
            current = self._decoded(stored)
            if check_write(new, current, marker.version if marker else 0):
                return revision, current
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                return await self._cas(key, data, revision), current
        raise FeedUnavailable("registration feed: the account is being written concurrently")

    async def put_account(self, account: str, value: AccountValue) -> tuple[int, bool]:
        """Replace the account in the bucket (SPEC 4 PUT); returns the revision holding it and
        whether the account was live before."""
        revision, previous = await self._write(account, value)
        return revision, isinstance(previous, AccountValue)

    async def delete_account(self, account: str, version: int) -> tuple[int, bool]:
        """Leave a tombstone at `version`; returns the revision and whether the account was live."""
        revision, previous = await self._write(account, Tombstone(version))
        return revision, isinstance(previous, AccountValue)

    async def replace_snapshot(self, snapshot: Snapshot) -> int:
        """Replace the bucket's contents with `snapshot`; returns the marker's final revision.

        1. The marker goes to `{"version": S, "complete": false}` (compare-and-set, so two
           snapshots at once conflict); nodes stage every version-S value from then on.
        2. Each account is written at S, each other key (live or tombstone) is KV-deleted, both
           compare-and-set; a key holding a version above S keeps it, since versions come from
           one sequence and that write is newer than the snapshot.
        3. The marker goes to complete; each node applies the staged values in one step.
        Stale (409): S below the marker's version. Repeating an interrupted snapshot (same S)
        completes it.
        """
        version = snapshot.version
        try:
            marker_revision, marker = await self._marker()
            if marker is not None and version < marker.version:
                raise StaleWriteError(
                    f"snapshot version {version} is older than the bucket's {marker.version}"
                )
            js = self._jetstream()
            assert self._nc is not None  # connected: _jetstream
            plan = await plan_snapshot(self._nc, js, self._stream, self._prefix, snapshot)
            marker_revision = await self._cas(
                SNAPSHOT_KEY, encode_marker(SnapshotMarker(version, False)), marker_revision
            )
            publisher = Publisher(self._nc, self._prefix)
            async with publisher.running():
                for account in snapshot.accounts:
                    key = account_key(account)
                    if key not in plan.kept:
                        data = encode_value(snapshot_value(snapshot, account))
                        await publisher.publish(key, data, plan.writes.get(key, 0))
                for key, revision in plan.deletes.items():
                    await publisher.publish(key, None, revision)
                await publisher.finish()
            # Keys written meanwhile by someone else: read, check and write one by one.
            await _bounded(
                (
                    self._snapshot_key(key, self._snapshot_value(snapshot, key, data), version)
                    for key, data in publisher.conflicts
                ),
                SNAPSHOT_CONCURRENCY,
            )
            return await self._cas(
                SNAPSHOT_KEY, encode_marker(SnapshotMarker(version, True)), marker_revision
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            raise StaleWriteError("another snapshot is being written") from None
        except SnapshotUnavailable as exc:
            raise FeedUnavailable(str(exc)) from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise FeedUnavailable(f"registration feed: {type(exc).__name__}") from None

    @staticmethod
    def _snapshot_value(snapshot: Snapshot, key: str, data: bytes | None) -> FeedValue | None:
        """What a snapshot writes at `key`: its account's value, or None for a delete."""
        account = None if data is None else key_account(key)
        return None if account is None else snapshot_value(snapshot, account)

    async def apply_resolved(self, changes: Mapping[str, Sequence[Network]]) -> int:
        """The DDNS refresher's results into the bucket (on the refresher node), every node
        applies them; returns the highest revision written (0: none). A plain put: the fleet
        has one refresher, and its latest lookup is the truth. FeedUnavailable when the
        bucket cannot be written."""
        js = self._jetstream()
        revisions: list[int] = []

        async def put(hostname: str, networks: Sequence[Network]) -> None:
            ack = await js.publish(self._prefix + hostname_key(hostname), encode_resolved(networks))
            revisions.append(int(ack.seq))

        jobs = (put(hostname, networks) for hostname, networks in changes.items())
        try:
            await _bounded(jobs, SNAPSHOT_CONCURRENCY)
        except (nats.errors.Error, TimeoutError) as exc:
            raise FeedUnavailable(f"registration feed: {type(exc).__name__}") from None
        return max(revisions, default=0)

    async def _snapshot_key(self, key: str, value: FeedValue | None, version: int) -> None:
        """One key of a snapshot: written, or deleted when `value` is None, unless it already
        is, or a write newer than the snapshot (version above it) reached it meanwhile."""
        data = None if value is None else encode_value(value)
        for _attempt in range(CAS_ATTEMPTS):
            revision, stored = await self._read(key)
            current = self._decoded(stored)
            if current is not None and current.version > version:
                return
            if (value is None and stored is None) or (value is not None and current == value):
                return
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await self._cas(key, data, revision)
                return
        raise FeedUnavailable("registration feed: a key is being written concurrently")


async def _bounded(jobs: Iterable[Awaitable[None]], limit: int) -> None:
    """Run `jobs` with at most `limit` in flight; the first failure cancels the rest and is
    raised as itself (not as an ExceptionGroup)."""
    slots = asyncio.Semaphore(limit)

    async def run(job: Awaitable[None]) -> None:
        try:
            await job
        finally:
            slots.release()

    try:
        async with asyncio.TaskGroup() as group:
            for job in jobs:
                await slots.acquire()
                group.create_task(run(job))
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None

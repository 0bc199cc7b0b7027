"""Writing a snapshot into the feed's bucket at the scale of a million accounts.

Two parts, both NATS I/O and nothing else: `plan_snapshot` reads the bucket once with a pull
consumer of every message (feed_reader.PullReader: no key listing, no read per key) and decides
for each account key what the snapshot needs there: nothing (the value is already the one
wanted, or a write newer than the snapshot holds the key), or a write or a KV delete
compare-and-set on the revision seen. `Publisher` then sends those writes pipelined: each
publish carries its expected last subject sequence, about PIPELINE of them are in flight, and
their acks come back on one wildcard inbox subscription; a write whose key moved on since the
scan is handed back to be redone the careful way (read, check, compare-and-set). feed.py keeps
the marker protocol and SPEC 4's rules; the value format is feed_format's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from smartdns.errors import RegistrationError, SmartDNSError
from smartdns.registrations.entries import Snapshot
from smartdns.registrations.feed_follow import DELETE_OPERATIONS, BucketMessage
from smartdns.registrations.feed_format import (
    ACCOUNT_PREFIX,
    AccountValue,
    encode_value,
    key_account,
)
from smartdns.registrations.sources.feed_reader import ConsumerLost, PullReader

PIPELINE: Final = 2_000  # snapshot writes in flight
SCAN_WAKE_S: Final = 1.0
SCAN_TIMEOUT_S: Final = 16.0  # making the scan's consumer
SCAN_SILENCE_S: Final = 10.0  # nothing read for this long: the scan fails
ACK_TIMEOUT_S: Final = 30.0  # the last ack after the last publish
# JetStream API error codes of a compare-and-set whose key moved on.
WRONG_LAST_SEQUENCE: Final = frozenset({10071, 10164})
_KV_OPERATION: Final = "KV-Operation"


class SnapshotUnavailable(SmartDNSError):
    """The bucket could not be read or written whole; nothing is complete (repeat it)."""


def snapshot_value(snapshot: Snapshot, account: str) -> AccountValue:
    """The bucket value of one account of `snapshot`: at the snapshot's version."""
    return AccountValue(
        snapshot.version,
        tuple(snapshot.accounts[account]),
        snapshot.hostnames.get(account, ()),
        snapshot.devices.get(account, ()),
    )


@dataclass(slots=True)
class SnapshotPlan:
    """What a snapshot writes: key -> the revision to compare-and-set on (0: a new key)."""

    writes: dict[str, int] = field(default_factory=dict)  # accounts of the snapshot
    deletes: dict[str, int] = field(default_factory=dict)  # other account keys, KV-deleted
    kept: set[str] = field(default_factory=set)  # keys that need nothing


def _version(data: bytes) -> int | None:
    """The `version` of a stored value, read without validating the rest (None: unreadable)."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None
    version = doc.get("version") if isinstance(doc, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def plan_key(plan: SnapshotPlan, snapshot: Snapshot, message: BucketMessage) -> None:
    """One stored message of an account key: what the snapshot must do there. A later message
    of the same key (a bucket with history) replaces the decision."""
    key, data, revision = message.key, message.data, message.sequence
    try:
        account = key_account(key)
    except RegistrationError:
        account = None  # a key no valid id encodes to: deleted like any key not in the snapshot
    plan.kept.discard(key)
    plan.writes.pop(key, None)
    plan.deletes.pop(key, None)
    wanted = account is not None and account in snapshot.accounts
    if message.operation in DELETE_OPERATIONS:
        if wanted:
            plan.writes[key] = revision
        else:
            plan.kept.add(key)  # already gone
        return
    version = _version(data)
    if version is not None and version > snapshot.version:
        plan.kept.add(key)  # a write newer than the snapshot (one portal-wide sequence)
    elif account is None or not wanted:
        plan.deletes[key] = revision
    elif data == encode_value(snapshot_value(snapshot, account)):
        plan.kept.add(key)
    else:
        plan.writes[key] = revision


async def plan_snapshot(
    nc: NATS, js: JetStreamContext, stream: str, prefix: str, snapshot: Snapshot
) -> SnapshotPlan:
    """Read every message of the bucket once and plan the snapshot's writes."""
    plan = SnapshotPlan()
    reader = PullReader(nc, stream, prefix)
    try:
        pending = await reader.open(js, 0, SCAN_TIMEOUT_S)
        delivered = 0
        loop = asyncio.get_running_loop()
        heard = loop.time()
        while pending:
            messages = await reader.next(SCAN_WAKE_S)
            if messages:
                heard = loop.time()
            elif loop.time() - heard > SCAN_SILENCE_S:
                raise SnapshotUnavailable("registration feed: the bucket could not be read")
            for message in messages:
                delivered += 1
                if message.consumer_sequence != delivered:
                    raise SnapshotUnavailable("registration feed: a message was lost reading")
                if message.key.startswith(ACCOUNT_PREFIX):
                    plan_key(plan, snapshot, message)
                pending = message.pending
    except ConsumerLost:
        raise SnapshotUnavailable("registration feed: the bucket could not be read") from None
    finally:
        await reader.close(js)
    return plan


class Publisher:
    """Compare-and-set writes pipelined: PIPELINE in flight, acks on one inbox subscription.

    `conflicts` collects the keys whose revision moved on since the scan (with what was to be
    written there: bytes, or None for a delete), to be redone one by one.
    """

    def __init__(self, nc: NATS, prefix: str, limit: int = PIPELINE) -> None:
        self._nc = nc
        self._prefix = prefix
        self._inbox = nc.new_inbox()
        self._slots = asyncio.Semaphore(limit)
        self._waiting: dict[int, tuple[str, bytes | None]] = {}
        self._next = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._failure: str | None = None
        self.conflicts: list[tuple[str, bytes | None]] = []
        self.written = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Publisher]:
        sub = await self._nc.subscribe(self._inbox + ".*", cb=self._ack)
        try:
            yield self
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def publish(self, key: str, data: bytes | None, revision: int) -> None:
        """Send one write (None: a KV delete) expecting `revision` at the key (0: absent)."""
        if self._failure is not None:
            raise SnapshotUnavailable(self._failure)
        await self._slots.acquire()
        number = self._next
        self._next += 1
        self._waiting[number] = (key, data)
        self._drained.clear()
        headers = {api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(revision)}
        if data is None:
            headers[_KV_OPERATION] = "DEL"
        await self._nc.publish(
            self._prefix + key, data or b"", reply=f"{self._inbox}.{number}", headers=headers
        )

    async def finish(self, timeout_s: float = ACK_TIMEOUT_S) -> None:
        """Every write acknowledged; SnapshotUnavailable when one failed or an ack is late."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._drained.wait()
        except TimeoutError:
            raise SnapshotUnavailable("registration feed: writes not acknowledged") from None
        if self._failure is not None:
            raise SnapshotUnavailable(self._failure)

    async def _ack(self, msg: Msg) -> None:
        try:
            number = int(msg.subject.rsplit(".", 1)[1])
        except ValueError:
            return
        job = self._waiting.pop(number, None)
        if job is None:
            return
        self._slots.release()
        if not self._waiting:
            self._drained.set()
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None:  # 503: no stream answered
            self._failure = f"registration feed: status {status}"
            return
        try:
            reply = json.loads(msg.data)
        except ValueError:
            self._failure = "registration feed: an unreadable acknowledgement"
            return
        error = reply.get("error") if isinstance(reply, dict) else None
        if error is None:
            self.written += 1
        elif error.get("err_code") in WRONG_LAST_SEQUENCE:
            self.conflicts.append(job)
        else:
            self._failure = f"registration feed: error {error.get('err_code')}"

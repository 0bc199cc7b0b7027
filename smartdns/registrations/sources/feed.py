"""The registration feed (SPEC 4): follow a NATS JetStream key-value bucket.

`Feed` owns one NATS connection. `Feed.run` follows the bucket through a pull consumer
(sources/feed_reader.py) whose messages feed the sans-IO core (registrations/feed_follow.py):
a node that saved a revision resumes after it, one that has none (or whose bucket was
recreated or purged meanwhile) reads every key and reconciles; the changes go, in bucket
revision order and with the revision they reach, to a FeedSink, the node's one change path.
`Feed.writes` (sources/feed_writes.py) writes with compare-and-set over the same connection,
so that SPEC 4's version rules hold for the whole fleet. The value format is in
feed_format.py and docs/feed.md. Log lines carry counts and exception types only: never an
account id, an address or a hostname (SPEC 7).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.client import Server
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.kv import KV_OP, KeyValue

from smartdns import logs
from smartdns.config.model import RegistrationsConfig
from smartdns.registrations.entries import Network
from smartdns.registrations.feed_follow import (
    Batch,
    BucketFollower,
    BucketMessage,
    FollowCounters,
    Position,
    ResyncCause,
    Start,
    StreamFacts,
    Verdict,
    keys_missing,
    plan_start,
)
from smartdns.registrations.feed_format import (
    MAX_VALUE_BYTES,
    FeedApplied,
    FeedChange,
)
from smartdns.registrations.sources.feed_reader import (
    FETCH_BATCH,
    MIN_BATCH,
    ConsumerLost,
    PullReader,
)
from smartdns.registrations.sources.feed_writes import (
    WRITE_DEADLINE_S,
    BucketWrites,
    FeedUnavailable,
)

log = logging.getLogger(__name__)

# A dead server must be noticed in seconds, not the client's default two minutes: a killed
# process closes the socket at once; a silent one misses two pings two seconds apart.
PING_INTERVAL_S: Final = 2
MAX_OUTSTANDING_PINGS: Final = 2
CONNECT_TIMEOUT_S: Final = 2
# The stream republishes every stored change here (RePublish), with its revision. Receiving
# it takes no consumer, so a change arrives while the consumer is being re-created after its
# server died (which needs a JetStream meta leader, seconds after losing one).
REPUBLISH_PREFIX: Final = "smartdns-feed"
EAGER_LIMIT: Final = 65_536  # republished messages buffered; beyond that the consumer delivers
WAKE_S: Final = 0.1  # longest wait for a message before looking at the reconnect flag
LOOK_S: Final = 5.0  # while caught up, look at the stream's info this often (see Feed._look)
WATCH_TIMEOUT_S: Final = 2.0  # JetStream API requests of the follower
# Making a consumer: 2 s, since 2.9 places an ephemeral consumer on any server of the stream's
# group, a dead one too (seen for 15 s after a kill: no answer, try again). For a full read
# doubled after each failure up to 16 s: a consumer of every message of a million-key stream
# takes server time; one that resumes by revision takes milliseconds.
CONSUMER_TIMEOUT_S: Final = 16.0
# While no consumer delivers, what follows the last revision is read by revision this often,
# up to READ_BY_REVISION_MAX changes each time, each request waiting at most this long.
READ_BY_REVISION_S: Final = 0.25
READ_BY_REVISION_MAX: Final = 500
READ_BY_REVISION_TIMEOUT_S: Final = 0.5
RETRY_BASE_S: Final = 0.1  # backoff after a failed session or reconnect, doubled per attempt
RETRY_MAX_S: Final = 5.0
APPLY_BATCH: Final = 5_000  # changes per sink call
WRITE_TIMEOUT_S: Final = 5.0  # connecting for writes only (the CLI)
APPLIED_TIMEOUT_S: Final = 1.5  # a write's wait for this node to apply it (feed_writes.py)
_T = TypeVar("_T")
_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


class FeedSettings(Protocol):
    """The `feed` configuration section (config.model) as this module reads it."""

    @property
    def servers(self) -> Sequence[str]: ...
    @property
    def bucket(self) -> str: ...
    @property
    def replicas(self) -> int: ...
    @property
    def credentials_file(self) -> Path | None: ...
    @property
    def tls_ca_file(self) -> Path | None: ...


class FeedSink(Protocol):
    """Where the follower's changes go: the node's one change path (SQLite, then workers)."""

    async def apply_feed(
        self,
        changes: Sequence[FeedChange],
        snapshot_version: int | None,
        position: Position | None = None,
    ) -> FeedApplied:
        """Apply each change whose version is above the stored one (a None change always
        removes), set `snapshot_version` when it is not None, and save `position` when it is
        not None, in one transaction."""
        ...

    async def reconcile_feed(
        self, present: Set[str], snapshot_version: int | None, position: Position | None = None
    ) -> int:
        """Remove every account and tombstone not in `present`, and save `position`; return
        how many accounts went."""
        ...

    async def apply_resolved(self, changes: Mapping[str, Sequence[Network]]) -> None:
        """What these hostnames now resolve to (the fleet's DDNS refresher's results)."""
        ...

    async def feed_position(self) -> tuple[Position | None, int]:
        """The position saved last (None: never), and how many accounts are held (live or
        tombstone)."""
        ...


@dataclass(slots=True)
class FeedState:
    """What /healthz and /metrics show; aggregate only, no account ids."""

    connected: bool = False
    caught_up: bool = False
    last_revision: int = 0  # bucket revision (stream sequence) of the last change processed
    lag: int = 0  # revisions in the bucket after the last one processed, as the server said
    applied: int = 0  # changes that changed the local copy
    stale: int = 0  # values whose version went back (the store's count)
    reconciled: int = 0  # local accounts removed at a full read because the bucket lacked them
    slow_consumers: int = 0  # messages the NATS client dropped (each leads to a re-read)
    client_errors: int = 0  # other errors the NATS client reported
    follow: FollowCounters = field(default_factory=FollowCounters)

    @property
    def rejected(self) -> int:
        """Values skipped whole: invalid, unknown key, or a version going back."""
        return self.stale + self.follow.rejected

    @property
    def received(self) -> int:
        return self.follow.received

    @property
    def gaps_detected(self) -> int:
        return self.follow.gaps_detected

    @property
    def gaps_repaired(self) -> int:
        return self.follow.gaps_repaired

    @property
    def full_reads(self) -> dict[str, int]:
        """Full reads by ResyncCause value (a closed set: a metric label)."""
        return {cause.value: count for cause, count in self.follow.full_reads.items()}


def stream_name(bucket: str) -> str:
    return f"KV_{bucket}"


def _backoff_s(attempt: int) -> float:
    """Exponential backoff with jitter, so a fleet that lost its server does not return in step."""
    return min(RETRY_MAX_S, RETRY_BASE_S * (1 << min(max(attempt - 1, 0), 16))) * random.uniform(
        0.5, 1.0
    )


def pick_server(servers: list[Server], _info: dict[str, Any]) -> tuple[Server | None, float]:
    """nats-py's reconnect hook: the least-failed server (ties at random), with backoff.

    A server that has not failed yet is tried at once, plus up to 50 ms of jitter, so the
    cluster's other servers are reached within a heartbeat of losing one.
    """
    fewest = min(server.reconnects for server in servers)
    choice = random.choice([server for server in servers if server.reconnects == fewest])
    delay = _backoff_s(fewest) if fewest else 0.0
    return choice, delay + random.uniform(0.0, 0.05)


def _tls_context(ca_file: Path | None) -> ssl.SSLContext | None:
    return None if ca_file is None else ssl.create_default_context(cafile=str(ca_file))


def republish_subject(bucket: str) -> str:
    """Where the bucket's stream republishes each stored change (with its revision)."""
    return f"{REPUBLISH_PREFIX}.{bucket}"


async def open_bucket(js: JetStreamContext, bucket: str, replicas: int) -> KeyValue:
    """The bucket, created when missing: history 1, file storage, `replicas` copies, and each
    stored change republished on republish_subject(bucket) for the follower's fast path."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    config = api.KeyValueConfig(
        bucket=bucket,
        history=1,
        replicas=replicas,
        storage=api.StorageType.FILE,
        max_value_size=MAX_VALUE_BYTES,
        republish=api.RePublish(
            src=f"$KV.{bucket}.>", dest=republish_subject(bucket) + ".>", headers_only=False
        ),
    )
    # Nodes starting together may race here; the same configuration twice is accepted.
    return await js.create_key_value(config)


async def stream_facts(js: JetStreamContext, bucket: str) -> tuple[StreamFacts, api.StreamInfo]:
    """The stream's identity (creation time in microseconds) and extent, from its info (a
    constant-cost request, whatever the bucket holds)."""
    info = await js.stream_info(stream_name(bucket))
    created = (
        0 if info.created is None else (info.created - _EPOCH) // datetime.timedelta(microseconds=1)
    )
    state = info.state
    return StreamFacts(created, state.first_seq, state.last_seq, state.messages), info


async def _republished(nc: NATS, bucket: str, info: api.StreamInfo) -> Subscription | None:
    """A core subscription to the bucket's republished changes, if its stream has them (a
    bucket made elsewhere may not: then the consumer alone delivers, as fast as it lives)."""
    republish = info.config.republish
    if republish is None or republish.dest != republish_subject(bucket) + ".>":
        log.info("feed: the bucket does not republish its changes; the consumer alone delivers")
        return None
    return await nc.subscribe(republish.dest, pending_msgs_limit=EAGER_LIMIT)


@dataclass(frozen=True, slots=True)
class _Applied:
    """A batch on its way to the sink, with what was true when it was taken."""

    batch: Batch
    position: Position | None  # the revision to save with it
    empty: bool  # it ends a full read that found the bucket empty: no reconciliation
    through: int  # every revision up to this one is applied with it
    caught_up: bool

    @property
    def needs_sink(self) -> bool:
        batch = self.batch
        return bool(
            batch.changes
            or batch.snapshot_version is not None
            or self.position is not None
            or (batch.present is not None and not self.empty)
            or batch.resolved
        )


class _Stalled(Exception):
    """The consumer is gone, stuck or missed a message; the follower makes a new one."""


class Feed:
    """A node's connection to the bucket: follower (`run`) and compare-and-set writer."""

    # The reader's inbox pending limit (0: twice what is ever in flight); tests make it tiny.
    pending_limit = 0

    def __init__(self, settings: FeedSettings, sink: FeedSink, rules: RegistrationsConfig) -> None:
        self._settings = settings
        self._sink = sink
        self._prefix = f"$KV.{settings.bucket}."
        self._stream = stream_name(settings.bucket)
        self._nc: NATS | None = None
        # The compare-and-set writes, over this connection while it is up.
        self.writes = BucketWrites(self._prefix, self._stream, lambda: self._follower.rules)
        self._follower = BucketFollower(rules)
        self._created = 0  # the followed stream's identity (StreamFacts.created)
        self._saved = 0  # the revision saved with the last batch (or the one in flight)
        self._applying: asyncio.Task[None] | None = None  # the batch the sink is applying
        self._messages = 0  # the stream's message count when last looked (Position.messages)
        self._looking = False  # look at the stream once this read (or new consumer) is caught up
        self._next_look = 0.0
        self._full_read = False  # the read under way reads everything (and reconciles)
        self._applied_revision = 0
        self._applied_ahead: deque[int] = deque(maxlen=1024)  # fast-path revisions applied
        self._resubscribe = False
        self._lost = False  # messages were lost: smaller fetches on the next consumer
        self._batch = FETCH_BATCH  # messages per fetch, halved after a loss, doubled back
        self._client_error = logs.WarnOnce(__name__, "feed: NATS client error; reading again")
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.state = FeedState(follow=self._follower.counters)

    def reload(self, rules: RegistrationsConfig) -> None:
        """New registration rules for the values read from now on (servers need a restart)."""
        self._follower.rules = rules

    @property
    def _rules(self) -> RegistrationsConfig:
        return self._follower.rules

    # --- connection and follower ---------------------------------------------------------

    async def run(self) -> None:
        """Follow the bucket until cancelled; every failure is retried with backoff.

        The connection outlives a failed session (a JetStream request unanswered while the
        cluster elects a leader): the client reconnects by itself, and a new connection is
        made only when it closed for good."""
        attempt = 0
        try:
            while True:
                try:
                    if self._nc is None or self._nc.is_closed:
                        await self._close()
                        self._nc = await self._connect()
                    await self._session(self._nc)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # background task boundary: retried, never fatal
                    log.warning("feed: session ended (%s); retrying", type(exc).__name__)
                finally:
                    self.state.connected = self.state.caught_up = False
                    self.writes.detach()
                attempt += 1
                await asyncio.sleep(_backoff_s(attempt))
        finally:
            await self._close()

    async def _connect(self) -> NATS:
        settings = self._settings
        nc = NATS()

        async def disconnected() -> None:
            self.state.connected = self.state.caught_up = False

        async def reconnected() -> None:
            # The consumer may have lived on the server just lost: make it anew now rather
            # than after its requests go unanswered.
            self.state.connected = self._resubscribe = True

        async def error(exc: Exception) -> None:
            # Whatever the client dropped is read again: the consumer is made anew after the
            # last revision applied (the reader's bounded requests make this a should-not).
            if isinstance(exc, nats.errors.SlowConsumerError):
                self.state.slow_consumers += 1
                self._lost = True
            else:
                self.state.client_errors += 1
            self._resubscribe = True
            self._client_error.warn(type(exc).__name__)

        credentials = settings.credentials_file
        await nc.connect(
            servers=list(settings.servers),
            name="smartdns",
            ping_interval=PING_INTERVAL_S,
            max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            connect_timeout=CONNECT_TIMEOUT_S,
            reconnect_time_wait=1,
            max_reconnect_attempts=-1,
            reconnect_to_server_handler=pick_server,
            user_credentials=None if credentials is None else str(credentials),
            tls=_tls_context(settings.tls_ca_file),
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
        return nc

    @contextlib.asynccontextmanager
    async def writing(self, timeout_s: float = WRITE_TIMEOUT_S) -> AsyncIterator[Feed]:
        """Connected for writes only, without following (the CLI); FeedUnavailable when no
        server of `feed.servers` answers within `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                self._nc = await self._connect()
                js = self._nc.jetstream(timeout=WRITE_TIMEOUT_S)
                kv = await open_bucket(js, self._settings.bucket, self._settings.replicas)
                self.writes.attach(self._nc, js, kv)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            await self._close()
            raise FeedUnavailable(f"registration feed: {type(exc).__name__}") from None
        try:
            yield self
        finally:
            self.writes.detach()
            await self._close()

    async def _close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _session(self, nc: NATS) -> None:
        self.state.connected = nc.is_connected
        writes = nc.jetstream(timeout=WRITE_DEADLINE_S)
        kv = await open_bucket(writes, self._settings.bucket, self._settings.replicas)
        self.writes.attach(nc, writes, kv)
        # The follower asks with a shorter timeout, so a cluster electing a leader is retried soon.
        js = nc.jetstream(timeout=WATCH_TIMEOUT_S)
        facts, info = await stream_facts(js, self._settings.bucket)
        fast = await _republished(nc, self._settings.bucket, info)
        try:
            await self._begin(facts)
            await self._read_on(nc, js, fast)
        finally:
            await self._settle_quietly()
            if fast is not None:
                with contextlib.suppress(Exception):
                    await fast.unsubscribe()

    async def _read_on(self, nc: NATS, js: JetStreamContext, fast: Subscription | None) -> None:
        """Read through one consumer after another: a new one after each gap or loss."""
        self._resubscribe = False
        attempt = 0
        while True:
            if self._lost:
                self._lost = False
                self._batch = max(MIN_BATCH, self._batch // 2)
            reader = PullReader(nc, self._stream, self._prefix, self._batch, self.pending_limit)
            try:
                growth = 1 << min(attempt, 4) if self._follower.full else 1
                timeout_s = min(CONSUMER_TIMEOUT_S, WATCH_TIMEOUT_S * growth)
                opening = reader.open(js, self._follower.last_sequence, timeout_s)
                pending = await self._draining(opening, fast)
            except Exception as exc:  # no leader yet, or not connected: retried in the session
                attempt += 1
                log.debug("feed: making the consumer failed (%s)", type(exc).__name__)
                await self._draining(reader.close(js), fast)
                await self._draining(asyncio.sleep(_backoff_s(attempt)), fast)
                continue
            attempt = 0
            self._looking = True
            self._follower.restart()
            if pending == 0:
                self._follower.end_reached()
            try:
                await self._follow(js, reader, fast)
            except (_Stalled, ConsumerLost) as exc:
                self.state.caught_up = False
                log.info("feed: the consumer stalled or lost messages (%s); reading again", exc)
            finally:
                await self._draining(reader.close(js), fast)

    async def _begin(self, facts: StreamFacts) -> None:
        """Where this session's read starts: after the saved revision, or everything."""
        saved, _accounts = await self._sink.feed_position()
        start = plan_start(saved, facts)
        if start.cause is not None:
            log.info("feed: reading the whole bucket (%s)", start.cause.value)
        else:
            log.info("feed: resuming after revision %d", start.after)
        self._created = facts.created
        self._saved = start.after
        self._messages = 0 if saved is None or start.full else saved.messages
        self._full_read = start.full
        self._follower.begin(start)

    async def _follow(
        self, js: JetStreamContext, reader: PullReader, fast: Subscription | None
    ) -> None:
        follower = self._follower
        loop = asyncio.get_running_loop()
        while True:
            if self._resubscribe:
                self._resubscribe = False
                raise _Stalled("reconnected or the client dropped messages")
            messages = await reader.next(WAKE_S)
            for message in messages:
                verdict = follower.receive(message)
                if verdict is Verdict.GAP:
                    self._lost = True
                    await self._apply()
                    raise _Stalled("a message was lost on the way")
                if follower.queued >= APPLY_BATCH:
                    await self._apply()
            while fast is not None and fast.pending_msgs and follower.queued < APPLY_BATCH:
                self._eager(await _next_msg(fast, 0.1))
            if reader.at_end:
                follower.end_reached()
            if follower.caught_up or not messages:
                await self._apply()  # while catching up, batches of APPLY_BATCH (above)
            if messages and self._batch < FETCH_BATCH and not self._resubscribe:
                self._batch = reader.batch = min(FETCH_BATCH, self._batch * 2)
            connected = self._report()
            if follower.caught_up and (self._looking or loop.time() >= self._next_look):
                self._next_look = loop.time() + LOOK_S
                # What this node holds is counted before asking: all of it was in the stream
                # then, whatever the fast path applies while the answer is awaited.
                await self._settle()
                _, accounts = await self._sink.feed_position()
                held = Position(self._created, follower.last_sequence)
                try:
                    facts, _ = await self._draining(stream_facts(js, self._settings.bucket), fast)
                except (TimeoutError, nats.errors.Error) as exc:  # no leader now: look again soon
                    log.debug("feed: looking at the stream failed (%s)", type(exc).__name__)
                    self._next_look = loop.time() + WAKE_S
                else:
                    await self._look(facts, held, accounts)
            self.state.caught_up = connected and follower.caught_up

    async def _look(self, facts: StreamFacts, held: Position, accounts: int) -> None:
        """What the stream's info (constant cost; asked at the end of each read and every
        LOOK_S) says: a stream recreated or emptied meanwhile, or fewer messages than when
        last looked or than this node had accounts (keys removed without a trace), means a
        full read and reconciliation; otherwise the message count is saved with the position.
        `held` and `accounts` are this node's revision and account count when it asked."""
        cause = plan_start(held, facts).cause
        missing = keys_missing(facts.messages, accounts, self._messages)
        if cause is None and missing and not self._full_read:  # a full read just reconciled
            cause = ResyncCause.KEYS_MISSING
        if cause is not None:
            log.info(
                "feed: reading the whole bucket (%s: the stream holds revisions %d to %d, %d"
                " messages; this node applied up to %d and holds %d accounts)",
                cause.value,
                facts.first_sequence,
                facts.last_sequence,
                facts.messages,
                held.sequence,
                accounts,
            )
            self._created = facts.created
            self._follower.begin(Start(0, cause))
            self._messages, self._full_read = 0, True
            self.state.caught_up = False
            raise _Stalled(cause.value)
        if self._looking:
            self._looking = self._full_read = False
            log.info("feed: caught up at revision %d", self._follower.last_sequence)
        if facts.messages != self._messages:
            self._messages = facts.messages
            await self._settle()  # batches applied while the answer was awaited come first
            position = Position(self._created, self._saved, self._messages)
            await self._sink.apply_feed([], None, position)

    async def _apply(self) -> None:
        """Hand the follower's batch to the sink, with the revision it reaches. The sink
        applies it (SQLite, in its own thread) while the next batch is read and decoded: one
        batch in flight, so batches apply in order and memory stays bounded; _settle waits
        for it. Once applied, every change processed up to it is in effect (staged snapshot
        values aside, which their writer waits for through the marker)."""
        follower = self._follower
        batch = follower.take()
        position = None
        if batch.position is not None and batch.position != self._saved:
            position = Position(self._created, batch.position, self._messages)
            self._saved = batch.position
        empty = batch.present is not None and not follower.seen_any
        if empty:  # decided now: what is read from here on is tracked for reconciliation
            log.warning("feed: the bucket is empty; keeping the local registrations")
            follower.track_from_empty()
            position = None  # nor saved: a restart reads the whole bucket again
        applied = _Applied(batch, position, empty, follower.last_sequence, follower.caught_up)
        await self._settle()
        if applied.needs_sink:
            self._applying = asyncio.create_task(self._apply_batch(applied), name="feed apply")
        elif applied.caught_up:
            self._wake(applied.through, batch.ahead)

    async def _apply_batch(self, applied: _Applied) -> None:
        batch, position = applied.batch, applied.position
        if batch.changes or batch.snapshot_version is not None or position is not None:
            saving = position if batch.present is None else None
            result = await self._sink.apply_feed(batch.changes, batch.snapshot_version, saving)
            self.state.applied += result.applied
            self.state.stale += result.stale
        if batch.present is not None and not applied.empty:
            floor = self._follower.floor or None
            removed = await self._sink.reconcile_feed(batch.present, floor, position)
            self.state.reconciled += removed
            log.info("feed: reconciled with the bucket at revision %d", applied.through)
        if batch.resolved:
            await self._sink.apply_resolved(batch.resolved)
            self.state.applied += len(batch.resolved)
        if applied.caught_up:
            self._wake(applied.through, batch.ahead)

    async def _settle(self) -> None:
        """Wait for the batch in flight (its failure is raised here: the session ends)."""
        applying, self._applying = self._applying, None
        if applying is not None:
            await applying

    async def _settle_quietly(self) -> None:
        """At a session's end (an error, or the node stopping): the batch in flight finishes
        rather than being cut off mid-transaction; its own failure was the session's or is
        the next one's to meet."""
        applying, self._applying = self._applying, None
        if applying is not None:
            try:
                await asyncio.shield(applying)
            except Exception as exc:  # the next session reads again from the saved revision
                log.warning("feed: applying a batch failed (%s)", type(exc).__name__)

    def _report(self) -> bool:
        """Bring what /healthz and /metrics show up to date (all but caught_up, which the
        caller decides); returns whether the connection is up."""
        follower = self._follower
        self.state.last_revision = follower.last_sequence
        self.state.lag = follower.pending
        connected = self._nc is not None and self._nc.is_connected
        self.state.connected = connected
        return connected

    async def _draining(self, work: Awaitable[_T], fast: Subscription | None) -> _T:
        """Await `work` (a JetStream request that may take seconds while the cluster elects a
        leader) and meanwhile apply the changes arriving on the fast path and those read by
        revision: a node stays current while its consumer is made anew."""
        task = asyncio.ensure_future(work)
        try:
            loop = asyncio.get_running_loop()
            next_read = loop.time() + READ_BY_REVISION_S  # most work is done by then
            while not task.done():
                if fast is not None:
                    with contextlib.suppress(nats.errors.TimeoutError):
                        self._eager(await _next_msg(fast, WAKE_S))
                else:
                    await asyncio.wait({task}, timeout=WAKE_S)
                if loop.time() >= next_read and not task.done():
                    await self._read_by_revision()
                    next_read = loop.time() + READ_BY_REVISION_S
                await self._apply()
                self.state.caught_up = self._report() and self._follower.caught_up
            return await task
        finally:
            task.cancel()

    async def _read_by_revision(self) -> None:
        """While no consumer delivers (it is being made anew: no meta leader yet, or 2.9
        placed it on a dead server), read what follows the last revision processed from the
        stream itself: its leader answers by revision, with no consumer and no meta leader.
        Changes stored while this node was reconnecting, republished to no one, come this way
        too. Not during a full read: a consumer does that faster, and collects what the bucket
        holds."""
        follower = self._follower
        if self._nc is None or follower.full:
            return
        js = self._nc.jetstream(timeout=READ_BY_REVISION_TIMEOUT_S)
        for _ in range(READ_BY_REVISION_MAX):
            start = follower.last_sequence + 1
            try:
                raw = await js.get_msg(self._stream, start, self._prefix + ">", next=True)
            except nats.js.errors.NotFoundError:  # nothing after it: caught up
                follower.end_reached()
                return
            except Exception as exc:  # no stream leader now, or not connected
                log.debug("feed: reading by revision stopped (%s)", type(exc).__name__)
                return
            sequence = int(raw.seq or 0)
            if sequence < start or not (raw.subject or "").startswith(self._prefix):
                return
            operation = raw.headers.get(KV_OP) if raw.headers else None
            key = (raw.subject or "")[len(self._prefix) :]
            follower.receive_read(BucketMessage(key, operation, raw.data or b"", sequence, 0, 0))
            if follower.queued >= APPLY_BATCH:
                await self._apply()

    def _eager(self, msg: Msg) -> None:
        """A republished change: its original subject and revision are in its headers."""
        headers = msg.headers or {}
        subject = headers.get("Nats-Subject", "")
        sequence = int(headers.get("Nats-Sequence", "0") or 0)
        self._ahead(subject, sequence, headers.get(KV_OP), msg.data)

    def _ahead(self, subject: str, sequence: int, operation: str | None, data: bytes) -> None:
        if subject.startswith(self._prefix):
            self._follower.ahead(subject[len(self._prefix) :], operation, data, sequence)

    # --- read-your-writes ----------------------------------------------------------------

    def _wake(self, revision: int, also: Sequence[int] = ()) -> None:
        """Every revision up to `revision` is applied, and those in `also` (the fast path's)."""
        self._applied_revision = revision
        self._applied_ahead.extend(also)
        if not self._waiters:
            return
        keep: list[tuple[int, asyncio.Future[None]]] = []
        for wanted, future in self._waiters:
            if wanted > revision and wanted not in also:
                keep.append((wanted, future))
            elif not future.done():
                future.set_result(None)
        self._waiters = keep

    async def wait_applied(self, revision: int, timeout_s: float = APPLIED_TIMEOUT_S) -> bool:
        """True once this node has applied the bucket up to `revision`; False on timeout."""
        if self._applied_revision >= revision or revision in self._applied_ahead:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((revision, future))
        try:
            await asyncio.wait_for(future, timeout_s)
            return True
        except TimeoutError:
            return False


async def _next_msg(sub: Subscription, timeout_s: float) -> Msg:
    """sub.next_msg, with a cancellation Python 3.11's wait_for may swallow (a message and the
    cancellation arriving together: bpo-42130) raised anyway, so the follower always stops."""
    msg = await sub.next_msg(timeout=timeout_s)
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    return msg

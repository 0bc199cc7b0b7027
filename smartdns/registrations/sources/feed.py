"""The registration feed (SPEC 4): follow a NATS JetStream key-value bucket, and write to it.

`Feed` owns one NATS connection. `Feed.run` follows the bucket (every key's current value, then
live changes) and hands the changes, in bucket revision order, to a FeedSink, the node's one
change path; the `put_account`, `delete_account` and `replace_snapshot` methods write with
compare-and-set so that SPEC 4's version rules hold for the whole fleet. The value format is in
feed_format.py and docs/feed.md. Log lines carry counts and exception types only: never an
account id, an address or a hostname (SPEC 7).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence, Set
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
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from smartdns.config.model import RegistrationsConfig
from smartdns.errors import RegistrationError, SmartDNSError, StaleWriteError
from smartdns.registrations.entries import Network, Snapshot
from smartdns.registrations.feed_format import (
    ACCOUNT_PREFIX,
    HOST_PREFIX,
    MAX_VALUE_BYTES,
    SNAPSHOT_KEY,
    AccountValue,
    FeedApplied,
    FeedChange,
    FeedValue,
    SnapshotMarker,
    Tombstone,
    account_key,
    check_write,
    decode_marker,
    decode_resolved,
    decode_value,
    encode_marker,
    encode_resolved,
    encode_value,
    hostname_key,
    key_account,
    key_hostname,
)

log = logging.getLogger(__name__)

# A dead server must be noticed in seconds, not the client's default two minutes: a killed
# process closes the socket at once; a silent one misses two pings two seconds apart.
PING_INTERVAL_S: Final = 2
MAX_OUTSTANDING_PINGS: Final = 2
CONNECT_TIMEOUT_S: Final = 2
# The server's heartbeat on the watch; two missed ones and the consumer is re-created.
HEARTBEAT_S: Final = 0.5
PROBE_INTERVAL_S: Final = 1.0  # lag and caught-up probe
# The stream republishes every stored change here (RePublish), with its revision. Receiving
# it takes no consumer, so a change arrives while the watch's consumer is being re-created
# after its server died (which needs a JetStream meta leader, seconds after losing one).
REPUBLISH_PREFIX: Final = "smartdns-feed"
EAGER_LIMIT: Final = 65_536  # republished messages buffered; beyond that the watch delivers
WAKE_S: Final = 0.1  # longest wait for a message before looking at the reconnect flag
WATCH_TIMEOUT_S: Final = 2.0  # JetStream API requests of the watch
GAP_FILL_S: Final = 0.5  # while the watch is down, read missed changes this often
GAP_FILL_MAX: Final = 64  # changes read per gap fill
GAP_FILL_TIMEOUT_S: Final = 0.5
RETRY_BASE_S: Final = 0.1  # backoff after a failed session or reconnect, doubled per attempt
RETRY_MAX_S: Final = 5.0
APPLY_BATCH: Final = 5_000  # changes per sink call
CAS_ATTEMPTS: Final = 8  # compare-and-set tries of one write before it is reported busy
CAS_RETRY_S: Final = 0.005  # jittered pause before a retry, times the attempt number
WRITE_TIMEOUT_S: Final = 5.0
APPLIED_TIMEOUT_S: Final = 5.0  # a write's wait for this node to apply it
SNAPSHOT_CONCURRENCY: Final = 256  # snapshot writes in flight
KEYS_TIMEOUT_S: Final = 120.0  # listing the bucket's keys for a snapshot (a million: seconds)
_T = TypeVar("_T")
_WRONG_LAST_SEQUENCE: Final = frozenset({10071, 10164})  # JetStream API error codes


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
        self, changes: Sequence[FeedChange], snapshot_version: int | None
    ) -> FeedApplied:
        """Apply each change whose version is above the stored one (a None change always
        removes), and set `snapshot_version` when it is not None, in one transaction."""
        ...

    async def reconcile_feed(self, present: Set[str], snapshot_version: int | None) -> int:
        """Remove every account and tombstone not in `present`; return how many went."""
        ...

    async def apply_resolved(self, changes: Mapping[str, Sequence[Network]]) -> None:
        """What these hostnames now resolve to (the fleet's DDNS refresher's results)."""
        ...


class FeedUnavailable(SmartDNSError):
    """The bucket cannot be written now (not connected, or the cluster has no leader)."""


@dataclass(slots=True)
class FeedState:
    """What /healthz and /metrics show; aggregate only, no account ids."""

    connected: bool = False
    caught_up: bool = False
    last_revision: int = 0  # bucket revision (stream sequence) of the last change processed
    lag: int = 0  # changes in the bucket not yet processed, at the last probe
    applied: int = 0  # changes that changed the local copy
    rejected: int = 0  # values skipped whole: invalid, unknown key, or a version going back
    reconciled: int = 0  # local accounts removed at catch-up because the bucket lacked them


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


async def _republished(js: JetStreamContext, nc: NATS, bucket: str) -> Subscription | None:
    """A core subscription to the bucket's republished changes, if its stream has them (a
    bucket made elsewhere may not: then the watch alone delivers, as fast as it lives)."""
    info = await js.stream_info(stream_name(bucket))
    republish = info.config.republish
    if republish is None or republish.dest != republish_subject(bucket) + ".>":
        log.info("feed: the bucket does not republish its changes; the watch alone delivers")
        return None
    return await nc.subscribe(republish.dest, pending_msgs_limit=EAGER_LIMIT)


@dataclass(slots=True)
class _Session:
    """One subscription's progress: catch-up, the snapshot being staged, the probe baseline."""

    catching_up: bool = True
    present: set[str] = field(default_factory=set)
    changes: list[FeedChange] = field(default_factory=list)
    staging: int | None = None  # version of a snapshot begun and not complete
    staged: dict[str, FeedValue | None] = field(default_factory=dict)
    snapshot_version: int | None = None  # to hand to the sink with the next changes
    floor: int = 0  # complete snapshot version: versions below it go backwards
    seen_any: bool = False
    last_sequence: int = 0
    probed_sequence: int = 0
    previous_lag: int = 0
    stalls: int = 0  # probes in a row that found the watch stalled
    # Republished changes applied ahead of the watch: account -> revision, until the watch
    # delivers that revision (older ones it delivers for the account are skipped).
    eager: dict[str, int] = field(default_factory=dict)
    eager_revisions: list[int] = field(default_factory=list)  # applied, for wait_applied
    hold: bool = False  # a marker was republished: no fast path until the watch sees it
    filled_to: int = 0  # the gap fill read the stream up to this revision
    resolved: dict[str, tuple[Network, ...]] = field(default_factory=dict)  # hostname -> addresses


class _Stalled(Exception):
    """The watch's consumer is gone or stuck; the session subscribes again."""


class Feed:
    """A node's connection to the bucket: follower (`run`) and compare-and-set writer."""

    def __init__(self, settings: FeedSettings, sink: FeedSink, rules: RegistrationsConfig) -> None:
        self._settings = settings
        self._sink = sink
        self._rules = rules
        self._prefix = f"$KV.{settings.bucket}."
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._applied_revision = 0
        self._applied_ahead: deque[int] = deque(maxlen=1024)  # fast-path revisions applied
        self._resubscribe = False
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.state = FeedState()

    def reload(self, rules: RegistrationsConfig) -> None:
        """New registration rules for the values read from now on (servers need a restart)."""
        self._rules = rules

    # --- connection and follower ---------------------------------------------------------

    async def run(self) -> None:
        """Follow the bucket until cancelled; every failure is retried with backoff."""
        attempt = 0
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # background task boundary: retried, never fatal
                log.warning("feed: session ended (%s); retrying", type(exc).__name__)
            finally:
                self.state.connected = self.state.caught_up = False
                self._js = self._kv = None
                await self._close()
            attempt += 1
            await asyncio.sleep(_backoff_s(attempt))

    async def _connect(self) -> NATS:
        settings = self._settings
        nc = NATS()

        async def disconnected() -> None:
            self.state.connected = self.state.caught_up = False

        async def reconnected() -> None:
            # The watch's consumer may have lived on the server just lost: make it anew now
            # rather than after missed heartbeats.
            self.state.connected = self._resubscribe = True

        async def error(exc: Exception) -> None:
            log.debug("feed: connection error (%s)", type(exc).__name__)

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
                self._kv = await open_bucket(js, self._settings.bucket, self._settings.replicas)
                self._js = js
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            await self._close()
            raise FeedUnavailable(f"registration feed: {type(exc).__name__}") from None
        try:
            yield self
        finally:
            self._js = self._kv = None
            await self._close()

    async def _close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _session(self) -> None:
        self._nc = await self._connect()
        self.state.connected = True
        self._js = self._nc.jetstream(timeout=WRITE_TIMEOUT_S)
        self._kv = await open_bucket(self._js, self._settings.bucket, self._settings.replicas)
        # The watch asks with a shorter timeout, so a cluster electing a leader is retried soon.
        js = self._nc.jetstream(timeout=WATCH_TIMEOUT_S)
        fast = await _republished(js, self._nc, self._settings.bucket)
        session = _Session()
        attempt = 0
        while True:
            try:
                sub = await self._draining(
                    self._subscribe(js, session.last_sequence), fast, session
                )
            except Exception as exc:  # no leader yet, or not connected: retried in the session
                attempt += 1
                log.debug("feed: subscribing failed (%s)", type(exc).__name__)
                await self._draining(asyncio.sleep(_backoff_s(attempt)), fast, session)
                continue
            attempt = 0
            try:
                if session.catching_up:
                    info = await sub.consumer_info()
                    # Empty only when the server has delivered nothing either: it may have
                    # pushed every value already, still unread in the client's queue.
                    delivered = info.delivered.consumer_seq if info.delivered else 0
                    if info.num_pending == 0 and delivered == 0 and sub.delivered == 0:
                        await self._finish_catch_up(session)
                await self._follow(js, sub, fast, session)
            except _Stalled:
                log.info("feed: the watch stalled or reconnected; resubscribing")
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _subscribe(
        self, js: JetStreamContext, after: int
    ) -> JetStreamContext.PushSubscription:
        """An ordered consumer on the bucket's stream: the last value of every key (the first
        time), or every change after revision `after` (once the watch has stalled)."""
        start: dict[str, Any] = {"deliver_policy": api.DeliverPolicy.LAST_PER_SUBJECT}
        if after:
            start = {"deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE}
            start["config"] = api.ConsumerConfig(opt_start_seq=after + 1)
        return await js.subscribe(
            self._prefix + ">",
            stream=stream_name(self._settings.bucket),
            ordered_consumer=True,
            idle_heartbeat=HEARTBEAT_S,
            inactive_threshold=60.0,
            **start,
        )

    async def _follow(
        self,
        js: JetStreamContext,
        sub: JetStreamContext.PushSubscription,
        fast: Subscription | None,
        session: _Session,
    ) -> None:
        loop = asyncio.get_running_loop()
        next_probe = loop.time() + PROBE_INTERVAL_S
        while True:
            if self._resubscribe:
                self._resubscribe = False
                raise _Stalled
            timeout = min(max(0.0, next_probe - loop.time()), WAKE_S)
            with contextlib.suppress(nats.errors.TimeoutError):
                await self._process(await _next_msg(sub, timeout), session)
                while sub.pending_msgs and len(session.changes) < APPLY_BATCH:
                    await self._process(await _next_msg(sub, 0.1), session)
            while fast is not None and fast.pending_msgs and len(session.changes) < APPLY_BATCH:
                self._eager(await fast.next_msg(timeout=0.1), session)
            await self._flush(session)
            if loop.time() >= next_probe:
                await self._probe(js, sub, fast, session)
                next_probe = loop.time() + PROBE_INTERVAL_S

    async def _draining(
        self, work: Awaitable[_T], fast: Subscription | None, session: _Session
    ) -> _T:
        """Await `work` (a JetStream request that may take seconds while the cluster elects a
        leader) and meanwhile apply the changes arriving on the fast path."""
        task = asyncio.ensure_future(work)
        try:
            loop = asyncio.get_running_loop()
            next_fill = loop.time()
            while fast is not None and not task.done():
                with contextlib.suppress(nats.errors.TimeoutError):
                    self._eager(await _next_msg(fast, WAKE_S), session)
                if loop.time() >= next_fill:
                    await self._fill_gap(session)
                    next_fill = loop.time() + GAP_FILL_S
                await self._flush(session)
            return await task
        finally:
            task.cancel()

    async def _fill_gap(self, session: _Session) -> None:
        """Changes stored while this node was reconnecting were republished to no one: read
        them from the stream by revision (the stream's leader answers; no consumer, no meta
        leader), up to GAP_FILL_MAX at a time, and apply them ahead of the watch."""
        if self._nc is None or session.catching_up:
            return
        js = self._nc.jetstream(timeout=GAP_FILL_TIMEOUT_S)
        start = max(session.last_sequence, session.filled_to) + 1
        for _ in range(GAP_FILL_MAX):
            try:
                raw = await js.get_msg(
                    stream_name(self._settings.bucket), start, self._prefix + ">", next=True
                )
            except Exception as exc:  # nothing after `start`, no leader, not connected
                log.debug("feed: gap fill stopped (%s)", type(exc).__name__)
                return
            sequence = int(raw.seq or 0)
            if sequence < start:
                return
            operation = raw.headers.get(KV_OP) if raw.headers else None
            self._ahead(raw.subject or "", sequence, operation, raw.data or b"", session)
            session.filled_to = sequence
            start = sequence + 1

    async def _probe(
        self,
        js: JetStreamContext,
        sub: JetStreamContext.PushSubscription,
        fast: Subscription | None,
        session: _Session,
    ) -> None:
        """Lag = changes the server still holds for us plus those queued here. Caught up once
        the initial values are in and two probes in a row do not both see lag, so a write
        arriving at the moment of a probe does not flap /healthz. A consumer that cannot be
        asked, or lags without progress, on two probes in a row raises _Stalled (it lived on
        a server that died, or the stream lost its leader), and the watch is made anew."""
        consumer = sub._consumer  # nats-py keeps the name current across its own resets
        try:
            ask = js.consumer_info(stream_name(self._settings.bucket), consumer, 1.0)
            info = await self._draining(ask, fast, session)
        except Exception as exc:  # no answer, no such consumer, no leader: retried
            log.debug("feed: probe failed (%s)", type(exc).__name__)
            info = None
        lag = sub.pending_msgs + (int(info.num_pending or 0) if info else 0)
        progress = session.last_sequence != session.probed_sequence
        session.probed_sequence = session.last_sequence
        stalled = info is None or (lag > 0 and session.previous_lag > 0 and not progress)
        session.stalls = session.stalls + 1 if stalled else 0
        connected = self._nc is not None and self._nc.is_connected
        self.state.connected = connected
        self.state.lag = lag
        self.state.caught_up = (
            connected
            and info is not None
            and not session.catching_up
            and (lag == 0 or session.previous_lag == 0)
        )
        session.previous_lag = lag
        if session.stalls >= 2 and connected:
            session.stalls = 0
            raise _Stalled

    async def _process(self, msg: Msg, session: _Session) -> None:
        """One bucket message: decoded, then staged, queued for the sink, or rejected."""
        meta = msg.metadata
        sequence = meta.sequence.stream
        if sequence <= session.last_sequence:
            # The stream restarted from a lower sequence: the bucket was re-created.
            raise FeedUnavailable("the bucket's revisions went backwards")
        session.last_sequence = self.state.last_revision = sequence
        session.seen_any = True
        key = msg.subject[len(self._prefix) :]
        operation = msg.headers.get(KV_OP) if msg.headers else None
        if key == SNAPSHOT_KEY:
            await self._on_marker(msg.data, operation, session)
        elif key.startswith(HOST_PREFIX):
            self._on_resolved(key, msg.data, operation, session)
        else:
            change = self._decode(key, msg.data, operation, session)
            if change is not None:
                self._queue(change, sequence, session)
        if session.catching_up and meta.num_pending == 0:
            await self._finish_catch_up(session)

    def _decode(
        self, key: str, data: bytes, operation: str | None, session: _Session
    ) -> FeedChange | None:
        try:
            account = key_account(key)
            if account is None:
                raise RegistrationError("key", "not an account key")
            if session.catching_up:
                session.present.add(account)  # a bad value still keeps the local copy's
            if operation in (KV_DEL, KV_PURGE):
                session.present.discard(account)
                return (account, None)
            value = decode_value(data, self._rules)
        except RegistrationError:
            self.state.rejected += 1
            return None
        if value.version < session.floor:
            self.state.rejected += 1  # every key after a snapshot at S is at S or above
            return None
        return (account, value)

    def _eager(self, msg: Msg, session: _Session) -> None:
        """A republished change: its original subject and revision are in its headers."""
        headers = msg.headers or {}
        subject = headers.get("Nats-Subject", "")
        sequence = int(headers.get("Nats-Sequence", "0") or 0)
        self._ahead(subject, sequence, headers.get(KV_OP), msg.data, session)

    def _ahead(
        self,
        subject: str,
        sequence: int,
        operation: str | None,
        data: bytes,
        session: _Session,
    ) -> None:
        """A change from the fast path or a gap fill, applied ahead of the watch when nothing
        orders it otherwise: not while catching up or staging a snapshot, not once the watch
        or the fast path had it or a later change to the account. Invalid ones are left for
        the watch to count."""
        if (
            session.catching_up
            or session.staging is not None
            or session.hold
            or sequence <= session.last_sequence
            or not subject.startswith(self._prefix)
        ):
            return
        key = subject[len(self._prefix) :]
        if key == SNAPSHOT_KEY:
            session.hold = True  # the watch stages what follows
            return
        try:
            account = key_account(key)
            deleted = operation in (KV_DEL, KV_PURGE)
            value = None if deleted else decode_value(data, self._rules)
        except RegistrationError:
            return
        if account is None or (value is not None and value.version < session.floor):
            return
        if sequence <= session.eager.get(account, 0):
            return
        session.eager[account] = sequence
        session.eager_revisions.append(sequence)
        session.changes.append((account, value))

    def _on_resolved(self, key: str, data: bytes, operation: str | None, session: _Session) -> None:
        """What a hostname resolves to (the refresher's result); applied after the accounts
        of the same batch, and after all of them at catch-up, since the store keeps resolved
        addresses only for hostnames an account holds."""
        try:
            hostname = key_hostname(key)
            assert hostname is not None  # a host. key
            deleted = operation in (KV_DEL, KV_PURGE)
            session.resolved[hostname] = () if deleted else decode_resolved(data, self._rules)
        except RegistrationError:
            self.state.rejected += 1

    def _queue(self, change: FeedChange, sequence: int, session: _Session) -> None:
        account, value = change
        ahead = session.eager.get(account)
        if ahead is not None:
            if sequence < ahead:
                return  # a newer change to the account was applied from the fast path
            del session.eager[account]
            if sequence == ahead:
                return
        if session.staging is not None and (value is None or value.version == session.staging):
            session.staged[change[0]] = value
            if session.catching_up:
                session.present.add(change[0])  # removed when the snapshot completes
        else:
            session.changes.append(change)

    async def _on_marker(self, data: bytes, operation: str | None, session: _Session) -> None:
        """A snapshot begins (stage its values) or completes (apply them in one step)."""
        if operation in (KV_DEL, KV_PURGE):
            return
        try:
            marker = decode_marker(data)
        except RegistrationError:
            self.state.rejected += 1
            return
        await self._flush(session)  # changes before the marker go first
        if session.staging is not None and session.staging != marker.version:
            # A snapshot that never completed, superseded: keep its values rather than lose them.
            session.changes.extend(session.staged.items())
            session.staged.clear()
            session.staging = None
            await self._flush(session)
        if not marker.complete:
            session.staging = marker.version
            return
        session.hold = False
        session.changes.extend(session.staged.items())
        session.staged.clear()
        session.staging = None
        session.floor = marker.version
        session.snapshot_version = marker.version
        await self._flush(session)

    async def _flush(self, session: _Session) -> None:
        """Hand the queued changes to the sink; then every change processed so far is applied
        (staged snapshot values aside, which their writer waits for through the marker)."""
        if session.changes or session.snapshot_version is not None:
            changes, session.changes = session.changes, []
            snapshot_version, session.snapshot_version = session.snapshot_version, None
            result = await self._sink.apply_feed(changes, snapshot_version)
            self.state.applied += result.applied
            self.state.rejected += result.stale
        if session.resolved and not session.catching_up:
            resolved, session.resolved = session.resolved, {}
            await self._sink.apply_resolved(resolved)
            self.state.applied += len(resolved)
        if not session.catching_up:
            eager, session.eager_revisions = session.eager_revisions, []
            self._wake(self.state.last_revision, eager)

    async def _finish_catch_up(self, session: _Session) -> None:
        """The initial values are in: apply the rest, then drop what the bucket does not hold.

        An empty bucket (no key, no marker) was never bootstrapped; the local copy stays, since
        emptying it would refuse every client of the node.
        """
        await self._flush(session)
        if session.seen_any:
            removed = await self._sink.reconcile_feed(session.present, session.floor or None)
            self.state.reconciled += removed
        else:
            log.warning("feed: the bucket is empty; keeping the local registrations")
        session.catching_up = False
        session.present = set()
        await self._flush(session)  # the resolved addresses, now that the accounts are in
        self.state.caught_up = self.state.connected
        self.state.lag = 0
        log.info("feed: caught up at revision %d", session.last_sequence)

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

    # --- compare-and-set writes (SPEC 4 version rules, fleet-wide) -----------------------

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
        when SPEC 4 says 409 against the bucket's state; FeedUnavailable when the bucket cannot
        be written (the caller answers 503; nothing was written).
        """
        key = account_key(account)
        data = encode_value(new)
        try:
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
        except (nats.errors.Error, TimeoutError) as exc:
            raise FeedUnavailable(f"registration feed: {type(exc).__name__}") from None
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
            keys = await self._account_keys()
            marker_revision = await self._cas(
                SNAPSHOT_KEY, encode_marker(SnapshotMarker(version, False)), marker_revision
            )
            wanted: dict[str, FeedValue | None] = {
                account_key(account): AccountValue(
                    version,
                    tuple(networks),
                    snapshot.hostnames.get(account, ()),
                    snapshot.devices.get(account, ()),
                )
                for account, networks in snapshot.accounts.items()
            }
            for key in keys - wanted.keys():
                wanted[key] = None
            await _bounded(
                (self._snapshot_key(key, value, version) for key, value in wanted.items()),
                SNAPSHOT_CONCURRENCY,
            )
            return await self._cas(
                SNAPSHOT_KEY, encode_marker(SnapshotMarker(version, True)), marker_revision
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            raise StaleWriteError("another snapshot is being written") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise FeedUnavailable(f"registration feed: {type(exc).__name__}") from None

    async def apply_resolved(self, changes: Mapping[str, Sequence[Network]]) -> None:
        """The DDNS refresher's results into the bucket (its HostnameSink on the refresher
        node): every node applies them, this one through its follower, before this returns
        (or after APPLIED_TIMEOUT_S). A plain put: the fleet has one refresher, and its
        latest lookup is the truth. FeedUnavailable when the bucket cannot be written."""
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
        if revisions and not await self.wait_applied(max(revisions)):
            log.debug("feed: resolved addresses written, not applied here in time")

    async def _account_keys(self) -> set[str]:
        """Every account key with a value (live or tombstone) in the bucket now."""
        try:
            async with asyncio.timeout(KEYS_TIMEOUT_S):
                keys = await self._bucket().keys()
        except nats.js.errors.NoKeysError:
            return set()
        return {key for key in keys if key.startswith(ACCOUNT_PREFIX)}

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


async def _next_msg(sub: Subscription, timeout_s: float) -> Msg:
    """sub.next_msg, with a cancellation Python 3.11's wait_for may swallow (a message and the
    cancellation arriving together: bpo-42130) raised anyway, so the follower always stops."""
    msg = await sub.next_msg(timeout=timeout_s)
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    return msg


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

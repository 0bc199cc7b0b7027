"""The registration feed's ordering and catch-up core (SPEC 4): bucket messages in, batches
and decisions out.

Pure; no I/O, no clock, no logging: sources/feed.py reads the bucket's stream and feeds each
message here with its stream sequence (the bucket revision), its consumer sequence and what the
server says is still pending; this module decides where a read starts (resume after the saved
revision, or a full read and why), notices a gap (a consumer sequence skipped: a message lost
on the way) or a duplicate, stages a snapshot until its marker completes, and hands out batches
for the sink: the changes, the snapshot version, the resolved hostnames, the revision to save
with them, and at the end of a full read the accounts the bucket holds (for reconciliation).
Like serve/framing.py for TCP, every edge case is unit-tested without a server.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from smartdns.config.model import RegistrationsConfig
from smartdns.errors import RegistrationError
from smartdns.registrations.entries import Network
from smartdns.registrations.feed_format import (
    HOST_PREFIX,
    SNAPSHOT_KEY,
    FeedChange,
    FeedValue,
    decode_marker,
    decode_resolved,
    decode_value,
    key_account,
    key_hostname,
)

# The KV operation header's values (nats.js.kv KV_DEL, KV_PURGE): the key was deleted.
DELETE_OPERATIONS: Final = frozenset({"DEL", "PURGE"})


class ResyncCause(enum.Enum):
    """Why a node reads the whole bucket instead of resuming (a metric label)."""

    FIRST = "first"  # no saved revision: a new node, or a database from before the feed
    RECREATED = "recreated"  # the stream is another one (created anew) or went backwards
    PURGED = "purged"  # revisions after the saved one are gone from the stream
    KEYS_MISSING = "keys_missing"  # the bucket holds fewer keys than this node has accounts


@dataclass(frozen=True, slots=True)
class Position:
    """How far a node applied the bucket: the stream's identity (its creation time, in
    microseconds) and the last revision (stream sequence) applied, saved with the changes;
    and how many messages the stream held when the node last looked (see keys_missing)."""

    created: int
    sequence: int
    messages: int = 0


@dataclass(frozen=True, slots=True)
class StreamFacts:
    """What the stream's info says now: identity, first and last revision, messages held."""

    created: int
    first_sequence: int
    last_sequence: int
    messages: int


@dataclass(frozen=True, slots=True)
class Start:
    """Where a read starts: every message after `after` (0: all of them); a full read, with
    its cause, ends with reconciliation."""

    after: int
    cause: ResyncCause | None

    @property
    def full(self) -> bool:
        return self.cause is not None


def plan_start(saved: Position | None, stream: StreamFacts) -> Start:
    """Resume after the saved revision when the stream still holds everything after it.

    A full read instead when there is no saved revision, when the stream is not the one the
    revision belongs to (created at another time, or its last revision is below the saved
    one: the bucket was recreated), or when its first revision is beyond the saved one + 1:
    messages after the saved revision were removed (a purge; with history 1 also every key
    older than it rewritten since, when a full read costs what the changes would).
    """
    if saved is None:
        return Start(0, ResyncCause.FIRST)
    if saved.created != stream.created or stream.last_sequence < saved.sequence:
        return Start(0, ResyncCause.RECREATED)
    if stream.messages and stream.first_sequence > saved.sequence + 1:
        return Start(0, ResyncCause.PURGED)
    return Start(saved.sequence, None)


def keys_missing(stream_messages: int, local_accounts: int, seen_messages: int) -> bool:
    """Were keys removed without a trace (a stream purge of some subjects, a
    purge of old delete markers)? In a history-1 bucket a key is one message whatever is
    written to it (a value, a tombstone, a delete or purge marker replaces the one before), so
    the count of messages never drops except by such a purge: it is below the count the node
    saw when it last looked, or below the accounts it holds (each, live or tombstone, is one
    key). One-sided: keys added while others were purged can hide the purge until the next
    full read. An empty stream is never missing keys: a bucket with no key was never
    bootstrapped (or was emptied), and a node keeps its copy rather than refuse everyone."""
    return 0 < stream_messages < max(local_accounts, seen_messages)


@dataclass(frozen=True, slots=True)
class BucketMessage:
    """One message of the bucket's stream, as the reader received it."""

    key: str  # the subject after `$KV.<bucket>.`
    operation: str | None  # the KV-Operation header: DEL, PURGE, or None for a value
    data: bytes
    sequence: int  # stream sequence: the bucket revision
    consumer_sequence: int  # 1, 2, 3... per consumer: a skip is a lost message
    pending: int  # messages still after this one for the consumer


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # at or below the last revision processed: ignored
    GAP = "gap"  # a consumer sequence skipped: re-read after `last_sequence`, from a new consumer


@dataclass(slots=True)
class Batch:
    """What to hand to the sink, in this order, in one call each."""

    changes: list[FeedChange]
    snapshot_version: int | None
    position: int | None  # the revision to save with the changes (None: keep the saved one)
    present: set[str] | None  # a full read is complete: reconcile to these accounts
    resolved: dict[str, tuple[Network, ...]]
    ahead: list[int]  # fast-path revisions applied by this batch (read-your-writes)


@dataclass(slots=True)
class FollowCounters:
    """Aggregate counts for /metrics; no account ids."""

    received: int = 0  # messages read from the stream (duplicates included)
    duplicates: int = 0
    gaps_detected: int = 0
    gaps_repaired: int = 0
    rejected: int = 0  # values skipped whole: invalid, unknown key, or a version going back
    full_reads: dict[ResyncCause, int] = field(
        default_factory=lambda: dict.fromkeys(ResyncCause, 0)
    )


class BucketFollower:
    """One node's reading of the bucket: its order, its snapshot staging, its catch-up.

    `begin` starts a read (`plan_start` says where); `receive` takes each message of the
    stream; `restart` follows a new consumer from `last_sequence` + 1 after a gap or a lost
    consumer; `ahead` takes a change that arrived out of band (the republished fast path, or
    the stream read by revision while the consumer is down), applied before the consumer
    delivers it; `take` returns the batch to apply. `caught_up` is set once a read reached
    the end of the stream (a message with nothing pending after it, or an empty start).
    """

    def __init__(self, rules: RegistrationsConfig) -> None:
        self.rules = rules
        self.counters = FollowCounters()
        self.last_sequence = 0
        self.pending = 0  # messages after the last one received, as the server said
        self.caught_up = False
        self.full = False
        self.seen_any = False  # a full read found any key (an empty bucket is never obeyed)
        self._consumer_sequence = 0
        self._repairing = False
        self._finished = False  # a full read just completed: the next batch reconciles
        self._present: set[str] = set()
        self._changes: list[FeedChange] = []
        self._staging: int | None = None  # version of a snapshot begun, not complete
        self._staging_from = 0  # the revision of its marker: nothing from it on is saved
        self._staged: dict[str, FeedValue | None] = {}
        self._snapshot_version: int | None = None
        self._floor = 0  # complete snapshot version: versions below it go backwards
        self._resolved: dict[str, tuple[Network, ...]] = {}
        # Changes applied ahead of the consumer: account -> revision, until the consumer
        # delivers that revision (older ones it delivers for the account are skipped).
        self._eager: dict[str, int] = {}
        self._ahead: list[int] = []
        self._hold = False  # a marker came out of band: no fast path until the consumer has it
        # Accounts read since a full read found the bucket empty (None: not tracking).
        self._since_empty: set[str] | None = None

    # --- reads and their order -------------------------------------------------------------

    def begin(self, start: Start) -> None:
        """A new read from `start`; a full one collects the accounts present to reconcile."""
        if start.cause is not None:
            self.counters.full_reads[start.cause] += 1
        self.full = start.full
        self.caught_up = self._finished = self._repairing = False
        self.seen_any = False
        self._present = set()
        self.last_sequence = start.after
        self._consumer_sequence = 0
        self._eager.clear()
        self._hold = False
        self._since_empty = None
        # A snapshot staged in memory is read again from its marker (a resume starts at or
        # before it: `take` never saves a revision past it).
        self._staging = None
        self._staged.clear()

    def track_from_empty(self) -> None:
        """A full read found the bucket empty, and the local copy was kept (an empty bucket is
        never obeyed). From revision 0 on, what this read receives is everything the bucket
        holds: the first batch after anything arrived reconciles to the accounts read since
        (and those applied ahead), with no second full read, which would hold the fast path
        back while it runs."""
        self._since_empty = set()

    def restart(self) -> None:
        """A new consumer from `last_sequence` + 1 (after a gap, or a consumer lost): its
        consumer sequences start again at 1."""
        self._consumer_sequence = 0

    def receive(self, message: BucketMessage) -> Verdict:
        """One message of the consumer, in the order delivered."""
        self.counters.received += 1
        if message.sequence <= self.last_sequence:
            # Already processed (read by revision while this consumer was being made): still
            # a step of the consumer's order.
            if message.consumer_sequence == self._consumer_sequence + 1:
                self._consumer_sequence = message.consumer_sequence
            self.counters.duplicates += 1
            return Verdict.DUPLICATE
        if message.consumer_sequence != self._consumer_sequence + 1:
            # Something between the last message and this one never reached us (a client
            # queue overflowed, a reordering): nothing after the last revision is trusted.
            self.counters.gaps_detected += 1
            self._repairing = True
            return Verdict.GAP
        if self._repairing:
            self._repairing = False
            self.counters.gaps_repaired += 1
        self._consumer_sequence = message.consumer_sequence
        self.pending = message.pending
        self._accept(message)
        if not self.caught_up and message.pending == 0:
            self.end_reached()
        return Verdict.ACCEPTED

    def receive_read(self, message: BucketMessage) -> None:
        """A message read from the stream by revision, without a consumer (one is being made
        anew; its consumer sequence and pending count are 0): the first after
        `last_sequence`, so in order by construction."""
        self.counters.received += 1
        if message.sequence > self.last_sequence:
            self._accept(message)

    def _accept(self, message: BucketMessage) -> None:
        self.last_sequence = message.sequence
        self.seen_any = True
        key = message.key
        if key == SNAPSHOT_KEY:
            self._on_marker(message)
        elif key.startswith(HOST_PREFIX):
            self._on_resolved(message)
        else:
            change = self._decode(message)
            if change is not None:
                self._queue(change, message.sequence)

    def end_reached(self) -> None:
        """Nothing is pending after the last message (or the stream had nothing after the
        start): the read is caught up; a full one reconciles with the next batch."""
        if self.caught_up:
            return
        self.caught_up = True
        self.pending = 0
        self._finished = self.full

    # --- batches -------------------------------------------------------------------------

    @property
    def has_batch(self) -> bool:
        return bool(
            self._changes
            or self._snapshot_version is not None
            or self._finished
            or (self._resolved and self.caught_up)
        )

    @property
    def queued(self) -> int:
        return len(self._changes)

    @property
    def floor(self) -> int:
        """The version of the last complete snapshot read (0: none)."""
        return self._floor

    def take(self) -> Batch:
        """The batch to apply now. The revision to save is the last one processed, except
        while a full read is under way (its end reconciles, and a restart before that must
        read again) and while a snapshot is staged (its values are only in memory: a restart
        must read them again from its marker on)."""
        changes, self._changes = self._changes, []
        snapshot_version, self._snapshot_version = self._snapshot_version, None
        position: int | None = self.last_sequence
        if self.full and not self._finished:
            position = None
        elif self._staging is not None:
            position = self._staging_from - 1
        present = None
        if self._finished:
            self._finished = self.full = False
            present, self._present = self._present, set()
        elif self._since_empty is not None and self.seen_any:
            present = self._since_empty | self._eager.keys()
            self._since_empty = None
        resolved: dict[str, tuple[Network, ...]] = {}
        if self.caught_up:  # resolved addresses after the accounts that hold the hostnames
            resolved, self._resolved = self._resolved, {}
        ahead, self._ahead = self._ahead, []
        return Batch(changes, snapshot_version, position, present, resolved, ahead)

    # --- out of band: the fast path and reads by revision --------------------------------

    def ahead(self, key: str, operation: str | None, data: bytes, sequence: int) -> None:
        """A change applied ahead of the consumer when nothing orders it otherwise: not while
        catching up or staging a snapshot, not once the consumer or the fast path had it or a
        later change to the account. Invalid ones are left for the consumer to count."""
        if not self.caught_up or self._staging is not None or self._hold:
            return
        if sequence <= self.last_sequence:
            return
        if key == SNAPSHOT_KEY:
            self._hold = True  # the consumer stages what follows
            return
        try:
            account = key_account(key)
            deleted = operation in DELETE_OPERATIONS
            value = None if deleted else decode_value(data, self.rules)
        except RegistrationError:
            return
        if account is None or (value is not None and value.version < self._floor):
            return
        if sequence <= self._eager.get(account, 0):
            return
        self._eager[account] = sequence
        self._ahead.append(sequence)
        self._changes.append((account, value))

    # --- one message ---------------------------------------------------------------------

    def _decode(self, message: BucketMessage) -> FeedChange | None:
        try:
            account = key_account(message.key)
            if account is None:
                raise RegistrationError("key", "not an account key")
            if self.full:
                self._present.add(account)  # a bad value still keeps the local copy's
            if self._since_empty is not None:
                self._since_empty.add(account)
            if message.operation in DELETE_OPERATIONS:
                self._present.discard(account)
                if self._since_empty is not None:
                    self._since_empty.discard(account)
                return (account, None)
            value = decode_value(message.data, self.rules)
        except RegistrationError:
            self.counters.rejected += 1
            return None
        if value.version < self._floor:
            self.counters.rejected += 1  # every key after a snapshot at S is at S or above
            return None
        return (account, value)

    def _queue(self, change: FeedChange, sequence: int) -> None:
        account, value = change
        ahead = self._eager.get(account)
        if ahead is not None:
            if sequence < ahead:
                return  # a newer change to the account was applied from the fast path
            del self._eager[account]
            if sequence == ahead:
                return
        if self._staging is not None and (value is None or value.version == self._staging):
            self._staged[account] = value
            if self.full:
                self._present.add(account)  # removed when the snapshot completes
        else:
            self._changes.append(change)

    def _on_marker(self, message: BucketMessage) -> None:
        """A snapshot begins (stage its values) or completes (apply them in one step)."""
        if message.operation in DELETE_OPERATIONS:
            return
        try:
            marker = decode_marker(message.data)
        except RegistrationError:
            self.counters.rejected += 1
            return
        if self._staging is not None and self._staging != marker.version:
            # A snapshot that never completed, superseded: keep its values rather than lose them.
            self._changes.extend(self._staged.items())
            self._staged.clear()
            self._staging = None
        if not marker.complete:
            if self._staging is None:
                self._staging_from = message.sequence
            self._staging = marker.version
            return
        self._hold = False
        self._changes.extend(self._staged.items())
        self._staged.clear()
        self._staging = None
        self._floor = marker.version
        self._snapshot_version = marker.version

    def _on_resolved(self, message: BucketMessage) -> None:
        """What a hostname resolves to (the refresher's result); handed out after the accounts
        of the same batch, and after all of them at catch-up, since the store keeps resolved
        addresses only for hostnames an account holds."""
        try:
            hostname = key_hostname(message.key)
            assert hostname is not None  # a host. key
            deleted = message.operation in DELETE_OPERATIONS
            self._resolved[hostname] = () if deleted else decode_resolved(message.data, self.rules)
        except RegistrationError:
            self.counters.rejected += 1

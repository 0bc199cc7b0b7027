"""The feed's sans-IO ordering and catch-up core: where a read starts, gaps, duplicates,
reorderings, snapshots staged and completed, purges, the revision saved with each batch."""

from __future__ import annotations

import ipaddress

import pytest

from smartdns.config.model import RegistrationsConfig
from smartdns.registrations.feed_follow import (
    BucketFollower,
    BucketMessage,
    Position,
    ResyncCause,
    Start,
    StreamFacts,
    Verdict,
    keys_missing,
    plan_start,
)
from smartdns.registrations.feed_format import (
    SNAPSHOT_KEY,
    AccountValue,
    SnapshotMarker,
    Tombstone,
    account_key,
    encode_marker,
    encode_resolved,
    encode_value,
)

LAB = RegistrationsConfig(public_only=False)
CREATED = 1_700_000_000_000_000


def value(version: int, address: str = "203.0.113.7") -> AccountValue:
    return AccountValue(version, (ipaddress.ip_network(address),))


class Stream:
    """Builds one consumer's messages: stream sequences as given, consumer sequences 1, 2..."""

    def __init__(self, last: int) -> None:
        self.last = last  # the stream's last revision: `pending` is counted against it
        self.delivered = 0

    def message(
        self, sequence: int, key: str, data: bytes = b"", operation: str | None = None
    ) -> BucketMessage:
        self.delivered += 1
        pending = max(self.last - sequence, 0)
        return BucketMessage(key, operation, data, sequence, self.delivered, pending)

    def account(self, sequence: int, account: str, new: AccountValue | Tombstone) -> BucketMessage:
        return self.message(sequence, account_key(account), encode_value(new))


FIRST_READ = Start(0, ResyncCause.FIRST)


def follower(start: Start = FIRST_READ) -> BucketFollower:
    follow = BucketFollower(LAB)
    follow.begin(start)
    return follow


@pytest.mark.parametrize(
    ("saved", "stream", "wanted"),
    [
        (None, StreamFacts(CREATED, 1, 10, 10), Start(0, ResyncCause.FIRST)),
        (Position(CREATED, 7), StreamFacts(CREATED, 1, 10, 10), Start(7, None)),
        (Position(CREATED, 10), StreamFacts(CREATED, 1, 10, 10), Start(10, None)),
        (Position(CREATED, 7), StreamFacts(CREATED, 8, 10, 3), Start(7, None)),  # next is there
        (Position(CREATED, 7), StreamFacts(CREATED + 1, 1, 9, 9), Start(0, ResyncCause.RECREATED)),
        (Position(CREATED, 12), StreamFacts(CREATED, 1, 10, 10), Start(0, ResyncCause.RECREATED)),
        (Position(CREATED, 7), StreamFacts(CREATED, 9, 10, 2), Start(0, ResyncCause.PURGED)),
        (Position(CREATED, 7), StreamFacts(CREATED, 11, 10, 0), Start(7, None)),  # emptied: no keys
    ],
)  # fmt: skip
def test_plan_start(saved: Position | None, stream: StreamFacts, wanted: Start) -> None:
    assert plan_start(saved, stream) == wanted


@pytest.mark.parametrize(
    ("stream_messages", "local_accounts", "seen_messages", "missing"),
    [
        (3, 4, 0, True),  # fewer keys than accounts held
        (4, 4, 4, False),
        (9, 4, 9, False),  # delete markers, hostnames, the snapshot marker
        (8, 4, 9, True),  # fewer messages than last seen: a purge without a marker
        (12, 4, 9, False),  # new keys
        (0, 4, 9, False),  # an empty bucket: never obeyed
    ],
)
def test_keys_went_missing_when_the_count_of_messages_drops(
    stream_messages: int, local_accounts: int, seen_messages: int, missing: bool
) -> None:
    assert keys_missing(stream_messages, local_accounts, seen_messages) is missing


def test_a_full_read_batches_every_key_then_reconciles_and_saves_its_revision() -> None:
    stream = Stream(last=4)
    follow = follower()
    assert follow.receive(stream.account(1, "a", value(1))) is Verdict.ACCEPTED
    assert follow.receive(stream.account(3, "b", Tombstone(2))) is Verdict.ACCEPTED
    first = follow.take()
    assert first.changes == [("a", value(1)), ("b", Tombstone(2))]
    assert first.position is None and first.present is None  # not saved mid-read
    assert not follow.caught_up
    follow.receive(stream.message(4, account_key("c"), operation="DEL"))
    assert follow.caught_up
    last = follow.take()
    assert last.changes == [("c", None)]
    assert last.position == 4 and last.present == {"a", "b"}
    assert follow.take().present is None  # reconciled once
    assert follow.counters.full_reads[ResyncCause.FIRST] == 1


def test_a_resume_saves_each_revision_and_never_reconciles() -> None:
    stream = Stream(last=12)
    follow = follower(Start(10, None))
    follow.receive(stream.account(11, "a", value(5)))
    assert follow.take().position == 11
    follow.receive(stream.account(12, "a", value(6)))
    batch = follow.take()
    assert follow.caught_up and batch.position == 12 and batch.present is None
    assert sum(follow.counters.full_reads.values()) == 0


def test_an_empty_remainder_is_caught_up_at_once() -> None:
    follow = follower(Start(10, None))
    follow.end_reached()
    assert follow.caught_up and not follow.has_batch


def test_a_skipped_consumer_sequence_is_a_gap_repaired_from_the_last_revision() -> None:
    stream = Stream(last=5)
    follow = follower()
    follow.receive(stream.account(1, "a", value(1)))
    stream.delivered += 1  # message 2 never arrived (a client queue overflowed)
    assert follow.receive(stream.account(3, "c", value(1))) is Verdict.GAP
    assert follow.receive(stream.account(4, "d", value(1))) is Verdict.GAP  # still nothing trusted
    assert follow.last_sequence == 1 and follow.counters.gaps_detected == 2
    follow.restart()  # a new consumer after revision 1
    again = Stream(last=5)
    for sequence, account in ((2, "b"), (3, "c"), (4, "d"), (5, "e")):
        assert follow.receive(again.account(sequence, account, value(1))) is Verdict.ACCEPTED
    assert follow.counters.gaps_repaired == 1
    assert [account for account, _ in follow.take().changes] == ["a", "b", "c", "d", "e"]


def test_duplicates_and_revisions_going_back_are_ignored() -> None:
    stream = Stream(last=9)
    follow = follower(Start(5, None))
    follow.receive(stream.account(6, "a", value(1)))
    follow.restart()
    again = Stream(last=9)
    assert follow.receive(again.account(6, "a", value(1))) is Verdict.DUPLICATE
    assert follow.receive(again.account(4, "z", value(1))) is Verdict.DUPLICATE
    assert follow.counters.duplicates == 2
    assert follow.take().changes == [("a", value(1))]


def test_a_reordered_delivery_is_a_gap_not_an_apply_out_of_order() -> None:
    stream = Stream(last=9)
    follow = follower(Start(5, None))
    second = stream.account(7, "b", value(1))
    first = stream.account(6, "a", value(1))
    assert follow.receive(first) is Verdict.GAP  # consumer sequence 2 before 1
    assert follow.last_sequence == 5 and follow.take().changes == []
    assert second.consumer_sequence == 1


def test_a_snapshot_is_staged_until_its_marker_completes() -> None:
    stream = Stream(last=20)
    follow = follower(Start(9, None))
    marker = encode_marker(SnapshotMarker(50, False))
    follow.receive(stream.message(10, SNAPSHOT_KEY, marker))
    follow.receive(stream.account(11, "s1", value(50)))
    follow.receive(stream.message(12, account_key("old"), operation="DEL"))
    follow.receive(stream.account(13, "newer", value(60)))  # not the snapshot's: applied
    staged = follow.take()
    assert staged.changes == [("newer", value(60))]
    assert staged.position == 9  # a restart reads the staged values again from the marker
    follow.receive(stream.message(14, SNAPSHOT_KEY, encode_marker(SnapshotMarker(50, True))))
    done = follow.take()
    assert done.changes == [("s1", value(50)), ("old", None)]
    assert done.snapshot_version == 50 and done.position == 14
    follow.receive(stream.account(15, "late", value(49)))  # below the snapshot: going back
    assert follow.take().changes == [] and follow.counters.rejected == 1


def test_a_resume_drops_what_was_staged_and_stages_it_again() -> None:
    stream = Stream(last=20)
    follow = follower(Start(9, None))
    follow.receive(stream.message(10, SNAPSHOT_KEY, encode_marker(SnapshotMarker(50, False))))
    follow.receive(stream.account(11, "s1", value(50)))
    assert follow.take().position == 9
    follow.begin(Start(9, None))  # the connection was lost: read again after the saved one
    again = Stream(last=20)
    follow.receive(again.message(10, SNAPSHOT_KEY, encode_marker(SnapshotMarker(50, False))))
    follow.receive(again.account(11, "s1", value(50)))
    follow.receive(again.message(12, SNAPSHOT_KEY, encode_marker(SnapshotMarker(50, True))))
    assert follow.take().changes == [("s1", value(50))]


def test_a_superseded_unfinished_snapshot_keeps_its_values() -> None:
    stream = Stream(last=20)
    follow = follower(Start(0, None))
    follow.receive(stream.message(1, SNAPSHOT_KEY, encode_marker(SnapshotMarker(5, False))))
    follow.receive(stream.account(2, "s", value(5)))
    follow.receive(stream.message(3, SNAPSHOT_KEY, encode_marker(SnapshotMarker(6, False))))
    assert follow.take().changes == [("s", value(5))]


def test_a_full_read_reconciles_to_the_live_and_tombstoned_keys_only() -> None:
    """Purged keys: a KV purge leaves a marker (the account goes), a stream purge leaves
    nothing (absent from `present`: reconciliation removes it)."""
    stream = Stream(last=3)
    follow = follower(Start(0, ResyncCause.PURGED))
    follow.receive(stream.account(1, "keep", value(1)))
    follow.receive(stream.account(2, "tomb", Tombstone(3)))
    follow.receive(stream.message(3, account_key("purged"), operation="PURGE"))
    batch = follow.take()
    assert batch.present == {"keep", "tomb"}
    assert batch.changes[-1] == ("purged", None)
    assert follow.counters.full_reads[ResyncCause.PURGED] == 1


def test_after_an_empty_read_the_first_batch_reconciles_without_a_second_full_read() -> None:
    """A full read that found nothing keeps the local copy; the keys read from revision 1 on
    are then the whole bucket, so the first batch with any reconciles to them (and to what
    the fast path applied ahead), and the fast path stays open throughout."""
    follow = follower()
    follow.end_reached()
    empty = follow.take()
    assert empty.present == set() and not follow.seen_any
    follow.track_from_empty()
    stream = Stream(last=3)
    follow.ahead(account_key("ahead"), None, encode_value(value(2)), 9)  # caught up: applied
    follow.receive(stream.account(1, "first", value(1)))
    follow.receive(stream.account(2, "gone", value(1)))
    follow.receive(stream.message(3, account_key("gone"), operation="DEL"))
    batch = follow.take()
    assert batch.present == {"first", "ahead"}
    assert batch.position == 3  # saved with the reconciliation
    assert follow.take().present is None  # once only
    assert follow.counters.full_reads[ResyncCause.FIRST] == 1


def test_messages_read_by_revision_advance_and_the_new_consumer_repeats_them() -> None:
    """While a consumer is made anew the stream is read by revision; the consumer, made from
    the revision before, then delivers those again: duplicates, still steps of its order,
    so what follows them is no gap."""
    follow = follower(Start(2, None))
    follow.end_reached()
    follow.receive_read(BucketMessage(account_key("a"), None, encode_value(value(3)), 3, 0, 0))
    follow.receive_read(BucketMessage(account_key("b"), None, encode_value(value(1)), 5, 0, 0))
    follow.receive_read(BucketMessage(account_key("a"), None, encode_value(value(3)), 3, 0, 0))
    assert follow.last_sequence == 5
    assert follow.take().changes == [("a", value(3)), ("b", value(1))]
    follow.restart()
    consumer = Stream(last=6)
    consumer.delivered = 0
    assert follow.receive(consumer.account(3, "a", value(3))) is Verdict.DUPLICATE
    assert follow.receive(consumer.account(5, "b", value(1))) is Verdict.DUPLICATE
    assert follow.receive(consumer.account(6, "c", value(1))) is Verdict.ACCEPTED
    assert follow.take().changes == [("c", value(1))]
    assert follow.counters.gaps_detected == 0


def test_bad_values_are_counted_and_still_keep_the_account_present() -> None:
    stream = Stream(last=3)
    follow = follower()
    follow.receive(stream.message(1, account_key("a"), b"not json"))
    follow.receive(stream.message(2, "stray", b"{}"))
    follow.receive(stream.message(3, SNAPSHOT_KEY, b'{"version": "x"}'))
    batch = follow.take()
    assert batch.changes == [] and batch.present == {"a"}
    assert follow.counters.rejected == 3


def test_resolved_hostnames_come_after_the_catch_up() -> None:
    stream = Stream(last=2)
    follow = follower()
    home = (ipaddress.ip_network("203.0.113.9/32"),)
    follow.receive(stream.message(1, "host.home.example.net", encode_resolved(home)))
    assert follow.take().resolved == {}  # held until every account is in
    follow.receive(stream.account(2, "a", value(1)))
    assert follow.take().resolved == {"home.example.net": home}


def test_a_fast_path_change_goes_ahead_and_its_delivery_is_skipped() -> None:
    follow = follower(Start(4, None))
    follow.end_reached()
    follow.ahead(account_key("a"), None, encode_value(value(7)), 6)
    follow.ahead(account_key("a"), None, encode_value(value(7)), 6)  # the gap fill's copy
    batch = follow.take()
    assert batch.changes == [("a", value(7))] and batch.ahead == [6]
    assert batch.position == 4  # the consumer has not delivered it: not saved
    later = Stream(last=6)
    later.delivered = 0
    follow.receive(later.account(5, "a", value(6)))  # older than what went ahead
    follow.receive(later.account(6, "a", value(7)))  # the same
    assert follow.take().changes == []


def test_nothing_goes_ahead_while_catching_up_or_after_a_marker() -> None:
    follow = follower(Start(4, None))
    follow.ahead(account_key("a"), None, encode_value(value(7)), 6)
    assert follow.take().changes == []
    follow.end_reached()
    follow.ahead(SNAPSHOT_KEY, None, encode_marker(SnapshotMarker(9, False)), 6)
    follow.ahead(account_key("a"), None, encode_value(value(9)), 7)
    assert follow.take().changes == []

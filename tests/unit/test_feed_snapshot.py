"""A snapshot's plan from one read of the bucket: what each account key needs (nothing, a
compare-and-set write, or a KV delete) and on which revision."""

from __future__ import annotations

import ipaddress

import pytest

from smartdns.registrations.entries import Snapshot
from smartdns.registrations.feed_follow import BucketMessage
from smartdns.registrations.feed_format import AccountValue, Tombstone, account_key, encode_value
from smartdns.registrations.sources.feed_snapshot import SnapshotPlan, plan_key, snapshot_value

NET = ipaddress.ip_network("203.0.113.7/32")
SNAPSHOT = Snapshot(10, {"same": (NET,), "older": (NET,), "newer": (NET,), "gone": (NET,)})


def stored(key: str, data: bytes, revision: int, operation: str | None = None) -> BucketMessage:
    return BucketMessage(key, operation, data, revision, revision, 0)


def planned(*messages: BucketMessage) -> SnapshotPlan:
    plan = SnapshotPlan()
    for message in messages:
        plan_key(plan, SNAPSHOT, message)
    return plan


def test_each_kind_of_stored_key() -> None:
    plan = planned(
        stored(account_key("same"), encode_value(snapshot_value(SNAPSHOT, "same")), 1),
        stored(account_key("older"), encode_value(AccountValue(4, (NET,))), 2),
        stored(account_key("newer"), encode_value(AccountValue(11, (NET,))), 3),
        stored(account_key("gone"), b"", 4, "DEL"),
        stored(account_key("extra"), encode_value(Tombstone(9)), 5),
        stored(account_key("later"), encode_value(Tombstone(12)), 6),
        stored(account_key("deleted"), b"", 7, "PURGE"),
        stored("acct.not.an.id", b"{}", 8),
    )
    assert plan.writes == {account_key("older"): 2, account_key("gone"): 4}
    assert plan.deletes == {account_key("extra"): 5, "acct.not.an.id": 8}
    assert plan.kept == {
        account_key(name) for name in ("same", "newer", "later", "deleted")
    }  # a new key ("absent" from the bucket) is written on revision 0 by the caller


@pytest.mark.parametrize("data", [b"not json", b"[]", b'{"version": true}'])
def test_an_unreadable_value_is_overwritten(data: bytes) -> None:
    assert planned(stored(account_key("older"), data, 3)).writes == {account_key("older"): 3}


def test_a_later_message_of_the_same_key_decides() -> None:
    key = account_key("extra")
    plan = planned(stored(key, encode_value(Tombstone(9)), 1), stored(key, b"", 2, "DEL"))
    assert plan.deletes == {} and plan.kept == {key}

"""The store's side of the registration feed on a real SQLite file: apply_feed's version rule,
removals, reconciliation, and what the DNS side's change reads then report."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smartdns.config.model import RegistrationsConfig
from smartdns.registrations.feed_follow import Position
from smartdns.registrations.feed_format import AccountValue, FeedApplied, Tombstone
from smartdns.registrations.store import RegistrationStore
from smartdns.registrations.writer import RegistrationWriter

A = ipaddress.IPv4Network("203.0.113.7/32")
B = ipaddress.IPv4Network("198.51.100.0/24")
A_PREFIX = (4, int(A.network_address), 32)
B_PREFIX = (4, int(B.network_address), 24)
FIRST = int(ipaddress.IPv4Address("100.64.0.0"))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RegistrationStore]:
    opened = await RegistrationStore.open(tmp_path / "registrations.db", create=True)
    yield opened
    await opened.close()


async def test_newer_versions_apply_older_are_stale_equal_are_repeats(
    store: RegistrationStore,
) -> None:
    first = await store.feed.apply_feed([("x", AccountValue(5, (A,), ("home.example.net",)))], None)
    assert first == FeedApplied(1, 0)
    record = await store.readers.get_account("x")
    assert record is not None and record.hostnames == ("home.example.net",)
    again = await store.feed.apply_feed(
        [("x", AccountValue(5, (B,))), ("x", AccountValue(4, (B,))), ("x", Tombstone(3))], None
    )
    assert again == FeedApplied(0, 2)
    assert (await store.readers.get_account("x")).networks == (A,)  # type: ignore[union-attr]
    assert await store.feed.apply_feed([("x", AccountValue(6, (B,)))], None) == FeedApplied(1, 0)
    assert (await store.readers.get_account("x")).networks == (B,)  # type: ignore[union-attr]


async def test_a_snapshot_version_never_refuses_the_bucket(store: RegistrationStore) -> None:
    await store.feed.apply_feed([("x", AccountValue(10, (A,)))], 10)
    assert (await store.readers.status()).snapshot_version == 10
    # A snapshot's accounts arrive at its version; the bucket already applied SPEC 4's rules.
    await store.feed.apply_feed([("y", AccountValue(10, (B,)))], None)
    assert {r.account for r in await store.readers.list_accounts()} == {"x", "y"}


async def test_tombstones_and_removals_reach_the_dns_side(store: RegistrationStore) -> None:
    await store.feed.apply_feed([("x", AccountValue(1, (A,))), ("y", AccountValue(1, (B,)))], None)
    since = await store.readers.generation()
    await store.feed.apply_feed([("x", Tombstone(2)), ("y", None)], None)
    changes = await store.readers.changes_since(since)
    assert sorted(changes.gone) == sorted([A_PREFIX, B_PREFIX]) and not changes.present
    status = await store.readers.status()
    assert status.accounts == 0
    # x is a tombstone, blocking older values; y is gone entirely, so any version returns it.
    assert await store.feed.apply_feed([("x", AccountValue(1, (A,)))], None) == FeedApplied(0, 1)
    assert await store.feed.apply_feed([("y", AccountValue(1, (B,)))], None) == FeedApplied(1, 0)


async def test_nothing_changed_bumps_no_generation(store: RegistrationStore) -> None:
    await store.feed.apply_feed([("x", AccountValue(1, (A,)))], None)
    generation = await store.readers.generation()
    await store.feed.apply_feed([("x", AccountValue(1, (A,))), ("gone", None)], None)
    assert await store.readers.generation() == generation


async def test_reconcile_drops_accounts_and_tombstones_the_bucket_lacks(
    store: RegistrationStore,
) -> None:
    await store.feed.apply_feed(
        [("keep", AccountValue(1, (A,))), ("drop", AccountValue(1, (B,))), ("t", Tombstone(3))],
        None,
    )
    since = await store.readers.generation()
    assert await store.feed.reconcile_feed({"keep", "not-local"}, 7) == 2
    assert [r.account for r in await store.readers.list_accounts()] == ["keep"]
    assert (await store.readers.changes_since(since)).gone == [B_PREFIX]
    assert (await store.readers.status()).snapshot_version == 7
    # The tombstone went too: the bucket no longer blocks that account's older versions.
    assert await store.feed.apply_feed([("t", AccountValue(2, (B,)))], None) == FeedApplied(1, 0)


async def test_the_writer_announces_feed_changes(store: RegistrationStore) -> None:
    announced: list[int] = []

    async def announce(generation: int, _everything: bool) -> None:
        announced.append(generation)

    writer = RegistrationWriter(store, RegistrationsConfig(), announce)
    await writer.apply_feed([("x", AccountValue(1, (A,)))], None)
    await writer.apply_feed([("x", AccountValue(1, (A,)))], None)  # a repeat: nothing new
    await writer.reconcile_feed(set(), None)
    assert announced == [1, 2]


async def test_a_batch_of_new_accounts_then_changes_to_them(store: RegistrationStore) -> None:
    """New accounts go in bulk; a later change to one of them in the same batch still wins."""
    changes: list[tuple[str, AccountValue | Tombstone | None]] = [
        (f"n{i}", AccountValue(1, (ipaddress.IPv4Network((FIRST + i, 32)),))) for i in range(1200)
    ]
    changes += [("n5", AccountValue(2, (A,))), ("n6", None), ("n7", Tombstone(3))]
    assert await store.feed.apply_feed(changes, None) == FeedApplied(1203, 0)
    status = await store.readers.status()
    assert (status.accounts, status.entries) == (1198, 1198)
    assert (await store.readers.get_account("n5")).networks == (A,)  # type: ignore[union-attr]
    since = 0
    assert len((await store.readers.changes_since(since)).present) == 1198
    again = await store.feed.apply_feed(changes[:1200], None)  # a catch-up over the same keys
    assert again == FeedApplied(1, 2)  # n6 returns (it was removed); n5, n7 hold newer


async def test_the_feed_position_is_saved_with_the_changes_and_survives_a_reopen(
    tmp_path: Path,
) -> None:
    path = tmp_path / "registrations.db"
    store = await RegistrationStore.open(path, create=True)
    assert await store.feed.feed_position() == (None, 0)
    await store.feed.apply_feed([("x", AccountValue(5, (A,)))], None, Position(7, 11))
    await store.feed.apply_feed([("y", Tombstone(2))], None)  # no position: the saved one stays
    assert await store.feed.feed_position() == (Position(7, 11), 2)
    await store.feed.reconcile_feed({"x"}, None, Position(7, 40))
    await store.close()
    reopened = await RegistrationStore.open(path, create=False)
    try:
        assert await reopened.feed.feed_position() == (Position(7, 40), 1)
    finally:
        await reopened.close()


async def test_a_failed_batch_saves_no_position(store: RegistrationStore) -> None:
    """The revision and the changes commit together: a batch that fails leaves neither."""
    await store.feed.apply_feed([("x", AccountValue(5, (A,)))], None, Position(7, 3))
    bogus = AccountValue(1, ("bogus",))  # type: ignore[arg-type]
    with pytest.raises(AttributeError):  # fails inside the transaction
        await store.feed.apply_feed([("y", bogus)], None, Position(7, 9))
    assert await store.feed.feed_position() == (Position(7, 3), 1)


async def test_changes_to_stored_accounts_in_one_batch_equal_them_one_by_one(
    tmp_path: Path,
) -> None:
    """Stored accounts taking values without hostnames are replaced set by set; the result,
    and what a DNS process catching up is told (entries and digests gone), equal applying
    the same changes one batch per change, the general path. One account holding a hostname
    takes the general path inside the batch."""
    digest = bytes(range(32))
    before: list[tuple[str, AccountValue | Tombstone | None]] = [
        ("moves", AccountValue(1, (A,), (), (digest,))),
        ("grows", AccountValue(1, (A,))),
        ("named", AccountValue(1, (A,), ("home.example.net",))),
        ("buried", Tombstone(1)),
    ]
    after: list[tuple[str, AccountValue | Tombstone | None]] = [
        ("moves", AccountValue(2, (B,))),  # its entry and its digest go
        ("grows", AccountValue(2, (A, B))),
        ("named", AccountValue(2, (B,))),  # held a hostname: the general path
        ("buried", AccountValue(2, (B,))),  # a tombstone comes back
        ("grows", AccountValue(3, (B,))),  # twice in the batch: the later one holds
    ]
    stores = []
    for name, batches in (("together", [after]), ("apart", [[change] for change in after])):
        store = await RegistrationStore.open(tmp_path / f"{name}.db", create=True)
        await store.feed.apply_feed(before, None)
        since = await store.readers.generation()
        for batch in batches:
            await store.feed.apply_feed(batch, None)
        listed = [
            (record.account, record.version, record.networks, record.hostnames, record.devices)
            for record in await store.readers.list_accounts()
        ]
        changes = await store.readers.changes_since(since)
        stores.append((listed, set(changes.present), set(changes.gone), changes))
        await store.close()
    (together, present, gone, changes), (apart, present_apart, gone_apart, changes_apart) = stores
    assert together == apart
    assert [row[0] for row in together] == ["buried", "grows", "moves", "named"]
    assert (present, gone) == (present_apart, gone_apart)  # one generation, or one per change
    assert A_PREFIX in gone  # no account holds A any more
    assert set(changes.devices_gone) == set(changes_apart.devices_gone) == {digest}

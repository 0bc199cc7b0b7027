"""Account writes on real SQLite files: versions, tombstones, snapshots, overrides."""

from __future__ import annotations

import pytest

from smartdns.config.model import RegistrationsConfig
from smartdns.errors import RegistrationError, StaleWriteError
from smartdns.registrations.entries import AccountEntries, parse_snapshot_document
from smartdns.registrations.store import AccountRecord, RegistrationStore, SnapshotResult
from tests.registrations_data import A, B, C, D, snapshot

# --- PUT -------------------------------------------------------------------------------------


async def test_put_then_get(store: RegistrationStore) -> None:
    record = await store.accounts.put_account("acct-1", 5, (C, A, B))
    assert record == AccountRecord("acct-1", 5, (B, A, C))
    assert await store.readers.get_account("acct-1") == record
    assert await store.readers.get_account("acct-2") is None
    assert await store.readers.generation() == 1


async def test_put_replaces_the_set(store: RegistrationStore) -> None:
    await store.accounts.put_account("acct-1", 5, (A, B))
    record = await store.accounts.put_account("acct-1", 6, (C,))
    assert record == AccountRecord("acct-1", 6, (C,))
    assert (await store.readers.load_prefixes())[1] == [(6, int(C.network_address), 64)]


async def test_put_empty_set_keeps_a_live_account(store: RegistrationStore) -> None:
    await store.accounts.put_account("acct-1", 5, ())
    assert await store.readers.get_account("acct-1") == AccountRecord("acct-1", 5, ())


async def test_repeated_put_is_a_noop(store: RegistrationStore) -> None:
    first = await store.accounts.put_account("acct-1", 5, (A, C))
    generation = await store.readers.generation()
    assert await store.accounts.put_account("acct-1", 5, (C, A, A)) == first
    assert await store.readers.generation() == generation


async def test_put_with_lower_version_is_stale(store: RegistrationStore) -> None:
    await store.accounts.put_account("acct-1", 5, (A,))
    generation = await store.readers.generation()
    with pytest.raises(StaleWriteError):
        await store.accounts.put_account("acct-1", 4, (B,))
    assert await store.readers.get_account("acct-1") == AccountRecord("acct-1", 5, (A,))
    assert await store.readers.generation() == generation


async def test_put_same_version_other_content_is_stale(store: RegistrationStore) -> None:
    await store.accounts.put_account("acct-1", 5, (A,))
    with pytest.raises(StaleWriteError):
        await store.accounts.put_account("acct-1", 5, (A, B))
    assert await store.readers.get_account("acct-1") == AccountRecord("acct-1", 5, (A,))


async def test_put_not_above_snapshot_version_is_stale(store: RegistrationStore) -> None:
    await store.accounts.replace_snapshot(snapshot(10, {}))
    for version in (9, 10):
        with pytest.raises(StaleWriteError):
            await store.accounts.put_account("acct-1", version, (A,))
    assert await store.readers.get_account("acct-1") is None
    await store.accounts.put_account("acct-1", 11, (A,))


async def test_repeat_of_snapshot_content_is_a_noop(store: RegistrationStore) -> None:
    await store.accounts.replace_snapshot(snapshot(10, {"acct-1": (A,)}))
    assert await store.accounts.put_account("acct-1", 10, (A,)) == AccountRecord("acct-1", 10, (A,))
    with pytest.raises(StaleWriteError):
        await store.accounts.put_account("acct-1", 10, (B,))


async def test_invalid_account_id_is_rejected(store: RegistrationStore) -> None:
    with pytest.raises(RegistrationError):
        await store.accounts.put_account("a b", 1, (A,))
    with pytest.raises(RegistrationError):
        await store.accounts.delete_account("", 1)


# --- DELETE ----------------------------------------------------------------------------------


async def test_delete_leaves_a_tombstone(store: RegistrationStore) -> None:
    await store.accounts.put_account("acct-1", 5, (A,))
    assert await store.accounts.delete_account("acct-1", 6) is True
    assert await store.readers.get_account("acct-1") is None
    assert (await store.readers.load_prefixes())[1] == []
    assert await store.readers.list_accounts() == []
    # Repeating the delete is a no-op; an older PUT cannot bring the account back.
    generation = await store.readers.generation()
    assert await store.accounts.delete_account("acct-1", 6) is False
    assert await store.readers.generation() == generation
    for version in (5, 6):
        with pytest.raises(StaleWriteError):
            await store.accounts.put_account("acct-1", version, (A,))
    assert await store.accounts.put_account("acct-1", 7, (B,)) == AccountRecord("acct-1", 7, (B,))


async def test_delete_of_unknown_account_leaves_a_tombstone(store: RegistrationStore) -> None:
    assert await store.accounts.delete_account("acct-9", 8) is False
    assert await store.readers.generation() == 1
    with pytest.raises(StaleWriteError):
        await store.accounts.put_account("acct-9", 7, (A,))  # the delayed older PUT
    assert await store.readers.get_account("acct-9") is None
    status = await store.readers.status()
    assert (status.accounts, status.entries) == (0, 0)


async def test_stale_deletes(store: RegistrationStore) -> None:
    await store.accounts.put_account("acct-1", 5, (A,))
    for version in (4, 5):  # older, or the same version as the live account
        with pytest.raises(StaleWriteError):
            await store.accounts.delete_account("acct-1", version)
    assert await store.readers.get_account("acct-1") is not None
    await store.accounts.replace_snapshot(snapshot(10, {}))
    with pytest.raises(StaleWriteError):
        await store.accounts.delete_account("acct-2", 10)


async def test_newer_delete_over_tombstone_refreshes_it(store: RegistrationStore) -> None:
    await store.accounts.delete_account("acct-1", 5)
    assert await store.accounts.delete_account("acct-1", 7) is False
    with pytest.raises(StaleWriteError):
        await store.accounts.put_account("acct-1", 6, (A,))
    with pytest.raises(StaleWriteError):
        await store.accounts.delete_account("acct-1", 6)


# --- snapshot --------------------------------------------------------------------------------


async def test_snapshot_replaces_everything(store: RegistrationStore) -> None:
    await store.accounts.put_account("gone", 3, (D,))
    await store.accounts.put_account("acct-1", 4, (A,))
    await store.accounts.delete_account("tomb", 5)
    result = await store.accounts.replace_snapshot(snapshot(6, {"acct-1": (B, C), "acct-2": ()}))
    assert result == SnapshotResult(accounts=2, entries=2)
    assert await store.readers.list_accounts() == [
        AccountRecord("acct-1", 6, (B, C)),
        AccountRecord("acct-2", 6, ()),
    ]
    assert await store.readers.get_account("gone") is None
    status = await store.readers.status()
    assert (status.accounts, status.entries, status.snapshot_version) == (2, 2, 6)
    assert await store.readers.snapshot_version() == 6
    # The tombstone is gone with the snapshot: a PUT above the snapshot version is accepted.
    assert await store.accounts.put_account("tomb", 7, (A,)) == AccountRecord("tomb", 7, (A,))


async def test_parsed_snapshot_is_stored_from_its_rows(store: RegistrationStore) -> None:
    parsed = parse_snapshot_document(
        {
            "version": 3,
            "accounts": {
                "acct-2": ["2001:db8:7::/64", "::ffff:198.51.100.0/120", "203.0.113.7"],
                "acct-1": ["2001:db8::1", "203.0.113.7/32", "::ffff:cb00:7107"],
                "acct-3": [],
            },
        },
        RegistrationsConfig(public_only=False),
    )
    assert all(isinstance(value, AccountEntries) for value in parsed.accounts.values())
    assert await store.accounts.replace_snapshot(parsed) == SnapshotResult(accounts=3, entries=5)
    assert await store.readers.list_accounts() == [
        AccountRecord("acct-1", 3, (A, D)),
        AccountRecord("acct-2", 3, (B, A, C)),
        AccountRecord("acct-3", 3, ()),
    ]
    # Entries parsed for another account are stored under the key they are given.
    moved = snapshot(4, {"acct-9": parsed.accounts["acct-1"]})
    assert await store.accounts.replace_snapshot(moved) == SnapshotResult(accounts=1, entries=2)
    assert await store.readers.list_accounts() == [AccountRecord("acct-9", 4, (A, D))]


async def test_snapshot_entry_count_ignores_duplicates(store: RegistrationStore) -> None:
    result = await store.accounts.replace_snapshot(
        snapshot(2, {"acct-1": (A, A, C), "acct-2": (A,)})
    )
    assert result == SnapshotResult(accounts=2, entries=3)
    assert (await store.readers.status()).entries == 3


async def test_snapshot_below_snapshot_version_is_stale(store: RegistrationStore) -> None:
    await store.accounts.replace_snapshot(snapshot(10, {"acct-1": (A,)}))
    generation = await store.readers.generation()
    with pytest.raises(StaleWriteError):
        await store.accounts.replace_snapshot(snapshot(9, {}))
    assert await store.readers.snapshot_version() == 10
    assert await store.readers.generation() == generation
    # The same snapshot again is accepted.
    assert await store.accounts.replace_snapshot(snapshot(10, {"acct-1": (A,)})) == SnapshotResult(
        1, 1
    )


@pytest.mark.parametrize("deleted", [False, True])
async def test_snapshot_older_than_an_account_write_is_stale(
    store: RegistrationStore, deleted: bool
) -> None:
    await store.accounts.replace_snapshot(snapshot(10, {"acct-1": (A,)}))
    await store.accounts.put_account("acct-1", 12, (B,))
    if deleted:
        await store.accounts.delete_account("acct-1", 13)
    with pytest.raises(StaleWriteError):
        await store.accounts.replace_snapshot(snapshot(11, {"acct-1": (A,)}))
    expected = None if deleted else AccountRecord("acct-1", 12, (B,))
    assert await store.readers.get_account("acct-1") == expected
    assert await store.readers.snapshot_version() == 10


# --- operator overrides ----------------------------------------------------------------------


async def test_add_entries_to_new_account_gets_version_zero(store: RegistrationStore) -> None:
    record = await store.accounts.add_entries("acct-1", (C, A), max_per_account=16)
    assert record == AccountRecord("acct-1", 0, (A, C))
    record = await store.accounts.add_entries("acct-1", (A, B), max_per_account=16)
    assert record == AccountRecord("acct-1", 0, (B, A, C))


async def test_add_entries_keeps_version(store: RegistrationStore) -> None:
    await store.accounts.put_account("acct-1", 5, (A,))
    assert await store.accounts.add_entries("acct-1", (B,), 16) == AccountRecord(
        "acct-1", 5, (B, A)
    )
    generation = await store.readers.generation()
    await store.accounts.add_entries("acct-1", (B,), 16)
    assert await store.readers.generation() == generation


async def test_add_entries_revives_a_tombstone_at_its_version(store: RegistrationStore) -> None:
    await store.accounts.put_account("acct-1", 5, (A,))
    await store.accounts.delete_account("acct-1", 6)
    assert await store.accounts.add_entries("acct-1", (B,), 16) == AccountRecord("acct-1", 6, (B,))


async def test_add_entries_enforces_the_limit(store: RegistrationStore) -> None:
    await store.accounts.put_account("acct-1", 5, (A, B))
    generation = await store.readers.generation()
    with pytest.raises(RegistrationError) as caught:
        await store.accounts.add_entries("acct-1", (C, D), max_per_account=3)
    assert caught.value.position == "addresses"
    assert caught.value.reason == "4 entries exceed the limit of 3 per account"
    assert await store.readers.get_account("acct-1") == AccountRecord("acct-1", 5, (B, A))
    assert await store.readers.generation() == generation
    assert await store.accounts.add_entries("acct-1", (A, C), 3) == AccountRecord(
        "acct-1", 5, (B, A, C)
    )


async def test_remove_entries(store: RegistrationStore) -> None:
    await store.accounts.put_account("acct-1", 5, (A, B, C))
    assert await store.accounts.remove_entries("acct-1", (A, D)) is True
    assert await store.readers.get_account("acct-1") == AccountRecord("acct-1", 5, (B, C))
    assert await store.accounts.remove_entries("acct-2", (A,)) is False
    assert await store.accounts.remove_entries("acct-1", None) is True
    assert await store.readers.get_account("acct-1") is None
    assert await store.accounts.remove_entries("acct-1", None) is False
    # The tombstone is at the account's version: a PUT at that version is stale.
    with pytest.raises(StaleWriteError):
        await store.accounts.put_account("acct-1", 5, (A,))
    assert await store.accounts.delete_account("acct-1", 5) is False  # idempotent tombstone

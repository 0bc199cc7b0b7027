"""SPEC 4's version rule, the one both the store and the feed's bucket writes follow."""

from __future__ import annotations

import pytest

from smartdns.errors import StaleWriteError
from smartdns.registrations.versions import Stored, check_write


@pytest.mark.parametrize(
    ("version", "stored", "repeat", "snapshot_version", "outcome"),
    [
        (5, None, False, 0, False),  # new account
        (5, (4, True), False, 0, False),  # newer than live
        (5, (4, False), False, 0, False),  # newer than a tombstone
        (5, (5, True), True, 0, True),  # the same write repeated
        (5, (5, False), True, 0, True),  # the same delete repeated
        (5, (5, True), True, 7, True),  # a snapshot's own account, repeated
        (4, (5, True), False, 0, "older than the stored version 5"),
        (4, (5, False), False, 0, "older than the stored version 5"),
        (5, (5, True), False, 0, "^version 5 is already stored with other content$"),
        (5, (5, False), False, 0, "other content: the account was deleted at version 5"),
        (5, None, False, 5, "not newer than the snapshot version 5"),
        (5, (3, True), False, 6, "not newer than the snapshot version 6"),
    ],
)
def test_check_write_follows_spec_4(
    version: int,
    stored: Stored | None,
    repeat: bool,
    snapshot_version: int,
    outcome: bool | str,
) -> None:
    if isinstance(outcome, bool):
        assert check_write(version, stored, repeat=repeat, snapshot_version=snapshot_version) is (
            outcome
        )
    else:
        with pytest.raises(StaleWriteError, match=outcome):
            check_write(version, stored, repeat=repeat, snapshot_version=snapshot_version)

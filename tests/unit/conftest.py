"""Fixtures more than one unit test module needs, and the property tests' defaults."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from smartdns.registrations.store import RegistrationStore

# Property tests without settings of their own run as the fuzz modules' CI settings do: the
# same examples every run, no per-example deadline (200 ms by default) and no too-slow health
# check, either of which a busy CI machine can fail by timing alone.
settings.register_profile(
    "suite",
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("suite")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RegistrationStore]:
    """A new registrations database in `tmp_path` (a module may define its own `store`)."""
    async with await RegistrationStore.open(tmp_path / "registrations.db", create=True) as opened:
        yield opened

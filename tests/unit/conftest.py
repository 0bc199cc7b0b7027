"""Fixtures more than one unit test module needs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smartdns.registrations.store import RegistrationStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RegistrationStore]:
    """A new registrations database in `tmp_path` (a module may define its own `store`)."""
    async with await RegistrationStore.open(tmp_path / "registrations.db", create=True) as opened:
        yield opened

"""RegistrationWriter on a real SQLite store: it writes, then announces each change once."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import pytest

from smartdns.config.model import RegistrationsConfig
from smartdns.errors import RegistrationError, StaleWriteError
from smartdns.registrations.entries import Snapshot
from smartdns.registrations.store import RegistrationStore
from smartdns.registrations.writer import RegistrationWriter

A = ipaddress.IPv4Network("203.0.113.7/32")
B = ipaddress.IPv4Network("198.51.100.0/24")


@dataclass
class Announcements:
    generations: list[int] = field(default_factory=list)
    everything: list[bool] = field(default_factory=list)

    async def __call__(self, generation: int, everything: bool) -> None:
        self.generations.append(generation)
        self.everything.append(everything)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RegistrationStore]:
    opened = await RegistrationStore.open(tmp_path / "registrations.db", create=True)
    yield opened
    await opened.close()


async def test_each_change_is_announced_with_its_generation(store: RegistrationStore) -> None:
    heard = Announcements()
    writer = RegistrationWriter(store, RegistrationsConfig(public_only=False), heard)
    await writer.put_account("a", 1, [A])
    await writer.put_account("a", 1, [A])  # the same write repeated: nothing changed
    await writer.add_entries("a", [B])
    await writer.remove_entries("a", [B])
    assert await writer.delete_account("a", 2)
    holder = [Snapshot(3, MappingProxyType({"b": (A,)}))]
    assert (await writer.replace_snapshot(holder)).entries == 1
    assert holder == []  # taken and freed once stored
    assert not await writer.remove_entries("missing", None)
    assert heard.generations == [1, 2, 3, 4, 5]
    assert heard.everything == [False, False, False, False, True]
    assert heard.generations[-1] == await store.readers.generation()


async def test_a_refused_write_is_not_announced(store: RegistrationStore) -> None:
    heard = Announcements()
    writer = RegistrationWriter(store, RegistrationsConfig(max_per_account=1), heard)
    await writer.put_account("a", 5, [A])
    with pytest.raises(StaleWriteError):
        await writer.put_account("a", 4, [B])
    with pytest.raises(RegistrationError):
        await writer.add_entries("a", [B])  # over max_per_account
    with pytest.raises(RegistrationError):
        await writer.put_account("not an id", 6, [A])
    assert heard.generations == [1]


async def test_reload_takes_the_new_limit(store: RegistrationStore) -> None:
    writer = RegistrationWriter(store, RegistrationsConfig(max_per_account=1))
    await writer.add_entries("a", [A])
    with pytest.raises(RegistrationError):
        await writer.add_entries("a", [B])
    writer.reload(RegistrationsConfig(max_per_account=2))
    assert len((await writer.add_entries("a", [B])).networks) == 2

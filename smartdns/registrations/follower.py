"""ClientsFollower: keeps a DNS process's AuthorizedClients equal to the registrations store.

A change costs what it touches: the store answers "what changed since generation G" with
indexed reads of the accounts written after G and the entries taken away after G, and those
prefixes (and device ID digests) alone are applied to the set the query path reads, in place
and in one synchronous step (so no query sees half of a change). A snapshot, a SIGHUP, or a
reader too far behind needs a full load instead: it is built off the event loop while
changes keep being applied to the current set, then swapped in together with the changes
written since it was read.
Nothing here grows with the number of writes: the only state is one generation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from smartdns import logs
from smartdns.core.clients import AuthorizedClients, Prefix
from smartdns.errors import SmartDNSError
from smartdns.registrations.bulk import BULK_WORK
from smartdns.registrations.store import Changes, RegistrationStore

log = logging.getLogger(__name__)

FREE_SLICE: Final = 10_000  # rows freed per step off the loop: well under a millisecond each


async def load_clients(store: RegistrationStore) -> tuple[int, AuthorizedClients]:
    """A generation and the whole set at that generation; built off the event loop."""
    with BULK_WORK:  # a million rows
        generation, prefixes, devices = await store.readers.load_prefixes()
        return generation, await asyncio.to_thread(_build_clients, prefixes, devices)


def _build_clients(prefixes: list[Prefix], devices: list[bytes]) -> AuthorizedClients:
    """Build the set, then free the rows a slice at a time (worker thread): freed in one go,
    on the loop thread when load_clients returns, a million rows hold the GIL for tens of
    milliseconds."""
    clients = AuthorizedClients.from_prefixes(prefixes, devices)
    while prefixes:
        del prefixes[-FREE_SLICE:]
    return clients


class ClientsFollower:
    """Follows one store connection; `publish` puts a newly built set in front of queries."""

    def __init__(
        self,
        store: RegistrationStore,
        clients: AuthorizedClients,
        generation: int,
        publish: Callable[[AuthorizedClients], None],
    ) -> None:
        self._store = store
        self._clients = clients
        self._generation = generation  # every write up to it is applied (see _pending)
        self._publish = publish
        self._lock = asyncio.Lock()  # one reader of changes at a time
        self._reading: asyncio.Task[None] | None = None  # the catch-up under way, shared
        # While a full load is due: writes at or below this generation (the snapshot's) are
        # not in the set yet; later ones are, applied on top of the older set.
        self._pending: int | None = None
        self._full_load: asyncio.Task[None] | None = None
        self._errors = logs.WarnOnce(
            __name__, "registration database unreadable; serving the last good registrations"
        )

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def clients(self) -> AuthorizedClients:
        return self._clients

    def is_applied(self, generation: int) -> bool:
        """Whether the write that produced `generation` is in the set queries read."""
        pending = self._pending
        return self._generation >= generation and (pending is None or generation > pending)

    async def wait_applied(self, generation: int) -> None:
        """Return once the write at `generation` is in effect: catch up now (its writer is
        waiting), or wait for the full load that covers it. Raises DatabaseError."""
        while not self.is_applied(generation):
            if self._generation < generation or self._full_load is None:
                await self.catch_up()  # starts the full load when one is due
                if self.is_applied(generation):
                    return
            task = self._full_load
            if task is not None:
                await asyncio.shield(task)

    async def catch_up(self) -> None:
        """Apply what changed since the generation applied, read by the catch-up under way
        if there is one (it may have started before the caller's write: wait_applied looks
        again). Concurrent writes share one read and one step instead of queueing one each
        behind the others: under load each read is several thread hops of a busy loop.
        Raises DatabaseError."""
        reading = self._reading
        # A read that has ended is not joined, though its done callback may not have run yet:
        # awaiting it returns at once, and a waiter it did not satisfy would spin on it
        # without ever yielding to the loop.
        if reading is None or reading.done():
            reading = self._reading = asyncio.get_running_loop().create_task(self._read())
            reading.add_done_callback(self._read_done)
        await asyncio.shield(reading)

    async def _read(self) -> None:
        async with self._lock:
            changes = await self._store.readers.changes_since(self._generation)
            self._apply(self._clients, changes)
        if self._pending is not None and self._full_load is None:
            self._full_load = asyncio.get_running_loop().create_task(self._load_fully())

    def _read_done(self, task: asyncio.Task[None]) -> None:
        if self._reading is task:
            self._reading = None
        if not task.cancelled():
            task.exception()  # retrieved: its waiters, if any are left, got it too

    async def reload(self) -> None:
        """SIGHUP: read everything again, built aside and swapped in."""
        if self._full_load is None:
            self._pending = self._generation
            self._full_load = asyncio.get_running_loop().create_task(self._load_fully())
        await asyncio.shield(self._full_load)

    def _apply(self, clients: AuthorizedClients, changes: Changes) -> None:
        # No await: all of it or none of it, addresses and device IDs in the same step.
        clients.apply(changes.present, changes.gone, changes.devices_present, changes.devices_gone)
        self._generation = changes.generation
        if changes.full_load:
            self._pending = max(self._pending or 0, changes.base)

    async def _load_fully(self) -> None:
        """Build the whole set aside, then swap it in with the changes made since it was read;
        again if another snapshot landed meanwhile. On failure the current set stays."""
        try:
            while self._pending is not None:
                # A connection of its own: reading a million rows takes the database thread
                # for a second, and the changes applied meanwhile must not wait behind it.
                async with await RegistrationStore.open(self._store.path, create=False) as bulk:
                    generation, clients = await load_clients(bulk)
                async with self._lock:
                    changes = await self._store.readers.changes_since(generation)
                    self._pending = None
                    self._apply(clients, changes)
                    self._clients = clients
                    self._publish(clients)
                log.info("registrations loaded: %d entries", clients.entries)
        except SmartDNSError as error:
            self._errors.warn(type(error).__name__)
        finally:
            self._full_load = None

    async def follow(self, interval_s: float) -> None:
        """Poll for writers that cannot announce their changes (the CLI, another process):
        one cheap generation read, then catch up with what changed."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if await self._store.readers.generation() != self._generation or (
                    self._pending is not None and self._full_load is None
                ):
                    await self.catch_up()
            except SmartDNSError as error:
                self._errors.warn(type(error).__name__)

    async def close(self) -> None:
        """Stop a full load and a catch-up in flight."""
        tasks = [task for task in (self._full_load, self._reading) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

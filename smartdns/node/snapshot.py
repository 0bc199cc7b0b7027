"""Keeps the query path's client set equal to the registration store: loaded whole at start,
then each change applied as it comes (registrations.follower), announced by the writer in
this node or noticed by polling the store's generation (the CLI, another process).

One lifecycle component, `SnapshotWatch`; the only place a DNS process reads registrations.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from smartdns.config.model import Config
from smartdns.core.clients import AuthorizedClients
from smartdns.node.components import Database, cancel_tasks
from smartdns.node.lifecycle import Component
from smartdns.registrations.follower import ClientsFollower, load_clients
from smartdns.serve.pipeline import Pipeline

log = logging.getLogger(__name__)

REGISTRY_POLL_S: Final = 0.25  # SPEC 4: a change is in effect within one second


class SnapshotWatch(Component):
    """Loads `pipeline.clients` before the listeners start, then follows the store: a write
    announced here (`wait_applied`) is applied at once, any other within REGISTRY_POLL_S;
    a reload reads everything again, built aside and swapped in."""

    name = "registration snapshot"

    def __init__(self, database: Database, pipeline: Pipeline) -> None:
        self._database = database
        self._pipeline = pipeline
        self._follower: ClientsFollower | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def follower(self) -> ClientsFollower:
        if self._follower is None:
            raise RuntimeError("the registration snapshot is not loaded")
        return self._follower

    async def start(self, config: Config) -> None:
        store = self._database.store
        generation, clients = await load_clients(store)
        self._publish(clients)
        self._follower = ClientsFollower(store, clients, generation, self._publish)
        self._task = asyncio.get_running_loop().create_task(self._follower.follow(REGISTRY_POLL_S))
        log.info("registrations loaded: %d entries", clients.entries)

    async def reload(self, config: Config) -> None:
        await self.follower.reload()

    async def stop(self) -> None:
        await cancel_tasks(self._task)
        self._task = None
        if self._follower is not None:
            await self._follower.close()

    async def wait_applied(self, generation: int) -> None:
        """Return once the write that produced `generation` is in this process's answers."""
        await self.follower.wait_applied(generation)

    def _publish(self, clients: AuthorizedClients) -> None:
        self._pipeline.clients = clients
